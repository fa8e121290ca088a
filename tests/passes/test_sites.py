"""Finding and classifying SDPA sites: every rule of eligibility, with small hand-written modules.

A site that is not provably equivalent to block-sparse attention must keep the original SDPA call
(the compiled output equals the uncompiled one) and be listed in the report with the reason.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from support import AS_PLANNED, SelfAttention, Wrapper, masked_sdpa, model_order_mask, rel_err

import compact_compile
from compact_compile.layout import TokenLayout, auto_tile
from compact_compile.masks import video_site_blocks, window_blocks
from compact_compile.passes.sites import CROSS, JOINT, OTHER, VIDEO

GRID = (2, 8, 8)   # 128 video tokens: two blocks of 64 (auto tile (2, 4, 8))
S, DIM, HEADS = 128, 32, 2
DENSE = {"grid": GRID, "plan": "dense", "block_size": 64, "inner": "eager"}


def qkv(linear: nn.Linear, x, heads=HEADS):
    return linear(x).unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)


class Variant(nn.Module):
    """Self-attention over x [B, S, DIM] whose SDPA call is one of the cases below."""

    def __init__(self, case: str):
        super().__init__()
        self.case = case
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.kv_small = nn.Linear(DIM, 2 * DIM // HEADS)     # GQA: one kv head
        self.register_buffer("mask", torch.rand(S, S, generator=torch.Generator().manual_seed(0)) < 0.7)

    def forward(self, x):
        q, k, v = qkv(self.qkv, x)
        c = self.case
        if c == "causal":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif c == "masked":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask | torch.eye(S, dtype=torch.bool))
        elif c == "additive-mask":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(1, 1, 1, x.shape[1]))
        elif c == "dropout":   # a module that passes its dropout even in eval mode
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
        elif c == "gqa":
            k1, v1 = self.kv_small(x).unflatten(-1, (2, 1, -1)).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(q, k1, v1, enable_gqa=True)
        elif c == "negative-scale":
            o = F.scaled_dot_product_attention(q, k, v, scale=-0.1)
        elif c == "wide-values":   # Dv = 2·D: no block-sparse kernel takes it
            o = F.scaled_dot_product_attention(q, k, torch.cat([v, v], -1))
        elif c == "3-d":
            o = F.scaled_dot_product_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)).unflatten(0, q.shape[:2])
        else:
            raise ValueError(c)
        return o.transpose(1, 2).flatten(2)


class Cross(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(DIM, DIM)
        self.kv = nn.Linear(DIM, 2 * DIM)

    def forward(self, x, context):
        q = self.q(x).unflatten(-1, (HEADS, -1)).transpose(1, 2)
        k, v = self.kv(context).unflatten(-1, (2, HEADS, -1)).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class Joint(nn.Module):
    """Joint attention over video and other tokens concatenated in the graph: `n_before` of the text
    tokens before the video, the rest after it (FramePack: history frames before, prompt after), in
    nested cats when both."""

    def __init__(self, n_before: int):
        super().__init__()
        self.n_before = n_before
        self.attn = SelfAttention(DIM, HEADS)

    def forward(self, video, text):
        before, after = text[:, :self.n_before], text[:, self.n_before:]
        if not self.n_before:
            return self.attn(torch.cat([video, text], dim=1))
        if self.n_before == text.shape[1]:
            return self.attn(torch.cat([text, video], dim=1))
        return self.attn(torch.cat([torch.cat([before, video], dim=1), after], dim=1))


class TwoCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)

    def forward(self, x):
        q, k, v = qkv(self.qkv, x)
        o = F.scaled_dot_product_attention(q, k, v)
        return F.scaled_dot_product_attention(o, k, v, is_causal=True)


def run(model, *inputs, options=DENSE, **compile_kwargs):
    """Compiled and uncompiled outputs, and the report's sites."""
    with torch.no_grad():
        out = torch.compile(model, backend="compact", options=options, **compile_kwargs)(*inputs)
        ref = model(*inputs)
    return out, ref, compact_compile.report(clear=True).sites


def x_video(batch=1, seq=S):
    return torch.randn(batch, seq, DIM)


# ----------------------------------------------------------------------------------------------
# ineligible sites stay dense and are reported


@pytest.mark.parametrize("case, kind, reason", [
    ("causal", VIDEO, "causal attention"),
    ("masked", VIDEO, "not provably a key-padding mask"),     # key-padding masks: test_key_masks.py
    ("additive-mask", VIDEO, "does not prove to be 0 or −inf"),
    ("gqa", VIDEO, "grouped-query attention"),
    ("wide-values", VIDEO, "value head dim"),
    ("negative-scale", VIDEO, "softmax scale -0.1"),
    ("3-d", OTHER, "not all 4-D"),
])
def test_ineligible_site_stays_dense(case, kind, reason):
    torch.manual_seed(0)
    out, ref, sites = run(Wrapper(Variant(case)).eval(), x_video())
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    [site] = sites
    assert site["site"] == "attn" and site["kind"] == kind
    assert not site["rewritten"] and reason in site["reason"] and site["density"] is None


def test_dropout_site_stays_dense():
    """dropout_p > 0 keeps SDPA's dropout (random, not a sparsity we may choose)."""
    torch.manual_seed(0)
    model, x = Wrapper(Variant("dropout")).eval(), x_video()
    with torch.no_grad():
        compiled = torch.compile(model, backend="compact", options=DENSE)
        torch.manual_seed(1)
        out = compiled(x)
        torch.manual_seed(1)
        ref = model(x)
        again = compiled(x)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)  # same random stream: same SDPA call
    assert not torch.allclose(out, again)                        # and the dropout is still there
    [site] = compact_compile.report().sites
    assert site["kind"] == VIDEO and not site["rewritten"] and site["reason"] == "dropout"


def test_cross_attention_stays_dense():
    torch.manual_seed(0)
    out, ref, sites = run(Wrapper(Cross()).eval(), x_video(), torch.randn(1, 12, DIM))
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    [site] = sites
    assert site["kind"] == CROSS and not site["rewritten"] and "different token sets" in site["reason"]
    assert site["q"] == [1, HEADS, S, DIM // HEADS] and site["k"] == [1, HEADS, 12, DIM // HEADS]


def test_symbolic_sequence_length_stays_dense():
    torch.manual_seed(0)
    model = Wrapper(SelfAttention(DIM, HEADS)).eval()
    x = x_video()
    torch._dynamo.mark_dynamic(x, 1)
    out, ref, sites = run(model, x)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    [site] = sites
    assert not site["rewritten"] and "symbolic sequence length" in site["reason"]
    # the same graph serves another length, still dense and still right
    with torch.no_grad():
        compiled = torch.compile(model, backend="compact", options=DENSE, dynamic=True)
        y = x_video(seq=100)
        torch.testing.assert_close(compiled(y), model(y), rtol=1e-6, atol=1e-6)


def test_float64_stays_dense():
    torch.manual_seed(0)
    out, ref, sites = run(Wrapper(SelfAttention(DIM, HEADS)).double().eval(), x_video().double())
    torch.testing.assert_close(out, ref)
    [site] = sites
    assert not site["rewritten"] and "dtype torch.float64" in site["reason"]


def test_inputs_requiring_grad_stay_dense():
    torch.manual_seed(0)
    model = Wrapper(SelfAttention(DIM, HEADS)).eval()
    x = x_video()
    out = torch.compile(model, backend="compact", options={**DENSE, "inner": "aot_eager"})(x)
    torch.testing.assert_close(out, model(x), rtol=1e-6, atol=1e-6)
    out.sum().backward()   # the dense SDPA keeps its autograd
    assert model.attn.qkv.weight.grad is not None
    [site] = compact_compile.report().sites
    assert not site["rewritten"] and "require grad" in site["reason"]


@pytest.mark.parametrize("options, reason", [
    ({**DENSE, "grid": (2, 8, 9)}, "128 tokens do not match the video grid (2, 8, 9) (options['grid'])"),
    ({k: v for k, v in DENSE.items() if k != "grid"}, "no video grid"),
    ({**DENSE, "grid": (2, 7, 8)}, "does not show where the video tokens are among the others"),
], ids=["grid-too-large", "no-grid", "extra-tokens"])
def test_tokens_that_are_not_the_grid_stay_dense(options, reason):
    torch.manual_seed(0)
    out, ref, sites = run(Wrapper(SelfAttention(DIM, HEADS)).eval(), x_video(), options=options)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    [site] = sites
    assert not site["rewritten"] and reason in site["reason"]


def test_sites_are_named_by_module_path_and_call():
    torch.manual_seed(0)
    out, ref, sites = run(Wrapper(TwoCalls()).eval(), x_video())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert [(s["site"], s["rewritten"]) for s in sites] == [("attn", True), ("attn#1", False)]
    assert sites[1]["reason"] == "causal attention"


# ----------------------------------------------------------------------------------------------
# eligible sites are rewritten, and compute masked attention in the model's token order


def window_reference(layout: TokenLayout, window):
    blocks = video_site_blocks(layout, window_blocks(layout, window))
    return blocks, model_order_mask(layout, blocks[None])


@pytest.mark.parametrize("call, scale", [("positional", None), ("keyword", None), ("positional", 0.3)])
def test_video_site_positional_and_keyword_forms(call, scale):
    torch.manual_seed(0)
    model, x = Wrapper(SelfAttention(DIM, HEADS, call=call, scale=scale)).eval(), x_video()
    window = (1, 1, 1)
    out, _, sites = run(model, x, options={**DENSE, "plan": "window", "window": window})
    layout = TokenLayout(GRID, auto_tile(GRID, 64), 64)
    blocks, mask = window_reference(layout, window)
    assert not blocks.all()
    with torch.no_grad(), masked_sdpa({S: [mask]}) as masked:
        ref = model.double()(x.double())
    assert masked == [S]
    assert rel_err(out, ref) < 1e-5 and rel_err(model.float()(x), ref) > 1e-3
    [site] = sites
    assert site["rewritten"] and site["kind"] == VIDEO and site["site"] == "attn"
    assert tuple(site["grid"]) == GRID and site["grid_source"] == "options['grid']"
    assert site["density"] == pytest.approx(blocks.float().mean().item())
    assert site["tile"] == layout.tile and site["block_size"] == 64


@pytest.mark.parametrize("n_before", [12, 0, 5])
def test_joint_text_and_video(n_before):
    torch.manual_seed(0)
    model, video, text = Joint(n_before).eval(), x_video(), torch.randn(1, 12, DIM)
    window = (1, 1, 1)
    out, _, sites = run(model, video, text, options={**DENSE, "plan": "window", "window": window})
    [site] = sites
    assert site["rewritten"] and site["kind"] == JOINT
    assert site["n_text"] == 12 and site["n_before"] == n_before
    layout = TokenLayout(GRID, auto_tile(GRID, 64), 64, 12, n_before)
    blocks, mask = window_reference(layout, window)
    assert not blocks.all()
    with torch.no_grad(), masked_sdpa({S + 12: [mask]}) as masked:
        ref = model.double()(video.double(), text.double())
    assert masked == [S + 12]
    assert rel_err(out, ref) < 1e-5 and rel_err(model.float()(video, text), ref) > 1e-3
    # text tokens see everything and are seen by everything
    text_pos = torch.cat([torch.arange(n_before), torch.arange(S + n_before, S + 12)])
    assert mask[0][text_pos].all() and mask[0][:, text_pos].all()


class PatchEmbed3d(nn.Module):
    """A video DiT in miniature: Conv3d patch embedding, flatten, self-attention."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv3d(4, DIM, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.attn = SelfAttention(DIM, HEADS)

    def forward(self, latent):
        return self.attn(self.patch(latent).flatten(2).transpose(1, 2))


class PatchEmbedFrames(nn.Module):
    """CogVideoX style: Conv2d over frames [B·F, C, H, W]."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(4, DIM, kernel_size=2, stride=2)
        self.attn = SelfAttention(DIM, HEADS)

    def forward(self, latent):
        B, F_, C, H, W = latent.shape
        x = self.patch(latent.flatten(0, 1)).unflatten(0, (B, F_))     # [B, F, DIM, h, w]
        return self.attn(x.permute(0, 1, 3, 4, 2).flatten(1, 3))


@pytest.mark.parametrize("model, latent, source", [
    (PatchEmbed3d, (1, 4, 2, 16, 16), "Conv3d patch embedding"),
    (PatchEmbedFrames, (2, 2, 4, 16, 16), "Conv2d over frames patch embedding"),
], ids=["conv3d", "conv2d-frames"])
def test_grid_inferred_from_the_patch_embedding(model, latent, source):
    torch.manual_seed(0)
    model, x = model().eval(), torch.randn(latent)
    options = {k: v for k, v in DENSE.items() if k != "grid"}
    out, ref, sites = run(model, x, options=options)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    [site] = sites
    assert site["rewritten"] and tuple(site["grid"]) == GRID and source in site["grid_source"]
    assert site["q"][0] == latent[0]


def test_symbolic_batch_static_sequence_is_rewritten():
    """Only the sequence length must be static: a dynamic batch keeps the site sparse."""
    torch.manual_seed(0)
    model = Wrapper(SelfAttention(DIM, HEADS)).eval()
    x = x_video(batch=2)
    torch._dynamo.mark_dynamic(x, 0)
    with torch.no_grad():
        compiled = torch.compile(model, backend="compact", options={**DENSE, "inner": "aot_eager"})
        for batch in (2, 3):
            y = x if batch == 2 else x_video(batch=3)
            torch.testing.assert_close(compiled(y), model(y), rtol=1e-5, atol=1e-6)
    [site] = compact_compile.report().sites     # one graph for both batch sizes
    assert site["rewritten"] and not isinstance(site["q"][0], int)


class LinearPatchify(nn.Module):
    """A DiT whose patch embedding is reshapes and a Linear (Cosmos, Kandinsky 5): latent [B, C, T, H, W]
    → patches of 1×2×2 → tokens [B, T·H/2·W/2, DIM] in raster order → self-attention."""

    def __init__(self, channels=4):
        super().__init__()
        self.embed = nn.Linear(channels * 4, DIM)
        self.attn = SelfAttention(DIM, HEADS)

    def forward(self, latent):
        B, C, T, H, W = latent.shape
        x = latent.reshape(B, C, T, H // 2, 2, W // 2, 2).permute(0, 2, 3, 5, 1, 4, 6).flatten(4, 6)
        return self.attn(self.embed(x.flatten(1, 3)))


def test_grid_from_the_reshapes_of_a_linear_patch_embedding():
    """No conv: the merge of (T, H/2, W/2) into the token dim gives the grid, axes in order (a
    non-square frame: the transposed grid would be a different mask)."""
    torch.manual_seed(0)
    model, latent = LinearPatchify().eval(), torch.randn(1, 4, 2, 16, 32)     # grid (2, 8, 16)
    window = (1, 1, 1)
    out, _, sites = run(model, latent, options={**AS_PLANNED, "plan": "window", "window": window, "block_size": 64,
                                                "tile": (1, 8, 8), "inner": "eager"})
    [site] = sites
    assert site["rewritten"] and tuple(site["grid"]) == (2, 8, 16) and "merged into 256 tokens" in site["grid_source"]
    layout = TokenLayout((2, 8, 16), (1, 8, 8), 64)
    blocks, mask = window_reference(layout, window)
    with torch.no_grad(), masked_sdpa({256: [mask]}) as masked:
        ref = model.double()(latent.double())
    assert masked == [256] and rel_err(out, ref) < 1e-5
    transposed = TokenLayout((2, 16, 8), (1, 8, 8), 64)
    with torch.no_grad(), masked_sdpa({256: [window_reference(transposed, window)[1]]}):
        wrong = model.double()(latent.double())
    assert rel_err(wrong, ref) > 1e-3


def test_a_plan_for_the_transposed_video_shape_is_an_error_naming_both_grids():
    """A plan calibrated on 8×16 frames and a 16×8 video: the same token count, another geometry. The
    patch embedding shows the video's grid, so the plan's is refused (it ran silently in the plan's)."""
    from compact_compile.plan import Plan, SitePlan

    torch.manual_seed(0)
    model = PatchEmbed3d().eval()
    plan_grid, tile = (2, 4, 16), (1, 4, 8)
    layout = TokenLayout(plan_grid, tile, 32)
    plan = Plan(plan_grid, tile, 32, {"attn": SitePlan(HEADS, DIM // HEADS, 128, 0, 0,
                                                       window_blocks(layout, (1, 1, 1))[None])})
    x = torch.randn(1, 4, 2, 32, 8)                      # patch (1, 2, 2): grid (2, 16, 4), 128 tokens
    match = r"the plan's grid \(2, 4, 16\) contradicts the model's patch embedding, which makes a \(2, 16, 4\) grid"
    with pytest.raises(compact_compile.PlanError, match=match), torch.no_grad():
        torch.compile(model, backend="compact", options=dict(plan=plan, inner="eager", strict=True))(x)


class PatchEmbedColumnsFirst(PatchEmbed3d):
    """A Conv3d patch embedding whose tokens are flattened as (H, W, T), not raster (T, H, W)."""

    def forward(self, latent):
        return self.attn(self.patch(latent).permute(0, 3, 4, 2, 1).flatten(1, 3))


def test_tokens_flattened_in_another_order_than_the_convs_grid_stay_dense():
    """The conv shows (2, 8, 8), the flatten (8, 8, 2) of the same 128 tokens: which order they are in
    is not proven, so the site stays dense and says so (it ran the window on the conv's raster order,
    0.12 off the window over the true geometry)."""
    torch.manual_seed(0)
    model, x = PatchEmbedColumnsFirst().eval(), torch.randn(1, 4, 2, 16, 16)
    out, ref, sites = run(model, x, options=dict(plan="window", window=(1, 1, 1), block_size=64, inner="eager"))
    [site] = sites
    assert not site["rewritten"] and "as two grids, (2, 8, 8)" in site["reason"] and "(8, 8, 2)" in site["reason"]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_a_right_grid_is_not_refused_for_another_convolution_of_as_many_tokens():
    """SANA-WM's temporal short convolution makes 1024 values per channel too, as (1, 4, 256): the
    grid the graph itself takes for 1024 tokens is its patch embedding's (4, 16, 16), which
    options['grid'] names, so that is no contradiction (it was an OptionsError)."""
    from family import FAMILY

    model, inputs = FAMILY["sana_wm"]()
    with torch.no_grad():
        torch.compile(model, backend="compact", options=dict(grid=(4, 16, 16), inner="eager"))(**inputs)
    assert [s["site"] for s in compact_compile.report().sites if s["rewritten"]] == ["blocks.1.attn.attn",
                                                                                      "blocks.1.attn.cam_attn"]
