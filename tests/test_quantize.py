import pytest
import torch

from conftest import randomize_erasers, run, tiny_inputs, tiny_transformer
from lowmem_eraser import Int8Linear, LowmemEraserError, attach_erasers, quantize_base
from lowmem_eraser.quantize import quantize_weight


def block_bytes(transformer):
    blocks = transformer.transformer_blocks
    return sum(t.numel() * t.element_size() for t in [*blocks.parameters(), *blocks.buffers()])


def test_quantize_weight_is_per_channel_absmax():
    w = torch.tensor([[0.5, -1.0, 0.25], [3.0, 1.5, -0.0]])
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert torch.equal(scale, torch.tensor([1.0, 3.0]) / 127)
    assert torch.equal(q, torch.tensor([[64, -127, 32], [127, 64, 0]], dtype=torch.int8))


def test_only_block_linears_are_quantized_and_frozen(transformer):
    linears = sum(type(m) is torch.nn.Linear for m in transformer.transformer_blocks.modules())
    quantize_base(transformer, backend="int8")
    quantized = [m for m in transformer.modules() if isinstance(m, Int8Linear)]
    assert len(quantized) == linears == 2 * 8  # q, k, v, out, ff in/out, norm1/norm2 AdaLN linears
    assert type(transformer.proj_out) is torch.nn.Linear
    assert not any(p.requires_grad for p in transformer.parameters())
    assert all(isinstance(m.weight, torch.Tensor) and not isinstance(m.weight, torch.nn.Parameter) for m in quantized)
    with pytest.raises(LowmemEraserError, match="already quantised"):
        quantize_base(transformer)
    with pytest.raises(LowmemEraserError, match="backend"):
        quantize_base(tiny_transformer(), backend="fp4")


COGVIDEOX_2B = dict(num_attention_heads=30, attention_head_dim=64, num_layers=30, time_embed_dim=512, text_embed_dim=4096)


@pytest.mark.parametrize("size", ["tiny", "cogvideox-2b"])
def test_quantized_block_memory_is_under_030_of_fp32(size):
    if size == "tiny":
        transformer = tiny_transformer(num_attention_heads=4, attention_head_dim=32)
    else:  # full size on the meta device: shapes and dtypes only, no memory
        from diffusers import CogVideoXTransformer3DModel

        with torch.device("meta"):
            transformer = CogVideoXTransformer3DModel(**COGVIDEOX_2B)
    fp32 = block_bytes(transformer)
    quantize_base(transformer, backend="int8")
    ratio = block_bytes(transformer) / fp32
    print(f"{size}: quantized/fp32 block parameter bytes = {ratio:.4f} ({block_bytes(transformer) / 2**30:.3f} GiB)")
    assert ratio <= 0.30


@pytest.mark.parametrize("backend", ["int8", "triton"])
def test_output_and_input_gradient_error_vs_fp32(backend):
    inputs = tiny_inputs()
    reference = tiny_transformer()
    latents = inputs[0].clone().requires_grad_(True)
    ref_out = run(reference, (latents, *inputs[1:]))
    (ref_grad,) = torch.autograd.grad(ref_out.square().sum(), latents)

    quantized = quantize_base(tiny_transformer(), backend=backend)
    latents = inputs[0].clone().requires_grad_(True)
    out = run(quantized, (latents, *inputs[1:]))
    (grad,) = torch.autograd.grad(out.square().sum(), latents)

    out_abs = (out - ref_out).abs().max().item()
    out_rel = out_abs / ref_out.abs().max().item()
    grad_rel = ((grad - ref_grad).norm() / ref_grad.norm()).item()
    print(f"{backend}: output max abs err {out_abs:.2e}, rel {out_rel:.2e}; input-grad rel err {grad_rel:.2e}")
    assert out_rel < 4e-3
    assert grad_rel < 6e-3


def test_int8_backward_saves_no_dequantized_weight(transformer, inputs):
    quantize_base(transformer, backend="int8")
    weight_shapes = {tuple(m.weight.shape) for m in transformer.modules() if isinstance(m, Int8Linear)}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        latents = inputs[0].clone().requires_grad_(True)
        run(transformer, (latents, *inputs[1:]))
    big_float_weights = [t for t in saved if t.is_floating_point() and tuple(t.shape) in weight_shapes]
    int8_weights = [t for t in saved if t.dtype == torch.int8]
    assert int8_weights and not big_float_weights


def test_adapter_gradients_flow_through_quantized_base_with_checkpointing(inputs):
    grads = {}
    for quantized in (False, True):
        transformer = tiny_transformer()
        if quantized:
            quantize_base(transformer, backend="int8")
        transformer.requires_grad_(False)
        erasers = attach_erasers(transformer, rank=8)
        randomize_erasers(erasers)
        transformer.enable_gradient_checkpointing()
        transformer.train()
        run(transformer, inputs).square().mean().backward()
        grads[quantized] = torch.cat([p.grad.flatten() for p in erasers.parameters()])
        assert not any(b.requires_grad for b in transformer.buffers())
    rel = ((grads[True] - grads[False]).norm() / grads[False].norm()).item()
    print(f"adapter-gradient rel err, int8 vs fp32 base: {rel:.2e}")
    assert grads[True].abs().sum() > 0 and rel < 2e-2


def test_bnb_backend_runs_on_cpu(inputs):
    reference = tiny_transformer()
    quantized = quantize_base(tiny_transformer(), backend="bnb")
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in quantized.modules())
    latents = inputs[0].clone().requires_grad_(True)
    out = run(quantized, (latents, *inputs[1:]))
    out.square().sum().backward()
    with torch.no_grad():
        ref = run(reference, inputs)
    assert latents.grad is not None and torch.isfinite(latents.grad).all()
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 3e-2



def test_int8_backend_quantizes_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        transformer = tiny_transformer()
        quantize_base(transformer, backend="int8")
        out = run(transformer, tiny_inputs())
    assert out.shape == (1, 3, 4, 8, 8)
    assert type(transformer.transformer_blocks[0].attn1.to_q).__name__ == "Int8Linear"


def test_bnb_backend_without_bitsandbytes_says_how_to_install_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if it were not installed
    with pytest.raises(LowmemEraserError, match=r"pip install 'lowmem-eraser\[bnb\]'"):
        quantize_base(tiny_transformer(), backend="bnb")
