"""`torch.ops.compact.attention`: the op every rewritten attention site calls.

Opaque to Inductor (an extern call), so whatever runs inside (a compiled FlexAttention or our
Triton kernel) is chosen at run time. The site's static data (block map, kernel) lives in a
process-wide table; the graph carries only the integer handle.
q, k, v arrive in tiled token order (layout.py); the output is in the same order, contiguous.
`torch.ops.compact.tile_index` gives the graph the index of that order; `torch.ops.compact.tile_pool`
does the reorder and rectification's block pooling in one pass.
"""
from __future__ import annotations

import functools
import itertools
from typing import Callable

import torch

from ..layout import TokenLayout
from .rectified import tile_pooled

SiteKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "float | None"], torch.Tensor]

_SITES: dict[int, SiteKernel] = {}
_next_handle = itertools.count()


def register_site(kernel: SiteKernel) -> int:
    handle = next(_next_handle)
    _SITES[handle] = kernel
    return handle


def site_kernel(handle: int) -> SiteKernel:
    return _SITES[handle]


@torch.library.custom_op("compact::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, handle: int, scale: float | None,
              pools: list[torch.Tensor]) -> torch.Tensor:
    """`pools`: (q̄, δq, k̄, δk, v̄) from `tile_pool` for a site kernel with `pooled_inputs`, else []."""
    kernel = _SITES[handle]
    out = kernel(q, k, v, scale, pools) if pools else kernel(q, k, v, scale)
    return out.contiguous()


@attention.register_fake
def _(q, k, v, handle, scale, pools):
    return q.new_empty(q.shape[:-1] + v.shape[-1:])


@torch.library.custom_op("compact::attention_parts", mutates_args=())
def attention_parts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, handle: int, scale: float | None,
                    pools: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(O_sparse, R `[B, H, nq]`, Ō `[B, H, nq, Dv]`) of a site kernel with `merges_outside`: the
    graph computes R·O + Ō itself, where Inductor fuses it into the reorder back to model order."""
    o, r, o_bar = _SITES[handle].parts(q, k, v, scale, pools)
    return o.contiguous(), r.contiguous(), o_bar.contiguous()


@attention_parts.register_fake
def _(q, k, v, handle, scale, pools):
    B, H, nq = pools[0].shape[:3]
    return (q.new_empty(q.shape[:-1] + v.shape[-1:]), q.new_empty(B, H, nq, dtype=torch.float32),
            q.new_empty(B, H, nq, v.shape[-1], dtype=torch.float32))


@functools.cache
def _tile_index(layout: TokenLayout, device: torch.device, inverse: bool) -> torch.Tensor:
    return (layout.target_index if inverse else layout.source_index)(device)


@torch.library.custom_op("compact::tile_index", mutates_args=())
def tile_index(like: torch.Tensor, grid: list[int], tile: list[int], block_size: int, n_text: int,
               text_first: bool, inverse: bool) -> torch.Tensor:
    """The layout's `source_index` (or `target_index`), on `like`'s device. An op rather than
    arithmetic in the graph: Inductor's index simplification cannot digest the piecewise map, and
    a loaded index is cheaper than integer division per element anyway."""
    layout = TokenLayout(tuple(grid), tuple(tile), block_size, n_text, text_first)
    return _tile_index(layout, like.device, inverse).clone()


@tile_index.register_fake
def _(like, grid, tile, block_size, n_text, text_first, inverse):
    n = grid[0] * grid[1] * grid[2] + n_text
    return torch.empty(n, dtype=torch.int64, device=like.device)


@torch.library.custom_op("compact::tile_pool", mutates_args=())
def tile_pool(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: list[int], tile: list[int], block_size: int,
              n_text: int, text_first: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                      torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v in tile order (contiguous) and their block statistics (q̄, δq, k̄, δk, v̄, float32
    `[B, H, n_blocks, D]`; keys and values over video tokens only): `rectified.tile_pooled`."""
    layout = TokenLayout(tuple(grid), tuple(tile), block_size, n_text, text_first)
    tiled, pools = tile_pooled(q, k, v, _tile_index(layout, q.device, False), layout.n_video, block_size)
    return tuple(x.contiguous() for x in tiled) + tuple(pools)


@tile_pool.register_fake
def _(q, k, v, grid, tile, block_size, n_text, text_first):
    B, H, S, _ = q.shape
    nb = -(-S // block_size)
    stats = [x.new_empty(B, H, nb, x.shape[-1], dtype=torch.float32) for x in (q, q, k, k, v)]
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), *stats)
