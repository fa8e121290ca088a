"""Row-wise e4m3 quantization with the GELU fused in (kernels/quant_rows.py): the Triton pass against
torchao's arithmetic step by step (`quant_rows_reference`) and against float64.

The bound against float64: x̃ = bf16(gelu(h)) is within 2^-8·|g| of the fp32 GELU, itself within a few
ulps of |g| and, where an fp32 1 + erf cancels (x below about −3), 2^-21·|h| of the exact g; its e4m3
value is within u·|x̃/σ| + 2^-10 of x̃/σ (u = 2^-4; half a subnormal step), so
|x8·σ − g| ≤ (u + 2^-8·(1 + u))·|g| + 2^-10·σ + 2^-21·|h|. Against the reference, over rows whose
largest GELU value is well conditioned (a positive element sets it: PyTorch's ½x(1 + tanh y) cancels
below x ≈ −3, where the kernel's x·sigmoid(2y) does not): scales equal or one bf16 step apart (where
the two GELU forms straddle a bf16 boundary) and every value within one e4m3 step; without a GELU the
scales are equal. Rows of zeros, all-negative rows, NaN and inf are tested on their own. On a CPU-only
machine the pass runs in Triton's interpreter.
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
from compact_compile.kernels.quant_rows import PROLOGUES, quant_rows_reference
from compact_compile.kernels.quant_rows_triton import quant_rows_triton
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
    h[:, 0] = 4 * magnitude
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
    assert_within_float64_bound(x8, scale, h, exact)


def assert_within_float64_bound(x8, scale, h, exact):
    err = (x8.double() * scale.double() - exact).abs()
    bound = ((U + 2.0 ** -8 * (1 + U) + 1e-6) * exact.abs() + 2.0 ** -10 * scale.double()
             + 2.0 ** -21 * h.double().abs())
    assert (err <= bound).all(), f"worst excess {(err - bound).max():.3g}"


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
@pytest.mark.parametrize("prologue", ["gelu_tanh", "gelu"])
def test_rows_of_negative_values_stay_within_the_float64_bound(prologue):
    """Every element below zero: the GELU values are small, and the row's largest sits where PyTorch's
    own fp32 GELU cancels; the kernel stays within the bound of the exact GELU."""
    h = -(rows(8, 300, 3.0, 5).abs() + 0.5).to(torch.bfloat16)
    x8, scale = quant_rows_triton(h, prologue, FP8_AMAX_FLOOR)
    assert_within_float64_bound(x8, scale, h, GELU[prologue](h.double()))


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("prologue", sorted(PROLOGUES))
def test_nan_and_inf_as_torch(prologue):
    """A NaN makes the row's σ and every value NaN (torch's amax keeps NaN, where Triton's max and clamp
    drop it by default); an inf makes σ inf, the finite values 0 and the inf itself NaN (inf/inf). (The
    GELU of inf is not compared: the CPU's vectorized erf GELU makes it NaN, the exact value is inf.)"""
    h = rows(3, 50, 1.0, 7)
    h[0, 3], h[1, 7] = float("nan"), float("inf")
    x8, scale = quant_rows_triton(h, prologue, FP8_AMAX_FLOOR)
    ref8, ref_scale = quant_rows_reference(h, prologue, FP8_AMAX_FLOOR)
    assert torch.isnan(scale[0]).all() and torch.isnan(x8[0].float()).all()
    assert torch.equal(scale[2:], ref_scale[2:]) and torch.isinf(scale[1]).all()
    assert torch.equal(torch.isnan(x8[1].float()), h[1] == float("inf"))
    assert (x8[1].float().nan_to_num() == 0).all()
    if prologue == "none":
        assert torch.equal(scale[1], ref_scale[1]) and torch.equal(x8[1].float().isnan(), ref8[1].float().isnan())


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
