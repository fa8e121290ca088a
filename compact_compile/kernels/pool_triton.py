"""Rectification's pooled statistics in Triton: block means and mean absolute deviations of q, k, v
in one read of each, and from them a static plan's estimate R, Ō in one launch.

For block n of `BLOCK` tokens and the tokens i of it that count (w_i = 1: real tokens; for keys and
values only video tokens),
    x̄_n  = Σ_i w_i·x_i / Σ_i w_i
    δx_n = Σ_i w_i·|x_i − x̄_n| / Σ_i w_i
A [BLOCK, COLS] slice stays in registers between the two sums, so the tensor is read once; Inductor's
version of the same math (rectified.block_pool, the reference and CPU path) reads it twice or more.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _pool_tile(X, OUT, SRC, MEAN, MAD, stride_b, stride_h, stride_s, b, h, bh, blk, out_row, c0, n_valid, S,
               BLOCK: tl.constexpr, D: tl.constexpr, COLS: tl.constexpr, WITH_MAD: tl.constexpr,
               GATHER: tl.constexpr):
    """Mean (and deviation) of one [BLOCK, COLS] slice of block `blk`; with GATHER its rows are read
    at model positions SRC[row] and also written, in tile order, to OUT (contiguous [B, H, S, D])."""
    rows = blk * BLOCK + tl.arange(0, BLOCK)
    cols = c0 + tl.arange(0, COLS)
    in_seq = rows < S
    src = tl.load(SRC + rows, mask=in_seq, other=0).to(tl.int64) if GATHER else rows.to(tl.int64)
    x = tl.load(X + b * stride_b + h * stride_h + src[:, None] * stride_s + cols[None, :],
                mask=in_seq[:, None], other=0.0)
    if GATHER:
        tl.store(OUT + (bh * S + rows[:, None].to(tl.int64)) * D + cols[None, :], x, mask=in_seq[:, None])
    valid = rows < n_valid
    x = tl.where(valid[:, None], x.to(tl.float32), 0.0)
    count = tl.maximum(tl.sum(valid.to(tl.float32), 0), 1.0)
    mean = tl.sum(x, 0) / count
    tl.store(MEAN + out_row * D + cols, mean)
    if WITH_MAD:
        dev = tl.where(valid[:, None], tl.abs(x - mean[None, :]), 0.0)
        tl.store(MAD + out_row * D + cols, tl.sum(dev, 0) / count)


@triton.jit
def _pool_qkv(Q, K, V, QT, KT, VT, SRC, QM, QD, KM, KD, VM, sqb, sqh, sqs, skb, skh, sks, svb, svh, svs,
              n_heads, S, n_kv, BLOCK: tl.constexpr, D: tl.constexpr, COLS: tl.constexpr, GATHER: tl.constexpr):
    """q̄, δq over all S tokens, k̄, δk, v̄ over the first n_kv, in one launch (and, with GATHER,
    q, k, v in tile order). Means and deviations are per column, so a program takes a [BLOCK, COLS]
    slice of one block of one of the three tensors: small tiles, many programs in flight, and the
    loads are what bounds it."""
    blk = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    SPLIT: tl.constexpr = D // COLS
    which = tl.program_id(2) // SPLIT
    c0 = (tl.program_id(2) % SPLIT) * COLS
    b, h, out_row = bh // n_heads, bh % n_heads, bh * tl.num_programs(0) + blk
    if which == 0:
        _pool_tile(Q, QT, SRC, QM, QD, sqb, sqh, sqs, b, h, bh, blk, out_row, c0, S, S,
                   BLOCK, D, COLS, True, GATHER)
    elif which == 1:
        _pool_tile(K, KT, SRC, KM, KD, skb, skh, sks, b, h, bh, blk, out_row, c0, n_kv, S,
                   BLOCK, D, COLS, True, GATHER)
    else:
        _pool_tile(V, VT, SRC, VM, VM, svb, svh, svs, b, h, bh, blk, out_row, c0, n_kv, S,
                   BLOCK, D, COLS, False, GATHER)


POOL_CONFIG = dict(COLS=64, num_warps=2)


def _pool_launch(q, k, v, n_kv: int, block_size: int, src, config: dict | None):
    B, H, S, D = q.shape
    nb = triton.cdiv(S, block_size)
    config = {**POOL_CONFIG, **(config or {})}
    cols = min(config["COLS"], D)
    pools = [torch.empty(B, H, nb, D, device=q.device, dtype=torch.float32) for _ in range(5)]
    tiled = [torch.empty(B, H, S, D, device=q.device, dtype=x.dtype) for x in (q, k, v)] if src is not None else [q] * 3
    _pool_qkv[(nb, B * H, 3 * (D // cols))](q, k, v, *tiled, q if src is None else src, *pools,
                                            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], H, S, n_kv,
                                            BLOCK=block_size, D=D, COLS=cols, GATHER=src is not None,
                                            num_warps=config["num_warps"])
    return tuple(tiled), tuple(pools)


def block_pool_qkv_triton(q, k, v, n_kv: int, block_size: int, config: dict | None = None):
    """(q̄, δq, k̄, δk, v̄) float32 `[B, H, n_blocks, D]` of q, k, v `[B, H, S, D]` (last dims
    contiguous): queries over all S tokens, keys and values over their first n_kv. `config`
    (COLS=, num_warps=) overrides POOL_CONFIG (benchmarks)."""
    return _pool_launch(q, k, v, n_kv, block_size, None, config)[1]


def tile_pool_qkv_triton(q, k, v, src, n_kv: int, block_size: int, config: dict | None = None):
    """((q, k, v) in tile order, contiguous, (q̄, δq, k̄, δk, v̄) as block_pool_qkv_triton's) in one
    pass over q, k, v `[B, H, S, D]` in model order: tiled row p is model row src[p]. Rectification's
    pooling rides on the reorder the sparse path does anyway."""
    if src.shape != (q.shape[-2],) or src.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"src must be an int32/int64 [S={q.shape[-2]}] index; got {src.dtype} {tuple(src.shape)}")
    return _pool_launch(q, k, v, n_kv, block_size, src.contiguous(), config)


@triton.jit
def _estimate_static(QM, QD, KM, KD, VM, KEEP, K, R, OBAR, stride_keeph, stride_keepq,
                     stride_kb, stride_kh, stride_ks, n_heads, NQ, NK, NV, S, qk_scale,
                     PLAN_BLOCK: tl.constexpr, D: tl.constexpr, BQ: tl.constexpr, CH: tl.constexpr,
                     PRECISION: tl.constexpr):
    """R and Ō for BQ query blocks of one (batch, head) under a static plan: rectified.py's per-block
    estimate as a small attention of pooled queries over pooled keys, in base 2 (c = scale·log2 e):
        s̄_nm = q̄_n·k̄_m·c + log2(video tokens of m)      text keys k_t unpooled: q̄_n·k_t·c
        comp_nm = skipped_nm ∧ |q̄_n·k̄_m| > |δq_n·k̄_m| + |q̄_n·δk_m| ∧ m holds video     (GAPR)
        R_n = 1 − Σ_comp P̂_nm,  Ō_n = Σ_comp P̂_nm·v̄_m,   P̂_n = softmax_m over blocks and text keys
    The normaliser and both sums run online over chunks of CH keys (running max as in FlashAttention).
    Every block holding text keys is kept (the caller checks), so text enters the normaliser only."""
    pid_q = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    h = bh % n_heads
    n = pid_q * BQ + tl.arange(0, BQ)
    n_ok = n < NQ
    cols = tl.arange(0, D)
    q_rows = (bh * NQ + n)[:, None] * D + cols[None, :]
    q_mean = tl.load(QM + q_rows, mask=n_ok[:, None], other=0.0)
    q_mad = tl.load(QD + q_rows, mask=n_ok[:, None], other=0.0)
    m_run = tl.full([BQ], -1.0e30, tl.float32)   # finite: a chunk with no video block changes nothing
    z = tl.zeros([BQ], tl.float32)
    z_comp = tl.zeros([BQ], tl.float32)
    o_bar = tl.zeros([BQ, D], tl.float32)
    offs_c = tl.arange(0, CH)
    for c0 in range(0, NK, CH):
        m = c0 + offs_c
        m_ok = m < NK
        k_rows = (bh * NK + m)[:, None] * D + cols[None, :]
        k_mean = tl.load(KM + k_rows, mask=m_ok[:, None], other=0.0)
        k_mad = tl.load(KD + k_rows, mask=m_ok[:, None], other=0.0)
        v_mean = tl.load(VM + k_rows, mask=m_ok[:, None], other=0.0)
        gain = tl.dot(q_mean, tl.trans(k_mean), input_precision=PRECISION)
        error = (tl.abs(tl.dot(q_mad, tl.trans(k_mean), input_precision=PRECISION))
                 + tl.abs(tl.dot(q_mean, tl.trans(k_mad), input_precision=PRECISION)))
        video = tl.minimum(tl.maximum(NV - m * PLAN_BLOCK, 0), PLAN_BLOCK)
        s = tl.where((m_ok & (video > 0))[None, :],
                     gain * qk_scale + tl.log2(tl.maximum(video, 1).to(tl.float32))[None, :], float("-inf"))
        kept = tl.load(KEEP + h * stride_keeph + n[:, None] * stride_keepq + m[None, :],
                       mask=n_ok[:, None] & m_ok[None, :], other=1)
        comp = (kept == 0) & (tl.abs(gain) > error) & (video > 0)[None, :]
        m_new = tl.maximum(m_run, tl.max(s, 1))
        alpha = tl.math.exp2(m_run - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        p_comp = tl.where(comp, p, 0.0)
        z = z * alpha + tl.sum(p, 1)
        z_comp = z_comp * alpha + tl.sum(p_comp, 1)
        o_bar = o_bar * alpha[:, None] + tl.dot(p_comp, v_mean, input_precision=PRECISION)
        m_run = m_new
    k_base = K + (bh // n_heads) * stride_kb + h * stride_kh
    for t0 in range(NV, S, CH):   # text keys (joint attention), one by one
        t = t0 + offs_c
        k_text = tl.load(k_base + t[:, None].to(tl.int64) * stride_ks + cols[None, :], mask=(t < S)[:, None],
                         other=0.0).to(tl.float32)
        s = tl.where((t < S)[None, :], tl.dot(q_mean, tl.trans(k_text), input_precision=PRECISION) * qk_scale,
                     float("-inf"))
        m_new = tl.maximum(m_run, tl.max(s, 1))
        alpha = tl.math.exp2(m_run - m_new)
        z = z * alpha + tl.sum(tl.math.exp2(s - m_new[:, None]), 1)
        z_comp = z_comp * alpha
        o_bar = o_bar * alpha[:, None]
        m_run = m_new
    tl.store(R + bh * NQ + n, 1.0 - z_comp / z, mask=n_ok)
    tl.store(OBAR + q_rows, o_bar / z[:, None], mask=n_ok[:, None])


ESTIMATE_CONFIG = dict(BQ=16, CH=32, num_warps=4, num_stages=3)


def estimate_static_triton(pools, k, keep, n_video: int, scale: float, block_size: int, config: dict | None = None):
    """(R `[B, H, nq]`, Ō `[B, H, nq, D]`) float32 for a static plan's block map `keep` `[H or 1, nq,
    nq]` (blocks holding text keys kept), from `pools` = (q̄, δq, k̄, δk, v̄) of `rectified.pooled`
    in float32 and k `[B, H, S, D]` (its rows from n_video on are the text keys). One launch.
    `config` (BQ=, CH=, num_warps=, num_stages=) overrides ESTIMATE_CONFIG (benchmarks)."""
    q_mean = pools[0]
    B, H, nq, D = q_mean.shape
    config = {**ESTIMATE_CONFIG, **(config or {})}
    pools = [t.float().contiguous() for t in pools]
    keep = keep.to(device=k.device, dtype=torch.int8).contiguous()
    r = torch.empty(B, H, nq, device=k.device, dtype=torch.float32)
    o_bar = torch.empty(B, H, nq, D, device=k.device, dtype=torch.float32)
    # The pooled dots run on tensor cores in 3×TF32 (fp32-accurate); the interpreter computes them in fp32.
    _estimate_static[(triton.cdiv(nq, config["BQ"]), B * H)](
        *pools, keep, k, r, o_bar, keep.stride(0) if keep.shape[0] > 1 else 0, keep.stride(1),
        k.stride(0), k.stride(1), k.stride(2), H, nq, nq, n_video, k.shape[-2], scale * 1.4426950408889634,
        PLAN_BLOCK=block_size, D=D, BQ=config["BQ"], CH=config["CH"],
        PRECISION="tf32x3" if k.is_cuda else "ieee", num_warps=config["num_warps"],
        num_stages=config["num_stages"])
    return r, o_bar
