import pytest
import torch

from conftest import randomize_erasers, run, tiny_inputs, tiny_transformer
from lowmem_eraser import LowmemEraserError, attach_erasers, erasers_disabled
from lowmem_eraser.memory import LiveTensorTracker, tensor_bytes
from lowmem_eraser.offload import BlockOffloader

CPU = torch.device("cpu")


def _student(quantized: bool = False):
    """A frozen 3-block base with randomised erasers and checkpointing, as the training loop builds it."""
    transformer = tiny_transformer(num_layers=3).requires_grad_(False)
    if quantized:
        try:
            from lowmem_eraser import quantize_base
        except ImportError as error:
            pytest.skip(f"quantize_base is not importable yet: {error}")
        quantize_base(transformer, backend="int8")
    erasers = attach_erasers(transformer, rank=8)
    randomize_erasers(erasers)
    transformer.enable_gradient_checkpointing()
    return transformer, erasers


def _training_step(transformer, erasers, inputs):
    """Student pass with grad, frozen teacher pass, backward: the order of block visits of a real step."""
    student = run(transformer, inputs)
    with torch.no_grad(), erasers_disabled(transformer):
        teacher = run(transformer, inputs)
    (student - teacher).square().mean().backward()
    grads = [p.grad.clone() for p in erasers.parameters()]
    erasers.zero_grad(set_to_none=True)
    return student.detach(), teacher, grads


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "int8"])
def test_streaming_changes_no_output_and_no_gradient(quantized):
    transformer, erasers = _student(quantized)
    inputs = tiny_inputs()
    reference = _training_step(transformer, erasers, inputs)
    with BlockOffloader(transformer, CPU, stream=True):
        for _ in range(2):  # the second step starts from the ring state the first backward left
            student, teacher, grads = _training_step(transformer, erasers, inputs)
            assert torch.equal(student, reference[0]) and torch.equal(teacher, reference[1])
            assert not torch.equal(student, teacher)
            assert all(torch.equal(g, r) for g, r in zip(grads, reference[2]))
            assert all(g.abs().sum() > 0 for g in grads)


def test_the_next_block_is_prefetched_forward_and_during_recomputation():
    transformer, erasers = _student()
    blocks = transformer.transformer_blocks
    with BlockOffloader(transformer, CPU, stream=True):
        host = [block.norm1.linear.weight.data_ptr() for block in blocks]  # each block views its host buffer
        visits = []  # (block about to run, which blocks are bound to a slot at that moment)

        def record(index, module, args):
            visits.append((index, [block.norm1.linear.weight.data_ptr() != ptr for block, ptr in zip(blocks, host)]))

        for i, block in enumerate(blocks):
            block.register_forward_pre_hook(lambda module, args, i=i: record(i, module, args))
        _training_step(transformer, erasers, tiny_inputs())
    order = [index for index, _ in visits]
    assert order == [0, 1, 2, 0, 1, 2, 2, 1, 0]  # student, teacher, recomputation during backward
    for (index, bound), (next_index, _) in zip(visits, visits[1:]):
        if abs(next_index - index) == 1:
            assert bound[index] and bound[next_index], (index, next_index, bound)


def test_slots_hold_two_blocks():
    transformer, _ = _student()
    with LiveTensorTracker() as tracker:
        offloader = BlockOffloader(transformer, CPU, stream=True)
        offloader.attach()
    host = [tensor_bytes(block) for block in transformer.transformer_blocks]  # each block views its flat buffer
    assert host[0] >= tensor_bytes(tiny_transformer(num_layers=1).transformer_blocks[0])
    assert tracker.live_bytes - sum(host) == offloader.slot_bytes == 2 * max(host)
    offloader.detach()


def test_a_stale_reference_to_a_slot_raises_instead_of_computing_wrong_gradients():
    transformer, _ = _student()
    blocks = transformer.transformer_blocks
    hidden = torch.randn(1, 48, 32, requires_grad=True)
    text, temb = torch.randn(1, 7, 32), torch.randn(1, 32)
    with BlockOffloader(transformer, CPU, stream=True):
        video, _ = blocks[0](hidden, text, temb)  # outside checkpointing: autograd saves views of slot 0
        video.sum().backward()  # fine while slot 0 still holds block 0
        video, _ = blocks[0](hidden, text, temb)
        blocks[2](hidden, text, temb)  # streams block 2 into slot 0
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            video.sum().backward()


def test_grad_passes_need_checkpointing_and_frozen_passes_do_not():
    transformer, _ = _student()
    inputs = tiny_inputs()
    with torch.no_grad():
        expected = run(transformer, inputs)
    transformer.disable_gradient_checkpointing()
    with BlockOffloader(transformer, CPU, stream=True):
        with pytest.raises(LowmemEraserError, match="gradient checkpointing"):
            run(transformer, inputs)
        with torch.no_grad():
            assert torch.equal(run(transformer, inputs), expected)


def test_detach_restores_the_original_tensors():
    transformer, _ = _student()
    before = {name: tensor.clone() for name, tensor in transformer.state_dict().items()}
    flags = {name: p.requires_grad for name, p in transformer.named_parameters()}
    offloader = BlockOffloader(transformer, CPU, stream=True)
    offloader.attach()
    run(transformer, tiny_inputs()).sum().backward()
    offloader.detach()
    after = transformer.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())
    assert {name: p.requires_grad for name, p in transformer.named_parameters()} == flags
    assert all(type(p) is torch.nn.Parameter for p in transformer.parameters())
    block = transformer.transformer_blocks[0]
    assert tensor_bytes(block) == sum(t.nbytes for t in [*block.parameters(), *block.buffers()])  # own storages
    with pytest.raises(LowmemEraserError, match="not attached"):
        offloader.detach()


def test_on_cpu_without_streaming_it_is_a_noop():
    transformer, _ = _student()
    params = list(transformer.parameters())
    offloader = BlockOffloader(transformer, CPU)
    with pytest.warns(UserWarning, match="does nothing on cpu"):
        offloader.attach()
    assert not offloader.enabled and list(transformer.parameters()) == params
    offloader.detach()


def test_tensor_subclasses_such_as_bitsandbytes_params_are_refused():
    class Int8Params(torch.nn.Parameter):
        pass

    transformer, _ = _student()
    linear = transformer.transformer_blocks[1].ff.net[2]
    linear.weight = Int8Params(linear.weight.detach(), requires_grad=False)
    with pytest.raises(LowmemEraserError, match="cannot stream .*Int8Params"):
        BlockOffloader(transformer, CPU, stream=True).attach()
