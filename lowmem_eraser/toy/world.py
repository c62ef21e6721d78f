"""A procedural world of latent videos: one coloured object moving in one direction, with captions.

Videos live directly in the CogVideoX latent layout `[frames, channels, height, width]` (no VAE): 5 latent
frames (= 17 video frames), 4 channels, 16 x 16 latent pixels (= 128 x 128 video pixels with the pipeline's
spatial factor 8 when `vae=None`).

The generative rule (`make_latents`)
    * background: 0 in every channel, plus Gaussian noise of std `NOISE` (0.05);
    * colour ↔ channel: red → 0, green → 1, blue → 2, yellow → 3; the object lives in its colour's channel
      only (anti-aliased edges: coverage of each latent pixel);
    * shape ↔ geometry AND sign: ball = disc of radius 3.25 latent px with value +AMPLITUDE (2.5); square =
      axis-aligned filled square of side 7 with value −AMPLITUDE. Like a VAE latent, the code carries the
      shape twice: as geometry (what the renderer draws) and as a per-pixel sign (what a small model learns
      quickly; with geometry alone, the CPU-sized model drew rounded blobs for both shapes);
    * motion: the centre moves `SPEED` (1.5) latent px per latent frame (6 px over the clip) left/right/up/down
      (rows grow downwards, so "up" = decreasing row); the path's midpoint is jittered uniformly by ±0.75 px
      along the motion and ±1 px across it; the speed by ±10 %.

The renderer (`render`): per latent pixel, RGB = Σ_c clip(|latent_c| / AMPLITUDE, 0, 1) · PALETTE[c], clipped to
[0, 255]; frames are linearly interpolated in time (latent frame i is video frame 4i, the three frames between
two latent frames blend them), then bilinearly upsampled ×8 in space; uint8 `[17, 128, 128, 3]`.

The detector (`detect`) reads the latent code: p = clip(max_c |latent_c| / AMPLITUDE, 0, 1) (overshoot
saturates). Per frame the object is the largest 4-connected component of p ≥ ½; a frame whose object has < 4
latent pixels means "no object" (None). Colour = argmax over channels of Σ|latent_c| over the object in all
frames. Shape = the sign of that channel's sum over the object (+ → ball, − → square). Motion = the p-weighted
centroid of the object in the last frame minus that in the first frame: the larger axis and its sign; a
displacement < 1.5 px is "still" (generated: 6 px).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("ball", "square")
MOTIONS = ("left", "right", "up", "down")
STILL = "still"  # a motion `detect` may report; never generated

LATENT_FRAMES, CHANNELS, SIZE = 5, 4, 16
VIDEO_FRAMES = (LATENT_FRAMES - 1) * 4 + 1  # 17
PIXELS = SIZE * 8  # 128
AMPLITUDE = 2.5
NOISE = 0.05
SPEED = 1.5  # latent px per latent frame
BALL_RADIUS = 3.25
SQUARE_SIDE = 7.0
SHAPE_SIGN = {"ball": 1.0, "square": -1.0}  # the latent code of the shape
MIN_AREA = 4  # latent pixels
JITTER_ALONG, JITTER_ACROSS = 0.75, 1.0
MIN_MOTION = 1.5

PALETTE = np.array([[255, 40, 40], [40, 220, 40], [50, 90, 255], [255, 220, 0]], dtype=np.float32)
DIRECTIONS = {"left": (0.0, -1.0), "right": (0.0, 1.0), "up": (-1.0, 0.0), "down": (1.0, 0.0)}  # (row, col)

# Captions. The attribute words are always the same tokens ("red", "ball", "left", ...); the phrasings differ
# in filler words and order. Held-out phrasings are for evaluation only: never seen in training.
TRAIN_PHRASINGS = (
    "a {colour} {shape} moving {motion}",
    "a small {colour} {shape} drifting {motion}",
    "{colour} {shape} going {motion}",
    "a {shape} that is {colour}, moving {motion}",
    "one {colour} {shape} sliding {motion} across the frame",
    "a video of a {colour} {shape} heading {motion}",
)
HELD_OUT_PHRASINGS = (
    "the {colour} {shape} moves {motion}",
    "a {colour} {shape} travelling {motion} slowly",
    "watch a {shape}, {colour} in colour, going {motion}",
)


@dataclass(frozen=True)
class Video:
    """The attributes of one toy video."""

    colour: str
    shape: str
    motion: str


def all_attribute_combinations() -> list[Video]:
    """All 4 × 2 × 4 = 32 attribute combinations, in a fixed order."""
    return [Video(c, s, m) for c, s, m in itertools.product(COLOURS, SHAPES, MOTIONS)]


def caption(attrs: Video, phrasing: str | int = 0) -> str:
    """The caption of `attrs` in `phrasing` (a template, or an index into TRAIN_PHRASINGS)."""
    template = TRAIN_PHRASINGS[phrasing] if isinstance(phrasing, int) else phrasing
    return template.format(colour=attrs.colour, shape=attrs.shape, motion=attrs.motion)


def all_captions() -> list[str]:
    """Every caption of every combination in every phrasing (train and held out): the toy vocabulary."""
    return [caption(v, p) for v in all_attribute_combinations() for p in TRAIN_PHRASINGS + HELD_OUT_PHRASINGS]


def _generator(seed: int | torch.Generator | None) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    return torch.Generator().manual_seed(0 if seed is None else int(seed))


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen))


def make_latents(attrs: Video, seed: int | torch.Generator | None = 0, noise: float = NOISE) -> torch.Tensor:
    """One procedural latent video `[LATENT_FRAMES, CHANNELS, SIZE, SIZE]` (float32) showing `attrs`."""
    gen = _generator(seed)
    d_row, d_col = DIRECTIONS[attrs.motion]
    speed = SPEED * _uniform(gen, 0.9, 1.1)
    along, across = _uniform(gen, -JITTER_ALONG, JITTER_ALONG), _uniform(gen, -JITTER_ACROSS, JITTER_ACROSS)
    centre = (SIZE - 1) / 2
    mid_row = centre + along * abs(d_row) + across * abs(d_col)
    mid_col = centre + along * abs(d_col) + across * abs(d_row)
    steps = torch.arange(LATENT_FRAMES, dtype=torch.float32) - (LATENT_FRAMES - 1) / 2
    rows = (mid_row + d_row * speed * steps).view(-1, 1, 1)
    cols = (mid_col + d_col * speed * steps).view(-1, 1, 1)
    grid = torch.arange(SIZE, dtype=torch.float32)
    dr, dc = grid.view(1, -1, 1) - rows, grid.view(1, 1, -1) - cols  # [F, H, W] offsets from the centre
    if attrs.shape == "ball":
        coverage = (BALL_RADIUS + 0.5 - torch.sqrt(dr**2 + dc**2)).clamp(0, 1)
    else:
        half = SQUARE_SIDE / 2
        coverage = (half + 0.5 - dr.abs()).clamp(0, 1) * (half + 0.5 - dc.abs()).clamp(0, 1)
    latents = torch.zeros(LATENT_FRAMES, CHANNELS, SIZE, SIZE)
    latents[:, COLOURS.index(attrs.colour)] = SHAPE_SIGN[attrs.shape] * AMPLITUDE * coverage
    if noise > 0:
        latents += noise * torch.randn(latents.shape, generator=gen)
    return latents


def make_batch(attrs: list[Video], generator: torch.Generator, noise: float = NOISE) -> torch.Tensor:
    """`[len(attrs), F, C, H, W]` procedural latents, one per entry, drawn from `generator`."""
    return torch.stack([make_latents(a, generator, noise) for a in attrs])


def _as_video(latents) -> np.ndarray:
    array = latents.detach().float().cpu().numpy() if isinstance(latents, torch.Tensor) else np.asarray(latents)
    if array.ndim == 5 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 4:
        raise ValueError(f"expected latents [frames, channels, height, width], got shape {array.shape}")
    return array.astype(np.float32)


def render(latents) -> np.ndarray:
    """RGB video `uint8 [4·(F−1)+1, 8·H, 8·W, 3]` of a latent video `[F, C, H, W]` (rule in the module doc)."""
    video = _as_video(latents)
    frames, channels = video.shape[:2]
    weights = np.clip(np.abs(video) / AMPLITUDE, 0, 1)  # [F, C, H, W]
    rgb = np.einsum("fchw,ck->fkhw", weights, PALETTE[:channels])  # [F, 3, H, W]
    rgb = torch.from_numpy(np.clip(rgb, 0, 255))
    if frames > 1:  # time: latent frame i → video frame 4i, linear in between
        rgb = torch.nn.functional.interpolate(
            rgb.permute(1, 2, 3, 0).reshape(1, -1, frames), size=4 * (frames - 1) + 1, mode="linear", align_corners=True
        ).reshape(3, *rgb.shape[2:], -1).permute(3, 0, 1, 2)
    rgb = torch.nn.functional.interpolate(rgb, scale_factor=8, mode="bilinear", align_corners=False)
    return rgb.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a 2-D boolean mask."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, label = None, 0, 0
    height, width = mask.shape
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        label += 1
        labels[start] = label
        stack, size = [start], 0
        while stack:
            r, c = stack.pop()
            size += 1
            for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= nr < height and 0 <= nc < width and mask[nr, nc] and not labels[nr, nc]:
                    labels[nr, nc] = label
                    stack.append((nr, nc))
        if size > best_size:
            best, best_size = label, size
    return labels == best if best is not None else np.zeros_like(mask)


def detect(latents) -> Video | None:
    """Read colour, shape and motion back from a latent video `[F, C, H, W]` (rule in the module doc);
    None when some frame shows no object. `motion` may be "still"."""
    video = _as_video(latents)
    video = np.where(np.isfinite(video), video, 0)
    magnitude = np.clip(np.abs(video).max(axis=1) / AMPLITUDE, 0, 1)  # [F, H, W]
    mass, signed = np.zeros(video.shape[1]), np.zeros(video.shape[1])
    centroids = []
    rows, cols = np.mgrid[: video.shape[2], : video.shape[3]]
    for frame, p in zip(video, magnitude):
        obj = _largest_component(p >= 0.5)
        if obj.sum() < MIN_AREA:
            return None
        mass += np.abs(frame[:, obj]).sum(axis=1)
        signed += frame[:, obj].sum(axis=1)
        w = p[obj]
        centroids.append((float((rows[obj] * w).sum() / w.sum()), float((cols[obj] * w).sum() / w.sum())))
    channel = int(np.argmax(mass[: len(COLOURS)]))
    shape = "ball" if signed[channel] > 0 else "square"
    d_row, d_col = np.subtract(centroids[-1], centroids[0])
    if max(abs(d_row), abs(d_col)) < MIN_MOTION:
        motion = STILL
    elif abs(d_col) >= abs(d_row):
        motion = "right" if d_col > 0 else "left"
    else:
        motion = "down" if d_row > 0 else "up"
    return Video(COLOURS[channel], shape, motion)
