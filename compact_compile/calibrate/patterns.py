"""Compact Attention's mask family, in tile units around the query tile, and its block maps.

Key tiles are grouped by their temporal distance to the query tile, Δt = |t_k − t_q| in tile
frames: `groups = (0, 1, 3)` are the groups' upper edges, giving {0}, {1}, {2, 3}, {≥ 4}. Per group
g a head keeps the union of two axis-aligned windows centred on the query tile,

    keep(q, k) = (|Δw| ≤ ω1 ∧ |Δh| ≤ η1) ∨ (|Δw| ≤ ω2 ∧ |Δh| ≤ η2)        (ω: width axis, η: height)

stored as int params `[..., G, 4] = (ω1, η1, ω2, η2)`; −1 makes a window empty, and a group with
both windows empty skips those frames. Equal windows give a box (local), a wide-short and a
narrow-tall window a cross, full windows global attention; full windows at large Δt with small ones
near give temporal patterns.

A parameter set becomes a block map of the tiled sequence (layout.py): key block m is kept for query
block n when some tile of m is kept for some tile of n (blocks of partial tiles cover several tiles,
as in masks.window_blocks), and blocks holding text are always kept (masks.text_blocks).

For the search, each video block is represented by one tile, the one holding most of its tokens
(the only one, except in the partial-tile slabs). The search's recall of a parameter set counts the
block pairs whose representatives are kept; the real block map keeps those and possibly more, so its
recall is never lower.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..layout import TokenLayout
from ..masks import text_blocks

DEFAULT_GROUPS = (0, 1, 3)
PATTERNS = ("local", "cross", "global", "temporal", "mixed")
GLOBAL_AREA = 0.85   # a window union covering ≥ 85% of the frame's tile offsets is global (paper's rule)


def checked_groups(groups) -> tuple[int, ...]:
    g = tuple(int(x) for x in groups)
    if any(b <= a for a, b in zip(g, g[1:])) or (g and g[0] < 0):
        raise ValueError(f"groups {tuple(groups)} must be increasing non-negative Δt edges, e.g. (0, 1, 3)")
    return g


@dataclass(frozen=True)
class Family:
    layout: TokenLayout
    groups: tuple[int, ...] = DEFAULT_GROUPS

    def __post_init__(self):
        object.__setattr__(self, "groups", checked_groups(self.groups))

    @property
    def n_groups(self) -> int:
        return len(self.groups) + 1

    @property
    def n_tiles(self) -> int:
        return math.prod(self.layout.tile_grid)

    def group_of(self, dt: torch.Tensor) -> torch.Tensor:
        """Group index of temporal distances Δt (edges inclusive: Δt ≤ groups[g] → g or lower)."""
        return torch.searchsorted(torch.tensor(self.groups, dtype=dt.dtype), dt.contiguous(), right=False)

    def full_params(self, heads: int) -> torch.Tensor:
        """Full attention: both windows of every group span the whole frame."""
        _, nth, ntw = self.layout.tile_grid
        return torch.tensor([ntw - 1, nth - 1, ntw - 1, nth - 1]).repeat(heads, self.n_groups, 1)

    # ---- geometry ---------------------------------------------------------------------------
    def tile_coords(self) -> torch.Tensor:
        return _tile_coords(self.layout.tile_grid)

    def tile_offsets(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(group, |Δh|, |Δw|) of every (query tile, key tile) pair, `[n_tiles, n_tiles]` each."""
        return _tile_offsets(self.layout.tile_grid, self.groups)

    def present_groups(self) -> torch.Tensor:
        """bool `[G]`: groups holding some tile pair of this layout (short videos lack far groups)."""
        return _present_groups(self.layout.tile_grid, self.groups)

    def block_representatives(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per block: the tile holding most of its video tokens (−1 for text blocks), and whether the
        block holds no text (only those are searched; text rows and columns are always kept)."""
        return _representatives(self.layout)

    # ---- realisation ------------------------------------------------------------------------
    def offset_masks(self, params: torch.Tensor) -> torch.Tensor:
        """bool `[..., G, nth, ntw]`: whether a key tile at (group, |Δh|, |Δw|) is kept."""
        _, nth, ntw = self.layout.tile_grid
        dh = torch.arange(nth)[:, None]
        dw = torch.arange(ntw)[None, :]
        p = params[..., None, None, :]
        return ((dw <= p[..., 0]) & (dh <= p[..., 1])) | ((dw <= p[..., 2]) & (dh <= p[..., 3]))

    def tile_mask(self, params: torch.Tensor) -> torch.Tensor:
        """bool `[..., n_tiles, n_tiles]`: key tile kept for query tile, per the family's rule."""
        g, dh, dw = self.tile_offsets()
        _, nth, ntw = self.layout.tile_grid
        lut = self.offset_masks(params).flatten(-3)                   # [..., G·nth·ntw]
        return lut[..., ((g * nth + dh) * ntw + dw)]

    def block_map(self, params: torch.Tensor) -> torch.Tensor:
        """bool `[H, nb, nb]` of params `[H, G, 4]`: OR over the tiles each block covers, text dense.
        The OR is a count of kept tile pairs > 0, summed over the (block, tile) incidence pairs."""
        blocks_of, tiles_of = _incidence_pairs(self.layout)
        nb = self.layout.n_blocks
        t = self.tile_mask(params).to(torch.int32)                                          # [H, nt, nt]
        rows = torch.zeros(t.shape[0], nb, t.shape[2], dtype=torch.int32).index_add_(1, blocks_of, t[:, tiles_of])
        blocks = torch.zeros(t.shape[0], nb, nb, dtype=torch.int32).index_add_(2, blocks_of, rows[:, :, tiles_of]) > 0
        if self.layout.n_text:
            blocks |= text_blocks(self.layout)
        return blocks

    # ---- description ------------------------------------------------------------------------
    def classify(self, params: torch.Tensor) -> str:
        """Pattern class of one head's params `[G, 4]`: local, cross, global, temporal or mixed."""
        _, nth, ntw = self.layout.tile_grid
        present = self.present_groups().tolist()
        shapes = [_shape(p, nth, ntw) for p, ok in zip(params.tolist(), present) if ok]
        kinds = set(shapes) - {"empty"}
        if not kinds:
            return "mixed"
        if kinds == {"global"} and "empty" not in shapes:
            return "global"
        if kinds == {"cross"}:
            return "cross"
        if kinds == {"box"}:
            # a stripe along time (small windows up to the farthest frames) or a head skipping near frames
            far = len(shapes) > 1 and shapes[-1] != "empty"
            return "temporal" if far or shapes[0] == "empty" else "local"
        return "mixed"


def _shape(p, nth: int, ntw: int) -> str:
    """empty | box | cross | global, for one group's (ω1, η1, ω2, η2)."""
    wins = [(w, h) for w, h in ((p[0], p[1]), (p[2], p[3])) if w >= 0 and h >= 0]
    if not wins:
        return "empty"
    dh, dw = torch.meshgrid(torch.arange(nth), torch.arange(ntw), indexing="ij")
    cover = torch.zeros(nth, ntw, dtype=torch.bool)
    for w, h in wins:
        cover |= (dw <= w) & (dh <= h)
    if cover.float().mean().item() >= GLOBAL_AREA:
        return "global"
    if len(wins) == 2 and (wins[0][0] - wins[1][0]) * (wins[0][1] - wins[1][1]) < 0:
        return "cross"
    return "box"


@functools.lru_cache(maxsize=64)
def _tile_coords(tile_grid) -> torch.Tensor:
    nt, nh, nw = tile_grid
    ids = torch.arange(nt * nh * nw)
    return torch.stack([ids // (nh * nw), ids // nw % nh, ids % nw], -1)


@functools.lru_cache(maxsize=64)
def _tile_offsets(tile_grid, groups) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    c = _tile_coords(tile_grid)
    d = (c[:, None] - c[None, :]).abs()
    g = torch.searchsorted(torch.tensor(groups, dtype=d.dtype), d[..., 0].contiguous(), right=False)
    return g, d[..., 1], d[..., 2]


@functools.lru_cache(maxsize=64)
def _present_groups(tile_grid, groups) -> torch.Tensor:
    g, _, _ = _tile_offsets(tile_grid, groups)
    return torch.bincount(g.flatten(), minlength=len(groups) + 1) > 0


@functools.lru_cache(maxsize=64)
def _incidence_pairs(layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(block, tile) index pairs of the block–tile incidence (a block of partial tiles covers several)."""
    incidence, _ = layout.block_tiles()
    blocks_of, tiles_of = incidence.nonzero(as_tuple=True)
    return blocks_of, tiles_of


@functools.lru_cache(maxsize=64)
def _representatives(layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
    T, H, W = layout.grid
    src = layout.source_index()
    is_video = torch.arange(layout.seq_len) < layout.n_video
    raster = src[is_video] - layout.n_before
    t, h, w = raster // (H * W), raster // W % H, raster % W
    _, nth, ntw = layout.tile_grid
    tile_id = (t // layout.tile[0] * nth + h // layout.tile[1]) * ntw + w // layout.tile[2]
    block = torch.arange(layout.seq_len)[is_video] // layout.block_size
    n_tiles = math.prod(layout.tile_grid)
    counts = torch.zeros(layout.n_blocks, n_tiles).index_put_((block, tile_id), torch.ones(len(block)),
                                                              accumulate=True)
    _, has_text = layout.block_tiles()
    rep = torch.where(counts.sum(1) > 0, counts.argmax(1), -1)
    return rep, ~has_text
