"""Key-padding masks in rectification's Triton kernels (pool_triton.py, estimate_triton.py,
select_triton.py) against the torch code they replace (rectified.py: block_pool, _estimate with
valid_counts and text_valid, itself checked against the float64 reference in test_rectified.py),
and the whole site through them against the float64 reference; on the GPU when there is one, else
in Triton's interpreter."""
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from support import rectified_site

from compact_compile.kernels import site as site_module
from compact_compile.kernels.estimate_triton import estimate_static_triton
from compact_compile.kernels.pool_triton import block_pool_qkv_triton, tile_pool_qkv_triton
from compact_compile.kernels.rectified import _estimate, block_pool, pooled, valid_counts
from compact_compile.kernels.reference import rectified_attention_reference
from compact_compile.kernels.select_triton import select_blocks_triton
from compact_compile.layout import TokenLayout
from compact_compile.masks import text_blocks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BS = 16
B = 2
MASKS = ["random", "broadcast", "text tail", "empty block"]


def key_mask(layout: TokenLayout, kind: str, g: torch.Generator) -> torch.Tensor:
    """bool `[B or 1, S]` in tile order (video, then text): "random" keys anywhere (but the first, so
    that every batch element keeps a key), per batch element or one row for the batch ("broadcast");
    "text tail": the first element keeps half its text, the second none; "empty block": the first
    element keeps no video key of one block, the second no text."""
    S, n_video = layout.seq_len, layout.n_video
    if kind in ("random", "broadcast"):
        key_valid = torch.rand(B if kind == "random" else 1, S, generator=g) < 0.6
        key_valid[:, 0] = True
        return key_valid
    key_valid = torch.ones(B, S, dtype=torch.bool)
    if kind == "text tail":
        key_valid[0, n_video + layout.n_text // 2:] = False
    else:
        m = int(torch.randint(-(-n_video // BS), (1,), generator=g))
        key_valid[0, m * BS:min((m + 1) * BS, n_video)] = False
    key_valid[1, n_video:] = False
    return key_valid


@st.composite
def masked_sites(draw, max_h=8, max_w=9):
    """(layout, key_valid, generator): partial last blocks, text (or none) before or after the video
    in the model (last in tile order), one of the MASKS; at least two video blocks, so that an empty
    one leaves keys."""
    grid = (draw(st.integers(1, 3)), draw(st.integers(3, max_h)), draw(st.integers(6, max_w)))
    n_text = draw(st.sampled_from([0, 5, 13]))
    layout = TokenLayout(grid, (1, 4, 4), BS, n_text, draw(st.sampled_from([0, n_text, n_text // 2])))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return layout, key_mask(layout, draw(st.sampled_from(MASKS)), g), g


def block_constant(layout: TokenLayout, g: torch.Generator, D: int = 32) -> torch.Tensor:
    """`[B, 2, S, D]` float32, nearly constant inside each block: GAPR trusts the pooled estimate, so
    many skipped blocks are compensated and R, Ō depend on the pooled keys and their counts."""
    S, nb = layout.seq_len, layout.n_blocks
    centre = torch.randn(B, 2, nb, 1, D, generator=g).expand(-1, -1, -1, BS, -1).reshape(B, 2, -1, D)[:, :, :S]
    return centre + 0.05 * torch.randn(B, 2, S, D, generator=g)


def torch_estimate(layout, pools, k, static, key_valid, dynamic: bool, p_remain: float = 0.3, k_min: int = 0):
    """(keep, R, Ō) of the torch estimate with the key mask, in float32."""
    kern = rectified_site(layout, static, dynamic=False, rectify=False)
    counts = valid_counts(kern.video_count.to(DEVICE), layout.n_video, BS, key_valid)
    return _estimate(pools, None, k[:, :, layout.n_video:], static.to(DEVICE), counts, kern.text_block.to(DEVICE),
                     k.shape[-1] ** -0.5, BS, dynamic, not dynamic, False, p_remain, k_min,
                     text_valid=key_valid[:, layout.n_video:])


@settings(max_examples=15, deadline=None)
@given(masked_sites(), st.booleans(), st.sampled_from([16, 32]),
       st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_pooling_leaves_masked_keys_out(site, gather, D, dtype):
    """k̄, δk, v̄ over the video keys the mask keeps (zeros for a block with none), q̄, δq over every
    token as without a mask: pooling alone and while reordering into tile order."""
    layout, key_valid, g = site
    S = layout.seq_len
    src = layout.source_index()
    q, k, v = (torch.randn(B, S, 2, D, generator=g).to(dtype).transpose(1, 2) for _ in range(3))
    if gather:
        _, got = tile_pool_qkv_triton(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), src.to(DEVICE), layout.n_video, BS,
                                      key_valid=key_valid.to(DEVICE))
    q, k, v = (x.index_select(-2, src) for x in (q, k, v))
    if not gather:
        got = block_pool_qkv_triton(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), layout.n_video, BS,
                                    key_valid=key_valid.to(DEVICE))
    (qm, qd), (km, kd), (vm, _) = (block_pool(x.double(), n, BS, mask) for x, n, mask in
                                   ((q, S, None), (k, layout.n_video, key_valid), (v, layout.n_video, key_valid)))
    for a, b in zip(got, (qm, qd, km, kd, vm)):
        torch.testing.assert_close(a.cpu().double(), b, rtol=1e-5, atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(masked_sites(), st.sampled_from([0.0, 0.2]), st.sampled_from([16, 256]))
def test_estimate_with_key_mask_equals_torch_estimate(site, density, keys_per_share):
    """R, Ō of a static plan (blocks holding text kept, per-head maps) with the mask: c_m over the
    video keys it keeps (none: no video mass), the excluded text keys out of the softmax; the keys in
    one share or several."""
    layout, key_valid, g = site
    nb = layout.n_blocks
    static = (torch.rand(2, nb, nb, generator=g) < density) | torch.eye(nb, dtype=torch.bool) | (
        text_blocks(layout) if layout.n_text else False)
    q, k, v = (block_constant(layout, g).to(DEVICE) for _ in range(3))
    key_valid = key_valid.to(DEVICE)
    pools = pooled(q, k, v, layout.n_video, BS, key_valid)
    r, o_bar = estimate_static_triton(pools, k, static, layout.n_video, 32 ** -0.5, BS,
                                      config=dict(KEYS=keys_per_share, CH=16), key_valid=key_valid)
    _, r_want, o_bar_want = torch_estimate(layout, pools, k, static, key_valid, dynamic=False)
    torch.testing.assert_close(r, r_want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(o_bar, o_bar_want, rtol=1e-5, atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(masked_sites(), st.sampled_from([0.1, 0.3, 0.6]), st.sampled_from([0, 2]))
def test_choice_with_key_mask_equals_torch_choice(site, p_remain, k_min):
    """The online choice with the mask equals the torch estimate's (a block may differ only where
    cumulative sums round apart), and the lists count the kept blocks."""
    layout, key_valid, g = site
    nb = layout.n_blocks
    static = (torch.rand(2, nb, nb, generator=g) < 0.1) | (text_blocks(layout) if layout.n_text else False)
    q, k, v = (torch.randn(B, 2, layout.seq_len, 32, generator=g).to(DEVICE) for _ in range(3))
    key_valid = key_valid.to(DEVICE)
    pools = pooled(q, k, v, layout.n_video, BS, key_valid)
    keep, num, _ = select_blocks_triton(pools[0], pools[2], k, static, layout.n_video, 32 ** -0.5, BS, p_remain,
                                        k_min, key_valid=key_valid)
    want, _, _ = torch_estimate(layout, pools, k, static, key_valid, dynamic=True, p_remain=p_remain, k_min=k_min)
    assert (keep.bool() != want).float().mean() <= 0.01
    assert torch.equal(num, keep.sum(-1, dtype=torch.int32))


@settings(max_examples=8, deadline=None)
@given(masked_sites(max_h=5, max_w=7), st.booleans(), st.sampled_from([0.3, 0.6]))
def test_site_with_key_mask_on_triton_equals_reference(site, dynamic, p_remain):
    """The whole site on the Triton kernel with the mask (choice and estimate in Triton, and the
    pooling on the GPU; R·O + Ō in the attention kernel's epilogue) equals the float64 reference in
    fp32: its choice up to rounding, its output given that choice."""
    layout, key_valid, g = site
    nb = layout.n_blocks
    static = (torch.eye(nb, dtype=torch.bool) | (text_blocks(layout) if layout.n_text else False))[None]
    q, k, v = (block_constant(layout, g).to(DEVICE) for _ in range(3))
    kern = rectified_site(layout, static, dynamic=dynamic, rectify=True, p_remain=p_remain, drop=0.8,
                          kernel="triton")
    with mock.patch.object(site_module, "choose_triton", wraps=site_module.choose_triton) as choose_triton:
        keep, _, _ = kern.estimate(q, k, v, key_valid=key_valid.to(DEVICE))
        out = kern(q, k, v, None, None, key_valid.to(DEVICE))
    assert choose_triton.call_count == 2   # estimate() and the call both chose in Triton
    q, k, v, keep = (x.cpu() for x in (q, k, v, keep))
    reference = dict(n_video=layout.n_video, block_size=BS, static=static, dynamic=dynamic, rectify=True,
                     p_remain=p_remain, drop=0.8, key_valid=key_valid)
    _, ref_keep = rectified_attention_reference(q, k, v, **reference)
    assert (keep != ref_keep).float().mean() <= 0.01
    ref, _ = rectified_attention_reference(q, k, v, keep=keep, **reference)
    assert (out.cpu().double() - ref).norm() / ref.norm() < 1e-5


def test_key_mask_of_the_wrong_shape_is_one_clear_error():
    q = torch.randn(2, 1, 40, 16)
    for key_valid in (torch.ones(2, 39, dtype=torch.bool), torch.ones(3, 40, dtype=torch.bool)):
        with pytest.raises(ValueError, match=r"key_valid must be \[B or 1, S\] = \[2, 40\]"):
            block_pool_qkv_triton(q, q, q, 32, 16, key_valid=key_valid)
