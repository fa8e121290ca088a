"""Row-wise e4m3 quantization with the GELU fused in (kernels/quant_rows.py): the Triton pass against
torchao's arithmetic step by step (`quant_rows_reference`) and against float64.

The bound against float64: x̃ = bf16(gelu(h)) is within 2^-8·|g| (+ the fp32 GELU's few ulps) of the
exact g, and its e4m3 value within u·|x̃/σ| + 2^-10 of x̃/σ (u = 2^-4; half a subnormal step), so
|x8·σ − g| ≤ (u + 2^-8·(1 + u))·|g| + 2^-10·σ. Against the reference: scales equal (or one bf16 step
apart, where a row's largest GELU value straddles a bf16 boundary between the two GELU formulas) and
every value within one e4m3 step; without a GELU, the scales equal. On a CPU-only machine the pass
runs in Triton's interpreter.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from compact_compile.kernels.fp8 import E4M3, U
from compact_compile.quantize import FP8_AMAX_FLOOR
from compact_compile.kernels.quant_rows import PROLOGUES, quant_rows_reference, quant_rows_triton
from compact_compile.kernels.triton_sparse import INTERPRET, triton_available

DEVICE = "cpu" if INTERPRET else "cuda"
ON_GPU = DEVICE == "cuda"
pytestmark = pytest.mark.skipif(not triton_available(DEVICE), reason="needs a CUDA GPU or TRITON_INTERPRET=1")
EXAMPLES = int(os.environ.get("COMPACT_GPU_EXAMPLES", 40)) if ON_GPU else 25
GELU = {"none": lambda h: h, "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"), "gelu": F.gelu}


def rows(m, n, magnitude, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(m, n, generator=gen, dtype=torch.float64) * magnitude).to(torch.bfloat16).to(DEVICE)


def e4m3_steps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a − b| in e4m3 steps at the larger magnitude (2^-9 below 2^-6)."""
    a, b = a.float(), b.float()
    big = torch.maximum(a.abs(), b.abs())
    step = torch.where(big < 2.0 ** -6, torch.full_like(big, 2.0 ** -9),
                       2.0 ** (torch.floor(torch.log2(big.clamp(min=2.0 ** -6))) - 3))
    return (a - b).abs() / step


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")   # e^-2y of a very negative x: inf, and x/inf = −0
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(m=st.integers(1, 24), n=st.integers(1, 700), magnitude=st.sampled_from([1e-3, 1.0, 3.0, 200.0]),
       prologue=st.sampled_from(sorted(PROLOGUES)), seed=st.integers(0, 2 ** 16))
@example(m=3, n=13824 if ON_GPU else 1500, magnitude=3.0, prologue="gelu_tanh", seed=1)
@example(m=5, n=16, magnitude=1.0, prologue="gelu", seed=2)
def test_matches_torchao_arithmetic_and_float64(m, n, magnitude, prologue, seed):
    h = rows(m, n, magnitude, seed)
    x8, scale = quant_rows_triton(h, prologue, FP8_AMAX_FLOOR)
    ref8, ref_scale = quant_rows_reference(h, prologue, FP8_AMAX_FLOOR)
    assert x8.dtype == E4M3 and x8.shape == h.shape and scale.shape == (m, 1)
    assert torch.equal(scale, scale.bfloat16().float())            # σ is rounded to bf16, as torchao's
    assert ((scale - ref_scale).abs() <= 2.0 ** -8 * ref_scale).all()
    if prologue == "none":                                           # no GELU formula between them
        assert torch.equal(scale, ref_scale)
    same_scale = (scale == ref_scale).expand_as(h)
    assert (e4m3_steps(x8[same_scale], ref8[same_scale]) <= 1).all()
    exact = GELU[prologue](h.double())
    err = (x8.double() * scale.double() - exact).abs()
    bound = (U + 2.0 ** -8 * (1 + U)) * exact.abs() + 2.0 ** -10 * scale.double() + 1e-6 * exact.abs()
    assert (err <= bound).all(), f"worst excess {(err - bound).max():.3g}"


@pytest.mark.parametrize("prologue", sorted(PROLOGUES))
def test_the_amax_floor_turns_rows_of_zeros_into_zeros_and_nothing_else(prologue):
    """A row of zeros: σ = floor/448 and zero values (without a floor, torchao's 0/0 makes them NaN); a
    floor below every other row's amax changes nothing else."""
    h = rows(6, 200, 1.0, 3)
    h[2] = 0
    x8, scale = quant_rows_triton(h, prologue, FP8_AMAX_FLOOR)
    ref8, ref_scale = quant_rows_reference(h, prologue, FP8_AMAX_FLOOR)
    assert torch.equal(x8[2].float(), torch.zeros(200, device=DEVICE)) and scale[2].item() > 0
    assert torch.equal(scale, ref_scale) and torch.equal(x8.float(), ref8.float())
    higher8, higher_scale = quant_rows_triton(h, prologue, 2.0 ** -20)
    others = torch.arange(6, device=DEVICE) != 2
    assert torch.equal(scale[others], higher_scale[others])
    assert torch.equal(x8[others].float(), higher8[others].float())


def test_only_exact_floors_are_taken():
    h = rows(2, 32, 1.0, 0)
    for floor in (0.0, 1e-6, -1.0, 2.0 ** -130):
        with pytest.raises(ValueError, match="power of two"):
            quant_rows_triton(h, "none", floor)


def test_a_pass_that_skips_the_gelu_is_caught():
    """GELU(h) ≠ h where h < 0: the float64 bound above separates the prologues."""
    h = rows(4, 64, 1.0, 0)
    x8, scale = quant_rows_triton(h, "none", FP8_AMAX_FLOOR)
    exact = F.gelu(h.double(), approximate="tanh")
    assert ((x8.double() * scale.double() - exact).abs() > U * exact.abs() + 2.0 ** -10 * scale.double()).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_other_input_dtypes_are_refused(dtype):
    with pytest.raises(ValueError, match="bf16"):
        quant_rows_triton(torch.randn(2, 32, device=DEVICE, dtype=dtype), "gelu_tanh", FP8_AMAX_FLOOR)


def test_an_unknown_prologue_is_refused():
    with pytest.raises(ValueError, match="prologue"):
        torch.ops.compact.quant_rows(torch.randn(2, 32, dtype=torch.bfloat16), "relu", FP8_AMAX_FLOOR)
