"""`options={"quantize": "fp8" | "int8"}`: torchao-quantized linear layers under the sparse attention.

Dynamo hands the backend a graph whose linear weights are graph inputs (the module's parameters,
passed on every call), not the module. So quantization happens at the graph's boundary: each
weight input used only as the weight of `linear` calls is quantized once with torchao (the same
configs `torchao.quantization.quantize_` applies to an `nn.Linear`), the inner compiler traces the
graph with the quantized tensor subclass in its place, and every call passes the quantized weight
instead of the parameter (one copy per weight: QuantizedWeights). The user's module is not modified
(its bf16 weights stay, so the weights take 1.5× their bf16 memory), and a parameter changed in
place after compiling (its version counter moves) is quantized again before the next call — never a
stale weight.

    fp8   float8 dynamic activations × float8 weights, per-row scales for bf16 weights (per-tensor
          otherwise), the activations' amax floored at FP8_AMAX_FLOOR (rows of zeros stay zeros);
          needs a CUDA GPU of compute capability ≥ 8.9 (Ada, Hopper) — refused elsewhere.
    int8  int8 dynamic activations × int8 weights (per-token × per-channel scales); CPU or CUDA.

Linears whose in/out features are not multiples of 16 stay in their dtype (the fp8/int8 matmuls
need aligned shapes); the report counts them. Under fp8, a linear whose input is a GELU's output
(a transformer's FFN) quantizes that input in one pass with the GELU fused in
(passes/fp8_linear.py, kernels/quant_rows.py): torchao's arithmetic but for the GELU's form and the
division's rounding (6·10⁻⁵ of the values one e4m3 step apart at Wan2.1-14B's FFN), 2.4× faster than
Inductor's fusion of torchao's steps there; the report counts these too.
"""
from __future__ import annotations

import weakref

import torch
import torch._functorch.config
import torch._guards
import torch._inductor.config
import torch.fx as fx
import torch.nn as nn

from .errors import CompactError
from .report import record_quantized

_LINEAR = torch._C._nn.linear  # what F.linear and nn.Linear are in a Dynamo graph
# The floor of an fp8 activation row's amax. torchao's default has none, so a row of zeros gets σ = 0
# and 0/0 = NaN values, and the NaN spreads through the GEMM and attention: Mochi's padded prompt tokens
# leave its joint attention as zero rows, and turned the whole video to NaN. A row whose amax is above
# the floor is quantized exactly as without it; a power of two, so its bf16 clamp is exact.
FP8_AMAX_FLOOR = 2.0 ** -100


class QuantizeError(CompactError, RuntimeError):
    """The `quantize` option cannot run here (e.g. fp8 below compute capability 8.9)."""


def check_quantize_supported(kind: str, device: torch.device) -> None:
    """One clear error where torchao is missing or the hardware cannot run `kind`."""
    import importlib.util

    if importlib.util.find_spec("torchao") is None:
        raise QuantizeError(f'quantize="{kind}" needs torchao: pip install "compact_compile[quantize]"')
    if kind == "fp8":
        if device.type != "cuda":
            raise QuantizeError(f'quantize="fp8" needs a CUDA GPU of compute capability ≥ 8.9 (Ada or Hopper); '
                                f'the model is on {device.type}. Use quantize="int8" or no quantize option.')
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise QuantizeError(f'quantize="fp8" needs compute capability ≥ 8.9 (Ada or Hopper); '
                                f'{torch.cuda.get_device_name(device)} has {major}.{minor}. Use quantize="int8".')


def linear_weight_inputs(gm: fx.GraphModule, example_inputs) -> list[int]:
    """Indices of graph inputs that are 2D parameters used only as the weight of linear calls."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    found = []
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if not (isinstance(value, nn.Parameter) and value.dim() == 2 and node.users):
            continue
        if all(u.op == "call_function" and u.target is _LINEAR and len(u.args) > 1 and u.args[1] is node
               and node not in (u.args[0], *u.args[2:]) and "weight" not in u.kwargs for u in node.users):
            found.append(i)
    return found


def quantize_weight(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """`weight` as torchao quantizes an `nn.Linear` holding it."""
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig,
                                      Int8DynamicActivationInt8WeightConfig, PerRow, PerTensor, quantize_)

    if kind == "fp8":
        config = Float8DynamicActivationFloat8WeightConfig(
            granularity=PerRow() if weight.dtype == torch.bfloat16 else PerTensor(),
            activation_value_lb=FP8_AMAX_FLOOR)
    else:
        config = Int8DynamicActivationInt8WeightConfig()
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    quantize_(linear, config)
    return linear.weight


def quantized_linears(gm: fx.GraphModule, example_inputs, kind: str | None, compile_inner):
    """`compile_inner(example_inputs)` with the linear weights quantized, wrapped to pass the
    quantized weights on every call; unchanged when `kind` is None."""
    if kind is None:
        return compile_inner(example_inputs)
    candidates = linear_weight_inputs(gm, example_inputs)
    if candidates:
        check_quantize_supported(kind, example_inputs[candidates[0]].device)
    index = [i for i in candidates if all(d % 16 == 0 for d in example_inputs[i].shape)]
    if not index:
        record_quantized(kind, quantized=0, kept=len(candidates))
        return compile_inner(example_inputs)
    cache = QuantizedWeights(kind)
    record_quantized(kind, quantized=len(index), kept=len(candidates) - len(index),
                     gelu_fused=_fuse_gelu(gm, example_inputs, index, cache) if kind == "fp8" else 0)
    # handed to the inner compiler as static fake tensors of Dynamo's fake mode: fakeified there
    # instead, a tensor Dynamo never saw gets size symbols without a source (an error at guard time)
    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    inputs = list(example_inputs)
    for i in index:
        q = cache.get(example_inputs[i])
        inputs[i] = fake_mode.from_tensor(q, static_shapes=True) if fake_mode else q
    # torchao's tensors cannot be hashed into Inductor's cache keys (a traceback per graph otherwise)
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        compiled = compile_inner(inputs)

    def run(*args):
        args = list(args)
        for i in index:
            args[i] = cache.get(args[i])
        return compiled(*args)

    return run


def _fuse_gelu(gm: fx.GraphModule, example_inputs, index: list[int], cache: "QuantizedWeights") -> int:
    """The fp8 linears of `index` whose input is a GELU's, rewritten to quantize it in one pass
    (passes/fp8_linear.py); how many. Its Triton kernel loads only with this option."""
    from .passes.fp8_linear import fuse_gelu_into_fp8_linears

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fusable = {placeholders[i] for i in index if not fused_prologue_unsupported(cache.get(example_inputs[i]))}
    return fuse_gelu_into_fp8_linears(gm, fusable) if fusable else 0


def fused_prologue_unsupported(weight) -> str:
    """Why `quant_rows.fp8_linear` cannot stand in for torchao's linear with this quantized weight ("" if
    it can): it computes row-wise e4m3 activations with an exact amax floor, times a bf16 weight's
    row-wise e4m3, through torchao's torch path (`_scaled_mm`, unpadded)."""
    from torchao.quantization import Float8Tensor, PerRow
    from torchao.quantization.quantize_.common import KernelPreference
    from torchao.quantization.quantize_.workflows import QuantizeTensorToFloat8Kwargs

    from .kernels.quant_rows import amax_floor_exact

    if not isinstance(weight, Float8Tensor):
        return f"the weight is a {type(weight).__name__}, not torchao's Float8Tensor"
    act, mm = weight.act_quant_kwargs, weight.mm_config
    if not (weight.dtype == torch.bfloat16 and weight.qdata.dtype == torch.float8_e4m3fn
            and list(weight.block_size) == [1, weight.shape[-1]]):
        return "the weight is not bf16 with row-wise e4m3 scales"
    if not (isinstance(act, QuantizeTensorToFloat8Kwargs) and act.float8_dtype == torch.float8_e4m3fn
            and isinstance(act.granularity, PerRow) and act.granularity.dim in (-1, None)
            and act.hp_value_lb is not None and amax_floor_exact(act.hp_value_lb) and act.hp_value_ub is None):
        return ("the activations are not quantized row-wise to e4m3 with a power-of-two floor on their amax and no "
                "upper bound")
    if mm is None or mm.emulate or mm.pad_inner_dim:
        return "the matmul is emulated or padded"
    if weight.kernel_preference not in (KernelPreference.AUTO, KernelPreference.TORCH):
        return f"the weight asks for torchao's {weight.kernel_preference} kernels"
    return ""


class QuantizedWeights:
    """Quantized copies of the weights a compiled graph is called with, made once per weight. One
    graph can serve many weights (regional compilation calls one block graph with every block's),
    so copies are kept per source tensor, and made again when it changes in place (its version
    counter moves); a copy goes when its source tensor is freed."""

    def __init__(self, kind: str):
        self.kind = kind
        self._copies: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        key = id(weight)
        hit = self._copies.get(key)
        if hit is None or hit[0]() is not weight or hit[1] != weight._version:
            hit = (weakref.ref(weight, lambda ref, key=key: self._forget(key, ref)), weight._version,
                   quantize_weight(weight, self.kind))
            self._copies[key] = hit
        return hit[2]

    def _forget(self, key: int, ref: weakref.ref) -> None:
        if key in self._copies and self._copies[key][0] is ref:
            del self._copies[key]
