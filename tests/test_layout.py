"""TokenLayout: the tiled order of video (and text) tokens, and its block geometry."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compact_compile.layout import TokenLayout, auto_tile

grids = st.tuples(st.integers(1, 6), st.integers(1, 11), st.integers(1, 11))
tiles = st.tuples(st.sampled_from([1, 2, 4]), st.sampled_from([1, 2, 3, 4]), st.sampled_from([1, 2, 4, 5]))


@st.composite
def layouts(draw, block_is_tile: bool = False):
    grid, tile = draw(grids), draw(tiles)
    block_size = math.prod(tile) if block_is_tile else draw(st.integers(1, 40))
    n_text = draw(st.integers(0, 20))
    return TokenLayout(grid, tile, block_size, n_text, draw(st.sampled_from([0, n_text, n_text // 3])))


def video_coords(layout: TokenLayout):
    """(t, h, w) of the video token at each tiled position p < n_video (from source_index)."""
    T, H, W = layout.grid
    src = layout.source_index()[: layout.n_video]
    raster = src - layout.n_before
    return raster // (H * W), raster // W % H, raster % W


def tile_ids(layout: TokenLayout, t, h, w):
    _, nh, nw = layout.tile_grid
    tt, th, tw = layout.tile
    return (t // tt * nh + h // th) * nw + w // tw


@settings(max_examples=150, deadline=None)
@given(layouts())
def test_source_index_is_a_permutation(layout):
    src = layout.source_index()
    assert src.shape == (layout.seq_len,)
    assert torch.equal(src.sort().values, torch.arange(layout.seq_len))


@settings(max_examples=150, deadline=None)
@given(layouts())
def test_target_index_is_the_inverse(layout):
    src, dst = layout.source_index(), layout.target_index()
    ar = torch.arange(layout.seq_len)
    assert torch.equal(dst[src], ar)
    assert torch.equal(src[dst], ar)


@settings(max_examples=150, deadline=None)
@given(layouts())
def test_video_first_then_the_others_in_model_order(layout):
    """Model order: n_before others, the video, the other others; tiled: the video, then every other
    token in model order."""
    src = layout.source_index()
    before, after = torch.arange(layout.n_before), torch.arange(layout.n_before + layout.n_video, layout.seq_len)
    assert torch.equal(src[layout.n_video:], torch.cat([before, after]))
    video = src[: layout.n_video]
    assert bool(((video >= layout.n_before) & (video < layout.n_before + layout.n_video)).all())


def test_n_before_must_be_a_count_of_the_other_tokens():
    with pytest.raises(ValueError, match="n_before"):
        TokenLayout((2, 4, 4), (1, 4, 4), 16, 5, True)      # a bool where a count is meant
    with pytest.raises(ValueError, match="n_before"):
        TokenLayout((2, 4, 4), (1, 4, 4), 16, 5, 6)


@settings(max_examples=150, deadline=None)
@given(layouts())
def test_every_tile_is_one_contiguous_run(layout):
    """Tiles, whole or partial, are never interleaved: the tiled order visits tile by tile."""
    ids = tile_ids(layout, *video_coords(layout)).tolist()
    runs = [i for n, i in enumerate(ids) if n == 0 or ids[n - 1] != i]
    assert len(runs) == len(set(runs)) == math.prod(layout.tile_grid)


@settings(max_examples=150, deadline=None)
@given(layouts(block_is_tile=True))
def test_full_tile_blocks_are_exactly_one_tile(layout):
    T, H, W = layout.grid
    tt, th, tw = layout.tile
    n_full = (T // tt) * (H // th) * (W // tw)
    bs = layout.block_size
    t, h, w = video_coords(layout)
    ids = tile_ids(layout, t, h, w)
    incidence, has_text = layout.block_tiles()
    for b in range(n_full):
        sl = slice(b * bs, (b + 1) * bs)
        # the block's tokens are the bs tokens of one whole tile...
        assert len(set(ids[sl].tolist())) == 1
        tc = (t[sl] // tt, h[sl] // th, w[sl] // tw)
        assert all(bool((c == c[0]).all()) for c in tc)
        assert len(set(zip(t[sl].tolist(), h[sl].tolist(), w[sl].tolist()))) == bs
        # ...and block_tiles says so
        assert incidence[b].sum() == 1 and incidence[b, ids[b * bs]]
        assert not has_text[b]


@settings(max_examples=100, deadline=None)
@given(layouts())
def test_block_tiles_matches_token_level_incidence(layout):
    """block_tiles()[0][b, i] iff block b holds a video token of tile i; [1][b] iff it holds text."""
    ids = tile_ids(layout, *video_coords(layout)).tolist()
    want = torch.zeros(layout.n_blocks, math.prod(layout.tile_grid), dtype=torch.bool)
    want_text = torch.zeros(layout.n_blocks, dtype=torch.bool)
    for p in range(layout.seq_len):
        if p < layout.n_video:
            want[p // layout.block_size, ids[p]] = True
        else:
            want_text[p // layout.block_size] = True
    incidence, has_text = layout.block_tiles()
    assert torch.equal(incidence, want)
    assert torch.equal(has_text, want_text)


def test_hand_checked_layout_with_a_partial_slab():
    """Grid (1, 4, 6), tile (1, 2, 4): whole tiles cover w < 4, then the w-slab of partial tiles."""
    layout = TokenLayout((1, 4, 6), (1, 2, 4), 8)
    # whole tiles in tile-raster order, raster order inside each tile: rows {0,1} × cols 0-3, rows {2,3} × cols 0-3
    # then the leftover slab w in {4, 5}, tile by tile: rows {0,1}, rows {2,3} (both share the last block)
    assert layout.source_index().tolist() == [0, 1, 2, 3, 6, 7, 8, 9, 12, 13, 14, 15, 18, 19, 20, 21,
                                              4, 5, 10, 11, 16, 17, 22, 23]
    incidence, has_text = layout.block_tiles()
    assert incidence.tolist() == [[True, False, False, False], [False, False, True, False],
                                  [False, True, False, True]]
    assert not has_text.any()


@settings(max_examples=200, deadline=None)
@given(st.tuples(st.integers(1, 30), st.integers(1, 64), st.integers(1, 64)), st.sampled_from([64, 128]))
def test_auto_tile_holds_block_size_tokens(grid, block_size):
    tile = auto_tile(grid, block_size)
    assert len(tile) == 3 and all(isinstance(t, int) and t >= 1 for t in tile)
    assert math.prod(tile) == block_size, (grid, block_size, tile)


@pytest.mark.parametrize("grid, block_size", [((21, 30, 52), 128), ((21, 30, 52), 64), ((3, 8, 9), 64),
                                               ((16, 16, 16), 64)])
def test_auto_tile_prefers_compact_covering_tiles(grid, block_size):
    """Among the compact power-of-two tiles, none leaves fewer tokens in partial tiles."""
    tile = auto_tile(grid, block_size)
    assert tile[0] <= 4 and min(tile[1:]) >= 4 and max(tile[1:]) <= 4 * min(tile[1:])

    def covered(t):
        return math.prod(g - g % s for g, s in zip(grid, t))

    k = block_size.bit_length() - 1
    for et in range(k + 1):
        for eh in range(k + 1 - et):
            cand = (1 << et, 1 << eh, 1 << (k - et - eh))
            if (all(c <= g for c, g in zip(cand, grid)) and cand[0] <= 4 and min(cand[1:]) >= 4
                    and max(cand[1:]) <= 4 * min(cand[1:])):
                assert covered(cand) <= covered(tile), (cand, tile)
