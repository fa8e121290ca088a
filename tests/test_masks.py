"""Block maps over the tiled sequence: window, text, dense."""
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compact_compile.layout import TokenLayout
from compact_compile.masks import dense_blocks, density, text_blocks, video_site_blocks, window_blocks

odd = st.sampled_from([1, 3, 5, 7])
windows = st.tuples(odd, odd, odd)


@st.composite
def layouts(draw, max_text: int = 20):
    grid = draw(st.tuples(st.integers(1, 5), st.integers(1, 10), st.integers(1, 10)))
    tile = draw(st.tuples(st.sampled_from([1, 2]), st.sampled_from([1, 2, 3, 4]), st.sampled_from([1, 2, 4])))
    block_size = math.prod(tile) if draw(st.booleans()) else draw(st.integers(2, 24))
    n_text = draw(st.integers(0, max_text))
    return TokenLayout(grid, tile, block_size, n_text, draw(st.integers(0, n_text)))


def token_tiles(layout: TokenLayout) -> torch.Tensor:
    """Tile coordinates `[n_video, 3]` of the video token at each tiled position (from source_index)."""
    T, H, W = layout.grid
    raster = layout.source_index()[: layout.n_video] - layout.n_before
    coords = torch.stack([raster // (H * W), raster // W % H, raster % W], -1)
    return coords // torch.tensor(layout.tile)


def brute_force_window(layout: TokenLayout, window) -> torch.Tensor:
    """Blocks (n, m) kept iff some video token of n and some video token of m are in tiles at most
    window // 2 apart on every axis: a token-level definition, independent of block_tiles()."""
    tiles = token_tiles(layout)
    near = ((tiles[:, None] - tiles[None, :]).abs() <= torch.tensor(window) // 2).all(-1)
    blk = torch.arange(layout.n_video) // layout.block_size
    out = torch.zeros(layout.n_blocks, layout.n_blocks, dtype=torch.bool)
    i, j = near.nonzero(as_tuple=True)
    out[blk[i], blk[j]] = True
    return out


def text_rows(layout: TokenLayout) -> torch.Tensor:
    has = torch.zeros(layout.n_blocks, dtype=torch.bool)
    has[torch.arange(layout.n_video, layout.seq_len) // layout.block_size] = True
    return has


@settings(max_examples=120, deadline=None)
@given(layouts(), windows)
def test_window_equals_token_level_reference(layout, window):
    assert torch.equal(window_blocks(layout, window), brute_force_window(layout, window))


@settings(max_examples=100, deadline=None)
@given(layouts(), windows)
def test_window_is_symmetric_and_has_the_diagonal(layout, window):
    blocks = window_blocks(layout, window)
    assert blocks.shape == (layout.n_blocks, layout.n_blocks) and blocks.dtype == torch.bool
    assert torch.equal(blocks, blocks.T)
    video_block = torch.arange(layout.n_blocks) * layout.block_size < layout.n_video
    assert bool(blocks.diagonal()[video_block].all())
    # blocks holding only text have no video tile: nothing from the window alone
    assert not blocks[~video_block].any() and not blocks[:, ~video_block].any()


@settings(max_examples=100, deadline=None)
@given(layouts(), windows, windows)
def test_window_grows_monotonically(layout, w1, w2):
    small = tuple(min(a, b) for a, b in zip(w1, w2))
    large = tuple(max(a, b) for a, b in zip(w1, w2))
    a, b = window_blocks(layout, small), window_blocks(layout, large)
    assert not (a & ~b).any()


@settings(max_examples=60, deadline=None)
@given(layouts(max_text=0))
def test_window_spanning_the_grid_is_dense(layout):
    """A window reaching every tile from every tile keeps every block."""
    window = tuple(2 * n - 1 for n in layout.tile_grid)
    assert torch.equal(window_blocks(layout, window), dense_blocks(layout))


def test_window_1x1x1_on_whole_tiles_is_block_diagonal():
    layout = TokenLayout((4, 8, 8), (1, 4, 4), 16)
    assert torch.equal(window_blocks(layout, (1, 1, 1)), torch.eye(layout.n_blocks, dtype=torch.bool))
    # 3 × 3 × 3 window: each tile sees its neighbours, 16 tiles of a (4, 2, 2) tile grid
    blocks = window_blocks(layout, (3, 3, 3))
    # tile (t, h, w) = block (t·2 + h)·2 + w; tile (0,0,0) sees t ≤ 1 (all h, w): 8 blocks
    assert blocks[0].nonzero().flatten().tolist() == list(range(8))
    assert blocks[5].sum() == 12  # t = 1: sees t in {0, 1, 2}


@settings(max_examples=100, deadline=None)
@given(layouts(), windows)
def test_text_rows_and_columns_are_dense(layout, window):
    video = window_blocks(layout, window)
    blocks = video_site_blocks(layout, video)
    has_text = text_rows(layout)
    assert torch.equal(text_blocks(layout), has_text[:, None] | has_text[None, :])
    assert bool(blocks[has_text].all()) and bool(blocks[:, has_text].all())
    # elsewhere the video map is unchanged
    assert torch.equal(blocks[~has_text][:, ~has_text], video[~has_text][:, ~has_text])
    # no query block attends to nothing
    assert bool(blocks.diagonal().all())


def test_density():
    blocks = torch.tensor([[True, False], [True, True]])
    assert density(blocks) == 0.75
    assert density(dense_blocks(TokenLayout((2, 3, 4), (1, 2, 2), 4))) == 1.0
