"""Row-wise e4m3 quantization of a linear layer's input, with the GELU that produces it fused in: what
torchao's float8 dynamic-activation linear does to its input (PerRow: one scale per row), in one pass.

torchao's arithmetic (Float8Tensor.from_hp through _choose_scale_float8 and _quantize_affine_float8),
for x `[..., N]` in bf16:
    a = max(max_n |x_n|, a_min)           (exact in bf16; a_min > 0 torchao's `hp_value_lb`, a power of two:
                                          a row of zeros gets a finite σ and zeros, not 0/0)
    σ = bf16(a/448) → fp32                (a bf16 tensor's division is rounded to bf16; CUDA multiplies by
                                          fl(1/448), the CPU divides, and for every bf16 a the two agree)
    x8 = e4m3(clamp(fp32(x) / σ, ±448))   (a NaN anywhere in the row makes σ and the row NaN)
The kernel's x/σ is Triton's fp32 division (within 2 ulps, not correctly rounded), so a value at an
e4m3 rounding boundary may land one step from torch's (4 of 1.05·10⁹ at 13,824 wide, 72 of 3.9·10⁸ at
5,120; H200). With GELU first, x = bf16(gelu(h)) in fp32 (PyTorch's opmath), tanh form or erf form. The
tanh form is computed as x·sigmoid(2y) (½(1 + tanh y) = sigmoid(2y)) without libdevice's tanh, whose
cost made the pass compute-bound (2.4 ms against 0.71 ms without the GELU, H200): one exponential and
one division, well conditioned everywhere (quant_rows_triton.py: the pass, loaded where it runs). PyTorch's ½x(1 + tanh y) is not below x ≈ −3 (1 + tanh y
cancels; it is 0 from x ≈ −6), so there the two differ relatively by up to a few 10⁻³ on values
below 10⁻²·|x|; elsewhere they agree to a few fp32 ulps, and the bf16 value differs only where they
straddle a rounding boundary: 6·10⁻⁵ of the quantized values at Wan2.1-14B's FFN sit one e4m3
step from torchao's (libdevice's tanh: 9 of 1.05·10⁹).

Why: Inductor fuses GELU and this quantization into one looped reduction that reads each 13,824-wide
row twice and computes the GELU twice (Wan2.1-14B's FFN: 3.3 ms a call, 1 TB/s). A row fits in
registers: one program reads it once, keeps gelu(h) there, and writes x8 and σ (1.38 ms; 0.71 ms
without the GELU, 4.4 TB/s; H200, benchmarks/bench_quant_rows.py).

`fp8_linear` is the linear that consumes it, as torchao's torch path computes it (`_scaled_mm` of the
two row-scaled operands); passes/fp8_linear.py puts it where the graph has linear(gelu(h), W).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .fp8 import E4M3, E4M3_MAX

PROLOGUES = {"none": 0, "gelu_tanh": 1, "gelu": 2}
MAX_WIDTH = 16384    # the widest row measured (a row is one program's registers: 8 warps, 64 values a thread)


def quant_rows_reference(h: torch.Tensor, prologue: str, amax_min: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x8, σ `[..., 1]` fp32) in torch, torchao's steps one by one: the CPU path and the tests' reference."""
    x = h if prologue == "none" else F.gelu(h, approximate="tanh" if prologue == "gelu_tanh" else "none")
    amax = x.abs().amax(-1, keepdim=True)
    scale = (amax.clamp(min=amax_min) / E4M3_MAX).float()
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def amax_floor_exact(amax_min: float) -> bool:
    """Whether torch's clamp of a bf16 amax to `amax_min` is the kernel's fp32 maximum with it: a power of
    two in bf16's normal range (any other value could round apart between the two)."""
    return math.frexp(amax_min)[0] == 0.5 and 2.0 ** -126 <= amax_min <= 2.0 ** 127


@torch.library.custom_op("compact::quant_rows", mutates_args=())
def quant_rows(h: torch.Tensor, prologue: str, amax_min: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x8, σ) of prologue(h): the Triton pass on CUDA (which checks its inputs), torch elsewhere."""
    if h.is_cuda:
        from .quant_rows_triton import quant_rows_triton
        return quant_rows_triton(h, prologue, amax_min)
    if prologue not in PROLOGUES:
        raise ValueError(f"quant_rows' prologue must be one of {sorted(PROLOGUES)}, not {prologue!r}")
    x8, scale = quant_rows_reference(h, prologue, amax_min)
    return x8.contiguous(), scale


@quant_rows.register_fake
def _(h, prologue, amax_min):
    return h.new_empty(h.shape, dtype=E4M3), h.new_empty(*h.shape[:-1], 1, dtype=torch.float32)


def fp8_linear(h: torch.Tensor, weight, bias: torch.Tensor | None, prologue: str) -> torch.Tensor:
    """F.linear(prologue(h), weight, bias) for a torchao float8 weight with row-wise scales and row-wise
    float8 activations (quantize.fused_prologue_unsupported says which), as torchao's torch path computes
    it: `_scaled_mm` of the row-quantized input and the weight (column-major, as its `.t()` is) with both
    scales; the input's quantization, prologue included, is one `quant_rows` pass."""
    x8, scale = torch.ops.compact.quant_rows(h, prologue, weight.act_quant_kwargs.hp_value_lb)
    out = torch._scaled_mm(x8.reshape(-1, x8.shape[-1]), weight.qdata.t(), scale_a=scale.reshape(-1, 1),
                           scale_b=weight.scale.t(), bias=bias, out_dtype=h.dtype,
                           use_fast_accum=weight.mm_config.use_fast_accum)
    return out.reshape(*h.shape[:-1], out.shape[-1])
