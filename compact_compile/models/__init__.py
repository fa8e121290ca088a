"""Fixes for diffusers models whose attention Dynamo cannot capture as one graph.

Each fix swaps in a static-shape equivalent only while Dynamo traces, so eager behaviour is
unchanged and users change no code. A fix installs now for libraries already imported, and the
moment its library module is imported otherwise (an import hook, not a compile-start callback:
torch._dynamo.reset() clears those, and a model traced without its fix breaks its graph silently).
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

from . import mochi

__all__ = ["install_model_fixes"]

_FIXES = {"mochi": (mochi._PROCESSOR_MODULE, mochi.install)}


def install_model_fixes() -> dict[str, bool]:
    """Install every model fix that applies now, and the import hook for the rest; safe to call any
    number of times. Returns, per model, whether its fix is in place now."""
    if not any(isinstance(f, _InstallOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _InstallOnImport())
    return {name: install() for name, (_, install) in _FIXES.items()}


class _InstallOnImport(importlib.abc.MetaPathFinder):
    """Runs a fix right after its library module has been executed on import."""

    def find_spec(self, name, path, target=None):
        fixes = [install for module, install in _FIXES.values() if module == name]
        if not fixes:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_fix(module):
            exec_module(module)
            for install in fixes:
                install()

        spec.loader.exec_module = exec_then_fix
        return spec
