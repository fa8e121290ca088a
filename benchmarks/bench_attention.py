"""Attention-level benchmark of every kernel backend, one GPU process, baseline in the same run.

Shape: Wan2.1-1.3B 480p 81 frames = grid (21, 30, 52) = 32760 tokens, B1 H12 D128 bf16.
  * SDPA default (cuDNN on Hopper) dense, and each kernel's own dense path;
  * each kernel of the registry that runs here (FA4, our Triton kernel, FlexAttention) on the SAME
    block lists: window plans (~50/75/90/95% sparsity) and random maps at those sparsities — ms,
    speed-up over SDPA, effective TFLOP/s = 4·B·H·S²·D·density / t, and the output's distance to
    our Triton kernel's (a kernel that ignored the lists would sit at dense attention's distance);
  * the backend's own op (`torch.ops.compact.attention` over a site built from its spec, as a
    rewritten graph calls it) at the 90% window, per kernel;
  * burst: SDPA and that op (bf16, and FP8 with its quantizing reorder) timed as a 30-call burst with
    L2 flushed (the anchor's timing) and sustained for 300 ms, back to back;
  * fp8: at ~90% sparsity (window and random lists), the backend's FP8 op with its quantizing reorder
    (smoothing stats + compact.tile_quant + compact.attention_fp8, from q, k, v in model order) against
    the bf16 op of each kernel with its reorder (three gathers), and the FP8 kernel alone on tiles
    quantized beforehand; the output's distance to the bf16 Triton kernel's and to exact float64
    (the quantizing reorder's parts and settings: bench_quant_pass.py);
  * the backend's own site: a small module (RoPE-like q/k producers, SDPA, output transpose)
    compiled with backend="compact" at the 90% window, per kernel, plain and rectified, against the
    same module compiled by Inductor with dense SDPA; its attention kernel's GPU time from the
    profiler, so the rectification overhead is a share of the attention time.
Writes $OUT/attention.json.

    python benchmarks/bench_attention.py [--kernels fa4,triton,flex]
"""
import argparse
import functools
import sys

import torch
import torch.nn.functional as F
import triton

from compact_compile.kernels.ops import register_site
from compact_compile.kernels.registry import FP8_KERNELS, KERNEL_NAMES, kernel_class, kv_block_lists
from compact_compile.kernels.site import make_site
from compact_compile.kernels.triton_sparse import chosen_config
from compact_compile.layout import TokenLayout, auto_tile
from compact_compile.masks import density, window_blocks
from compact_compile.spec import SiteSpec, single_range
from timing import SITES, Results, available_kernels, bench, kernel_times, rel_diff

GRID, H, D, B = SITES["wan1.3b"]["grid"], SITES["wan1.3b"]["heads"], 128, 1
S = GRID[0] * GRID[1] * GRID[2]
dev, dt = "cuda", torch.bfloat16
flops = 4 * B * H * S * S * D
results = Results("attention.json")
emit = results.emit


def closest_window(layout, target):
    odd = range(1, 16, 2)
    cands = [(abs(density(window_blocks(layout, (t, h, h))) - target), (t, h, h)) for t in odd[:5] for h in odd]
    return min(cands)[1]


SECTIONS = ("dense", "lists", "fa4-forms", "op", "burst", "site", "fp8")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", default=",".join(KERNEL_NAMES))
    ap.add_argument("--sections", default=",".join(SECTIONS), help="a subset of " + ",".join(SECTIONS))
    args = ap.parse_args()
    sections = args.sections.split(",")
    torch.manual_seed(0)
    print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name(), flush=True)
    layout = TokenLayout(GRID, auto_tile(GRID, 128), 128)
    kernels = [k for k in available_kernels(dt, D, layout.block_size) if k in args.kernels.split(",")]
    q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=dt) for _ in range(3))
    sdpa = bench(lambda: F.scaled_dot_product_attention(q, k, v))
    emit(impl="sdpa-default", sparsity=0.0, ms=sdpa, tflops=flops / sdpa / 1e9)
    built = {name: kernel_class(name)(layout) for name in kernels}
    if "dense" in sections:
        dense_rows(built, q, k, v, sdpa)
    if "lists" in sections:
        list_rows(layout, built, q, k, v, sdpa)
    if "fa4-forms" in sections and "fa4" in built:
        fa4_list_forms(built["fa4"], layout.n_blocks, q, k, v, sdpa)
    if "op" in sections:
        op_rows(layout, kernels, q, k, v, sdpa)
    if "burst" in sections:
        burst_rows(layout, kernels, q, k, v)
    if "site" in sections:
        site_costs(layout, kernels)
    if "fp8" in sections:
        fp8_rows(layout, kernels, q, k, v, sdpa)
    results.save(shape=dict(B=B, H=H, S=S, D=D, grid=GRID, tile=layout.tile, dtype="bf16"))


def dense_rows(built, q, k, v, sdpa):
    dense_out = F.scaled_dot_product_attention(q, k, v)
    for name, kern in built.items():
        ms = bench(lambda kern=kern: kern.dense(q, k, v, None))
        emit(impl=f"{name}-dense", sparsity=0.0, ms=ms, speedup=sdpa / ms, tflops=flops / ms / 1e9,
             rel_diff_vs_sdpa=rel_diff(kern.dense(q, k, v, None), dense_out))


def random_blocks(nb: int, density: float) -> torch.Tensor:
    """A random block map of about `density`, its diagonal kept, the same whichever sections ran
    before (its own generator, seeded by the density)."""
    blocks = torch.rand(nb, nb, generator=torch.Generator().manual_seed(round(density * 1000))) < density
    blocks.fill_diagonal_(True)
    return blocks


def list_rows(layout, built, q, k, v, sdpa):
    """Every kernel on the same lists: windows and random maps at ~50/25/10/5% density."""
    dense_out = F.scaled_dot_product_attention(q, k, v)
    nb = layout.n_blocks
    for target in (0.5, 0.25, 0.10, 0.05):
        w = closest_window(layout, target)
        rnd = random_blocks(nb, target)
        for plan, blocks in ((f"window{w}", window_blocks(layout, w)), ("random", rnd)):
            lists = tuple(x.to(dev) for x in kv_block_lists(blocks[None]))
            dens = density(blocks)
            reference = None
            for name, kern in built.items():
                prepared = kern.prepare(lists)
                out = kern.attend(q, k, v, prepared, None)
                reference = out if reference is None else reference
                ms = bench(lambda kern=kern, prepared=prepared: kern.attend(q, k, v, prepared, None))
                emit(impl=f"{name}-{plan}", sparsity=round(1 - dens, 4), ms=ms, speedup=sdpa / ms,
                     tflops_effective=flops * dens / ms / 1e9, rel_diff_vs_first_kernel=rel_diff(out, reference),
                     rel_diff_dense_vs_first_kernel=rel_diff(dense_out, reference))


def fa4_list_forms(kern, nb, q, k, v, sdpa):
    """FA4 at ~10% density, one call form per row, to find what separates our op from the anchor
    (../shared/anchors/kernel_paths_anchor.py, fa4_cute: 0.984 ms at 10.3% on 2026-11-30):
      broadcast        one list broadcast over heads (stride 0: what a head-agnostic plan prepares);
      per-head         the same lists copied per head;
      per-head-narrow  copied per head, cut to the longest row;
      anchor-random    a different random map per head, cut to the longest row (the anchor's form);
      own-output       broadcast lists, FA4 allocates its (B, S, H, D) output (ours passes a view
                       of a (B, H, S, D) tensor);
      bshd-inputs      broadcast lists, q/k/v contiguous in (B, S, H, D) as FA4 stores them."""
    from compact_compile.kernels.fa4 import _fa4
    flash_fwd = _fa4()[0]
    g = torch.Generator().manual_seed(1)
    shared = torch.rand(nb, nb, generator=g) < 0.1
    shared.fill_diagonal_(True)
    per_head = torch.rand(H, nb, nb, generator=g) < 0.1
    per_head[:, range(nb), range(nb)] = True
    num, idx = (x.to(dev) for x in kv_block_lists(shared[None, None]))
    rnum, ridx = (x.to(dev) for x in kv_block_lists(per_head[None]))
    width, rwidth = int(num.max()), int(rnum.max())
    forms = {"broadcast": (shared, (num, idx)),
             "per-head": (shared, (num.expand(1, H, nb).contiguous(), idx.expand(1, H, nb, nb).contiguous())),
             "per-head-narrow": (shared, (num.expand(1, H, nb).contiguous(),
                                          idx[..., :width].expand(1, H, nb, width).contiguous())),
             "anchor-random": (per_head, (rnum, ridx[..., :rwidth].contiguous()))}
    bshd = [t.transpose(1, 2).contiguous() for t in (q, k, v)]
    calls = {form: (lambda prepared=kern.prepare(lists): kern.attend(q, k, v, prepared, None), blocks)
             for form, (blocks, lists) in forms.items()}
    prepared = kern.prepare((num, idx))
    calls["own-output"] = (lambda: flash_fwd(*(t.transpose(1, 2) for t in (q, k, v)), softmax_scale=None,
                                             block_sparse_tensors=prepared), shared)
    calls["bshd-inputs"] = (lambda: flash_fwd(*bshd, softmax_scale=None, block_sparse_tensors=prepared), shared)
    for form, (fn, blocks) in calls.items():
        ms = bench(fn)
        dens = blocks.float().mean().item()
        emit(impl=f"fa4-lists-{form}", sparsity=round(1 - dens, 4), ms=ms, speedup=sdpa / ms,
             tflops_effective=flops * dens / ms / 1e9)


def op_rows(layout, kernels, q, k, v, sdpa):
    window = closest_window(layout, 0.10)
    blocks = window_blocks(layout, window)
    for name in kernels:
        handle = register_site(make_site(SiteSpec("bench", layout, single_range(blocks[None]), kernel=name)))
        ms = bench(lambda handle=handle: torch.ops.compact.attention(q, k, v, handle, None, [], None))
        emit(impl=f"op-{name}-window{window}", sparsity=round(1 - density(blocks), 4), ms=ms, speedup=sdpa / ms,
             tflops_effective=flops * density(blocks) / ms / 1e9)


def exact_rows(q, k, v, blocks, block_size, rows: int = 4096):
    """Block-sparse attention of the first `rows` tiled query rows of head 0 in float64 (on the GPU)."""
    q, k, v = (x[:, :1].double() for x in (q, k, v))
    keep = blocks.to(dev)[torch.arange(rows, device=dev)[:, None] // block_size,
                          torch.arange(k.shape[-2], device=dev)[None, :] // block_size]
    scores = (q[:, :, :rows] @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v


@functools.cache
def compiled_smoothing_stats():
    """fp8.smoothing_stats compiled, as in a rewritten graph: eager, k.float() and v.float() are full
    fp32 copies (2026-11-30's run timed those, 0.81-0.83 ms for the "quantizing reorder")."""
    from compact_compile.kernels.fp8 import smoothing_stats

    return torch.compile(smoothing_stats, dynamic=False)


def fp8_op(layout, blocks, name, q, k, v):
    """(the backend's FP8 op on kernel `name` over `blocks` as a rewritten graph calls it, from q, k, v
    in the model's order: smoothing statistics, compact.tile_quant, compact.attention_fp8; its
    quantizing reorder alone, returning (the tiles, k's mean))."""
    fields = (list(GRID), list(layout.tile), layout.block_size, layout.n_text, layout.n_before)
    spec = SiteSpec("bench", layout, single_range(blocks[None]), kernel=name, fp8=True)
    handle = register_site(make_site(spec), spec)
    stats = compiled_smoothing_stats()

    def quantize():
        k_mean, v_amax = stats(k, v)
        return torch.ops.compact.tile_quant(q, k, v, k_mean, v_amax, *fields, None, False, handle), k_mean

    def op():
        tiles, k_mean = quantize()
        return torch.ops.compact.attention_fp8(*tiles[:3], [*tiles[3:], k_mean], [q, k, v], handle, None, [], None,
                                               dt)
    return op, quantize


def fp8_rows(layout, kernels, q, k, v, sdpa):
    """FP8 against bf16 on the same lists at ~90% sparsity, reorder (and quantization) included: q, k, v
    are taken in the model's order, as a rewritten graph has them."""
    from compact_compile.kernels.fp8 import FP8Tiles

    fields = (list(GRID), list(layout.tile), layout.block_size, layout.n_text, layout.n_before)
    src = torch.ops.compact.tile_index(q, *fields, False)
    window = closest_window(layout, 0.10)
    rnd = random_blocks(layout.n_blocks, 0.10)

    for plan, blocks in ((f"window{window}", window_blocks(layout, window)), ("random", rnd)):
        sparsity, dens = round(1 - density(blocks), 4), density(blocks)
        exact = exact_rows(*(x.index_select(-2, src) for x in (q, k, v)), blocks, layout.block_size)
        outs = {}
        for name in [n for n in kernels if n != "flex"]:
            handle = register_site(make_site(SiteSpec("bench", layout, single_range(blocks[None]), kernel=name)))

            def bf16_op(h=handle):
                return torch.ops.compact.attention(*(x.index_select(-2, src) for x in (q, k, v)), h, None, [], None)
            outs[name] = bf16_op()
            ms = bench(bf16_op)
            emit(impl=f"fp8-section-{name}-bf16-op-{plan}", sparsity=sparsity, ms=ms, speedup=sdpa / ms,
                 tflops_effective=flops * dens / ms / 1e9,
                 rel_err_vs_float64_head0=rel_diff(outs[name][:, :1, :exact.shape[-2]].double(), exact))
        for name in [n for n in FP8_KERNELS if n in kernels]:
            op, quantize = fp8_op(layout, blocks, name, q, k, v)
            out = op()
            ms = bench(op)
            quantized, k_mean = quantize()
            tiles = FP8Tiles(*quantized, k_mean)
            site_kernel = kernel_class(name)(layout)
            prepared = site_kernel.prepare(kv_block_lists(blocks[None].to(dev)))
            ms_kernel = bench(lambda: site_kernel.attend_fp8(tiles, prepared, None, dt))
            if name == "fa4":   # K/V stages in flight: 2 against the default 3 (kernel_only_ms below)
                from compact_compile.kernels.fa4 import _run_fp8, in_mma_key_order
                ms_2 = bench(lambda: _run_fp8(tiles, prepared, None, dt, num_stages=2))
                emit(impl=f"fp8-section-fa4-fp8-kernel-2-stages-{plan}", ms=ms_2,
                     tflops_effective=flops * dens / ms_2 / 1e9)
                # P as the P·V MMA's register operand, vᵀ's keys reordered for it beforehand (untimed)
                reordered = in_mma_key_order(tiles)
                ms_rs = bench(lambda: _run_fp8(reordered, prepared, None, dt, p_in_registers=True))
                emit(impl=f"fp8-section-fa4-fp8-kernel-p-in-registers-{plan}", ms=ms_rs,
                     tflops_effective=flops * dens / ms_rs / 1e9,
                     rel_diff_vs_p_in_shared=rel_diff(_run_fp8(reordered, prepared, None, dt, p_in_registers=True),
                                                      _run_fp8(tiles, prepared, None, dt)))
            emit(impl=f"fp8-section-{name}-fp8-op-{plan}", sparsity=sparsity, ms=ms, speedup=sdpa / ms,
                 tflops_effective=flops * dens / ms / 1e9, quantizing_reorder_ms=bench(quantize),
                 kernel_only_ms=ms_kernel, kernel_tflops_effective=flops * dens / ms_kernel / 1e9,
                 kernel_config=str(chosen_config()) if name == "triton" else None,
                 rel_diff_vs_bf16_op=rel_diff(out, outs[name]) if name in outs else None,
                 rel_err_vs_float64_head0=rel_diff(out[:, :1, :exact.shape[-2]].double(), exact))


def burst(fn, iters: int = 30, warmup: int = 5) -> float:
    """Median ms of `iters` calls after `warmup`, L2 flushed before each: the anchor's timing
    (../shared/anchors/kernel_paths_anchor.py), about 30 ms of load where `bench` keeps the GPU busy
    for 300 ms. Boost clocks hold over the short burst and sag over the long one."""
    for _ in range(warmup):
        fn()
    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=dev)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in events)[iters // 2]


def burst_rows(layout, kernels, q, k, v):
    """SDPA and the op at ~90% timed both ways, back to back: does the speed-up depend on the timing?
    The bf16 op takes q, k, v as given (no reorder), the FP8 op them in the model's order with its
    quantizing reorder."""
    window = closest_window(layout, 0.10)
    blocks = window_blocks(layout, window)
    calls = {"sdpa-default": lambda: F.scaled_dot_product_attention(q, k, v)}
    for name in kernels:
        handle = register_site(make_site(SiteSpec("bench", layout, single_range(blocks[None]), kernel=name)))
        calls[f"op-{name}-window{window}"] = lambda h=handle: torch.ops.compact.attention(q, k, v, h, None, [], None)
    for name in [n for n in FP8_KERNELS if n in kernels]:
        calls[f"fp8-op-{name}-window{window}"] = fp8_op(layout, blocks, name, q, k, v)[0]
    times = {name: (burst(fn), bench(fn)) for name, fn in calls.items()}
    sdpa_burst, sdpa_sustained = times["sdpa-default"]
    for name, (short, sustained) in times.items():
        emit(impl=f"timing-{name}", burst_30_calls_ms=short, sustained_300ms_ms=sustained,
             speedup_burst=sdpa_burst / short, speedup_sustained=sdpa_sustained / sustained,
             speedup_burst_vs_sustained_sdpa=sdpa_sustained / short)


class Site(torch.nn.Module):
    """What an attention site looks like to the compiler: q/k/v made by elementwise ops (RoPE-like),
    attention, output back to [B, S, H·D] for the output projection."""

    def __init__(self, attend):
        super().__init__()
        self.attend = attend

    @staticmethod
    def qkv(x, cos, sin):  # x [B, S, 3, H, D]
        q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))
        return q * cos + q.flip(-1) * sin, k * cos + k.flip(-1) * sin, v

    def forward(self, x, cos, sin):
        return self.attend(*self.qkv(x, cos, sin)).transpose(1, 2).flatten(2)


ATTENTION_KERNELS = ("attn", "flash", "flex", "fmha", "cudnn", "sdpa", "kernel_cutlass")


def attention_us(times):
    return sum(us for name, us in times.items() if any(a in name.lower() for a in ATTENTION_KERNELS))


def site_costs(layout, kernels):
    """The compiled site at the 90% window per kernel, plain and rectified: whole-module time and the
    attention kernel's GPU time; rectification overhead = (rectified − plain) / plain attention."""
    window = closest_window(layout, 0.10)
    x = torch.randn(B, S, 3, H, D, device=dev, dtype=dt)
    cos, sin = torch.randn(S, D, device=dev, dtype=dt), torch.randn(S, D, device=dev, dtype=dt)
    dense = torch.compile(Site(F.scaled_dot_product_attention), dynamic=False)
    with torch.no_grad():
        t_dense = bench(lambda: dense(x, cos, sin))
        ref = dense(x, cos, sin)
        emit(impl="site-inductor-dense", ms=t_dense)
        for name in kernels:
            plain_us = None
            for rectify in (False, True):
                torch._dynamo.reset()
                m = torch.compile(Site(F.scaled_dot_product_attention), backend="compact", dynamic=False,
                                  options=dict(plan="window", window=window, grid=GRID, kernel=name, rectify=rectify))
                out = m(x, cos, sin)
                ms = bench(lambda m=m: m(x, cos, sin))
                times = kernel_times(lambda m=m: m(x, cos, sin))
                total_us = sum(times.values())
                attn = attention_us(times)
                row = dict(impl=f"site-{name}" + ("-rectified" if rectify else ""), window=window,
                           density=density(window_blocks(layout, window)), ms=ms, speedup_vs_dense_site=t_dense / ms,
                           gpu_us=total_us, attention_kernel_us=attn, rel_diff_vs_dense=rel_diff(out, ref),
                           top_kernels={n[:80]: round(us, 1) for n, us in list(times.items())[:8]})
                if rectify and plain_us:
                    row["rectify_overhead_of_attention"] = (total_us - plain_us[0]) / plain_us[1]
                else:
                    plain_us = (total_us, attn)
                emit(**row)


if __name__ == "__main__":
    sys.exit(main())
