"""What `backend="compact"` does with no options (chosen by measurement, README "Defaults"): the window
plan, block rectification where the site supports it, the first DEFAULT_DENSE_STEPS steps dense, and
64-token blocks for videos too small for 128."""
import copy
import warnings

import pytest
import torch
from support import WAN_GRID, tiny_wan

import compact_compile
from compact_compile.options import DEFAULT_DENSE_STEPS, SMALL_VIDEO_TOKENS, CompactOptions
from compact_compile.schedule import CLOCK, SAME_TIMESTEP_CALLS, reset_warnings


def relative(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def test_default_values():
    opts = CompactOptions()
    assert opts.plan == "window" and opts.rectify == "auto" and opts.warmup_steps == DEFAULT_DENSE_STEPS > 0
    assert CompactOptions(plan="dense").warmup_steps == 0            # every step is dense anyway
    assert CompactOptions(dense_steps=0).warmup_steps == 0
    assert opts.block_size_for(SMALL_VIDEO_TOKENS) == 128 and opts.block_size_for(SMALL_VIDEO_TOKENS - 1) == 64
    assert CompactOptions(block_size=128).block_size_for(100) == 128
    assert CompactOptions(tile=(1, 8, 16)).block_size_for(100) == 128   # a given tile holds the block
    assert CompactOptions(tile=(1, 8, 8)).block_size_for(10 ** 5) == 64


@pytest.mark.parametrize("value", [-1, True, 2.0, "4"])
def test_bad_dense_steps_is_one_error(value):
    with pytest.raises(compact_compile.OptionsError, match="option 'dense_steps'"):
        CompactOptions(dense_steps=value)


def test_no_options_is_dense_warm_up_then_the_rectified_window():
    """Steps 0..3 equal the model; step 4 equals the window plan with rectification and no warm-up,
    on 64-token blocks (the tiny video has 216 tokens)."""
    model, inputs = tiny_wan()
    CLOCK.reset()
    default = torch.compile(model, backend="compact", options={"inner": "aot_eager"})
    explicit = torch.compile(copy.deepcopy(model), backend="compact",
                             options={"plan": "window", "block_size": 64, "rectify": True, "dense_steps": 0,
                                      "inner": "aot_eager"})
    at = [dict(inputs, timestep=torch.tensor([t])) for t in range(900, 400, -100)]
    with torch.no_grad():
        outs = [(default(**x)[0], model(**x)[0]) for x in at]
        last = explicit(**at[-1])[0]
    for step in range(DEFAULT_DENSE_STEPS):
        assert relative(*outs[step]) < 1e-5, step
    assert relative(outs[-1][0], last) < 1e-6 and relative(outs[-1][0], outs[-1][1]) > 1e-3
    sites = [s for s in compact_compile.report().sites if s["rewritten"]]
    assert sites and all(s["rectify"] == "block" and s["block_size"] == 64 for s in sites), sites


def test_rectification_is_dropped_where_nothing_is_skipped():
    model, inputs = tiny_wan()
    with torch.no_grad():
        out = torch.compile(model, backend="compact", options={"plan": "dense", "rectify": True,
                                                               "inner": "aot_eager"})(**inputs)[0]
        assert relative(out, model(**inputs)[0]) < 1e-5
    sites = [s for s in compact_compile.report().sites if s["rewritten"]]
    assert sites and not any(s["rectify"] for s in sites)


def _regional(model):
    model.compile_repeated_blocks(backend="compact", options={"grid": WAN_GRID, "inner": "aot_eager"})
    return model


def test_regional_compile_gets_the_warm_up_when_follow_steps_feeds_the_steps():
    """Block graphs have no timestep input: without follow_steps no default warm-up (sparse from the first
    call, quietly: nothing was asked for), with it the first steps are dense."""
    model, inputs = tiny_wan()
    with torch.no_grad():
        dense = model(**inputs)[0]
        reset_warnings()
        blind = _regional(copy.deepcopy(model))
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            unfed = blind(**inputs)[0]
        assert relative(unfed, dense) > 1e-3
        torch._dynamo.reset()     # the block graph compiled above would serve the copy below (same code, same guards)
        CLOCK.reset()
        followed = _regional(copy.deepcopy(model))
        handle = compact_compile.follow_steps(followed)
        assert compact_compile.follow_steps(followed) is handle and len(followed._forward_pre_hooks) == 1
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            assert relative(followed(**inputs)[0], dense) < 1e-5   # step 0: the dense warm-up
            for drop in (10, 20, 30, 40):                        # steps 1-4: the hook moves the clock
                later = dict(inputs, timestep=inputs["timestep"] - drop)
                out = followed(**later)[0]
            with torch.no_grad():
                dense_at_4 = model(**later)[0]
            assert relative(out, dense_at_4) > 1e-3                # step 4: past the warm-up, sparse
        handle.remove()


@pytest.mark.parametrize("case", ["hook removed", "per-token timestep"])
def test_follow_steps_gives_no_warm_up_where_it_cannot_tell_the_step(case):
    """A removed hook feeds nothing; a timestep per token (Wan 2.2 TI2V) fed by the hook restarts the
    clock whenever its maximum rises. Either way the block graphs run sparse from the first call, as
    without follow_steps, instead of a warm-up that never ends."""
    model, inputs = tiny_wan()
    handle = compact_compile.follow_steps(model)
    if case == "hook removed":
        handle.remove()
        assert not CLOCK.followed
    else:
        inputs = dict(inputs, timestep=torch.full((1, 216), 500))
    with torch.no_grad():
        dense = model(**inputs)[0]
        compact_compile.report(clear=True)
        out = _regional(model)(**inputs)[0]
    assert relative(out, dense) > 1e-3
    assert compact_compile.report().gained().endswith("skipped per call")


def test_an_asked_for_warm_up_that_cannot_see_the_steps_warns():
    model, inputs = tiny_wan()
    reset_warnings()
    model.compile_repeated_blocks(backend="compact", options={"grid": WAN_GRID, "dense_steps": 2,
                                                              "inner": "aot_eager"})
    with torch.no_grad(), pytest.warns(UserWarning, match="follow_steps"):
        model(**inputs)


def test_follow_steps_needs_a_timestep_argument():
    with pytest.raises(TypeError, match="no `timestep` argument"):
        compact_compile.follow_steps(torch.nn.Linear(2, 2))


def test_a_loop_at_one_timestep_is_told_that_it_stays_in_the_warm_up():
    model, inputs = tiny_wan()
    CLOCK.reset()
    reset_warnings()
    compiled = torch.compile(model, backend="compact", options={"inner": "aot_eager"})
    with torch.no_grad(), pytest.warns(UserWarning, match="all count as denoising step 0"):
        for _ in range(SAME_TIMESTEP_CALLS):
            compiled(**inputs)


def test_a_sampler_is_not_told_it_loops():
    """Classifier-free guidance as two calls per step, over 20 steps: no warning about one timestep."""
    model, inputs = tiny_wan()
    CLOCK.reset()
    reset_warnings()
    compiled = torch.compile(model, backend="compact", options={"inner": "aot_eager"})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for t in range(1000, 0, -50):
            for _ in range(2):
                compiled(**dict(inputs, timestep=torch.tensor([t])))


def test_per_frame_timesteps_get_no_default_warm_up():
    """Diffusion forcing passes a timestep per frame; a frame starting from noise raises the maximum the
    clock reads, which would restart the default warm-up: it is off there (an explicit one stays)."""
    import torch.fx as fx

    from compact_compile.schedule import steps_readable

    graph = fx.Graph()
    graph.placeholder("l_kwargs_timestep_")
    graph.output(None)
    gm = fx.GraphModule(torch.nn.Module(), graph)
    assert not steps_readable(gm, [torch.zeros(1, 21)]) and steps_readable(gm, [torch.zeros(1)])
    model, inputs = tiny_wan()        # Wan takes a timestep per token too (Wan 2.2 TI2V)
    compact_compile.report(clear=True)
    with torch.no_grad():
        torch.compile(model, backend="compact", options={"inner": "aot_eager"})(
            **dict(inputs, timestep=torch.full((1, 216), 900.0)))
    assert compact_compile.report().gained().endswith("skipped per call")        # no "after 4 dense warm-up steps"
    compact_compile.report(clear=True)
    with torch.no_grad():
        torch.compile(copy.deepcopy(model), backend="compact", options={"inner": "aot_eager", "dense_steps": 2})(
            **dict(inputs, timestep=torch.full((1, 216), 900.0)))
    assert compact_compile.report().gained().endswith("after 2 dense warm-up steps")


def test_the_report_says_what_was_gained():
    model, inputs = tiny_wan()
    compact_compile.report(clear=True)
    with torch.no_grad():
        torch.compile(model, backend="compact", options={"inner": "aot_eager"})(**inputs)
    text = str(compact_compile.report())
    header, rows = text.splitlines()[0], [line for line in text.splitlines() if line.startswith("blocks.0.attn1")]
    assert all(col in header for col in ("kernel", "rectify", "dense steps")) and "< 4" in rows[0]
    assert text.splitlines()[-1] == ("2 of 4 attention sites rewritten: 12.5% of their attention work skipped "
                                     "per call, after 4 dense warm-up steps")
    compact_compile.report(clear=True)
    with torch.no_grad():
        torch.compile(model, backend="compact", options={"plan": "dense", "inner": "aot_eager"})(**inputs)
    assert str(compact_compile.report()).splitlines()[-1] == "2 of 4 attention sites rewritten: 0.0% of their " \
                                                             "attention work skipped per call"


def test_the_gain_weighs_each_site_by_its_attention_work():
    """A large site at 10% density and a small one dense: the work skipped is the large site's 90% of
    nearly all the work, not the sites' mean (45%)."""
    from compact_compile.report import Report

    def site(queries, keys, density):
        return dict(site="s", kind="video self-attention", rewritten=True, density=density,
                    q=[1, 2, queries, 8], k=[1, 2, keys, 8])

    big, small = 1024, 64        # the large site's work is queries × keys: 1024 × 4096
    gained = Report([[site(big, 4 * big, 0.1), site(small, small, 1.0)]], []).gained()
    work = (4 * big * big, small * small)
    expected = 1 - (0.1 * work[0] + work[1]) / sum(work)
    assert f"{expected:.1%} of their attention work skipped" in gained and expected > 0.89
