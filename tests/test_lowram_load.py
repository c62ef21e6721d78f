"""The block-by-block loader: bit-identical to from_pretrained + quantize_base, the int8 cache, the errors that name
the file, the host-RAM guard, and (in a subprocess, at CogVideoX-2b's dims) the host RAM it saves."""

import copy
import errno
import importlib.util
import json
import logging
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch

from conftest import run, tiny_inputs, tiny_transformer
from lowmem_eraser import Int8Linear, LowmemEraserError, quantize_base
from lowmem_eraser import lowram_load
from lowmem_eraser.errors import ConfigError, HostMemoryError, ModelFileError
from lowmem_eraser.lowram_load import load_transformer_blockwise
from lowmem_eraser.quantize import quantize_linears, quantize_weight

BLOCKS = 3
SHARD = "40KB"  # a tiny block is ~70 KB in fp32: blocks span shards, and shards hold parts of several blocks


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Folders written by save_pretrained: {(dtype on disk, sharded): transformer/ folder}."""
    root = tmp_path_factory.mktemp("lowram")
    model = tiny_transformer(num_layers=BLOCKS)
    folders = {}
    for dtype in (torch.float32, torch.bfloat16):
        for sharded in (False, True):
            folder = root / f"{str(dtype)[6:]}-{'sharded' if sharded else 'single'}"
            model.to(dtype).save_pretrained(folder, **({"max_shard_size": SHARD} if sharded else {}))
            folders[dtype, sharded] = folder
    shards = list(folders[torch.float32, True].glob("*.safetensors"))
    assert len(shards) > BLOCKS, "the sharded folder should split blocks across files"
    return folders


def reference(folder, dtype, quantize):
    """What train.load_transformer did before: the whole model in `dtype`, then quantised."""
    from diffusers import CogVideoXTransformer3DModel

    model = CogVideoXTransformer3DModel.from_pretrained(str(folder), torch_dtype=dtype)
    model.requires_grad_(False)
    if quantize != "none":
        quantize_base(model, backend=quantize)
    return model


def assert_identical(model, ref):
    assert type(model) is type(ref)
    assert [(n, type(m)) for n, m in model.named_modules()] == [(n, type(m)) for n, m in ref.named_modules()]
    ours, theirs = model.state_dict(), ref.state_dict()
    assert list(ours) == list(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype, key
        assert torch.equal(ours[key], theirs[key]), key
    buffers, ref_buffers = dict(model.named_buffers()), dict(ref.named_buffers())  # with non-persistent ones
    assert list(buffers) == list(ref_buffers)
    for key in ref_buffers:
        assert buffers[key].dtype == ref_buffers[key].dtype and torch.equal(buffers[key], ref_buffers[key]), key
    for ours_m, ref_m in zip(model.modules(), ref.modules()):
        assert ours_m.training == ref_m.training  # eval, but quantize_base's new modules are in training mode
        if isinstance(ref_m, Int8Linear):
            assert ours_m.use_triton == ref_m.use_triton
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.is_gradient_checkpointing
    assert dict(model.config) == dict(ref.config)


CASTS = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)]


@pytest.mark.parametrize("quantize", ["none", "int8", "triton"])
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("stored,dtype", CASTS, ids=["fp32", "fp32-as-bf16", "bf16"])
def test_bit_identical_to_from_pretrained_then_quantize_base(saved, stored, dtype, sharded, quantize):
    folder = saved[stored, sharded]
    model = load_transformer_blockwise(folder, dtype, quantize, torch.device("cpu"))
    assert_identical(model, reference(folder, dtype, quantize))


def test_bnb_bit_identical(saved):
    pytest.importorskip("bitsandbytes")
    folder = saved[torch.float32, True]
    assert_identical(load_transformer_blockwise(folder, torch.float32, "bnb", "cpu"),
                     reference(folder, torch.float32, "bnb"))


def test_same_output_and_without_pread(saved, monkeypatch):
    """Older safetensors only map files: the loader copies the tensors out and the result is the same."""
    folder = saved[torch.float32, True]
    ref = reference(folder, torch.float32, "int8")
    monkeypatch.setattr(lowram_load, "_PREAD", False)
    model = load_transformer_blockwise(folder, torch.float32, "int8", "cpu")
    assert_identical(model, ref)
    # from_pretrained's fp32 weights are views of the mapped file, 8 bytes off a 64-byte boundary, and CPU matmuls
    # round differently on unaligned data (1e-7 here); ours are freshly allocated, like a deep copy of its model.
    assert torch.equal(run(model, tiny_inputs()), run(copy.deepcopy(ref), tiny_inputs()))


def test_blocks_go_to_the_device_unless_kept_on_the_host(saved):
    model = load_transformer_blockwise(saved[torch.float32, False], torch.float32, "int8", torch.device("meta"),
                                       host_blocks={1})
    for i, block in enumerate(model.transformer_blocks):
        devices = {t.device.type for t in [*block.parameters(), *block.buffers()]}
        assert devices == ({"cpu"} if i == 1 else {"meta"}), i
    rest = [t for name, t in [*model.named_parameters(), *model.named_buffers()]
            if not name.startswith("transformer_blocks.")]
    assert rest and {t.device.type for t in rest} == {"meta"}
    with pytest.raises(ConfigError, match=r"host_blocks: block indices \[3\]"):
        load_transformer_blockwise(saved[torch.float32, False], torch.float32, "int8", "meta", host_blocks=[3])


def test_quantize_linears_does_one_module():
    model = tiny_transformer()
    block0, block1 = model.transformer_blocks
    assert quantize_linears(block0, "int8") == 8
    assert all(type(m) is not torch.nn.Linear for m in block0.modules())
    assert any(type(m) is torch.nn.Linear for m in block1.modules())
    assert quantize_linears(block0, "int8") == 0
    quantize_base(model, "int8")  # the rest still quantises; a second time is refused as before
    with pytest.raises(LowmemEraserError, match="already quantised"):
        quantize_base(model, "int8")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_weight_in_place_equals_the_plain_formula(dtype):
    weight = torch.randn(96, 80, generator=torch.Generator().manual_seed(0)).to(dtype) * 3
    weight[5] = 0.0
    original = weight.clone()
    q, scale = quantize_weight(weight)
    w = original.to(torch.float32)
    plain_scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0
    assert torch.equal(scale, plain_scale)
    assert torch.equal(q, torch.round(w / plain_scale[:, None]).clamp(-127, 127).to(torch.int8))
    assert torch.equal(weight, original)  # the input is never written, fp32 included


# --- the int8 cache ---------------------------------------------------------------------------------------------


def cache_folders(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir()) if cache.is_dir() else []


def forbid_source_reads(monkeypatch):
    def read(*args, **kwargs):
        raise AssertionError("the source checkpoint was read although the cache is valid")

    monkeypatch.setattr(lowram_load._Checkpoint, "read", read)


def test_int8_cache_is_written_once_then_loaded_bit_identical(saved, tmp_path, monkeypatch):
    folder, cache = saved[torch.bfloat16, True], tmp_path / "cache"
    load_transformer_blockwise(folder, torch.bfloat16, "int8", "cpu", int8_cache=cache)
    (written,) = cache_folders(cache)  # no temp folder left beside it
    assert written.name.startswith("int8-")
    assert sorted(p.name for p in written.iterdir()) == [
        "block-0000.safetensors", "block-0001.safetensors", "block-0002.safetensors", "manifest.json",
        "rest.safetensors"]
    with monkeypatch.context() as patch:
        forbid_source_reads(patch)
        for quantize in ("int8", "triton"):  # the same weights: triton loads int8's cache
            model = load_transformer_blockwise(folder, torch.bfloat16, quantize, "cpu", int8_cache=cache)
            assert_identical(model, reference(folder, torch.bfloat16, quantize))
    assert cache_folders(cache) == [written]


def test_int8_cache_key_follows_dtype_files_and_kind(saved, tmp_path):
    folder, cache = tmp_path / "model", tmp_path / "cache"
    tiny_transformer(num_layers=BLOCKS).save_pretrained(folder)
    load_transformer_blockwise(folder, torch.float32, "int8", "cpu", int8_cache=cache)
    load_transformer_blockwise(folder, torch.bfloat16, "int8", "cpu", int8_cache=cache)
    assert len(cache_folders(cache)) == 2
    weights = folder / "diffusion_pytorch_model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # a re-download
    load_transformer_blockwise(folder, torch.float32, "int8", "cpu", int8_cache=cache)
    assert len(cache_folders(cache)) == 3
    load_transformer_blockwise(folder, torch.float32, "none", "cpu", int8_cache=cache)  # only 8-bit is cached
    assert len(cache_folders(cache)) == 3


@pytest.mark.parametrize("damage", ["truncated block", "garbage block", "missing block", "bad manifest"])
def test_a_corrupt_cache_is_reported_removed_and_rebuilt(saved, tmp_path, monkeypatch, caplog, damage):
    folder, cache = saved[torch.float32, False], tmp_path / "cache"
    load_transformer_blockwise(folder, torch.float32, "int8", "cpu", int8_cache=cache)
    (written,) = cache_folders(cache)
    block = written / "block-0002.safetensors"  # the last block: blocks 0-1 load before the damage is found
    if damage == "truncated block":
        block.write_bytes(block.read_bytes()[:-100])
    elif damage == "garbage block":  # same size, so only reading it finds out
        block.write_bytes(os.urandom(block.stat().st_size))
    elif damage == "missing block":
        block.unlink()
    else:
        (written / "manifest.json").write_text("{")
    with caplog.at_level(logging.WARNING, logger="lowmem_eraser.lowram_load"):
        model = load_transformer_blockwise(folder, torch.float32, "int8", "cpu", int8_cache=cache)
    assert_identical(model, reference(folder, torch.float32, "int8"))
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(written) in warning and "unusable" in warning
    assert cache_folders(cache) == [written]  # rebuilt under the same key, and now good again
    forbid_source_reads(monkeypatch)
    assert_identical(load_transformer_blockwise(folder, torch.float32, "int8", "cpu", int8_cache=cache),
                     reference(folder, torch.float32, "int8"))


def test_a_failed_or_killed_cache_write_leaves_nothing_that_is_used(saved, tmp_path, monkeypatch, caplog):
    folder, cache = saved[torch.float32, False], tmp_path / "cache"
    real_save, calls = safetensors.torch.save_file, []

    def save_file(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, *args, **kwargs)

    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING, logger="lowmem_eraser.lowram_load"):
        patch.setattr(safetensors.torch, "save_file", save_file)
        model = load_transformer_blockwise(folder, torch.float32, "int8", "cpu", int8_cache=cache)
    assert_identical(model, reference(folder, torch.float32, "int8"))
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "disk full" in warning and "without a cache" in warning
    assert cache_folders(cache) == []

    # A writer killed before its rename leaves its temp folder (a dead pid): never read, removed by the next write.
    load_transformer_blockwise(folder, torch.float32, "int8", "cpu", int8_cache=cache)
    (written,) = cache_folders(cache)
    os.replace(written, cache / f".{written.name}.tmp-{2**22 + 12345}")  # above pid_max: that process is gone
    reads, real_read = [], lowram_load._Checkpoint.read
    monkeypatch.setattr(lowram_load._Checkpoint, "read", lambda self, *args: reads.append(1) or real_read(self, *args))
    model = load_transformer_blockwise(folder, torch.float32, "int8", "cpu", int8_cache=cache)
    assert_identical(model, reference(folder, torch.float32, "int8"))
    assert reads, "loaded from a temp folder"
    assert [p.name for p in cache_folders(cache)] == [written.name]


# --- errors -----------------------------------------------------------------------------------------------------


def test_missing_or_bad_files_are_named(saved, tmp_path):
    model = tiny_transformer(num_layers=BLOCKS)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelFileError, match=r"empty/config\.json: missing"):
        load_transformer_blockwise(empty, torch.float32, "int8", "cpu")
    (empty / "config.json").write_text("{")
    with pytest.raises(ModelFileError, match=r"empty/config\.json: not a valid JSON"):
        load_transformer_blockwise(empty, torch.float32, "int8", "cpu")
    (empty / "config.json").write_text(json.dumps(dict(model.config)))  # no _class_name: CogVideoX
    with pytest.raises(ModelFileError, match=r"diffusion_pytorch_model\.safetensors: missing"):
        load_transformer_blockwise(empty, torch.float32, "int8", "cpu")

    pickled = tmp_path / "bin"
    model.save_pretrained(pickled, safe_serialization=False)
    with pytest.raises(ModelFileError, match=r"diffusion_pytorch_model\.bin: .*safetensors.*convert.*memory.blockwise_load: false"):
        load_transformer_blockwise(pickled, torch.float32, "int8", "cpu")

    one = tmp_path / "one"
    model.save_pretrained(one)
    weights = one / "diffusion_pytorch_model.safetensors"
    state = safetensors.torch.load_file(weights)
    del state["transformer_blocks.1.ff.net.2.weight"]
    safetensors.torch.save_file(state, weights)
    with pytest.raises(ModelFileError, match=r"one/diffusion_pytorch_model\.safetensors: has no tensor "
                                             r"'transformer_blocks\.1\.ff\.net\.2\.weight'"):
        load_transformer_blockwise(one, torch.float32, "int8", "cpu")
    weights.write_bytes(weights.read_bytes()[:-64])
    with pytest.raises(ModelFileError, match=r"one/diffusion_pytorch_model\.safetensors: not a valid safetensors"):
        load_transformer_blockwise(one, torch.float32, "int8", "cpu")

    wide = tmp_path / "wide"
    tiny_transformer(num_layers=BLOCKS, attention_head_dim=8).save_pretrained(wide)
    (wide / "config.json").write_text((saved[torch.float32, False] / "config.json").read_text())
    with pytest.raises(ModelFileError, match=r"wide/diffusion_pytorch_model\.safetensors: tensor '.*' has shape"):
        load_transformer_blockwise(wide, torch.float32, "int8", "cpu")


def test_a_missing_shard_is_named(saved, tmp_path):
    import shutil

    folder = tmp_path / "sharded"
    shutil.copytree(saved[torch.float32, True], folder)
    shard = sorted(folder.glob("*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ModelFileError, match=rf"{shard.name}: missing: listed in"):
        load_transformer_blockwise(folder, torch.float32, "int8", "cpu")


def test_host_ram_is_checked_before_loading(saved, monkeypatch):
    import lowmem_eraser.memory as memory

    monkeypatch.setattr(memory, "host_ram_available", lambda: 100_000)
    with pytest.raises(HostMemoryError, match=r"needs 0\.00 GiB of host RAM .* blocks kept on the host.* one block "
                                              r"in flight.* only 0\.00 GiB is available"):
        load_transformer_blockwise(saved[torch.float32, False], torch.float32, "int8", "cpu")
    monkeypatch.setattr(memory, "host_ram_available", lambda: None)  # not Linux: no check
    load_transformer_blockwise(saved[torch.float32, False], torch.float32, "int8", "cpu")


# --- host RAM at real size --------------------------------------------------------------------------------------


def test_host_ram_peak_at_cogvideox_2b_dims(tmp_path):
    """8 blocks of CogVideoX-2b (dim 1920), random bf16, sharded; each load in a fresh process on the CPU, so the
    host keeps the int8 model. Blockwise must peak at most the int8 model + one bf16 block + 1 GiB, and the old
    path (from_pretrained + quantize_base) must peak higher by most of the bf16 model."""
    spec = importlib.util.spec_from_file_location("bench_loading", Path(__file__).parents[1] / "bench" /
                                                  "bench_loading.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    folder = tmp_path / "transformer"
    sizes = bench.build_random(folder, "cogvideox-2b", num_layers=8, max_shard_size="300MB")
    assert len(list(folder.glob("*.safetensors"))) > 1
    bench.warm_page_cache(folder)
    new = bench.measure_in_subprocess(folder, "blockwise", timeout=120)
    old = bench.measure_in_subprocess(folder, "old", timeout=120)
    bf16, block, int8 = sizes["bf16_bytes"], sizes["bf16_block_bytes"], new["model_bytes"]
    print(f"\nbf16 model {bf16 / 2**20:.0f} MiB, one block {block / 2**20:.0f} MiB, int8 model {int8 / 2**20:.0f} MiB;"
          f" peak: blockwise {new['peak_bytes'] / 2**20:.0f} MiB ({new['seconds']:.1f} s), "
          f"old {old['peak_bytes'] / 2**20:.0f} MiB ({old['seconds']:.1f} s)")
    assert new["peak_bytes"] <= int8 + block + 2**30
    assert new["after_bytes"] <= int8 + 256 * 2**20  # freed bf16 blocks went back to the OS
    # Ideally the old path peaks higher by (bf16 model - one block); allocator noise is ~0.2 GiB either way.
    assert old["peak_bytes"] - new["peak_bytes"] >= 0.6 * (bf16 - block)


@pytest.mark.parametrize("family", ["Wan", "HunyuanVideo"])
def test_other_families_load_block_by_block_bit_identical(family, tmp_path, caplog):
    """Wan (`blocks`) and HunyuanVideo (dual- then single-stream blocks: one global block order, as the block
    streamer counts them) load bit-identical to from_pretrained + quantize_base, keep the host blocks on the
    host, and load again from the int8 cache."""
    from test_families import tiny_hunyuan, tiny_wan

    build = tiny_wan if family == "Wan" else tiny_hunyuan
    folder = tmp_path / "transformer"
    build().save_pretrained(folder, max_shard_size="40KB")  # sharded: blocks spread over files
    ref = type(build()).from_pretrained(str(folder), torch_dtype=torch.float32)
    ref.requires_grad_(False)
    quantize_base(ref, backend="int8")
    assert_identical(load_transformer_blockwise(folder, torch.float32, "int8", "cpu"), ref)
    assert_identical(load_transformer_blockwise(folder, torch.float32, "int8", "cpu", int8_cache=tmp_path / "c"), ref)
    assert cache_folders(tmp_path / "c")
    with caplog.at_level(logging.INFO, logger="lowmem_eraser"):
        cached = load_transformer_blockwise(folder, torch.float32, "int8", "cpu", int8_cache=tmp_path / "c")
    assert "from the int8 cache" in caplog.text and "unusable" not in caplog.text  # a hit, not a rebuild
    assert_identical(cached, ref)
    stacks = ("blocks",) if family == "Wan" else ("transformer_blocks", "single_transformer_blocks")
    blocks = [block for name in stacks for block in getattr(ref, name)]
    last = len(blocks) - 1  # HunyuanVideo: the last single-stream block, after the dual-stream one
    model = load_transformer_blockwise(folder, torch.float32, "int8", "meta", host_blocks={last})
    loaded = [block for name in stacks for block in getattr(model, name)]
    for i, block in enumerate(loaded):
        assert {t.device.type for t in [*block.parameters(), *block.buffers()]} == ({"cpu"} if i == last
                                                                                    else {"meta"}), i
