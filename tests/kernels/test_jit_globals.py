"""Triton's compiler lets a @triton.jit function read a module global only if it is a tl.constexpr (or
another jit function); the interpreter, which runs the CPU tests, reads any global. So a plain float
constant passes every CPU test and fails on the GPU at compile time: this test reads the sources.
(CuTe DSL's @cute.jit functions, traced in Python, read any global: not checked.)"""
import ast
from pathlib import Path

import compact_compile

PACKAGE = Path(compact_compile.__file__).parent


def _module_constants(tree):
    """Module-level names bound by assignment, with the assigned expression's source."""
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name) and node.value is not None:
                    out[target.id] = ast.unparse(node.value)
    return out


def _jit_functions(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and any("triton.jit" in ast.unparse(d) for d in node.decorator_list):
            yield node


def non_constexpr_globals(source: str):
    """(function, name) for every module constant a jit function reads that is not a tl.constexpr."""
    tree = ast.parse(source)
    constants = _module_constants(tree)
    found = []
    for fn in _jit_functions(tree):
        local = {a.arg for a in fn.args.args} | {n.id for n in ast.walk(fn)
                                                  if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        for n in ast.walk(fn):
            if (isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id in constants
                    and n.id not in local and "constexpr(" not in constants[n.id]):
                found.append((fn.name, n.id))
    return found


def test_the_check_finds_a_plain_global():
    source = "X = 1.5\nY = tl.constexpr(2.0)\n@triton.jit\ndef k(a):\n    return a * X + Y\n"
    assert non_constexpr_globals(source) == [("k", "X")]
    assert non_constexpr_globals(source.replace("@triton.jit", "@cute.jit")) == []   # CuTe reads any global


def test_jit_functions_read_only_constexpr_globals():
    offenders = {str(path.relative_to(PACKAGE)): bad for path in sorted(PACKAGE.rglob("*.py"))
                 if (bad := non_constexpr_globals(path.read_text()))}
    assert not offenders, f"jit functions read globals that are not tl.constexpr: {offenders}"
