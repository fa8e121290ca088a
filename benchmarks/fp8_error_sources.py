"""Where FP8 attention's error comes from, on the trained video DiTs' own q, k, v (CPU, float64).

The forward of one denoising step of a trained model (examples/video_dit, sampling its fixed noise)
captures every self-attention's q, k, v; in tile order, per layer and block mask (window (1,3,3),
(3,3,3), dense), the relative error ‖O − O_exact‖/‖O_exact‖ over the first `--rows` query rows of
every head, where O_exact is float64 block-sparse attention on the captured bf16 inputs and O rounds,
the way the FP8 kernels do
(fp8.quantize_tiles: q and k − μ rotated by H₈ ⊗ I and per block, v per channel; P as e4m3 of 448·p,
summed unrounded):
  q, k, v, P   that operand alone
  fp8          all four: the FP8 path as shipped
  fp8, exact k all but k
  q, k         the two score operands
  q smoothed   the same, q's block mean taken out before rounding and its term q̄·k added back
               exactly (a counterfactual: the kernels have no such bias)
  q, k unrotated, fp8, q and k unrotated
               the same without the kernels' rotation of q and k (fp8.py): what it buys
So the share each operand has in the FP8 error is read directly, and what removing one would buy.

    python benchmarks/fp8_error_sources.py [--model short] [--step 5 --steps 10] [--rows 2048]
Writes $OUT/fp8-error-sources-<model>.json.
"""
import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compact_compile.kernels.fp8 import (E4M3, E4M3_MAX, dequantize, quantize_tiles, rotation,  # noqa: E402
                                         smoothing_stats)
from compact_compile.kernels.reference import token_mask  # noqa: E402
from compact_compile.layout import TokenLayout, auto_tile  # noqa: E402
from compact_compile.masks import dense_blocks, window_blocks  # noqa: E402
from examples.video_dit.model import MODEL_NAMES, from_name, load_model  # noqa: E402
from examples.video_dit.sample import fixed_noise, sample  # noqa: E402

BLOCK = 64   # the plans' block size on the trained models (fidelity.py's default)
WINDOWS = {"window (1,3,3)": (1, 3, 3), "window (3,3,3)": (3, 3, 3), "dense": None}


def captured_qkv(config, step: int, steps: int) -> list:
    """Every self-attention's (q, k, v) `[1, H, S, D]` (the conditional half of the CFG batch) in the
    forward of denoising step `step` of `steps` (sample.py, class 1, the fixed noise), bf16 on the CPU."""
    model = load_model(config.checkpoint, dtype=torch.bfloat16)
    per_forward, calls, captured, sdpa = len(model.blocks), [0], [], F.scaled_dot_product_attention

    def observe(query, key, value, *args, **kwargs):
        if query.shape[-2] == key.shape[-2]:
            if calls[0] // per_forward == step:
                captured.append((query[:1], key[:1], value[:1]))
            calls[0] += 1
        return sdpa(query, key, value, *args, **kwargs)

    F.scaled_dot_product_attention = observe
    try:
        sample(model, fixed_noise(1, config.frames, config.size).bfloat16(), torch.tensor([1]), steps=step + 1)
    finally:
        F.scaled_dot_product_attention = sdpa
    return captured


def attention(q, k, v, keep, round_p: bool = False, bias=0.0):
    """float64 softmax(q·kᵀ/√D + bias over `keep`)·v; with round_p, P = e4m3(448·p)/448 in P·V and the
    normaliser summed unrounded, as the kernels do."""
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) + bias
    s = s.masked_fill(~keep, -math.inf)
    p = torch.exp(s - s.amax(-1, keepdim=True))
    l = p.sum(-1, keepdim=True)
    if round_p:
        p = (p * E4M3_MAX).to(E4M3).double() / E4M3_MAX
    return p @ v / l


def rounded(q, k, v, k_mean, v_amax):
    """(q, k − μ, v) as the FP8 kernels round them, float64, in the model's basis: the tiles hold q·M/8
    and (k − μ)·M (fp8.rotation, M·Mᵀ = 8·I), so q = (q·M/8)·Mᵀ and k − μ = ((k − μ)·M)·Mᵀ/8."""
    q8, k8, v8 = dequantize(quantize_tiles(q, k, v, k_mean, v_amax, BLOCK), BLOCK)
    m = rotation(q.shape[-1]).double()
    return q8 @ m.T, k8 @ m.T / 8, v8


def layer_errors(q, k, v, blocks, rows: int) -> dict:
    """Relative error of each rounding (module docstring) for the first `rows` query rows."""
    S = q.shape[-2]
    keep = token_mask(blocks, S, BLOCK)[:rows]
    k_mean, v_amax = smoothing_stats(k, v)
    q8, k8, v8 = rounded(q, k, v, k_mean, v_amax)
    q, k, v = q.double(), k.double() - k_mean.double()[:, :, None], v.double()   # the shift changes no softmax
    exact = attention(q[..., :rows, :], k, v, keep)
    block_means = F.pad(q, (0, 0, 0, -S % BLOCK)).unflatten(-2, (-1, BLOCK)).mean(-2)
    q_mean = block_means.repeat_interleave(BLOCK, -2)[..., :S, :]
    q_smoothed8 = rounded(q - q_mean, k, v, torch.zeros_like(k_mean), v_amax)[0]   # k: smoothed already
    # M/√8 is orthogonal: the kernels round q·Mᵀ/√8 and k·Mᵀ/√8 as √8·q and √8·k, so rounding those
    # rounds q and k − μ unrotated (k is smoothed already: its mean 0 here)
    m = rotation(q.shape[-1]).double() / math.sqrt(8)
    q8u, k8u, _ = rounded(q @ m.T, k @ m.T, v, torch.zeros_like(k_mean), v_amax)
    q8u, k8u = q8u @ m, k8u @ m
    variants = {
        "q": attention(q8[..., :rows, :], k, v, keep),
        "k": attention(q[..., :rows, :], k8, v, keep),
        "v": attention(q[..., :rows, :], k, v8, keep),
        "P": attention(q[..., :rows, :], k, v, keep, round_p=True),
        "q, k": attention(q8[..., :rows, :], k8, v, keep),
        "fp8": attention(q8[..., :rows, :], k8, v8, keep, round_p=True),
        "fp8, exact k": attention(q8[..., :rows, :], k, v8, keep, round_p=True),
        "q smoothed": attention(q_smoothed8[..., :rows, :], k8, v, keep,
                                bias=q_mean[..., :rows, :] @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])),
        "q, k unrotated": attention(q8u[..., :rows, :], k8u, v, keep),
        "fp8, q and k unrotated": attention(q8u[..., :rows, :], k8u, v8, keep, round_p=True),
    }
    return {name: ((o - exact).norm() / exact.norm()).item() for name, o in variants.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="short", choices=MODEL_NAMES)
    ap.add_argument("--step", type=int, default=5, help="the denoising step captured, of --steps")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rows", type=int, default=2048, help="query rows per head measured (all keys)")
    args = ap.parse_args()
    torch.manual_seed(0)
    config = from_name(args.model)
    layout = TokenLayout(config.grid, auto_tile(config.grid, BLOCK), BLOCK)
    src = layout.source_index()
    result = dict(model=args.model, step=args.step, steps=args.steps, rows=args.rows, block_size=BLOCK,
                  torch=torch.__version__, layers={})
    for i, qkv in enumerate(captured_qkv(config, args.step, args.steps)):
        q, k, v = (x.float().index_select(-2, src) for x in qkv)
        result["layers"][i] = {}
        for name, window in WINDOWS.items():
            blocks = window_blocks(layout, window) if window else dense_blocks(layout)
            errors = layer_errors(q, k, v, blocks, min(args.rows, q.shape[-2]))
            result["layers"][i][name] = errors
            print(f"layer {i} {name:15s}", " ".join(f"{n}={e:.4f}" for n, e in errors.items()), flush=True)
    path = Path(os.environ.get("OUT", ".")) / f"fp8-error-sources-{args.model}.json"
    path.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
