"""calibrate() on an unchanged tiny diffusers Wan model, then the backend running the plan it wrote."""
import math

import pytest
import torch
from support import masked_sdpa, model_order_mask, rel_err, tiny_wan

import compact_compile
from compact_compile.calibrate import calibrate
from compact_compile.layout import TokenLayout
from compact_compile.schedule import CLOCK

LATENT = (1, 4, 4, 32, 32)             # patch (1, 2, 2) → grid (4, 16, 16) = 1024 tokens
OPTIONS = dict(block_size=64, tile=(1, 8, 8))   # tile grid (4, 2, 2): 16 blocks, 4 tile frames
TIMESTEPS = [999, 750, 500, 250]       # steps 0..3 of a generation


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(LATENT, generator=g), torch.randn(1, 12, 32, generator=g)


def test_calibrate_tiny_wan_then_run_the_plan(tmp_path):
    model, _ = tiny_wan()
    uncond = torch.zeros(1, 12, 32)
    x0, cond0 = _inputs(1)
    with torch.no_grad():
        eager = model(x0, torch.tensor([750]), cond0, return_dict=False)[0]
    cal = calibrate(model, recall=0.9, cost=math.inf, dense_steps=1, step_ranges=[(1, 3), (3, None)],
                    inner="aot_eager", options=OPTIONS)
    with cal:
        for seed in (1, 2):                                  # two calibration inputs (generations)
            x, cond = _inputs(seed)
            for t in TIMESTEPS:                              # CFG: conditional and unconditional call per step
                out = model(hidden_states=x, timestep=torch.tensor([t]), encoder_hidden_states=cond,
                            return_dict=False)[0]
                model(hidden_states=x, timestep=torch.tensor([t]), encoder_hidden_states=uncond, return_dict=False)
                if seed == 1 and t == 750:                   # calibration runs dense attention: output unchanged
                    assert rel_err(out, eager) < 1e-5
    assert model._compiled_call_impl is None                 # the model is given back unchanged
    assert CLOCK.generation == 2

    plan = cal.plan
    sites = ["blocks.0.attn1", "blocks.1.attn1"]
    assert list(plan.sites) == sites + [s + "@3" for s in sites]
    info = plan.info
    assert info["schedule"] == dict(dense_steps=1, ranges=[[1, 3], [3, None]], step_source="timestep")
    cal_info = info["calibration"]
    assert cal_info["inputs"] == dict(calls=12, generations=2, samples=8)   # steps 1–3 × 2 calls × 2 inputs
    assert (cal_info["recall"], cal_info["cost"], cal_info["library"]) == (0.9, math.inf, compact_compile.__version__)
    assert cal_info["fingerprint"]["sites"] == 2 and cal_info["fingerprint"]["shapes"] == {"H2 D16 S1024": 2}
    for name in plan.sites:
        assert min(info["heads"][name]["recall"]) >= 0.9
    assert all(s.density < 1.0 for s in plan.sites.values())                # something was dropped
    path = tmp_path / "tiny.plan.safetensors"
    plan.save(path)
    back = compact_compile.load_plan(path)
    assert back.info == info and all(torch.equal(back.sites[n].blocks, plan.sites[n].blocks) for n in plan.sites)

    # the backend follows the plan and its schedule, with the step read from the timestep input
    CLOCK.reset()
    fast = torch.compile(model, backend="compact", options={"plan": str(path), "rectify": False, "inner": "aot_eager"}, dynamic=False)
    layout = TokenLayout(plan.grid, plan.tile, plan.block_size)
    x, cond = _inputs(3)
    with torch.no_grad():
        for step, t in enumerate(TIMESTEPS):
            ts = torch.tensor([t])
            out = fast(x, ts, cond, return_dict=False)[0]          # positional timestep
            fast(x, ts, uncond, return_dict=False)                # CFG's second call: same step
            assert CLOCK.step == step
            dense = model(x, ts, cond, return_dict=False)[0]
            if step == 0:
                assert rel_err(out, dense) < 1e-5
                continue
            suffix = "" if step < 3 else "@3"
            masks = [model_order_mask(layout, plan.sites[s + suffix].blocks) for s in sites]
            with masked_sdpa({layout.seq_len: masks}) as masked:
                ref = model(x, ts, cond, return_dict=False)[0]
            assert masked == [layout.seq_len] * 2
            assert rel_err(out, ref) < 1e-4, step
            assert rel_err(out, dense) > 1e-3, step               # and it is not dense attention


def test_no_statistics_in_the_step_range_is_an_error():
    model, _ = tiny_wan()
    x, cond = _inputs(0)
    with calibrate(model, dense_steps=10, inner="eager", options=OPTIONS) as cal:
        for t in TIMESTEPS:
            model(x, torch.tensor([t]), cond, return_dict=False)
    with pytest.raises(ValueError, match=r"no attention statistics were recorded in step range \[10, None\]"):
        cal.plan


def test_inference_options_do_not_change_what_calibration_records():
    """The options a user runs the plan with (FP8 attention, online choice) can be handed to calibrate:
    its sites still run dense attention in the inputs' dtype and record the same statistics (FP8 made
    it call an op its recorder lacks; online choice would skip blocks it is there to measure)."""
    model, _ = tiny_wan()
    x, cond = _inputs(1)
    plans = []
    for extra in ({}, dict(fp8_attention=True, dynamic=True)):
        torch._dynamo.reset()
        with calibrate(model, recall=0.9, cost=math.inf, dense_steps=0, inner="aot_eager",
                       options=dict(OPTIONS, **extra)) as cal, torch.no_grad():
            model(hidden_states=x, timestep=torch.tensor([500]), encoder_hidden_states=cond, return_dict=False)
        plans.append(cal.plan)
    assert plans[0].sites.keys() == plans[1].sites.keys()
    assert all(torch.equal(plans[0].sites[n].blocks, plans[1].sites[n].blocks) for n in plans[0].sites)
    assert plans[0].info["heads"] == plans[1].info["heads"]


@pytest.mark.parametrize("settings, match", [
    (dict(recall=1.5), r"recall target τ must be in \(0, 1\), not 1.5"),
    (dict(cost=0.0), "cost limit λ must be > 0"),
    (dict(density=2.0), r"density must be in \(0, 1\], not 2.0"),
    (dict(merge="max"), "merge must be one of"),
    (dict(groups=(3, 1)), "must be increasing non-negative"),
    (dict(dense_layers=-2), "dense_layers must be an int ≥ 0"),
])
def test_bad_search_settings_are_refused_before_anything_is_recorded(settings, match):
    """They surfaced at .plan, after the recording (minutes on a real model); dense_layers=-2 never."""
    model, _ = tiny_wan()
    with pytest.raises(ValueError, match=match):
        calibrate(model, **settings)
