"""Rectified block-sparse attention vs its float64 reference (kernels/reference.py), and the claims
that justify it: it helps where its assumptions hold, and it is exact when nothing is skipped."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from support import rectified_site

from compact_compile.kernels.rectified import block_pool, merge_blocks
from compact_compile.kernels.reference import rectified_attention_reference
from compact_compile.layout import TokenLayout
from compact_compile.masks import dense_blocks, text_blocks

BS = 16  # small blocks: several of them in a few hundred tokens
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"   # Triton runs here (else its interpreter)


@st.composite
def sites(draw):
    grid = (draw(st.integers(1, 3)), draw(st.integers(2, 7)), draw(st.integers(2, 9)))
    n_text = draw(st.sampled_from([0, 0, 5, 13]))
    layout = TokenLayout(grid, (1, 4, 4), BS, n_text, draw(st.sampled_from([0, n_text, n_text // 2])))
    nb = layout.n_blocks
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    heads = draw(st.sampled_from([1, 2]))
    static = torch.rand(heads, nb, nb, generator=g) < draw(st.sampled_from([0.0, 0.2]))
    static |= torch.eye(nb, dtype=torch.bool) if draw(st.booleans()) else False
    static |= text_blocks(layout) if n_text else False
    return layout, static, g, dict(p_remain=draw(st.sampled_from([0.1, 0.3, 0.6])),
                                   drop=draw(st.sampled_from([0.5, 0.8, 1.0])), rows=draw(st.booleans()))


def inputs(layout, g, dtype=torch.float64, B=2, H=2, D=16):
    return [torch.randn(B, H, layout.seq_len, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(3)]


@settings(max_examples=40, deadline=None)
@given(sites())
def test_selection_and_estimates_equal_reference(site):
    """In float64 the online choice of blocks is the reference's, block for block, and R, Ō give the
    reference's rectified output once attention over the kept blocks is exact."""
    layout, static, g, cfg = site
    q, k, v = inputs(layout, g)
    kern = rectified_site(layout, static, dynamic=True, rectify=True, **cfg)
    keep, r, o_bar = kern.estimate(q, k, v)
    ref, ref_keep = rectified_attention_reference(q, k, v, n_video=layout.n_video, block_size=BS, static=static,
                                                  dynamic=True, rectify=True, **cfg)
    assert torch.equal(keep, ref_keep)
    mask = keep.repeat_interleave(BS, -1).repeat_interleave(BS, -2)[..., :layout.seq_len, :layout.seq_len]
    sparse = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(merge_blocks(sparse, r, o_bar, BS), ref, rtol=1e-9, atol=1e-9)


@settings(max_examples=6, deadline=None)
@given(sites(), st.sampled_from([torch.float32, torch.bfloat16]), st.booleans())
def test_kernel_equals_reference(site, dtype, dynamic):
    """The whole path (estimate → FlexAttention over the kept blocks → merge) in fp32/bf16."""
    layout, static, g, cfg = site
    q, k, v = inputs(layout, g, dtype)
    kern = rectified_site(layout, static | torch.eye(layout.n_blocks, dtype=torch.bool), dynamic=dynamic,
                           rectify=True, **cfg)
    keep, _, _ = kern.estimate(q, k, v)
    out = kern(q, k, v, None)
    ref, _ = rectified_attention_reference(q, k, v, n_video=layout.n_video, block_size=BS, static=static,
                                           dynamic=dynamic, rectify=True, keep=keep, **cfg)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert (out.double() - ref).norm() / ref.norm() < tol


def test_block_pool_ignores_padding_and_text():
    """Tokens past n_valid (text keys, padding of the last block) never enter a mean."""
    x = torch.randn(1, 1, 37, 4, dtype=torch.float64)
    mean, mad = block_pool(x, 30, 16)
    for n, rows in enumerate([range(0, 16), range(16, 30), range(30, 30)]):
        rows = list(rows)
        want = x[0, 0, rows].mean(0) if rows else torch.zeros(4, dtype=torch.float64)
        torch.testing.assert_close(mean[0, 0, n], want)
        if rows:
            torch.testing.assert_close(mad[0, 0, n], (x[0, 0, rows] - want).abs().mean(0))


@pytest.mark.parametrize("rows", [False, True])
@pytest.mark.parametrize("queries", ["near-constant", "random"])
def test_rectification_helps_when_skipped_blocks_are_near_constant(rows, queries):
    """Keys and values nearly constant inside each block: pooled estimates are almost exact, so the
    rectified output is far closer to dense attention than plain block-sparse attention — per block
    when the queries are near-constant too, per row ("rows") whatever the queries."""
    layout = TokenLayout((2, 8, 8), (1, 4, 4), BS)
    nb = layout.n_blocks
    g = torch.Generator().manual_seed(0)
    noise = lambda: 0.01 * torch.randn(1, 2, layout.seq_len, 16, generator=g)  # noqa: E731
    centre = lambda: torch.randn(1, 2, nb, 1, 16, generator=g).expand(-1, -1, -1, BS, -1).reshape(1, 2, -1, 16)  # noqa: E731
    k, v = centre() + noise(), centre() + noise()
    q = centre() + noise() if queries == "near-constant" else torch.randn(1, 2, layout.seq_len, 16, generator=g)
    static = torch.eye(nb, dtype=torch.bool)[None]
    dense = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    plain = rectified_site(layout, static, dynamic=False, rectify=False)(q, k, v)
    fixed = rectified_site(layout, static, dynamic=False, rectify=True, rows=rows)(q, k, v)
    err = lambda o: ((o.double() - dense).norm() / dense.norm()).item()  # noqa: E731
    if rows or queries == "near-constant":
        assert err(fixed) < 0.1 * err(plain), (err(fixed), err(plain))
    else:  # block means of random queries estimate little, and GAPR then declines to compensate
        assert err(fixed) < err(plain), (err(fixed), err(plain))


def test_every_block_kept_is_dense_attention():
    layout = TokenLayout((2, 5, 6), (1, 4, 4), BS, 7, 7)
    g = torch.Generator().manual_seed(1)
    q, k, v = inputs(layout, g, torch.float32)
    out = rectified_site(layout, dense_blocks(layout)[None], dynamic=True, rectify=True)(q, k, v)
    dense = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert (out.double() - dense).norm() / dense.norm() < 1e-5


@pytest.mark.parametrize("rows", [False, True])
def test_triton_kernel_path_equals_reference(rows):
    """On the Triton kernel (R·O + Ō fused in its epilogue per block; merged after it per row), on
    the GPU when there is one (pooling by the Triton pool kernel too), else in the interpreter."""
    layout = TokenLayout((2, 6, 9), (1, 4, 4), BS, 11, 0)
    g = torch.Generator().manual_seed(5)
    q, k, v = (x.to(DEVICE) for x in inputs(layout, g, torch.float16))
    static = (torch.eye(layout.n_blocks, dtype=torch.bool) | text_blocks(layout))[None]
    kern = rectified_site(layout, static, dynamic=True, rectify=True, rows=rows, drop=0.8, kernel="triton")
    keep, _, _ = kern.estimate(q, k, v)
    out = kern(q, k, v, None)
    ref, _ = rectified_attention_reference(q.cpu(), k.cpu(), v.cpu(), n_video=layout.n_video, block_size=BS,
                                           static=static, dynamic=True, rectify=True, rows=rows, drop=0.8,
                                           keep=keep.cpu())
    assert (out.cpu().double() - ref).norm() / ref.norm() < 2e-3


@settings(max_examples=8, deadline=None)
@given(sites(), st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_static_plan_estimate_in_triton_equals_reference(site, dtype):
    """Static plan + rectify: R and Ō from the Triton estimate (estimate_triton.py:
    pooled queries attending to pooled keys) give the float64 reference's output — partial last
    blocks, text keys before or after the video, several heads with their own maps."""
    layout, static, g, _ = site
    static = static | torch.eye(layout.n_blocks, dtype=torch.bool)
    q, k, v = (x.to(DEVICE) for x in inputs(layout, g, dtype, D=32))
    kern = rectified_site(layout, static, dynamic=False, rectify=True, kernel="triton")
    assert kern.text_kept()
    out = kern(q, k, v, None)
    ref, _ = rectified_attention_reference(*(x.cpu().double() for x in (q, k, v)), n_video=layout.n_video,
                                           block_size=BS, static=static, dynamic=False, rectify=True)
    tol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    assert (out.cpu().double() - ref).norm() / ref.norm() < tol


def test_static_estimate_stays_general_when_a_text_block_may_be_skipped():
    """The Triton estimate counts text keys in the normaliser only; a plan that may skip a block
    holding text takes the general estimate, which the reference matches too. Block 3 holds 8 video
    and 8 text tokens, and the inputs are nearly constant per block, so blocks pass the GAPR test and
    are compensated (the Triton estimate there was 5e-2 to 3e-1 off)."""
    layout = TokenLayout((2, 4, 7), (1, 4, 4), BS, 9, 0)
    nb, S = layout.n_blocks, layout.seq_len
    static = torch.eye(nb, dtype=torch.bool)[None]
    kern = rectified_site(layout, static, dynamic=False, rectify=True, kernel="triton")
    assert not kern.text_kept()
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, nb, 1, 16, generator=g).expand(-1, -1, -1, BS, -1).reshape(2, 2, -1, 16)[:, :, :S]
               + 0.05 * torch.randn(2, 2, S, 16, generator=g) for _ in range(3))
    ref, plain = (rectified_attention_reference(q.double(), k.double(), v.double(), n_video=layout.n_video,
                                                block_size=BS, static=static, dynamic=False, rectify=rectify)[0]
                  for rectify in (True, False))
    out = kern(*(x.to(DEVICE) for x in (q, k, v)))
    assert (out.cpu().double() - ref).norm() / ref.norm() < 1e-5
    assert (plain - ref).norm() / ref.norm() > 1e-2       # rectification does compensate here


@pytest.mark.parametrize("keys_per_share", [64, 16])
@pytest.mark.parametrize("block_size, n_text, n_before", [(32, 0, 0), (64, 37, 0), (64, 21, 21), (64, 21, 9)])
def test_static_estimate_in_triton_equals_general_estimate(block_size, n_text, n_before, keys_per_share):
    """R and Ō of the Triton estimate equal the general (torch) estimate's at larger blocks, where the
    last video block is partial and text shares a block with video, with the keys in one share or
    split into several. Keys and values nearly constant per block, so GAPR trusts the pooled
    estimate and many skipped blocks are compensated."""
    from compact_compile.kernels.estimate_triton import estimate_static_triton
    from compact_compile.kernels.rectified import _estimate, pooled
    layout = TokenLayout((4, 15, 20), (1, 4, 8), block_size, n_text, n_before)   # 1200 video tokens
    nb, S = layout.n_blocks, layout.seq_len
    g = torch.Generator().manual_seed(block_size + n_text)
    static = torch.eye(nb, dtype=torch.bool)[None] | (text_blocks(layout) if n_text else False)
    kern = rectified_site(layout, static, dynamic=False, rectify=True, kernel="triton")
    assert kern.text_kept()
    centre = lambda: torch.randn(1, 2, nb, 1, 32, generator=g).expand(-1, -1, -1, block_size, -1).reshape(  # noqa: E731
        1, 2, -1, 32)[:, :, :S]
    q, k, v = ((centre() + 0.05 * torch.randn(1, 2, S, 32, generator=g)).to(DEVICE) for _ in range(3))
    pools = pooled(q, k, v, layout.n_video, block_size)
    r, o_bar = estimate_static_triton(pools, k, static.to(DEVICE), layout.n_video, 32 ** -0.5, block_size,
                                      config=dict(KEYS=keys_per_share, CH=16))
    _, r_ref, o_bar_ref = _estimate(pools, None, k[:, :, layout.n_video:], static.to(DEVICE),
                                    kern.video_count.to(DEVICE), kern.text_block.to(DEVICE), 32 ** -0.5,
                                    block_size, False, True, False, 0.3, 0)
    assert (r_ref < 0.99).float().mean() > 0.5, "most query blocks should get compensation"
    torch.testing.assert_close(r, r_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(o_bar, o_bar_ref, rtol=1e-5, atol=1e-6)


def key_mask(layout, kind, g):
    """bool `[2, S]`: "random" keys anywhere (at least one kept: a sequence with no key to attend is
    not attention), or "text tail": text padding, half the text kept by the first batch element and
    none by the second."""
    S = layout.seq_len
    if kind == "random":
        valid = torch.rand(2, S, generator=g) < 0.6
        valid[:, 0] = True
        return valid
    key_valid = torch.ones(2, S, dtype=torch.bool)
    key_valid[0, layout.n_video + layout.n_text // 2:] = False
    key_valid[1, layout.n_video:] = False
    return key_valid


@settings(max_examples=25, deadline=None)
@given(sites(), st.sampled_from(["random", "text tail"]))
def test_key_padding_mask_in_choice_and_estimate(site, kind):
    """Key-padding masks (per batch element) leave the excluded keys out of the pooled means and
    counts, the text keys of the estimate and the online choice: in float64 the choice is the
    reference's block for block, and R, Ō give its rectified output over the valid keys."""
    layout, static, g, cfg = site
    q, k, v = inputs(layout, g)
    key_valid = key_mask(layout, kind, g)
    kern = rectified_site(layout, static, dynamic=True, rectify=True, **cfg)
    keep, r, o_bar = kern.estimate(q, k, v, key_valid=key_valid)
    ref, ref_keep = rectified_attention_reference(q, k, v, n_video=layout.n_video, block_size=BS, static=static,
                                                  dynamic=True, rectify=True, key_valid=key_valid, **cfg)
    assert torch.equal(keep, ref_keep)
    mask = keep.repeat_interleave(BS, -1).repeat_interleave(BS, -2)[..., :layout.seq_len, :layout.seq_len]
    sparse = F.scaled_dot_product_attention(q, k, v, attn_mask=mask & key_valid[:, None, None, :])
    torch.testing.assert_close(merge_blocks(sparse, r, o_bar, BS), ref, rtol=1e-9, atol=1e-9)
    if not key_valid.all():
        unmasked, _ = rectified_attention_reference(q, k, v, n_video=layout.n_video, block_size=BS, static=static,
                                                    dynamic=True, rectify=True, keep=keep, **cfg)
        assert (unmasked - ref).norm() / ref.norm() > 1e-6      # the mask matters: the test can fail


@settings(max_examples=4, deadline=None)
@given(sites(), st.sampled_from(["random", "text tail"]), st.sampled_from(["flex", "triton"]))
def test_key_padding_mask_through_the_site(site, kind, kernel):
    """The whole site (estimate, kernel with the key mask, merge) in fp32 equals the reference."""
    layout, static, g, cfg = site
    q, k, v = inputs(layout, g, torch.float32, D=32)
    key_valid = key_mask(layout, kind, g)
    static = static | torch.eye(layout.n_blocks, dtype=torch.bool)
    kern = rectified_site(layout, static, dynamic=True, rectify=True, kernel=kernel, **cfg)
    on_device = [x.to(DEVICE) for x in (q, k, v, key_valid)]
    keep, _, _ = kern.estimate(*on_device[:3], key_valid=on_device[3])
    out = kern(*on_device[:3], None, None, on_device[3]).cpu()
    keep = keep.cpu()
    ref, _ = rectified_attention_reference(q, k, v, n_video=layout.n_video, block_size=BS, static=static,
                                           dynamic=True, rectify=True, key_valid=key_valid, keep=keep, **cfg)
    assert (out.double() - ref).norm() / ref.norm() < 1e-5


@pytest.mark.parametrize("drop, n_blocks, floor", [(0.9, 10, 1), (0.9, 20, 2), (0.9, 30, 3), (0.8, 10, 2),
                                                   (0.9, 256, 25), (0.9, 9, 0), (0.0, 7, 7)])
def test_the_online_choice_keeps_at_least_the_documented_floor_of_blocks(drop, n_blocks, floor):
    """⌊(1 − drop)·N⌋ blocks per row at least: in floats (1 − 0.9)·10 is 0.999…, which floored to 0."""
    from compact_compile.spec import Selection

    assert Selection(drop=drop).min_blocks(n_blocks) == floor


@pytest.mark.parametrize("kernel", ["triton", "flex"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_a_batch_element_with_every_key_masked_gives_zeros_with_rectification(kernel, dynamic):
    """Its attention has no key, which the kernels define as 0; rectification's estimate there had a
    normaliser of 0 (R = 1 − 0/0: NaN). It is now R = 1, Ō = 0, and the other element is as alone."""
    layout = TokenLayout((1, 8, 8), (1, 4, 4), 16)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 1, layout.seq_len, 32, generator=g) for _ in range(3))
    keys = torch.ones(2, layout.seq_len, dtype=torch.bool)
    keys[1] = False
    static = torch.eye(layout.n_blocks, dtype=torch.bool)[None]
    site = rectified_site(layout, static, dynamic=dynamic, rectify=True, kernel=kernel)
    q, k, v, keys = (x.to(DEVICE) for x in (q, k, v, keys))
    out = site(q, k, v, None, None, keys)
    alone = site(q[:1], k[:1], v[:1], None, None, keys[:1])
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out[:1], alone, rtol=1e-5, atol=1e-6)
