"""The kernels as the GPU compiles them, built ahead of time for sm90 on this machine (Triton's own
ptxas; nothing runs): the interpreter that runs the CPU tests checks no GPU resource, so a launch
configuration that needs more shared memory than a Hopper SM has passes every CPU test and fails at
the GPU's first launch (the block-mass kernels did, for fp32 inputs at head dim 128). The builds run
in a child process without TRITON_INTERPRET, which the test session sets before Triton is imported."""
import json
import os
import subprocess
import sys

import pytest
import torch

SM90_SHARED_BYTES = 232_448          # per block, opted in (H100/H200: 227 KiB)
CASES = [(which, dtype) for which in ("row_lse", "block_mass") for dtype in ("fp32", "bf16")]
# the row quantization at the widths it serves (Wan2.1-14B's FFN, its model width, the widest taken)
QUANT_ROWS_CASES = [(prologue, width) for prologue in ("none", "gelu_tanh", "gelu") for width in (5120, 13824, 16384)]


def shared_bytes(which: str, dtype: str) -> int:
    """Shared memory of `which` block-mass kernel at head dim 128, with the launch configuration the
    GPU gets for `dtype` inputs, as built for sm90 (call where TRITON_INTERPRET is unset)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from compact_compile.calibrate import triton_mass
    from compact_compile.kernels.estimate_triton import dot_precision

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    plan_block = 128 if which == "block_mass" else None
    c = triton_mass._launch_config(None, torch_dtype, plan_block)
    kernel = triton_mass._row_lse_kernel if which == "row_lse" else triton_mass._block_mass_kernel
    constants = dict(HEAD_DIM=128, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], UPCAST=False, HAS_KEYMASK=True,
                     PRECISION=dot_precision(torch_dtype, torch.device("cuda")),
                     **(dict(PLAN_BLOCK=plan_block) if plan_block else {}))
    pointers = {"Q": dtype, "K": dtype, "LSE": "fp32", "OUT": "fp32", "KV_VALID": "i8"}
    signature = {a: ("constexpr" if a in constants else f"*{pointers[a]}" if a in pointers
                     else "fp32" if a == "qk_scale" else "i32") for a in kernel.arg_names}
    # as a launch on 16-byte aligned tensors specialises: pointers and q, k strides divisible by 16
    # (the hints widen the loads, and the wider loads take more shared memory)
    aligned = [i for i, a in enumerate(kernel.arg_names) if a in pointers or a.startswith(("stride_q", "stride_k"))]
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constants,
                                       attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    built = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=c["num_warps"], num_stages=c["num_stages"]))
    return built.metadata.shared


def quant_rows_shared_bytes(prologue: str, width: int) -> int:
    """Shared memory of quant_rows' kernel as the GPU builds it for a bf16 row of `width` (its reduction's
    scratch), built for sm90 (call where TRITON_INTERPRET is unset)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from compact_compile.kernels.quant_rows import PROLOGUES
    from compact_compile.kernels.quant_rows_triton import _quant_rows, warps_for

    block = triton.next_power_of_2(width)
    constants = dict(BLOCK=block, PROLOGUE=PROLOGUES[prologue], INTERPRETED=False)
    kinds = dict(H="*bf16", X8="*fp8e4nv", SCALE="*fp32", N="i32", stride_h="i32", AMAX_MIN="fp32")
    kernel = _quant_rows
    signature = {a: "constexpr" if a in constants else kinds[a] for a in kernel.arg_names}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constants)
    built = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=warps_for(block)))
    return built.metadata.shared


@pytest.fixture(scope="module")
def built():
    import compact_compile

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(compact_compile.__file__))     # the package as this session has it
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return {tuple(k.split()): v for k, v in json.loads(run.stdout.splitlines()[-1]).items()}


@pytest.mark.parametrize("which, dtype", CASES)
def test_block_mass_launches_fit_a_hopper_sm(built, which, dtype):
    assert 0 < built[which, dtype] <= SM90_SHARED_BYTES, f"{which} {dtype}: {built[which, dtype]} bytes"


@pytest.mark.parametrize("prologue, width", QUANT_ROWS_CASES)
def test_quant_rows_builds_for_a_hopper_sm(built, prologue, width):
    """It compiles for sm90 (NaN propagation and all) and its reduction fits the SM."""
    assert 0 <= built[prologue, str(width)] <= SM90_SHARED_BYTES


if __name__ == "__main__":
    print(json.dumps({**{f"{w} {d}": shared_bytes(w, d) for w, d in CASES},
                      **{f"{p} {w}": quant_rows_shared_bytes(p, w) for p, w in QUANT_ROWS_CASES}}))
