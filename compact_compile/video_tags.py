"""Video grids carried across graph breaks, on the tensors themselves.

A graph break between a model's patch embedding and its transformer blocks (HunyuanVideo 1.5
branches on `torch.all(image_embeds == 0)`; its blocks then compile as graphs of their own) leaves
the blocks' graphs without the convolution that shows the video grid. The graph that has it tags
its outputs that hold the video tokens with a `VideoTag` (grid, where the video tokens start, how
many tokens the tensor has); a later graph of the same compile reads the tag off its example
inputs (real tensors) and tags its own outputs in turn, so block after block keeps it.

A tag is a promise about values the later graph was specialised on, so it is checked on every
call: inputs that do not carry the tags the graph was compiled for (another video of the same
token count, a tensor remade by eager code) run the graph without rewriting, with one warning.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

ATTR = "_compact_video"


@dataclass(frozen=True)
class VideoTag:
    grid: tuple            # (T, H, W)
    offset: int            # first video token along the tensor's token dim (1)
    n_tokens: int          # the tensor's token count
    source: str            # where the grid was found

    def __post_init__(self):
        object.__setattr__(self, "grid", tuple(self.grid))


def tag_of(x) -> VideoTag | None:
    return getattr(x, ATTR, None)


def with_video_tags(compiled: Callable, expect: dict[int, VideoTag], emit: dict[int, VideoTag],
                    unrewritten: Callable[[list], Callable]) -> Callable:
    """`compiled` checking that argument i carries `expect[i]` and tagging output i with `emit[i]`.
    On a mismatch, `unrewritten(args)` builds the graph without rewriting, which runs instead (its
    outputs untagged: their layout is not known)."""
    if not expect and not emit:
        return compiled
    fallback = []

    def run(*args):
        if any(tag_of(args[i]) != tag for i, tag in expect.items()):
            if not fallback:
                warnings.warn("compact: a graph compiled for video tokens located by an earlier graph (tags "
                              f"{sorted({t.grid for t in expect.values()})}) got inputs without those tags (another "
                              "video size with the same token count, or tensors remade outside the compiled "
                              "graphs): it runs without sparse attention", stacklevel=2)
                fallback.append(unrewritten(list(args)))
            return fallback[0](*args)
        out = compiled(*args)
        for i, tag in emit.items():
            setattr(out[i], ATTR, tag)
        return out

    return run
