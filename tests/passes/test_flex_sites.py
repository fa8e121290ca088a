"""flex_attention sites: the model's own mask (and score_mod) kept exactly inside the plan's blocks.

The reference is float64 dense attention over the model's token order with two boolean masks AND-ed:
the model's (its mask_mod evaluated at every pair) and the plan's (its kept blocks, as tokens in model
order). A compiled flex costs seconds per new shape on a CPU, so the property tests draw few examples.
"""
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from support import Wrapper, model_order_mask
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import compact_compile
from compact_compile.kernels.model_mask import model_block_states, model_positions, states_over_blocks, touched_blocks
from compact_compile.layout import TokenLayout, auto_tile
from compact_compile.masks import window_blocks
from compact_compile.passes.token_order import tile_of, token_orders
from compact_compile.plan import Plan, SitePlan

BS = 64
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


class FlexVideoAttention(nn.Module):
    """Self-attention over video tokens through flex_attention, the way NABLA-style models call it:
    x `[B, T, H, W, C]` becomes tokens in raster order or, with `tiled_by`, in tiles of that shape
    (NABLA's fractal flatten); the model's BlockMask is `create_block_mask` of a mask_mod over its own
    token positions (a band `|i - j| ≤ radius` of keys that `keep` allows, plus the diagonal), and a
    score_mod adds a per-head key bias. `keep` and `bias` are captured tensors given per call."""

    def __init__(self, dim=32, heads=2, model_block=32, radius=40, tiled_by=None, mask="band"):
        super().__init__()
        self.heads, self.model_block, self.radius, self.tiled_by, self.mask = heads, model_block, radius, tiled_by, mask
        self.qkv = nn.Linear(dim, 3 * dim)

    def tokens(self, x):
        B, T, H, W, C = x.shape
        if self.tiled_by is None:
            return x.flatten(1, 3)
        tt, th, tw = self.tiled_by
        x = x.reshape(B, T // tt, tt, H // th, th, W // tw, tw, C).permute(0, 1, 3, 5, 2, 4, 6, 7)
        return x.flatten(1, 3).flatten(2, 4).flatten(1, 2)

    def untokens(self, o, grid):
        B, C = o.shape[0], o.shape[-1]
        T, H, W = grid
        if self.tiled_by is None:
            return o.unflatten(1, grid)
        tt, th, tw = self.tiled_by
        o = o.reshape(B, T // tt, H // th, W // tw, tt, th, tw, C).permute(0, 1, 4, 2, 5, 3, 6, 7)
        return o.reshape(B, T, H, W, C)

    def attention_inputs(self, x):
        return self.qkv(self.tokens(x)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)

    def model_mask(self, keep, S):
        """The model's mask as bool `[B, 1, S, S]`, every pair evaluated (the reference's view)."""
        i = torch.arange(S)
        return self.mask_mod(keep)(torch.arange(keep.shape[0])[:, None, None, None], 0, i[:, None], i[None, :])

    def mask_mod(self, keep):
        radius = self.radius

        def mask_mod(b, h, q_idx, kv_idx):
            return (keep[b, kv_idx] & ((q_idx - kv_idx).abs() <= radius)) | (q_idx == kv_idx)
        return mask_mod

    def forward(self, x, keep, bias):
        q, k, v = self.attention_inputs(x)
        B, S = q.shape[0], q.shape[-2]

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[h, kv_idx]

        if self.mask == "none":
            o = flex_attention(q, k, v, score_mod=score_mod)
        else:
            block_mask = create_block_mask(self.mask_mod(keep), B, None, S, S, device=x.device,
                                           BLOCK_SIZE=self.model_block)
            o = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)
        return self.untokens(o.transpose(1, 2).flatten(2), x.shape[1:4])


def inputs(grid, dtype, seed, batch=1, dim=32, heads=2):
    g = torch.Generator().manual_seed(seed)
    S = math.prod(grid)
    x = torch.randn(batch, *grid, dim, generator=g).to(dtype)
    keep = torch.rand(batch, S, generator=g) < 0.6
    bias = torch.randn(heads, S, generator=g)
    return x, keep, bias


def plan_mask_in_model_order(layout: TokenLayout, blocks, tiled_by) -> torch.Tensor:
    """bool `[H or 1, S, S]`: the plan's kept blocks as token pairs, in the model's token order."""
    raster = model_order_mask(layout, blocks)
    if tiled_by is None:
        return raster
    order = TokenLayout(layout.grid, tiled_by, math.prod(tiled_by)).source_index()   # model position -> raster
    return raster[..., order[:, None], order[None, :]]


def reference(m: FlexVideoAttention, x, keep, bias, plan_mask=None, use_model_mask=True) -> torch.Tensor:
    """float64 attention over the model's tokens: masked by the model's mask (its mask_mod at every
    pair) and `plan_mask`, scores through the model's score_mod; a query with no key gets 0."""
    with torch.no_grad():
        q, k, v = (t.double() for t in m.attention_inputs(x))
        S = q.shape[-2]
        mask = torch.ones(1, 1, S, S, dtype=torch.bool)
        if use_model_mask and m.mask != "none":
            mask = mask & m.model_mask(keep, S)
        if plan_mask is not None:
            mask = mask & plan_mask[None]
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias.double()[None, :, None, :]
        p = torch.softmax(scores.masked_fill(~mask, -math.inf), -1).nan_to_num(0.0)
        return m.untokens((p @ v).transpose(1, 2).flatten(2), x.shape[1:4])


def compile_and_run(m, options, *calls):
    compiled = torch.compile(m, backend="compact", options={"inner": "eager", "block_size": BS, **options})
    with torch.no_grad():
        outs = [compiled(*c) for c in calls]
    return outs, compact_compile.report().sites


def site_layout(site) -> TokenLayout:
    return TokenLayout(tuple(site["grid"]), tuple(site["tile"]), site["block_size"])


def check_close(out, ref, dtype, what=""):
    assert out.dtype == dtype and torch.isfinite(out).all()
    err = (out.double() - ref).abs().max().item()
    assert err <= TOL[dtype] * ref.abs().max().item(), f"{what} max err {err:.3g}, max |ref| {ref.abs().max():.3g}"


# ----------------------------------------------------------------------------------------------
# against the float64 reference


@st.composite
def problems(draw):
    """A video grid (its token count mostly not a multiple of the block size), the model's token
    order (raster or tiles; tiles of 64 = the block size are the planner's tile too), the model's
    block size and band radius, and a plan: a window, or random per-head blocks (a Plan)."""
    tiled_by = draw(st.sampled_from([None, None, (1, 4, 4), (2, 2, 4), (1, 8, 8)]))
    unit = tiled_by or (1, 1, 1)
    reps = [draw(st.integers(1, 3)), draw(st.integers(1, max(1, 8 // unit[1]))), draw(st.integers(1, 16 // unit[2]))]
    grid = tuple(r * u for r, u in zip(reps, unit))
    assume(48 <= math.prod(grid) <= 320 and sum(g > 1 for g in grid) >= 2)
    plan = draw(st.sampled_from(["window", "window", "random"]))
    window = tuple(draw(st.sampled_from([1, 3])) for _ in range(3))
    # a plan that keeps every block checks nothing of the plan: more than one block, and (under the
    # auto tile the backend mostly picks) a window that drops some
    assume(math.prod(grid) > BS)
    assume(plan == "random" or not window_blocks(TokenLayout(grid, auto_tile(grid, BS), BS), window).all())
    return dict(grid=grid, tiled_by=tiled_by, model_block=draw(st.sampled_from([16, 32, 64, 48])),
                radius=draw(st.integers(8, 96)), plan=plan, window=window, seed=draw(st.integers(0, 2**31)))


def run_problem(p, dtype):
    torch._dynamo.reset()             # each example its own static shapes
    compact_compile.report(clear=True)
    torch.manual_seed(p["seed"] % 1000)
    m = Wrapper(FlexVideoAttention(model_block=p["model_block"], radius=p["radius"], tiled_by=p["tiled_by"])).to(dtype)
    first, second = inputs(p["grid"], dtype, p["seed"]), inputs(p["grid"], dtype, p["seed"] + 1)
    second = (first[0], second[1], second[2])        # same x, new captured mask and bias: nothing may be reused
    S = math.prod(p["grid"])
    if p["plan"] == "window":
        options = {"plan": "window", "window": p["window"]}
    else:
        layout = TokenLayout(p["grid"], (1, 8, 8) if p["grid"][1] % 8 == 0 == p["grid"][2] % 8 else (1, 4, 16), BS)
        g = torch.Generator().manual_seed(p["seed"])
        blocks = (torch.rand(2, layout.n_blocks, layout.n_blocks, generator=g) < 0.5) | torch.eye(layout.n_blocks,
                                                                                                  dtype=torch.bool)
        plan = Plan(p["grid"], layout.tile, BS, {"attn": SitePlan(2, 16, S, 0, 0, blocks)})
        options = {"plan": plan}
    outs, sites = compile_and_run(m, options, first, second)
    (site,) = sites
    assert site["rewritten"] and site["kind"] == "video self-attention" and site["kernel"] == "flex", site
    layout = site_layout(site)
    blocks = window_blocks(layout, p["window"])[None] if p["plan"] == "window" else plan.sites["attn"].blocks
    plan_mask = plan_mask_in_model_order(layout, blocks, p["tiled_by"])
    refs = [reference(m.attn, *args, plan_mask) for args in (first, second)]
    for ref, args in zip(refs, (first, second)):
        # a path that dropped the model's mask or the plan's must miss the tolerance: a problem where
        # either mask moves the result less (a low-precision dtype's loose bound) checks neither
        for wrong in (reference(m.attn, *args, None), reference(m.attn, *args, plan_mask, use_model_mask=False)):
            assume((wrong - ref).abs().max().item() > 4 * TOL[dtype] * ref.abs().max().item())
    for out, ref in zip(outs, refs):
        check_close(out, ref, dtype, str(p))


@settings(max_examples=5, deadline=None)
@given(problems())
def test_flex_site_matches_reference_fp32(problem):
    run_problem(problem, torch.float32)


@settings(max_examples=2, deadline=None)
@given(problems())
def test_flex_site_matches_reference_bf16(problem):
    run_problem(problem, torch.bfloat16)


@settings(max_examples=2, deadline=None)
@given(problems())
def test_flex_site_matches_reference_fp16(problem):
    run_problem(problem, torch.float16)


GRID = (3, 8, 12)     # 288 tokens: five blocks of 64, the last partial


def test_the_models_mask_is_kept_inside_the_plans_blocks():
    """The model's mask excludes keys inside kept blocks: the output is the intersection's, and far
    from the plan's blocks alone (a path that dropped the model's mask fails here)."""
    m = Wrapper(FlexVideoAttention(model_block=16, radius=30))
    args = inputs(GRID, torch.float32, 0)
    (out,), (site,) = compile_and_run(m, {"plan": "window", "window": (1, 3, 3)}, args)
    plan_mask = plan_mask_in_model_order(site_layout(site), window_blocks(site_layout(site), (1, 3, 3))[None], None)
    assert not plan_mask.all() and site["density"] < 1
    check_close(out, reference(m.attn, *args, plan_mask), torch.float32)
    plan_only = reference(m.attn, *args, plan_mask, use_model_mask=False)
    assert (out.double() - plan_only).abs().max() > 1e-2 * plan_only.abs().max()


def test_the_plans_blocks_restrict_the_models_mask():
    """The plan drops blocks the model's mask keeps: the output is the intersection's, and far from
    the model's masked attention alone (a path that ignored the plan fails here)."""
    m = Wrapper(FlexVideoAttention(model_block=16, radius=200))
    args = inputs(GRID, torch.float32, 1)
    (out,), (site,) = compile_and_run(m, {"plan": "window", "window": (1, 1, 1)}, args)
    layout = site_layout(site)
    plan_mask = plan_mask_in_model_order(layout, window_blocks(layout, (1, 1, 1))[None], None)
    check_close(out, reference(m.attn, *args, plan_mask), torch.float32)
    model_only = reference(m.attn, *args)
    assert (out.double() - model_only).abs().max() > 1e-2 * model_only.abs().max()


def test_dense_plan_equals_the_uncompiled_model():
    m = Wrapper(FlexVideoAttention(model_block=32, radius=50, tiled_by=(1, 2, 2)))
    args = inputs(GRID, torch.float32, 2)
    (out,), (site,) = compile_and_run(m, {"plan": "dense"}, args)
    with torch.no_grad():
        ref = m(*args)
    assert site["rewritten"] and site["density"] == 1.0 and site["tokens_tiled_by"] == (1, 2, 2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    check_close(out, reference(m.attn, *args), torch.float32)


@pytest.mark.parametrize("tiled_by", [(1, 4, 4), (1, 8, 8)])
def test_tokens_the_model_orders_in_tiles_get_the_plans_windows(tiled_by):
    """NABLA-style tile order: the plan's window is over the video grid, whatever order the model
    keeps its tokens in; (1, 4, 4) is reordered to the layout's tiles, (1, 8, 8) is the layout's."""
    m = Wrapper(FlexVideoAttention(model_block=16, radius=70, tiled_by=tiled_by))
    args = inputs((2, 16, 16), torch.float32, 4)
    (out,), (site,) = compile_and_run(m, {"plan": "window", "window": (1, 1, 3)}, args)
    layout = site_layout(site)
    assert site["tokens_tiled_by"] == tiled_by and (layout.tile == tiled_by) == (tiled_by == (1, 8, 8))
    plan_mask = plan_mask_in_model_order(layout, window_blocks(layout, (1, 1, 3))[None], tiled_by)
    assert not plan_mask.all()
    check_close(out, reference(m.attn, *args, plan_mask), torch.float32)


def test_a_call_without_a_mask_is_the_plans_blocks():
    """flex_attention without a block_mask carries torch's empty mask (one partial block, mask_mod
    True): rewritten, it is block-sparse attention over the plan's blocks with the model's score_mod."""
    m = Wrapper(FlexVideoAttention(mask="none"))
    args = inputs(GRID, torch.float32, 3)
    (out,), (site,) = compile_and_run(m, {"plan": "window", "window": (1, 1, 3)}, args)
    layout = site_layout(site)
    check_close(out, reference(m.attn, *args, plan_mask_in_model_order(layout, window_blocks(layout, (1, 1, 3))[None],
                                                                          None)), torch.float32)


# ----------------------------------------------------------------------------------------------
# what stays dense, and why


class Variant(nn.Module):
    def __init__(self, case):
        super().__init__()
        self.case = case
        self.qkv = nn.Linear(32, 96)

    def forward(self, x):
        q, k, v = self.qkv(x.flatten(1, 3)).unflatten(-1, (3, 2, -1)).permute(2, 0, 3, 1, 4)
        if self.case == "lse":
            o, lse = flex_attention(q, k, v, return_lse=True)
            o = o * lse[..., None].sigmoid()
        elif self.case == "gqa":
            o = flex_attention(q, k[:, :1], v[:, :1], enable_gqa=True)
        elif self.case == "prescale":
            o = flex_attention(q, k, v, kernel_options={"PRESCALE_QK": True})
        elif self.case == "cached-keys":
            o = flex_attention(q, torch.cat([k, k.flip(2)], 2), torch.cat([v, v], 2))
        else:
            o = flex_attention(q, k, v)
        return o.transpose(1, 2).flatten(2)


@pytest.mark.parametrize("case, options, reason", [
    ("lse", {}, "log-sum-exp"),
    ("gqa", {}, "grouped-query"),
    ("prescale", {}, "PRESCALE_QK"),
    ("cached-keys", {}, "different token sets"),
    ("plain", {"plan": "dynamic"}, "online block choice"),
    ("plain", {"rectify": True}, "rectification"),
])
def test_sites_that_stay_dense_say_why_and_run_unchanged(case, options, reason):
    m = Wrapper(Variant(case))
    x = torch.randn(1, *GRID, 32)
    (out,), (site,) = compile_and_run(m, options, (x,))
    with torch.no_grad():
        ref = m(x)
    assert not site["rewritten"] and reason in site["reason"] and "flex_attention" in site["reason"], site
    assert site["attention"] == "flex_attention"
    torch.testing.assert_close(out, ref)


def test_a_plan_without_the_site_leaves_it_dense():
    """Calibration observes SDPA sites only, so a plan file may have no entry for a flex site: dense,
    with the reason, rather than an error."""
    layout = TokenLayout(GRID, (2, 8, 4), BS)
    plan = Plan(GRID, layout.tile, BS, {"elsewhere": SitePlan(2, 16, layout.seq_len, 0, 0,
                                                               torch.ones(1, layout.n_blocks, layout.n_blocks,
                                                                          dtype=torch.bool))})
    (_,), (site,) = compile_and_run(Wrapper(Variant("plain")), {"plan": plan}, (torch.randn(1, *GRID, 32),))
    assert not site["rewritten"] and "plan has no mask" in site["reason"]


def test_report_lists_flex_sites_like_sdpa_sites():
    m = Wrapper(Variant("plain"))
    compile_and_run(m, {"plan": "window", "window": (1, 1, 1)}, (torch.randn(1, *GRID, 32),))
    (site,) = compact_compile.report().sites
    assert site["site"] == "attn" and site["kind"] == "video self-attention" and site["rewritten"]
    assert site["grid"] == GRID and 0 < site["density"] < 1 and site["kernel"] == "flex"
    assert "attn" in str(compact_compile.report())


# ----------------------------------------------------------------------------------------------
# the pieces


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.sampled_from([(1, 1, 1), (1, 2, 2), (2, 1, 2)]))
def test_tiled_orders_are_recognised(a, b, c, tile):
    grid = (a * tile[0], b * tile[1], c * tile[2])
    order = TokenLayout(grid, tile, math.prod(tile)).source_index()
    found = tile_of(order, grid)
    assert found is not None and torch.equal(TokenLayout(grid, found, math.prod(found)).source_index(), order)
    shuffled = order[torch.randperm(len(order), generator=torch.Generator().manual_seed(a + b + c))]
    if not torch.equal(shuffled, order) and len(order) > 2:
        assert tile_of(shuffled, grid) is None or torch.equal(
            TokenLayout(grid, tile_of(shuffled, grid), 1).source_index(), shuffled)


def test_the_graph_shows_a_fractal_token_order():
    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    m = FlexVideoAttention(tiled_by=(1, 2, 2))
    with torch.no_grad():
        torch.compile(m, backend=keep_graph)(*inputs((2, 4, 6), torch.float32, 0))
    tiled = [o for o in token_orders(graphs[0]) if o.tile is not None]
    assert tiled and {(o.grid, o.tile) for o in tiled} == {((2, 4, 6), (1, 2, 2))}


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(2, 5), st.integers(2, 7), st.sampled_from([None, (1, 2, 1)]),
       st.sampled_from([3, 4, 8, 16]), st.sampled_from([4, 8, 16]), st.integers(0, 2**31))
def test_block_states_over_tile_blocks_match_the_token_pairs(T, H, W, tiled_by, model_block, bs, seed):
    """For every tile block pair: the least and greatest model block state over its token pairs."""
    grid = (T, H * (tiled_by[1] if tiled_by else 1), W)
    layout = TokenLayout(grid, (1, 2, 2) if bs == 4 else (1, 2, 4) if bs == 8 else (1, 4, 4), bs)
    S, g = layout.seq_len, torch.Generator().manual_seed(seed)
    nq = -(-S // model_block)
    state = torch.randint(0, 3, (1, 2, nq, nq), generator=g, dtype=torch.int8)
    src = model_positions(layout, tiled_by)
    touched = touched_blocks(src // model_block, bs)
    least, greatest = states_over_blocks(state, touched, touched)
    pairs = state[:, :, (src // model_block)[:, None], (src // model_block)[None, :]]      # [1, 2, S, S], tile order
    nb = layout.n_blocks
    padded = torch.nn.functional.pad(pairs.int(), (0, nb * bs - S, 0, nb * bs - S), value=-1).view(1, 2, nb, bs, nb, bs)
    want_max = padded.amax((3, 5))
    want_min = padded.masked_fill(padded < 0, 9).amin((3, 5))
    assert torch.equal(greatest.int(), want_max) and torch.equal(least.int(), want_min)


def test_model_block_states_reads_partial_and_full_lists():
    num, idx = torch.tensor([[[1, 0]]], dtype=torch.int32), torch.tensor([[[[1, 0], [0, 1]]]], dtype=torch.int32)
    full_num, full_idx = torch.tensor([[[1, 1]]], dtype=torch.int32), torch.tensor([[[[0, 1], [0, 1]]]],
                                                                                   dtype=torch.int32)
    assert model_block_states(num, idx, full_num, full_idx).tolist() == [[[[2, 1], [2, 0]]]]
    assert model_block_states(num, idx).tolist() == [[[[0, 1], [0, 0]]]]
    repeated = torch.tensor([[[[1, 1], [0, 0]]]], dtype=torch.int32)     # past num: arbitrary, here block 1 again
    assert model_block_states(num, repeated).tolist() == [[[[0, 1], [0, 0]]]]
