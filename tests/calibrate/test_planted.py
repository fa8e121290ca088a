"""End to end on synthetic q/k with planted heads: q, k → block mass → search recovers each pattern."""
import math

import pytest
import torch

from compact_compile.calibrate.patterns import Family
from compact_compile.calibrate.search import density, recall, search_sites
from compact_compile.calibrate.stats import block_mass
from compact_compile.layout import TokenLayout
from planted import planted_params, planted_qk

# 6 tile frames × 5 × 6 tiles of 1×4×4 tokens: groups {0}, {1}, {2, 3}, {4, 5} all present
LAYOUT = TokenLayout((6, 20, 24), (1, 4, 4), 16)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("lam", [0.011, math.inf])
def test_search_recovers_planted_heads(seed, lam):
    fam = Family(LAYOUT)
    kinds = planted_params(fam)
    params = torch.stack(list(kinds.values()))
    q, k = planted_qk(fam, params, seed=seed)
    mass = block_mass(q, k, LAYOUT.block_size, scale=1.0)[0]
    planted = fam.block_map(params)
    planted_recall = recall(planted, mass, LAYOUT)
    assert (planted_recall >= 0.97).all()                       # the planting worked: the mask holds the mass
    found = search_sites({"site": mass}, fam, 0.9, lam)["site"]
    for h, kind in enumerate(kinds):
        assert found.recall[h] >= 0.9, kind
        assert found.density[h] <= 1.5 * density(planted)[h], (kind, found.density[h], density(planted)[h])
        if kind == "global":   # nothing to drop without losing recall as fast as compute
            assert found.density[h] >= (1.0 if lam < 1 else 0.85), found.density[h]
            if lam < 1:
                assert fam.classify(found.params[h]) == "global"
        else:
            if lam < 1:   # λ stops at the planted boundary; without λ the search trims inside it down to τ
                assert fam.classify(found.params[h]) == kind, (kind, found.params[h])
            # the searched mask covers most of the planted one (it may trim a little while recall ≥ τ)
            overlap = (found.blocks[h] & planted[h]).sum() / planted[h].sum()
            assert overlap >= 0.85, (kind, overlap)
