"""The mask family (patterns.py): block maps, agreement with the window mask, the search's fast recall,
monotonicity, and pattern classes."""
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compact_compile.calibrate.patterns import Family
from compact_compile.calibrate.search import _tables, _union, recall
from compact_compile.layout import TokenLayout
from compact_compile.masks import text_blocks, window_blocks

TILES = [(1, 2, 2), (1, 1, 4), (2, 2, 2), (1, 2, 4), (2, 2, 4), (1, 4, 4)]


@st.composite
def layouts(draw, text=True, divisible=False):
    tile = draw(st.sampled_from(TILES))
    if divisible:
        grid = tuple(t * draw(st.integers(1, 4)) for t in tile)
    else:
        grid = (draw(st.integers(1, 6)), draw(st.integers(1, 12)), draw(st.integers(1, 12)))
    n_text = draw(st.integers(0, 9)) if text else 0
    return TokenLayout(grid, tile, math.prod(tile), n_text, draw(st.integers(0, n_text)))


@st.composite
def families(draw, **kw):
    layout = draw(layouts(**kw))
    edges = draw(st.sampled_from([(0, 1, 3), (0,), (1, 2), (0, 2, 4, 6)]))
    return Family(layout, edges)


@st.composite
def family_params(draw, heads=2, **kw):
    fam = draw(families(**kw))
    _, nth, ntw = fam.layout.tile_grid
    p = torch.tensor([[[draw(st.integers(-1, ntw - 1)), draw(st.integers(-1, nth - 1)),
                        draw(st.integers(-1, ntw - 1)), draw(st.integers(-1, nth - 1))]
                       for _ in range(fam.n_groups)] for _ in range(heads)])
    return fam, p


def random_mass(layout, heads, gen, sharp=3.0):
    logits = torch.randn(heads, layout.n_blocks, layout.n_blocks, generator=gen, dtype=torch.float64) * sharp
    return torch.softmax(logits, -1)


@settings(max_examples=80, deadline=None)
@given(family_params())
def test_block_map_is_the_or_over_covered_tiles(fp):
    fam, p = fp
    incidence, _ = fam.layout.block_tiles()
    inc = incidence.double()
    expected = (inc @ fam.tile_mask(p).double() @ inc.T) > 0          # a block pair is kept iff a tile pair is
    if fam.layout.n_text:
        expected |= text_blocks(fam.layout)
    got = fam.block_map(p)
    assert got.dtype == torch.bool and torch.equal(got, expected)


@settings(max_examples=40, deadline=None)
@given(families(), st.integers(0, 3), st.integers(0, 3), st.integers(0, 3))
def test_equal_windows_near_frames_only_is_the_window_mask(fam, rt, rh, rw):
    """Box (ω=rw, η=rh) in the groups with Δt ≤ rt and nothing beyond = masks.window_blocks."""
    layout = fam.layout
    edges = fam.groups
    fam = Family(layout, (rt,))                                       # group 0: Δt ≤ rt, group 1: beyond
    p = torch.tensor([[[rw, rh, rw, rh], [-1, -1, -1, -1]]])
    expected = window_blocks(layout, (2 * rt + 1, 2 * rh + 1, 2 * rw + 1))
    if layout.n_text:
        expected = expected | text_blocks(layout)
    assert torch.equal(fam.block_map(p)[0], expected), edges


@settings(max_examples=30, deadline=None)
@given(families())
def test_full_params_keep_every_block(fam):
    assert fam.block_map(fam.full_params(3)).all()


@settings(max_examples=60, deadline=None)
@given(family_params(heads=1), st.integers(0, 3), st.integers(0, 2**31), st.data())
def test_recall_is_monotone_under_window_growth(fp, which, seed, data):
    """Growing any window parameter of any group never lowers recall: of the realised block map, and
    of the search's own prefix-sum evaluation."""
    fam, p = fp
    g = data.draw(st.integers(0, fam.n_groups - 1))
    _, nth, ntw = fam.layout.tile_grid
    limit = (ntw - 1, nth - 1, ntw - 1, nth - 1)[which]
    grown = p.clone()
    grown[0, g, which] = min(limit, grown[0, g, which] + data.draw(st.integers(1, 3)))
    if which in (0, 2):   # growing an empty window's one side: give it the other side too, as a search state would
        grown[0, g, which + 1] = max(grown[0, g, which + 1], 0)
    else:
        grown[0, g, which - 1] = max(grown[0, g, which - 1], 0)
    mass = random_mass(fam.layout, 1, torch.Generator().manual_seed(seed))
    small, big = fam.block_map(p), fam.block_map(grown)
    assert (big | small).equal(big)                                   # growth only adds blocks
    assert recall(big, mass, fam.layout) >= recall(small, mass, fam.layout) - 1e-15
    t = _tables(mass, fam)
    fast = lambda q: t.const_mass + _union(t.mass, q, ntw).sum(1)     # noqa: E731
    assert fast(grown) >= fast(p) - 1e-15


@settings(max_examples=60, deadline=None)
@given(family_params(heads=3, text=False, divisible=True), st.integers(0, 2**31))
def test_fast_recall_equals_block_map_recall_when_blocks_are_tiles(fp, seed):
    """With one tile per block (grid divisible by the tile, no text) the inclusion–exclusion recall and
    density of the search are exact."""
    fam, p = fp
    mass = random_mass(fam.layout, 3, torch.Generator().manual_seed(seed))
    t = _tables(mass, fam)
    _, _, ntw = fam.layout.tile_grid
    blocks = fam.block_map(p)
    torch.testing.assert_close(t.const_mass + _union(t.mass, p, ntw).sum(1), recall(blocks, mass, fam.layout),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(t.const_count + _union(t.count[None], p, ntw).sum(1),
                               blocks.double().mean((-1, -2)), rtol=0, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(family_params(heads=2), st.integers(0, 2**31))
def test_fast_recall_never_exceeds_the_block_map_recall(fp, seed):
    """With partial tiles and text the search's estimate is a lower bound of the real recall."""
    fam, p = fp
    mass = random_mass(fam.layout, 2, torch.Generator().manual_seed(seed))
    t = _tables(mass, fam)
    fast = t.const_mass + _union(t.mass, p, fam.layout.tile_grid[2]).sum(1)
    assert (fast <= recall(fam.block_map(p), mass, fam.layout) + 1e-12).all()


def test_pattern_classes():
    fam = Family(TokenLayout((24, 32, 32), (4, 4, 4), 64), (0, 1, 3))   # tile grid (6, 8, 8)
    G = fam.n_groups
    full = torch.tensor([7, 7, 7, 7])
    empty = torch.tensor([-1, -1, -1, -1])
    box = torch.tensor([1, 1, 1, 1])
    cases = {
        "global": full.repeat(G, 1),
        "local": torch.stack([box, box, empty, empty]),
        "temporal": torch.zeros(G, 4, dtype=torch.long),                  # a stripe through all frames
        "cross": torch.tensor([7, 0, 0, 7]).repeat(G, 1),
        "mixed": torch.stack([box, full, full, full]),
    }
    for expected, p in cases.items():
        assert fam.classify(p) == expected, (expected, p)
    skip_near = torch.stack([empty, box, box, box])                       # skips its own frame: temporal
    assert fam.classify(skip_near) == "temporal"
    # a layout with a single tile frame has only group 0: a box there is local, not temporal
    flat = Family(TokenLayout((4, 32, 32), (4, 4, 4), 64), (0, 1, 3))
    assert flat.classify(torch.zeros(G, 4, dtype=torch.long)) == "local"
