"""`torch.ops.compact.*`: the ops every rewritten attention site calls.

Opaque to Inductor (extern calls), so whatever runs inside (FlashAttention-4, our Triton kernel, a
compiled FlexAttention) is chosen at run time. Each site's runtime (site.py) lives in a process-wide
table; the graph carries only the integer handle.
q, k, v arrive in tiled token order (layout.py); the output is in the same order, contiguous.
`torch.ops.compact.tile_index` gives the graph the index of that order; `torch.ops.compact.tile_pool`
does the reorder and rectification's block pooling in one pass; `torch.ops.compact.tile_quant` the
same with q, k, v written as e4m3 tiles (fp8.py) for `torch.ops.compact.attention_fp8`.
"""
from __future__ import annotations

import itertools

import torch

from ..layout import TokenLayout, tile_index as cached_tile_index
from ..schedule import CLOCK
from ..spec import SiteSpec
from .fp8 import FP8Tiles, padded_rows
from .rectified import tile_pooled, tile_quantized
from .site import SiteKernel

_SITES: dict[int, SiteKernel] = {}
_SPECS: dict[int, SiteSpec] = {}     # of the sites that have one (their runtime may be an observer's wrapper)
_next_handle = itertools.count()


def register_site(site: SiteKernel, spec: SiteSpec | None = None) -> int:
    handle = next(_next_handle)
    _SITES[handle] = site
    if spec is not None:
        _SPECS[handle] = spec
    return handle


def site_kernel(handle: int) -> SiteKernel:
    return _SITES[handle]


@torch.library.custom_op("compact::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, handle: int, scale: float | None,
              pools: list[torch.Tensor], key_valid: torch.Tensor | None) -> torch.Tensor:
    """`pools`: (q̄, δq, k̄, δk, v̄) from `tile_pool` where the site's spec is pooled, else [];
    `key_valid`: bool `[B, S]` in tile order where it has a key-padding mask, else None."""
    return _SITES[handle](q, k, v, scale, pools or None, key_valid).contiguous()


@attention.register_fake
def _(q, k, v, handle, scale, pools, key_valid):
    return q.new_empty(q.shape[:-1] + v.shape[-1:])


@torch.library.custom_op("compact::attention_parts", mutates_args=())
def attention_parts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, handle: int, scale: float | None,
                    pools: list[torch.Tensor], key_valid: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(O_sparse, R `[B, H, nq]`, Ō `[B, H, nq, Dv]`) of a site whose spec merges in the graph: the
    graph computes R·O + Ō itself, where Inductor fuses it into the reorder back to model order."""
    o, r, o_bar = _SITES[handle].parts(q, k, v, scale, pools, key_valid)
    return o.contiguous(), r.contiguous(), o_bar.contiguous()


@attention_parts.register_fake
def _(q, k, v, handle, scale, pools, key_valid):
    B, H, nq = pools[0].shape[:3]
    return (q.new_empty(q.shape[:-1] + v.shape[-1:]), q.new_empty(B, H, nq, dtype=torch.float32),
            q.new_empty(B, H, nq, v.shape[-1], dtype=torch.float32))


@torch.library.custom_op("compact::attention_fp8", mutates_args=())
def attention_fp8(q: torch.Tensor, k: torch.Tensor, v_t: torch.Tensor, scales: list[torch.Tensor],
                  unquantized: list[torch.Tensor], handle: int, scale: float | None, pools: list[torch.Tensor],
                  key_valid: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """`attention` of a site whose spec is fp8, over the tiles of `tile_quant`: q, k, vᵀ in e4m3 and
    `scales` (q's, k's, v's, k's mean); `unquantized`: q, k, v as the graph made them (model order),
    for the dense steps; the output in `dtype`, in tile order."""
    tiles = FP8Tiles(q, k, v_t, *scales)
    return _SITES[handle].fp8(tiles, scale, pools or None, key_valid, dtype, tuple(unquantized)).contiguous()


@attention_fp8.register_fake
def _(q, k, v_t, scales, unquantized, handle, scale, pools, key_valid, dtype):
    return q.new_empty(q.shape, dtype=dtype)


@torch.library.custom_op("compact::model_masked_attention", mutates_args=())
def model_masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, handle: int, scale: float,
                           kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
                           full_kv_num_blocks: torch.Tensor | None, full_kv_indices: torch.Tensor | None,
                           score_buffers: list[torch.Tensor], mask_buffers: list[torch.Tensor]) -> torch.Tensor:
    """A rewritten flex_attention site (kernels/model_mask.py): q, k, v in tile order; the model's
    BlockMask lists and the tensors its score_mod and mask_mod captured, as the model made them for
    this call (model token order)."""
    return _SITES[handle](q, k, v, scale, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                          score_buffers, mask_buffers).contiguous()


@model_masked_attention.register_fake
def _(q, k, v, handle, scale, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, score_buffers,
      mask_buffers):
    return q.new_empty(q.shape[:-1] + v.shape[-1:])


@torch.library.custom_op("compact::tile_index", mutates_args=())
def tile_index(like: torch.Tensor, grid: list[int], tile: list[int], block_size: int, n_text: int,
               n_before: int, inverse: bool) -> torch.Tensor:
    """The layout's `source_index` (or `target_index`), on `like`'s device. An op rather than
    arithmetic in the graph: Inductor's index simplification cannot digest the piecewise map, and
    a loaded index is cheaper than integer division per element anyway."""
    layout = TokenLayout(tuple(grid), tuple(tile), block_size, n_text, n_before)
    return cached_tile_index(layout, like.device, inverse).clone()


@tile_index.register_fake
def _(like, grid, tile, block_size, n_text, n_before, inverse):
    n = grid[0] * grid[1] * grid[2] + n_text
    return torch.empty(n, dtype=torch.int64, device=like.device)


@torch.library.custom_op("compact::tile_pool", mutates_args=())
def tile_pool(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: list[int], tile: list[int], block_size: int,
              n_text: int, n_before: int, key_valid: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                         torch.Tensor, torch.Tensor]:
    """q, k, v in tile order (contiguous) and their block statistics (q̄, δq, k̄, δk, v̄, float32
    `[B, H, n_blocks, D]`; keys and values over valid video tokens only): `rectified.tile_pooled`."""
    layout = TokenLayout(tuple(grid), tuple(tile), block_size, n_text, n_before)
    tiled, pools = tile_pooled(q, k, v, cached_tile_index(layout, q.device, False), layout.n_video, block_size, key_valid)
    return tuple(x.contiguous() for x in tiled) + tuple(pools)


@tile_pool.register_fake
def _(q, k, v, grid, tile, block_size, n_text, n_before, key_valid):
    B, H, S, _ = q.shape
    nb = -(-S // block_size)
    stats = [x.new_empty(B, H, nb, x.shape[-1], dtype=torch.float32) for x in (q, q, k, k, v)]
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), *stats)


@torch.library.custom_op("compact::tile_quant", mutates_args=())
def tile_quant(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_mean: torch.Tensor, v_amax: torch.Tensor,
               grid: list[int], tile: list[int], block_size: int, n_text: int, n_before: int,
               key_valid: torch.Tensor | None, pool: bool, handle: int) -> list[torch.Tensor]:
    """q, k, v in tile order as e4m3 tiles with their scales (the fields of `fp8.FP8Tiles` but
    k_mean, which the graph has), and where `pool` their block statistics as `tile_pool`'s:
    `rectified.tile_quantized`, one pass over q, k, v. At a step where site `handle` runs dense
    (the warm-up reads q, k, v unquantized) the outputs are allocated, not written: no pass."""
    if _SPECS[handle].range_index(CLOCK.current) is None:
        return _unwritten_tiles(q, block_size, pool)
    layout = TokenLayout(tuple(grid), tuple(tile), block_size, n_text, n_before)
    tiles, pools = tile_quantized(q, k, v, cached_tile_index(layout, q.device, False), k_mean, v_amax, layout.n_video,
                                  block_size, pool, key_valid)
    return [x.contiguous() for x in tiles[:6]] + list(pools or ())


@tile_quant.register_fake
def _(q, k, v, k_mean, v_amax, grid, tile, block_size, n_text, n_before, key_valid, pool, handle):
    return _unwritten_tiles(q, block_size, pool)


def _unwritten_tiles(q: torch.Tensor, block_size: int, pool: bool) -> list[torch.Tensor]:
    """Empty tensors of `tile_quant`'s outputs for q `[B, H, S, D]`."""
    B, H, S, D = q.shape
    nb = -(-S // block_size)
    fp8 = torch.float8_e4m3fn
    tiles = [q.new_empty(q.shape, dtype=fp8), q.new_empty(q.shape, dtype=fp8),
             q.new_empty(B, H, D, padded_rows(S), dtype=fp8), q.new_empty(B, H, nb, dtype=torch.float32),
             q.new_empty(B, H, nb, dtype=torch.float32), q.new_empty(B, H, D, dtype=torch.float32)]
    return tiles + ([q.new_empty(B, H, nb, D, dtype=torch.float32) for _ in range(5)] if pool else [])
