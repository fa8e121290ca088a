"""In which order the graph lays the video tokens out: raster (t, h, w), or already in tiles.

Most video DiTs flatten the (T, H, W) latent in raster order. NABLA models (Kandinsky 5 Pro,
Kandinsky 6 SR) reorder it first into 1×8×8 "fractal" tiles, so that each 64-token block of their own
flex_attention `BlockMask` is a spatial patch:

    x.reshape(B, T, 1, H/8, 8, W/8, 8, C).permute(0, 1, 3, 5, 2, 4, 6, 7).flatten(1, 3).flatten(2, 4).flatten(1, 2)

The sequence is then the tiled order of a `TokenLayout(grid, tile=(1, 8, 8))`: its token i is raster
token `layout.source_index()[i]`. A plan's blocks mean 3D windows over the grid, so a site over such
tokens must be reordered from that order, not from raster.

How it is read: from every chain of pure layout ops (view, reshape, flatten, unflatten, permute,
transpose, contiguous) that turns three dims (T, H, W) into one token dim, leaving the dims before
(batch) and after (channels) as they are, the chain is replayed on `arange(T·H·W).view(T, H, W)`:
the result is the order itself, read off the graph rather than guessed from sizes. An order that is
neither raster nor a `TokenLayout` tiled order is ignored (nothing here describes it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..layout import TokenLayout
from .graph_util import call_name, constant_permutation, static_shape

_RESHAPES = {"view", "reshape", "flatten", "unflatten"}
_PERMUTES = {"permute", "transpose"}
_SAME = {"contiguous", "clone"}
_MAX_CHAIN = 12


@dataclass(frozen=True)
class TokenOrder:
    grid: tuple[int, int, int]
    tile: tuple[int, int, int] | None     # None: raster order
    source: str


def _chain(end: fx.Node, prefix: tuple, suffix: tuple) -> list[fx.Node]:
    """Layout-op nodes leading to `end` (first = the furthest), every one keeping `prefix` and `suffix`."""
    chain, node = [], end
    while (len(chain) < _MAX_CHAIN and call_name(node) in _RESHAPES | _PERMUTES | _SAME
           and isinstance(node.args[0], fx.Node)):
        source = static_shape(node.args[0])
        if source is None or source[:len(prefix)] != prefix or source[len(source) - len(suffix):] != suffix:
            break
        chain.append(node)
        node = node.args[0]
    return chain[::-1]


def _replay(chain: list[fx.Node], prefix: tuple, suffix: tuple) -> torch.Tensor | None:
    """The token order (position along the merged dim -> raster index) the chain produces."""
    start = static_shape(chain[0].args[0])
    middle = start[len(prefix):len(start) - len(suffix)]
    if len(middle) != 3:
        return None
    index = torch.arange(math.prod(middle)).view(middle)
    for node in chain:
        out = static_shape(node)
        if out is None:
            return None
        if call_name(node) in _PERMUTES:
            perm = constant_permutation(node, len(out))
            p = len(prefix)
            if perm is None or perm[:p] != list(range(p)) or perm[len(perm) - len(suffix):] != list(
                    range(len(perm) - len(suffix), len(perm))):
                return None
            index = index.permute([d - p for d in perm[p:len(perm) - len(suffix)]])
        else:
            index = index.reshape(out[len(prefix):len(out) - len(suffix)])
    return index.reshape(-1)


def tile_of(order: torch.Tensor, grid: tuple[int, int, int]) -> tuple[int, int, int] | None:
    """The tile whose `TokenLayout` tiled order `order` is ((1, 1, 1) for raster), or None.

    A tiled order starts with its first tile, a box at the origin in raster order, so the candidate
    tiles are the boxes the first p + 1 tokens fill exactly; each is checked against the whole order."""
    T, H, W = grid
    t, h, w = order // (H * W), order // W % H, order % W
    extent = [x.cummax(0).values + 1 for x in (t, h, w)]
    filled = (extent[0] * extent[1] * extent[2]) == torch.arange(1, len(order) + 1)
    for p in filled.nonzero().flatten().tolist():
        tile = tuple(int(e[p]) for e in extent)
        if any(g % s for g, s in zip(grid, tile)):
            continue
        if torch.equal(TokenLayout(grid, tile, math.prod(tile)).source_index(), order):
            return tile
    return None


def token_orders(gm: fx.GraphModule) -> list[TokenOrder]:
    """Every merge of (T, H, W) into a token dim the graph shows, with its order."""
    out = []
    for node in gm.graph.nodes:
        shape = static_shape(node)
        if shape is None or call_name(node) not in _RESHAPES:
            continue
        for dim, n in enumerate(shape):
            prefix, suffix = shape[:dim], shape[dim + 1:]
            chain = _chain(node, prefix, suffix)
            # the chain starts at its furthest tensor holding the three dims (T, H, W) of n tokens
            starts = [i for i, c in enumerate(chain) if _grid_dims(static_shape(c.args[0]), dim, len(shape), n)]
            if n < 2 or not starts:
                continue
            chain = chain[starts[0]:]
            order = _replay(chain, prefix, suffix)
            if order is None:
                continue
            grid = tuple(static_shape(chain[0].args[0])[dim:dim + 3])
            tile = tile_of(order, grid)
            if tile is not None:
                tiled = tile != (1, 1, 1)
                out.append(TokenOrder(grid, tile if tiled else None, f"graph: {grid} merged into {n} tokens"
                                      + (f" in {tile} tiles" if tiled else "") + f" by {call_name(node)} {node.name}"))
    return out


def _grid_dims(shape, dim: int, rank: int, n: int) -> bool:
    return shape is not None and len(shape) == rank + 2 and math.prod(shape[dim:dim + 3]) == n
