"""What the GPU benchmarks share: timing, a record of the rows they measure, and the kernels.

`bench` times a call with CUDA events (median after warm-up, triton.testing.do_bench), host launch
overhead included; `kernel_times` gives GPU time per kernel from the CUDA profiler, without it.
`available_kernels` names the registry's kernels that run here (FA4 only where it is installed), and
`SparseAttention` calls one of them over a fixed block map the way a site's static range does. SITES
are the self-attention sites the kernel benchmarks measure.
"""
import json
import os
import re

import torch
import triton
from torch.profiler import ProfilerActivity, profile

from compact_compile.kernels.registry import KERNEL_NAMES, kernel_class, kv_block_lists

# latent grid in patches (frames, height, width) and heads, head dim 128: Wan2.1-1.3B 480p 81 frames
# (32,760 tokens) and Wan2.1-14B 720p 81 frames (75,600 tokens)
SITES = {"wan1.3b": dict(grid=(21, 30, 52), heads=12), "wan14b": dict(grid=(21, 45, 80), heads=40)}


ATTENTION = re.compile(r"attn|attention|flash|fmha|sdpa|flex|blocksparse", re.I)
GEMM = re.compile(r"gemm|cutlass|nvjet|xmma|scaled_mm|addmm|bmm|_mm|matmul|f8f8|sm90_", re.I)
INDUCTOR = re.compile(r"triton_(poi|red|per)_")


def kernel_group(name: str) -> str:
    """"attention", "gemm" or "other" for a profiled CUDA kernel's name. Inductor's fused kernels are
    "other" whatever they fuse: their names list it ("attention", or "scaled_mm" for an FP8 linear's
    activation quantization)."""
    if INDUCTOR.match(name):
        return "other"
    return "attention" if ATTENTION.search(name) else "gemm" if GEMM.search(name) else "other"


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖, in fp32."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench(fn) -> float:
    """Median ms per call of fn, CUDA events, after warm-up."""
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def kernel_times(fn, calls: int = 20) -> dict[str, float]:
    """{kernel name: µs of GPU time per call of fn}, over `calls` calls after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    times = {}
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if us > 0:
            times[e.key] = times.get(e.key, 0.0) + us / calls
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def matching(times: dict[str, float], *needles: str) -> float:
    """µs per call of the kernels whose names contain any of `needles`."""
    return sum(us for name, us in times.items() if any(n in name for n in needles))


class Results:
    """Rows printed as they are measured, then saved with the device and versions to $OUT/`name`."""

    def __init__(self, name: str):
        self.name, self.rows = name, []

    def emit(self, **row) -> None:
        self.rows.append(row)
        print(json.dumps(row), flush=True)

    def save(self, **meta) -> None:
        with open(os.path.join(os.environ.get("OUT", "."), self.name), "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           **meta, rows=self.rows), f, indent=1)


def available_kernels(dtype: torch.dtype, head_dim: int, block_size: int, device: str = "cuda") -> list[str]:
    """The registry's kernels (KERNEL_NAMES order) that run these inputs on `device`; prints why not for the others."""
    names = []
    for name in KERNEL_NAMES:
        why = kernel_class(name).unsupported(torch.device(device), dtype, head_dim, block_size, False)
        print(f"kernel {name}: {why or 'available'}", flush=True)
        if not why:
            names.append(name)
    return names


class SparseAttention:
    """Kernel `name` of the registry over the bool block map `blocks` `[H or 1, nq, nk]` of `layout`,
    its block lists prepared once on `blocks`' device: `(q, k, v, rectify=None) -> O`."""

    def __init__(self, name: str, layout, blocks: torch.Tensor):
        self.kernel = kernel_class(name)(layout)
        self.prepared = self.kernel.prepare(kv_block_lists(blocks))

    def __call__(self, q, k, v, rectify=None):
        return self.kernel.attend(q, k, v, self.prepared, None, rectify=rectify)
