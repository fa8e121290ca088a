"""Does the rectification epilogue (R·O + Ō) cost anything by itself? Our Triton kernel at the Wan
1.3B 480p shape, window plans at ~72% and ~91% sparsity, plain and with the epilogue, under the
same explicit launch configurations (no autotuning) and under the autotuner. GPU time per kernel
from the profiler. Writes $OUT/epilogue.json."""
import json
import os

import torch
import triton

from compact_compile.kernels import triton_sparse as ts
from compact_compile.kernels.registry import kv_block_lists
from compact_compile.layout import TokenLayout, auto_tile
from compact_compile.masks import window_blocks
from timing import SITES, kernel_times, matching

GRID, H, D = SITES["wan1.3b"]["grid"], SITES["wan1.3b"]["heads"], 128


def main():
    layout = TokenLayout(GRID, auto_tile(GRID, 128), 128)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, H, layout.seq_len, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    nq = layout.n_blocks
    r = torch.rand(1, H, nq, device="cuda", generator=g)
    o_bar = torch.randn(1, H, nq, D, device="cuda", generator=g)
    rows = []
    for window in ((5, 5, 5), (3, 3, 3)):
        num, idx = kv_block_lists(window_blocks(layout, window)[None].cuda())
        for config in (dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, tma=True),
                       dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2, tma=False), None):
            us = {}
            for rect in (None, (r, o_bar)):
                times = kernel_times(lambda: ts.block_sparse_attention(q, k, v, num, idx, 128, rectify=rect,
                                                                       config=config))
                us["rectified" if rect else "plain"] = matching(times, "_attn_fwd")
                us[("rectified" if rect else "plain") + "_config"] = ts.chosen_config()
            rows.append(dict(window=window, config=config or "autotuned", **us))
            print(json.dumps(rows[-1]), flush=True)
    json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, rows=rows),
              open(os.path.join(os.environ.get("OUT", "."), "epilogue.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
