import torch

from conftest import randomize_erasers, run, tiny_inputs, tiny_transformer
from lowmem_eraser import attach_erasers
from lowmem_eraser.memory import LiveTensorTracker, MemoryMeter, tensor_bytes


def test_tracker_counts_new_storages_exactly():
    before = torch.ones(100)  # created outside: invisible, and so are its views
    with LiveTensorTracker() as tracker:
        a = torch.empty(1000)  # 4000 B
        b = torch.empty(250, dtype=torch.float64)  # 2000 B
        c = torch.zeros(100, dtype=torch.int8)  # 100 B
        views = (a[10:], a.view(10, 100), before.t(), before[:5])
        a.add_(1)  # in place: no new storage
        doubled = before * 2  # 400 B
        assert tracker.live_bytes == 6500
        del b
        assert (tracker.live_bytes, tracker.peak_bytes) == (4500, 6500)
        tracker.reset_peak()
        assert tracker.peak_bytes == 4500
        del a, views  # the storage goes only with its last view
        assert tracker.live_bytes == 500
    del c, doubled
    assert tracker.live_bytes == 0


def test_memory_meter_on_cpu_tracks_the_first_steps_only():
    meter = MemoryMeter("cpu", cpu_steps=2)
    with meter.step():
        x = torch.empty(256)
        del x
        y = torch.empty(64)
    assert meter.peak_bytes == 1024
    with meter.step():
        z = torch.empty(512)  # 1024 + 256 alive at once
    assert meter.peak_bytes == 256 + 2048
    with meter.step():  # past cpu_steps: not tracked
        big = torch.empty(10_000)
    assert meter.peak_bytes == 256 + 2048
    del y, z, big


def test_tensor_bytes_counts_each_storage_once():
    linear = torch.nn.Linear(4, 3)
    linear.register_buffer("steps", torch.zeros(2, dtype=torch.int64))
    assert tensor_bytes(linear) == (12 + 3) * 4 + 2 * 8
    t = torch.zeros(10, dtype=torch.float16)
    assert tensor_bytes([t, t[2:], t.view(2, 5)]) == 20
    assert tensor_bytes(linear.half()) == (12 + 3) * 2 + 2 * 8


def _student_pass(checkpointing: bool):
    transformer = tiny_transformer(num_layers=4).requires_grad_(False)
    erasers = attach_erasers(transformer, rank=8)
    randomize_erasers(erasers)
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    with LiveTensorTracker() as tracker:
        out = run(transformer, tiny_inputs())
    saved = tracker.live_bytes  # after forward, before backward: output + what autograd keeps for backward
    out.square().mean().backward()
    return saved, [p.grad for p in erasers.parameters()]


def test_gradient_checkpointing_cuts_saved_activations_below_035x():
    full, full_grads = _student_pass(checkpointing=False)
    checkpointed, checkpointed_grads = _student_pass(checkpointing=True)
    print(f"saved activations: {full} B without checkpointing, {checkpointed} B with ({checkpointed / full:.3f}x)")
    assert checkpointed <= 0.35 * full
    for grad, reference in zip(checkpointed_grads, full_grads):
        torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-6)


def test_cuda_allocator_gets_expandable_segments_unless_the_user_chose(monkeypatch):
    import os

    from lowmem_eraser.memory import CUDA_ALLOC_CONF, configure_cuda_allocator

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    configure_cuda_allocator()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == CUDA_ALLOC_CONF == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    configure_cuda_allocator()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
