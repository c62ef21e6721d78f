"""Host RAM and wall time of loading a CogVideoX transformer with 8-bit blocks:

- old: `from_pretrained(torch_dtype=bf16)` + `quantize_base("int8")` (the whole bf16 model on the host first);
- blockwise: `lowram_load.load_transformer_blockwise` (one block in bf16 at a time);
- cache-write / cache-read: blockwise with `int8_cache`: the first load writes the cache, the next reads it;
- blockwise-to-device: device `meta` stands in for the GPU (none here): every block leaves the host as soon as it
  is loaded, which is what a GPU user's host sees (the old path reaches its peak before its `.to()`).

The models have the real dims and random bf16 weights (no download: this machine has no model hub), written with
`save_pretrained` at diffusers' default shard size (10 GB: 2b is one file, 5b two shards). Each load runs in a
fresh process after its imports, on the CPU device (the host keeps the final 8-bit model) unless said otherwise.
peak = the process's peak RSS during the load (VmHWM, reset through /proc/self/clear_refs; else RSS sampled
every 2 ms) minus its RSS before; after = RSS once loaded minus before. The page cache is not RSS, but pages of a
mapped file that the process touched are: the files are read once before the timed loads, so every loader reads
them from memory.

    python bench/bench_loading.py                                # cogvideox-2b -> bench/results/loading.md
    python bench/bench_loading.py --models cogvideox-2b cogvideox-5b --dir /big/tmp

The measuring half (`build_random`, `measure_in_subprocess`) is also what tests/test_lowram_load.py runs on an
8-block model with 2b dims.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GiB, MiB = 2**30, 2**20
HERE = Path(__file__).resolve().parent
LOADERS = ("old", "blockwise", "cache-write", "cache-read", "blockwise-to-device")


# --- building a random model ------------------------------------------------------------------------------------


def build_random(folder: str | os.PathLike, preset: str, num_layers: int | None = None,
                 max_shard_size: str = "10GB", seed: int = 0) -> dict:
    """Write a `transformer/`-style folder with `preset`'s dims (optionally fewer blocks) and random bf16 weights;
    returns sizes (bytes of all bf16 weights, of one block)."""
    import accelerate
    import torch
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.modeling_utils import no_init_weights

    from lowmem_eraser.plan import PRESETS

    config = dict(PRESETS[preset])
    if num_layers is not None:
        config["num_layers"] = num_layers
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:  # no fp32 init of 1.7-5.6 B parameters: empty parameters, then random bf16 ones
        with no_init_weights(), accelerate.init_empty_weights():
            model = CogVideoXTransformer3DModel(**config)
    finally:
        torch.set_default_dtype(previous)
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                value = torch.empty(param.shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=gen)
                module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    block = sum(p.numel() * p.element_size() for p in model.transformer_blocks[0].parameters())
    return {"bf16_bytes": weights, "bf16_block_bytes": block, "blocks": len(model.transformer_blocks)}


def warm_page_cache(folder: Path) -> None:
    """Read every file once, so each loader finds them in the page cache (not RSS) rather than on disk."""
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            while handle.read(64 * MiB):
                pass


# --- measuring one load in this process -------------------------------------------------------------------------


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakRSS:
    """Peak RSS over a `with` block: the kernel's high-water mark reset on entry, or a sampling thread."""

    def __enter__(self):
        self.before = _status_bytes("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # resets VmHWM to the current RSS
            self.sampled = False
        except OSError:
            self.sampled, self.peak, self._stop = True, self.before, threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _status_bytes("VmRSS"))

    def __exit__(self, *exc):
        if self.sampled:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _status_bytes("VmRSS"))
        else:
            self.peak = _status_bytes("VmHWM")
        self.after = _status_bytes("VmRSS")


def measure(folder: Path, loader: str, cache: Path | None) -> dict:
    """Load `folder` as `loader` says (int8, bf16, CPU device) and return the host-RAM figures and wall time."""
    import gc
    import importlib

    import torch
    from diffusers import CogVideoXTransformer3DModel

    from lowmem_eraser.lowram_load import load_transformer_blockwise
    from lowmem_eraser.memory import tensor_bytes
    from lowmem_eraser.quantize import quantize_base

    for lazy in ("accelerate", "safetensors.torch", "diffusers.models.model_loading_utils"):
        importlib.import_module(lazy)  # what the loaders import lazily: no loader pays an import in its peak
    gc.collect()
    with PeakRSS() as rss:
        start = time.perf_counter()
        if loader == "old":
            model = CogVideoXTransformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
            model.requires_grad_(False)
            quantize_base(model, backend="int8")
        else:
            device = torch.device("meta" if loader == "blockwise-to-device" else "cpu")
            model = load_transformer_blockwise(folder, torch.bfloat16, "int8", device,
                                               int8_cache=cache if loader.startswith("cache") else None)
        seconds = time.perf_counter() - start
    return {"loader": loader, "peak_bytes": rss.peak - rss.before, "after_bytes": rss.after - rss.before,
            "seconds": seconds, "model_bytes": tensor_bytes(model), "sampled": rss.sampled}


def measure_in_subprocess(folder: Path, loader: str, cache: Path | None = None, timeout: float = 600) -> dict:
    """`measure` in a fresh process. Its cwd is outside the repository (the repo's top-level `kernels/` folder
    would shadow the `kernels` package diffusers imports); stderr goes to a file, which nothing has to drain."""
    with tempfile.TemporaryDirectory(prefix="bench_loading_") as work:
        out, err = Path(work) / "result.json", Path(work) / "stderr.txt"
        command = [sys.executable, str(Path(__file__).resolve()), "measure", str(folder), loader, str(out)]
        if cache is not None:
            command += ["--cache", str(cache)]
        with open(err, "w") as stderr:
            done = subprocess.run(command, cwd=work, stdout=subprocess.DEVNULL, stderr=stderr, timeout=timeout)
        if done.returncode != 0 or not out.is_file():
            raise RuntimeError(f"measuring {loader} on {folder} failed (exit {done.returncode}):\n"
                               f"{err.read_text()[-4000:]}")
        return json.loads(out.read_text())


# --- the benchmark ----------------------------------------------------------------------------------------------


OLD_PEAK_PER_BF16 = 1.7  # the old path's peak / bf16 model bytes, measured on 2b (5.18 GiB / 3.15 GiB)


def _row(result: dict, old: dict | None) -> str:
    versus = f"{result['peak_bytes'] / old['peak_bytes']:.2f}x" if old else "-"
    return (f"| {result['loader']} | {result['peak_bytes'] / GiB:.2f} | {versus} | {result['after_bytes'] / GiB:.2f} "
            f"| {result['model_bytes'] / GiB:.2f} | {result['seconds']:.1f} |")


def bench_model(preset: str, root: Path) -> list[str]:
    """Build `preset` in `root`, measure every loader, return its section of the report."""
    from lowmem_eraser.memory import host_ram_available

    folder, cache = root / "transformer", root / "int8_cache"
    start = time.perf_counter()
    sizes = build_random(folder, preset)
    print(f"{preset}: built {sizes['bf16_bytes'] / GiB:.2f} GiB in {time.perf_counter() - start:.0f} s", flush=True)
    files = sorted(p.name for p in folder.iterdir() if p.suffix == ".safetensors")
    warm_page_cache(folder)
    results, notes = {}, []
    for loader in LOADERS:
        available = host_ram_available()
        if loader == "old" and available is not None and OLD_PEAK_PER_BF16 * sizes["bf16_bytes"] > available:
            # This machine is shared: the old path would push others (or this run) into the OOM killer.
            notes.append(f"old: not run: its expected peak ({OLD_PEAK_PER_BF16} x the bf16 model = "
                         f"{OLD_PEAK_PER_BF16 * sizes['bf16_bytes'] / GiB:.1f} GiB) exceeds the "
                         f"{available / GiB:.1f} GiB of host RAM available")
            continue
        results[loader] = measure_in_subprocess(folder, loader, cache, timeout=3600)
        print(json.dumps(results[loader]), flush=True)
    old, new = results.get("old"), results["blockwise"]
    lines = [f"## {preset}: {sizes['blocks']} blocks, {sizes['bf16_bytes'] / GiB:.2f} GiB bf16 "
             f"({sizes['bf16_block_bytes'] / MiB:.0f} MiB per block), {len(files)} safetensors file(s)", "",
             "| loader | peak GiB | peak vs old | after GiB | model GiB | wall s |",
             "|---|---:|---:|---:|---:|---:|", *(_row(r, old) for r in results.values()), ""]
    above = new["peak_bytes"] - new["model_bytes"]
    summary = [f"Blockwise peak - final model = {above / MiB:.0f} MiB ({above / sizes['bf16_block_bytes']:.2f} bf16 "
               "blocks in flight)"]
    if old:
        saved = old["peak_bytes"] - new["peak_bytes"]
        summary.append(f"blockwise saves {saved / GiB:.2f} GiB of peak host RAM over the old path "
                       f"({saved / sizes['bf16_bytes']:.2f}x the bf16 model)")
    if "blockwise-to-device" in results:
        summary.append(f"to a device, the host peaks at {results['blockwise-to-device']['peak_bytes'] / GiB:.2f} GiB")
    lines += ["; ".join(summary) + ".", ""]
    if any(r["sampled"] for r in results.values()):
        lines += ["(peaks sampled every 2 ms: /proc/self/clear_refs was not writable)", ""]
    return lines + [f"{note}." for note in notes] + ([""] if notes else [])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cogvideox-2b"], choices=["cogvideox-2b", "cogvideox-5b"])
    parser.add_argument("--dir", type=Path, default=None, help="where the random models are written (deleted)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "loading.md")
    args = parser.parse_args(argv)

    import torch

    command = "python bench/bench_loading.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["# Loading the transformer: host RAM and time", "",
             f"Command: `{command.strip()}`", "",
             f"Machine: {platform.machine()} CPU ({os.cpu_count()} cores), "
             f"{_status_total_ram() / GiB:.1f} GiB RAM, torch {torch.__version__}. "
             "Random bf16 weights with the real dims, int8 blocks, bf16 compute dtype. Every loader runs on the "
             "CPU device (the host keeps the final 8-bit model) except blockwise-to-device, whose device `meta` "
             "stands in for a GPU: each block leaves the host once loaded. old = from_pretrained + quantize_base; "
             "cache-write = blockwise with int8_cache (first load, writes the cache); cache-read = the next load. "
             "peak = peak RSS during the load minus RSS before it (after imports), after = RSS once loaded minus "
             "before, model = bytes of the loaded model's tensors (wherever they are; 2b's include a 0.25 GiB "
             "fp64 positional-embedding buffer). Each load in a fresh process; the files were in the page cache "
             "(read once before). The old path's RSS stays at about bf16 + int8 after loading: from_pretrained's "
             "bf16 tensors are views of the mapped file, and the parameters that are not quantised keep that "
             "mapping, whose touched pages count in RSS.", ""]
    for preset in args.models:
        root = Path(tempfile.mkdtemp(prefix=f"bench_loading_{preset}_", dir=args.dir))
        try:
            need = (4 if preset == "cogvideox-2b" else 13) * GiB * 1.6  # model + int8 cache
            free = shutil.disk_usage(root).free
            if free < need:
                lines += [f"## {preset}", "", f"skipped: {free / GiB:.1f} GiB free in {root}, needs "
                          f"~{need / GiB:.0f} GiB (model + int8 cache)", ""]
            else:
                lines += bench_model(preset, root)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines))  # after each model: a stopped run keeps what it measured
    print(f"wrote {args.out}")


def _status_total_ram() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "measure":
        parser = argparse.ArgumentParser()
        parser.add_argument("cmd")
        parser.add_argument("folder", type=Path)
        parser.add_argument("loader", choices=LOADERS)
        parser.add_argument("out", type=Path)
        parser.add_argument("--cache", type=Path, default=None)
        ns = parser.parse_args()
        ns.out.write_text(json.dumps(measure(ns.folder, ns.loader, ns.cache)))
    else:
        main()
