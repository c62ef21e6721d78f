"""bench/check_offload_cuda.py's comparison on CPU: the same code path as the CUDA check (gpu_check.sh step c), with
tiny blocks, BlockOffloader(stream=True) and activation offload "emulate", so that the check's own logic (variants,
per-step counters, peaks, verdicts) runs in CI although the check itself needs a GPU."""

import sys
from pathlib import Path

import pytest
import torch

from conftest import randomize_erasers, tiny_transformer
from lowmem_eraser import attach_erasers
from lowmem_eraser.config import VideoConfig
from lowmem_eraser.offload import aligned_bytes
from lowmem_eraser.plan import step_inputs

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
try:
    import check_offload_cuda as check
finally:
    sys.path.pop(0)

CPU = torch.device("cpu")
LAYERS = 4  # as on CUDA: the partial swap streams 3, enough to evict from the two slots


def _student():
    transformer = tiny_transformer(num_layers=LAYERS, use_rotary_positional_embeddings=True).requires_grad_(False)
    transformer.enable_gradient_checkpointing()
    erasers = attach_erasers(transformer, rank=4)
    randomize_erasers(erasers)
    erasers.kernels = "torch"  # the Triton interpreter would only make these steps slower
    return transformer, erasers, step_inputs(transformer, VideoConfig(frames=9, height=64, width=64), 1,
                                             torch.float32)


@pytest.mark.usefixtures("one_thread")
def test_the_cuda_checks_comparison_passes_on_cpu_and_reports_what_each_rung_moved():
    transformer, erasers, inputs = _student()
    # what one block copy moves: its flat buffer (tensors aligned, as BlockOffloader lays them out)
    copy_bytes = {sum(aligned_bytes(t) for t in {id(t): t for t in (*b.parameters(), *b.buffers())}.values())
                  for b in transformer.transformer_blocks}
    assert len(copy_bytes) == 1
    copy_bytes = copy_bytes.pop()
    comparison = check.compare(transformer, erasers, inputs, CPU, exact=True, stream=True,
                               activation_mode="emulate", min_bytes=0)
    results = {r.variant.name: r for r in comparison.results}
    assert list(results) == ["swap all", "swap 3 of 4", "activations", "swap all + activations"]
    assert comparison.ok and comparison.reproducible and comparison.noise == 0
    assert all(r.verdict == "bit-equal" and r.equal == [True, True] for r in results.values())

    # Blocks: 7N - 8 copies per step (tests/test_offload.py) once the ring runs; the first step also fills both
    # slots, and only its very first copy is not prefetched.
    for name, streamed in (("swap all", LAYERS), ("swap 3 of 4", 3), ("swap all + activations", LAYERS)):
        r = results[name]
        assert r.misses == [1, 0], name
        assert r.block_bytes == [(7 * streamed - 6) * copy_bytes, (7 * streamed - 8) * copy_bytes], name
    assert results["activations"].block_bytes == [0, 0]

    # Activations: the same tensors whether or not the blocks stream (streamed weights are not activations),
    # and the same bytes every step, both ways (a tensor unpacked again after its device copy died comes back
    # twice, so what comes back may exceed what went out).
    offloaded, back = results["activations"].to_host, results["activations"].to_device
    assert offloaded[0] == offloaded[1] > 0 and back[0] == back[1] > 0
    both = results["swap all + activations"]
    assert both.to_host == offloaded and both.to_device == back
    assert results["swap all"].to_host == [0, 0]
    # With the saved inputs on the host, the step's tracked peak drops (what the CUDA table shows as a delta).
    assert results["activations"].peak < comparison.resident_peak

    lines = check.table([("float32, quantize none", comparison)])
    assert len(lines) == 2 + 1 + 4 and all(line.count("|") == lines[0].count("|") for line in lines)


def _result(blocks, activations, *, equal=(True, True), errors=(0.0, 0.0), moved=1):
    return check.Result(check.Variant("v", blocks, activations), errors=list(errors), equal=list(equal),
                        block_bytes=[moved] * 2, misses=[1, 0], to_host=[moved] * 2, to_device=[moved] * 2)


@pytest.mark.parametrize("result,exact,ok,verdict", [
    (_result(None, False), True, True, "bit-equal"),
    (_result(None, False, equal=(True, False)), True, False, "DIFFERENT"),
    (_result(0, True, errors=(5e-3, 9e-3), equal=(False, False)), False, True, "close"),
    (_result(0, True, errors=(5e-3, 2e-2), equal=(False, False)), False, False, "NOT CLOSE"),
    (_result(None, True, moved=0), True, False, "NOTHING MOVED"),
], ids=["exact-equal", "exact-one-step-differs", "bf16-close", "bf16-too-far", "nothing-moved"])
def test_the_verdict_fails_differences_errors_beyond_the_tolerance_and_rungs_that_moved_nothing(
        result, exact, ok, verdict):
    check.judge(result, exact)
    assert result.ok is ok and verdict in result.verdict
