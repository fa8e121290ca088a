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

from support import flat_layout, kernel_attend

from compact_compile.kernels.reference import block_sparse_attention_reference
from compact_compile.kernels.registry import kv_block_lists
from compact_compile.kernels.triton_sparse import (
    INTERPRET, TritonKernel, block_sparse_attention, chosen_config, triton_available)

DEVICE = "cpu" if INTERPRET else "cuda"
ON_GPU = DEVICE == "cuda"
pytestmark = pytest.mark.skipif(not triton_available(DEVICE), reason="needs a CUDA GPU or TRITON_INTERPRET=1")

MAX_S = 2000 if ON_GPU else 300
# The GPU sweep is compile-bound (one Triton build per new specialisation, ~4 s an example), so it
# runs as several processes with different --hypothesis-seed values (benchmarks/sweep_kernels.sh),
# each taking a share of the examples; a plain pytest run on a GPU takes 40 (about 3 minutes)
EXAMPLES = int(os.environ.get("COMPACT_GPU_EXAMPLES", 40)) if ON_GPU else 100
# ‖out − ref‖ / ‖ref‖ overall, and the worst single query row (fp32 inputs get fp32 dots, not TF32)
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
ROW_TOL_FACTOR = 5
LAYOUTS = ("contiguous", "bshd", "padded", "hbsd")


def make_tensor(layout: str, B, H, S, D, dtype, gen):
    """A [B, H, S, D] view with the given memory layout, filled with N(0, 1) (never zeros)."""
    shape = {"contiguous": (B, H, S, D), "bshd": (B, S, H, D), "padded": (B, H, S, D + 3), "hbsd": (H, B, S, D)}[layout]
    t = torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype).to(DEVICE)
    return {"contiguous": t, "bshd": t.transpose(1, 2), "padded": t[..., :D], "hbsd": t.transpose(0, 1)}[layout]


def random_blocks(n_heads, nb, density, gen, batch: int | None = None):
    """Random block map `[H, nb, nb]` (or `[batch, H, nb, nb]`) with the diagonal kept, so no query
    block is empty."""
    shape = (n_heads, nb, nb) if batch is None else (batch, n_heads, nb, nb)
    blocks = torch.rand(shape, generator=gen) < density
    blocks[..., torch.arange(nb), torch.arange(nb)] = True
    return blocks


def expected_output(q, k, v, blocks, bs, scale, rectify, key_valid=None):
    """Reference in float64: attend over the kept blocks and valid keys, then rectify per query block."""
    ref = block_sparse_attention_reference(q.cpu(), k.cpu(), v.cpu(), blocks, bs, scale,
                                           None if key_valid is None else key_valid.cpu())
    if rectify is not None:
        R, Obar = (t.double().cpu() for t in rectify)
        qb = torch.arange(ref.shape[-2]) // bs
        ref = R[..., qb, None] * ref + Obar[..., qb, :]
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
        rectify=draw(st.booleans()), batch_lists=draw(st.booleans()),
        key_mask=draw(st.sampled_from([None, "random", "tail"])),
        block_m=draw(st.sampled_from([32, 64, 128])), block_n=draw(st.sampled_from([32, 64, 128])),
        tma=draw(st.booleans()), first_blocks=draw(st.integers(0, 3)), seed=draw(st.integers(0, 2**31 - 1)),
    )


def random_key_mask(kind, B, S, gen):
    """bool `[B, S]` key-padding mask: "random" keys anywhere (≥ 1 kept per batch element), "tail":
    each element keeps a prefix of its own length (text padding), or None."""
    if kind is None:
        return None
    if kind == "random":
        valid = torch.rand(B, S, generator=gen) < 0.7
    else:
        lengths = torch.randint(1, S + 1, (B,), generator=gen)
        valid = torch.arange(S)[None] < lengths[:, None]
    valid[:, 0] = True
    return valid.to(DEVICE)


def run_case(c, *, use_class=False):
    gen = torch.Generator().manual_seed(c["seed"])
    B, H, S, D, bs, dtype = c["B"], c["H"], c["S"], c["D"], c["bs"], c["dtype"]
    nb = -(-S // bs)
    q, k, v = (make_tensor(lay, B, H, S, D, dtype, gen) for lay in c["layouts"])
    q = (q.float() * c["sharpness"]).to(dtype)  # sharper softmax: exercises the running max
    blocks = random_blocks(1 if c["heads_broadcast"] else H, nb, c["density"], gen, B if c["batch_lists"] else None)
    key_valid = random_key_mask(c["key_mask"], B, S, gen)
    rectify = None
    if c["rectify"]:
        rectify = (torch.rand(B, H, nb, generator=gen).to(DEVICE) + 0.5,
                   torch.randn(B, H, nb, D, generator=gen).to(DEVICE))
    if use_class:
        out = kernel_attend("triton", blocks, q, k, v, c["scale"], key_valid, rectify, block_size=bs)
    else:
        num, idx = (x.to(DEVICE) for x in kv_block_lists(blocks))
        out = torch.full((B, H, S, D), float("nan"), dtype=dtype, device=DEVICE)  # poison: every row must be written
        # fp32 tiles of 128×128 at head dim 128 need more shared memory than an H100/H200 has
        cap = 64 if dtype == torch.float32 and D == 128 else 128
        block_sparse_attention(q, k, v, num, idx, bs, c["scale"], key_valid=key_valid, rectify=rectify, out=out,
                               first_blocks=c["first_blocks"],
                               config=dict(BLOCK_M=min(c["block_m"], cap), BLOCK_N=min(c["block_n"], cap),
                                           num_warps=4, num_stages=2, tma=c["tma"]))
    ref = expected_output(q, k, v, blocks, bs, c["scale"], rectify, key_valid)
    assert out.shape == (B, H, S, D) and out.dtype == dtype
    assert_close(out, ref, dtype)


BASE = dict(B=1, H=2, D=32, dtype=torch.float32, layouts=["contiguous"] * 3, heads_broadcast=False,
            density=0.3, sharpness=1.0, scale=None, rectify=False, batch_lists=False, key_mask=None,
            block_m=64, block_n=64, tma=False, first_blocks=0, seed=0)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
# partial last blocks holding one key, a full last block, a lone diagonal; sub-tiles of a 128 block
@example(dict(BASE, S=129, bs=128, block_n=64, density=0.0))
@example(dict(BASE, S=193, bs=64, block_m=32, block_n=32, density=1.0, batch_lists=True, rectify=True))
# text rows launched first: one partial trailing block, several, all of them (a bad map leaves NaN rows)
@example(dict(BASE, B=2, S=200, bs=64, block_m=32, density=0.4, first_blocks=1))
@example(dict(BASE, S=300, bs=128, block_m=64, density=0.4, first_blocks=2, key_mask="tail"))
@example(dict(BASE, S=100, bs=64, density=0.7, first_blocks=5))
# key masks: a key block wholly excluded (its tile has no valid key: exponent base 0, not NaN)
@example(dict(BASE, B=2, S=200, bs=64, density=1.0, key_mask="tail", seed=3))
@example(dict(BASE, B=2, S=150, bs=64, density=0.5, key_mask="random", batch_lists=True, rectify=True))
@example(dict(BASE, S=256, bs=128, block_m=64, block_n=64, dtype=torch.bfloat16, D=128, layouts=["bshd"] * 3))
@example(dict(BASE, S=200, bs=64, block_n=32, density=1.0, tma=True))  # TMA tiles past the end read zeros
@example(dict(BASE, S=5, bs=64, heads_broadcast=True, dtype=torch.float16, rectify=True))
def test_matches_float64_reference(c):
    run_case(c)


@settings(max_examples=max(1, EXAMPLES // 8) if ON_GPU else 10, deadline=None)
@given(cases())
def test_class_with_default_config(c):
    """TritonKernel as a site runtime calls it: the autotuned (GPU) or the interpreter's config."""
    run_case(c, use_class=True)


def test_mask_is_not_ignored():
    """Dropping blocks or keys changes the output exactly as the reference says: a kernel that
    ignored either would match dense attention instead."""
    gen = torch.Generator().manual_seed(5)
    S, bs = 192, 64
    q, k, v = (torch.randn(1, 2, S, 32, generator=gen).to(DEVICE) for _ in range(3))
    blocks = random_blocks(2, 3, 0.3, gen)
    key_valid = random_key_mask("random", 1, S, gen)
    dense = expected_output(q, k, v, torch.ones(1, 3, 3, dtype=torch.bool), bs, None, None)
    for valid in (None, key_valid):
        ref = expected_output(q, k, v, blocks, bs, None, None, valid)
        out = kernel_attend("triton", blocks, q, k, v, key_valid=valid, block_size=bs)
        assert_close(out, ref, torch.float32)
        assert (ref - dense).norm() > 0.1 * dense.norm()


def test_empty_query_block_gives_zeros():
    S, bs, D = 128, 64, 16
    blocks = torch.tensor([[[True, False], [False, False]]])  # second query block keeps nothing
    q, k, v = (torch.randn(1, 1, S, D, device=DEVICE) for _ in range(3))
    out = kernel_attend("triton", blocks, q, k, v, block_size=bs)
    assert (out[:, :, bs:] == 0).all()
    assert_close(out[:, :, :bs], block_sparse_attention_reference(q[:, :, :bs].cpu(), k[:, :, :bs].cpu(),
                                                                   v[:, :, :bs].cpu(), blocks[:, :1, :1], bs), torch.float32)


def test_rejects_bad_inputs():
    num, idx = (x.to(DEVICE) for x in kv_block_lists(torch.ones(1, 2, 2, dtype=torch.bool)))
    q = torch.randn(1, 1, 100, 32, device=DEVICE)

    def att(q, k, v, **kw):
        return block_sparse_attention(q, k, v, num, idx, 64, **kw)
    with pytest.raises(ValueError, match="contiguous last"):
        att(q, torch.randn(1, 1, 32, 100, device=DEVICE).transpose(-1, -2), q)
    with pytest.raises(ValueError, match="head dim"):
        x = torch.randn(1, 1, 100, 48, device=DEVICE)
        att(x, x, x)
    with pytest.raises(ValueError, match="dtype"):
        att(q, q.double(), q)
    with pytest.raises(ValueError, match="kv_num_blocks"):
        x = torch.randn(1, 1, 200, 32, device=DEVICE)
        att(x, x, x)
    with pytest.raises(ValueError, match="key_valid"):
        att(q, q, q, key_valid=torch.ones(1, 99, dtype=torch.bool, device=DEVICE))


@pytest.mark.parametrize("layout, expect_tma", [("contiguous", True), ("padded", False)])
def test_tma_used_only_where_the_strides_allow(layout, expect_tma):
    """TMA descriptors need 16-byte aligned strides: a padded head dim of 35 falls back to pointer loads."""
    c = dict(BASE, S=130, bs=64, D=32, layouts=[layout] * 3, tma=True)
    run_case(c)
    assert chosen_config()["USE_TMA"] is expect_tma
