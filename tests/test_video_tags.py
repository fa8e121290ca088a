"""A graph break between the patch embedding and the attention blocks (HunyuanVideo 1.5, FramePack)
leaves the blocks' graphs without the convolution that shows the video grid: the grid travels on
the tensors (video_tags.py), block after block, is checked on every call, and a tensor that does
not carry the grid a graph was compiled for runs that graph without rewriting, never with a wrong
layout."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from support import AS_PLANNED, masked_sdpa, model_order_mask

import compact_compile
from compact_compile.layout import TokenLayout, auto_tile
from compact_compile.masks import video_site_blocks, window_blocks
from compact_compile.video_tags import tag_of

DIM, HEADS, WINDOW = 32, 2, (1, 3, 3)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, HEADS, -1)).permute(2, 0, 3, 1, 4)
        return x + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class BrokenVideoModel(nn.Module):
    """Patch embedding, a graph break (HunyuanVideo 1.5's `if is_t2v:`), then blocks in a loop that
    breaks again before each block: every block runs as a graph of its own."""

    def __init__(self, n_blocks: int = 2):
        super().__init__()
        self.patch = nn.Conv3d(4, DIM, (1, 2, 2), stride=(1, 2, 2))
        self.blocks = nn.ModuleList(Block() for _ in range(n_blocks))

    def forward(self, latent):
        x = self.patch(latent).flatten(2).transpose(1, 2)
        torch._dynamo.graph_break()
        for block in self.blocks:
            torch._dynamo.graph_break()
            x = block(x)
        return x


def window_reference(model, latent, grid):
    layout = TokenLayout(grid, auto_tile(grid, 64), 64)
    mask = model_order_mask(layout, window_blocks(layout, WINDOW)[None])
    with torch.no_grad(), masked_sdpa({math.prod(grid): [mask]}):
        return copy.deepcopy(model).double()(latent.double())


def compiled(model, window=WINDOW):
    return torch.compile(model, backend="compact", options=dict(AS_PLANNED, plan="window", window=window, block_size=64,
                                                                 inner="aot_eager"))


def test_grid_travels_across_graph_breaks_block_after_block():
    torch.manual_seed(0)
    model, latent = BrokenVideoModel().eval(), torch.randn(1, 4, 3, 16, 20)   # grid (3, 8, 10): 240 tokens
    compact_compile.report(clear=True)
    with torch.no_grad():
        out = compiled(model)(latent)
    sites = compact_compile.report().sites
    assert sites and all(s["rewritten"] and s["grid"] == (3, 8, 10) for s in sites)
    assert all("carried from an earlier graph" in s["grid_source"] for s in sites)
    assert tag_of(out) is not None and tag_of(out).grid == (3, 8, 10)     # the last block tagged its output
    ref = window_reference(model, latent, (3, 8, 10))
    assert ((out.double() - ref).norm() / ref.norm()) < 1e-5
    with torch.no_grad():
        dense = model(latent)
    assert ((out - dense).norm() / dense.norm()) > 1e-3                    # the window was applied


class NormBetween(BrokenVideoModel):
    """A graph with no attention between the patch embedding and the blocks: it passes the tags on."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(DIM)

    def forward(self, latent):
        x = self.patch(latent).flatten(2).transpose(1, 2)
        torch._dynamo.graph_break()
        x = self.norm(x) * 2
        torch._dynamo.graph_break()
        return self.blocks[0](x)


@pytest.mark.parametrize("model_class", [BrokenVideoModel, NormBetween])
def test_another_video_with_the_same_token_count_runs_unrewritten_not_with_a_wrong_layout(model_class):
    """(3, 8, 10) and (5, 8, 6) are both 240 tokens: the blocks' graphs are not recompiled (their
    input shape is the same), so the tag check is what keeps (5, 8, 6) from running on (3, 8, 10)'s
    layout: those graphs run without rewriting, with one warning, and the output is dense attention.
    NormBetween: a graph without attention that passes the tags on checks its inputs too (it re-tagged
    every output with the first video's grid, and the block then ran on (3, 8, 10)'s layout)."""
    torch.manual_seed(0)
    model = model_class().eval()
    fast = compiled(model)
    with torch.no_grad():
        fast(torch.randn(1, 4, 3, 16, 20))
        other = torch.randn(1, 4, 5, 16, 12)
        with pytest.warns(UserWarning, match="without sparse attention"):
            out = fast(other)
        torch.testing.assert_close(out, model(other), rtol=1e-5, atol=1e-5)


class JointBlock(nn.Module):
    """Joint attention over the block's tokens (history, then video) and a prompt after them."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)

    def forward(self, x, text):
        q, k, v = self.qkv(torch.cat([x, text], dim=1)).unflatten(-1, (3, HEADS, -1)).permute(2, 0, 3, 1, 4)
        out = x.shape[1]
        return x + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)[:, :out])


class HistoryModel(nn.Module):
    """FramePack in miniature: history frames embedded by their own convolution and put before the
    video, a graph break, then blocks of joint attention with the prompt after: tokens on both sides
    of the video, in a graph that sees neither convolution."""

    def __init__(self):
        super().__init__()
        self.patch, self.history_patch = nn.Conv3d(4, DIM, (1, 2, 2), (1, 2, 2)), nn.Conv3d(4, DIM, (1, 4, 4), (1, 4, 4))
        self.blocks = nn.ModuleList(JointBlock() for _ in range(2))

    def forward(self, latent, history, text):
        x = self.patch(latent).flatten(2).transpose(1, 2)
        x = torch.cat([self.history_patch(history).flatten(2).transpose(1, 2), x], dim=1)
        torch._dynamo.graph_break()
        for block in self.blocks:
            x = block(x, text)
        return x


def test_history_before_and_text_after_the_video_across_a_graph_break():
    torch.manual_seed(0)
    model = HistoryModel().eval()
    latent, history, text = torch.randn(1, 4, 3, 16, 20), torch.randn(1, 4, 2, 16, 20), torch.randn(1, 7, DIM)
    grid, n_history = (3, 8, 10), 2 * 4 * 5
    compact_compile.report(clear=True)
    with torch.no_grad():
        out = compiled(model, window=(1, 1, 1))(latent, history, text)
    sites = compact_compile.report().sites
    assert sites and all(s["rewritten"] and s["grid"] == grid and s["n_before"] == n_history
                         and s["n_text"] == n_history + 7 for s in sites)
    layout = TokenLayout(grid, auto_tile(grid, 64), 64, n_history + 7, n_history)
    blocks = video_site_blocks(layout, window_blocks(layout, (1, 1, 1)))
    assert not blocks.all()
    mask = model_order_mask(layout, blocks[None])
    with torch.no_grad(), masked_sdpa({layout.seq_len: [mask]}):
        ref = copy.deepcopy(model).double()(latent.double(), history.double(), text.double())
    with torch.no_grad():
        dense = model(latent, history, text)
    assert ((out.double() - ref).norm() / ref.norm()) < 1e-5 and ((out - dense).norm() / dense.norm()) > 1e-3


def test_a_tag_places_the_video_only_for_a_video_of_its_own_grid():
    """A tagged input of the span's token count says where its video starts, but only for a video as
    large as the tag's grid: another grid with the same total token count is not that video."""
    import torch.fx as fx

    from compact_compile.passes.grid import video_offset
    from compact_compile.video_tags import VideoTag

    node = next(iter(fx.symbolic_trace(lambda x: x).graph.nodes))     # an input: no cats upstream
    tag = VideoTag(grid=(2, 2, 2), offset=3, n_tokens=20, source="conv")
    assert video_offset(node, 8, 20, [tag]) == 3
    assert video_offset(node, 12, 20, [tag]) is None
