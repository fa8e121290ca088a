"""torch.compile for the functions our ops call at run time (FlexAttention, rectification math).

They compile once per (shape, dtype, device). Dynamo's default limit of 8 per function, when hit,
silently falls back to eager — for FlexAttention that materialises the S×S scores. We allow more
shapes and raise a clear error past them instead.
"""
from __future__ import annotations

import functools

import torch

MAX_SHAPES = 64


class RecompileLimit(RuntimeError):
    pass


def compiled(fn, eager_on_cpu: bool = False):
    """`fn` compiled with `dynamic=False`, raising `RecompileLimit` instead of falling back to eager.
    `eager_on_cpu`: run eagerly on CPU tensors, where compiling costs more than it saves."""
    compiled_fn = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal compiled_fn
        if eager_on_cpu and not any(isinstance(t, torch.Tensor) and t.is_cuda for t in torch.utils._pytree.tree_leaves(args)):
            return fn(*args, **kwargs)
        compiled_fn = compiled_fn or torch.compile(fn, dynamic=False)
        try:
            with torch._dynamo.config.patch(recompile_limit=MAX_SHAPES, fail_on_recompile_limit_hit=True):
                return compiled_fn(*args, **kwargs)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            raise RecompileLimit(
                f"{fn.__name__} was compiled for {MAX_SHAPES} shapes in this process; rather than fall back "
                f"to eager, compact_compile stops here. Compile with fixed video sizes, or raise "
                f"compact_compile.kernels.compiled.MAX_SHAPES") from None

    return call
