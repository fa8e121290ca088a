"""Joint text+video attention: does launching the text rows first pay? One GPU process.

The text query blocks of joint attention attend every key block, ~10× longer than a video row at
90% sparsity; launched last (the text is after the video in tile order) they run on alone after
every other program finished. Our Triton kernel can launch the last `first_blocks` query blocks of
every head first. Shapes: Mochi 10B 480p 85 frames (grid 15×30×53 = 23,850 video + 256 text tokens,
100 of them valid: a key-padding mask; H24 D128 bf16, window (1, 5, 5)) and HunyuanVideo 13B 720p
33 frames (9×45×80 + 256 text, window (3, 3, 3)). Baseline: SDPA with the same key mask, same run.
Where FA4 is installed (sm90), one more row per shape: FA4 with the key mask (kernels/fa4.py: the
blocks holding padded keys go to FA4's "mask" lists and our mask_mod, the per-call split included in
its time), PASS if it matches our Triton kernel (relative error < 1e-2) and is far from FA4 without
the mask (a kernel ignoring the mask would match that instead). Writes $OUT/joint-rows.json.

    python benchmarks/bench_joint_rows.py
"""
import torch
import torch.nn.functional as F
import triton

from compact_compile.kernels.fa4 import FA4Kernel, split_lists_triton
from compact_compile.kernels.registry import kv_block_lists, masked_key_blocks
from compact_compile.kernels.triton_sparse import block_sparse_attention
from compact_compile.layout import TokenLayout, auto_tile
from compact_compile.masks import density, window_blocks
from timing import Results, bench, rel_diff

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
            triton_ms = ms   # the last row's: text rows first, as the backend runs our kernel
        why = FA4Kernel.unsupported(q.device, q.dtype, D, 128, False, key_mask=True)
        if why:
            print(f"{model}: no FA4 row ({why})", flush=True)
            continue
        fa4_row(model, layout, blocks, q, k, v, valid, num, idx, ref, sdpa, triton_ms)
    results.save(n_text=N_TEXT, valid_text=VALID_TEXT)


def fa4_row(model, layout, blocks, q, k, v, valid, num, idx, triton_out, sdpa_ms, triton_ms):
    """FA4 with the key mask against our Triton kernel (itself tested against float64) and against FA4
    without the mask; its time, the per-call split's, and the share of listed blocks that pay the mask."""
    kern = FA4Kernel(layout)
    prepared = kern.prepare((num, idx))
    run = lambda: kern.attend(q, k, v, prepared, None, key_valid=valid)  # noqa: E731
    out, ms = run(), bench(run)
    unmasked = kern.attend(q, k, v, prepared, None)
    err, ignored = rel_diff(out, triton_out), rel_diff(unmasked, triton_out)
    masked = masked_key_blocks(valid, layout.n_blocks, layout.block_size)
    split = lambda: split_lists_triton((num, idx), masked)  # noqa: E731
    mask_cnt = split()[0]
    ok = bool(torch.isfinite(out).all()) and err < 1e-2 and ignored > 5 * err
    print(f"{model} fa4 key mask: {'PASS' if ok else 'FAIL'}  rel. error vs triton {err:.2e}, without the mask "
          f"{ignored:.2e}; fa4 {ms:.3f} ms, triton {triton_ms:.3f} ms, sdpa {sdpa_ms:.3f} ms", flush=True)
    results.emit(model=model, S=layout.seq_len, kernel="fa4", density=round(density(blocks), 4), ms=ms,
                 sdpa_ms=sdpa_ms, triton_ms=triton_ms, speedup_vs_sdpa=sdpa_ms / ms, speedup_vs_triton=triton_ms / ms,
                 split_ms=bench(split), mask_block_share=(mask_cnt.sum() / num.sum()).item(),
                 rel_err_vs_triton=err, rel_diff_without_mask=ignored, status="PASS" if ok else "FAIL")


if __name__ == "__main__":
    main()
