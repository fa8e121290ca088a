"""Fixes for diffusers models whose attention Dynamo cannot capture as one graph.

Each fix swaps in a static-shape equivalent only while Dynamo traces, so eager behaviour is
unchanged and users change no code. Fixes install only for libraries already imported.
"""
from __future__ import annotations

from . import mochi

__all__ = ["install_model_fixes"]


def install_model_fixes() -> dict[str, bool]:
    """Install every model fix that applies now; safe to call any number of times.

    Returns, per model, whether its fix is in place.
    """
    return {"mochi": mochi.install()}
