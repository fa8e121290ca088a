"""The dynamic plan's online block choice in Triton: rectified.py's selection, and the block lists
the attention kernels read, in one launch.

Per query block n, from pooled statistics (pool_triton.py), in base 2 (c = scale·log2 e):
    P̂_n = softmax over key blocks m of  q̄_n·k̄_m·c + log2 c_m,  text keys unpooled (q̄_n·k_t·c) with
          each text key's mass added to the block holding it; c_m and a key-padding mask as in
          estimate_triton.py
    chosen = the fewest top blocks of P̂_n whose mass exceeds p_remain, at least k_min of them
    keep   = static ∪ chosen;  the list: kept blocks ascending, then the others
A program holds whole rows of P̂ (BQ query blocks × all key blocks, padded to a power of two), sorts
them, and reads the cut-off from the sorted prefix sums. Exactly `covering` blocks are chosen, as in
torch; blocks tied at the cut-off go by block index (torch's sort orders ties its own way).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .estimate_triton import LOG2E, block_logits, dot_precision, key_mask_args, video_keys
from .pool_triton import valid_rows

MAX_BLOCKS = 512   # whole rows live in registers: longer sequences take the general (torch) path


@triton.jit
def _select_blocks(QM, KM, K, STATIC, COUNTS, KEY_VALID, KEEP, NUM, IDX, stride_sh, stride_sq, stride_kb,
                   stride_kh, stride_ks, counts_stride_b, key_valid_stride_b, n_heads, NQ, NK, NV, S, qk_scale,
                   p_remain, k_min, PLAN_BLOCK: tl.constexpr, D: tl.constexpr, BQ: tl.constexpr,
                   NKP: tl.constexpr, CH: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr):
    pid_q = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // n_heads, bh % n_heads
    n = pid_q * BQ + tl.arange(0, BQ)
    n_ok = n < NQ
    cols = tl.arange(0, D)
    m = tl.arange(0, NKP)
    m_ok = m < NK
    q_mean = tl.load(QM + (bh * NQ + n)[:, None] * D + cols[None, :], mask=n_ok[:, None], other=0.0)
    k_mean = tl.load(KM + (bh * NK + m)[:, None] * D + cols[None, :], mask=m_ok[:, None], other=0.0)
    count = video_keys(m, m_ok, NV, COUNTS, counts_stride_b, b, PLAN_BLOCK, MASKED)
    s = block_logits(tl.dot(q_mean, tl.trans(k_mean), input_precision=PRECISION), count, m_ok, qk_scale)
    row_max = tl.max(s, 1)
    text_mass = tl.zeros([BQ, NKP], tl.float32)   # Σ 2^(s_t − row_max) of the text keys in block m
    z_text = tl.zeros([BQ], tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    for t0 in range(NV, S, CH):
        t = t0 + tl.arange(0, CH)
        t_ok = valid_rows(t, S, KEY_VALID, key_valid_stride_b, b, MASKED)
        k_text = tl.load(k_base + t[:, None].to(tl.int64) * stride_ks + cols[None, :], mask=t_ok[:, None],
                         other=0.0).to(tl.float32)
        s_t = tl.where(t_ok[None, :],
                       tl.dot(q_mean, tl.trans(k_text), input_precision=PRECISION) * qk_scale, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s_t, 1))
        alpha = tl.math.exp2(row_max - new_max)
        p_t = tl.math.exp2(s_t - new_max[:, None])
        owner = ((t[:, None] // PLAN_BLOCK) == m[None, :]).to(tl.float32)     # [CH, NKP] one-hot
        text_mass = text_mass * alpha[:, None] + tl.dot(p_t, owner, input_precision="ieee")
        z_text = z_text * alpha + tl.sum(p_t, 1)
        row_max = new_max
    p_video = tl.math.exp2(s - row_max[:, None])
    p = (p_video + text_mass) / (tl.sum(p_video, 1) + z_text)[:, None]
    p = tl.where(m_ok[None, :], p, 0.0)

    ranked = tl.sort(p, 1, descending=True)
    covering = 1 + tl.sum((tl.cumsum(ranked, 1) <= p_remain).to(tl.int32), 1)
    covering = tl.minimum(tl.maximum(covering, k_min), NK)
    cutoff = tl.sum(tl.where(m[None, :] == covering[:, None] - 1, ranked, 0.0), 1)
    static = tl.load(STATIC + h * stride_sh + n[:, None] * stride_sq + m[None, :],
                     mask=n_ok[:, None] & m_ok[None, :], other=0)
    # exactly `covering` blocks: those above the cut-off, then ties at it by block index
    above = p > cutoff[:, None]
    tied = (p == cutoff[:, None]) & m_ok[None, :]
    need = covering - tl.sum(above.to(tl.int32), 1)
    chosen = above | (tied & (tl.cumsum(tied.to(tl.int32), 1) <= need[:, None]))
    keep = ((static != 0) | chosen) & m_ok[None, :]

    rows = (bh * NQ + n)[:, None] * NK
    ok = n_ok[:, None] & m_ok[None, :]
    tl.store(KEEP + rows + m[None, :], keep.to(tl.int8), mask=ok)
    kept = keep.to(tl.int32)
    num = tl.sum(kept, 1)
    pos = tl.where(keep, tl.cumsum(kept, 1) - 1, num[:, None] + tl.cumsum(1 - kept, 1) - 1)
    tl.store(IDX + rows + pos, m[None, :].to(tl.int32) + tl.zeros([BQ, NKP], tl.int32), mask=ok)
    tl.store(NUM + bh * NQ + n, num, mask=n_ok)


SELECT_CONFIG = dict(BQ=16, num_warps=4)   # H100 sweep: 47 µs, against 61–164 µs (BENCHMARKS.md)


def select_blocks_triton(q_mean, k_mean, k, static, n_video: int, scale: float, block_size: int,
                         p_remain: float, k_min: int, config: dict | None = None,
                         key_valid: torch.Tensor | None = None):
    """(keep int8 `[B, H, nq, nk]`, kv_num int32 `[B, H, nq]`, kv_indices int32 `[B, H, nq, nk]`) from
    q̄, k̄ float32 `[B, H, n_blocks, D]`, k `[B, H, S, D]` (rows from n_video on: text keys) and the
    static blocks `static` `[H or 1, nq, nk]` (int8 or bool), which must hold every text block;
    `key_valid` (bool `[B or 1, S]`, tile order) excludes keys, as it did from k̄.
    `config` (BQ=, num_warps=) overrides SELECT_CONFIG (benchmarks)."""
    B, H, nq, D = q_mean.shape
    nk = k_mean.shape[-2]
    nkp = triton.next_power_of_2(nk)
    if nkp > MAX_BLOCKS:
        raise ValueError(f"{nk} key blocks: the Triton selection holds at most {MAX_BLOCKS} per row")
    static = static.to(device=k.device, dtype=torch.int8).contiguous()
    keep = torch.empty(B, H, nq, nk, device=k.device, dtype=torch.int8)
    num = torch.empty(B, H, nq, device=k.device, dtype=torch.int32)
    idx = torch.empty(B, H, nq, nk, device=k.device, dtype=torch.int32)
    config = {**SELECT_CONFIG, **(config or {})}
    counts, counts_stride_b, key_valid, key_valid_stride_b, masked = key_mask_args(key_valid, k, n_video,
                                                                                   block_size, nk)
    _select_blocks[(triton.cdiv(nq, config["BQ"]), B * H)](
        q_mean.float().contiguous(), k_mean.float().contiguous(), k, static, counts, key_valid, keep, num, idx,
        static.stride(0) if static.shape[0] > 1 else 0, static.stride(1), k.stride(0), k.stride(1), k.stride(2),
        counts_stride_b, key_valid_stride_b, H, nq, nk, n_video, k.shape[-2], scale * LOG2E, p_remain, k_min,
        PLAN_BLOCK=block_size, D=D, BQ=config["BQ"], NKP=nkp, CH=16, PRECISION=dot_precision(k.dtype, k.device),
        MASKED=masked, num_warps=config["num_warps"])
    return keep, num, idx
