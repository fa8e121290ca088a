"""Token layout: where each video token goes so that every attention block is a spacetime cube.

diffusers flattens the patchified latent in raster order (t, h, w). A 128-token block of raster
order is a sliver of one or two frame rows, so a 3D-local mask would need almost every block. We
reorder tokens into tiles of `tile = (tt, th, tw)` tokens (tt·th·tw = block size), so that each block
of the reordered sequence is one tile.

Grids rarely divide by the tile (Wan 480p is 21×30×52). No padding: the grid is cut into the region
covered by whole tiles, `[0,Tf)×[0,Hf)×[0,Wf)` with `Tf = T − T mod tt` etc., which comes first, one
block per tile, then the three leftover slabs of partial tiles (t ≥ Tf; t < Tf ∧ h ≥ Hf;
t < Tf ∧ h < Hf ∧ w ≥ Wf), each in tile-raster order. Partial tiles share blocks, but they are
neighbours, so those blocks stay compact.

In joint text+video attention the other tokens (text, history frames…; `n_before` of them before
the video in the model's sequence, the rest after it) are moved after the video tokens, in their
order, so that video blocks start on a block boundary; their blocks are always computed densely.

The map is plain integer arithmetic on `arange`, computed once per layout and device; the rewritten
graph loads it as an index (kernels/ops.py `tile_index`).
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch

Grid = tuple[int, int, int]


@dataclass(frozen=True)
class TokenLayout:
    grid: Grid                 # (T, H, W) video tokens
    tile: Grid                 # (tt, th, tw)
    block_size: int
    n_text: int = 0            # joint attention: other tokens (text, history frames…) besides the video's
    n_before: int = 0          # how many of them come before the video tokens in the model's sequence

    def __post_init__(self):
        if isinstance(self.n_before, bool) or not 0 <= self.n_before <= self.n_text:
            raise ValueError(f"n_before must be an int in [0, n_text = {self.n_text}]; got {self.n_before!r}")

    @property
    def n_video(self) -> int:
        return math.prod(self.grid)

    @property
    def seq_len(self) -> int:
        return self.n_video + self.n_text

    @property
    def n_blocks(self) -> int:
        return -(-self.seq_len // self.block_size)

    @property
    def tile_grid(self) -> Grid:
        return tuple(-(-g // t) for g, t in zip(self.grid, self.tile))

    def source_index(self, device=None) -> torch.Tensor:
        """`src[p]` = position in the model's sequence of the token at tiled position `p`."""
        p = torch.arange(self.seq_len, device=device)
        video = _video_source(p, self.grid, self.tile)
        if not self.n_text:
            return video
        other = p - self.n_video                                    # the others keep their order
        other = torch.where(other < self.n_before, other, other + self.n_video)
        return torch.where(p < self.n_video, video + self.n_before, other)

    def target_index(self, device=None) -> torch.Tensor:
        """Inverse of `source_index`: tiled position of each token of the model's sequence."""
        src = self.source_index(device)
        return torch.empty_like(src).index_put_((src,), torch.arange(self.seq_len, device=device))

    def block_tiles(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Incidence of blocks and tiles: bool `[n_blocks, n_tiles]`, and whether a block holds text."""
        src = self.source_index()
        block = torch.arange(self.seq_len) // self.block_size
        is_video = torch.arange(self.seq_len) < self.n_video
        T, H, W = self.grid
        raster = src[is_video] - self.n_before
        t, h, w = raster // (H * W), raster // W % H, raster % W
        _, nth, ntw = self.tile_grid
        tile_id = (t // self.tile[0] * nth + h // self.tile[1]) * ntw + w // self.tile[2]
        incidence = torch.zeros(self.n_blocks, math.prod(self.tile_grid), dtype=torch.bool)
        incidence[block[is_video], tile_id] = True
        has_text = torch.zeros(self.n_blocks, dtype=torch.bool)
        has_text[block[~is_video]] = True
        return incidence, has_text


@functools.cache
def tile_index(layout: TokenLayout, device: torch.device, inverse: bool = False) -> torch.Tensor:
    """The layout's `source_index` (or `target_index`) on `device`, computed once per layout and device."""
    return (layout.target_index if inverse else layout.source_index)(device)


def _video_source(p: torch.Tensor, grid: Grid, tile: Grid) -> torch.Tensor:
    """Raster index of the video token at tiled position `p` (see the module docstring)."""
    T, H, W = grid
    Tf, Hf, Wf = (g - g % t for g, t in zip(grid, tile))
    boxes = [  # (origin, extent) of the whole-tile region, then the three leftover slabs
        ((0, 0, 0), (Tf, Hf, Wf)),
        ((Tf, 0, 0), (T - Tf, H, W)),
        ((0, Hf, 0), (Tf, H - Hf, W)),
        ((0, 0, Wf), (Tf, Hf, W - Wf)),
    ]
    out = torch.zeros_like(p)
    start = 0
    for origin, extent in boxes:
        size = math.prod(extent)
        if size == 0:
            continue
        local = (p - start).clamp(0, size - 1)
        t, h, w = _tiled_to_coords(local, extent, tile)
        raster = ((t + origin[0]) * H + h + origin[1]) * W + w + origin[2]
        out = torch.where((p >= start) & (p < start + size), raster, out)
        start += size
    return out


def _tiled_to_coords(p: torch.Tensor, extent: Grid, tile: Grid):
    """Coordinates in a box of `extent` tokens laid out tile by tile (tile raster, then raster
    inside the tile); tiles at the far edge of each axis may be partial.

    All tile slabs before slab a along t hold a·tt·E_h·E_w tokens, so a = p // (tt·E_h·E_w); the
    same argument inside the slab (height st) gives b, then c inside the row of tiles.
    """
    (Et, Eh, Ew), (tt, th, tw) = extent, tile
    a = p // (tt * Eh * Ew)
    p = p - a * tt * Eh * Ew
    st = torch.clamp(Et - a * tt, max=tt)
    b = p // (st * th * Ew)
    p = p - b * st * th * Ew
    sh = torch.clamp(Eh - b * th, max=th)
    c = p // (st * sh * tw)
    p = p - c * st * sh * tw
    sw = torch.clamp(Ew - c * tw, max=tw)
    lt, lh, lw = p // (sh * sw), p // sw % sh, p % sw
    return a * tt + lt, b * th + lh, c * tw + lw


def auto_tile(grid: Grid, block_size: int) -> Grid:
    """The power-of-two tile of `block_size` tokens that leaves the fewest tokens in partial tiles
    (ties: the most cube-like). Only compact tiles are considered: at most 4 frames deep, spatial
    sides of at least 4 tokens and at most 4× each other."""
    k = block_size.bit_length() - 1
    best, best_key = None, None
    for et, eh in itertools.product(range(k + 1), repeat=2):
        ew = k - et - eh
        if ew < 0:
            continue
        tile = (1 << et, 1 << eh, 1 << ew)
        if (any(t > g for t, g in zip(tile, grid)) or tile[0] > 4 or min(tile[1:]) < 4
                or max(tile[1:]) > 4 * min(tile[1:])):
            continue
        covered = math.prod(g - g % t for g, t in zip(grid, tile)) / math.prod(grid)
        key = (covered, -(max(tile) - min(tile)))
        if best_key is None or key > best_key:
            best, best_key = tile, key
    if best is None:  # grid smaller than any compact tile: flat tiles, as many rows as fit (power of two)
        th = 1 << (min(grid[1], block_size).bit_length() - 1)
        best = (1, th, block_size // th)
    return best
