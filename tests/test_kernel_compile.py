"""Every Triton kernel compiles for real GPUs (sm_80/86/89/90) in every launch configuration the host
wrappers choose for the real shapes, with shared memory to spare; the GPU fallback notice works.

The interpreter the other kernel tests use checks numerics only: a Python global read inside a kernel or a
tile too big for a consumer GPU's 99 KiB of shared memory passes there and crashes the first GPU launch.
"""

import json
import logging
import os
import subprocess
import sys

import pytest

from lowmem_eraser.kernels import utils
from lowmem_eraser.kernels.utils import SHARED_MEMORY, SHARED_MEMORY_MARGIN, Target, pipeline_stages

triton = pytest.importorskip("triton", reason="compiling for GPU targets needs triton")
needs_specialize = pytest.mark.skipif(
    not hasattr(pytest.importorskip("triton._C.libtriton"), "native_specialize_impl"),
    reason="this Triton has no native_specialize_impl (Triton >= 3.4 specialises launches with it)",
)


@needs_specialize
def test_every_kernel_compiles_for_every_gpu_architecture_with_shared_memory_to_spare(tmp_path):
    out = tmp_path / "compiled.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter cannot compile
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9's default, stated to silence its warning
    done = subprocess.run([sys.executable, "-m", "lowmem_eraser.kernels.compile_check", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=1200)
    print(done.stdout)  # the compile table: shared memory, registers, spills per kernel and architecture
    results = json.loads(out.read_text())
    errors = [f"{r['kernel']} sm_{r['arch']} {r['constexprs']}: {r['error']}" for r in results if r["error"]]
    assert not errors, "\n".join(errors)
    tight = [f"{r['kernel']} sm_{r['arch']} {r['constexprs']} {r['options']}: {r['shared']} B of {r['limit']} B"
             for r in results if r["margin"] < SHARED_MEMORY_MARGIN]
    assert not tight, "less than 8 KiB of shared memory to spare:\n" + "\n".join(tight)
    assert {r["arch"] for r in results} == set(SHARED_MEMORY)
    kernels = {"_down_kernel", "_up_kernel", "_weight_grad_kernel", "_w8a16_kernel"}
    for arch in SHARED_MEMORY:
        assert {r["kernel"] for r in results if r["arch"] == arch} == kernels
    assert done.returncode == 0, done.stderr[-3000:]


def test_pipeline_depth_shrinks_to_fit_the_architecture():
    stage = 48 * 1024  # a bf16 128x128 tile pair with an fp32 operand: 3 stages need 96 KiB
    assert pipeline_stages(stage, Target.for_arch(90), preferred=3) == 3
    assert pipeline_stages(stage, Target.for_arch(89), preferred=3) == 2
    assert pipeline_stages(10**9, Target.for_arch(86), preferred=3) == 1


def test_a_kernel_that_fails_on_this_gpu_falls_back_with_one_notice(caplog, monkeypatch):
    monkeypatch.setattr(utils, "_usable", {})
    calls = []

    def probe():
        calls.append(1)
        raise RuntimeError("out of resource: shared memory, Required: 101376, Hardware limit: 101376")

    with caplog.at_level(logging.WARNING, logger="lowmem_eraser.kernels"):
        assert not utils.kernel_usable("eraser_adapter", ("cuda:0", "bf16", 3072, 128), probe)
        assert not utils.kernel_usable("eraser_adapter", ("cuda:0", "bf16", 3072, 128), probe)
    assert len(calls) == 1  # probed once per key
    notices = [r for r in caplog.records if r.name == "lowmem_eraser.kernels"]
    assert len(notices) == 1 and "using the PyTorch implementation" in notices[0].getMessage()
    assert "shared memory" in notices[0].getMessage()
    assert utils.kernel_usable("eraser_adapter", ("cuda:0", "bf16", 1920, 128), lambda: None)


def test_probes_inside_a_checkpointed_training_step_change_nothing(monkeypatch, caplog):
    """On a GPU the first call of each op shape probes its kernels, which happens inside a checkpointed block
    (the student pass): the probe's own autograd must not leak into the checkpoint. Here the interpreter
    stands in for the GPU, with probing switched on."""
    import importlib

    import torch

    from conftest import randomize_erasers, run, tiny_inputs, tiny_transformer
    from lowmem_eraser import attach_erasers, erasers_disabled, quantize_base

    if not utils.triton_available():
        pytest.skip("needs the Triton interpreter")
    modules = [importlib.import_module(f"lowmem_eraser.kernels.{name}") for name in ("eraser_adapter", "int8_linear")]

    def step(probing: bool):
        for module in modules:
            monkeypatch.setattr(module, "probes", lambda x: probing)
        monkeypatch.setattr(utils, "_usable", {})
        transformer = quantize_base(tiny_transformer(), backend="triton")
        transformer.enable_gradient_checkpointing()
        erasers = attach_erasers(transformer, rank=4)
        randomize_erasers(erasers)
        inputs = tiny_inputs()
        with torch.no_grad(), erasers_disabled(transformer):
            target = run(transformer, inputs)
        torch.nn.functional.mse_loss(run(transformer, inputs), target + 0.1).backward()
        return [p.grad.clone() for p in erasers.parameters()], dict(utils._usable)

    with caplog.at_level(logging.WARNING, logger="lowmem_eraser.kernels"):
        probed, verdicts = step(True)
    notices = [r.getMessage() for r in caplog.records if r.name.startswith("lowmem_eraser")]
    assert not notices, notices
    assert verdicts and all(verdicts.values())
    assert {key[0] for key in verdicts} == {"eraser_adapter", "int8_linear"}
    plain, _ = step(False)
    for a, b in zip(probed, plain):
        assert torch.equal(a, b)
