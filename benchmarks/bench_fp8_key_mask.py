"""FP8 attention under a key-padding mask, at HunyuanVideo 13B's 720p 33-frame site: 24 heads, head dim
128, 32,400 video tokens and 256 text tokens after them, of which a 100-token prompt keeps the first 100
(the rest is padding), a window plan (3, 3, 3) with every block holding text kept both ways, as
the planner keeps them (89.9% sparse). Kernel times over tiles made once (the reorder is
bench_quant_pass's): FA4's FP8 path with the mask (its lists split per call, as a site does; split once,
the kernel alone; and with P in registers, `p_in_registers`) and without it on the same lists, Triton's
FP8 kernel and FA4's bf16 kernel with it, against SDPA with the same mask (dense bf16, as diffusers runs it).
Writes $OUT/fp8-key-mask.json.

    OUT=out python benchmarks/bench_fp8_key_mask.py
"""
import torch
import torch.nn.functional as F

from compact_compile.kernels.fa4 import FA4Kernel, _run_fp8, in_mma_key_order
from compact_compile.kernels.fp8 import quantize_tiles, smoothing_stats
from compact_compile.kernels.ops import tile_index
from compact_compile.kernels.registry import kv_block_lists
from compact_compile.kernels.triton_sparse import TritonKernel
from compact_compile.layout import TokenLayout, auto_tile
from compact_compile.masks import density, window_blocks
from timing import Results, bench, rel_diff

GRID, H, D, TEXT, PROMPT = (9, 45, 80), 24, 128, 256, 100
WINDOW = (3, 3, 3)
dt = torch.bfloat16
results = Results("fp8-key-mask.json")


def main():
    torch.manual_seed(0)
    layout = TokenLayout(GRID, auto_tile(GRID, 128), 128, n_text=TEXT)
    S = layout.seq_len
    q, k, v = (torch.randn(1, H, S, D, device="cuda", dtype=dt) for _ in range(3))
    valid = torch.ones(1, S, dtype=torch.bool, device="cuda")
    valid[:, S - TEXT + PROMPT:] = False                                # model order: video, then text
    sdpa = bench(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :]))
    results.emit(impl="sdpa-key-mask", ms=sdpa)

    src = tile_index(q, list(GRID), list(layout.tile), 128, TEXT, 0, False)
    qt, kt, vt = (x.index_select(-2, src) for x in (q, k, v))
    valid_t = valid[:, src]
    blocks = window_blocks(layout, WINDOW)
    first_text_block = layout.n_video // layout.block_size
    blocks[:, first_text_block:] = blocks[first_text_block:, :] = True
    tiles = quantize_tiles(qt, kt, vt, *smoothing_stats(kt, vt, valid_t), 128)
    fa4, triton_kernel = FA4Kernel(layout), TritonKernel(layout)
    lists = kv_block_lists(blocks[None].cuda())
    fa4_lists, triton_lists = fa4.prepare(lists), triton_kernel.prepare(lists)
    masked_lists, table = fa4._key_masked(fa4_lists, valid_t, 1, S, "cuda")
    reordered = in_mma_key_order(tiles)
    runs = {
        "fa4-fp8-key-mask": lambda: fa4.attend_fp8(tiles, fa4_lists, None, dt, valid_t),
        "fa4-fp8-key-mask-lists-split-once": lambda: _run_fp8(tiles, masked_lists, None, dt, key_table=table),
        "fa4-fp8-key-mask-p-in-registers": lambda: _run_fp8(reordered, masked_lists, None, dt, key_table=table,
                                                            p_in_registers=True),
        "fa4-fp8-no-mask": lambda: fa4.attend_fp8(tiles, fa4_lists, None, dt),
        "triton-fp8-key-mask": lambda: triton_kernel.attend_fp8(tiles, triton_lists, None, dt, valid_t),
        "fa4-bf16-key-mask": lambda: fa4.attend(qt, kt, vt, fa4_lists, None, valid_t),
    }
    outs = {name: run() for name, run in runs.items()}
    for name, run in runs.items():
        ms = bench(run)
        results.emit(impl=name, ms=ms, speedup_vs_sdpa=sdpa / ms,
                     rel_diff_vs_fa4_bf16=rel_diff(outs[name], outs["fa4-bf16-key-mask"]),
                     rel_diff_vs_triton_fp8=rel_diff(outs[name], outs["triton-fp8-key-mask"]),
                     rel_diff_vs_fa4_fp8=rel_diff(outs[name], outs["fa4-fp8-key-mask"]))
    results.save(grid=GRID, heads=H, head_dim=D, seq_len=S, text=TEXT, prompt=PROMPT, window=WINDOW,
                 tile=layout.tile, density=density(blocks), kernel_times="tiles made once; no reorder")


if __name__ == "__main__":
    main()
