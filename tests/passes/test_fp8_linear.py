"""passes/fp8_linear.py: under quantize="fp8", linear(gelu(h), W) runs as one pass that quantizes
gelu(h) row-wise (kernels/quant_rows.py) and torchao's `_scaled_mm`. On the CPU, through
`inner="aot_eager"` with torchao's tensors traced as on the GPU (its hardware checks lifted): the
output equals torchao's own float8 linears bit for bit, and what is not a GELU, or not quantized
the way the fused pass quantizes, is left to torchao. On the CPU the op runs `quant_rows_reference`
(torch), so these check the rewrite and its plumbing; the Triton pass is checked against that reference
in tests/kernels/test_quant_rows.py, and the pass with `_scaled_mm` by the GPU tests at the end."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchao.quantization as torchao_quant
import torchao.quantization.quant_api as torchao_quant_api

import compact_compile
from compact_compile import quantize
from compact_compile.passes import fp8_linear as fp8_linear_pass
from compact_compile.kernels.quant_rows import MAX_WIDTH, fp8_linear


def cpu_scaled_mm() -> bool:
    """Whether this torch multiplies e4m3 on the CPU (torch 2.13 does; 2.11, the GPU image's, does not)."""
    e4m3 = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(e4m3, e4m3.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16),
                         out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return False
    return True


on_the_cpu = pytest.mark.skipif(not cpu_scaled_mm(), reason="this torch has no e4m3 _scaled_mm on the CPU")


@pytest.fixture(autouse=True)
def fp8_on_the_cpu(monkeypatch):
    """torchao's float8 arithmetic runs on the CPU (`_scaled_mm` too); only the checks refuse it."""
    monkeypatch.setattr(quantize, "check_quantize_supported", lambda kind, device: None)
    monkeypatch.setattr(torchao_quant_api, "_check_hardware_support", lambda granularity: None)


class FFN(nn.Module):
    def __init__(self, activation, reuse: bool = False, width: int = 256):
        super().__init__()
        self.up, self.down = nn.Linear(64, width), nn.Linear(width, 64)
        self.activation, self.reuse = activation, reuse

    def forward(self, x):
        h = self.activation(self.up(x))
        out = self.down(h)
        return out + h[..., :64] if self.reuse else out


def run(model, config=None):
    """(torchao's own float8 model's output, the backend's, the backend's report) on one input."""
    torch.manual_seed(0)
    model = model.bfloat16()
    x = torch.randn(2, 37, 64, dtype=torch.bfloat16)
    reference = copy.deepcopy(model)
    torchao_quant.quantize_(reference, config or torchao_quant.Float8DynamicActivationFloat8WeightConfig(
        granularity=torchao_quant.PerRow(), activation_value_lb=quantize.FP8_AMAX_FLOOR),
        filter_fn=lambda m, name: isinstance(m, nn.Linear))
    compact_compile.report(clear=True)
    with torch.no_grad():
        want = reference(x)
        got = torch.compile(model, backend="compact", options=dict(inner="aot_eager", quantize="fp8"))(x)
    return want, got, compact_compile.report(clear=True)


@on_the_cpu
@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("reuse", [False, True])
def test_gelu_linear_equals_torchao(approximate, reuse):
    want, got, report = run(FFN(lambda h: F.gelu(h, approximate=approximate), reuse))
    assert report.quantized == [dict(kind="fp8", quantized=2, kept=0, gelu_fused=1)]
    assert torch.equal(got, want)
    assert "(1 with their GELU fused into the input's quantization)" in str(report)


@on_the_cpu
@pytest.mark.parametrize("activation", [F.silu, F.relu, lambda h: h])
def test_other_inputs_stay_with_torchao(activation):
    want, got, report = run(FFN(activation))
    assert report.quantized[0]["gelu_fused"] == 0
    assert torch.equal(got, want)


@on_the_cpu
@pytest.mark.parametrize("shape", [(5, 64), (2, 7, 64), (2, 3, 5, 64)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_linear_equals_torchao_for_any_leading_shape(shape, with_bias):
    torch.manual_seed(0)
    weight = quantize.quantize_weight(torch.randn(48, 64, dtype=torch.bfloat16), "fp8")
    bias = torch.randn(48, dtype=torch.bfloat16) if with_bias else None
    h = torch.randn(shape, dtype=torch.bfloat16)
    got = fp8_linear(h, weight, bias, "gelu_tanh")
    assert got.shape == (*shape[:-1], 48)
    assert torch.equal(got, F.linear(F.gelu(h, approximate="tanh"), weight, bias))


@on_the_cpu
def test_rows_wider_than_the_kernel_takes_stay_with_torchao():
    want, got, report = run(FFN(lambda h: F.gelu(h, approximate="tanh"), width=MAX_WIDTH + 16))
    assert report.quantized[0]["gelu_fused"] == 0
    assert torch.equal(got, want)


def quantized_with(weight, config):
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    torchao_quant.quantize_(linear, config)
    return linear.weight


def test_why_a_weight_cannot_take_the_fused_pass():
    """The backend's own fp8 weights take it; torchao's other float8 forms (an upper bound on the
    activations' amax, a floor the kernel's fp32 maximum could round apart from torch's bf16 clamp,
    per-tensor scales) are not what the pass computes."""
    weight = torch.randn(32, 64, dtype=torch.bfloat16)
    assert quantize.fused_prologue_unsupported(quantize.quantize_weight(weight, "fp8")) == ""
    for bounds in (dict(activation_value_lb=quantize.FP8_AMAX_FLOOR, activation_value_ub=1.0),
                   dict(activation_value_lb=1e-6), dict()):
        config = torchao_quant.Float8DynamicActivationFloat8WeightConfig(granularity=torchao_quant.PerRow(), **bounds)
        assert "no upper bound" in quantize.fused_prologue_unsupported(quantized_with(weight, config))
    per_tensor = torchao_quant.Float8DynamicActivationFloat8WeightConfig(granularity=torchao_quant.PerTensor())
    assert "row-wise" in quantize.fused_prologue_unsupported(quantized_with(weight, per_tensor))
    assert "row-wise" in quantize.fused_prologue_unsupported(quantize.quantize_weight(weight.half(), "fp8"))
    assert "Float8Tensor" in quantize.fused_prologue_unsupported(weight)


@on_the_cpu
@pytest.mark.parametrize("family, fused", [("wan", 3), ("cogvideox", 2), ("hunyuan", 2), ("mochi", 0)])
def test_video_transformers_take_it_with_the_same_output(family, fused, monkeypatch):
    """diffusers' FeedForward calls dropout (p = 0, eval) between its GELU and its second linear; the
    pass looks through it. Every GELU FFN fuses (Wan: both blocks' and the text embedder's projection;
    CogVideoX: both blocks'; HunyuanVideo: the double block's video and text FFNs, not the single
    blocks' GELU, which reaches its linear through a concatenation; Mochi: SwiGLU, none), and the output
    is the unfused graph's, bit for bit, and finite: Mochi's padded prompt tokens leave its joint
    attention as rows of zeros, which torchao's float8 without an amax floor made NaN (the whole output
    with them)."""
    import support

    model, inputs = getattr(support, f"tiny_{family}")()
    model = model.bfloat16()
    inputs = {k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}

    def compiled_output():
        torch._dynamo.reset()
        options = dict(inner="aot_eager", quantize="fp8", plan="dense")
        with torch.no_grad():
            return torch.compile(model, backend="compact", options=options)(**inputs)[0]

    compact_compile.report(clear=True)
    with_pass = compiled_output()
    assert compact_compile.report(clear=True).quantized[0]["gelu_fused"] == fused
    assert torch.isfinite(with_pass).all()
    monkeypatch.setattr(fp8_linear_pass, "fuse_gelu_into_fp8_linears", lambda gm, weights: 0)
    assert torch.equal(with_pass, compiled_output())


ON_FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.skipif(not ON_FP8_GPU, reason="needs a CUDA GPU of compute capability ≥ 8.9")
def test_fused_linear_on_the_gpu_within_rounding_of_torchao():
    """The Triton pass computes the tanh GELU as x·sigmoid(2y) (kernels/quant_rows.py): a few elements
    of the quantized input may sit one e4m3 step from torchao's (6·10^-5 of them at Wan-14B's FFN), so
    the linear agrees with torchao's to ~10^-3 (1.0·10^-3 here, H200), far below FP8's own error, not
    bit for bit; a wrong or skipped GELU is off by O(1)."""
    torch.manual_seed(0)
    weight = quantize.quantize_weight(torch.randn(256, 1024, dtype=torch.bfloat16, device="cuda") / 32, "fp8")
    bias = torch.randn(256, dtype=torch.bfloat16, device="cuda")
    h = torch.randn(3, 500, 1024, dtype=torch.bfloat16, device="cuda") * 2
    want = F.linear(F.gelu(h, approximate="tanh"), weight, bias).float()
    got = fp8_linear(h, weight, bias, "gelu_tanh").float()
    assert (got - want).norm() <= 3e-3 * want.norm()
    assert (fp8_linear(h, weight, bias, "none").float() - want).norm() > 0.1 * want.norm()


@pytest.mark.skipif(not ON_FP8_GPU, reason="needs a CUDA GPU of compute capability ≥ 8.9")
def test_through_inductor_on_the_gpu(monkeypatch):
    """Compiled by Inductor, the FFN takes the pass, and stays as close to torchao's eager output as the
    unfused graph (whose quantization Inductor computes in its own order: one e4m3 step apart from
    torchao's on a few percent of elements)."""
    torch.manual_seed(0)
    model = FFN(lambda h: F.gelu(h, approximate="tanh")).bfloat16().cuda()
    x = torch.randn(4, 300, 64, dtype=torch.bfloat16, device="cuda")
    reference = copy.deepcopy(model)
    torchao_quant.quantize_(reference, torchao_quant.Float8DynamicActivationFloat8WeightConfig(
        granularity=torchao_quant.PerRow()))

    def compiled():
        torch._dynamo.reset()
        compact_compile.report(clear=True)
        with torch.no_grad():
            out = torch.compile(model, backend="compact", options=dict(quantize="fp8"))(x).float()
        return out, compact_compile.report(clear=True).quantized[0]["gelu_fused"]

    with torch.no_grad():
        want = reference(x).float()
    fused, count = compiled()
    monkeypatch.setattr(fp8_linear_pass, "fuse_gelu_into_fp8_linears", lambda gm, weights: 0)
    unfused, _ = compiled()
    assert count == 1
    assert (fused - want).norm() <= 1.5 * (unfused - want).norm() + 1e-3 * want.norm()
