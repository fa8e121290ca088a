"""GPU time per kernel, from the CUDA profiler: what a launch costs on the device, without the
host's launch overhead that CUDA-event timing of a short call also measures."""
import torch
from torch.profiler import ProfilerActivity, profile


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
