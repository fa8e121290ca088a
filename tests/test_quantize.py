"""options={"quantize": ...}: torchao-quantized linears through the backend (int8 on the CPU; fp8 is
refused where the hardware cannot run it)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchao.quantization as torchao_quant
from support import WAN_GRID, raises_from_backend, rel_err, tiny_wan

import compact_compile
from compact_compile.quantize import QuantizeError, check_quantize_supported


class MLP(nn.Module):
    """Two quantizable linears, one whose shape is not a multiple of 16, and one parameter that
    is a linear weight AND used elsewhere (so must stay as it is)."""

    def __init__(self):
        super().__init__()
        self.up, self.down, self.odd = nn.Linear(64, 128), nn.Linear(128, 48), nn.Linear(48, 20)
        self.tied = nn.Linear(48, 48)

    def forward(self, x):
        h = self.down(F.gelu(self.up(x)))
        h = self.tied(h) + h @ self.tied.weight
        return self.odd(h)


def torchao_int8(model: nn.Module, skip=("odd", "tied")) -> nn.Module:
    """What torchao's own `quantize_` makes of the linears the backend quantizes."""
    q = copy.deepcopy(model)
    torchao_quant.quantize_(q, torchao_quant.Int8DynamicActivationInt8WeightConfig(),
                            filter_fn=lambda m, name: isinstance(m, nn.Linear) and name not in skip)
    return q


def compiled(model, **options):
    return torch.compile(model, backend="compact", options=dict(inner="aot_eager", **options))


def test_int8_equals_torchao_quantize_of_the_same_layers():
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(3, 40, 64)
    with torch.no_grad():
        out, want, fp32 = compiled(model, quantize="int8")(x), torchao_int8(model)(x), model(x)
    assert rel_err(out, want) < 1e-5
    assert rel_err(out, fp32) > 1e-4  # really quantized
    assert compact_compile.report().quantized == [dict(kind="int8", quantized=2, kept=1, gelu_fused=0)]


def test_weight_changed_after_compile_is_quantized_again():
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(3, 40, 64)
    fast = compiled(model, quantize="int8")
    with torch.no_grad():
        before = fast(x)
        model.up.weight.mul_(-0.5)
        after, want = fast(x), torchao_int8(model)(x)
    assert rel_err(after, want) < 1e-5
    assert rel_err(after, before) > 1e-2


def test_regional_compile_quantizes_each_block_once(monkeypatch):
    """compile_repeated_blocks: one block graph called with every block's weights; each weight is
    quantized once (not again per call), and the result equals torchao's own quantize_ of the
    blocks' linears under the same regional compile."""
    import compact_compile.quantize as quantize

    made = []
    real = quantize.quantize_weight
    monkeypatch.setattr(quantize, "quantize_weight", lambda w, kind: (made.append(w), real(w, kind))[1])
    model, inputs = tiny_wan()
    options = dict(plan="window", window=(1, 3, 3), block_size=64, grid=WAN_GRID, quantize="int8")
    reference = copy.deepcopy(model)
    torchao_quant.quantize_(reference, torchao_quant.Int8DynamicActivationInt8WeightConfig(),
                            filter_fn=lambda m, name: isinstance(m, nn.Linear) and name.startswith("blocks."))
    reference.compile_repeated_blocks(backend="compact", options=dict(options, quantize=None, inner="aot_eager"))
    regional = copy.deepcopy(model)
    regional.compile_repeated_blocks(backend="compact", options=dict(options, inner="aot_eager"))
    with torch.no_grad():
        want = reference(**inputs)[0]
        out = [regional(**inputs)[0] for _ in range(2)][-1]
    linears_per_block = 10   # attn1 and attn2: q, k, v, out; ffn: two
    assert len(made) == len({id(w) for w in made}) == 2 * linears_per_block
    assert rel_err(out, want) < 1e-5


def test_int8_wan_through_the_sparse_backend_stays_close_to_unquantized():
    """Stated tolerance: int8 dynamic quantization moves the tiny Wan's output by < 3% (relative
    norm); the dense plan alone moves it by ~1e-6."""
    model, inputs = tiny_wan()
    with torch.no_grad():
        want = model(**inputs)[0]
        out = compiled(model, plan="dense", quantize="int8")(**inputs)[0]
    rel = ((out - want).norm() / want.norm()).item()
    assert 1e-4 < rel < 3e-2
    r = compact_compile.report()
    assert r.quantized[0]["quantized"] > 0 and any(s["rewritten"] for s in r.sites)
    assert "quantized to int8" in str(r)


def test_fp8_refused_on_cpu_with_one_clear_error():
    model, inputs = tiny_wan()
    with raises_from_backend(QuantizeError, match=r"compute capability ≥ 8.9.*on cpu"):
        with torch.no_grad():
            compiled(model, quantize="fp8")(**inputs)


def test_fp8_refused_on_a_gpu_older_than_ada(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(QuantizeError, match=r"A100 has 8\.0"):
        check_quantize_supported("fp8", torch.device("cuda"))
    check_quantize_supported("int8", torch.device("cuda"))
