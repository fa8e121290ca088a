"""quant_rows.py's pass in Triton: one program a row, the row in registers (GELU, row amax, σ rounded to
bf16 as torchao's bf16 division does, e4m3 values); its arithmetic and why are in quant_rows.py. Loaded
only where the pass runs (a CUDA tensor through `compact::quant_rows`, tests, benchmarks)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8 import E4M3
from .fp8_triton import SCALE_PER_AMAX, to_e4m3
from .quant_rows import MAX_WIDTH, PROLOGUES, amax_floor_exact
from .triton_sparse import INTERPRET


@triton.jit
def bf16_in_fp32(x, INTERPRETED: tl.constexpr):
    """fp32 x rounded to bf16 (to nearest even), as fp32. The interpreter's cast truncates, so there it is
    done on the bits: the low 16 dropped with the carry of a round-up."""
    if INTERPRETED:
        bits = x.to(tl.int32, bitcast=True)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) & -0x10000).to(tl.float32, bitcast=True)
    return x.to(tl.bfloat16).to(tl.float32)


@triton.jit
def _quant_rows(H, X8, SCALE, N, stride_h, AMAX_MIN, BLOCK: tl.constexpr, PROLOGUE: tl.constexpr,
                INTERPRETED: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < N
    h = tl.load(H + row * stride_h + cols, mask=inside, other=0.0)
    x = h.to(tl.float32)
    if PROLOGUE == 1:     # tanh GELU ½x(1 + tanh y), y = √(2/π)(x + 0.044715x³), as x·sigmoid(2y)
        y = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        x = x / (1.0 + tl.exp(-2.0 * y))
    elif PROLOGUE == 2:   # erf GELU: ½x(1 + erf(x/√2))
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    x = bf16_in_fp32(x, INTERPRETED)
    # max drops NaN: a NaN in the row must make σ NaN, as torch's amax does (the sum of the row's NaNs is
    # NaN, or 0 without one)
    nans = tl.sum(tl.where(x != x, x, 0.0), 0)
    amax = tl.maximum(tl.max(tl.abs(x), 0), AMAX_MIN) + nans
    scale = bf16_in_fp32(amax * SCALE_PER_AMAX, INTERPRETED)
    q = tl.clamp(x / scale, -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(X8 + row * N + cols, to_e4m3(q, INTERPRETED), mask=inside)
    tl.store(SCALE + row, scale)


def warps_for(block: int) -> int:
    """Warps a row of `block` (a power of two) takes: 4 up to 8,192 and 8 above, the fastest measured at
    5,120 and 13,824 wide (bench_quant_rows.py, H200)."""
    return 4 if block <= 8192 else 8


def quant_rows_triton(h: torch.Tensor, prologue: str, amax_min: float, num_warps: int | None = None):
    """`quant_rows_reference` in one Triton pass: one program a row, the row in registers; h in bf16 (the
    one dtype of torchao's row-wise float8 linears, whose rounding the pass repeats)."""
    if (h.dtype != torch.bfloat16 or prologue not in PROLOGUES or not amax_floor_exact(amax_min)
            or h.shape[-1] > MAX_WIDTH):
        raise ValueError(f"quant_rows takes a bf16 input at most {MAX_WIDTH} wide, a prologue of "
                         f"{sorted(PROLOGUES)} and an amax floor that is a power of two; got {h.dtype} "
                         f"{tuple(h.shape)}, {prologue!r} and {amax_min!r}")
    N = h.shape[-1]
    rows = h.reshape(-1, N)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    x8 = torch.empty(h.shape, dtype=E4M3, device=h.device)
    scale = torch.empty(*h.shape[:-1], 1, dtype=torch.float32, device=h.device)
    BLOCK = triton.next_power_of_2(N)
    _quant_rows[(rows.shape[0],)](rows, x8, scale, N, rows.stride(0), float(amax_min), BLOCK=BLOCK,
                                  PROLOGUE=PROLOGUES[prologue],
                                  INTERPRETED=INTERPRET, num_warps=num_warps or warps_for(BLOCK))
    return x8, scale
