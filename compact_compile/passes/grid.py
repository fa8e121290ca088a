"""Where the video tokens are: the (T, H, W) grid from the patch embedding, and whether text tokens
come before or after the video tokens in joint attention.

diffusers video DiTs patchify with a Conv3d (Wan, HunyuanVideo, Mochi…: output [B, C, T, H, W]) or
a Conv2d over frames (CogVideoX: [B·T, C, H, W]); the tokens are that output flattened in raster
order. Others patchify with reshapes and a Linear (Cosmos, CogVideoX 1.5, Kandinsky 5) or take the
tokens already patchified and build their RoPE coordinates on a (T, H, W) meshgrid (LTX-Video):
either way some `flatten`/`reshape`/`view` in the graph merges three consecutive dims (T, H, W) into
the token dim, in raster order — that merge shows the grid too.
Joint attention concatenates text (or other) and video token sequences; those `cat`s in the graph
upstream of the query say where the video tokens are among the others.
A graph break between the patch embedding and the blocks leaves the blocks' graph without either:
the grid then comes from the tags an earlier graph put on the tensors it returned (video_tags.py).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..video_tags import VideoTag, tag_of
from .graph_util import argument, call_name, example_value

_CONV3D = (torch.conv3d, torch.nn.functional.conv3d)
_CONV2D = (torch.conv2d, torch.nn.functional.conv2d)
_CAT = (torch.cat, torch.concat, torch.concatenate)


@dataclass(frozen=True)
class GridCandidate:
    shape: tuple          # conv output shape
    source: str
    tag: VideoTag | None = None   # carried from an earlier graph: where its tensor holds the video
    merge: bool = False           # from a flatten of (T, H, W) into tokens: it shows their order

    def grid(self, batch: int):
        if len(self.shape) == 5:
            return tuple(self.shape[2:])
        n, _, h, w = self.shape
        return (n // batch, h, w) if n % batch == 0 else None


def patch_embedding_grids(gm: fx.GraphModule) -> list[GridCandidate]:
    """Grid candidates, patch-embedding convolutions first, then token merges."""
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _CONV3D + _CONV2D:
            continue
        shape = tuple(node.meta["example_value"].shape)
        if all(isinstance(s, int) for s in shape):
            kind = "Conv3d" if node.target in _CONV3D else "Conv2d over frames"
            out.append(GridCandidate(shape, f"graph: {kind} patch embedding {node.name}"))
    return out + token_merges(gm)


_MERGES = ("flatten", "reshape", "view")


def token_merges(gm: fx.GraphModule) -> list[GridCandidate]:
    """(T, H, W) from every flatten/reshape/view that merges three consecutive dims into one and
    leaves the others as they are (at most one of the three may be 1: a frame of an image model)."""
    out = []
    for node in gm.graph.nodes:
        name = call_name(node)
        if name not in _MERGES or not node.args:
            continue
        before, after = example_value(node.args[0]), example_value(node)
        if before is None or after is None or not hasattr(before, "shape") or not hasattr(after, "shape"):
            continue
        triple = _merged_triple(tuple(before.shape), tuple(after.shape))
        if triple is not None and sum(d == 1 for d in triple) <= 1:
            out.append(GridCandidate((1, 1) + triple, f"graph: {triple} merged into {math.prod(triple)} tokens by "
                                                      f"{name} {node.name}", merge=True))
    return out


def _merged_triple(before: tuple, after: tuple) -> tuple | None:
    """(a, b, c) if `after` is `before` with three consecutive dims a, b, c replaced by a·b·c."""
    if len(before) != len(after) + 2 or not all(isinstance(d, int) for d in before + after):
        return None
    for i in range(len(after)):
        if before[:i] == after[:i] and before[i + 3:] == after[i + 1:] and math.prod(before[i:i + 3]) == after[i]:
            return before[i:i + 3]
    return None


def carried_grids(gm: fx.GraphModule, example_inputs) -> tuple[list[GridCandidate], dict[int, VideoTag]]:
    """Grid candidates from the video tags on this graph's inputs, and the tag of every tagged input
    by position."""
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    tags = {i: tag_of(x) for i, x in enumerate(example_inputs) if tag_of(x) is not None and i < len(names)}
    grids = [GridCandidate((1, 1) + t.grid, f"{t.source}, carried from an earlier graph by input {names[i]}", t)
             for i, t in tags.items()]
    return grids, tags


def output_tags(gm: fx.GraphModule, grids: list[GridCandidate], carried: list[VideoTag]) -> dict[int, VideoTag]:
    """Outputs `[B, N, C]` that hold the video tokens, by output position: N the token count of a
    tagged input's (the same tokens, through a block), or the video of this graph's patch embedding
    with other tokens around it where the graph shows where (`video_offset`): where several fit
    (FramePack embeds its history frames by convolutions too), the video is the largest, and more
    than half the tokens, as for joint attention (sites.py)."""
    out = {}
    results = gm.graph.output_node().args[0]
    for i, node in enumerate(results if isinstance(results, (tuple, list)) else [results]):
        value = example_value(node)
        if not isinstance(value, torch.Tensor) or value.dim() != 3 or not isinstance(value.shape[1], int):
            continue
        batch, n = value.shape[:2]
        fits = [t for t in carried if t.n_tokens == n]
        for g in grids:
            n_video = math.prod(g.grid(batch)) if g.grid(batch) is not None else 0
            offset = 0 if n_video == n else video_offset(node, n_video, n) if 0 < n_video < n else None
            if offset is not None:
                fits.append(VideoTag(g.grid(batch), offset, n, g.source))
        if len({(t.grid, t.offset) for t in fits}) > 1:
            largest = max(math.prod(t.grid) for t in fits)
            fits = [t for t in fits if math.prod(t.grid) == largest and largest > n / 2]
        if len({(t.grid, t.offset) for t in fits}) == 1:
            out[i] = fits[0]
    return out


def video_offset(node: fx.Node, n_video: int, n_tokens: int, tags: list[VideoTag] = (),
                 max_visits: int = 400) -> int | None:
    """Where the `n_video` video tokens start among the `n_tokens` tokens of an SDPA's query (or of a
    graph output), or None if the graph does not prove it.

    The tokens are built by `cat`s along the token dim, perhaps nested (FramePack: history, then the
    video, then the text): a span of exactly `n_video` tokens is the video; a `cat` whose parts add
    up to a span places the video inside the one part that holds it, after the parts before it; a
    tagged input (video_tags.py) of a span's size says where its video is. Cats are found
    breadth-first upstream of `node`; an answer counts only if it is the only one."""
    cats, seen, todo = [], set(), deque([node])
    while todo and len(seen) < max_visits:
        n = todo.popleft()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and n.target in _CAT:
            parts, dim = argument(n, 0, "tensors"), argument(n, 1, "dim", 0)
            sizes = [p.meta["example_value"].shape[dim] if isinstance(p, fx.Node) else None for p in parts]
            if all(isinstance(sz, int) for sz in sizes):
                cats.append(sizes)
        todo.extend(n.all_input_nodes)

    def offsets(span: int, depth: int) -> set[int]:
        if span == n_video:
            return {0}
        found = {t.offset for t in tags if t.n_tokens == span and math.prod(t.grid) == n_video}
        for sizes in (c for c in cats if sum(c) == span and depth < 8):
            for i, size in enumerate(sizes):
                if size >= n_video:
                    found |= {sum(sizes[:i]) + o for o in offsets(size, depth + 1)}
        return found

    found = offsets(n_tokens, 0) if n_tokens > n_video else set()
    return found.pop() if len(found) == 1 else None
