"""Block masks: which key blocks each query block attends to, as bool `[n_blocks, n_blocks]` maps.

Small functions of a `TokenLayout`, composed with `|` and `&`, in the spirit of attn-gym. Blocks are
those of the tiled sequence (see layout.py). `compact-compile plot` draws any of them.

    window_blocks(layout, (3, 3, 3))        each tile sees the 3×3×3 tiles around it
    text_blocks(layout)                     rows and columns of blocks that hold text tokens
"""
from __future__ import annotations

import itertools

import torch

from .layout import TokenLayout


def dense_blocks(layout: TokenLayout) -> torch.Tensor:
    return torch.ones(layout.n_blocks, layout.n_blocks, dtype=torch.bool)


def text_blocks(layout: TokenLayout) -> torch.Tensor:
    """Blocks with a text query or a text key: always computed (text attends to and is seen by all)."""
    _, has_text = layout.block_tiles()
    return has_text[:, None] | has_text[None, :]


def window_blocks(layout: TokenLayout, window: tuple[int, int, int]) -> torch.Tensor:
    """Key block m is kept for query block n when some tile of m lies within the window centred on
    some tile of n: |Δt|, |Δh|, |Δw| ≤ window // 2 in tile units (STA's sliding tile window)."""
    incidence, _ = layout.block_tiles()
    nt, nh, nw = layout.tile_grid
    ids = torch.arange(nt * nh * nw)
    coords = torch.stack([ids // (nh * nw), ids // nw % nh, ids % nw], -1)
    radius = torch.tensor(window) // 2
    near = ((coords[:, None] - coords[None, :]).abs() <= radius).all(-1)
    inc = incidence.float()
    return (inc @ near.float() @ inc.T) > 0


def neighbour_blocks(layout: TokenLayout) -> torch.Tensor:
    """Key block m is kept for query block n when a token of m touches a token of n (one of its 26
    spacetime neighbours, or itself): the blocks a local head can never do without."""
    T, H, W = layout.grid
    src = layout.source_index()[: layout.n_video] - layout.n_before
    block_of = torch.empty(layout.n_video, dtype=torch.long)
    block_of[src] = torch.arange(layout.n_video) // layout.block_size  # raster token -> its block
    cube = block_of.view(T, H, W)
    out = torch.zeros(layout.n_blocks, layout.n_blocks, dtype=torch.bool)
    for dt, dh, dw in itertools.product((-1, 0, 1), repeat=3):
        a = cube[max(dt, 0):T + min(dt, 0), max(dh, 0):H + min(dh, 0), max(dw, 0):W + min(dw, 0)]
        b = cube[max(-dt, 0):T + min(-dt, 0), max(-dh, 0):H + min(-dh, 0), max(-dw, 0):W + min(-dw, 0)]
        out[a.flatten(), b.flatten()] = True
    return out


def video_site_blocks(layout: TokenLayout, video: torch.Tensor) -> torch.Tensor:
    """A video block map completed with dense text rows and columns (no-op without text)."""
    return video | text_blocks(layout) if layout.n_text else video


def density(blocks: torch.Tensor) -> float:
    """Fraction of (query block, key block) pairs computed."""
    return blocks.float().mean().item()
