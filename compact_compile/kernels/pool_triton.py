"""Block means and mean absolute deviations of q, k, v in one read of each (Triton).

For block n of `BLOCK` tokens and the tokens i of it that count (w_i = 1: real tokens; for keys and
values only video tokens),
    x̄_n  = Σ_i w_i·x_i / Σ_i w_i
    δx_n = Σ_i w_i·|x_i − x̄_n| / Σ_i w_i
The tile [BLOCK, D] stays in registers between the two sums, so the tensor is read once; Inductor's
version of the same math (rectified.block_pool, the reference and CPU path) reads it twice or more.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _pool(X, MEAN, MAD, stride_b, stride_h, stride_s, n_heads, n_valid,
          BLOCK: tl.constexpr, D: tl.constexpr, WITH_MAD: tl.constexpr):
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // n_heads, bh % n_heads
    rows = blk * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, D)
    valid = rows < n_valid
    x = tl.load(X + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h + rows[:, None].to(tl.int64) * stride_s
                + cols[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    count = tl.maximum(tl.sum(valid.to(tl.float32), 0), 1.0)
    mean = tl.sum(x, 0) / count
    out = (bh.to(tl.int64) * tl.num_programs(0) + blk) * D + cols
    tl.store(MEAN + out, mean)
    if WITH_MAD:
        dev = tl.where(valid[:, None], tl.abs(x - mean[None, :]), 0.0)
        tl.store(MAD + out, tl.sum(dev, 0) / count)


def block_pool_triton(x: torch.Tensor, n_valid: int, block_size: int, with_mad: bool = True):
    """(mean, mad or None), float32 `[B, H, n_blocks, D]`, over the first `n_valid` tokens of each
    block of x `[B, H, S, D]` (last dim contiguous); a block with no valid token gets zeros."""
    B, H, S, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    nb = triton.cdiv(S, block_size)
    mean = torch.empty(B, H, nb, D, device=x.device, dtype=torch.float32)
    mad = torch.empty_like(mean) if with_mad else mean
    _pool[(nb, B * H)](x, mean, mad, x.stride(0), x.stride(1), x.stride(2), H, n_valid,
                       BLOCK=block_size, D=D, WITH_MAD=with_mad, num_warps=8 if block_size * D >= 8192 else 4)
    return mean, (mad if with_mad else None)
