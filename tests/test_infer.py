import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import randomize_erasers
from lowmem_eraser import EraserFormatError, LowmemEraserError, attach_erasers, save_erasers
from lowmem_eraser.cli import main as cli_main
from lowmem_eraser.tiny import build_tiny_cogvideox

PROMPTS = ["a red ball moving left", "a blue ball moving left"]


@pytest.fixture(scope="module")
def vae_model(tmp_path_factory):
    """A tiny CogVideoX folder with a tiny VAE (64x64 px, 9 frames) and a random eraser for it."""
    from diffusers import CogVideoXTransformer3DModel

    root = tmp_path_factory.mktemp("infer")
    model = build_tiny_cogvideox(root / "model", PROMPTS, with_vae=True, max_text_seq_length=8)
    transformer = CogVideoXTransformer3DModel.from_pretrained(model / "transformer")
    randomize_erasers(attach_erasers(transformer, rank=4), std=0.5)
    save_erasers(transformer, root / "eraser")
    return root


def _args(root, output, *extra):
    return ["infer", "--model", str(root / "model"), "--eraser", str(root / "eraser"), "--prompt", PROMPTS[0],
            "--output", str(output), "--steps", "2", *extra]


def test_infer_writes_a_gif_and_compare_puts_base_and_erased_side_by_side(vae_model, tmp_path):
    assert cli_main(_args(vae_model, tmp_path / "out.gif", "--frames", "9")) == 0
    with Image.open(tmp_path / "out.gif") as gif:
        assert gif.n_frames == 9 and gif.size == (64, 64)
    assert cli_main(_args(vae_model, tmp_path / "cmp.gif", "--compare", "--frames", "9")) == 0
    with Image.open(tmp_path / "cmp.gif") as gif:
        assert gif.n_frames == 9 and gif.size == (64 + 2 + 64, 64)
        frame = np.asarray(gif.convert("RGB"))
    assert not np.array_equal(frame[:, :64], frame[:, 66:])  # the eraser changes the video; same seed


def test_strength_zero_and_disabled_erasers_give_the_base_video(vae_model):
    from lowmem_eraser import erasers_disabled, load_erasers, set_eraser_scale
    from lowmem_eraser.infer import Generation, generate, load_pipeline

    pipe = load_pipeline(vae_model / "model")
    spec = Generation(PROMPTS[0], steps=2, frames=9)
    base = generate(pipe, spec)
    assert base.shape == (9, 64, 64, 3) and base.dtype == np.uint8
    load_erasers(pipe.transformer, vae_model / "eraser")
    erased = generate(pipe, spec)
    with erasers_disabled(pipe.transformer):
        assert np.array_equal(generate(pipe, spec), base)
    set_eraser_scale(pipe.transformer, 0.0)
    assert np.array_equal(generate(pipe, spec), base)
    assert not np.array_equal(erased, base)


def test_infer_writes_an_mp4_with_the_models_own_frame_count_by_default(vae_model, tmp_path):
    assert cli_main(_args(vae_model, tmp_path / "out.mp4", "--seed", "3")) == 0  # no --frames: sample_frames = 9
    frames = iio.imread(tmp_path / "out.mp4")
    assert frames.shape == (9, 64, 64, 3)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--frames": "8"}, "--frames: expected 8k+1 frames"),
        ({"--output": "out.avi"}, "must end in .gif or .mp4"),
        ({"--model": "missing"}, "has no transformer/ folder"),
        ({"--offload": "model"}, "there is no CUDA here"),
    ],
)
def test_infer_bad_input_is_one_clear_error(vae_model, tmp_path, capsys, change, message):
    args = _args(vae_model, tmp_path / "out.gif")
    for flag, value in change.items():
        if flag in args:
            args[args.index(flag) + 1] = str(tmp_path / value) if flag in ("--model", "--output") else value
        else:
            args += [flag, value]
    assert cli_main(args) == 2
    assert message in capsys.readouterr().err


def test_infer_refuses_an_eraser_for_another_model(vae_model, tmp_path, capsys):
    from conftest import tiny_transformer

    other = tiny_transformer(num_attention_heads=3)  # dim 48, not 32
    save_erasers_path = tmp_path / "other"
    attach_erasers(other, rank=4)
    save_erasers(other, save_erasers_path)
    args = _args(vae_model, tmp_path / "out.gif")
    args[args.index("--eraser") + 1] = str(save_erasers_path)
    assert cli_main(args) == 2
    assert "has dim 48, the model's attention dim is 32" in capsys.readouterr().err


def test_vae_tiling_switch(vae_model):
    from lowmem_eraser.infer import load_pipeline, vae_tiling

    pipe = load_pipeline(vae_model / "model")
    assert vae_tiling(pipe, "on", 9, 64, 64) and pipe.vae.use_tiling and pipe.vae.use_slicing
    assert not vae_tiling(pipe, "off", 9, 64, 64) and not pipe.vae.use_tiling
    assert not vae_tiling(pipe, "auto", 9, 64, 64)  # CPU: host RAM, nothing to plan against
    with pytest.raises(LowmemEraserError, match="--vae-tiling"):
        vae_tiling(pipe, "sometimes", 9, 64, 64)


def test_plain_and_tiled_decode_peaks_are_simulated_from_the_vae_config():
    """The full-size CogVideoX VAE (its defaults) at 49x480x720: the plain decode is what overflows 8-16 GB cards."""
    from lowmem_eraser.stages import vae_decode_peak

    shape = (1, 16, 13, 60, 90)
    plain = vae_decode_peak({}, shape, torch.bfloat16, tiled=False)
    tiled = vae_decode_peak({}, shape, torch.bfloat16, tiled=True)
    print(f"decode peak: plain {plain / 2**30:.2f} GiB, tiled {tiled / 2**30:.2f} GiB")
    assert 8 * 2**30 < plain < 24 * 2**30 and tiled < plain / 2


# --- every argument checked before the model loads; broken model files named (issue 11, item 8) ---


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]  # not the libraries' progress bars
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith(f"lowmem-eraser {command}: error: "), err
    return lines[0]


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--steps", "0", "--steps: expected at least 1, got 0"),
        ("--steps", "-2", "--steps: expected at least 1, got -2"),
        ("--strength", "nan", "--strength: expected a finite number, got nan"),
        ("--strength", "inf", "--strength: expected a finite number, got inf"),
    ],
)
def test_infer_refuses_bad_arguments_before_loading_the_model(vae_model, tmp_path, capsys, monkeypatch, flag, value,
                                                              message):
    import lowmem_eraser.infer

    monkeypatch.setattr(lowmem_eraser.infer, "load_pipeline", lambda *a: pytest.fail("the model was loaded"))
    args = _args(vae_model, tmp_path / "out.gif")
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    assert cli_main(args) == 2
    assert message in _one_error_line(capsys, "infer")
    assert not (tmp_path / "out.gif").exists()


def test_infer_output_folder_is_created_or_refused_before_loading(vae_model, tmp_path, capsys, monkeypatch):
    import lowmem_eraser.infer

    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(lowmem_eraser.infer, "load_pipeline", lambda *a: pytest.fail("the model was loaded"))
    assert cli_main(_args(vae_model, tmp_path / "a_file" / "out.gif")) == 2
    assert f"--output: cannot write to folder {tmp_path / 'a_file'}" in _one_error_line(capsys, "infer")
    monkeypatch.undo()
    assert cli_main(_args(vae_model, tmp_path / "new" / "deeper" / "out.gif", "--frames", "9")) == 0
    assert (tmp_path / "new" / "deeper" / "out.gif").is_file()


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


BROKEN_FILES = {
    "transformer/diffusion_pytorch_model.safetensors": _truncate,
    "transformer/config.json": lambda path: path.write_text("{garbage"),
    "text_encoder/model.safetensors": lambda path: path.write_bytes(path.read_bytes()[:100]),
    "text_encoder/config.json": lambda path: path.write_text("not json"),
    "tokenizer/tokenizer.json": lambda path: path.write_text("{bad"),
    "scheduler/scheduler_config.json": lambda path: path.write_text("]"),
    "vae/diffusion_pytorch_model.safetensors": _truncate,
}


@pytest.mark.parametrize("broken", list(BROKEN_FILES))
def test_a_corrupt_model_file_is_named_in_one_line(vae_model, tmp_path, capsys, broken):
    import shutil

    model = shutil.copytree(vae_model / "model", tmp_path / "model")
    BROKEN_FILES[broken](model / broken)
    args = _args(vae_model, tmp_path / "out.gif")
    args[args.index("--model") + 1] = str(model)
    assert cli_main(args) == 2
    line = _one_error_line(capsys, "infer")
    assert f"error: {model / broken}: cannot load the " in line, line


def test_from_pretrained_or_error_for_the_training_loaders(vae_model, tmp_path):
    """The helper train.py's load_transformer and text.py's _encode call."""
    import shutil

    from diffusers import CogVideoXTransformer3DModel

    from lowmem_eraser.errors import ModelFileError
    from lowmem_eraser.loading import from_pretrained_or_error

    model = shutil.copytree(vae_model / "model", tmp_path / "model")
    loaded = from_pretrained_or_error(CogVideoXTransformer3DModel, model / "transformer", torch_dtype=torch.float32)
    assert isinstance(loaded, CogVideoXTransformer3DModel)
    _truncate(model / "transformer" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ModelFileError, match=r"diffusion_pytorch_model\.safetensors: cannot load the "
                                             r"CogVideoXTransformer3DModel: not a valid safetensors file"):
        from_pretrained_or_error(CogVideoXTransformer3DModel, model / "transformer")
