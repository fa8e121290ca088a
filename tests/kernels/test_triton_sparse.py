"""Property tests of the Triton block-sparse attention kernel against the float64 reference.

On a CPU-only machine they run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
on small shapes; on a GPU the same properties run on the compiled kernel with larger shapes.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from compact_compile.kernels.reference import block_sparse_attention_reference
from compact_compile.kernels.triton_sparse import (
    INTERPRET, TritonBlockSparse, block_sparse_attention, chosen_config, triton_available)

DEVICE = "cpu" if INTERPRET else "cuda"
ON_GPU = DEVICE == "cuda"
pytestmark = pytest.mark.skipif(not triton_available(DEVICE), reason="needs a CUDA GPU or TRITON_INTERPRET=1")

MAX_S = 2000 if ON_GPU else 300
# The GPU sweep is compile-bound (one Triton build per new specialisation), so it runs as several
# processes with different --hypothesis-seed values, each taking a share of the examples
EXAMPLES = int(os.environ.get("COMPACT_GPU_EXAMPLES", 400)) if ON_GPU else 100
# ‖out − ref‖ / ‖ref‖ overall, and the worst single query row (fp32 inputs get fp32 dots, not TF32)
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
ROW_TOL_FACTOR = 5
LAYOUTS = ("contiguous", "bshd", "padded", "hbsd")


def make_tensor(layout: str, B, H, S, D, dtype, gen):
    """A [B, H, S, D] view with the given memory layout, filled with N(0, 1) (never zeros)."""
    shape = {"contiguous": (B, H, S, D), "bshd": (B, S, H, D), "padded": (B, H, S, D + 3), "hbsd": (H, B, S, D)}[layout]
    t = torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype).to(DEVICE)
    return {"contiguous": t, "bshd": t.transpose(1, 2), "padded": t[..., :D], "hbsd": t.transpose(0, 1)}[layout]


def random_blocks(n_heads, nb, density, gen):
    """Random block map with the diagonal kept, so no query block is empty."""
    blocks = torch.rand(n_heads, nb, nb, generator=gen) < density
    blocks[:, torch.arange(nb), torch.arange(nb)] = True
    return blocks


def expected_output(q, k, v, blocks, bs, scale, rectify, src):
    """Reference in float64: permute to tiled order, attend, rectify per tiled query block, and
    put the rows back in model order."""
    if src is not None:
        s = src.long().cpu()
        q, k, v = (t.cpu()[:, :, s] for t in (q, k, v))
    ref = block_sparse_attention_reference(q.cpu(), k.cpu(), v.cpu(), blocks, bs, scale)
    if rectify is not None:
        R, Obar = (t.double().cpu() for t in rectify)
        qb = torch.arange(ref.shape[-2]) // bs
        ref = R[..., qb, None] * ref + Obar[..., qb, :]
    if src is not None:
        ref = torch.empty_like(ref).index_copy_(2, s, ref)
    return ref


def assert_close(out, ref, dtype):
    out = out.double().cpu()
    assert torch.isfinite(out).all(), "non-finite output (an unwritten or NaN row)"
    err = (out - ref).norm() / ref.norm()
    row_err = ((out - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-6)).max()
    assert err < TOL[dtype], f"relative error {err:.3g} ≥ {TOL[dtype]}"
    assert row_err < ROW_TOL_FACTOR * TOL[dtype], f"worst row relative error {row_err:.3g}"


@st.composite
def cases(draw):
    bs = draw(st.sampled_from([64, 128]))
    return dict(
        B=draw(st.integers(1, 2)), H=draw(st.integers(1, 3)),
        S=draw(st.integers(1, MAX_S)), D=draw(st.sampled_from([16, 32, 64, 128] if ON_GPU else [16, 32, 64, 64, 128])),
        bs=bs, dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])),
        layouts=[draw(st.sampled_from(LAYOUTS)) for _ in range(3)],
        heads_broadcast=draw(st.booleans()), density=draw(st.floats(0.0, 1.0)),
        sharpness=draw(st.sampled_from([0.5, 1.0, 4.0])), scale=draw(st.sampled_from([None, 0.3])),
        rectify=draw(st.booleans()), permute=draw(st.booleans()),
        src_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
        block_m=draw(st.sampled_from([32, 64, 128])), block_n=draw(st.sampled_from([32, 64, 128])),
        tma=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)),
    )


def run_case(c, *, use_class=False):
    gen = torch.Generator().manual_seed(c["seed"])
    B, H, S, D, bs, dtype = c["B"], c["H"], c["S"], c["D"], c["bs"], c["dtype"]
    nb = -(-S // bs)
    q, k, v = (make_tensor(lay, B, H, S, D, dtype, gen) for lay in c["layouts"])
    q = (q.float() * c["sharpness"]).to(dtype)  # sharper softmax: exercises the running max
    blocks = random_blocks(1 if c["heads_broadcast"] else H, nb, c["density"], gen)
    rectify = None
    if c["rectify"]:
        rectify = (torch.rand(B, H, nb, generator=gen).to(DEVICE) + 0.5,
                   torch.randn(B, H, nb, D, generator=gen).to(DEVICE))
    src = torch.randperm(S, generator=gen).to(c["src_dtype"]).to(DEVICE) if c["permute"] else None
    if use_class:
        out = TritonBlockSparse(blocks, S, bs)(q, k, v, c["scale"], rectify=rectify, src=src)
    else:
        num, idx = TritonBlockSparse(blocks, S, bs).block_lists(DEVICE)
        out = torch.full((B, H, S, D), float("nan"), dtype=dtype, device=DEVICE)  # poison: every row must be written
        # fp32 tiles of 128×128 at head dim 128 need more shared memory than an H100/H200 has
        cap = 64 if dtype == torch.float32 and D == 128 else 128
        block_sparse_attention(q, k, v, num, idx, bs, c["scale"], rectify=rectify, src=src, out=out,
                               config=dict(BLOCK_M=min(c["block_m"], cap), BLOCK_N=min(c["block_n"], cap),
                                           num_warps=4, num_stages=2, tma=c["tma"]))
    ref = expected_output(q, k, v, blocks, bs, c["scale"], rectify, src)
    assert out.shape == (B, H, S, D) and out.dtype == dtype
    assert_close(out, ref, dtype)


BASE = dict(B=1, H=2, D=32, dtype=torch.float32, layouts=["contiguous"] * 3, heads_broadcast=False,
            density=0.3, sharpness=1.0, scale=None, rectify=False, permute=False, src_dtype=torch.int32,
            block_m=64, block_n=64, tma=False, seed=0)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
# partial last blocks holding one key, a full last block, a lone diagonal; sub-tiles of a 128 block
@example(dict(BASE, S=129, bs=128, block_n=64, density=0.0))
@example(dict(BASE, S=193, bs=64, block_m=32, block_n=32, density=1.0, permute=True, rectify=True))
@example(dict(BASE, S=256, bs=128, block_m=64, block_n=64, dtype=torch.bfloat16, D=128, layouts=["bshd"] * 3))
@example(dict(BASE, S=200, bs=64, block_n=32, density=1.0, tma=True))  # TMA tiles past the end read zeros
@example(dict(BASE, S=5, bs=64, heads_broadcast=True, dtype=torch.float16, rectify=True))
def test_matches_float64_reference(c):
    run_case(c)


@settings(max_examples=max(1, EXAMPLES // 8) if ON_GPU else 10, deadline=None)
@given(cases())
def test_class_with_default_config(c):
    """TritonBlockSparse: the autotuned (GPU) or the interpreter's config, lists cached per device."""
    run_case(c, use_class=True)


def test_lists_cached_per_device():
    att = TritonBlockSparse(random_blocks(2, 3, 0.5, torch.Generator().manual_seed(1)), 300, 128)
    a, b = att.block_lists(DEVICE), att.block_lists(DEVICE)
    assert a[0] is b[0] and a[1] is b[1] and a[0].dtype == a[1].dtype == torch.int32


def test_empty_query_block_gives_zeros():
    S, bs, D = 128, 64, 16
    blocks = torch.tensor([[[True, False], [False, False]]])  # second query block keeps nothing
    q, k, v = (torch.randn(1, 1, S, D, device=DEVICE) for _ in range(3))
    out = TritonBlockSparse(blocks, S, bs)(q, k, v)
    assert (out[:, :, bs:] == 0).all()
    assert_close(out[:, :, :bs], block_sparse_attention_reference(q[:, :, :bs].cpu(), k[:, :, :bs].cpu(),
                                                                   v[:, :, :bs].cpu(), blocks[:, :1, :1], bs), torch.float32)


def test_rejects_bad_inputs():
    att = TritonBlockSparse(torch.ones(1, 2, 2, dtype=torch.bool), 100, 64)
    q = torch.randn(1, 1, 100, 32, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous last"):
        att(q, torch.randn(1, 1, 32, 100, device=DEVICE).transpose(-1, -2), q)
    with pytest.raises(ValueError, match="head dim"):
        x = torch.randn(1, 1, 100, 48, device=DEVICE)
        att(x, x, x)
    with pytest.raises(ValueError, match="dtype"):
        att(q, q.double(), q)
    with pytest.raises(ValueError, match="tokens"):
        x = torch.randn(1, 1, 90, 32, device=DEVICE)
        att(x, x, x)
    with pytest.raises(ValueError, match="blocks must be"):
        TritonBlockSparse(torch.ones(1, 3, 3, dtype=torch.bool), 100, 64)


@pytest.mark.parametrize("layout, expect_tma", [("contiguous", True), ("padded", False)])
def test_tma_used_only_where_the_strides_allow(layout, expect_tma):
    """TMA descriptors need 16-byte aligned strides: a padded head dim of 35 falls back to pointer loads."""
    c = dict(BASE, S=130, bs=64, D=32, layouts=[layout] * 3, tma=True)
    run_case(c)
    assert chosen_config()["USE_TMA"] is expect_tma
