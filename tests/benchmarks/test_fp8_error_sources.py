"""benchmarks/fp8_error_sources.py rounds each operand as the FP8 kernels do: on inputs whose rotated
q, k − μ (fp8.rotation) and v already lie on e4m3's grid at their scales, rounding them changes nothing, so only P's rounding
is left; on other inputs each rounding shows."""
import torch

from benchmarks.fp8_error_sources import BLOCK, attention, layer_errors
from compact_compile.kernels.fp8 import rotation
from compact_compile.kernels.reference import block_sparse_attention_reference, token_mask

S, D = 2 * BLOCK + 8, 32


def on_grid(g: torch.Generator) -> torch.Tensor:
    """[1, 2, S, D]: e4m3 values of magnitude 1 to 448 (sums of a few hundred stay exact in fp32), every
    block and column holding 448, all times 2^-8 (softmax far from one-hot): on the grid of their scale."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[grid.isfinite() & (grid.abs() >= 1) & (grid.abs() <= 448)]
    x = grid[torch.randint(len(grid), (1, 2, S, D), generator=g)]
    x[..., ::BLOCK, :] = 448.0
    return x / 256


def test_attention_is_the_float64_reference():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, S, D, generator=g, dtype=torch.float64) for _ in range(3))
    blocks = torch.rand(3, 3, generator=g) < 0.6
    blocks |= torch.eye(3, dtype=torch.bool)
    ours = attention(q, k, v, token_mask(blocks, S, BLOCK))
    torch.testing.assert_close(ours, block_sparse_attention_reference(q, k, v, blocks, BLOCK), rtol=1e-12, atol=1e-12)


def test_only_the_operands_off_the_grid_add_error():
    g = torch.Generator().manual_seed(1)
    m = rotation(D).T      # the tiles hold q·M/8 and k·M: on the grid for these (Mᵀ·M = 8·I)
    q, half, v = on_grid(g) @ m, on_grid(g) @ m / 8, on_grid(g)
    k = torch.cat([half[..., : S // 2, :], -half[..., : S // 2, :]], -2)   # mean 0: k − μ = k
    dense = torch.ones(3, 3, dtype=torch.bool)
    exact = layer_errors(q, k, v, dense, rows=S)
    assert max(exact["q"], exact["k"], exact["v"]) < 1e-6 and exact["P"] > 1e-4   # 1e-6: σ = amax·fl(1/448)
    off = [x * (1 + 0.1 * torch.rand(x.shape, generator=g)) for x in (q, k, v)]   # one scale would stay on it
    noisy = layer_errors(*off, dense, rows=S)
    assert min(noisy["q"], noisy["k"], noisy["v"], noisy["fp8"]) > 1e-4


def test_the_rotation_spreads_a_large_shared_channel():
    """Rounding puts a channel's noise on every score; q and k share a large one here. Rotated as the
    kernels round them, the output is off by 1.5% (this seed); unrotated, by 10.7%."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, S, D, generator=g) for _ in range(3))
    q[..., 3], k[..., 3] = q[..., 3] * 10, k[..., 3] * 10
    errors = layer_errors(0.3 * q, k, v, torch.ones(3, 3, dtype=torch.bool), rows=S)
    assert errors["q, k"] < 0.03 < 0.08 < errors["q, k unrotated"]
