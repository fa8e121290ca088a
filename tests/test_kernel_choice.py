"""Which kernel a rewritten site gets: kernel="auto" takes the fastest available (FA4, then our Triton
kernel) on CUDA only, an explicit "triton" runs it wherever Triton can (the GPU, or the CPU
interpreter) and falls back to Flex with the reason in the report where it cannot; every choice
computes the same attention. The model runs on the GPU where there is one (FA4 takes head dims
64–128, so "auto" is Triton's at 16)."""
import pytest
import torch
from support import AS_PLANNED, SelfAttention, Wrapper, masked_sdpa, model_order_mask, rel_err

import compact_compile
from compact_compile.layout import TokenLayout
from compact_compile.masks import window_blocks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GRID = (2, 8, 8)  # 128 tokens; tile (1, 8, 8) = one 64-token block per frame


@pytest.mark.parametrize("kernel, head_dim, dtype, want", [
    ("flex", 16, torch.float32, "flex"),
    ("auto", 16, torch.bfloat16, "triton" if torch.cuda.is_available() else "flex"),
    ("auto", 16, torch.float32, "flex"),     # auto leaves fp32 to Flex: Triton's tiles are sized for 16 bits
    ("triton", 16, torch.float32, "triton"),
    ("triton", 24, torch.float32, "flex"),   # head dim the Triton kernel does not take
])
def test_kernel_choice_and_equal_results(kernel, head_dim, dtype, want):
    heads = 2
    model = Wrapper(SelfAttention(dim=heads * head_dim, heads=heads)).eval().to(DEVICE, dtype)
    x = torch.randn(1, 128, heads * head_dim, device=DEVICE, dtype=dtype)
    options = dict(AS_PLANNED, plan="window", window=(1, 1, 1), grid=GRID, tile=(1, 8, 8), block_size=64, kernel=kernel,
                   inner="eager")
    compiled = torch.compile(model, backend="compact", options=options)
    with torch.no_grad():
        out = compiled(x)
        layout = TokenLayout(GRID, (1, 8, 8), 64)
        with masked_sdpa({128: [model_order_mask(layout, window_blocks(layout, (1, 1, 1))[None])]}):
            ref = model.double()(x.double())
    [site] = compact_compile.report().sites
    assert site["kernel"] == want
    assert ("asked for but not used" in site["kernel_reason"]) == (kernel == "triton" and want == "flex")
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 2e-2)


def test_a_block_size_the_triton_kernel_does_not_take_goes_to_flex_with_the_reason():
    """256-token blocks (a plan file's tile): "auto" passes Triton over, an explicit "triton" is
    replaced by Flex, each saying why, instead of a ValueError at the first call."""
    from compact_compile.kernels.registry import choose_kernel

    name, why = choose_kernel("triton", DEVICE, torch.bfloat16, 64, 256)
    assert name == "flex" and "block size 256" in why
    if DEVICE == "cuda":
        name, why = choose_kernel("auto", DEVICE, torch.bfloat16, 64, 256)
        assert name != "triton" and (name == "fa4" or "triton: block size 256" in why)
