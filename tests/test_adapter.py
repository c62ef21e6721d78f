import pytest
import torch
import torch.nn.functional as F

from conftest import randomize_erasers, run, tiny_inputs, tiny_transformer
from lowmem_eraser import (
    EraserAdapter,
    LowmemEraserError,
    attach_erasers,
    detach_erasers,
    erasers_disabled,
    get_erasers,
    set_eraser_scale,
)


def test_adapter_is_the_published_module():
    torch.manual_seed(0)
    adapter = EraserAdapter(dim=40, rank=6)
    assert [name for name, _ in adapter.named_children()] == ["down", "act", "up"]
    assert isinstance(adapter.act, torch.nn.GELU) and adapter.act.approximate == "none"
    assert list(adapter.state_dict()) == ["down.weight", "down.bias", "up.weight", "up.bias"]
    assert adapter.down.weight.shape == (6, 40) and adapter.up.weight.shape == (40, 6)
    x = torch.randn(3, 40)
    assert torch.equal(adapter(x), x)  # up is zero-initialised
    torch.nn.init.normal_(adapter.up.weight)
    h = x.double() @ adapter.down.weight.double().T + adapter.down.bias.double()
    expected = x.double() + (0.5 * h * (1 + torch.erf(h / 2**0.5))) @ adapter.up.weight.double().T
    torch.testing.assert_close(adapter(x).double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(adapter.delta(x), adapter(x) - x, rtol=0, atol=1e-6)


def test_attach_keys_names_and_base_state_dict(transformer):
    before = list(transformer.state_dict())
    erasers = attach_erasers(transformer, rank=8)
    assert list(erasers.keys()) == ["transformer_blocks.0.attn1.adapter", "transformer_blocks.1.attn1.adapter"]
    assert list(erasers.state_dict())[:4] == [
        "transformer_blocks.0.attn1.adapter.down.weight",
        "transformer_blocks.0.attn1.adapter.down.bias",
        "transformer_blocks.0.attn1.adapter.up.weight",
        "transformer_blocks.0.attn1.adapter.up.bias",
    ]
    assert isinstance(erasers, torch.nn.ModuleDict) and len(erasers) == 2
    assert erasers["transformer_blocks.1.attn1.adapter"].down.weight.shape == (8, 32)
    assert list(transformer.state_dict()) == before
    assert all(p.dtype == torch.float32 for p in erasers.parameters())
    with pytest.raises(LowmemEraserError, match="already attached"):
        attach_erasers(transformer)


def test_zero_init_disabled_and_detached_match_base(transformer, inputs):
    with torch.no_grad():
        base = run(transformer, inputs)
        erasers = attach_erasers(transformer, rank=8)
        assert torch.equal(run(transformer, inputs), base)  # zero-initialised
        randomize_erasers(erasers)
        erased = run(transformer, inputs)
        assert (erased - base).abs().max() > 1e-3
        with erasers_disabled(transformer):
            assert torch.equal(run(transformer, inputs), base)
        assert torch.equal(run(transformer, inputs), erased)  # re-enabled on exit
        set_eraser_scale(transformer, 0.0)
        assert torch.equal(run(transformer, inputs), base)
        set_eraser_scale(transformer, 1.0)
        detach_erasers(transformer)
        assert get_erasers(transformer) is None
        assert torch.equal(run(transformer, inputs), base)
    with pytest.raises(LowmemEraserError, match="no erasers"):
        detach_erasers(transformer)


def test_adapter_acts_on_video_output_only_before_the_gate(transformer):
    erasers = attach_erasers(transformer, rank=8)
    randomize_erasers(erasers)
    attn = transformer.transformer_blocks[0].attn1
    video, text = torch.randn(1, 48, 32), torch.randn(1, 7, 32)
    with torch.no_grad():
        with erasers_disabled(transformer):
            base_video, base_text = attn(video, encoder_hidden_states=text)
        set_eraser_scale(transformer, 0.5)
        out_video, out_text = attn(video, encoder_hidden_states=text)
    assert torch.equal(out_text, base_text)
    adapter = erasers["transformer_blocks.0.attn1.adapter"]
    torch.testing.assert_close(out_video, base_video + 0.5 * adapter.delta(base_video), rtol=0, atol=1e-6)


def test_hook_computes_in_activation_dtype_with_fp32_master_weights():
    transformer = tiny_transformer().to(torch.bfloat16)
    erasers = attach_erasers(transformer, rank=8)
    randomize_erasers(erasers)
    assert all(p.dtype == torch.float32 for p in erasers.parameters())
    out = run(transformer, tiny_inputs(dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    grads = [p.grad for p in erasers.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)


def test_scale_is_applied_linearly_to_the_delta(transformer):
    erasers = attach_erasers(transformer, rank=8)
    randomize_erasers(erasers)
    attn = transformer.transformer_blocks[1].attn1
    video, text = torch.randn(1, 48, 32), torch.randn(1, 7, 32)
    with torch.no_grad():
        outs = {}
        for scale in (0.0, 1.0, 2.5):
            set_eraser_scale(transformer, scale)
            outs[scale] = attn(video, encoder_hidden_states=text)[0]
    torch.testing.assert_close(outs[2.5] - outs[0.0], 2.5 * (outs[1.0] - outs[0.0]), rtol=1e-5, atol=1e-5)


def _adapter_grads(transformer, inputs, checkpointing, scale_at_forward, change_before_backward=None):
    transformer.zero_grad(set_to_none=True)
    erasers = get_erasers(transformer)
    erasers.zero_grad(set_to_none=True)
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    else:
        transformer.disable_gradient_checkpointing()
    transformer.train()
    set_eraser_scale(transformer, scale_at_forward)
    loss = run(transformer, inputs).square().mean()
    if change_before_backward == "scale":
        set_eraser_scale(transformer, 3.0)
        loss.backward()
    elif change_before_backward == "disabled":
        with erasers_disabled(transformer):
            loss.backward()
    else:
        loss.backward()
    set_eraser_scale(transformer, 1.0)
    return [p.grad.clone() for p in erasers.parameters()]


@pytest.mark.parametrize("change", [None, "scale", "disabled"])
def test_checkpointed_gradients_equal_plain_ones_even_if_state_changes_before_backward(transformer, inputs, change):
    erasers = attach_erasers(transformer, rank=8)
    randomize_erasers(erasers)
    reference = _adapter_grads(transformer, inputs, checkpointing=False, scale_at_forward=0.7)
    got = _adapter_grads(transformer, inputs, checkpointing=True, scale_at_forward=0.7, change_before_backward=change)
    assert transformer._gradient_checkpointing_func == erasers.checkpoint
    for ref, grad in zip(reference, got):
        assert ref.abs().sum() > 0
        torch.testing.assert_close(grad, ref, rtol=1e-6, atol=1e-9)


def test_detach_restores_default_checkpointing(transformer, inputs):
    transformer.enable_gradient_checkpointing()
    erasers = attach_erasers(transformer, rank=4)
    transformer.train()
    run(transformer, inputs).sum().backward()
    assert transformer._gradient_checkpointing_func == erasers.checkpoint
    detach_erasers(transformer)
    assert transformer._gradient_checkpointing_func != erasers.checkpoint
    assert transformer.gradient_checkpointing


def test_attach_rejects_bad_models_and_ranks(transformer):
    with pytest.raises(LowmemEraserError, match="Linear is not a supported transformer; supported families: CogVideoX"):
        attach_erasers(torch.nn.Linear(3, 3))
    with pytest.raises(LowmemEraserError, match="rank"):
        attach_erasers(transformer, rank=0)
    assert get_erasers(transformer) is None


def _checkpointed_adapter_grads(kernels, localization=False):
    transformer = tiny_transformer()
    erasers = attach_erasers(transformer, rank=8)
    randomize_erasers(erasers)
    erasers.kernels = kernels
    transformer.enable_gradient_checkpointing()
    inputs = tiny_inputs()
    if localization:
        mask = (torch.arange(48) % 3 == 0).float()[None]
        with erasers.collecting_localization(mask) as terms:
            out = run(transformer, inputs)
        assert len(terms) == 2
        loss = out.square().mean() + torch.stack(terms).mean()
    else:
        loss = run(transformer, inputs).square().mean()
    loss.backward()
    return loss.detach(), [p.grad for p in erasers.parameters()]


@pytest.mark.parametrize("localization", [False, True])
def test_triton_hook_gradients_match_pytorch_path_under_checkpointing(localization):
    torch_loss, torch_grads = _checkpointed_adapter_grads("torch", localization)
    triton_loss, triton_grads = _checkpointed_adapter_grads("triton", localization)
    torch.testing.assert_close(triton_loss, torch_loss, rtol=1e-5, atol=0)
    for got, ref in zip(triton_grads, torch_grads):
        assert ref.abs().sum() > 0
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


def test_localization_terms_are_collected_once_and_differentiate_through_checkpointing():
    """L_loc computed inside checkpointed blocks: same value and gradients as without checkpointing."""
    results = []
    for checkpointing in (False, True):
        transformer = tiny_transformer()
        erasers = attach_erasers(transformer, rank=8)
        randomize_erasers(erasers)
        erasers.kernels = "torch"
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        mask = (torch.arange(48) % 4 == 0).float()[None]
        with erasers.collecting_localization(mask) as terms:
            run(transformer, tiny_inputs())
        loc = torch.stack(terms).mean()
        loc.backward()
        assert len(terms) == 2 and erasers.localization_mask is None
        results.append((loc.detach(), [p.grad.clone() for p in erasers.parameters()]))
    (loc_plain, grads_plain), (loc_ckpt, grads_ckpt) = results
    assert loc_plain > 0
    torch.testing.assert_close(loc_ckpt, loc_plain, rtol=1e-6, atol=0)
    for got, ref in zip(grads_ckpt, grads_plain):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9)
