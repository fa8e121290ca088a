"""e4m3 in Triton kernels: the conversion and the scale constant that the FP8 attention kernel
(triton_attn.py), the quantizing reorder (pool_triton.py) and the linears' row quantization
(quant_rows_triton.py) share; the format itself and its torch arithmetic are fp8.py's."""
import triton
import triton.language as tl

from .fp8 import INV_E4M3_MAX

SCALE_PER_AMAX = tl.constexpr(INV_E4M3_MAX)   # σ = amax·(1/448), 1/448 rounded to fp32 as in torch


@triton.jit
def to_e4m3(x, ROUND: tl.constexpr):
    """fp32 x (|x| ≤ 448) as e4m3, rounded to nearest even. With ROUND (Triton's interpreter, whose
    cast drops the carry of a round-up into the exponent: 126.7 became 64) x is first rounded to the
    e4m3 grid in fp32 — dropping 20 of fp32's 23 mantissa bits as integer arithmetic (the carry
    moves the exponent), and steps of 2^-9 below 2^-6 (subnormals) — so the cast itself is exact, and
    NaN is written as e4m3's NaN, which that cast does not give."""
    if ROUND:
        bits = x.to(tl.int32, bitcast=True)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
        subnormal = (x + 24576.0) - 24576.0      # 1.5·2^14: its fp32 step is 2^-9
        x = tl.where(tl.abs(x) < 0.015625, subnormal, normal)
        nan = tl.full(x.shape, 0x7F, tl.uint8).to(tl.float8e4nv, bitcast=True)   # its cast makes NaN finite
        return tl.where(x != x, nan, x.to(tl.float8e4nv))
    return x.to(tl.float8e4nv)
