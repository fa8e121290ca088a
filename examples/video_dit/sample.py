"""Deterministic Euler sampling of the video DiT, and pictures of the results.

    python -m examples.video_dit.sample --model short|long --out DIR [--checkpoint PATH]   # samples.png + .gif

`sample` works with anything called like WanTransformer3DModel.forward: the module itself,
`torch.compile(module, backend="inductor")` or `torch.compile(module, backend="compact", options=...)`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from .clips import NUM_CLASSES
from .model import MODEL_NAMES, NULL, caption, from_name, load_model


def timesteps(steps: int, shift: float = 1.0) -> torch.Tensor:
    """steps + 1 times from 1 to 0, evenly spaced, then shifted: t ↦ shift·t / (1 + (shift − 1)·t)
    (SD3's shift; shift > 1 spends more of the steps at high noise, where the layout is decided)."""
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    return shift * t / (1 + (shift - 1) * t)


@torch.no_grad()
def sample(model, noise: torch.Tensor, labels: torch.Tensor, *, steps: int = 20, cfg: float = 3.0,
           shift: float = 1.0) -> torch.Tensor:
    """Integrate the model's velocity from t = 1 (`noise`, [B, 3, T, H, W]) to t = 0 with Euler steps;
    returns float32 [B, 3, T, H, W] clamped to [-1, 1].

    The model runs in `noise.dtype`; the state is kept in float32 between steps. With cfg ≠ 1 the
    conditional and NULL captions go through ONE forward of batch 2B and
    v = v_uncond + cfg·(v_cond − v_uncond); cfg = 1 runs the conditional half only."""
    dtype, device = noise.dtype, noise.device
    labels = labels.to(device)
    guided = cfg != 1.0
    if guided:
        labels = torch.cat([labels, torch.full_like(labels, NULL)])
    context = caption(labels).to(dtype)
    x = noise.float()
    ts = timesteps(steps, shift)
    for t, t_next in zip(ts[:-1].tolist(), ts[1:].tolist()):
        inputs = torch.cat([x, x]) if guided else x
        t_batch = torch.full((len(labels),), t * 1000, device=device, dtype=torch.float32)
        v = model(hidden_states=inputs.to(dtype), timestep=t_batch, encoder_hidden_states=context,
                  return_dict=False)[0].float()
        if guided:
            v_cond, v_uncond = v.chunk(2)
            v = v_uncond + cfg * (v_cond - v_uncond)
        x = x + (t_next - t) * v
    return x.clamp(-1, 1)


def fixed_noise(batch: int, frames: int, size: int, seed: int = 0, device="cpu",
                dtype=torch.float32) -> torch.Tensor:
    """N(0, 1) [batch, 3, frames, size, size], drawn on the CPU so a seed gives the same noise everywhere."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, frames, size, size, generator=g).to(device, dtype)


def _to_uint8(video: torch.Tensor) -> np.ndarray:
    """[3, T, H, W] in [-1, 1] → uint8 [T, H, W, 3]."""
    return ((video.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).numpy()


def save_strip(rows: dict[str, torch.Tensor], path: str | Path, frames: int = 8) -> None:
    """PNG: one row per named video [3, T, H, W], `frames` evenly spaced frames, the name on the left."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), frames, figsize=(1.2 * frames + 1.5, 1.2 * len(rows)), squeeze=False)
    for ax_row, (name, video) in zip(axes, rows.items()):
        pixels = _to_uint8(video)
        for ax, i in zip(ax_row, np.linspace(0, len(pixels) - 1, frames).round().astype(int)):
            ax.imshow(pixels[i], interpolation="nearest")
            ax.set_axis_off()
        ax_row[0].text(-0.08, 0.5, name, transform=ax_row[0].transAxes, ha="right", va="center", fontsize=9)
    fig.subplots_adjust(left=1.5 / (1.2 * frames + 1.5), right=0.99, top=0.99, bottom=0.01, wspace=0.05, hspace=0.05)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_gif(videos: dict[str, torch.Tensor], path: str | Path, scale: int = 2, fps: int = 8) -> None:
    """Animated GIF: the named videos [3, T, H, W] side by side (pixels enlarged `scale`×), names above."""
    from PIL import Image, ImageDraw

    clips = [_to_uint8(v).repeat(scale, axis=1).repeat(scale, axis=2) for v in videos.values()]
    height, width, gap, header = clips[0].shape[1], clips[0].shape[2], 4, 14
    canvas = np.full((len(clips[0]), header + height, len(clips) * (width + gap) - gap, 3), 255, np.uint8)
    for i, clip in enumerate(clips):
        canvas[:, header:, i * (width + gap):i * (width + gap) + width] = clip
    images = [Image.fromarray(frame) for frame in canvas]
    for image in images:
        draw = ImageDraw.Draw(image)
        for i, name in enumerate(videos):
            draw.text((i * (width + gap) + 2, 1), name, fill=(0, 0, 0))
    images[0].save(path, save_all=True, append_images=images[1:], duration=1000 // fps, loop=0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Sample the video DiT (dense, uncompiled): a strip and a GIF per class.")
    ap.add_argument("--model", choices=MODEL_NAMES, default="short", help="which video DiT (model.py)")
    ap.add_argument("--checkpoint", help="default: the model's own")
    ap.add_argument("--out", required=True)
    ap.add_argument("--classes", type=int, nargs="+", default=list(range(NUM_CLASSES)))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--shift", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = from_name(args.model)
    model = load_model(args.checkpoint or config.checkpoint, device, dtype)
    noise = fixed_noise(len(args.classes), config.frames, config.size, seed=args.seed, device=device, dtype=dtype)
    videos = sample(model, noise, torch.tensor(args.classes), steps=args.steps, cfg=args.cfg, shift=args.shift)
    named = {f"digit {c}": v for c, v in zip(args.classes, videos)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_strip(named, out / "samples.png")
    save_gif(named, out / "samples.gif")
    print(f"wrote {out / 'samples.png'} and {out / 'samples.gif'}")


if __name__ == "__main__":
    main()
