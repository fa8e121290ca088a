"""A static plan's rectification estimate R, Ō in Triton, from the pooled statistics of
pool_triton.py: rectified.py's per-block estimate, computed as a small attention of pooled queries
over pooled keys, in base 2 (c = scale·log2 e):

    s̄_nm = q̄_n·k̄_m·c + log2 c_m        text keys k_t enter unpooled: q̄_n·k_t·c
    comp_nm = skipped_nm ∧ |q̄_n·k̄_m| > |δq_n·k̄_m| + |q̄_n·δk_m| ∧ c_m > 0       (GAPR)
    R_n = 1 − Σ_comp P̂_nm,   Ō_n = Σ_comp P̂_nm·v̄_m,   P̂_n = softmax over key blocks and text keys
where c_m counts the video keys of block m. A key-padding mask (per batch element) leaves its
excluded keys out: c_m counts only the video keys it keeps (s̄_nm = −inf when none, as for a block
without video), and excluded text keys are not in the softmax.

The problem is small (blocks² · D per head) but serial along the keys, so long sequences split
them (FlashDecoding's split-KV): each program keeps, over its share of the keys, the running max m,
the normaliser z = Σ 2^(s̄−m), its compensated part z_c and the unnormalised Ō, and a second
launch merges the shares: with M = max_s m_s and w_s = 2^(m_s − M),
    R = 1 − Σ_s w_s·z_c,s / Σ_s w_s·z_s,     Ō = Σ_s w_s·Ō_s / Σ_s w_s·z_s.
Every block holding text keys is kept (the caller checks), so text enters the normaliser only; it
gets a share of its own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .pool_triton import key_mask_arg, valid_rows

LOG2E = 1.4426950408889634


def video_key_counts(key_valid: torch.Tensor, n_video: int, block_size: int, n_blocks: int) -> torch.Tensor:
    """c_m: the video keys of each key block that `key_valid` (`[B or 1, S]`, tile order: video
    first, n_video of them) keeps, float32 `[B or 1, n_blocks]`."""
    video = F.pad(key_valid[:, :n_video], (0, n_blocks * block_size - n_video)).view(-1, n_blocks, block_size)
    return video.sum(-1, dtype=torch.float32)


def key_mask_args(key_valid: torch.Tensor | None, k: torch.Tensor, n_video: int, block_size: int, n_blocks: int):
    """(COUNTS, its batch stride, KEY_VALID, its batch stride, MASKED) for the estimate and the choice:
    with a key-padding mask (bool `[B or 1, S]`, tile order) c_m of `video_key_counts` and the mask as
    int8; without one, k in both places, never read. Batch stride 0 broadcasts one row."""
    if key_valid is None:
        return k, 0, k, 0, False
    key_valid, key_valid_stride_b = key_mask_arg(key_valid.to(k.device), k.shape[0], k.shape[-2])
    counts = video_key_counts(key_valid, n_video, block_size, n_blocks)
    return counts, counts.stride(0) if counts.shape[0] > 1 else 0, key_valid, key_valid_stride_b, True


@triton.jit
def video_keys(m, m_ok, NV, COUNTS, counts_stride_b, b, PLAN_BLOCK: tl.constexpr, MASKED: tl.constexpr):
    """c_m (float32) of key blocks m of batch element b: with MASKED read from COUNTS, else every video
    token of the block (tile order: video first, NV of them)."""
    if MASKED:
        count = tl.load(COUNTS + b * counts_stride_b + m, mask=m_ok, other=0.0)
    else:
        count = tl.minimum(tl.maximum(NV - m * PLAN_BLOCK, 0), PLAN_BLOCK).to(tl.float32)
    return count


@triton.jit
def block_logits(gain, count, m_ok, qk_scale):
    """s̄_nm = q̄_n·k̄_m·c + log2 c_m from gain = q̄_n·k̄_m `[n, m]` and c_m; −inf where c_m = 0 and
    past the last block."""
    return tl.where((m_ok & (count > 0))[None, :], gain * qk_scale + tl.log2(tl.maximum(count, 1.0))[None, :],
                    float("-inf"))


@triton.jit
def _estimate_share(QM, QD, KM, KD, VM, KEEP, K, COUNTS, KEY_VALID, PART_M, PART_Z, PART_ZC, PART_O,
                    stride_keepb, stride_keeph, stride_keepq, stride_kb, stride_kh, stride_ks, counts_stride_b,
                    key_valid_stride_b, n_heads, NQ, NK, NV, S, n_shares, qk_scale,
                    PLAN_BLOCK: tl.constexpr, D: tl.constexpr, BQ: tl.constexpr, CH: tl.constexpr,
                    KEYS: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """(m, z, z_c, Ō) of BQ query blocks of one (batch, head) over one share of the keys: video key
    blocks [share·KEYS, (share+1)·KEYS), or, for the share after the last of those, the text keys.
    With MASKED, c_m comes from COUNTS and text keys that KEY_VALID excludes are left out."""
    pid_q = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    share = tl.program_id(2)
    b, h = bh // n_heads, bh % n_heads
    n = pid_q * BQ + tl.arange(0, BQ)
    n_ok = n < NQ
    cols = tl.arange(0, D)
    q_rows = (bh * NQ + n)[:, None] * D + cols[None, :]
    q_mean = tl.load(QM + q_rows, mask=n_ok[:, None], other=0.0)
    m_run = tl.full([BQ], -1.0e30, tl.float32)   # finite: keys that all get −inf change nothing
    z = tl.zeros([BQ], tl.float32)
    z_comp = tl.zeros([BQ], tl.float32)
    o_bar = tl.zeros([BQ, D], tl.float32)
    offs_c = tl.arange(0, CH)
    lo = share * KEYS
    if lo < NK:
        q_mad = tl.load(QD + q_rows, mask=n_ok[:, None], other=0.0)
        hi = tl.minimum(lo + KEYS, NK)
        for c0 in range(lo, hi, CH):
            m = c0 + offs_c
            m_ok = m < hi
            k_rows = (bh * NK + m)[:, None] * D + cols[None, :]
            k_mean = tl.load(KM + k_rows, mask=m_ok[:, None], other=0.0)
            k_mad = tl.load(KD + k_rows, mask=m_ok[:, None], other=0.0)
            v_mean = tl.load(VM + k_rows, mask=m_ok[:, None], other=0.0)
            gain = tl.dot(q_mean, tl.trans(k_mean), input_precision=PRECISION)
            error = (tl.abs(tl.dot(q_mad, tl.trans(k_mean), input_precision=PRECISION))
                     + tl.abs(tl.dot(q_mean, tl.trans(k_mad), input_precision=PRECISION)))
            count = video_keys(m, m_ok, NV, COUNTS, counts_stride_b, b, PLAN_BLOCK, MASKED)
            s = block_logits(gain, count, m_ok, qk_scale)
            kept = tl.load(KEEP + b * stride_keepb + h * stride_keeph + n[:, None] * stride_keepq + m[None, :],
                           mask=n_ok[:, None] & m_ok[None, :], other=1)
            comp = (kept == 0) & (tl.abs(gain) > error) & (count > 0)[None, :]
            m_new = tl.maximum(m_run, tl.max(s, 1))
            alpha = tl.math.exp2(m_run - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            p_comp = tl.where(comp, p, 0.0)
            z = z * alpha + tl.sum(p, 1)
            z_comp = z_comp * alpha + tl.sum(p_comp, 1)
            o_bar = o_bar * alpha[:, None] + tl.dot(p_comp, v_mean, input_precision=PRECISION)
            m_run = m_new
    else:   # text keys (joint attention), one by one
        k_base = K + b * stride_kb + h * stride_kh
        for t0 in range(NV, S, CH):
            t = t0 + offs_c
            t_ok = valid_rows(t, S, KEY_VALID, key_valid_stride_b, b, MASKED)
            k_text = tl.load(k_base + t[:, None].to(tl.int64) * stride_ks + cols[None, :], mask=t_ok[:, None],
                             other=0.0).to(tl.float32)
            s = tl.where(t_ok[None, :],
                         tl.dot(q_mean, tl.trans(k_text), input_precision=PRECISION) * qk_scale, float("-inf"))
            m_new = tl.maximum(m_run, tl.max(s, 1))
            z = z * tl.math.exp2(m_run - m_new) + tl.sum(tl.math.exp2(s - m_new[:, None]), 1)
            m_run = m_new
    part = (bh * n_shares + share) * NQ + n
    tl.store(PART_M + part, m_run, mask=n_ok)
    tl.store(PART_Z + part, z, mask=n_ok)
    tl.store(PART_ZC + part, z_comp, mask=n_ok)
    tl.store(PART_O + part[:, None] * D + cols[None, :], o_bar, mask=n_ok[:, None])


@triton.jit
def _merge_shares(PART_M, PART_Z, PART_ZC, PART_O, R, OBAR, NQ, n_shares, D: tl.constexpr, BN: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    n = pid * BN + tl.arange(0, BN)
    n_ok = n < NQ
    cols = tl.arange(0, D)
    m_max = tl.full([BN], -1.0e30, tl.float32)
    for s in range(n_shares):
        m_max = tl.maximum(m_max, tl.load(PART_M + (bh * n_shares + s) * NQ + n, mask=n_ok, other=-1.0e30))
    z = tl.zeros([BN], tl.float32)
    z_comp = tl.zeros([BN], tl.float32)
    o_bar = tl.zeros([BN, D], tl.float32)
    for s in range(n_shares):
        part = (bh * n_shares + s) * NQ + n
        w = tl.math.exp2(tl.load(PART_M + part, mask=n_ok, other=-1.0e30) - m_max)
        z += w * tl.load(PART_Z + part, mask=n_ok, other=0.0)
        z_comp += w * tl.load(PART_ZC + part, mask=n_ok, other=0.0)
        o_bar += w[:, None] * tl.load(PART_O + part[:, None] * D + cols[None, :], mask=n_ok[:, None], other=0.0)
    z = tl.where(n_ok & (z > 0), z, 1.0)     # z = 0: every key masked (a batch element's): R = 1, Ō = 0
    tl.store(R + bh * NQ + n, 1.0 - z_comp / z, mask=n_ok)
    tl.store(OBAR + (bh * NQ + n)[:, None] * D + cols[None, :], o_bar / z[:, None], mask=n_ok[:, None])


# Measured on an H100 at Wan 480p (256 blocks, BENCHMARKS.md): the dots dominate, and one share of
# 256 key blocks per program beat 2–8 smaller shares (22.6 µs against 26.5–36.6 µs with the merge);
# longer sequences (Wan 720p: 591 blocks) still get several shares.
ESTIMATE_CONFIG = dict(BQ=32, CH=32, KEYS=256, num_warps=4, num_stages=3, BN=16)


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """Tensor-core precision of the pooled dots: for fp16/bf16 inputs TF32 (its 11-bit significand
    is as fine as fp16's and finer than bf16's, so the means lose nothing the inputs had); for fp32
    inputs 3×TF32, accurate to fp32 at about twice the time. The interpreter computes in fp32."""
    if device.type != "cuda":
        return "ieee"
    return "tf32x3" if dtype == torch.float32 else "tf32"


def estimate_static_triton(pools, k, keep, n_video: int, scale: float, block_size: int, config: dict | None = None,
                           key_valid: torch.Tensor | None = None):
    """(R `[B, H, nq]`, Ō `[B, H, nq, D]`) float32 for the block map `keep` `[H or 1, nq, nq]` of a
    static plan, or `[B, H, nq, nq]` chosen online (blocks holding text keys kept), from `pools` =
    (q̄, δq, k̄, δk, v̄) of `rectified.pooled` in float32 and k `[B, H, S, D]` (its rows from
    n_video on are the text keys); `key_valid` (bool `[B or 1, S]`, tile order) excludes keys, as it
    did from the pools.
    `config` (BQ=, CH=, KEYS=, num_warps=, num_stages=, BN=, precision=) overrides ESTIMATE_CONFIG and
    `dot_precision(k.dtype)` (benchmarks)."""
    B, H, nq, D = pools[0].shape
    config = {**ESTIMATE_CONFIG, **(config or {})}
    if config["KEYS"] % config["CH"]:
        raise ValueError(f"KEYS ({config['KEYS']}) must be a multiple of CH ({config['CH']})")
    pools = [t.float().contiguous() for t in pools]
    keep = keep.to(device=k.device, dtype=torch.int8).contiguous()
    keep = keep if keep.dim() == 4 else keep[None]
    keep_strides = [st if n > 1 else 0 for st, n in zip(keep.stride()[:2], keep.shape[:2])] + [keep.stride(2)]
    S = k.shape[-2]
    n_shares = triton.cdiv(nq, config["KEYS"]) + (S > n_video)
    part_m, part_z, part_zc = torch.empty(3, B * H, n_shares, nq, device=k.device, dtype=torch.float32)
    part_o = torch.empty(B * H, n_shares, nq, D, device=k.device, dtype=torch.float32)
    counts, counts_stride_b, key_valid, key_valid_stride_b, masked = key_mask_args(key_valid, k, n_video,
                                                                                   block_size, nq)
    _estimate_share[(triton.cdiv(nq, config["BQ"]), B * H, n_shares)](
        *pools, keep, k, counts, key_valid, part_m, part_z, part_zc, part_o, *keep_strides, k.stride(0),
        k.stride(1), k.stride(2), counts_stride_b, key_valid_stride_b, H, nq, nq, n_video, S, n_shares,
        scale * LOG2E, PLAN_BLOCK=block_size, D=D, BQ=config["BQ"], CH=config["CH"], KEYS=config["KEYS"],
        PRECISION=config.get("precision", dot_precision(k.dtype, k.device)), MASKED=masked,
        num_warps=config["num_warps"], num_stages=config["num_stages"])
    r = torch.empty(B, H, nq, device=k.device, dtype=torch.float32)
    o_bar = torch.empty(B, H, nq, D, device=k.device, dtype=torch.float32)
    _merge_shares[(triton.cdiv(nq, config["BN"]), B * H)](part_m, part_z, part_zc, part_o, r, o_bar, nq, n_shares,
                                                          D=D, BN=config["BN"], num_warps=4)
    return r, o_bar
