"""`torch.ops.compact.attention`: the op every rewritten attention site calls.

Opaque to Inductor (an extern call), so whatever runs inside (a compiled FlexAttention today, our
Triton kernel later) is chosen at run time. The site's static data (block map, kernel) lives in a
process-wide table; the graph carries only the integer handle.
q, k, v arrive in tiled token order (layout.py); the output is in the same order, contiguous.
"""
from __future__ import annotations

import itertools
from typing import Callable

import torch

SiteKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "float | None"], torch.Tensor]

_SITES: dict[int, SiteKernel] = {}
_next_handle = itertools.count()


def register_site(kernel: SiteKernel) -> int:
    handle = next(_next_handle)
    _SITES[handle] = kernel
    return handle


def site_kernel(handle: int) -> SiteKernel:
    return _SITES[handle]


@torch.library.custom_op("compact::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, handle: int, scale: float | None = None) -> torch.Tensor:
    return _SITES[handle](q, k, v, scale).contiguous()


@attention.register_fake
def _(q, k, v, handle, scale=None):
    return q.new_empty(q.shape[:-1] + v.shape[-1:])
