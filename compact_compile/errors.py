"""The errors compact_compile raises on purpose, and how they reach the user through torch.compile.

    CompactError            base of every error that means "your options, plan or files are wrong"
      OptionsError          a bad `options={...}` value (also a ValueError)
      PlanError             a plan file that cannot be used, or a plan that does not fit the model
                            (also a ValueError)

Why `raises_unwrapped` exists: Dynamo calls a backend inside `torch.compile`'s first forward, and
wraps whatever the backend raises into `torch._dynamo.exc.BackendCompilerFailed`, whose message
ends with a "please do this especially if you're reporting a bug to PyTorch" footer. A user who
misspelt a plan then sees what looks like a PyTorch bug, and `except OptionsError` misses it.
Dynamo's passthrough list is private and differs between releases (torch 2.13 lets
`ShortenTraceback`, `SkipFrame` and `IndexError` through `_call_user_compiler`, and even those get
their message rewritten by `augment_exc_message`), and `SkipFrame` would silently run the frame
eagerly: dense attention, the very thing this library must never do quietly.

So the backend does not raise at all. When it meets a CompactError, `raises_unwrapped` hands
Dynamo a "compiled graph" that raises that error when it is called. The backend contract (take a
GraphModule and example inputs, return a callable) is public and the same in every torch 2.x;
an exception raised by the returned callable is ordinary Python code running inside the user's
`model(...)` call, so it reaches the caller as itself: its type, its message, its original
traceback (pointing at the line in the backend that raised it). Dynamo caches that graph, so every
later call raises the same error instead of falling back to eager (also under
`torch._dynamo.config.suppress_errors`); a new `torch.compile(...)` with corrected options is a
new backend and compiles afresh.
"""
from __future__ import annotations

import functools
from typing import Callable


class CompactError(Exception):
    """Base of the errors compact_compile raises on purpose: catch this to catch all of them."""


class OptionsError(CompactError, ValueError):
    """An option of `torch.compile(..., backend="compact", options={...})` is unknown or has a bad value."""


class PlanError(CompactError, ValueError):
    """A plan that cannot be used: unreadable, corrupt, or made for another model/layout."""


def raises_unwrapped(backend_fn: Callable) -> Callable:
    """Decorate a Dynamo backend `(gm, example_inputs, **kwargs) -> callable` so that a CompactError it
    raises reaches the user's `model(...)` call as itself instead of as Dynamo's BackendCompilerFailed.

    A CompactError found as the explicit cause (`raise X from e`) of another exception, or as the
    `inner_exception` of a BackendCompilerFailed from a nested compile, is surfaced the same way.
    Every other exception propagates unchanged: real bugs keep Dynamo's report.
    """
    @functools.wraps(backend_fn)
    def backend(gm, example_inputs, *args, **kwargs):
        try:
            return backend_fn(gm, example_inputs, *args, **kwargs)
        except Exception as e:
            error = find_compact_error(e)
            if error is None:
                raise
            return _graph_raising(error)

    return backend


def find_compact_error(error: BaseException) -> CompactError | None:
    """The CompactError that `error` is, or was explicitly caused by, if any. `__context__` (an
    exception raised while another was being handled) is not followed: there the CompactError is
    not the reason, and surfacing it would hide a real bug."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, CompactError):
            return error
        seen.add(id(error))
        error = getattr(error, "inner_exception", None) or error.__cause__
    return None


def _graph_raising(error: CompactError) -> Callable:
    # re-raise with the traceback it had in the backend, not one grown by every earlier raise
    traceback = error.__traceback__

    def compiled_graph_raising_compact_error(*args, **kwargs):
        raise error.with_traceback(traceback)

    return compiled_graph_raising_compact_error
