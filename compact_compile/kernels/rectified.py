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
"""
from __future__ import annotations

import math

import torch
import triton

from ..layout import TokenLayout
from .compiled import compiled
from .flex import block_mask, block_mask_from_lists, flex, kv_block_lists
from .estimate_triton import estimate_static_triton
from .pool_triton import block_pool_qkv_triton, tile_pool_qkv_triton
from .select_triton import MAX_BLOCKS, select_blocks_triton
from .triton_sparse import HEAD_DIMS, block_sparse_attention, triton_available


def block_pool(x: torch.Tensor, n_valid: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and mean absolute deviation of x `[B, H, S, D]` over the first `n_valid` tokens of each
    block (zeros for a block with none): the reference and CPU path of pool_triton."""
    B, H, S, D = x.shape
    nb = -(-S // block_size)
    pad = nb * block_size - S
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    xb = torch.nn.functional.pad(x, (0, 0, 0, pad)).view(B, H, nb, block_size, D)
    w = (torch.arange(nb * block_size, device=x.device) < n_valid).to(x.dtype).view(nb, block_size, 1)
    count = w.sum(1).clamp(min=1)
    mean = (xb * w).sum(3) / count
    mad = ((xb - mean[:, :, :, None]).abs() * w).sum(3) / count
    return mean, mad


def _triton_shapes(q, k, v) -> bool:
    """q, k, v as the pooling, estimate and choice kernels take them: one shape, a head dim of
    HEAD_DIMS (powers of two), contiguous rows."""
    return q.shape == k.shape == v.shape and q.shape[-1] in HEAD_DIMS and all(x.stride(-1) == 1 for x in (q, k, v))


def _pool_on_gpu(q, k, v) -> bool:
    return q.device.type == "cuda" and q.dtype != torch.float64 and _triton_shapes(q, k, v)


def pooled(q, k, v, n_video: int, block_size: int):
    """q̄, δq over all tokens; k̄, δk, v̄ over video tokens (text keys are never pooled)."""
    if _pool_on_gpu(q, k, v):
        return block_pool_qkv_triton(q, k, v, n_video, block_size)
    (qm, qd), (km, kd), (vm, _) = (block_pool(x, n, block_size) for x, n in
                                   ((q, q.shape[-2]), (k, n_video), (v, n_video)))
    return qm, qd, km, kd, vm


def tile_pooled(q, k, v, src, n_video: int, block_size: int):
    """((q, k, v) gathered into tile order (row p = model row src[p]), their `pooled` statistics):
    on the GPU one pass over each tensor, so the pooling costs little beyond the reorder itself."""
    if _pool_on_gpu(q, k, v):
        return tile_pool_qkv_triton(q, k, v, src, n_video, block_size)
    tiled = tuple(x.index_select(-2, src) for x in (q, k, v))
    return tiled, pooled(*tiled, n_video, block_size)


def _estimate(pools, q, k_text, static, video_count, text_block, scale: float, block_size: int,
              dynamic: bool, rectify: bool, rows: bool, p_remain: float, k_min: int):
    """keep `[B, H, nq, nk]` bool, and (if rectify) R `[B, H, nq|S]`, Ō `[B, H, nq|S, D]`, in float32
    (float64 for float64 inputs). `pools` from `pooled`; q is used only per row."""
    q_mean, q_mad, k_mean, k_mad, v_mean = pools
    nb = q_mean.shape[-2]
    k_text = k_text.to(q_mean.dtype)
    log_count = torch.where(video_count > 0, video_count.to(q_mean.dtype).clamp(min=1).log(), -math.inf)

    def block_probs(qx):  # P̂ over key blocks for queries qx [B, H, n, D] (block means or rows)
        video = (qx @ k_mean.transpose(-1, -2)) * scale + log_count
        text = (qx @ k_text.transpose(-1, -2)) * scale
        p = torch.cat([video, text], -1).softmax(-1)
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


class RectifiedSparse:
    """A site kernel: block-sparse attention over `static` blocks (∪ online choices if `dynamic`),
    rectified unless `rectify` is False."""

    def __init__(self, layout: TokenLayout, static: torch.Tensor, *, dynamic: bool, rectify: bool,
                 rows: bool = False, p_remain: float = 0.3, drop: float = 0.9, kernel: str = "flex"):
        self.layout, self.static, self.kernel = layout, static.bool(), kernel
        self.dynamic, self.rectify, self.rows, self.p_remain, self.drop = dynamic, rectify, rows, p_remain, drop
        bs, nb = layout.block_size, layout.n_blocks
        pos = torch.arange(nb * bs)
        self.video_count = ((pos < layout.n_video).view(nb, bs).sum(1)).float()
        self.text_block = torch.arange(layout.n_video, layout.seq_len) // bs
        self.k_min = math.floor((1 - drop) * nb)
        # the Triton estimate (estimate_triton.py) counts text keys in the normaliser only: the blocks
        # holding them must be kept
        self.text_kept = bool(self.static[..., self.text_block.unique()].all())
        self._device_data: dict[torch.device, tuple] = {}
        self._static_lists: dict[torch.device, tuple] = {}

    def _data(self, device):
        if device not in self._device_data:
            static = self.static.to(device)
            self._device_data[device] = (static, self.video_count.to(device), self.text_block.to(device),
                                         None if self.dynamic else block_mask(static[None], self.layout.seq_len,
                                                                              self.layout.block_size),
                                         static.to(torch.int8))   # as the Triton estimate reads it
        return self._device_data[device]

    pooled_inputs = True   # the rewrite may hand over (q̄, δq, k̄, δk, v̄), pooled with the reorder

    def estimate(self, q, k, v, scale: float | None = None, pools=None):
        """(keep `[B, H, nq, nk]`, R, Ō) for these inputs; R and Ō are None without rectification.
        `pools`: `pooled(q, k, v, …)` if already computed."""
        keep, _, r, o_bar = self._choose(q, k, v, scale, pools)
        return keep.bool().expand(q.shape[0], q.shape[1], -1, -1), r, o_bar

    def _on_triton(self, q, k, v) -> bool:
        """Whether the choice and the estimate run as Triton kernels (select_triton.py,
        estimate_triton.py) rather than as torch code compiled by Inductor. The estimate counts text
        keys in the normaliser only, so it needs the blocks holding them kept."""
        return (not self.rows and (self.text_kept or not self.rectify) and q.dtype != torch.float64
                and _triton_shapes(q, k, v) and triton_available(q.device)
                and (q.device.type == "cuda" or self.kernel == "triton")
                and (not self.dynamic or triton.next_power_of_2(self.layout.n_blocks) <= MAX_BLOCKS))

    def _choose(self, q, k, v, scale, pools):
        """(keep, its block lists (kv_num, kv_indices) `[B, H, …]` or None, R, Ō)."""
        L = self.layout
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        static, video_count, text_block, _, static_i8 = self._data(q.device)
        pools = pooled(q, k, v, L.n_video, L.block_size) if pools is None else pools
        if not self._on_triton(q, k, v):
            keep, r, o_bar = estimate(pools, q if self.rows else None, k[:, :, L.n_video:], static, video_count,
                                      text_block, scale, L.block_size, self.dynamic, self.rectify, self.rows,
                                      self.p_remain, self.k_min)
            return keep, None, r, o_bar
        lists = None
        if self.dynamic:
            keep, *lists = select_blocks_triton(pools[0], pools[2], k, static_i8, L.n_video, scale, L.block_size,
                                                self.p_remain, self.k_min)
        else:
            keep = static_i8            # [H or 1, nq, nk]: the estimate broadcasts it
        r, o_bar = (estimate_static_triton(pools, k, keep, L.n_video, scale, L.block_size) if self.rectify
                    else (None, None))
        return keep, lists, r, o_bar

    @property
    def merges_outside(self) -> bool:
        """Whether a rewritten graph should call `parts` and merge R·O + Ō itself: FlexAttention has
        no epilogue for it (per block only: per-row R, Ō have a shape of their own)."""
        return self.kernel != "triton" and self.rectify and not self.rows

    def parts(self, q, k, v, scale: float | None = None, pools=None):
        """(O over the kept blocks by FlexAttention, R, Ō): the output is merge_blocks(O, R, Ō)
        (R, Ō are None without rectification)."""
        L = self.layout
        keep, lists, r, o_bar = self._choose(q, k, v, scale, pools)
        bm = self._data(q.device)[3]
        if bm is None:
            bm = (block_mask_from_lists(*lists, L.seq_len, L.block_size) if lists is not None and q.is_cuda
                  else block_mask(keep.bool(), L.seq_len, L.block_size))
        return flex(q, k, v, block_mask=bm, scale=scale), r, o_bar

    def __call__(self, q, k, v, scale: float | None = None, pools=None) -> torch.Tensor:
        L = self.layout
        if self.kernel != "triton":
            o, r, o_bar = self.parts(q, k, v, scale, pools)
            return merge(o, r, o_bar, L.block_size) if self.rectify else o
        keep, lists, r, o_bar = self._choose(q, k, v, scale, pools)
        fused = (r, o_bar) if self.rectify and not self.rows else None   # R·O + Ō in the kernel's epilogue
        o = self._triton(q, k, v, keep, lists, scale, fused)
        return merge(o, r, o_bar, L.block_size) if self.rows else o

    def _triton(self, q, k, v, keep, lists, scale, rectify):
        """A static plan's block lists serve the whole batch in one launch; a dynamic plan's choice
        (its `lists`, else made from `keep`) differs per batch element: one launch each, written into
        one output."""
        bs = self.layout.block_size
        if not self.dynamic:
            return block_sparse_attention(q, k, v, *self._lists(q.device), bs, scale, rectify=rectify)
        out = q.new_empty(q.shape)
        for b in range(q.shape[0]):
            part = None if rectify is None else (rectify[0][b:b + 1], rectify[1][b:b + 1])
            num, idx = (lists[0][b], lists[1][b]) if lists is not None else kv_block_lists(keep[b].bool())
            block_sparse_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], num, idx, bs, scale,
                                   rectify=part, out=out[b:b + 1])
        return out

    def _lists(self, device):
        if device not in self._static_lists:
            self._static_lists[device] = kv_block_lists(self.static.to(device))
        return self._static_lists[device]
