"""Builds FA4's FP8 kernel (kernels/fa4_fp8_sm90.py) for sm_90a on a machine without a GPU, from fake
CuTe tensors, through the same `compile_fp8_kernel` the GPU path calls, and reports what ptxas made of
it: registers, spills, shared memory, and the count of the instructions that bound an FP8 attention
tile (the QGMMAs, the exponentials, the conversions and stores of P, fences, barriers). Whether it
builds, and what a change does to that mix, is then known before a GPU run; speed is not.

    python3 -m pip install --target /tmp/fa4cpu --no-deps flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 \\
        nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 \\
        quack-kernels==0.6.5 apache-tvm-ffi==0.1.15.post2 "cuda-bindings>=13,<14" cuda-pathfinder einops
    OUT=out python benchmarks/sass_fa4_fp8.py --site /tmp/fa4cpu [--masked] [--stages 2] [--p-in-registers]

(--site: where those packages are; the CUTLASS DSL is found through a .pth file there.) The SASS tools
are Triton's bundled cuobjdump and nvdisasm. Writes $OUT/fa4-fp8-sass.json and the SASS beside it.
"""
import argparse
import glob
import json
import os
import re
import site
import subprocess
import sys
import tempfile

COUNTED = ("QGMMA", "MUFU.EX2", "F2FP", "STS", "STSM", "LDS", "LDSM", "FENCE.VIEW.ASYNC.S", "MEMBAR",
           "BAR.SYNC", "BAR.ARV", "SHFL", "FFMA", "FMUL", "FADD", "FMNMX", "FSEL")


def compile_fake(masked: bool = False, stages: int = 3, p_in_registers: bool = False):
    """`compile_fp8_kernel` over fake CuTe tensors (B 1, H 2, 1,024 tokens): what cute.compile returns.
    tests/kernels/test_fa4_key_order.py reads the kernel's fragment layouts through it."""
    import cutlass
    from flash_attn.cute.block_sparsity import BlockSparseTensors
    from quack.compile_utils import make_fake_tensor

    from compact_compile.kernels.fa4 import BLOCK, FP8_HEAD_DIM, compile_fp8_kernel

    B, H, S, D = 1, 2, 8 * BLOCK, FP8_HEAD_DIM
    nb = S // BLOCK

    def fake(dtype, shape, leading_dim, divisibility=16):
        return make_fake_tensor(dtype, shape, divisibility=divisibility, leading_dim=leading_dim)

    e4m3, i32, f32 = cutlass.Float8E4M3FN, cutlass.Int32, cutlass.Float32
    lists = BlockSparseTensors(fake(i32, (B, H, nb), 2, 1), fake(i32, (B, H, nb, nb), 3, 1),
                               fake(i32, (B, H, nb), 2, 1), fake(i32, (B, H, nb, nb), 3, 1))
    scales = [fake(f32, (B, H, nb), 2, 1), fake(f32, (B, H, nb), 2, 1), fake(f32, (B, H, D), 2, 1)]
    aux = ([fake(i32, (B, S), 1, 1)] if masked else []) + scales
    return compile_fp8_kernel(cutlass.BFloat16, stages, masked, fake(e4m3, (B, S, H, D), 3),
                              fake(e4m3, (B, S, H, D), 3), fake(e4m3, (B, S, H, D), 1),
                              fake(cutlass.BFloat16, (B, S, H, D), 3, 8), lists, aux, p_in_registers)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--site", required=True, help="the folder FA4 and the CUTLASS DSL are installed in")
    ap.add_argument("--masked", action="store_true", help="the kernel with a key-padding mask's mask_mod")
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--p-in-registers", action="store_true", help="P as the P·V MMA's register operand")
    args = ap.parse_args()
    site.addsitedir(args.site)
    os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")
    dump = tempfile.mkdtemp()
    os.environ["CUTE_DSL_KEEP"], os.environ["CUTE_DSL_DUMP_DIR"] = "cubin", dump
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import triton

    compile_fake(args.masked, args.stages, args.p_in_registers)
    [cubin] = glob.glob(os.path.join(dump, "*.cubin"))
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    usage = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", cubin],
                           capture_output=True, text=True, check=True).stdout
    sass = subprocess.run([os.path.join(tools, "nvdisasm"), "-c", cubin], capture_output=True, text=True,
                          check=True).stdout
    opcodes = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass, re.M)
    counts = {name: sum(op == name or op.startswith(name + ".") for op in opcodes) for name in COUNTED}
    resources = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    row = dict(masked=args.masked, stages=args.stages, p_in_registers=args.p_in_registers,
               resources={k: int(v) for k, v in resources.items()}, instructions=len(opcodes), counts=counts)
    print(json.dumps(row))
    out = os.environ.get("OUT", ".")
    name = (f"fa4-fp8-sass{'-masked' if args.masked else ''}{'-p-in-registers' if args.p_in_registers else ''}"
            f"-{args.stages}stages")
    with open(os.path.join(out, name + ".sass"), "w") as f:
        f.write(sass)
    with open(os.path.join(out, name + ".json"), "w") as f:
        json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
