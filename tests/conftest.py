"""Test set-up. TRITON_INTERPRET must be set before anything imports triton (diffusers and bitsandbytes do)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from lowmem_eraser.tiny import TINY_TRANSFORMER  # noqa: E402

TINY_COGVIDEOX = {**TINY_TRANSFORMER, "max_text_seq_length": 7}


def tiny_transformer(seed: int = 0, **overrides):
    """A real diffusers CogVideoXTransformer3DModel with random weights (2 blocks, dim 32)."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(**{**TINY_COGVIDEOX, **overrides}).eval()


def tiny_inputs(seed: int = 1, batch: int = 1, dtype=torch.float32):
    """(latents [B, F, C, H, W], text embeddings [B, L, D], timestep [B]) matching TINY_COGVIDEOX."""
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 3, 4, 8, 8, generator=gen, dtype=dtype)
    text = torch.randn(batch, 7, 24, generator=gen, dtype=dtype)
    timestep = torch.full((batch,), 500, dtype=torch.long)
    return latents, text, timestep


def run(transformer, inputs):
    latents, text, timestep = inputs
    return transformer(latents, text, timestep, return_dict=False)[0]


def randomize_erasers(erasers, seed: int = 2, std: float = 0.2):
    """Give every adapter non-zero `up` weights so that it changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in erasers.values():
            for param in adapter.parameters():
                param.copy_(torch.randn(param.shape, generator=gen) * std)


@pytest.fixture
def transformer():
    return tiny_transformer()


@pytest.fixture
def inputs():
    return tiny_inputs()


@pytest.fixture
def one_thread():
    """Tiny steps: a second thread only adds contention on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
