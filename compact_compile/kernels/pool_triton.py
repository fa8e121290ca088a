"""Rectification's pooled statistics in Triton: block means and mean absolute deviations of q, k, v
in one read of each (optionally while reordering them into tile order). estimate_triton.py turns
them into a static plan's R, Ō.

For block n of `BLOCK` tokens and the tokens i of it that count (w_i = 1: real tokens; for keys and
values only video tokens that the key-padding mask, if any, keeps),
    x̄_n  = Σ_i w_i·x_i / Σ_i w_i
    δx_n = Σ_i w_i·|x_i − x̄_n| / Σ_i w_i
A [BLOCK, COLS] slice stays in registers between the two sums, so the tensor is read once; Inductor's
version of the same math (rectified.block_pool, the reference and CPU path) reads it twice or more.

For FP8 attention (fp8.py) the same pass writes q, k, v as e4m3 tiles with their scales instead of
copies in their dtype (q and k rotated first), pooling or not: the reorder reads each tensor from memory
once either way (pooled q and k blocks twice, the second read from cache).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8 import E4M3, FP8Tiles, padded_rows
from .fp8_triton import SCALE_PER_AMAX, to_e4m3
from .registry import checked_key_valid
from .triton_sparse import INTERPRET


@triton.jit
def valid_rows(rows, n_valid, KEY_VALID, key_valid_stride_b, b, MASKED: tl.constexpr):
    """Which of `rows` (tile order) of batch element b count: those below n_valid and, with MASKED,
    kept by the key-padding mask KEY_VALID (int8 `[B or 1, S]`, batch stride 0 to broadcast)."""
    ok = rows < n_valid
    if MASKED:
        ok = ok & (tl.load(KEY_VALID + b * key_valid_stride_b + rows, mask=ok, other=0) != 0)
    return ok


def key_mask_arg(key_valid: torch.Tensor, batch: int, seq_len: int):
    """(key_valid `[B or 1, S]` as the kernels read it: 0/1 int8, contiguous (a bool mask is viewed,
    not copied); its batch stride, 0 for one row broadcast over the batch)."""
    key_valid = checked_key_valid(key_valid, batch, seq_len).to(torch.bool).contiguous().view(torch.int8)
    return key_valid, key_valid.stride(0) if key_valid.shape[0] > 1 else 0


@triton.jit
def _quantize_v_tile(x, OUT, SCALE, STAT, bh, blk, rows, cols, S16, D: tl.constexpr, ROUND: tl.constexpr):
    """Write one whole block of v (x: fp32, zeros in rows beyond S, COLS = D) in e4m3, fp8.quantize_tiles'
    arithmetic: per channel, σ_d = STAT[bh, d]/448 from v's amax over the kept keys (to SCALE[bh] once),
    transposed to [D, S16] (a padding key's v beyond that amax saturates at ±448 in the conversion, and
    weighs 0), its rows from S to S16 (TMA's padding) written as zeros: unwritten, a byte may be e4m3's
    NaN, and P·V multiplies those keys by 0 (0·NaN = NaN). The mask rows < S16 also keeps the transposed
    stores 16-byte vectors where S is not a multiple of 16 (a mask at S broke them into single bytes:
    2.3× slower at Wan-1.3B's 32,760 tokens, H200)."""
    amax = tl.maximum(tl.load(STAT + bh * D + cols), 1e-30)
    q8 = to_e4m3(x * (448.0 / amax)[None, :], ROUND)
    tl.store(OUT + (bh * D + cols[None, :]).to(tl.int64) * S16 + rows[:, None], q8, mask=(rows < S16)[:, None])
    if blk == 0:
        tl.store(SCALE + bh * D + cols, amax * SCALE_PER_AMAX)


@triton.jit
def _pool_columns(x, shift, MEAN, MAD, valid, out_row, cols, D: tl.constexpr, WITH_MAD: tl.constexpr,
                  SHIFTED: tl.constexpr):
    """Mean (and mean absolute deviation) over the `valid` rows of x `[rows, cols]`, or with SHIFTED of
    x + shift (shift `[cols]`, which the deviation does not depend on), to row out_row of MEAN (MAD)
    `[.., D]` at `cols`; zeros where no row is valid."""
    x = tl.where(valid[:, None], x.to(tl.float32), 0.0)
    n = tl.sum(valid.to(tl.float32), 0)
    count = tl.maximum(n, 1.0)
    mean = tl.sum(x, 0) / count
    tl.store(MEAN + out_row * D + cols, tl.where(n > 0, mean + shift, 0.0) if SHIFTED else mean)
    if WITH_MAD:
        dev = tl.where(valid[:, None], tl.abs(x - mean[None, :]), 0.0)
        tl.store(MAD + out_row * D + cols, tl.sum(dev, 0) / count)


@triton.jit
def _fwht8(x0, x1, x2, x3, x4, x5, x6, x7):
    """(y_i = Σ_j H₈[i, j]·x_j), H₈ the Sylvester Hadamard matrix of ±1: three butterfly stages between
    whole tensors, elementwise."""
    x0, x1, x2, x3, x4, x5, x6, x7 = x0 + x1, x0 - x1, x2 + x3, x2 - x3, x4 + x5, x4 - x5, x6 + x7, x6 - x7
    x0, x1, x2, x3, x4, x5, x6, x7 = x0 + x2, x1 + x3, x0 - x2, x1 - x3, x4 + x6, x5 + x7, x4 - x6, x5 - x7
    return x0 + x4, x1 + x5, x2 + x6, x3 + x7, x0 - x4, x1 - x5, x2 - x6, x3 - x7


@triton.jit
def _rotated_channels(cols, D: tl.constexpr):
    """The channel each tile column of a rotated q or k block is read from (fp8.rotation's order): column
    t = 16g + 2j + e holds channel 2g + e + (D/8)·j, so the 8 channels one rotation mixes (j = 0…7, D/8
    apart) lie within 16 adjacent columns, pairs of adjacent channels each a 4-byte load."""
    chan = (cols // 16) * 2 + cols % 2 + ((cols // 2) % 8) * (D // 8)
    return tl.max_contiguous(tl.multiple_of(chan, 2), 2)


@triton.jit
def _butterflies(x):
    """x `[.., 2, 2, 2]` (j's three bits) ↦ Σ_j' H₈[j, j']·x[.., j']: split into its 8 columns and
    joined back, all within each thread's registers (16 adjacent columns per thread: ptxas, sm_90a, no
    layout conversion)."""
    e0, e1 = tl.split(x)
    e00, e01 = tl.split(e0)
    e10, e11 = tl.split(e1)
    z0, z4 = tl.split(e00)
    z2, z6 = tl.split(e01)
    z1, z5 = tl.split(e10)
    z3, z7 = tl.split(e11)
    y0, y1, y2, y3, y4, y5, y6, y7 = _fwht8(z0, z1, z2, z3, z4, z5, z6, z7)
    return tl.join(tl.join(tl.join(y0, y4), tl.join(y2, y6)), tl.join(tl.join(y1, y5), tl.join(y3, y7)))


@triton.jit
def _smoothed(base, STAT, bh, in_seq, chan, D: tl.constexpr, SMOOTH: tl.constexpr):
    """(channels `chan` of the block, fp32, k − k̄ where SMOOTH, rows beyond S zeros; the shift k̄)"""
    x = tl.load(base + chan[None, :], mask=in_seq[:, None], other=0.0).to(tl.float32)
    shift = tl.zeros(chan.shape, tl.float32)
    if SMOOTH:
        shift = tl.load(STAT + bh * D + chan)
        x = tl.where(in_seq[:, None], x - shift[None, :], 0.0)
    return x, shift


@triton.jit
def _rotated_tile(base, OUT, MEAN, MAD, SCALE, STAT, valid, bh, out_row, rows, in_seq, S, BLOCK: tl.constexpr,
                  D: tl.constexpr, WITH_MAD: tl.constexpr, POOL: tl.constexpr, QUANT: tl.constexpr,
                  ROUND: tl.constexpr):
    """q (QUANT 1) or k − k̄ (2) of one block rotated by fp8.rotation and written in e4m3 with the
    block's scale amax/448, over 8 for q (M·Mᵀ = 8·I). Pooled first where POOL, from the block in
    channel order: that tile is dead before the rotated one is read (again, from cache), so one fp32
    tile is live at a time (sm_90a, 4 warps: 249 registers and no spills, against 255 and 98 B of
    spills pooling the rotated read; 168 without pooling, as unrotated)."""
    SMOOTH: tl.constexpr = QUANT == 2
    cols = tl.arange(0, D)
    if POOL:
        x, shift = _smoothed(base, STAT, bh, in_seq, cols, D, SMOOTH)
        _pool_columns(x, shift, MEAN, MAD, valid, out_row, cols, D, WITH_MAD, SMOOTH)
    x, _ = _smoothed(base, STAT, bh, in_seq, _rotated_channels(cols, D), D, SMOOTH)
    even, odd = tl.split(tl.reshape(x, [BLOCK, D // 16, 2, 2, 2, 2]))   # axes g, j's bits, e
    y = tl.reshape(tl.join(_butterflies(even), _butterflies(odd)), [BLOCK, D])
    amax = tl.maximum(tl.max(tl.max(tl.abs(y), 1), 0), 1e-30)
    tl.store(OUT + (bh * S + rows[:, None].to(tl.int64)) * D + cols[None, :], to_e4m3(y * (448.0 / amax), ROUND),
             mask=in_seq[:, None])
    tl.store(SCALE + out_row, amax * SCALE_PER_AMAX / (8 if QUANT == 1 else 1))


@triton.jit
def _pool_tile(X, OUT, SRC, MEAN, MAD, KEY_VALID, SCALE, STAT, stride_b, stride_h, stride_s, key_valid_stride_b,
               b, h, bh, blk, out_row, c0, n_valid, S, S16, BLOCK: tl.constexpr, D: tl.constexpr, COLS: tl.constexpr,
               WITH_MAD: tl.constexpr, GATHER: tl.constexpr, MASKED: tl.constexpr,
               POOL: tl.constexpr, QUANT: tl.constexpr, ROUND: tl.constexpr):
    """Mean (and deviation) of one [BLOCK, COLS] slice of block `blk` over its rows below n_valid
    (with MASKED: that KEY_VALID keeps), where POOL; with GATHER its rows are read at model positions
    SRC[row]; the slice is written, in tile order, to OUT (contiguous [B, H, S, D]) as it is (GATHER)
    or in e4m3 (QUANT 1, 2: q and k rotated, `_rotated_tile`; 3: v, `_quantize_v_tile`). Rows beyond S
    are zeros in the tile (loaded so, or zeroed with the shift), so the quantization needs no masked
    copy of it."""
    rows = blk * BLOCK + tl.arange(0, BLOCK)
    cols = c0 + tl.arange(0, COLS)
    in_seq = rows < S
    src = tl.load(SRC + rows, mask=in_seq, other=0).to(tl.int64) if GATHER else rows.to(tl.int64)
    base = X + b * stride_b + h * stride_h + src[:, None] * stride_s
    if QUANT == 1 or QUANT == 2:
        valid = valid_rows(rows, n_valid, KEY_VALID, key_valid_stride_b, b, MASKED)
        _rotated_tile(base, OUT, MEAN, MAD, SCALE, STAT, valid, bh, out_row, rows, in_seq, S, BLOCK, D, WITH_MAD,
                      POOL, QUANT, ROUND)
    else:
        x = tl.load(base + cols[None, :], mask=in_seq[:, None], other=0.0)
        if QUANT == 3:
            x = x.to(tl.float32)
            _quantize_v_tile(x, OUT, SCALE, STAT, bh, blk, rows, cols, S16, D, ROUND)
        elif GATHER:
            tl.store(OUT + (bh * S + rows[:, None].to(tl.int64)) * D + cols[None, :], x, mask=in_seq[:, None])
        if POOL:
            valid = valid_rows(rows, n_valid, KEY_VALID, key_valid_stride_b, b, MASKED)
            _pool_columns(x, tl.zeros([COLS], tl.float32), MEAN, MAD, valid, out_row, cols, D, WITH_MAD, False)


@triton.jit
def _pool_qkv(Q, K, V, QT, KT, VT, SRC, QM, QD, KM, KD, VM, KEY_VALID, QS, KS, VS, K_MEAN, V_AMAX,
              sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, key_valid_stride_b, n_heads, S, S16, n_kv,
              BLOCK: tl.constexpr, D: tl.constexpr, COLS: tl.constexpr, GATHER: tl.constexpr, MASKED: tl.constexpr,
              POOL: tl.constexpr, QUANT: tl.constexpr, ROUND: tl.constexpr):
    """q̄, δq over all S tokens, k̄, δk, v̄ over the first n_kv (with MASKED: those KEY_VALID keeps),
    where POOL, in one launch (and, with GATHER, q, k, v in tile order; with QUANT, in e4m3 with their
    scales QS, KS, VS: fp8.py). Means and deviations are per column, so a program takes a
    [BLOCK, COLS] slice of one block of one of the three tensors: small tiles, many programs in
    flight, and the loads are what bounds it (QUANT takes whole blocks: a block scale needs all columns)."""
    blk = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    SPLIT: tl.constexpr = D // COLS
    which = tl.program_id(2) // SPLIT
    c0 = (tl.program_id(2) % SPLIT) * COLS
    b, h, out_row = bh // n_heads, bh % n_heads, bh * tl.num_programs(0) + blk
    if which == 0:
        _pool_tile(Q, QT, SRC, QM, QD, KEY_VALID, QS, K_MEAN, sqb, sqh, sqs, key_valid_stride_b, b, h, bh, blk,
                   out_row, c0, S, S, S16, BLOCK, D, COLS, True, GATHER, False, POOL, QUANT * 1, ROUND)
    elif which == 1:
        _pool_tile(K, KT, SRC, KM, KD, KEY_VALID, KS, K_MEAN, skb, skh, sks, key_valid_stride_b, b, h, bh, blk,
                   out_row, c0, n_kv, S, S16, BLOCK, D, COLS, True, GATHER, MASKED, POOL, QUANT * 2, ROUND)
    else:
        _pool_tile(V, VT, SRC, VM, VM, KEY_VALID, VS, V_AMAX, svb, svh, svs, key_valid_stride_b, b, h, bh, blk,
                   out_row, c0, n_kv, S, S16, BLOCK, D, COLS, False, GATHER, MASKED, POOL, QUANT * 3, ROUND)


# per pass: pooling alone, and pooling while reordering (measured on an H100, BENCHMARKS.md); quantizing
# takes whole blocks (COLS = D), and 4 warps measured best without pooling and with it (H200, 2026-12-01,
# bench_quant_pass.py at Wan-1.3B / Wan-14B's sites: 0.117 / 0.890 ms, pooling 0.194 / 1.447 ms; 8 or 16
# warps, a register cap, and re-reading the block for the pooling in column slices were all slower); keys
# pooled from their smoothed tile (no spills) took the pooling pass to 0.181 / 1.360 ms (same day); with q and
# k rotated, 0.133 / 0.985 ms and pooling 0.225 / 1.685 ms (4 warps still best; BENCHMARKS.md, "Shipped")
POOL_CONFIG = {False: dict(COLS=64, num_warps=2), True: dict(COLS=128, num_warps=4)}
QUANT_CONFIG = dict(num_warps=4)


def _pool_launch(q, k, v, n_kv: int, block_size: int, src, config: dict | None, key_valid, pool: bool = True,
                 quant: tuple | None = None):
    B, H, S, D = q.shape
    if D < 16 or D & (D - 1) or not q.shape == k.shape == v.shape:
        raise ValueError(f"q, k, v must share one shape with a power-of-two head dim ≥ 16; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if quant and block_size % 16:
        raise ValueError(f"FP8 tiles need a block size that is a multiple of 16 (vᵀ's padded rows, TMA); "
                         f"got {block_size}")
    nb = triton.cdiv(S, block_size)
    config = {**POOL_CONFIG[src is not None], **(dict(COLS=D, **QUANT_CONFIG) if quant else {}),
              **(config or {})}
    cols = D if quant else min(config["COLS"], D)
    new = lambda *shape, dtype=torch.float32: torch.empty(*shape, device=q.device, dtype=dtype)  # noqa: E731
    pools = [new(B, H, nb, D) for _ in range(5)] if pool else [q] * 5
    if quant:
        k_mean, v_amax = (x.to(q.device, torch.float32).contiguous() for x in quant)
        tiles = FP8Tiles(new(B, H, S, D, dtype=E4M3), new(B, H, S, D, dtype=E4M3),
                         new(B, H, D, padded_rows(S), dtype=E4M3), new(B, H, nb), new(B, H, nb), new(B, H, D), k_mean)
        tiled, scales, stats = tiles[:3], tiles[3:6], (k_mean, v_amax)
    else:
        tiled = [new(B, H, S, D, dtype=x.dtype) for x in (q, k, v)] if src is not None else [q] * 3
        scales, stats = [q] * 3, [q] * 2
    masked = key_valid is not None
    key_valid, key_valid_stride_b = key_mask_arg(key_valid.to(q.device), B, S) if masked else (q, 0)
    _pool_qkv[(nb, B * H, 3 * (D // cols))](q, k, v, *tiled, q if src is None else src, *pools, key_valid, *scales,
                                            *stats, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                                            key_valid_stride_b, H, S, padded_rows(S), n_kv, BLOCK=block_size, D=D,
                                            COLS=cols, GATHER=src is not None, MASKED=masked, POOL=pool,
                                            QUANT=quant is not None, ROUND=INTERPRET,
                                            num_warps=config["num_warps"],
                                            **({"maxnreg": config["maxnreg"]} if "maxnreg" in config else {}))
    return (tiles if quant else tuple(tiled)), (tuple(pools) if pool else None)


def block_pool_qkv_triton(q, k, v, n_kv: int, block_size: int, config: dict | None = None, key_valid=None):
    """(q̄, δq, k̄, δk, v̄) float32 `[B, H, n_blocks, D]` of q, k, v `[B, H, S, D]` (last dims
    contiguous): queries over all S tokens, keys and values over their first n_kv that the key-padding
    mask `key_valid` (bool `[B or 1, S]`, if given) keeps; zeros for a block with none. `config`
    (COLS=, num_warps=, maxnreg=) overrides POOL_CONFIG (benchmarks)."""
    return _pool_launch(q, k, v, n_kv, block_size, None, config, key_valid)[1]


def _check_src(src, q):
    if src.shape != (q.shape[-2],) or src.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"src must be an int32/int64 [S={q.shape[-2]}] index; got {src.dtype} {tuple(src.shape)}")
    return src.contiguous()


def tile_pool_qkv_triton(q, k, v, src, n_kv: int, block_size: int, config: dict | None = None, key_valid=None):
    """((q, k, v) in tile order, contiguous, (q̄, δq, k̄, δk, v̄) as block_pool_qkv_triton's) in one
    pass over q, k, v `[B, H, S, D]` in model order: tiled row p is model row src[p], and `key_valid`
    is in tile order (its row p is tiled row p). Rectification's pooling rides on the reorder the
    sparse path does anyway."""
    return _pool_launch(q, k, v, n_kv, block_size, _check_src(src, q), config, key_valid)


def tile_quant_qkv_triton(q, k, v, src, k_mean, v_amax, n_kv: int, block_size: int, pool: bool,
                          config: dict | None = None, key_valid=None):
    """(`fp8.FP8Tiles` of q, k, v reordered into tile order, the pooled statistics of
    `tile_pool_qkv_triton` (of the unquantized, unsmoothed inputs) where `pool`, else None) in one pass
    over q, k, v: fp8.quantize_tiles' arithmetic, with k's mean and v's channel amax `[B, H, D]` from
    the graph (fp8.smoothing_stats). `src` None: q, k, v are in tile order already. `config`
    (num_warps=, maxnreg=) overrides QUANT_CONFIG (benchmarks)."""
    src = None if src is None else _check_src(src, q)
    return _pool_launch(q, k, v, n_kv, block_size, src, config, key_valid, pool, (k_mean, v_amax))
