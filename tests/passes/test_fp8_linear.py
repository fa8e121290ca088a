"""passes/fp8_linear.py: under quantize="fp8", linear(gelu(h), W) runs as one pass that quantizes
gelu(h) row-wise (kernels/quant_rows.py) and torchao's `_scaled_mm`. On the CPU, through
`inner="aot_eager"` with torchao's tensors traced as on the GPU (its hardware checks lifted): the
output equals torchao's own float8 linears bit for bit, and what is not a GELU, or not quantized
the way the fused pass quantizes, is left to torchao."""
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


@pytest.fixture(autouse=True)
def fp8_on_the_cpu(monkeypatch):
    """torchao's float8 arithmetic runs on the CPU (`_scaled_mm` too); only the checks refuse it."""
    monkeypatch.setattr(quantize, "check_quantize_supported", lambda kind, device: None)
    monkeypatch.setattr(torchao_quant_api, "_check_hardware_support", lambda granularity: None)


class FFN(nn.Module):
    def __init__(self, activation, reuse: bool = False):
        super().__init__()
        self.up, self.down, self.activation, self.reuse = nn.Linear(64, 256), nn.Linear(256, 64), activation, reuse

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
        granularity=torchao_quant.PerRow()), filter_fn=lambda m, name: isinstance(m, nn.Linear))
    compact_compile.report(clear=True)
    with torch.no_grad():
        want = reference(x)
        got = torch.compile(model, backend="compact", options=dict(inner="aot_eager", quantize="fp8"))(x)
    return want, got, compact_compile.report(clear=True)


@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("reuse", [False, True])
def test_gelu_linear_equals_torchao(approximate, reuse):
    want, got, report = run(FFN(lambda h: F.gelu(h, approximate=approximate), reuse))
    assert report.quantized == [dict(kind="fp8", quantized=2, kept=0, gelu_fused=1)]
    assert torch.equal(got, want)
    assert "(1 with their GELU fused into the input's quantization)" in str(report)


@pytest.mark.parametrize("activation", [F.silu, F.relu, lambda h: h])
def test_other_inputs_stay_with_torchao(activation):
    want, got, report = run(FFN(activation))
    assert report.quantized[0]["gelu_fused"] == 0
    assert torch.equal(got, want)


def quantized_with(weight, config):
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    torchao_quant.quantize_(linear, config)
    return linear.weight


def test_why_a_weight_cannot_take_the_fused_pass():
    """The backend's own fp8 weights take it; torchao's other float8 forms (an upper bound on the
    activations' amax, per-tensor scales) are not what the pass computes."""
    weight = torch.randn(32, 64, dtype=torch.bfloat16)
    assert quantize.fused_prologue_unsupported(quantize.quantize_weight(weight, "fp8")) == ""
    bounded = torchao_quant.Float8DynamicActivationFloat8WeightConfig(granularity=torchao_quant.PerRow(),
                                                                      activation_value_ub=1.0)
    assert "without bounds" in quantize.fused_prologue_unsupported(quantized_with(weight, bounded))
    per_tensor = torchao_quant.Float8DynamicActivationFloat8WeightConfig(granularity=torchao_quant.PerTensor())
    assert "row-wise" in quantize.fused_prologue_unsupported(quantized_with(weight, per_tensor))
    assert "row-wise" in quantize.fused_prologue_unsupported(quantize.quantize_weight(weight.half(), "fp8"))
    assert "Float8Tensor" in quantize.fused_prologue_unsupported(weight)


def test_wan_ffns_and_text_projection_take_it_with_the_same_output(monkeypatch):
    """diffusers' FeedForward calls dropout (p = 0, eval) between its GELU and its second linear; the
    pass looks through it. Every FFN and the text embedder's GELU projection fuse, and the output is
    the unfused graph's, bit for bit."""
    from support import tiny_wan

    model, inputs = tiny_wan()
    model = model.bfloat16()
    inputs = {k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}

    def compiled_output():
        torch._dynamo.reset()
        options = dict(inner="aot_eager", quantize="fp8", plan="dense")
        with torch.no_grad():
            return torch.compile(model, backend="compact", options=options)(**inputs)[0]

    compact_compile.report(clear=True)
    fused = compiled_output()
    assert compact_compile.report(clear=True).quantized[0]["gelu_fused"] == 3
    monkeypatch.setattr(quantize, "fuse_gelu_into_fp8_linears", lambda gm, weights: 0)
    assert torch.equal(fused, compiled_output())


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a CUDA GPU of compute capability ≥ 8.9")
def test_on_the_gpu_through_inductor_within_one_e4m3_step_of_torchao():
    """The Triton pass computes the tanh GELU as x·sigmoid(2y) (kernels/quant_rows.py): a few elements
    of the quantized input may sit one e4m3 step from torchao's, so the outputs agree to well within
    FP8's own error (5·10^-2 relative here) but not bit for bit."""
    torch.manual_seed(0)
    model = FFN(lambda h: F.gelu(h, approximate="tanh")).bfloat16().cuda()
    x = torch.randn(4, 300, 64, dtype=torch.bfloat16, device="cuda")
    reference = copy.deepcopy(model)
    torchao_quant.quantize_(reference, torchao_quant.Float8DynamicActivationFloat8WeightConfig(
        granularity=torchao_quant.PerRow()))
    compact_compile.report(clear=True)
    with torch.no_grad():
        want = reference(x).float()
        got = torch.compile(model, backend="compact", options=dict(quantize="fp8"))(x).float()
    assert compact_compile.report(clear=True).quantized[0]["gelu_fused"] == 1
    assert (got - want).norm() <= 1e-3 * want.norm()
