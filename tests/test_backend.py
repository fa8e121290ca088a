"""The `compact` backend end to end, on tiny diffusers video transformers (random weights, CPU).

Inductor compiles cost 10-30 s each on a small CPU machine: only the two `plan="dense"` tests use the
default inner compiler; the others use `inner="aot_eager"` (same rewritten graph, no codegen).
"""
import copy
import logging
import math
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from support import (AS_PLANNED, COG_GRID, COG_TEXT, WAN_GRID, masked_sdpa, model_order_mask, raises_from_backend, rectified_sdpa,
                     rel_err, tiny_cogvideox, tiny_wan, to_double)

import compact_compile
from compact_compile.kernels.rectified import pooled, tile_pooled
from compact_compile.kernels.site import SiteAttention
from compact_compile.layout import TokenLayout, auto_tile
from compact_compile.masks import video_site_blocks, window_blocks
from compact_compile.passes.sites import CROSS, JOINT, VIDEO
from compact_compile.plan import Plan, SitePlan
from compact_compile.planner import load_plan
from compact_compile.schedule import make_schedule

WAN_S = math.prod(WAN_GRID)                 # 216
COG_S = math.prod(COG_GRID) + COG_TEXT      # 204


class CallCounter:
    """observer option: counts the calls of each rewritten site's kernel (proves the op really runs)."""

    def __init__(self):
        self.calls = {}

    def __call__(self, spec, site):
        def counted(q, k, v, scale=None, pools=None, key_valid=None):
            self.calls[spec.name] = self.calls.get(spec.name, 0) + 1
            return site(q, k, v, scale, pools, key_valid)
        return counted


def relative(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def reference_f64(model, inputs, masks_by_len):
    """The model in float64, with each rewritten site's SDPA replaced by masked dense attention."""
    ref_model = copy.deepcopy(model).double()
    with torch.no_grad(), masked_sdpa(masks_by_len) as masked:
        out = ref_model(**to_double(inputs))[0]
    return out, masked


# ----------------------------------------------------------------------------------------------
# plan="dense", default inner compiler (Inductor): the model is unchanged up to float rounding


def dense_plan_run(model, inputs):
    """Compile with plan="dense" and the default Inductor; assert the output equals the uncompiled
    model's (≤ 1e-5, L2 and max relative); return the report's sites and the per-site call counts."""
    counter = CallCounter()
    with torch.no_grad():
        ref = model(**inputs)[0]
        out = torch.compile(model, backend="compact",
                            options={"plan": "dense", "block_size": 64, "observer": counter})(**inputs)[0]
    assert relative(out, ref) <= 1e-5
    assert rel_err(out, ref) <= 1e-5
    return compact_compile.report().sites, counter


def test_wan_dense_inductor_equals_uncompiled():
    sites, counter = dense_plan_run(*tiny_wan())
    assert [(s["site"], s["kind"], s["rewritten"]) for s in sites] == [
        ("blocks.0.attn1", VIDEO, True), ("blocks.0.attn2", CROSS, False),
        ("blocks.1.attn1", VIDEO, True), ("blocks.1.attn2", CROSS, False)]
    assert counter.calls == {"blocks.0.attn1": 1, "blocks.1.attn1": 1}
    for s in sites:
        if s["rewritten"]:
            assert tuple(s["grid"]) == WAN_GRID and "Conv3d patch embedding" in s["grid_source"]
            assert s["density"] == 1.0 and s["reason"] is None and s["q"] == [1, 2, WAN_S, 16]
        else:
            assert s["density"] is None and "different token sets" in s["reason"] and s["k"][2] == 12


def test_cogvideox_dense_inductor_equals_uncompiled():
    sites, counter = dense_plan_run(*tiny_cogvideox())
    assert [s["site"] for s in sites] == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    assert counter.calls == {s["site"]: 1 for s in sites}
    for s in sites:
        # joint attention: 12 text tokens before the 192 video tokens
        assert s["kind"] == JOINT and s["rewritten"] and s["n_text"] == COG_TEXT and s["n_before"] == COG_TEXT
        assert tuple(s["grid"]) == COG_GRID and "Conv2d over frames" in s["grid_source"]
        assert s["density"] == 1.0 and s["q"] == [1, 2, COG_S, 16]


# ----------------------------------------------------------------------------------------------
# sparse plans: equal to a float64 model whose attention uses the same mask, densely


def test_wan_window_equals_masked_float64_reference():
    model, inputs = tiny_wan()
    window = (1, 3, 3)
    with torch.no_grad():
        compiled = torch.compile(model, backend="compact", fullgraph=True,
                                 options={**AS_PLANNED, "plan": "window", "window": window, "block_size": 64, "inner": "aot_eager"})
        out = compiled(**inputs)[0]
        dense = model(**inputs)[0]
    layout = TokenLayout(WAN_GRID, auto_tile(WAN_GRID, 64), 64)
    blocks = window_blocks(layout, window)
    assert 0 < blocks.float().mean() < 1
    ref, masked = reference_f64(model, inputs, {WAN_S: [model_order_mask(layout, blocks[None])]})
    assert masked == [WAN_S, WAN_S]                 # both self-attention sites, not the cross-attention
    assert relative(out, ref) < 1e-5
    assert relative(dense, ref) > 1e-3              # the mask changes the result: the test can fail
    report = compact_compile.report()
    assert len(report.graphs) == 1                  # one graph, fullgraph=True: no graph break
    rewritten = [s for s in report.sites if s["rewritten"]]
    assert [s["site"] for s in rewritten] == ["blocks.0.attn1", "blocks.1.attn1"]
    assert all(s["density"] == pytest.approx(blocks.float().mean().item()) for s in rewritten)


def test_wan_per_head_plan_file_equals_masked_float64_reference(tmp_path):
    """A plan with different random block maps per site and per head, through a plan file."""
    model, inputs = tiny_wan()
    tile = (1, 8, 8)
    plan = Plan(WAN_GRID, tile, 64, info={"made by": "test"})
    layout = TokenLayout(WAN_GRID, tile, 64)
    gen = torch.Generator().manual_seed(0)
    masks = []
    for i in range(2):
        blocks = (torch.rand(2, layout.n_blocks, layout.n_blocks, generator=gen) < 0.4) | torch.eye(
            layout.n_blocks, dtype=torch.bool)
        plan.sites[f"blocks.{i}.attn1"] = SitePlan(2, 16, WAN_S, 0, 0, blocks)
        masks.append(model_order_mask(layout, blocks))
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[0][0], masks[0][1])
    plan.save(tmp_path / "wan.plan.safetensors")
    with torch.no_grad():
        out = torch.compile(model, backend="compact", fullgraph=True,
                            options={**AS_PLANNED, "plan": str(tmp_path / "wan.plan.safetensors"), "inner": "aot_eager"})(**inputs)[0]
    ref, masked = reference_f64(model, inputs, {WAN_S: masks})
    assert masked == [WAN_S, WAN_S]
    assert relative(out, ref) < 1e-5
    swapped, _ = reference_f64(model, inputs, {WAN_S: masks[::-1]})  # site order matters
    assert relative(swapped, ref) > 1e-3
    sites = [s for s in compact_compile.report().sites if s["rewritten"]]
    assert [s["grid_source"] for s in sites] == ["plan", "plan"]
    assert [s["density"] for s in sites] == pytest.approx([p.density for p in plan.sites.values()])


def test_dense_steps_run_dense_then_the_window():
    """dense_steps=2 on the built-in window plan: steps 0 and 1 (timesteps 900, 800) equal the
    uncompiled model, step 2 (700) equals the window plan without a schedule."""
    model, inputs = tiny_wan()
    options = {**AS_PLANNED, "plan": "window", "window": (1, 3, 3), "block_size": 64, "inner": "aot_eager"}
    warm = torch.compile(model, backend="compact", options=dict(options, dense_steps=2))
    window = torch.compile(copy.deepcopy(model), backend="compact", options=options)
    at = [dict(inputs, timestep=torch.tensor([t])) for t in (900, 800, 700)]
    with torch.no_grad():
        outs = [(warm(**x)[0], model(**x)[0]) for x in at]
        sparse = window(**at[2])[0]
    assert relative(outs[0][0], outs[0][1]) < 1e-5 and relative(outs[1][0], outs[1][1]) < 1e-5
    assert relative(outs[2][0], sparse) < 1e-6 and relative(outs[2][0], outs[2][1]) > 1e-3


def test_dense_steps_contradicting_the_plan_schedule_is_one_error(tmp_path):
    plan = Plan(WAN_GRID, (1, 8, 8), 64, info={"schedule": make_schedule(3)})
    plan.save(tmp_path / "p.safetensors")
    with pytest.raises(compact_compile.OptionsError, match="option 'dense_steps' 2 contradicts the plan's schedule"):
        load_plan(compact_compile.CompactOptions(plan=str(tmp_path / "p.safetensors"), dense_steps=2))


def test_regional_compile_of_the_repeated_blocks_equals_whole_model_compile(tmp_path):
    """diffusers' compile_repeated_blocks: one block graph (site "attn1") for every layer; the grid
    must come from the options (the patch embedding is outside the block graph)."""
    model, inputs = tiny_wan()
    options = {**AS_PLANNED, "plan": "window", "window": (1, 3, 3), "block_size": 64, "grid": WAN_GRID, "inner": "aot_eager"}
    with torch.no_grad():
        whole = torch.compile(copy.deepcopy(model), backend="compact", options=options)(**inputs)[0]
        compact_compile.report(clear=True)
        regional = copy.deepcopy(model)
        regional.compile_repeated_blocks(backend="compact", options=options)
        out = regional(**inputs)[0]
        assert relative(out, whole) < 1e-6 and relative(out, model(**inputs)[0]) > 1e-3
    assert [s["site"] for s in compact_compile.report().sites if s["rewritten"]] == ["attn1"]
    plan = Plan(WAN_GRID, (1, 8, 8), 64)
    layout = TokenLayout(WAN_GRID, (1, 8, 8), 64)
    plan.sites["blocks.0.attn1"] = SitePlan(2, 16, WAN_S, 0, 0, window_blocks(layout, (1, 3, 3))[None])
    per_layer = copy.deepcopy(model)
    per_layer.compile_repeated_blocks(backend="compact", options=dict(options, plan=plan, grid=None))
    with torch.no_grad(), raises_from_backend(compact_compile.PlanError, "regional compilation"):
        per_layer(**inputs)


def test_cogvideox_window_equals_masked_float64_reference():
    model, inputs = tiny_cogvideox()
    window = (1, 1, 1)
    with torch.no_grad():
        out = torch.compile(model, backend="compact", fullgraph=True,
                            options={**AS_PLANNED, "plan": "window", "window": window, "block_size": 64,
                                     "inner": "aot_eager"})(**inputs)[0]
        dense = model(**inputs)[0]
    layout = TokenLayout(COG_GRID, auto_tile(COG_GRID, 64), 64, COG_TEXT, n_before=COG_TEXT)
    blocks = video_site_blocks(layout, window_blocks(layout, window))
    assert 0 < blocks.float().mean() < 1
    mask = model_order_mask(layout, blocks[None])
    assert mask[0, :COG_TEXT].all() and mask[0, :, :COG_TEXT].all()   # text first: dense rows and columns
    ref, masked = reference_f64(model, inputs, {COG_S: [mask]})
    assert masked == [COG_S, COG_S]
    assert relative(out, ref) < 1e-5
    assert relative(dense, ref) > 1e-3
    # the same mask with the text assumed last is a different computation
    wrong = model_order_mask(TokenLayout(COG_GRID, layout.tile, 64, COG_TEXT, n_before=0), blocks[None])
    wrong_ref, _ = reference_f64(model, inputs, {COG_S: [wrong]})
    assert relative(wrong_ref, ref) > 1e-3
    sites = compact_compile.report().sites
    assert all(s["kind"] == JOINT and s["n_before"] == COG_TEXT and s["rewritten"] for s in sites)


@pytest.mark.parametrize("model_name", ["wan", "cogvideox"])
def test_rectified_window_equals_float64_reference(model_name, monkeypatch):
    """plan="window" + rectify: every self-attention site reorders and pools q, k, v in one op
    (compact.tile_pool), its kernel uses those statistics, and (FlexAttention on CPU) hands O, R, Ō
    back for the graph to merge; the model equals the float64 model with each site replaced by the
    rectified reference (video-only and joint text-first sites)."""
    from compact_compile.kernels import ops, rectified, site
    tile_pool_calls, pool_calls, parts_calls = [], [], []
    monkeypatch.setattr(ops, "tile_pooled", lambda *a: tile_pool_calls.append(1) or tile_pooled(*a))
    for module in (rectified, site):   # pooled inside tile_pooled, or (it must not) by the site again
        monkeypatch.setattr(module, "pooled", lambda *a: pool_calls.append(1) or pooled(*a))
    parts = SiteAttention.parts
    monkeypatch.setattr(SiteAttention, "parts", lambda *a: parts_calls.append(1) or parts(*a))
    model, inputs = tiny_wan() if model_name == "wan" else tiny_cogvideox()
    grid, n_text, S = (WAN_GRID, 0, WAN_S) if model_name == "wan" else (COG_GRID, COG_TEXT, COG_S)
    layout = TokenLayout(grid, auto_tile(grid, 64), 64, n_text, n_before=n_text)
    blocks = video_site_blocks(layout, window_blocks(layout, (1, 1, 1)))[None]
    with torch.no_grad():
        out = torch.compile(model, backend="compact", fullgraph=True,
                            options={**AS_PLANNED, "plan": "window", "window": (1, 1, 1), "block_size": 64, "rectify": True,
                                     "inner": "aot_eager"})(**inputs)[0]
    assert len(tile_pool_calls) == len(pool_calls) == len(parts_calls) == 2   # the kernel pooled nothing again
    ref_model = copy.deepcopy(model).double()
    with torch.no_grad(), rectified_sdpa(layout, blocks, dynamic=False, rectify=True) as handled:
        ref = ref_model(**to_double(inputs))[0]
    assert handled == [S, S]
    assert relative(out, ref) < 1e-5
    plain, _ = reference_f64(model, inputs, {S: [model_order_mask(layout, blocks)]})
    assert relative(plain, ref) > 1e-4                 # rectification changes the result: the test can fail


def test_rectified_with_dense_steps_runs_dense_then_rectified():
    """rectify under a step schedule: the dense step's kernel has no parts of its own (R = 1, Ō = 0
    stand in), so step 0 equals the uncompiled model and step 1 the schedule-free rectified model."""
    model, inputs = tiny_wan()
    options = {**AS_PLANNED, "plan": "window", "window": (1, 1, 1), "block_size": 64, "rectify": True, "inner": "aot_eager"}
    scheduled = torch.compile(model, backend="compact", options=dict(options, dense_steps=1))
    rectified = torch.compile(copy.deepcopy(model), backend="compact", options=options)
    at = [dict(inputs, timestep=torch.tensor([t])) for t in (900, 800)]
    with torch.no_grad():
        steps = [scheduled(**x)[0] for x in at]
        dense, sparse = model(**at[0])[0], rectified(**at[1])[0]
    assert relative(steps[0], dense) < 1e-5
    assert relative(steps[1], sparse) < 1e-6 and relative(steps[1], model(**at[1])[0]) > 1e-3


# ----------------------------------------------------------------------------------------------
# graph breaks, report, logging, entry point


def test_no_graph_breaks():
    model, inputs = tiny_wan()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(**inputs)
    assert explained.graph_count == 1 and explained.graph_break_count == 0


def test_report_and_log_line(caplog):
    model, inputs = tiny_wan()
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="compact_compile"):
        torch.compile(model, backend="compact",
                      options={"plan": "window", "block_size": 64, "inner": "eager"})(**inputs)
    report = compact_compile.report()
    assert len(report.sites) == 4
    for s in report.sites:
        assert {"site", "kind", "q", "k", "dtype", "rewritten", "reason", "grid", "grid_source", "density"} <= set(s)
    text = str(report)
    for s in report.sites:
        assert s["site"] in text and s["kind"] in text
    assert "Conv3d patch embedding" in text and "different token sets" in text
    assert "graph with 4 attention sites, 2 rewritten" in caplog.text
    assert "blocks.0.attn2 [cross-attention] dense" in caplog.text
    assert compact_compile.report(clear=True).sites and not compact_compile.report().sites


ENTRY_POINT_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(32, 96)

        def forward(self, x):
            q, k, v = self.qkv(x).unflatten(-1, (3, 2, 16)).permute(2, 0, 3, 1, 4)
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)

    torch.manual_seed(0)
    model, x = Attn().eval(), torch.randn(1, 128, 32)
    assert "compact" in torch._dynamo.list_backends()
    assert not any(m.startswith("compact_compile") for m in sys.modules), "imported too early"
    compiled = torch.compile(model, backend="compact",
                             options={"grid": (2, 8, 8), "tile": (1, 8, 8), "plan": "window", "window": (1, 1, 1),
                                      "rectify": False, "dense_steps": 0,
                                      "block_size": 64, "inner": "eager"})
    with torch.no_grad():
        out = compiled(x)
    assert "compact_compile" in sys.modules
    site = sys.modules["compact_compile"].report().sites[0]
    print("REWRITTEN", site["rewritten"], site["density"])
    # tile (1, 8, 8), window (1, 1, 1): one block per frame, each frame attends to itself only
    with torch.no_grad():
        q, k, v = model.qkv(x).unflatten(-1, (3, 2, 16)).permute(2, 0, 3, 1, 4)
        ref = torch.cat([F.scaled_dot_product_attention(q[:, :, f], k[:, :, f], v[:, :, f])
                         for f in (slice(0, 64), slice(64, 128))], 2).transpose(1, 2).flatten(2)
    print("MAXDIFF", (out - ref).abs().max().item())
""")


def test_entry_point_in_a_fresh_interpreter(tmp_path):
    """torch.compile(backend="compact") with no import of compact_compile, as a framework would call it."""
    proc = subprocess.run([sys.executable, "-c", ENTRY_POINT_SCRIPT], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.split(" ", 1)[0] in
                 ("REWRITTEN", "MAXDIFF"))
    assert lines["REWRITTEN"] == "True 0.5"
    assert float(lines["MAXDIFF"]) < 1e-5


@pytest.mark.parametrize("inductor", [None, {"coordinate_descent_tuning": True, "max_autotune": False}])
def test_mode_and_inductor_options_reach_inductor(monkeypatch, inductor):
    """torch.compile refuses mode and options together, and with backend="compact" its options are
    ours: the mode option carries the mode, the inductor option Inductor's config, over the mode's."""
    import torch._inductor.compile_fx as compile_fx

    seen, real = [], compile_fx.compile_fx

    def spy(gm, inputs, config_patches=None, **kwargs):
        if kwargs:  # not the backend's call (e.g. the compiled FlexAttention's own)
            return real(gm, inputs, config_patches=config_patches, **kwargs)
        seen.append(config_patches)
        return gm.forward

    monkeypatch.setattr(compile_fx, "compile_fx", spy)
    model, inputs = tiny_wan()
    options = {"plan": "dense", "kernel": "flex", "mode": "max-autotune-no-cudagraphs", "inductor": inductor}
    with torch.no_grad():
        torch.compile(model, backend="compact", options=options)(**inputs)
    assert seen == [{**torch._inductor.list_mode_options("max-autotune-no-cudagraphs"), **(inductor or {})}]
    assert seen[0]["max_autotune"] == (inductor is None) and seen[0]["coordinate_descent_tuning"]
    assert not seen[0].get("triton.cudagraphs", False)


def test_every_video_size_keeps_its_sparse_attention():
    """A plain torch.compile meets a second video size: Dynamo's automatic dynamic shapes recompile
    with a symbolic sequence length. Each size still runs its own sparse graph — the first size
    too, after the second — equal to a static compile of that size, and the report lists them."""
    model, inputs = tiny_wan()
    options = {**AS_PLANNED, "plan": "window", "window": (1, 3, 3), "block_size": 64, "inner": "aot_eager"}
    small = dict(inputs, hidden_states=inputs["hidden_states"][..., :16])          # grid (3, 8, 8)
    compiled = torch.compile(model, backend="compact", options=options)
    with torch.no_grad():
        outs = [compiled(**x)[0] for x in (inputs, small, inputs, small)]
    rewritten = [s for s in compact_compile.report().sites if s["rewritten"]]
    assert sorted({s["q"][2] for s in rewritten}) == [192, WAN_S]        # both sizes, rewritten
    assert not any("symbolic" in (s["reason"] or "") for s in compact_compile.report().sites)
    for x, out in zip((inputs, small, inputs, small), outs):
        torch._dynamo.reset()
        with torch.no_grad():
            want = torch.compile(copy.deepcopy(model), backend="compact", dynamic=False, options=options)(**x)[0]
            dense = model(**x)[0]
        assert relative(out, want) < 1e-6 and relative(out, dense) > 1e-3


def test_a_graph_with_no_sparse_attention_warns_once_with_the_reasons():
    """Video self-attention left dense (here: no grid can be found, and none is given) is one
    warning naming the site and why; a graph that runs sparse says nothing."""
    from support import SelfAttention, Wrapper
    model, x = Wrapper(SelfAttention()).eval(), torch.randn(1, 128, 32)
    with torch.no_grad(), pytest.warns(UserWarning, match=r"no attention in this graph runs block-sparse.*attn: no video grid"):
        torch.compile(model, backend="compact", options={"plan": "window", "inner": "eager"})(x)
    torch._dynamo.reset()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.compile(model, backend="compact", options={"plan": "window", "grid": (2, 8, 8), "block_size": 64,
                                                         "inner": "eager"})(x)


def test_a_grid_option_contradicting_the_patch_embedding_is_an_error():
    model, inputs = tiny_wan()          # its Conv3d makes a (3, 8, 9) grid
    with torch.no_grad(), pytest.raises(compact_compile.OptionsError, match=r"option 'grid' \(3, 9, 8\) contradicts"):
        torch.compile(model, backend="compact", options={"plan": "window", "grid": (3, 9, 8), "block_size": 64,
                                                          "inner": "eager"})(**inputs)


def test_a_plan_matches_sites_of_a_wrapped_model(tmp_path):
    """Site names are module paths below the compiled module: a plan calibrated on the bare model
    serves the same model compiled inside a wrapper (and the other way round)."""
    model, inputs = tiny_wan()
    layout = TokenLayout(WAN_GRID, (1, 8, 8), 64)
    plan = Plan(WAN_GRID, (1, 8, 8), 64)
    for i in range(2):
        plan.sites[f"blocks.{i}.attn1"] = SitePlan(2, 16, WAN_S, 0, 0, window_blocks(layout, (1, 1, 1))[None])

    class Pipeline(torch.nn.Module):
        def __init__(self, transformer):
            super().__init__()
            self.transformer = transformer

        def forward(self, **kw):
            return self.transformer(**kw)

    with torch.no_grad():
        options = {**AS_PLANNED, "plan": plan, "inner": "eager"}
        bare = torch.compile(copy.deepcopy(model), backend="compact", options=options)(**inputs)[0]
        wrapped = torch.compile(Pipeline(model), backend="compact", options=options)(**inputs)[0]
    names = [s["site"] for s in compact_compile.report().sites if s["rewritten"]]
    assert names == ["blocks.0.attn1", "blocks.1.attn1", "transformer.blocks.0.attn1", "transformer.blocks.1.attn1"]
    assert relative(wrapped, bare) < 1e-6
