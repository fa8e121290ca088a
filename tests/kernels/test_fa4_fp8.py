"""FA4's FP8 path (kernels/fa4_fp8_sm90.py) against float64 attention over the dequantized tiles, with
reference.fp8_attention_reference's bound (O kept in the MMA accumulator): random lengths (partial
last blocks), block maps, scales, common key offsets, key-padding masks, both output dtypes. GPU only (sm90 + FA4); the
CPU suite compiles nothing of it (tests/kernels/test_sm90_builds.py covers the Triton kernels)."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from compact_compile.kernels.fa4 import FA4Kernel, fa4_importable
from compact_compile.kernels.fp8 import quantize_tiles, smoothing_stats
from compact_compile.kernels.reference import fp8_attention_reference
from compact_compile.kernels.registry import kv_block_lists

ON_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9 and fa4_importable()
pytestmark = pytest.mark.skipif(not ON_GPU, reason="needs an sm90 GPU with flash_attn.cute (FA4) installed")
EXAMPLES = int(os.environ.get("COMPACT_GPU_EXAMPLES", 40))
BS, D = 128, 128


@st.composite
def cases(draw):
    return dict(B=draw(st.integers(1, 2)), H=draw(st.integers(1, 3)), S=draw(st.integers(1, 3000)),
                dtype=draw(st.sampled_from([torch.bfloat16, torch.float16])), density=draw(st.floats(0.0, 1.0)),
                sharpness=draw(st.sampled_from([0.5, 1.0, 3.0])), offset=draw(st.sampled_from([0.0, 20.0])),
                scale=draw(st.sampled_from([None, 0.3])), per_head=draw(st.booleans()),
                key_mask=draw(st.sampled_from([None, "random", "prompt", "early", "broadcast"])),
                seed=draw(st.integers(0, 2**31 - 1)))


def key_mask(kind, B, S, gen):
    """None; a random half of the keys; a prompt's padding (each batch element's keys past a random
    length, as HunyuanVideo's text); a random half of the first block's keys only, so that a partial
    last block stays a full block behind mask blocks; or one random mask broadcast over the batch."""
    if kind is None:
        return None
    if kind == "prompt":
        return (torch.arange(S)[None] < torch.randint(1, S + 1, (B, 1), generator=gen)).cuda()
    valid = torch.rand(1 if kind == "broadcast" else B, S, generator=gen) < 0.5
    if kind == "early":
        valid[:, BS:] = True
    return valid.cuda()


def attend_p_in_registers(kernel, tiles, blocks, scale, dtype, valid):
    """`attend_fp8` with P as the P·V MMA's register operand: vᵀ's keys reordered for it, the lists split
    for a key mask as `attend_fp8` splits them."""
    from compact_compile.kernels.fa4 import _run_fp8, in_mma_key_order

    prepared, table = kernel.prepare(kv_block_lists(blocks.cuda())), None
    if valid is not None:
        prepared, table = kernel._key_masked(prepared, valid, tiles.q.shape[0], tiles.q.shape[2], tiles.q.device)
    return _run_fp8(in_mma_key_order(tiles), prepared, scale, dtype, key_table=table, p_in_registers=True)


def run_case(c):
    gen = torch.Generator().manual_seed(c["seed"])
    B, H, S, dtype = c["B"], c["H"], c["S"], c["dtype"]
    nb = -(-S // BS)
    q, k, v = (torch.randn(B, H, S, D, generator=gen) for _ in range(3))
    q = q * c["sharpness"] * torch.rand(B, H, S, 1, generator=gen).add(0.1)   # blocks of unlike scales
    k = k + c["offset"] * torch.randn(B, H, 1, D, generator=gen)
    v = v * torch.rand(1, 1, 1, D, generator=gen).add(0.05)                    # channels of unlike scales
    q, k, v = (x.to(dtype).cuda() for x in (q, k, v))
    lists = c.get("lists", "per_head" if c["per_head"] else "shared")
    shape = {"shared": (1, nb, nb), "per_head": (H, nb, nb), "per_batch": (B, H, nb, nb)}[lists]
    blocks = torch.rand(*shape, generator=gen) < c["density"]
    valid = key_mask(c.get("key_mask"), B, S, gen)
    tiles = quantize_tiles(q, k, v, *smoothing_stats(k, v, valid), BS)
    kernel = FA4Kernel(SimpleNamespace(block_size=BS))
    if c.get("p_in_registers"):
        out = attend_p_in_registers(kernel, tiles, blocks, c["scale"], dtype, valid)
    else:
        out = kernel.attend_fp8(tiles, kernel.prepare(kv_block_lists(blocks.cuda())), c["scale"], dtype, valid)
    ref, bound = (t.cpu() for t in fp8_attention_reference(tiles, blocks, BS, c["scale"], valid, o_in_mma=True))
    out = out.double().cpu()
    assert torch.isfinite(out).all(), "non-finite output"
    err = (out - ref).abs()
    allowed = bound + 2 * torch.finfo(dtype).eps * ref.abs() + 1e-6
    assert (err <= allowed).all(), f"worst excess over the bound {(err - allowed).max():.3g}"
    return out, ref


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
@example(dict(B=1, H=2, S=129, dtype=torch.bfloat16, density=0.0, sharpness=1.0, offset=0.0, scale=None,
              per_head=True, seed=0))                    # no block listed: zeros; one key in the last block
@example(dict(B=2, H=1, S=1000, dtype=torch.float16, density=1.0, sharpness=3.0, offset=20.0, scale=0.3,
              per_head=False, seed=3))
@example(dict(B=2, H=2, S=700, dtype=torch.bfloat16, density=0.3, sharpness=1.0, offset=20.0, scale=None,
              per_head=True, key_mask="prompt", seed=4))   # rows whose listed blocks keep no key: zeros
@example(dict(B=1, H=2, S=650, dtype=torch.bfloat16, density=1.0, sharpness=1.0, offset=0.0, scale=None,
              per_head=False, key_mask="early", seed=6))   # the partial last block: full, behind a mask block
def test_fp8_path_within_the_bound_of_its_float64_reference(c):
    run_case(c)


def test_mask_is_not_ignored():
    """Dropping a block changes the rows that listed it (the same inputs, one block fewer)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 3 * BS, D, generator=gen).to(torch.bfloat16).cuda() for _ in range(3))
    tiles = quantize_tiles(q, k, v, *smoothing_stats(k, v), BS)
    kernel = FA4Kernel(SimpleNamespace(block_size=BS))
    full = torch.ones(1, 3, 3, dtype=torch.bool)
    sparse = full.clone()
    sparse[0, 1, 2] = False
    a, b = (kernel.attend_fp8(tiles, kernel.prepare(kv_block_lists(m.cuda())), None, torch.bfloat16)
            for m in (full, sparse))
    rows = slice(BS, 2 * BS)
    assert (a[..., rows, :] - b[..., rows, :]).abs().max() > 1e-2
    assert torch.equal(a[..., :BS, :], b[..., :BS, :]) and torch.equal(a[..., 2 * BS:, :], b[..., 2 * BS:, :])
    ref, _ = fp8_attention_reference(tiles, sparse, BS)
    assert ((b.double() - ref).norm() / ref.norm()) < 0.05


def test_key_mask_is_not_ignored():
    """Every block listed, a prompt-padding mask on batch element 1 only: the masked run matches its
    reference, element 1's output is far from its unmasked one, and element 0's is the same."""
    gen = torch.Generator().manual_seed(2)
    S = 3 * BS
    q, k, v = (torch.randn(2, 1, S, D, generator=gen).to(torch.bfloat16).cuda() for _ in range(3))
    valid = (torch.arange(S)[None] < torch.tensor([[S], [S - BS - 40]])).cuda()   # element 1: 168 keys padded
    blocks = torch.ones(1, 3, 3, dtype=torch.bool)
    kernel = FA4Kernel(SimpleNamespace(block_size=BS))
    outs = []
    for keys in (None, valid):
        tiles = quantize_tiles(q, k, v, *smoothing_stats(k, v, keys), BS)
        outs.append(kernel.attend_fp8(tiles, kernel.prepare(kv_block_lists(blocks.cuda())), None, torch.bfloat16,
                                      keys).double())
        ref, _ = fp8_attention_reference(tiles, blocks, BS, key_valid=keys)
        assert ((outs[-1] - ref).norm() / ref.norm()) < 0.05
    assert (outs[0][1] - outs[1][1]).norm() > 0.2 * outs[0][1].norm()     # element 1: its mask changed it
    assert (outs[0][0] - outs[1][0]).norm() < 0.02 * outs[0][0].norm()     # element 0 keeps every key


@pytest.mark.parametrize("keys", [None, "prompt", "early"])
def test_p_in_registers_within_the_bound(keys):
    """P as the P·V MMA's register operand (not the default yet): within the same bound of float64 as
    the shared-memory path, over partial last blocks, per-head lists and key masks; and its output is
    the shared-memory path's up to rounding (the same P, the same MMAs)."""
    for seed in range(3):
        c = dict(B=2, H=2, S=650 + 131 * seed, dtype=(torch.bfloat16, torch.float16)[seed % 2], density=0.6,
                 sharpness=1.0, offset=20.0 * (seed % 2), scale=None, per_head=seed > 0, key_mask=keys, seed=seed)
        registers, _ = run_case(dict(c, p_in_registers=True))
        shared, _ = run_case(c)
        # the same products, summed in another key order inside each MMA step: output roundings may differ
        assert (registers - shared).norm() <= torch.finfo(c["dtype"]).eps * shared.norm()


def test_lists_broadcast_in_any_pattern_and_order():
    """The kernel is built per pattern of lists broadcast over batch or heads (their zero strides are
    compiled in) and per key mask or none: shared lists first, then per-head and per-batch ones, masked
    and not, each against float64; a masked kernel reused for an unmasked call (or the reverse) fails."""
    from compact_compile.kernels import fa4

    fa4._FP8_COMPILED.clear()
    for lists, keys in (("shared", None), ("per_head", "prompt"), ("per_batch", None), ("shared", "broadcast"),
                        ("shared", None)):
        run_case(dict(B=2, H=2, S=700, dtype=torch.bfloat16, density=0.5, sharpness=1.0, offset=0.0, scale=None,
                      per_head=False, lists=lists, key_mask=keys, seed=1))


def test_inputs_it_cannot_take_are_one_clear_error():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 256, 64, generator=gen).to(torch.bfloat16).cuda() for _ in range(3))
    tiles = quantize_tiles(q, k, v, *smoothing_stats(k, v), BS)
    kernel = FA4Kernel(SimpleNamespace(block_size=BS))
    with pytest.raises(ValueError, match="head dim 64"):
        kernel.attend_fp8(tiles, kernel.prepare(kv_block_lists(torch.ones(1, 2, 2, dtype=torch.bool).cuda())), None,
                          torch.bfloat16)
