# Prototype measurement (kept in history only): FP8 kernel time with split keys, (q̃|q̃)·(k̃|r̃), against plain FP8 and bf16 on the same lists (wan1.3b site, ~90% window), FA4 and Triton. Writes $OUT/split-keys.json.
import json, os, torch, torch.nn.functional as F
from compact_compile.kernels.fp8 import quantize_tiles, smoothing_stats
from compact_compile.kernels.registry import kernel_class, kv_block_lists
from compact_compile.layout import TokenLayout, auto_tile
from compact_compile.masks import window_blocks, density
from timing import SITES, bench, rel_diff
from bench_attention import closest_window, exact_rows
GRID, H, D, B = SITES["wan1.3b"]["grid"], SITES["wan1.3b"]["heads"], 128, 1
S = GRID[0] * GRID[1] * GRID[2]
torch.manual_seed(0)
layout = TokenLayout(GRID, auto_tile(GRID, 128), 128)
q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
q = q + 0.5 * torch.randn(1, H, 1, D, device="cuda", dtype=torch.bfloat16)   # a common offset, as real q have
src = torch.ops.compact.tile_index(q, list(GRID), list(layout.tile), 128, 0, 0, False)
qt, kt, vt = (x.index_select(-2, src).contiguous() for x in (q, k, v))
blocks = window_blocks(layout, closest_window(layout, 0.10))
exact = exact_rows(qt, kt, vt, blocks, 128)
sdpa = bench(lambda: F.scaled_dot_product_attention(q, k, v))
rows = dict(sdpa_ms=sdpa, density=density(blocks))
km, va = smoothing_stats(kt, vt)
for name in ("fa4", "triton"):
    kern = kernel_class(name)(layout)
    prepared = kern.prepare(kv_block_lists(blocks[None].cuda()))
    rows[f"{name}-bf16"] = dict(ms=bench(lambda: kern.attend(qt, kt, vt, prepared, None)))
    for split in (False, True):
        tiles = quantize_tiles(qt, kt, vt, km, va, 128, split_keys=split)
        out = kern.attend_fp8(tiles, prepared, None, torch.bfloat16)
        rows[f"{name}-fp8-split{split}"] = dict(ms=bench(lambda: kern.attend_fp8(tiles, prepared, None, torch.bfloat16)),
                                                err_vs_float64_head0=rel_diff(out[:, :1, :exact.shape[-2]].double(), exact))
    print(name, {k: v for k, v in rows.items() if k.startswith(name)}, flush=True)
print(json.dumps(rows))
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "split-keys.json"), "w"), indent=1)
