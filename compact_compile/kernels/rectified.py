"""Rectified block-sparse attention (Rectified SpaAttn; ../shared/research/seeds.md §2).

Block-sparse attention over kept key blocks C_n of query block n computes
    O_sparse_i = Σ_{j∈C} e^{s_ij} v_j / Σ_{j∈C} e^{s_ij}
while full attention is  O_i = R_i · O_sparse_i + Σ_{j∉C} A_ij v_j,  R_i = Σ_{j∈C} A_ij ≤ 1:
sparse attention over-weights the kept keys by 1/R_i and drops the rest. Both terms are estimated
from block means (q̄, k̄, v̄) at a cost of O(blocks²·D):

  IPAR   s̄_nm = q̄_n·k̄_m·scale. A block of c_m keys with roughly equal logits holds ≈ c_m·e^{s̄_nm}
         of the softmax numerator, so P̂_n = softmax_m(s̄_nm + ln c_m). Text keys (joint attention)
         are few and unlike each other: they enter one by one, unpooled, and are summed into their
         block afterwards.
  select (dynamic plans) per query block, the fewest top blocks of P̂ covering p_remain, at least
         ⌊(1 − drop)·N⌋ of them, ∪ the static blocks (plan, 3D neighbours, text).
  GAPR   q_i·k_j = q̄·k̄ + (q_i − q̄)·k̄ + q̄·(k_j − k̄) + …; the pooled estimate of a skipped block is
         trusted only where its leading term dominates the first-order ones:
         |q̄_n·k̄_m| > |δq_n·k̄_m| + |q̄_n·δk_m|  (δ = mean absolute deviation inside the block).
  merge  comp = skipped ∧ trusted;  R_n = 1 − Σ_{m∈comp} P̂_nm;  Ō_n = Σ_{m∈comp} P̂_nm·v̄_m;
         O = R_n·O_sparse + Ō_n.

`rows=True` estimates P̂, GAPR, R and Ō per query row (keys still pooled): 1/B of dense cost
instead of 1/B² — finer, and measurably so or not (benchmarks/bench_rectify.py).
Pooled means count only real tokens: the last block may be partial and padding never enters a mean.
Key-padding masks (`key_valid`) exclude keys everywhere: from the pooled means, the counts c_m and
the text keys.

The site runtime (site.py) calls `choose` and `merge_blocks`; the Triton kernels (pool_triton.py,
estimate_triton.py, select_triton.py) compute the same where they apply, the torch code here
elsewhere (and is their reference).
"""
from __future__ import annotations

import math

import torch
import triton

from .compiled import compiled
from .estimate_triton import estimate_static_triton, video_key_counts
from .fp8 import quantize_tiles
from .pool_triton import block_pool_qkv_triton, tile_pool_qkv_triton, tile_quant_qkv_triton
from .select_triton import MAX_BLOCKS, select_blocks_triton
from .triton_sparse import HEAD_DIMS, triton_available


def block_pool(x: torch.Tensor, n_valid: int, block_size: int, key_valid: torch.Tensor | None = None):
    """Mean and mean absolute deviation of x `[B, H, S, D]` over the first `n_valid` tokens of each
    block that `key_valid` (bool `[B or 1, S]`) keeps (zeros for a block with none): the reference
    and CPU path of pool_triton."""
    B, H, S, D = x.shape
    nb = -(-S // block_size)
    pad = nb * block_size - S
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    xb = torch.nn.functional.pad(x, (0, 0, 0, pad)).view(B, H, nb, block_size, D)
    w = (torch.arange(nb * block_size, device=x.device) < n_valid)[None]
    if key_valid is not None:
        w = w & torch.nn.functional.pad(key_valid.to(x.device, torch.bool), (0, pad))
    w = w.to(x.dtype).view(w.shape[0], 1, nb, block_size, 1)
    count = w.sum(3).clamp(min=1)
    mean = (xb * w).sum(3) / count
    mad = ((xb - mean[:, :, :, None]).abs() * w).sum(3) / count
    return mean, mad


def triton_shapes(q, k, v) -> bool:
    """q, k, v as the pooling, estimate and choice kernels take them: one shape, a head dim of
    HEAD_DIMS (powers of two), contiguous rows."""
    return q.shape == k.shape == v.shape and q.shape[-1] in HEAD_DIMS and all(x.stride(-1) == 1 for x in (q, k, v))


def _pool_on_gpu(q, k, v) -> bool:
    return q.device.type == "cuda" and q.dtype != torch.float64 and triton_shapes(q, k, v)


def pooled(q, k, v, n_video: int, block_size: int, key_valid=None):
    """q̄, δq over all tokens; k̄, δk, v̄ over the valid video keys (text keys are never pooled)."""
    if _pool_on_gpu(q, k, v):
        return block_pool_qkv_triton(q, k, v, n_video, block_size, key_valid=key_valid)
    (qm, qd), (km, kd), (vm, _) = (block_pool(x, n, block_size, mask) for x, n, mask in
                                   ((q, q.shape[-2], None), (k, n_video, key_valid), (v, n_video, key_valid)))
    return qm, qd, km, kd, vm


def tile_pooled(q, k, v, src, n_video: int, block_size: int, key_valid=None):
    """((q, k, v) gathered into tile order (row p = model row src[p]), their `pooled` statistics):
    on the GPU one pass over each tensor, so the pooling costs little beyond the reorder itself.
    `key_valid` is in tile order."""
    if _pool_on_gpu(q, k, v):
        return tile_pool_qkv_triton(q, k, v, src, n_video, block_size, key_valid=key_valid)
    tiled = tuple(x.index_select(-2, src) for x in (q, k, v))
    return tiled, pooled(*tiled, n_video, block_size, key_valid)


def tile_quantized(q, k, v, src, k_mean, v_amax, n_video: int, block_size: int, pool: bool, key_valid=None):
    """(`fp8.FP8Tiles` of q, k, v gathered into tile order, their `pooled` statistics where `pool`,
    else None): tile_pooled for FP8 attention, its tiles in e4m3 (one pass on the GPU)."""
    if _pool_on_gpu(q, k, v):
        return tile_quant_qkv_triton(q, k, v, src, k_mean, v_amax, n_video, block_size, pool, key_valid=key_valid)
    tiled = tuple(x.index_select(-2, src) for x in (q, k, v))
    return (quantize_tiles(*tiled, k_mean, v_amax, block_size),
            pooled(*tiled, n_video, block_size, key_valid) if pool else None)


def valid_counts(video_count: torch.Tensor, n_video: int, block_size: int, key_valid: torch.Tensor | None):
    """Valid video keys per key block: `[nk]` without a key mask, else `[B or 1, 1, 1, nk]` float32."""
    if key_valid is None:
        return video_count
    return video_key_counts(key_valid, n_video, block_size, video_count.shape[-1])[:, None, None, :]


def _estimate(pools, q, k_text, static, video_count, text_block, scale: float, block_size: int,
              dynamic: bool, rectify: bool, rows: bool, p_remain: float, k_min: int, text_valid=None):
    """keep `[B, H, nq, nk]` bool, and (if rectify) R `[B, H, nq|S]`, Ō `[B, H, nq|S, D]`, in float32
    (float64 for float64 inputs). `pools` from `pooled`; q is used only per row. `video_count` from
    `valid_counts`; `text_valid` bool `[B, n_text]` excludes text keys."""
    q_mean, q_mad, k_mean, k_mad, v_mean = pools
    nb = q_mean.shape[-2]
    k_text = k_text.to(q_mean.dtype)
    log_count = torch.where(video_count > 0, video_count.to(q_mean.dtype).clamp(min=1).log(), -math.inf)

    def block_probs(qx):  # P̂ over key blocks for queries qx [B, H, n, D] (block means or rows)
        video = (qx @ k_mean.transpose(-1, -2)) * scale + log_count
        text = (qx @ k_text.transpose(-1, -2)) * scale
        if text_valid is not None:
            text = text.masked_fill(~text_valid[:, None, None, :], -math.inf)
        p = torch.cat([video, text], -1).softmax(-1).nan_to_num(0.0)   # every key masked: nothing to estimate
        return p[..., :nb].index_add(-1, text_block, p[..., nb:])

    p_block = block_probs(q_mean)
    keep = static.expand(p_block.shape).clone()
    if dynamic:
        p_sorted, order = p_block.sort(-1, descending=True)
        covering = 1 + (p_sorted.cumsum(-1) <= p_remain).sum(-1, keepdim=True)
        chosen = torch.arange(nb, device=keep.device) < covering.clamp(min=k_min)
        keep |= torch.zeros_like(keep).scatter(-1, order, chosen.expand(keep.shape))
    if not rectify:
        return keep, None, None
    video_key = video_count > 0
    if rows:
        q = q.to(q_mean.dtype)
        p = block_probs(q)
        gain = (q @ k_mean.transpose(-1, -2)).abs()
        error = (q @ k_mad.transpose(-1, -2)).abs()
        skipped = (~keep).repeat_interleave(block_size, -2)[..., :q.shape[-2], :]
    else:
        p = p_block
        gain = (q_mean @ k_mean.transpose(-1, -2)).abs()
        error = (q_mad @ k_mean.transpose(-1, -2)).abs() + (q_mean @ k_mad.transpose(-1, -2)).abs()
        skipped = ~keep
    comp = (skipped & (gain > error) & video_key).to(p.dtype)
    r = 1 - (p * comp).sum(-1)
    o_bar = (p * comp) @ v_mean
    return keep, r, o_bar


def merge_blocks(o, r, o_bar, block_size: int):
    """R·O + Ō in o's dtype, R and Ō per query block (or per row)."""
    if r.shape[-1] != o.shape[-2]:  # per query block: broadcast to its rows
        r = r.repeat_interleave(block_size, -1)[..., : o.shape[-2]]
        o_bar = o_bar.repeat_interleave(block_size, -2)[..., : o.shape[-2], :]
    return (r[..., None] * o.to(r.dtype) + o_bar).to(o.dtype)


estimate, merge = compiled(_estimate, eager_on_cpu=True), compiled(merge_blocks, eager_on_cpu=True)


def on_triton(q, k, v, *, rows: bool, rectify: bool, dynamic: bool, text_kept: bool, n_blocks: int,
              explicit_triton: bool) -> bool:
    """Whether the choice and the estimate run as Triton kernels (select_triton.py,
    estimate_triton.py) rather than as torch code compiled by Inductor. The estimate counts text
    keys in the normaliser only, so it needs the blocks holding them kept."""
    return (not rows and (text_kept or not rectify) and q.dtype != torch.float64
            and triton_shapes(q, k, v) and triton_available(q.device)
            and (q.device.type == "cuda" or explicit_triton)
            and (not dynamic or triton.next_power_of_2(n_blocks) <= MAX_BLOCKS))


def choose_triton(pools, k, static_i8, n_video: int, scale: float, block_size: int, *, dynamic: bool,
                  rectify: bool, p_remain: float, k_min: int, key_valid=None):
    """(keep, its block lists or None, R, Ō) from the Triton kernels; keep is int8, `[H or 1, nq, nk]`
    for static plans (the estimate broadcasts it). `key_valid` (bool `[B or 1, S]`, tile order)
    excludes keys from both."""
    lists = None
    keep = static_i8
    if dynamic:
        keep, *lists = select_blocks_triton(pools[0], pools[2], k, static_i8, n_video, scale, block_size,
                                            p_remain, k_min, key_valid=key_valid)
    r, o_bar = (estimate_static_triton(pools, k, keep, n_video, scale, block_size, key_valid=key_valid)
                if rectify else (None, None))
    return keep, lists, r, o_bar
