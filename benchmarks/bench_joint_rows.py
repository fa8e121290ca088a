"""Joint text+video attention: does launching the text rows first pay? One GPU process.

The text query blocks of joint attention attend every key block, ~10× longer than a video row at
90% sparsity; launched last (the text is after the video in tile order) they run on alone after
every other program finished. Our Triton kernel can launch the last `first_blocks` query blocks of
every head first. Shapes: Mochi 10B 480p 85 frames (grid 15×30×53 = 23,850 video + 256 text tokens,
100 of them valid: a key-padding mask; H24 D128 bf16, window (1, 5, 5)) and HunyuanVideo 13B 720p
33 frames (9×45×80 + 256 text, window (3, 3, 3)). Baseline: SDPA with the same key mask, same run.
Writes $OUT/joint-rows.json.

    python benchmarks/bench_joint_rows.py
"""
import torch
import torch.nn.functional as F
import triton

from compact_compile.kernels.registry import kv_block_lists
from compact_compile.kernels.triton_sparse import block_sparse_attention
from compact_compile.layout import TokenLayout, auto_tile
from compact_compile.masks import density, window_blocks
from timing import Results, bench

SHAPES = {"mochi10b": ((15, 30, 53), 24, (1, 5, 5)), "hunyuan13b": ((9, 45, 80), 24, (3, 3, 3))}
N_TEXT, VALID_TEXT, D = 256, 100, 128
results = Results("joint-rows.json")


def joint_blocks(layout, window):
    """The window over video blocks; every block holding text computed in full (as the planner does)."""
    blocks = window_blocks(layout, window)
    _, has_text = layout.block_tiles()
    return blocks | has_text[:, None] | has_text[None, :]


def main():
    torch.manual_seed(0)
    print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name(), flush=True)
    for model, (grid, H, window) in SHAPES.items():
        layout = TokenLayout(grid, auto_tile(grid, 128), 128, n_text=N_TEXT)
        S = layout.seq_len
        q, k, v = (torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        valid = torch.ones(1, S, dtype=torch.bool, device="cuda")
        valid[:, layout.n_video + VALID_TEXT:] = False
        blocks = joint_blocks(layout, window)
        num, idx = (x.cuda() for x in kv_block_lists(blocks[None]))
        text_blocks = layout.n_blocks - layout.n_video // layout.block_size
        sdpa = bench(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :]))
        ref = block_sparse_attention(q, k, v, num, idx, 128, key_valid=valid)
        for first in (0, text_blocks):
            run = lambda: block_sparse_attention(q, k, v, num, idx, 128, key_valid=valid, first_blocks=first)  # noqa: E731
            out, ms = run(), bench(run)
            flop = 4 * H * S * S * D * density(blocks)
            results.emit(model=model, S=S, tile=layout.tile, density=round(density(blocks), 4), first_blocks=first,
                         text_blocks=text_blocks, ms=ms, sdpa_ms=sdpa, speedup_vs_sdpa=sdpa / ms,
                         tflops=flop / ms / 1e9, max_diff_to_first_0=(out.float() - ref.float()).abs().max().item())
    results.save(n_text=N_TEXT, valid_text=VALID_TEXT)


if __name__ == "__main__":
    main()
