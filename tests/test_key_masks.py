"""Key-padding masks: joint text+video attention whose attn_mask excludes padded prompt tokens
(HunyuanVideo; Mochi through compact_compile.models) is rewritten, and every kernel honours the mask;
a mask the graph does not prove to be a key mask stays dense, with its reason."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from support import (AS_PLANNED, HUNYUAN_GRID, HUNYUAN_TEXT, MOCHI_GRID, MOCHI_TEXT, masked_sdpa, model_order_mask, rectified_sdpa,
                     tiny_hunyuan, tiny_mochi, to_double)

import compact_compile
from compact_compile.layout import TokenLayout, auto_tile
from compact_compile.masks import video_site_blocks, window_blocks
from compact_compile.models import install_model_fixes
from compact_compile.passes.sites import JOINT

HUNYUAN_S = math.prod(HUNYUAN_GRID) + HUNYUAN_TEXT
MOCHI_S = math.prod(MOCHI_GRID) + MOCHI_TEXT
WINDOW = (1, 3, 3)
KERNELS = ["flex", "triton"]   # triton: the CPU interpreter here, the compiled kernel on a GPU
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"   # the kernel cases run here (Triton needs it)


def on_device(model, inputs):
    """`model` and the tensors of `inputs` on DEVICE."""
    return model.to(DEVICE), {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def relative(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def joint_layout(grid, n_text):
    return TokenLayout(grid, auto_tile(grid, 64), 64, n_text, n_before=0)


def window_mask(layout):
    return model_order_mask(layout, video_site_blocks(layout, window_blocks(layout, WINDOW))[None])


def reference(model, inputs, masks_by_len, ignore_key_mask=False):
    ref_model = copy.deepcopy(model).double()
    with torch.no_grad(), masked_sdpa(masks_by_len, ignore_key_mask=ignore_key_mask) as calls:
        return ref_model(**to_double(inputs))[0], calls


def compile_and_run(model, inputs, **options):
    options = dict(dict(AS_PLANNED, plan="window", window=WINDOW, block_size=64, inner="aot_eager"), **options)
    with torch.no_grad():
        return torch.compile(model, backend="compact", options=options)(**inputs)[0]


def joint_sites():
    return [s for s in compact_compile.report().sites if s["kind"] == JOINT]


# ----------------------------------------------------------------------------------------------
# HunyuanVideo: text last, a [B, 1, 1, S] key-padding mask at every joint site


def test_hunyuan_dense_plan_equals_uncompiled_with_the_sites_rewritten():
    model, inputs = tiny_hunyuan()
    with torch.no_grad():
        ref = model(**inputs)[0]
        out = torch.compile(model, backend="compact", options={"plan": "dense", "block_size": 64})(**inputs)[0]
    assert relative(out, ref) <= 1e-5
    sites = compact_compile.report().sites
    joint = [s for s in sites if s["kind"] == JOINT]
    assert [s["site"] for s in joint] == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    assert all(s["rewritten"] and s["key_mask"] and s["n_text"] == HUNYUAN_TEXT and s["n_before"] == 0
               for s in joint)
    refiner = [s for s in sites if "refiner" in s["site"]]
    assert refiner and not refiner[0]["rewritten"]       # the prompt refiner is not video attention


@pytest.mark.parametrize("kernel", KERNELS)
def test_hunyuan_window_equals_masked_float64_reference(kernel):
    """Two prompts of different lengths (7 and all 12 tokens valid): each site's output is dense
    float64 attention masked by the window's blocks AND the key-padding mask."""
    model, inputs = on_device(*tiny_hunyuan(lengths=(7, 12)))
    out = compile_and_run(model, inputs, kernel=kernel)
    layout = joint_layout(HUNYUAN_GRID, HUNYUAN_TEXT)
    ref, calls = reference(model, inputs, {HUNYUAN_S: [window_mask(layout)]})
    assert calls == [HUNYUAN_S, HUNYUAN_S]
    assert relative(out, ref) < 1e-5
    unmasked, _ = reference(model, inputs, {HUNYUAN_S: [window_mask(layout)]}, ignore_key_mask=True)
    assert relative(unmasked, ref) > 1e-4                # the key mask matters: the test can fail
    assert all(s["rewritten"] and s["kernel"] == kernel for s in joint_sites())


def test_hunyuan_rectified_window_equals_rectified_reference():
    """Rectification with a key mask: padded text keys are in no estimate, pooled mean or count."""
    model, inputs = tiny_hunyuan(lengths=(5, 12))
    out = compile_and_run(model, inputs, rectify=True, kernel="flex")
    layout = joint_layout(HUNYUAN_GRID, HUNYUAN_TEXT)
    blocks = video_site_blocks(layout, window_blocks(layout, WINDOW))[None]
    with torch.no_grad(), rectified_sdpa(layout, blocks, dynamic=False, rectify=True) as calls:
        ref = copy.deepcopy(model).double()(**to_double(inputs))[0]
    assert calls == [HUNYUAN_S, HUNYUAN_S]
    assert relative(out, ref) < 1e-5


# ----------------------------------------------------------------------------------------------
# Mochi: the prompt gather becomes a key-padding mask while Dynamo traces (compact_compile.models)


def _masked_mochi_processor(monkeypatch):
    """Eager Mochi with the static-shape processor, so that the float64 reference goes through SDPA
    once per site with the key mask, as the compiled model does."""
    from diffusers.models.attention_processor import MochiAttnProcessor2_0

    from compact_compile.models.mochi import joint_attention_masked
    monkeypatch.setattr(MochiAttnProcessor2_0, "__call__",
                        lambda self, attn, *args, **kwargs: joint_attention_masked(attn, *args, **kwargs))


@pytest.mark.parametrize("kernel", KERNELS)
def test_mochi_window_equals_masked_float64_reference(kernel, monkeypatch):
    """A prompt with no valid token and one with holes: the joint sites reach the backend (no
    graph break) and equal the masked float64 reference."""
    model, inputs = on_device(*tiny_mochi(masks=((0,) * MOCHI_TEXT, (1, 1, 0, 1, 1, 0, 0, 0))))
    assert install_model_fixes()["mochi"]   # as every torch.compile(backend="compact") does when it starts
    with torch.no_grad():
        eager = model(**inputs)[0]
        explained = torch._dynamo.explain(model)(**inputs)
    assert explained.graph_break_count == 0
    torch._dynamo.reset()
    out = compile_and_run(model, inputs, kernel=kernel)
    assert [s["site"] for s in joint_sites()] == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    assert all(s["rewritten"] and s["key_mask"] and s["kernel"] == kernel for s in joint_sites())
    _masked_mochi_processor(monkeypatch)
    layout = joint_layout(MOCHI_GRID, MOCHI_TEXT)
    ref, calls = reference(model, inputs, {MOCHI_S: [window_mask(layout)]})
    assert calls == [MOCHI_S, MOCHI_S]
    assert relative(out, ref) < 1e-5 and relative(eager, ref) > 1e-4


def test_mochi_dense_plan_equals_uncompiled():
    model, inputs = tiny_mochi()
    with torch.no_grad():
        ref = model(**inputs)[0]
        out = torch.compile(model, backend="compact", options={"plan": "dense", "block_size": 64,
                                                                "inner": "aot_eager"})(**inputs)[0]
    assert relative(out, ref) <= 1e-5
    assert len(joint_sites()) == 2 and all(s["rewritten"] for s in joint_sites())


# ----------------------------------------------------------------------------------------------
# which masks count as key masks, and a mask inside video blocks


GRID, S = (2, 8, 8), 128          # tile (1, 8, 8): one 64-token block per frame


class MaskedAttention(nn.Module):
    """Self-attention over S video tokens with a mask made from `key_mask` [B, S] in one of several forms."""

    def __init__(self, form: str, dim: int = 32, heads: int = 2):
        super().__init__()
        self.form, self.heads = form, heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.register_buffer("rows", torch.rand(S, S, generator=torch.Generator().manual_seed(3)) < 0.7)

    def forward(self, x, key_mask):
        B = x.shape[0]
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        mask = {
            "bool": lambda: key_mask[:, None, None, :],
            "repeat": lambda: key_mask.view(B, 1, 1, S).repeat(1, 1, S, 1),
            "where": lambda: torch.where(key_mask, 0.0, float("-inf"))[:, None, None, :],
            "additive": lambda: (1 - key_mask.float())[:, None, None, :] * -10000.0,
            "pairwise": lambda: key_mask[:, None, :, None] & key_mask[:, None, None, :],
            "outer": lambda: outer(key_mask.view(B, 1, 1, S).repeat(1, 1, S, 1)),   # HunyuanVideo 1.5's form
            "outer_of_two": lambda: (key_mask.view(B, 1, 1, S).repeat(1, 1, S, 1)
                                     & key_mask.flip(-1).view(B, 1, 1, S).repeat(1, 1, S, 1).transpose(2, 3)),
            # [S, 1, 1, S] looks key-shaped (a batch of S); the view moves that S onto the queries
            "rows_viewed_as_queries": lambda: self.rows.view(S, 1, 1, S).view(1, 1, S, S),
            "bool_round_trip": lambda: torch.where(key_mask, 0.0, float("-inf"))[:, None, None, :].bool().float(),
            "edited_in_place": lambda: edited_in_place(key_mask.view(B, 1, 1, S).repeat(1, 1, S, 1)),
        }[self.form]()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)


def outer(m):
    return (m & m.transpose(2, 3)).bool()


def edited_in_place(m):
    m[:, :, :64, 64:] = False       # the first frame's queries no longer see the second frame
    return m


def run_masked(form, kernel="flex", device="cpu"):
    torch.manual_seed(0)
    model = MaskedAttention(form).eval().to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, S, 32, generator=g).to(device)
    key_mask = torch.rand(2, S, generator=g) < 0.7     # keys excluded inside every video block
    key_mask[:, 0] = True
    key_mask = key_mask.to(device)
    options = dict(AS_PLANNED, plan="window", window=(1, 1, 1), grid=GRID, tile=(1, 8, 8), block_size=64, kernel=kernel,
                   inner="eager")
    with torch.no_grad():
        out = torch.compile(model, backend="compact", options=options)(x, key_mask)
    return model, x, key_mask, out


@pytest.mark.parametrize("form", ["bool", "repeat", "where"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_key_masks_inside_video_blocks_are_honoured(form, kernel):
    """Keys excluded anywhere (not only text): the output equals the reference with the blocks and
    the keys masked, and differs from the same blocks without the key mask."""
    model, x, key_mask, out = run_masked(form, kernel, DEVICE)
    [site] = compact_compile.report().sites
    assert site["rewritten"] and site["key_mask"] and site["kernel"] == kernel
    layout = TokenLayout(GRID, (1, 8, 8), 64)
    blocks = model_order_mask(layout, window_blocks(layout, (1, 1, 1))[None]).to(DEVICE)
    with torch.no_grad():
        q, k, v = model.qkv(x).unflatten(-1, (3, 2, -1)).permute(2, 0, 3, 1, 4)
        want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                              attn_mask=blocks & key_mask[:, None, None, :]).transpose(1, 2).flatten(2)
        ignored = F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                                 attn_mask=blocks).transpose(1, 2).flatten(2)
    assert relative(out, want) < 1e-5 and relative(ignored, want) > 1e-2


@pytest.mark.parametrize("kernel", KERNELS)
def test_valid_q_and_valid_k_is_a_key_mask_with_padded_query_rows_zero(kernel):
    """m & m.transpose(2, 3) of a key-mask broadcast m: valid queries see the key mask, padded
    queries mask every key, and SDPA gives their rows 0 — so does the rewritten site."""
    model, x, key_mask, out = run_masked("outer", kernel, DEVICE)
    [site] = compact_compile.report().sites
    assert site["rewritten"] and site["key_mask"] and site["masked_queries_zeroed"] and site["kernel"] == kernel
    layout = TokenLayout(GRID, (1, 8, 8), 64)
    blocks = model_order_mask(layout, window_blocks(layout, (1, 1, 1))[None]).to(DEVICE)
    pairs = key_mask[:, None, :, None] & key_mask[:, None, None, :]
    with torch.no_grad():
        q, k, v = model.qkv(x).unflatten(-1, (3, 2, -1)).permute(2, 0, 3, 1, 4)
        want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                              attn_mask=blocks & pairs).transpose(1, 2).flatten(2)
        keys_only = F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                                   attn_mask=blocks & key_mask[:, None, None, :]).transpose(1, 2).flatten(2)
        dense_model = model(x, key_mask)
    assert (want[~key_mask] == 0).all() and (out[~key_mask] == 0).all()
    assert relative(out, want) < 1e-5 and relative(keys_only, want) > 1e-2
    assert relative(out, dense_model) > 1e-2     # the plan's blocks are honoured too


@pytest.mark.parametrize("form, reason", [
    ("pairwise", "not provably a key-padding mask"),      # valid_q ⊗ valid_k without a transpose: not proven
    ("outer_of_two", "not provably a key-padding mask"),  # rows from another mask than the columns
    ("additive", "values the graph does not prove to be 0 or −inf"),   # −10000 re-weights, not excludes
    ("rows_viewed_as_queries", "not provably a key-padding mask"),
    ("bool_round_trip", "values the graph does not prove to be 0 or −inf"),      # 0/−inf became 0/1
    ("edited_in_place", "changed in place"),
])
def test_masks_that_are_not_provably_key_masks_stay_dense(form, reason):
    model, x, key_mask, out = run_masked(form)
    [site] = compact_compile.report().sites
    assert not site["rewritten"] and reason in site["reason"]
    with torch.no_grad():
        torch.testing.assert_close(out, model(x, key_mask))


# ----------------------------------------------------------------------------------------------
# calibration and plan files on a masked model


def test_calibrate_hunyuan_then_run_its_plan(tmp_path):
    """calibrate() records HunyuanVideo's joint sites with their key masks (padded keys carry no
    mass), per layer and head, dual- and single-stream blocks named by module path; the plan file
    then runs them block-sparse and equals the masked float64 reference with the plan's masks."""
    from compact_compile.calibrate import calibrate
    model, inputs = tiny_hunyuan(lengths=(7, 12))
    with calibrate(model, recall=0.5, cost=math.inf, dense_steps=0, inner="aot_eager",
                   options={"block_size": 64}) as cal:
        with torch.no_grad():
            dense = model(**inputs)[0]
    plan = cal.plan
    sites = ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    assert list(plan.sites) == sites
    assert all(p.blocks.shape[0] == 2 and p.n_text == HUNYUAN_TEXT and p.n_before == 0 for p in plan.sites.values())
    assert any(p.density < 1 for p in plan.sites.values())
    plan.save(tmp_path / "hv.plan.safetensors")
    compact_compile.report(clear=True)
    out = compile_and_run(copy.deepcopy(model), inputs, plan=str(tmp_path / "hv.plan.safetensors"))
    assert all(s["rewritten"] and s["grid_source"] == "plan" for s in joint_sites())
    layout = joint_layout(HUNYUAN_GRID, HUNYUAN_TEXT)
    layout = TokenLayout(layout.grid, plan.tile, plan.block_size, HUNYUAN_TEXT, 0)
    ref, _ = reference(model, inputs, {HUNYUAN_S: [model_order_mask(layout, plan.sites[s].blocks) for s in sites]})
    assert relative(out, ref) < 1e-5 and relative(dense, ref) > 1e-4


# ----------------------------------------------------------------------------------------------
# a frame mask (SkyReels-V2 diffusion forcing): F [T, T] broadcast to every token of each frame


class FrameMaskedAttention(nn.Module):
    """Video self-attention with the mask `F.view(T,1,1,T,1,1).repeat(1,H,W,1,H,W).reshape(N,N)`."""

    def __init__(self, grid, dim: int = 32, heads: int = 2):
        super().__init__()
        self.grid, self.heads = grid, heads
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x, frames):
        T, H, W = self.grid
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        mask = frames.view(T, 1, 1, T, 1, 1).repeat(1, H, W, 1, H, W).reshape(T * H * W, T * H * W)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(0).unsqueeze(0)).transpose(1, 2).flatten(2)


@pytest.mark.parametrize("frames_kind", ["causal-blocks", "random"])
@pytest.mark.parametrize("window", [(1, 1, 1), (3, 3, 3)])
def test_frame_masks_run_the_plan_and_the_mask_exactly(frames_kind, window):
    """Tiles two frames deep straddle frames, so blocks are partial under the mask: the output equals
    the float64 reference with the plan's blocks and the frame mask, and differs from either alone."""
    grid = (6, 4, 8)                                     # tile (2, 4, 8): each 64-token block holds 2 frames
    T, S = grid[0], math.prod(grid)
    torch.manual_seed(0)
    model = FrameMaskedAttention(grid).eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, S, 32, generator=g)
    if frames_kind == "causal-blocks":                   # SkyReels-V2: blocks of 3 frames, causal across blocks
        r = torch.arange(2).repeat_interleave(3)
        frames = r[None, :] <= r[:, None]
    else:
        frames = (torch.rand(T, T, generator=g) < 0.5) | torch.eye(T, dtype=torch.bool)
    options = dict(AS_PLANNED, plan="window", window=window, grid=grid, tile=(2, 4, 8), block_size=64, inner="eager")
    compact_compile.report(clear=True)
    with torch.no_grad():
        out = torch.compile(model, backend="compact", options=options)(x, frames)
    [site] = compact_compile.report().sites
    assert site["rewritten"] and site["frame_mask"] and site["kernel"] == "flex"
    layout = TokenLayout(grid, (2, 4, 8), 64)
    plan_mask = model_order_mask(layout, window_blocks(layout, window)[None])
    frame_of = torch.arange(S) // (grid[1] * grid[2])
    frame_mask = frames[frame_of][:, frame_of]
    with torch.no_grad():
        q, k, v = model.qkv(x).unflatten(-1, (3, 2, -1)).permute(2, 0, 3, 1, 4)
        attend = lambda m: F.scaled_dot_product_attention(q.double(), k.double(), v.double(),  # noqa: E731
                                                          attn_mask=m).transpose(1, 2).flatten(2)
        want, plan_only, mask_only = attend(plan_mask & frame_mask), attend(plan_mask), attend(frame_mask[None])
    assert relative(out, want) < 1e-5
    assert relative(plan_only, want) > 1e-2
    assert window == (3, 3, 3) or relative(mask_only, want) > 1e-2      # (3,3,3) keeps every block here


def test_a_plan_file_without_the_frame_masked_site_leaves_it_dense_with_the_reason():
    """Calibration observes plain SDPA sites only, so a calibrated plan has no mask for a frame-masked
    site: it stays dense and says why (as flex_attention sites do) instead of failing the compile;
    a plan with an entry for it runs it."""
    from compact_compile.plan import Plan, SitePlan

    grid = (6, 4, 8)
    S = math.prod(grid)
    model = FrameMaskedAttention(grid).eval()
    x, frames = torch.randn(1, S, 32), torch.ones(6, 6, dtype=torch.bool).tril()
    blocks = window_blocks(TokenLayout(grid, (2, 4, 8), 64), (1, 1, 1))[None]

    def compiled_site(plan):
        torch._dynamo.reset()
        compact_compile.report(clear=True)
        with torch.no_grad():
            torch.compile(model, backend="compact", options=dict(plan=plan, inner="eager", strict=True))(x, frames)
        [site] = compact_compile.report().sites
        return site

    name = compiled_site("window")["site"]
    missing = compiled_site(Plan(grid, (2, 4, 8), 64, {"elsewhere": SitePlan(2, 16, S, 0, 0, blocks)}))
    assert not missing["rewritten"] and "frame mask: the plan has no mask for it" in missing["reason"], missing
    present = compiled_site(Plan(grid, (2, 4, 8), 64, {name: SitePlan(2, 16, S, 0, 0, blocks)}))
    assert present["rewritten"] and present["frame_mask"] and present["density"] < 1


def test_a_frame_masked_site_asked_for_fp8_says_it_runs_in_the_inputs_dtype():
    """FlexAttention, the one kernel that evaluates a frame mask, has no FP8 path: the site runs it in
    the inputs' dtype, as without FP8, and its report says so (it said nothing of FP8)."""
    grid = (6, 4, 8)
    model = FrameMaskedAttention(grid).eval()
    x, frames = torch.randn(1, math.prod(grid), 32), torch.ones(6, 6, dtype=torch.bool).tril()
    outs, sites = [], []
    for fp8 in (False, True):
        torch._dynamo.reset()
        compact_compile.report(clear=True)
        options = dict(plan="window", window=(1, 1, 1), grid=grid, tile=(2, 4, 8), block_size=64, inner="eager",
                       fp8_attention=fp8)
        with torch.no_grad():
            outs.append(torch.compile(model, backend="compact", options=options)(x, frames))
        [site] = compact_compile.report().sites
        sites.append(site)
    assert sites[1]["rewritten"] and sites[1]["frame_mask"] and not sites[1]["fp8"]
    assert "FlexAttention has no FP8 path" in sites[1]["kernel_reason"]
    assert "FP8" not in sites[0]["kernel_reason"] and torch.equal(outs[0], outs[1])
