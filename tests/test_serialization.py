import errno
import json
import os
import re
from pathlib import Path

import pytest
import safetensors.torch
import torch

from conftest import randomize_erasers, run
from lowmem_eraser import (
    EraserFormatError,
    attach_erasers,
    erasers_disabled,
    get_erasers,
    load_erasers,
    read_erasers,
    save_erasers,
)
from lowmem_eraser.cli import main as cli_main

DIM, BLOCKS = 32, 2


def published_state(rank=4, dim=DIM, blocks=BLOCKS, prefix="transformer_blocks.{}.attn1.adapter", seed=0):
    """The published layout, built independently of our code: dict[str, dict[str, Tensor]]."""
    gen = torch.Generator().manual_seed(seed)
    return {
        prefix.format(i): {
            "down.weight": torch.randn(rank, dim, generator=gen),
            "down.bias": torch.randn(rank, generator=gen),
            "up.weight": torch.randn(dim, rank, generator=gen) * 0.1,
            "up.bias": torch.randn(dim, generator=gen) * 0.1,
        }
        for i in range(blocks)
    }


def write_published(folder: Path, state, rank=4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "eraser_weights.pt")
    (folder / "eraser_config.json").write_text(json.dumps({"eraser_type": "adapter", "eraser_rank": rank}, indent=4))
    return folder


def manual_erased_output(transformer, inputs, state):
    """The published math applied by hand: attn1's video output + up(GELU(down(.)))."""
    handles = []
    for i, block in enumerate(transformer.transformer_blocks):
        w = state[f"transformer_blocks.{i}.attn1.adapter"]

        def hook(module, args, output, w=w):
            video, text = output
            h = torch.nn.functional.gelu(video @ w["down.weight"].T + w["down.bias"])
            return video + h @ w["up.weight"].T + w["up.bias"], text

        handles.append(block.attn1.register_forward_hook(hook))
    try:
        with torch.no_grad():
            return run(transformer, inputs)
    finally:
        for handle in handles:
            handle.remove()


def test_loads_the_published_layout(tmp_path, transformer, inputs):
    state = published_state()
    expected = manual_erased_output(transformer, inputs, state)
    erasers = load_erasers(transformer, write_published(tmp_path / "published", state))
    assert erasers.rank == 4 and all(p.dtype == torch.float32 for p in erasers.parameters())
    with torch.no_grad():
        torch.testing.assert_close(run(transformer, inputs), expected, rtol=1e-5, atol=1e-6)


def test_loads_bf16_published_weights_as_fp32(tmp_path, transformer):
    state = {k: {n: t.to(torch.bfloat16) for n, t in v.items()} for k, v in published_state().items()}
    erasers = load_erasers(transformer, write_published(tmp_path / "bf16", state) / "eraser_weights.pt")
    loaded = erasers["transformer_blocks.1.attn1.adapter"].up.weight
    assert loaded.dtype == torch.float32
    assert torch.equal(loaded, state["transformer_blocks.1.attn1.adapter"]["up.weight"].float())


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_save_writes_the_published_files_and_round_trips_exactly(tmp_path, transformer, inputs, fmt):
    erasers = attach_erasers(transformer, rank=8)
    randomize_erasers(erasers)
    with torch.no_grad():
        expected = run(transformer, inputs)
    folder = save_erasers(transformer, tmp_path / "out", metadata={"concept": "nudity", "eta": 7.0}, format=fmt)
    assert (folder / "eraser_config.json").read_text() == json.dumps(
        {"eraser_type": "adapter", "eraser_rank": 8}, indent=4
    )
    sidecar = json.loads((folder / "lowmem_eraser.json").read_text())
    assert sidecar["family"] == "CogVideoX" and sidecar["num_blocks"] == 2 and sidecar["dim"] == 32
    assert sidecar["rank"] == 8 and sidecar["dtype"] == "float32" and sidecar["metadata"]["eta"] == 7.0
    if fmt == "pt":
        raw = torch.load(folder / "eraser_weights.pt", weights_only=True)
        assert list(raw) == list(erasers.keys())
        assert all(list(inner) == ["down.weight", "down.bias", "up.weight", "up.bias"] for inner in raw.values())
        assert not (folder / "eraser_weights.safetensors").exists()
    else:
        flat = safetensors.torch.load_file(folder / "eraser_weights.safetensors")
        assert set(flat) == set(erasers.state_dict())
        assert not (folder / "eraser_weights.pt").exists()

    fresh = __import__("conftest").tiny_transformer()
    load_erasers(fresh, folder)
    with torch.no_grad():
        assert torch.equal(run(fresh, inputs), expected)


def test_load_fills_already_attached_erasers(tmp_path, transformer):
    erasers = attach_erasers(transformer, rank=4)
    state = published_state()
    assert load_erasers(transformer, write_published(tmp_path / "e", state)) is erasers
    assert torch.equal(erasers["transformer_blocks.0.attn1.adapter"].down.bias, state["transformer_blocks.0.attn1.adapter"]["down.bias"])


def test_non_strict_load_keeps_missing_blocks(tmp_path, transformer):
    state = published_state()
    del state["transformer_blocks.1.attn1.adapter"]
    folder = write_published(tmp_path / "partial", state)
    with pytest.raises(EraserFormatError, match="missing block 'transformer_blocks.1.attn1.adapter'"):
        load_erasers(transformer, folder)
    erasers = load_erasers(transformer, folder, strict=False)
    assert torch.count_nonzero(erasers["transformer_blocks.1.attn1.adapter"].up.weight) == 0


def test_save_is_atomic(tmp_path, transformer, monkeypatch):
    erasers = attach_erasers(transformer, rank=4)
    randomize_erasers(erasers)
    folder = save_erasers(transformer, tmp_path / "atomic")
    before = (folder / "eraser_weights.pt").read_bytes()
    randomize_erasers(erasers, seed=9)

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial") if hasattr(f, "write") else Path(f).write_bytes(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        save_erasers(transformer, folder)
    assert (folder / "eraser_weights.pt").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["eraser_config.json", "eraser_weights.pt", "lowmem_eraser.json"]


def test_save_refuses_non_finite_weights_and_bad_metadata(tmp_path, transformer):
    erasers = attach_erasers(transformer, rank=4)
    with pytest.raises(EraserFormatError, match="metadata"):
        save_erasers(transformer, tmp_path / "m", metadata={"bad": object()})
    with torch.no_grad():
        erasers["transformer_blocks.1.attn1.adapter"].up.bias[3] = float("nan")
    with pytest.raises(EraserFormatError, match=r"transformer_blocks\.1\.attn1\.adapter\.up\.bias"):
        save_erasers(transformer, tmp_path / "nan")
    assert not (tmp_path / "nan").exists()


class _Payload:
    """Unpickling this would run code that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad_inputs(tmp_path):
    """name -> (folder, regex the error message must match)."""
    cases = {}

    def case(name, state=None, rank=4, raw_bytes=None, pattern=""):
        folder = tmp_path / name
        if raw_bytes is not None:
            folder.mkdir()
            (folder / "eraser_weights.pt").write_bytes(raw_bytes)
        else:
            write_published(folder, state, rank=rank)
        cases[name] = (folder, pattern)

    good = tmp_path / "good.pt"
    torch.save(published_state(), good)
    case("truncated", raw_bytes=good.read_bytes()[:300], pattern="not a readable eraser weights file")
    marker = tmp_path / "PWNED"
    case("pickled_code", state={"x": _Payload(marker)},
         pattern="refused because it contains code or Python objects, not plain tensors.*posix.system")
    case("not_a_dict", state=[torch.zeros(3)], pattern="expected a non-empty dict")
    missing = published_state()
    del missing["transformer_blocks.0.attn1.adapter"]
    case("missing_block", state=missing, pattern="missing block 'transformer_blocks.0.attn1.adapter'")
    case("extra_block", state=published_state(blocks=3), pattern="unexpected block 'transformer_blocks.2.attn1.adapter'")
    wrong_inner = published_state()
    wrong_inner["transformer_blocks.1.attn1.adapter"]["lora_A.weight"] = wrong_inner["transformer_blocks.1.attn1.adapter"].pop("down.weight")
    case("wrong_inner_keys", state=wrong_inner, pattern=r"'transformer_blocks.1.attn1.adapter' has unexpected key 'lora_A.weight'")
    case("rank_mismatch", state=published_state(rank=4), rank=16, pattern="eraser_rank is 16 but the tensors .* have rank 4")
    case("rank_string", state=published_state(rank=4), rank="4",
         pattern=r"eraser_rank must be an integer, got '4' \(str\); the tensors in eraser_weights.pt have rank 4")
    case("rank_float", state=published_state(rank=4), rank=12.5,
         pattern=r"eraser_rank must be an integer, got 12.5 \(float\); the tensors in eraser_weights.pt have rank 4")
    case("dim_mismatch", state=published_state(dim=48), pattern=r"transformer_blocks.0.attn1.adapter.down.weight has dim 48")
    nan = published_state()
    nan["transformer_blocks.1.attn1.adapter"]["up.weight"][0, 0] = float("inf")
    case("non_finite", state=nan, pattern=r"transformer_blocks.1.attn1.adapter.up.weight contains NaN or Inf")
    case("hunyuan", state=published_state(prefix="single_transformer_blocks.{}.attn.adapter"), pattern="HunyuanVideo eraser")
    receler = {
        name: published_state(dim=320, blocks=1)["transformer_blocks.0.attn1.adapter"]
        for name in ("down_blocks.0.attentions.0", "down_blocks.0.attentions.1")
    }
    case("receler", state=receler, pattern=r"Receler \(Stable Diffusion UNet\) eraser")
    shape = published_state()
    shape["transformer_blocks.0.attn1.adapter"]["up.bias"] = torch.zeros(5)
    case("bad_shape", state=shape, pattern=r"transformer_blocks.0.attn1.adapter.up.bias has shape \[5\], expected \[32\]")
    return cases, marker


BAD = ["truncated", "pickled_code", "not_a_dict", "missing_block", "extra_block", "wrong_inner_keys",
       "rank_mismatch", "rank_string", "rank_float", "dim_mismatch", "non_finite", "hunyuan", "receler", "bad_shape"]


@pytest.mark.parametrize("name", BAD)
@pytest.mark.parametrize("already_attached", [False, True])
def test_bad_input_is_one_clear_error_and_changes_nothing(tmp_path, transformer, inputs, name, already_attached):
    cases, marker = _bad_inputs(tmp_path)
    folder, pattern = cases[name]
    if already_attached:
        randomize_erasers(attach_erasers(transformer, rank=4))
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    with torch.no_grad():
        out_before = run(transformer, inputs)
    with pytest.raises(EraserFormatError, match=pattern) as info:
        load_erasers(transformer, folder)
    assert str(folder) in str(info.value)
    assert "weights_only" not in str(info.value)  # never pass on torch's advice to run the file's code
    assert not marker.exists()
    assert all(torch.equal(before[k], v) for k, v in transformer.state_dict().items())
    if already_attached:
        with torch.no_grad():
            assert torch.equal(run(transformer, inputs), out_before)
    else:
        assert get_erasers(transformer) is None


def test_read_rejects_ambiguous_or_missing_folders(tmp_path):
    with pytest.raises(EraserFormatError, match="neither"):
        read_erasers(tmp_path)
    (tmp_path / "eraser_weights.pt").write_bytes(b"")
    (tmp_path / "eraser_weights.safetensors").write_bytes(b"")
    with pytest.raises(EraserFormatError, match="both"):
        read_erasers(tmp_path)
    with pytest.raises(EraserFormatError, match="no such"):
        read_erasers(tmp_path / "nope")


def test_cli_inspect_reports_and_flags_zero_blocks(tmp_path, transformer, capsys):
    erasers = attach_erasers(transformer, rank=8)
    with torch.no_grad():
        erasers["transformer_blocks.0.attn1.adapter"].up.weight.fill_(0.5)
    save_erasers(transformer, tmp_path / "e", metadata={"concept": "red"})
    assert cli_main(["inspect", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert "family:     CogVideoX" in out and "blocks:     2" in out and "rank:       8" in out
    assert f"parameters: {2 * (2 * 32 * 8 + 8 + 32):,}" in out
    assert "'concept': 'red'" in out
    lines = [line for line in out.splitlines() if line.startswith("transformer_blocks.")]
    assert "still zero" not in lines[0] and "still zero" in lines[1]
    assert "1 of 2 blocks are exactly zero" in out
    assert cli_main(["inspect", str(tmp_path / "missing")]) == 2
    assert "no such eraser file or folder" in capsys.readouterr().err


def test_cli_convert_is_lossless_both_ways(tmp_path):
    state = {k: {n: t.to(torch.bfloat16) for n, t in v.items()} for k, v in published_state().items()}
    src = write_published(tmp_path / "src", state)
    assert cli_main(["convert", str(src), str(tmp_path / "st" / "eraser_weights.safetensors")]) == 0
    assert json.loads((tmp_path / "st" / "eraser_config.json").read_text()) == {"eraser_type": "adapter", "eraser_rank": 4}
    assert cli_main(["convert", str(tmp_path / "st"), str(tmp_path / "back" / "eraser_weights.pt")]) == 0
    back = torch.load(tmp_path / "back" / "eraser_weights.pt", weights_only=True)
    assert list(back) == list(state)
    for key in state:
        for inner in state[key]:
            assert back[key][inner].dtype == torch.bfloat16
            assert torch.equal(back[key][inner], state[key][inner])
    assert cli_main(["convert", str(src), str(tmp_path / "bad.bin")]) == 2


def make_example_eraser(folder):
    """The small eraser shipped in tests/data/example_eraser for the README's inspect command."""
    from conftest import tiny_transformer

    transformer = tiny_transformer()
    erasers = attach_erasers(transformer, rank=8)
    randomize_erasers(erasers, seed=5)
    with torch.no_grad():
        erasers["transformer_blocks.1.attn1.adapter"].up.weight.zero_()
        erasers["transformer_blocks.1.attn1.adapter"].up.bias.zero_()
    return save_erasers(transformer, folder, metadata={"concept": "example", "note": "random weights, for inspect"})


def test_shipped_example_eraser_is_what_the_tests_produce(tmp_path):
    shipped = read_erasers(Path(__file__).parent / "data" / "example_eraser")
    made = read_erasers(make_example_eraser(tmp_path / "example"))
    assert shipped.config == made.config and shipped.sidecar == made.sidecar
    for key, inners in made.state.items():
        for inner, tensor in inners.items():
            assert torch.equal(shipped.state[key][inner], tensor)


# --- convert, foreign erasers, inspect of NaN/Inf, shared storage (issue 11, item 9) ---


def test_readme_convert_example_leaves_one_readable_folder(tmp_path, capsys):
    """`lowmem-eraser convert runs/nudity runs/nudity/eraser_weights.safetensors`, as the README writes it."""
    state = published_state()
    folder = write_published(tmp_path / "nudity", state)
    (folder / "lowmem_eraser.json").write_text(json.dumps({"metadata": {"concept": "nudity"}}))
    assert cli_main(["convert", str(folder), str(folder / "eraser_weights.safetensors")]) == 0
    assert f"removed {folder / 'eraser_weights.pt'}" in capsys.readouterr().out
    assert sorted(p.name for p in folder.iterdir()) == ["eraser_config.json", "eraser_weights.safetensors", "lowmem_eraser.json"]
    for command in (["inspect", str(folder)], ["convert", str(folder), str(folder / "eraser_weights.pt")]):
        assert cli_main(command) == 0  # the folder reads; and converts back the same way
    back = read_erasers(folder)
    assert back.weights_path.name == "eraser_weights.pt" and not (folder / "eraser_weights.safetensors").exists()
    assert all(torch.equal(back.state[k][n], state[k][n]) for k in state for n in state[k])


def test_convert_refuses_a_folder_holding_another_erasers_weights(tmp_path, capsys):
    src = write_published(tmp_path / "src", published_state())
    other = write_published(tmp_path / "other", published_state(seed=3))
    before = (other / "eraser_weights.pt").read_bytes()
    assert cli_main(["convert", str(src), str(other / "eraser_weights.safetensors")]) == 2
    assert "already holds another eraser's eraser_weights.pt" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == ["eraser_config.json", "eraser_weights.pt"]
    assert (other / "eraser_weights.pt").read_bytes() == before


def test_convert_rewrites_a_stale_config_and_carries_the_sidecar(tmp_path):
    src = write_published(tmp_path / "src", published_state(rank=4))
    (src / "lowmem_eraser.json").write_text(json.dumps({"rank": 4, "metadata": {"concept": "red"}}))
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "eraser_config.json").write_text(json.dumps({"eraser_type": "adapter", "eraser_rank": 16}))
    assert cli_main(["convert", str(src), str(dst / "eraser_weights.safetensors")]) == 0
    assert json.loads((dst / "eraser_config.json").read_text()) == {"eraser_type": "adapter", "eraser_rank": 4}
    converted = read_erasers(dst)
    assert converted.rank == 4 and converted.sidecar["metadata"] == {"concept": "red"}


def test_convert_of_tensors_sharing_storage_to_safetensors(tmp_path):
    state = published_state()
    for inners in state.values():  # every tensor a view of one buffer, as code that slices a fused weight saves
        flat = torch.cat([t.flatten() for t in inners.values()])
        offset = 0
        for name, tensor in list(inners.items()):
            inners[name] = flat[offset:offset + tensor.numel()].view(tensor.shape)
            offset += tensor.numel()
        inners["up.weight"] = inners["down.weight"].T  # and one a transposed (non-contiguous) view of another
    src = write_published(tmp_path / "shared", state)
    assert cli_main(["convert", str(src), str(tmp_path / "st" / "eraser_weights.safetensors")]) == 0
    converted = read_erasers(tmp_path / "st")
    assert all(torch.equal(converted.state[k][n], state[k][n]) for k in state for n in state[k])


class _PublishedStyleWrapper(torch.nn.Module):
    """How the published code injects its eraser: attn1 replaced by a wrapper holding `attn` and `adapter`."""

    def __init__(self, attn, dim, rank=4):
        super().__init__()
        from lowmem_eraser import EraserAdapter

        self.attn = attn
        self.adapter = EraserAdapter(dim, rank)

    def forward(self, *args, **kwargs):
        video, text = self.attn(*args, **kwargs)
        return self.adapter(video), text


@pytest.mark.parametrize("how", ["wrapped_attn1", "adapter_module"])
def test_load_into_a_model_carrying_foreign_erasers_is_one_clear_error(tmp_path, transformer, how):
    from lowmem_eraser import LowmemEraserError

    for block in transformer.transformer_blocks:
        if how == "wrapped_attn1":
            block.attn1 = _PublishedStyleWrapper(block.attn1, DIM)
        else:
            block.attn1.add_module("adapter", torch.nn.Linear(DIM, DIM))
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    folder = write_published(tmp_path / "e", published_state())
    with pytest.raises(EraserFormatError, match=r"already carries an eraser injected by other code .*transformer_blocks\.0\.attn1"):
        load_erasers(transformer, folder)
    with pytest.raises(LowmemEraserError, match="injected by other code"):
        attach_erasers(transformer, rank=4)
    assert get_erasers(transformer) is None
    assert all(torch.equal(before[k], v) for k, v in transformer.state_dict().items())


def test_inspect_reports_non_finite_blocks_instead_of_refusing(tmp_path, capsys):
    state = published_state()
    state["transformer_blocks.1.attn1.adapter"]["up.weight"][0, :3] = float("nan")
    state["transformer_blocks.1.attn1.adapter"]["down.bias"][0] = float("inf")
    folder = write_published(tmp_path / "nan", state)
    assert cli_main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "non-finite: transformer_blocks.1.attn1.adapter has 4 NaN/Inf values" in out
    assert "transformer_blocks.0.attn1.adapter has" not in out
    assert "1 of 2 blocks hold 4 NaN/Inf values in all: load_erasers refuses this file" in out
    with pytest.raises(EraserFormatError, match="contains NaN or Inf"):
        read_erasers(folder)  # loading still refuses


# --- write errors name the file and the cause (issue 11, item 8) ---


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_disk_full_names_the_file_and_leaves_no_temp(tmp_path, transformer, fmt):
    """A real ENOSPC: the temp file is a link to /dev/full."""
    from lowmem_eraser import LowmemEraserError

    attach_erasers(transformer, rank=4)
    folder = tmp_path / "full"
    folder.mkdir()
    weights = folder / f"eraser_weights.{fmt}"
    _temp_path(weights).symlink_to("/dev/full")
    with pytest.raises(LowmemEraserError, match=rf"^{re.escape(str(weights))}: cannot write: disk full$") as info:
        save_erasers(transformer, folder, format=fmt)
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC  # callers catching OSError still do
    assert list(folder.iterdir()) == []


def test_torch_zip_writer_failure_is_named(tmp_path, monkeypatch):
    """torch.save(obj, path) reports ENOSPC from its C++ writer as a RuntimeError without errno."""
    from lowmem_eraser import LowmemEraserError
    from lowmem_eraser.serialization import atomic_write

    target = tmp_path / "training_state.pt"
    _temp_path(target).symlink_to("/dev/full")
    monkeypatch.setattr("shutil.disk_usage", lambda path: type("U", (), {"free": 0})())
    with pytest.raises(LowmemEraserError, match=rf"^{re.escape(str(target))}: cannot write: disk full \(0 MiB free\)$"):
        atomic_write(target, lambda tmp: torch.save({"x": torch.zeros(1000)}, tmp))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("code, cause", [(errno.EACCES, "permission denied"), (errno.EPERM, "permission denied"),
                                         (errno.EROFS, "read-only file system")])
def test_permission_and_read_only_errors_name_the_file(tmp_path, monkeypatch, code, cause):
    from lowmem_eraser.errors import WriteError
    from lowmem_eraser.serialization import atomic_write

    def refuse(src, dst):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "replace", refuse)  # (tests run as root: chmod cannot make a folder unwritable)
    target = tmp_path / "eraser_config.json"
    with pytest.raises(WriteError, match=rf"^{re.escape(str(target))}: cannot write: {cause}$"):
        atomic_write(target, lambda tmp: tmp.write_text("{}"))
    assert list(tmp_path.iterdir()) == []


# --- the README's Python example runs (issue 11, item 11) ---


def test_readme_python_example_runs(tmp_path, monkeypatch):
    from lowmem_eraser.tiny import build_tiny_cogvideox

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## The eraser adapter", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    for placeholder in ('"path/to/CogVideoX-2b"', '"runs/nudity"'):
        assert placeholder in code, f"README example changed: {placeholder} is gone; update this test"
    model = build_tiny_cogvideox(tmp_path / "CogVideoX-2b", ["a red ball"])
    code = code.replace('"path/to/CogVideoX-2b"', repr(str(model))).replace('"runs/nudity"', repr(str(tmp_path / "nudity")))
    namespace = {}
    exec(compile(code, "README.md (The eraser adapter)", "exec"), namespace)
    transformer = namespace["transformer"]
    assert get_erasers(transformer) is namespace["erasers"] and namespace["erasers"].scale == 0.5
    saved = read_erasers(tmp_path / "nudity")
    assert saved.rank == 128 and saved.sidecar["metadata"] == {"concept": "nudity", "eta": 7.0}
