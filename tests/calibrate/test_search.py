"""Greedy contraction (search.py) and plan assembly (build.py): guarantees, λ semantics, unions, plan files."""
import math
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from compact_compile.calibrate.build import RangeSearch, build_plan, search_stats
from compact_compile.calibrate.patterns import DEFAULT_GROUPS
from compact_compile.calibrate.patterns import Family
from compact_compile.calibrate.search import density, recall, search_sites, union
from compact_compile.calibrate.stats import CalibrationStats
from compact_compile.layout import TokenLayout
from compact_compile.plan import Plan, SitePlan

TILES = [(1, 2, 2), (1, 2, 4), (2, 2, 2), (1, 4, 4)]


@st.composite
def layouts(draw):
    tile = draw(st.sampled_from(TILES))
    grid = (draw(st.integers(1, 6)), draw(st.integers(2, 12)), draw(st.integers(2, 12)))
    n_text = draw(st.sampled_from([0, 0, 5]))
    return TokenLayout(grid, tile, math.prod(tile), n_text, draw(st.sampled_from([0, n_text])))


def structured_mass(layout, heads: int, gen: torch.Generator) -> torch.Tensor:
    """Block mass that decays with tile distance at a random rate per head and axis, plus noise:
    local, anisotropic, temporal and near-uniform heads all occur."""
    fam = Family(layout)
    rep, _ = fam.block_representatives()
    c = fam.tile_coords()[rep.clamp(min=0)].double()
    d = (c[:, None] - c[None, :]).abs()                                    # [nb, nb, 3]
    rate = torch.rand(heads, 1, 1, 3, generator=gen, dtype=torch.float64) * 3
    logits = -(d * rate).sum(-1) + 0.5 * torch.randn(heads, layout.n_blocks, layout.n_blocks, generator=gen,
                                                     dtype=torch.float64)
    return torch.softmax(logits, -1)


@settings(max_examples=60, deadline=None)
@given(layouts(), st.integers(1, 4), st.floats(0.5, 0.99), st.sampled_from([0.011, 0.1, 1.0, math.inf]),
       st.integers(0, 2**31))
def test_searched_masks_keep_recall_at_least_tau(layout, heads, tau, lam, seed):
    mass = structured_mass(layout, heads, torch.Generator().manual_seed(seed))
    fam = Family(layout)
    res = search_sites({"s": mass}, fam, tau, lam)["s"]
    # recall measured independently of the search's bookkeeping, from the block map and the mass
    w = torch.tensor([min(layout.block_size, layout.seq_len - n * layout.block_size)
                      for n in range(layout.n_blocks)], dtype=torch.float64) / layout.seq_len
    independent = (res.blocks.double() * mass * w[:, None]).sum((-1, -2))
    assert (independent >= tau).all(), (independent, tau)
    torch.testing.assert_close(res.recall, independent, rtol=0, atol=1e-12)
    assert torch.equal(res.blocks, fam.block_map(res.params))
    for curve in res.curves:   # the greedy path: from full attention, density and recall never increase
        d, r = zip(*curve)
        assert d[0] == pytest.approx(1.0) and r[0] == pytest.approx(1.0)
        assert all(b < a for a, b in zip(d, d[1:])) and all(b <= a + 1e-12 for a, b in zip(r, r[1:]))
        assert r[-1] >= tau


@settings(max_examples=40, deadline=None)
@given(layouts(), st.integers(1, 4), st.sampled_from([1e-9, 0.05, 0.3]), st.integers(0, 2**31))
def test_every_query_block_keeps_its_own_block(layout, heads, tau, seed):
    """However far the search contracts (recall floor near 0, no λ limit: a density budget's worst
    case), each query block keeps its own key block, so no row of a plan attends to nothing and the
    plan saves and loads (Plan refuses a row with no block)."""
    mass = structured_mass(layout, heads, torch.Generator().manual_seed(seed))
    res = search_sites({"s": mass}, Family(layout), tau, math.inf)["s"]
    assert res.blocks.diagonal(dim1=-2, dim2=-1).all()
    plan = Plan(layout.grid, layout.tile, layout.block_size,
                {"s": SitePlan(heads, 16, layout.seq_len, layout.n_text, layout.n_before, res.blocks)})
    with tempfile.TemporaryDirectory() as d:
        plan.save(Path(d) / "p.plan.safetensors")
        assert torch.equal(Plan.load(Path(d) / "p.plan.safetensors").sites["s"].blocks, res.blocks)


@settings(max_examples=40, deadline=None)
@given(layouts(), st.floats(0.5, 0.99), st.integers(0, 2**31))
def test_union_never_lowers_recall(layout, tau, seed):
    gen = torch.Generator().manual_seed(seed)
    fam = Family(layout)
    masses = [structured_mass(layout, 3, gen) for _ in range(2)]
    masks = [search_sites({"s": m}, fam, tau, math.inf)["s"].blocks for m in masses]
    both = union(*masks)
    for m in masses:
        r = recall(both, m, layout)
        assert (r >= recall(masks[0], m, layout) - 1e-15).all() and (r >= recall(masks[1], m, layout) - 1e-15).all()
    assert (density(both) >= torch.maximum(density(masks[0]), density(masks[1]))).all()


def test_lambda_stops_on_uniform_attention_and_tau_alone_then_binds():
    """Uniform attention loses as much recall as it saves compute (ratio 1 > λ): nothing is dropped at
    the default λ. Without λ the search stops at τ."""
    layout = TokenLayout((4, 8, 8), (1, 4, 4), 16)
    cols = torch.full((layout.n_blocks,), 16.0, dtype=torch.float64) / layout.seq_len
    mass = cols.expand(2, layout.n_blocks, layout.n_blocks).clone()
    fam = Family(layout)
    strict = search_sites({"s": mass}, fam, 0.9, 0.011)["s"]
    assert (strict.density == 1.0).all()
    loose = search_sites({"s": mass}, fam, 0.9, math.inf)["s"]
    assert (loose.recall >= 0.9).all() and (loose.density < 0.95).all()
    torch.testing.assert_close(loose.recall, loose.density, rtol=0, atol=1e-12)   # uniform: recall = density


def _stats(layout, sites: int, heads: int, seed: int, steps=(3, None)) -> CalibrationStats:
    gen = torch.Generator().manual_seed(seed)
    st_ = CalibrationStats(steps, calls=4, generations=1)
    for i in range(sites):
        s = st_.site(f"blocks.{i}.attn1", layout, heads, 16)
        s.add(structured_mass(layout, heads, gen))
    return st_


def test_dense_layers_stay_full():
    layout = TokenLayout((4, 8, 8), (1, 4, 4), 16)
    found = search_stats(_stats(layout, 4, 2, 0), 0.9, math.inf, dense_layers=2)
    assert [bool(r.blocks.all()) for r in found.values()] == [True, True, False, False]


def test_build_plan_union_over_generations_and_info_round_trip():
    layout = TokenLayout((4, 8, 8), (1, 4, 4), 16)
    gens = [[_stats(layout, 3, 2, seed, (3, 7)) for seed in (0, 1)], [_stats(layout, 3, 2, 5, (7, None))]]
    plan = build_plan(gens, recall_target=0.85, cost=0.05, dense_steps=3, merge="union")
    assert list(plan.sites) == ["blocks.0.attn1", "blocks.1.attn1", "blocks.2.attn1",
                                "blocks.0.attn1@7", "blocks.1.attn1@7", "blocks.2.attn1@7"]
    total = CalibrationStats((3, 7))
    for g in gens[0]:
        total.merge(g)
    for name in ["blocks.0.attn1", "blocks.1.attn1"]:
        blocks = plan.sites[name].blocks
        for g in gens[0] + [total]:   # the union keeps τ on every input and on their mean
            assert (recall(blocks, g.sites[name].mass, layout) >= 0.85).all()
        mean_only = search_stats(total, 0.85, 0.05)[name].blocks
        assert (blocks | mean_only).equal(blocks)
    cal = plan.info["calibration"]
    assert (cal["recall"], cal["cost"], cal["merge"], cal["steps"]) == (0.85, 0.05, "union", [[3, 7], [7, None]])
    assert cal["inputs"] == dict(calls=12, generations=2, samples=2) and cal["fingerprint"]["sites"] == 3
    assert plan.info["schedule"]["dense_steps"] == 3 and plan.info["schedule"]["ranges"] == [[3, 7], [7, None]]
    heads = plan.info["heads"]["blocks.1.attn1"]
    assert len(heads["recall"]) == 2 and min(heads["recall"]) >= 0.85 and len(heads["params"][0]) == 4
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "p.plan.safetensors"
        plan.save(path)
        back = Plan.load(path)
    assert back.info == plan.info
    assert all(torch.equal(back.sites[n].blocks, plan.sites[n].blocks) for n in plan.sites)


def test_build_plan_refuses_empty_statistics():
    with pytest.raises(ValueError, match="no attention statistics were recorded in step range"):
        build_plan([[CalibrationStats((15, None))]], dense_steps=15)
    with pytest.raises(ValueError, match="must follow each other"):
        build_plan([[_stats(TokenLayout((2, 8, 8), (1, 4, 4), 16), 1, 1, 0, (4, None))]], dense_steps=3)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**31))
def test_a_density_budget_is_met_and_shared_by_need(seed):
    """build_plan(density_target=d): the plan computes at most d of all blocks, as close to d as one
    greedy step allows (a slightly smaller λ is over budget), sparser budgets give sparser plans,
    and the budget goes where attention needs it: heads with concentrated attention end sparser."""
    layout = TokenLayout((4, 8, 8), (1, 4, 4), 16)
    gens = [[_stats(layout, 2, 3, seed)]]
    found = []
    for target in (0.7, 0.5, 0.3):
        plan = build_plan(gens, density_target=target, recall_target=1e-9, dense_steps=3, merge="mean")
        achieved = torch.cat([density(s.blocks) for s in plan.sites.values()]).mean().item()
        price = plan.info["calibration"]["prices"][0]
        assert achieved <= target + 1e-12 and price["density"] == pytest.approx(achieved, abs=1e-6)
        denser = search_stats(gens[0][0], 1e-9, price["cost"] * 0.999)     # a slightly lower price: over budget
        assert torch.cat([density(r.blocks) for r in denser.values()]).mean().item() > target
        found.append(achieved)
        assert plan.info["calibration"]["density"] == target and plan.info["calibration"]["cost"] is None
    assert found == sorted(found, reverse=True)


@settings(max_examples=25, deadline=None)
@given(layouts(), st.sampled_from([0.05, 0.2, 0.5, 0.9, 1.0]), st.sampled_from(["mean", "union"]),
       st.integers(0, 1), st.integers(0, 2**31))
@example(TokenLayout((1, 10, 12), (1, 2, 2), 4), 1.0, "mean", 0, 0)   # a head's first step costs 5.5e-9 recall
def test_a_density_budget_finds_the_densest_plan_within_it(layout, target, merge, dense_layers, seed):
    """On any layout (tiles cut by the grid's edges, text blocks, dense layers, unions over inputs, an
    input that lacks a site) the price found meets the budget with the maps searched afresh at that
    price, and the next lower price at which the plan can change does not: no plan in budget is
    denser (a budget of 1 keeps every block)."""
    gens = [_stats(layout, 2, 2, seed), _stats(layout, 1, 2, seed + 1)]      # the second lacks a site
    plan = build_plan([gens], density_target=target, recall_target=1e-9, dense_steps=3, merge=merge,
                      dense_layers=dense_layers)
    lam = plan.info["calibration"]["prices"][0]["cost"]
    realised = torch.cat([density(s.blocks) for s in plan.sites.values()]).mean().item()

    def fresh(price):   # the plan at `price`, searched again site by site: the union by hand
        found = search_stats(_merged(gens), 1e-9, price, dense_layers=dense_layers)
        if merge == "union":
            for g in gens:
                for name, res in search_stats(g, 1e-9, price, dense_layers=dense_layers).items():
                    found[name].blocks = union(found[name].blocks, res.blocks)
        return torch.cat([density(r.blocks) for r in found.values()]).mean().item()

    assert realised == pytest.approx(fresh(lam), abs=1e-12)
    prices = RangeSearch(_merged(gens), gens, 1e-9, DEFAULT_GROUPS, dense_layers, merge).prices().tolist()
    lower = [p for p in prices if p < lam]
    if realised <= target:
        assert not lower or fresh(lower[-1]) > target
    else:   # below the sparsest reachable plan: the largest price
        assert lam == prices[-1]
    if target == 1.0:
        assert realised == 1.0


def _merged(gens):
    total = CalibrationStats(gens[0].steps)
    for g in gens:
        total.merge(g)
    return total


def test_a_density_budget_gives_planted_heads_what_they_need():
    """Planted heads (local, cross, temporal stripe, uniform) at a budget of 30% of the blocks: the
    concentrated heads keep their planted attention (each block of it is worth far more than a
    block of uniform attention), the uniform head pays for the budget (its recall is its density),
    and the heads together keep far more attention than the density they cost."""
    from planted import planted_params, planted_qk

    from compact_compile.calibrate.stats import block_mass
    layout = TokenLayout((4, 16, 16), (1, 4, 4), 16)
    fam = Family(layout)
    params = planted_params(fam)
    q, k = planted_qk(fam, torch.stack(list(params.values())))
    st_ = CalibrationStats((0, None), calls=1, generations=1)
    st_.site("attn", layout, len(params), q.shape[-1]).add(block_mass(q, k, 16, 1.0))
    plan = build_plan([[st_]], density_target=0.3, recall_target=1e-9, dense_steps=0, merge="mean")
    heads = plan.info["heads"]["attn"]
    dens = dict(zip(params, heads["density"]))
    rec = dict(zip(params, heads["recall"]))
    assert sum(dens.values()) / len(dens) <= 0.3 + 1e-12
    assert all(rec[h] > 0.9 for h in ("local", "cross", "temporal")), rec
    assert rec["global"] == pytest.approx(dens["global"], abs=0.02) and dens["global"] < 0.9
    assert sum(rec.values()) / len(rec) > 0.3 + 0.4
