"""Procedural training clips, made on the training device each step (pure torch, batched).

Each clip: a slowly panning background of a few low-frequency colour waves, 1–3 filled circles or
squares moving at constant velocities and bouncing off the edges (later shapes occlude earlier ones),
and one handwritten digit from scikit-learn's bundled `load_digits` (8×8, drawn at a quarter of the
frame side) moving along its own bouncing path, always on top.

The label of a clip is its digit's class (0–9): visible in every frame, so a class caption tells the
model what to draw. Everything random is drawn from the `torch.Generator` passed in, so a seed fixes
a batch; a `Scene` (the random draw) can be rendered at any number of frames and any size.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NUM_CLASSES = 10
MAX_SHAPES = 3
WAVES = 3
DIGIT_SIDE = 0.25       # sprite side, as a fraction of the frame side


@dataclass
class Scene:
    """One batch of random draws. Positions and lengths are fractions of the frame side (x, y),
    velocities are per frame; colours are RGB in [-1, 1]."""
    labels: torch.Tensor        # [B] long, the digit's class
    digit: torch.Tensor         # [B, 8, 8] sprite intensity in [0, 1]
    digit_pos: torch.Tensor     # [B, 2] top-left corner at frame 0
    digit_vel: torch.Tensor     # [B, 2]
    digit_color: torch.Tensor   # [B, 3]
    bg_color: torch.Tensor      # [B, 3]
    wave_freq: torch.Tensor     # [B, WAVES, 2] cycles per frame side
    wave_phase: torch.Tensor    # [B, WAVES]
    wave_amp: torch.Tensor      # [B, WAVES, 3] per-channel amplitude
    pan_vel: torch.Tensor       # [B, 2] background drift
    shape_pos: torch.Tensor     # [B, MAX_SHAPES, 2] centre at frame 0
    shape_vel: torch.Tensor     # [B, MAX_SHAPES, 2]
    shape_radius: torch.Tensor  # [B, MAX_SHAPES] (half side for squares)
    shape_color: torch.Tensor   # [B, MAX_SHAPES, 3]
    shape_round: torch.Tensor   # [B, MAX_SHAPES] bool: circle, else square
    shape_present: torch.Tensor  # [B, MAX_SHAPES] bool: the first 1–3 shapes of each clip


def make_clips(batch: int, *, frames: int = 16, size: int = 64, generator: torch.Generator | int,
               device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(video float32 [B, 3, frames, size, size] in [-1, 1], labels long [B] in range(NUM_CLASSES)).

    `generator`: a torch.Generator (draws happen on its device: give it the same device as `device`,
    or every call copies and synchronises) or an int seed (a new generator on `device`)."""
    if isinstance(generator, int):
        generator = torch.Generator(device or "cpu").manual_seed(generator)
    scene = sample_scene(batch, generator)
    if device is not None:
        scene = Scene(**{k: v.to(device) for k, v in vars(scene).items()})
    return render(scene, frames, size), scene.labels


@functools.lru_cache(maxsize=None)
def _digit_table(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits of load_digits as ([N, 8, 8] intensity in [0, 1], [N] class), once per device."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32, device=device) / 16
    return images, torch.tensor(digits.target, dtype=torch.long, device=device)


def sample_scene(batch: int, generator: torch.Generator) -> Scene:
    """Draw everything random about `batch` clips from `generator`, on its device."""
    device = generator.device

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(batch, *shape, generator=generator, device=device)

    def velocity(lo, hi, *shape):   # random direction, speed in [lo, hi]
        angle, speed = uniform(0, 2 * math.pi, *shape), uniform(lo, hi, *shape)
        return torch.stack([angle.cos(), angle.sin()], -1) * speed[..., None]

    images, classes = _digit_table(device)
    index = torch.randint(len(images), (batch,), generator=generator, device=device)
    radius = uniform(1 / 16, 1 / 7, MAX_SHAPES)
    n_shapes = torch.randint(1, MAX_SHAPES + 1, (batch, 1), generator=generator, device=device)
    return Scene(
        labels=classes[index], digit=images[index],
        digit_pos=uniform(0, 1 - DIGIT_SIDE, 2), digit_vel=velocity(0.008, 0.03),
        digit_color=uniform(0.6, 1, 3),                 # bright, so the digit stands out
        bg_color=uniform(-0.8, 0, 3),                   # dark-ish background
        wave_freq=velocity(0.5, 2, WAVES), wave_phase=uniform(0, 2 * math.pi, WAVES),
        wave_amp=uniform(-0.2, 0.2, WAVES, 3), pan_vel=velocity(0.005, 0.025),
        shape_pos=radius[..., None] + (1 - 2 * radius[..., None]) * uniform(0, 1, MAX_SHAPES, 2),
        shape_vel=velocity(0.008, 0.04, MAX_SHAPES), shape_radius=radius,
        shape_color=uniform(-1, 1, MAX_SHAPES, 3), shape_round=uniform(0, 1, MAX_SHAPES) < 0.5,
        shape_present=torch.arange(MAX_SHAPES, device=device) < n_shapes,
    )


def render(scene: Scene, frames: int, size: int) -> torch.Tensor:
    """The clips of `scene` as float32 [B, 3, frames, size, size] in [-1, 1]."""
    device = scene.labels.device
    coords = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size   # pixel centres
    x, y = coords.view(1, 1, 1, size), coords.view(1, 1, size, 1)                  # broadcast to [B, T, H, W]
    t = torch.arange(frames, device=device, dtype=torch.float32)
    video = _background(scene, x, y, t)
    for s in range(MAX_SHAPES):     # in depth order: shape s covers shapes < s
        centre = _bounce(scene.shape_pos[:, None, s] + t[:, None] * scene.shape_vel[:, None, s],
                         scene.shape_radius[:, None, s, None], 1 - scene.shape_radius[:, None, s, None])
        dx, dy = (x - centre[..., 0, None, None]).abs(), (y - centre[..., 1, None, None]).abs()
        dist = torch.where(scene.shape_round[:, s, None, None, None], torch.hypot(dx, dy), torch.maximum(dx, dy))
        # one pixel of anti-aliased edge: smoother targets than a hard 0/1 mask
        alpha = ((scene.shape_radius[:, s, None, None, None] - dist) * size + 0.5).clamp(0, 1)
        video = _over(video, alpha * scene.shape_present[:, s, None, None, None], scene.shape_color[:, s])
    return _over(video, _digit_alpha(scene, t, x, y), scene.digit_color).clamp(-1, 1)


def _background(scene: Scene, x, y, t) -> torch.Tensor:
    """Sum of sinusoidal colour waves, shifted by the pan velocity each frame: [B, 3, T, H, W]."""
    shift = t[:, None] * scene.pan_vel[:, None]                      # [B, T, 2]
    fx, fy = (scene.wave_freq[..., i, None, None, None] for i in (0, 1))  # [B, WAVES, 1, 1, 1]
    sx, sy = (shift[:, None, :, i, None, None] for i in (0, 1))      # [B, 1, T, 1, 1]
    phase = 2 * math.pi * (fx * (x - sx) + fy * (y - sy)) + scene.wave_phase[..., None, None, None]
    waves = torch.einsum("bkc,bkthw->bcthw", scene.wave_amp, torch.sin(phase))
    return scene.bg_color[:, :, None, None, None] + waves


def _digit_alpha(scene: Scene, t, x, y) -> torch.Tensor:
    """Coverage [B, T, H, W] of the digit sprite: its 8×8 image bilinearly resampled at each pixel
    (sub-pixel motion stays smooth)."""
    batch, frames, height, width = len(scene.labels), len(t), y.shape[2], x.shape[3]
    corner = _bounce(scene.digit_pos[:, None] + t[:, None] * scene.digit_vel[:, None], 0.0, 1 - DIGIT_SIDE)
    # grid_sample's [-1, 1] spans the 8×8 image: map [corner, corner + DIGIT_SIDE] onto it
    gx = ((x - corner[..., 0, None, None]) / DIGIT_SIDE * 2 - 1).expand(batch, frames, height, width)
    gy = ((y - corner[..., 1, None, None]) / DIGIT_SIDE * 2 - 1).expand(batch, frames, height, width)
    grid = torch.stack([gx, gy], -1).flatten(0, 1)
    sprite = scene.digit[:, None, None].expand(batch, frames, 1, 8, 8).flatten(0, 1)
    alpha = F.grid_sample(sprite, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return alpha.view(batch, frames, height, width)


def _over(video: torch.Tensor, alpha: torch.Tensor, color: torch.Tensor) -> torch.Tensor:
    """Paint `color` [B, 3] with coverage `alpha` [B, T, H, W] over `video` [B, 3, T, H, W]."""
    alpha = alpha[:, None]
    return video * (1 - alpha) + color[:, :, None, None, None] * alpha


def _bounce(p: torch.Tensor, lo, hi) -> torch.Tensor:
    """Position `p` folded into [lo, hi] as if reflected off the walls (a triangle wave)."""
    span = hi - lo
    u = torch.remainder(p - lo, 2 * span)
    return lo + span - (u - span).abs()
