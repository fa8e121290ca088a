"""FP8 attention's quantizing reorder (issue 18) against the memory traffic it cannot avoid, at the
self-attention sites of Wan2.1-1.3B 480p (H12, 32,760 tokens) and Wan2.1-14B 720p (H40, 75,600 tokens),
q, k, v bf16 in the model's [B, S, H, D] storage as a rewritten graph hands them over:

  * copy:   torch's copy of q, k, v (read and written once each, bf16): what HBM gives a plain pass;
  * stats:  the smoothing statistics (k's mean, v's channel amax: fp8.smoothing_stats) compiled as in
            a rewritten graph (k and v read once);
  * pass:   compact.tile_quant's pass (pool_triton.tile_quant_qkv_triton: q, k, v read, their e4m3
            tiles written), without and with rectification's pooling, over CONFIGS, the default
            marked (--default-only: the default alone), and the default pooling pass under a random
            key-padding mask keeping 90% of the keys (the path of HunyuanVideo's prompt padding).
GB/s counts the bytes each must move. Writes $OUT/quant-pass.json.

    OUT=out python benchmarks/bench_quant_pass.py
"""
import sys

import torch

import compact_compile.kernels.ops  # noqa: F401  (registers torch.ops.compact)
from compact_compile.kernels.fp8 import smoothing_stats
from compact_compile.kernels.pool_triton import QUANT_CONFIG, tile_quant_qkv_triton
from compact_compile.layout import TokenLayout, auto_tile
from timing import SITES, Results, bench

D, BLOCK = 128, 128
# warps, and with rectification's pooling in the same pass (which needs more registers: ptxas, sm_90a,
# 4 warps, 238 and no spills, against 168 without pooling) more warps or a register cap (Triton's maxnreg).
# A second read of the block for the pooling, in column slices (179 registers), was measured too and
# was slower (results/quant-pass-pooling-sweep-h200-2026-12-01.json): it is not kept. With q and k
# rotated (fp8.rotation), 8 or 2 warps were slower than 4 (results/quant-pass-rotated-h200-2026-12-01.json).
CONFIGS = {False: [dict(num_warps=4), dict(num_warps=8)],
           True: [dict(num_warps=4), dict(num_warps=8), dict(num_warps=16), dict(num_warps=8, maxnreg=128)]}
results = Results("quant-pass.json")
emit = results.emit


def main(sweep: bool):
    stats = torch.compile(smoothing_stats, dynamic=False)
    for site, shape in SITES.items():
        layout = TokenLayout(shape["grid"], auto_tile(shape["grid"], BLOCK), BLOCK)
        S, H = layout.seq_len, shape["heads"]
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
                   for _ in range(3))
        k = k + 3 * torch.randn(1, H, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)  # a common offset
        fields = (list(layout.grid), list(layout.tile), BLOCK, layout.n_text, layout.n_before)
        src = torch.ops.compact.tile_index(q, *fields, False)
        elements = q.numel()

        ms = bench(lambda: [x.clone() for x in (q, k, v)])
        emit(site=site, impl="copy-qkv-bf16", ms=ms, gb_per_s=3 * elements * 4 / ms / 1e6)
        ms = bench(lambda: stats(k, v))
        emit(site=site, impl="smoothing-stats-compiled", ms=ms, gb_per_s=2 * elements * 2 / ms / 1e6)
        k_mean, v_amax = stats(k, v)
        moved = 3 * elements * (2 + 1)
        for pool in (False, True):
            for config in CONFIGS[pool] if sweep else [QUANT_CONFIG]:
                ms = bench(lambda c=config: tile_quant_qkv_triton(q, k, v, src, k_mean, v_amax, S, BLOCK, pool,
                                                                  config=c))
                emit(site=site, impl="quantizing-pass-pooling" if pool else "quantizing-pass", **config, ms=ms,
                     gb_per_s=moved / ms / 1e6, default=config == QUANT_CONFIG)
        # the pooling under a key-padding mask (HunyuanVideo's and Mochi's prompt padding), its default
        key_valid = torch.rand(1, S, device="cuda", generator=g) < 0.9
        ms = bench(lambda: tile_quant_qkv_triton(q, k, v, src, k_mean, v_amax, S, BLOCK, True, key_valid=key_valid))
        emit(site=site, impl="quantizing-pass-pooling-key-mask", **QUANT_CONFIG, ms=ms, gb_per_s=moved / ms / 1e6,
             default=True)
    results.save(D=D, block=BLOCK, sites=SITES)


if __name__ == "__main__":
    main(sweep="--default-only" not in sys.argv)
