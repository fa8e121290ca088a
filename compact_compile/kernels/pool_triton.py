"""Rectification's pooled statistics in Triton: block means and mean absolute deviations of q, k, v
in one read of each, and the per-block estimate R, Ō that the attention kernel computes from them.

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


@triton.jit
def rectify_block(q, q_valid, km_ptr, kd_ptr, vm_ptr, keep_ptr, k_base, offs_d, stride_ks, NK, NV, S, qk_scale,
                   PLAN_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr):
    """R and Ō of this query block (rectified.py's per-block estimate, for a static plan), from its
    q tile and the pooled keys/values `[NK, D]` (k̄, δk, v̄) of its (batch, head), in base 2:
        s̄_m = q̄·k̄_m·c + log2(video tokens of m)       (text keys k_t, unpooled: q̄·k_t·c)
        P̂_m = 2^(s̄_m − M) / Z,  Z = Σ_m 2^(s̄_m − M) + Σ_t 2^(q̄·k_t·c − M)
        comp_m = skipped_m ∧ |q̄·k̄_m| > |δq·k̄_m| + |q̄·δk_m| ∧ m holds video tokens       (GAPR)
        R = 1 − Σ_comp P̂_m,  Ō = Σ_comp P̂_m·v̄_m
    with the running max M and the three sums updated chunk by chunk (as in the online softmax).
    Blocks holding text keys must be kept (the caller checks): text then only enters Z."""
    qf = tl.where(q_valid[:, None], q.to(tl.float32), 0.0)
    count = tl.sum(q_valid.to(tl.float32), 0)
    q_mean = tl.sum(qf, 0) / count
    q_mad = tl.sum(tl.where(q_valid[:, None], tl.abs(qf - q_mean[None, :]), 0.0), 0) / count
    m_run = -1.0e30          # finite: a chunk with no video block leaves every sum unchanged
    z = 0.0
    z_comp = 0.0
    o_bar = tl.zeros([HEAD_DIM], tl.float32)
    offs_c = tl.arange(0, CHUNK)
    for c0 in range(0, NK, CHUNK):
        mb = c0 + offs_c
        ok = mb < NK
        rows = mb[:, None] * HEAD_DIM + offs_d[None, :]
        km = tl.load(km_ptr + rows, mask=ok[:, None], other=0.0)
        kd = tl.load(kd_ptr + rows, mask=ok[:, None], other=0.0)
        vm = tl.load(vm_ptr + rows, mask=ok[:, None], other=0.0)
        gain = tl.sum(q_mean[None, :] * km, 1)
        error = tl.abs(tl.sum(q_mad[None, :] * km, 1)) + tl.abs(tl.sum(q_mean[None, :] * kd, 1))
        video = tl.minimum(tl.maximum(NV - mb * PLAN_BLOCK, 0), PLAN_BLOCK)
        s = tl.where(ok & (video > 0), gain * qk_scale + tl.log2(tl.maximum(video, 1).to(tl.float32)), float("-inf"))
        kept = tl.load(keep_ptr + mb, mask=ok, other=1)
        comp = (kept == 0) & (tl.abs(gain) > error) & (video > 0) & ok
        m_new = tl.maximum(m_run, tl.max(s, 0))
        alpha = tl.math.exp2(m_run - m_new)
        e = tl.math.exp2(s - m_new)
        e_comp = tl.where(comp, e, 0.0)
        z = z * alpha + tl.sum(e, 0)
        z_comp = z_comp * alpha + tl.sum(e_comp, 0)
        o_bar = o_bar * alpha + tl.sum(e_comp[:, None] * vm, 0)
        m_run = m_new
    for t0 in range(NV, S, CHUNK):   # text keys (joint attention), one by one
        rows = t0 + offs_c
        ok = rows < S
        kt = tl.load(k_base + rows[:, None].to(tl.int64) * stride_ks + offs_d[None, :], mask=ok[:, None], other=0.0)
        s = tl.where(ok, tl.sum(q_mean[None, :] * kt.to(tl.float32), 1) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_run, tl.max(s, 0))
        alpha = tl.math.exp2(m_run - m_new)
        z = z * alpha + tl.sum(tl.math.exp2(s - m_new), 0)
        z_comp = z_comp * alpha
        o_bar = o_bar * alpha
        m_run = m_new
    return 1.0 - z_comp / z, o_bar / z
