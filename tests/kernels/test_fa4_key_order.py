"""The CPU half of the FP8 kernel's `p_in_registers` (kernels/fa4_fp8_sm90.py): with vᵀ's keys in
MMA_KEY_ORDER, the bytes `pack_p` puts in each A register of the P·V MMA are the scores of the row and
key that register stands for. Checked on the register layouts of Hopper's wgmma as CUTLASS writes them
(cute/atom/mma_traits_sm90_gmma.hpp: CLayout_64xN for the fp32 accumulator, ALayout_64x32 for an 8-bit
A operand, decoded by hand below), and the kernel's own fragments, read while it is built for sm_90a
(no GPU needed, but FA4 and the CUTLASS DSL installed), are the flat orders that decoding assumes. The
GPU half (the kernel against float64) is test_fa4_fp8.py."""
import importlib.util

import pytest
import torch

from compact_compile.kernels.fa4 import in_mma_key_order
from compact_compile.kernels.fa4_fp8_sm90 import MMA_KEY_ORDER, P_PACKING
from compact_compile.kernels.fp8 import FP8Tiles


def accumulator_entry(lane: int, value: int) -> tuple[int, int]:
    """(row, column) of a warp's thread `lane`, register `value`, in the 64×N fp32 accumulator (warp 0):
    values (v0, v1, v2) at v0 + 2·v1 + 4·v2, row lane/4 + 8·v1, column 2·(lane % 4) + v0 + 8·v2."""
    v0, v1, v2 = value % 2, value // 2 % 2, value // 4
    return lane // 4 + 8 * v1, 2 * (lane % 4) + v0 + 8 * v2


def a_operand_entry(lane: int, register: int, byte: int) -> tuple[int, int]:
    """(row, k) of the 8-bit A operand held by thread `lane` in its 32-bit register `register` (4 per
    32-wide k block: rh + 2·kh), byte `byte` (warp 0): row lane/4 + 8·rh, k 4·(lane % 4) + byte + 16·kh."""
    kb, rh, kh = register // 4, register % 2, register // 2 % 2
    return lane // 4 + 8 * rh, 32 * kb + 4 * (lane % 4) + byte + 16 * kh


def test_each_packed_byte_is_the_score_of_its_row_and_key():
    """For every thread and register of a 128-key tile: byte j of what `pack_p` packs (P_PACKING) is the
    score (row, key) whose key sits at the A operand's k slot once vᵀ's keys are in MMA_KEY_ORDER;
    together the bytes cover every (row, key) of the warp's rows once."""
    assert len(P_PACKING) == 16
    seen = set()
    for lane in range(32):
        for register in range(16):
            for byte, value in enumerate(P_PACKING[register]):
                row, key = accumulator_entry(lane, value)
                a_row, slot = a_operand_entry(lane, register, byte)
                assert row == a_row
                assert 16 * (slot // 16) + MMA_KEY_ORDER[slot % 16] == key, (lane, register, byte)
                seen.add((row, key))
    assert seen == {(r, k) for r in range(16) for k in range(128)}


def test_key_order_is_a_permutation_within_groups_of_16():
    assert sorted(MMA_KEY_ORDER) == list(range(16)) and MMA_KEY_ORDER != tuple(range(16))


def test_tiles_in_mma_key_order_move_only_vt():
    """vᵀ's slot p of each 16-key group holds key 16·g + MMA_KEY_ORDER[p]; nothing else changes."""
    B, H, D, S16 = 1, 2, 8, 48
    v_t = torch.arange(S16, dtype=torch.uint8).expand(B, H, D, S16).contiguous().view(torch.float8_e4m3fn)
    others = [torch.randn(1) for _ in range(6)]
    tiles = FP8Tiles(others[0], others[1], v_t, *others[2:])
    moved = in_mma_key_order(tiles)
    keys = moved.v_t.view(torch.uint8)[0, 0, 0].tolist()
    assert keys == [16 * g + k for g in range(S16 // 16) for k in MMA_KEY_ORDER]
    assert moved.v_t.dtype == torch.float8_e4m3fn and moved.v_t.shape == v_t.shape
    assert all(a is b for a, b in zip(moved[:2] + moved[3:], tiles[:2] + tiles[3:]))


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None or importlib.util.find_spec("cutlass") is None,
                    reason="needs FA4 and the CUTLASS DSL (`compact_compile[fa4]`), a GPU or not")
def test_the_kernels_fragments_are_in_the_order_decoded_above(monkeypatch):
    """`pack_p` indexes the S accumulator and the A registers flat: value v0 + 2·v1 + 4·v2 and register
    rh + 2·kh + 4·kb, as accumulator_entry and a_operand_entry decode them. The kernel's fragments, as
    CuTe lays them out when the kernel is built, at every place P is packed, must be in that order."""
    if not torch.cuda.is_available():   # read when the DSL is first imported
        monkeypatch.setenv("CUTE_DSL_ARCH", "sm_90a")
    import cutlass
    import cutlass.cute as cute

    from benchmarks.sass_fa4_fp8 import compile_fake
    from compact_compile.kernels.fa4_fp8_sm90 import fp8_block_sparse_sm90

    kernel_class, seen = fp8_block_sparse_sm90(), []
    pack_p = kernel_class.pack_p

    def recording(self, acc_S, tOrP):
        seen.append((str(acc_S.layout), str(cute.recast_tensor(tOrP, cutlass.Int32).layout)))
        return pack_p(self, acc_S, tOrP)

    monkeypatch.setattr(kernel_class, "pack_p", recording)
    compile_fake(p_in_registers=True)
    assert seen and set(seen) == {("((2,2,16),1,1):((1,2,4),0,0)", "((1,2,2),1,4):((1,1,2),0,4)")}
