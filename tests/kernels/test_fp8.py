"""FP8 attention (kernels/fp8.py): the quantizing reorder and the Triton kernel's FP8 path against
float64 references, with the error bounds fp8.py states.

Two halves of one bound. The pass: every quantized element is within e4m3's rounding of the exact
one, |x̃ − x| ≤ u·|x| + 2^-10·σ (u = 2^-4, σ the element's scale: half a subnormal step below 2^-6).
The kernel: against float64 attention over the dequantized tiles, reference.fp8_attention_reference's
per-element bound (P's rounding). On a CPU-only machine both run in Triton's interpreter (it runs
e4m3 dots; tests/conftest.py), on a GPU the compiled kernels.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from compact_compile.kernels.fp8 import E4M3, TINY, U, dequantize, quantize_tiles, rotation, smoothing_stats
from compact_compile.kernels.pool_triton import tile_quant_qkv_triton
from compact_compile.kernels.rectified import block_pool
from compact_compile.kernels.reference import block_sparse_attention_reference, fp8_attention_reference
from compact_compile.kernels.registry import kv_block_lists
from compact_compile.kernels.triton_sparse import INTERPRET, block_sparse_attention_fp8, triton_available

DEVICE = "cpu" if INTERPRET else "cuda"
ON_GPU = DEVICE == "cuda"
pytestmark = pytest.mark.skipif(
    not triton_available(DEVICE) or (ON_GPU and torch.cuda.get_device_capability() < (8, 9)),
    reason="needs a CUDA GPU of compute capability ≥ 8.9 or TRITON_INTERPRET=1")

MAX_S = 2000 if ON_GPU else 260
EXAMPLES = int(os.environ.get("COMPACT_GPU_EXAMPLES", 40)) if ON_GPU else 25   # GPU: as test_triton_sparse.py


def inputs(B, H, S, D, dtype, gen, offset=0.0, sharpness=1.0):
    """q, k, v `[B, H, S, D]` N(0, 1) (q times `sharpness`, k plus a common `offset` vector)."""
    q, k, v = (torch.randn(B, H, S, D, generator=gen) for _ in range(3))
    k = k + offset * torch.randn(B, H, 1, D, generator=gen)
    return tuple(x.to(dtype).to(DEVICE) for x in (q * sharpness, k, v))


def random_blocks(H, nb, density, gen):
    blocks = torch.rand(H, nb, nb, generator=gen) < density
    blocks[:, torch.arange(nb), torch.arange(nb)] = True
    return blocks


def quantized(q, k, v, bs, src=None):
    """The FP8 tiles as the rewritten graph makes them (smoothing stats, then the one-pass reorder)."""
    k_mean, v_amax = smoothing_stats(k, v)
    return tile_quant_qkv_triton(q, k, v, src, k_mean, v_amax, q.shape[-2], bs, pool=False)[0]


def assert_within_rounding(x8_dequantized, exact, scale, summed=None):
    """Each element within e4m3's rounding of the exact value: u·|x| + half a subnormal step; for a
    rotated one (a sum of 8 terms ±y), + the fp32 sums' own rounding, ≤ 8·2^-24·Σ|y| (`summed`: Σ|y|)."""
    err = (x8_dequantized - exact).abs()
    bound = U * exact.abs() + 2.0 ** -10 * scale * (1 + 1e-6) + 1e-12
    if summed is not None:
        bound = bound + 8 * 2.0 ** -24 * summed
    assert (err <= bound).all(), f"worst excess {(err - bound).max():.3g}"


def rotated(x):
    """(x·M, Σ of |terms| per element), M fp8.rotation's ±1 matrix: the basis the pass quantizes q and
    k in (float64)."""
    m = rotation(x.shape[-1]).double()
    return x.double() @ m, x.double().abs() @ m.abs()


@pytest.mark.parametrize("S, bs, gather, n_kv, key_mask", [(150, 64, True, 150, None), (128, 128, False, 128, None),
                                                       (77, 64, True, 77, None), (150, 64, True, 60, None),
                                                       (150, 64, False, 150, "broadcast"),
                                                       (150, 64, True, 60, "per-batch")])
def test_quantizing_pass_rounds_each_element_and_pools_as_before(S, bs, gather, n_kv, key_mask):
    """Keys and values pooled over all S tokens (the pass's shared-mask path), the first n_kv (blocks 1
    and 2 hold none at n_kv = 60: their means must be zeros, not k̄), or the tokens a key mask keeps
    (`[1, S]` or `[B, S]`, in tile order; the smoothing statistics take it in model order, as the graph
    computes them before the reorder)."""
    gen = torch.Generator().manual_seed(S + n_kv)
    B = 2
    q, k, v = inputs(B, 2, S, 64, torch.bfloat16, gen, offset=5.0)
    src = torch.randperm(S, generator=gen).to(DEVICE) if gather else None
    key_valid = model_valid = None
    if key_mask:
        key_valid = torch.rand(1 if key_mask == "broadcast" else B, S, generator=gen) < 0.5
        key_valid[:, 64:128] = False     # a block with no key kept
        model_valid = key_valid.clone()
        if src is not None:
            model_valid[:, src.cpu()] = key_valid
    k_mean, v_amax = smoothing_stats(k, v, None if model_valid is None else model_valid.to(DEVICE))
    tiles, pools = tile_quant_qkv_triton(q, k, v, src, k_mean, v_amax, n_kv, bs, pool=True, key_valid=key_valid)
    tq, tk, tv = (x if src is None else x.index_select(-2, src) for x in (q, k, v))
    dq, dk, dv = (x.cpu() for x in dequantize(tiles, bs))
    (q_rot, q_terms), (k_rot, k_terms) = rotated(tq.cpu()), rotated(tk.double().cpu() - k_mean.double().cpu()[:, :, None])
    rows = torch.arange(S) // bs
    assert_within_rounding(dq, q_rot / 8, tiles.q_scale.cpu().double()[..., rows, None], q_terms / 8)
    assert_within_rounding(dk, k_rot, tiles.k_scale.cpu().double()[..., rows, None], k_terms)
    # a v the mask drops may lie beyond v's amax (taken over kept keys) and saturate: it weighs 0
    kept = (torch.ones(1, S, dtype=torch.bool) if key_valid is None else key_valid)[:, None, :, None].expand_as(dv)
    v_scale = tiles.v_scale.cpu().double()[:, :, None, :].expand_as(dv)
    assert_within_rounding(dv[kept], tv.double().cpu()[kept], v_scale[kept])
    # the torch path (CPU, reference) gives the same tiles but for near-ties (fp32 1/σ rounds differently)
    ref = quantize_tiles(tq, tk, tv, k_mean, v_amax, bs)
    for name in ("q", "k"):
        same = (getattr(tiles, name).float() == getattr(ref, name).float()).float().mean()
        assert same > 0.99, f"{name}: {same:.3f} of the elements equal"
    # the same scales, to the last bits of the rotation's fp32 sums (summed in another order)
    torch.testing.assert_close(tiles.q_scale, ref.q_scale, rtol=1e-6, atol=0)
    torch.testing.assert_close(tiles.k_scale, ref.k_scale, rtol=1e-6, atol=0)
    # pooled statistics of the unquantized, unsmoothed inputs in tile order, against the torch pooling
    (qm, qd), (km, kd), (vm, _) = (block_pool(x.float(), n, bs, mask)
                                   for x, n, mask in ((tq, S, None), (tk, n_kv, key_valid), (tv, n_kv, key_valid)))
    for got, want in zip(pools, (qm, qd, km, kd, vm)):
        assert torch.allclose(got.float().cpu(), want.cpu(), atol=1e-5), (got - want.to(got)).abs().max()


def test_quantizing_pass_writes_zeros_in_the_padding_of_v_transposed(monkeypatch):
    """vᵀ's rows are padded from S to a multiple of 16 (TMA), and P·V multiplies those keys by 0: the
    pass must write them, since memory it leaves unwritten may hold e4m3's NaN (0x7F: 0·NaN = NaN).
    New tensors here come filled with 0xFF bytes (NaN in e4m3, -NaN in fp32)."""
    real_empty, made = torch.empty, []

    def poisoned_empty(*shape, **kw):
        made.append((tuple(shape), kw.get("dtype")))
        x = real_empty(*shape, **kw)
        return x.view(torch.uint8).fill_(0xFF).view(x.dtype)

    gen = torch.Generator().manual_seed(3)
    S, bs = 70, 64
    q, k, v = inputs(1, 2, S, 32, torch.bfloat16, gen)
    stats = smoothing_stats(k, v)
    monkeypatch.setattr(torch, "empty", poisoned_empty)
    tiles = tile_quant_qkv_triton(q, k, v, None, *stats, S, bs, pool=False)[0]
    assert ((1, 2, 32, 80), E4M3) in made and torch.isnan(torch.empty(1, dtype=E4M3).float()).all()
    assert (tiles.v_t[..., S:].view(torch.uint8) == 0).all()
    assert not torch.isnan(tiles.v_t.float()).any()


def test_quantizing_pass_refuses_a_block_size_it_cannot_tile():
    """One clear error before a launch: a block size that leaves vᵀ's padded rows unwritten (not a
    multiple of 16)."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = inputs(1, 1, 40, 32, torch.bfloat16, gen)
    stats = smoothing_stats(k, v)
    with pytest.raises(ValueError, match="multiple of 16"):
        tile_quant_qkv_triton(q, k, v, None, *stats, 40, 8, pool=False)


@st.composite
def cases(draw):
    return dict(B=draw(st.integers(1, 2)), H=draw(st.integers(1, 2)), S=draw(st.integers(1, MAX_S)),
                D=draw(st.sampled_from([32, 64, 128])), bs=draw(st.sampled_from([64, 128])),
                dtype=draw(st.sampled_from([torch.bfloat16, torch.float16])), density=draw(st.floats(0.0, 1.0)),
                sharpness=draw(st.sampled_from([0.5, 1.0, 3.0])), offset=draw(st.sampled_from([0.0, 20.0])),
                scale=draw(st.sampled_from([None, 0.3])), rectify=draw(st.booleans()),
                key_mask=draw(st.sampled_from([None, "random", "tail"])),
                block_m=draw(st.sampled_from([64, 128])), block_n=draw(st.sampled_from([32, 64, 128])),
                seed=draw(st.integers(0, 2**31 - 1)))


def key_mask(kind, B, S, gen):
    if kind is None:
        return None
    valid = (torch.rand(B, S, generator=gen) < 0.7 if kind == "random"
             else torch.arange(S)[None] < torch.randint(1, S + 1, (B, 1), generator=gen))
    valid[:, 0] = True
    return valid.to(DEVICE)


def run_case(c):
    gen = torch.Generator().manual_seed(c["seed"])
    B, H, S, D, bs, dtype = c["B"], c["H"], c["S"], c["D"], c["bs"], c["dtype"]
    nb = -(-S // bs)
    q, k, v = inputs(B, H, S, D, dtype, gen, c["offset"], c["sharpness"])
    blocks = random_blocks(H, nb, c["density"], gen)
    valid = key_mask(c["key_mask"], B, S, gen)
    rectify = None
    if c["rectify"]:
        rectify = (torch.rand(B, H, nb, generator=gen) + 0.5, torch.randn(B, H, nb, D, generator=gen))
    tiles = quantized(q, k, v, bs)
    num, idx = (x.to(DEVICE) for x in kv_block_lists(blocks))
    out = torch.full((B, H, S, D), float("nan"), dtype=dtype, device=DEVICE)   # poison: every row written
    block_sparse_attention_fp8(tiles, num, idx, bs, c["scale"], dtype=dtype, key_valid=valid, out=out,
                               rectify=None if rectify is None else tuple(x.to(DEVICE) for x in rectify),
                               config=dict(BLOCK_M=c["block_m"], BLOCK_N=c["block_n"], num_warps=4, num_stages=2))
    ref, bound = fp8_attention_reference(tiles, blocks, bs, c["scale"], valid)
    ref, bound = ref.cpu(), bound.cpu()
    if rectify is not None:
        r = rectify[0].double().repeat_interleave(bs, -1)[..., :S, None]          # per query block, to rows
        o_bar = rectify[1].double().repeat_interleave(bs, -2)[..., :S, :]
        ref, bound = r * ref + o_bar, r.abs() * bound
    out = out.double().cpu()
    assert torch.isfinite(out).all(), "non-finite output (an unwritten or NaN row)"
    err = (out - ref).abs()
    allowed = bound + 2 * torch.finfo(dtype).eps * ref.abs() + 1e-6
    assert (err <= allowed).all(), f"worst excess over the bound {(err - allowed).max():.3g}"
    return out, q, k, v, blocks, valid, rectify


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
@example(dict(B=1, H=2, S=129, D=64, bs=128, dtype=torch.bfloat16, density=0.0, sharpness=1.0, offset=0.0,
              scale=None, rectify=False, key_mask=None, block_m=64, block_n=64, seed=0))   # one key in the tail
@example(dict(B=2, H=1, S=200, D=32, bs=64, dtype=torch.float16, density=1.0, sharpness=3.0, offset=20.0,
              scale=None, rectify=True, key_mask="tail", block_m=64, block_n=32, seed=3))  # a key block all masked
def test_kernel_within_the_bound_of_its_float64_reference(c):
    run_case(c)


def exact_error(q, k, v, blocks, bs, smooth: bool):
    """Relative error of FP8 attention against exact float64 attention of the unquantized inputs."""
    k_mean, v_amax = smoothing_stats(k, v)
    tiles = quantize_tiles(q, k, v, k_mean if smooth else torch.zeros_like(k_mean), v_amax, bs)
    num, idx = (x.to(DEVICE) for x in kv_block_lists(blocks))
    out = block_sparse_attention_fp8(tiles, num, idx, bs, dtype=q.dtype).double().cpu()
    ref = block_sparse_attention_reference(q.cpu(), k.cpu(), v.cpu(), blocks, bs)
    return ((out - ref).norm() / ref.norm()).item()


def test_smoothing_keeps_the_error_of_keys_with_a_large_common_offset():
    """k = 30·c + noise: without smoothing the offset sets k's scales, and its rounding (u·30 per
    element) swamps the part of k that differs between keys — the only part softmax sees. Smoothed,
    the error is that of k without the offset; a kernel path that dropped the mean would fail here."""
    gen = torch.Generator().manual_seed(1)
    S, bs = 256, 64
    q, k, v = inputs(1, 2, S, 64, torch.bfloat16, gen)
    blocks = random_blocks(2, S // bs, 0.5, gen)
    offset = (30 * torch.randn(1, 2, 1, 64, generator=gen)).to(torch.bfloat16).to(DEVICE)
    plain = exact_error(q, k, v, blocks, bs, smooth=True)
    smoothed = exact_error(q, k + offset, v, blocks, bs, smooth=True)
    unsmoothed = exact_error(q, k + offset, v, blocks, bs, smooth=False)
    assert smoothed < 1.5 * plain + 0.01 and smoothed < 0.1
    assert unsmoothed > 3 * smoothed


def test_mask_is_not_ignored():
    """FP8 over a sparse map and a key mask matches its reference, which is far from dense: a kernel
    ignoring either would sit at dense attention's distance."""
    gen = torch.Generator().manual_seed(5)
    S, bs = 192, 64
    q, k, v = inputs(1, 2, S, 64, torch.bfloat16, gen)
    blocks = random_blocks(2, 3, 0.3, gen)
    valid = key_mask("random", 1, S, gen)
    tiles = quantized(q, k, v, bs)
    dense, _ = fp8_attention_reference(tiles, torch.ones(1, 3, 3, dtype=torch.bool), bs)
    for keys in (None, valid):
        num, idx = (x.to(DEVICE) for x in kv_block_lists(blocks))
        out = block_sparse_attention_fp8(tiles, num, idx, bs, dtype=torch.bfloat16, key_valid=keys).double()
        ref, _ = fp8_attention_reference(tiles, blocks, bs, key_valid=keys)      # on the tiles' device
        assert (out - ref).norm() < 0.05 * ref.norm()
        assert (ref - dense).norm() > 0.3 * dense.norm()


def test_all_zero_blocks_quantize_to_zero_and_attend_evenly():
    """q = k = 0: every scale at its floor, whose product underflows to 0 in fp32. Scores are then 0
    (softmax is even over the kept keys), not the NaN of the −inf of keys past S times 0."""
    x = torch.zeros(1, 1, 64, 32, dtype=torch.bfloat16, device=DEVICE)
    tiles = quantized(x, x, x, 64)
    assert tiles.q_scale.min() == TINY / 448 / 8 and (tiles.q.float() == 0).all() and (tiles.v_t.float() == 0).all()
    S, bs = 100, 64
    zeros = torch.zeros(1, 1, S, 32, dtype=torch.bfloat16, device=DEVICE)
    v = torch.randn(1, 1, S, 32, generator=torch.Generator().manual_seed(0)).to(DEVICE, torch.bfloat16)
    tiles = quantized(zeros, zeros, v, bs)
    num, idx = (t.to(DEVICE) for t in kv_block_lists(torch.ones(1, 2, 2, dtype=torch.bool)))
    out = block_sparse_attention_fp8(tiles, num, idx, bs, dtype=torch.bfloat16).double().cpu()
    ref, bound = fp8_attention_reference(tiles, torch.ones(1, 2, 2, dtype=torch.bool), bs)
    assert torch.isfinite(out).all() and ((out - ref.cpu()).abs() <= bound.cpu() + 1e-2 * ref.abs().cpu()).all()


def test_a_row_whose_first_keys_are_masked_keeps_its_true_maximum():
    """Left padding (the first key block all masked) and every kept score far below 0 (μ = 0, exact
    for any μ): a row that has seen no kept key keeps m = −inf, so its first kept keys set P's base.
    With the base floored at 0 instead, e4m3 of 448·2^(s·c) rounded every p of the row to 0."""
    gen = torch.Generator().manual_seed(2)
    S, bs, D = 128, 64, 64
    e = torch.zeros(D)
    e[0] = 1
    q, k, v = (torch.randn(1, 1, S, D, generator=gen) for _ in range(3))
    q, k = (0.3 * q + 4 * e).to(torch.bfloat16), (0.3 * k - 30 * e).to(torch.bfloat16)
    valid = (torch.arange(S) >= bs)[None].to(DEVICE)
    _, v_amax = smoothing_stats(k, v, valid.cpu())
    tiles = quantize_tiles(q, k, v.to(torch.bfloat16), torch.zeros(1, 1, D), v_amax, bs)
    tiles = type(tiles)(*(t.to(DEVICE) for t in tiles))
    blocks = torch.ones(1, 2, 2, dtype=torch.bool)
    num, idx = (t.to(DEVICE) for t in kv_block_lists(blocks))
    out = block_sparse_attention_fp8(tiles, num, idx, bs, dtype=torch.bfloat16, key_valid=valid).double().cpu()
    ref, bound = (t.cpu() for t in fp8_attention_reference(tiles, blocks, bs, key_valid=valid))
    assert (out.abs().amax(-1) > 0).all()
    assert ((out - ref).abs() <= bound + 2 * torch.finfo(torch.bfloat16).eps * ref.abs() + 1e-6).all()


@pytest.mark.parametrize("quantizer", ["triton pass", "torch"])
def test_padding_keys_set_neither_the_mean_nor_v_scales(quantizer):
    """Padding keys far off in one direction, their values 1000× larger: with the statistics over the
    kept keys, FP8's error against exact attention is that of inputs without them; over every token,
    the padding's offset (half of k's mean) swamps the kept keys' differences. The padding's v,
    beyond the kept keys' amax, saturates at ±448 (a NaN there would reach every row's P·V)."""
    gen = torch.Generator().manual_seed(3)
    S, bs, D = 256, 64, 64
    q, k, v = inputs(1, 2, S, D, torch.bfloat16, gen)
    valid = (torch.rand(1, S, generator=gen) < 0.5).to(DEVICE)
    valid[:, 0] = True
    pad = ~valid[:, None, :, None]
    k = torch.where(pad, k + (40 * torch.randn(D, generator=gen)).to(k), k)
    v = torch.where(pad, 1000 * v, v)
    blocks = random_blocks(2, S // bs, 0.5, gen)
    num, idx = (x.to(DEVICE) for x in kv_block_lists(blocks))
    ref = block_sparse_attention_reference(q.cpu(), k.cpu(), v.cpu(), blocks, bs, key_valid=valid.cpu())

    def error(stats):
        if quantizer == "torch":
            tiles = quantize_tiles(q, k, v, *stats, bs)
        else:
            tiles = tile_quant_qkv_triton(q, k, v, None, *stats, S, bs, pool=False)[0]
        out = block_sparse_attention_fp8(tiles, num, idx, bs, dtype=q.dtype, key_valid=valid).double().cpu()
        assert torch.isfinite(out).all()
        return ((out - ref).norm() / ref.norm()).item()

    kept = error(smoothing_stats(k, v, valid))
    assert kept < 0.06 and error(smoothing_stats(k, v)) > 2 * kept


def test_block_sizes_whose_key_tile_is_under_32_are_one_clear_error():
    """P·V's K is the key tile, and e4m3 dots need K ≥ 32 (the interpreter takes any K; the GPU's
    compiler refused 16): 16-token blocks are refused before a launch, with the reason."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = inputs(1, 1, 64, 32, torch.bfloat16, gen)
    tiles = quantized(q, k, v, 16)
    num, idx = (t.to(DEVICE) for t in kv_block_lists(torch.ones(1, 4, 4, dtype=torch.bool)))
    with pytest.raises(ValueError, match=r"block size 16 not supported in FP8 .*e4m3 dots need K ≥ 32"):
        block_sparse_attention_fp8(tiles, num, idx, 16, dtype=torch.bfloat16)
    tiles = quantized(q, k, v, 32)
    num, idx = (t.to(DEVICE) for t in kv_block_lists(torch.ones(1, 2, 2, dtype=torch.bool)))
    with pytest.raises(ValueError, match=r"config BLOCK_N 16: the FP8 path's P·V dot needs key tiles of ≥ 32"):
        block_sparse_attention_fp8(tiles, num, idx, 32, dtype=torch.bfloat16,
                                   config=dict(BLOCK_M=32, BLOCK_N=16))
