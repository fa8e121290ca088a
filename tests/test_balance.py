"""Head balancing for a head split: a permutation of the heads that evens out the plan's work over the
ranks (greedy longest processing time with equal head counts), within 4/3 of the best split."""
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compact_compile import Plan, PlanError, SitePlan, TokenLayout, balance_heads
from compact_compile.balance import balanced_heads, permute_attention_heads, rank_loads
from compact_compile.masks import window_blocks
from family import FAMILY
from support import AS_PLANNED, HUNYUAN_GRID, HUNYUAN_TEXT, WAN_GRID, tiny_hunyuan, tiny_wan


def test_a_plan_with_its_dense_heads_first_is_evened_out_over_two_ranks():
    blocks = torch.zeros(8, 10, 10, dtype=torch.bool)
    for head, rows in enumerate([10, 9, 8, 7, 1, 1, 1, 1]):   # the first four heads nearly dense
        blocks[head, :rows] = True
    density = blocks.float().mean((1, 2)).tolist()
    perm = balanced_heads(density, 2)
    assert rank_loads(density, list(range(8)), 2) == pytest.approx([3.4, 0.4])    # diffusers' contiguous split
    assert rank_loads(density, perm, 2) == pytest.approx([1.9, 1.9])
    assert len({0, 1, 2, 3} & set(perm[:4])) == 2                                  # two dense heads each


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([(2, 1), (2, 2), (2, 3), (3, 1), (3, 2)]).flatmap(
    lambda rh: st.tuples(st.just(rh[0]), st.lists(st.floats(0.01, 1.0), min_size=rh[0] * rh[1],
                                                   max_size=rh[0] * rh[1]))))
def test_each_rank_gets_as_many_heads_and_the_slowest_rank_is_within_four_thirds_of_the_best(case):
    ranks, cost = case
    perm = balanced_heads(cost, ranks)
    assert sorted(perm) == list(range(len(cost)))
    best = min(max(rank_loads(cost, p, ranks)) for p in itertools.permutations(range(len(cost))))
    assert max(rank_loads(cost, perm, ranks)) <= 4 / 3 * best + 1e-9


def test_heads_that_do_not_split_evenly_are_an_error():
    with pytest.raises(ValueError, match="5 heads do not split evenly over 2 ranks"):
        balanced_heads([1.0] * 5, 2)


def wan_with_heads(heads: int):
    """A 2-layer diffusers Wan with `heads` heads of 8 (norm over all heads, as Wan2.1's) and its inputs.
    The q/k norms' weights are random (they start at 1, which a permutation that skipped them keeps)."""
    model, inputs = tiny_wan(heads=heads, head_dim=8)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in model.blocks:
            for norm in (block.attn1.norm_q, block.attn1.norm_k):
                norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) + 0.5)
    return model, inputs


def test_permuting_an_attention_modules_heads_keeps_the_models_function():
    model, inputs = wan_with_heads(4)
    with torch.no_grad():
        before = model(**inputs)[0]
        for block in model.blocks:
            permute_attention_heads(block.attn1, [2, 0, 3, 1])
        after = model(**inputs)[0]
        block = model.blocks[0].attn1
    assert torch.allclose(after, before, atol=1e-5, rtol=1e-5)
    assert not torch.equal(block.to_q.weight, wan_with_heads(4)[0].blocks[0].attn1.to_q.weight)  # it did permute


def test_balancing_a_per_head_plan_keeps_the_output_and_evens_the_ranks():
    """A per-head plan with its two dense heads first (diffusers' contiguous split gives both to rank 0):
    the balanced model and plan compute what the original model and plan compute, and their ranks' loads
    are even. Window plans differ per head, so a plan row left in the old order changes the output."""
    model, inputs = wan_with_heads(4)
    layout = TokenLayout(WAN_GRID, (1, 8, 8), 64)
    rows = [window_blocks(layout, w) for w in ((3, 3, 3), (3, 3, 3), (1, 1, 1), (1, 1, 1))]
    blocks = torch.stack([rows[0], rows[1] | torch.eye(layout.n_blocks, dtype=torch.bool).roll(1, 1), rows[2], rows[3]])
    plan = Plan(WAN_GRID, (1, 8, 8), 64, {f"blocks.{i}.attn1": SitePlan(4, 8, math.prod(WAN_GRID), 0, 0, blocks)
                                         for i in range(2)})
    options = dict(AS_PLANNED, grid=WAN_GRID, inner="eager", kernel="flex")
    with torch.no_grad():
        want = torch.compile(model, backend="compact", options=dict(AS_PLANNED, plan=plan, **options))(**inputs)[0]
        torch._dynamo.reset()
        balanced = balance_heads(model, plan, ranks=2)
        got = torch.compile(model, backend="compact", options=dict(AS_PLANNED, plan=balanced, **options))(**inputs)[0]
        torch._dynamo.reset()
        stale = torch.compile(model, backend="compact", options=dict(AS_PLANNED, plan=plan, **options))(**inputs)[0]
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(stale, want, atol=1e-3, rtol=1e-3)          # the rows must move with the heads
    cost = blocks.float().mean((1, 2)).tolist()
    perm = balanced.info["head_permutations"]["blocks.0.attn1"]
    assert max(rank_loads(cost, perm, 2)) < max(rank_loads(cost, list(range(4)), 2))
    assert torch.equal(balanced.sites["blocks.1.attn1"].blocks, blocks[perm])


def _flat(out):
    return torch.cat([t.flatten().double() for t in torch.utils._pytree.tree_leaves(out) if torch.is_tensor(t)])


@pytest.mark.parametrize("name", list(FAMILY))
def test_every_model_familys_heads_permute_exactly_or_are_refused(name):
    """Every attention module of every video transformer diffusers exports (tests/family.py, its
    zero-initialised parameters drawn at random) has its heads reversed: permute_attention_heads
    either refuses with a PlanError or the model computes what it did. LTX-Video's RoPE over all
    heads' channels, Mochi's per-head RoPE frequencies outside its modules and the like changed the
    model by 1e-2 to 3e-1 before their processors were refused."""
    model, inputs = FAMILY[name]()
    with torch.no_grad():
        before = _flat(model(**inputs))
        permuted = 0
        for module in model.modules():
            heads = getattr(module, "heads", 0)
            if getattr(module, "to_q", None) is None or not isinstance(heads, int) or heads < 2:
                continue
            try:
                permute_attention_heads(module, list(range(heads))[::-1])
                permuted += 1
            except PlanError:
                pass
        after = _flat(model(**inputs))
    assert (after - before).norm() <= 1e-5 * before.norm(), f"{permuted} modules permuted"


def test_joint_attention_heads_permute_with_their_text_projections():
    """Joint text+video attention (HunyuanVideo's dual-stream blocks): the text's q/k/v and output
    projections and norms move with the video's, so the model's output is unchanged. A module whose
    heads leave it unprojected (HunyuanVideo's single-stream blocks) is refused: permuting it alone
    would change the model."""
    model, inputs = tiny_hunyuan()
    with torch.no_grad():
        before = model(**inputs)[0]
        joint = [m for name, m in model.named_modules()
                 if getattr(m, "add_q_proj", None) is not None and not name.startswith("single_transformer_blocks")]
        weights = [(m.to_q.weight.clone(), m.add_q_proj.weight.clone()) for m in joint]
        for module in joint:
            permute_attention_heads(module, [1, 0])
        after = model(**inputs)[0]
    assert joint and torch.allclose(after, before, atol=1e-5, rtol=1e-5)
    assert all(not torch.equal(m.to_q.weight, q) and not torch.equal(m.add_q_proj.weight, a)     # it did permute
               for m, (q, a) in zip(joint, weights))
    with pytest.raises(PlanError, match="no output projection"):
        permute_attention_heads(model.single_transformer_blocks[0].attn, [1, 0])


def test_all_entries_of_one_module_move_with_its_one_permutation():
    """A module's step ranges (`@start`) and further calls (`#n`) share its heads: one permutation,
    from their combined cost, for all of them; a head-agnostic entry stays as it is."""
    model, _ = wan_with_heads(4)
    S, n = math.prod(WAN_GRID), TokenLayout(WAN_GRID, (1, 8, 8), 64).n_blocks
    dense_first = torch.zeros(4, n, n, dtype=torch.bool)
    dense_first[:2] = True
    dense_first[:, range(n), range(n)] = True
    entries = {"blocks.0.attn1": dense_first, "blocks.0.attn1@10": dense_first.flip(0),
               "blocks.0.attn1#1": dense_first, "blocks.1.attn1": torch.ones(1, n, n, dtype=torch.bool)}
    plan = Plan(WAN_GRID, (1, 8, 8), 64, {k: SitePlan(b.shape[0], 8, S, 0, 0, b) for k, b in entries.items()})
    balanced = balance_heads(model, plan, ranks=2)
    perm = balanced.info["head_permutations"]["blocks.0.attn1"]
    assert list(balanced.info["head_permutations"]) == ["blocks.0.attn1"]
    for name in ("blocks.0.attn1", "blocks.0.attn1@10", "blocks.0.attn1#1"):
        assert torch.equal(balanced.sites[name].blocks, entries[name][perm])
    assert torch.equal(balanced.sites["blocks.1.attn1"].blocks, entries["blocks.1.attn1"])


def test_balancing_names_what_it_cannot_do():
    model, _ = wan_with_heads(4)
    blocks = torch.ones(4, 4, 4, dtype=torch.bool)
    plan = Plan(WAN_GRID, (1, 8, 8), 64, {"blocks.9.attn1": SitePlan(4, 8, math.prod(WAN_GRID), 0, 0, blocks)})
    with pytest.raises(PlanError, match="no module of the model is at the plan's site 'blocks.9.attn1'"):
        balance_heads(model, plan, ranks=2)
    model.blocks[0].attn1.fuse_projections()
    with pytest.raises(PlanError, match="fused q/k/v projections"):
        permute_attention_heads(model.blocks[0].attn1, [1, 0, 3, 2])


def test_a_refused_module_leaves_the_whole_model_as_it_was():
    """A HunyuanVideo plan whose site `attn` also names the single-stream blocks' attention (no output
    projection): one PlanError, raised before any module is permuted (the dual-stream and refiner
    modules were permuted in place before the refusal)."""
    model, _ = tiny_hunyuan()
    weights = {name: p.clone() for name, p in model.named_parameters()}
    n = TokenLayout(HUNYUAN_GRID, (1, 8, 9), 64, HUNYUAN_TEXT).n_blocks
    blocks = torch.ones(2, n, n, dtype=torch.bool)
    blocks[0, 0, 1:] = False
    plan = Plan(HUNYUAN_GRID, (1, 8, 9), 64, {"attn": SitePlan(2, 16, math.prod(HUNYUAN_GRID) + HUNYUAN_TEXT,
                                                                HUNYUAN_TEXT, 0, blocks)})
    with pytest.raises(PlanError, match="no output projection"):
        balance_heads(model, plan, ranks=2)
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())
