"""compact_compile's own errors reach the user's `model(...)` call as themselves, through Dynamo.

A tiny module compiled with a tiny backend (options validation and plan loading, nothing of
backend.py), decorated with `raises_unwrapped` as the real backend is.
"""
import traceback

import pytest
import torch
import torch.nn as nn
from torch._dynamo.exc import BackendCompilerFailed

import compact_compile
from compact_compile.errors import CompactError, OptionsError, PlanError, raises_unwrapped
from compact_compile.options import CompactOptions
from compact_compile.plan import Plan


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return self.linear(x).relu()


def validating_backend(gm, example_inputs, *, options=None):
    """What a backend does first: parse the options and read the plan file they name."""
    opts = CompactOptions.from_dict(options)
    if isinstance(opts.plan, str) and opts.plan.endswith(".safetensors"):
        Plan.load(opts.plan)
    return gm.forward


unwrapped_backend = raises_unwrapped(validating_backend)


def expected_message(options) -> str:
    with pytest.raises(CompactError) as direct:
        CompactOptions.from_dict(options)
    return str(direct.value)


def assert_clean(error: BaseException, message: str):
    assert str(error) == message                      # message intact: nothing appended by Dynamo
    assert "report" not in str(error) and "TORCHDYNAMO_VERBOSE" not in str(error)


def test_the_hierarchy():
    for cls in (OptionsError, PlanError):
        assert issubclass(cls, CompactError) and issubclass(cls, ValueError)
    assert compact_compile.OptionsError is OptionsError and compact_compile.PlanError is PlanError
    from compact_compile.options import OptionsError as from_options
    from compact_compile.plan import PlanError as from_plan
    assert from_options is OptionsError and from_plan is PlanError


@pytest.mark.parametrize("options", [
    {"plan": "windw"},
    {"windw": (3, 3, 3)},
    {"window": (2, 3, 3)},
    {"window": (True, True, True)},
    ["plan", "window"],
], ids=["plan", "key", "even-window", "bool-window", "not-a-dict"])
def test_options_error_reaches_the_call_as_itself(options):
    compiled = torch.compile(Tiny(), backend=unwrapped_backend, options=options)
    with pytest.raises(OptionsError) as info:
        compiled(torch.randn(2, 4))
    assert type(info.value) is OptionsError
    assert_clean(info.value, expected_message(options))


def test_without_the_decorator_dynamo_wraps_it():
    """Why the decorator exists (if this starts failing, torch stopped wrapping backend errors)."""
    compiled = torch.compile(Tiny(), backend=validating_backend, options={"plan": "windw"})
    with pytest.raises(BackendCompilerFailed) as info:
        compiled(torch.randn(2, 4))
    assert isinstance(info.value.inner_exception, OptionsError)
    assert not isinstance(info.value, OptionsError)


def test_plan_error_from_a_corrupt_file(tmp_path):
    path = tmp_path / "corrupt.plan.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    compiled = torch.compile(Tiny(), backend=unwrapped_backend, options={"plan": str(path)})
    with pytest.raises(PlanError, match="not a readable compact_compile plan") as info:
        compiled(torch.randn(2, 4))
    assert "report" not in str(info.value)


def test_traceback_points_into_the_backend():
    compiled = torch.compile(Tiny(), backend=unwrapped_backend, options={"plan": "windw"})
    for _ in range(3):   # raised again each call, with the same (not an ever growing) traceback
        with pytest.raises(OptionsError) as info:
            compiled(torch.randn(2, 4))
        frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
        assert "validating_backend" in frames and "__post_init__" in frames
        assert len(frames) < 40


def test_never_falls_back_to_eager(monkeypatch):
    """Dynamo's suppress_errors turns a failing backend into an eager (dense) run: ours must still raise."""
    monkeypatch.setattr(torch._dynamo.config, "suppress_errors", True)
    compiled = torch.compile(Tiny(), backend=unwrapped_backend, options={"plan": "windw"})
    for _ in range(2):
        with pytest.raises(OptionsError):
            compiled(torch.randn(2, 4))


def test_corrected_options_compile_afresh():
    model, x = Tiny(), torch.randn(2, 4)
    with pytest.raises(OptionsError):
        torch.compile(model, backend=unwrapped_backend, options={"plan": "windw"})(x)
    out = torch.compile(model, backend=unwrapped_backend, options={"plan": "window"})(x)
    torch.testing.assert_close(out, model(x))


def test_compact_error_as_an_explicit_cause_is_surfaced():
    @raises_unwrapped
    def backend(gm, example_inputs):
        try:
            CompactOptions.from_dict({"plan": "windw"})
        except OptionsError as e:
            raise RuntimeError("while lowering") from e

    with pytest.raises(OptionsError, match="'windw'"):
        torch.compile(Tiny(), backend=backend)(torch.randn(2, 4))


def test_compact_error_inside_a_nested_backend_failure_is_surfaced():
    @raises_unwrapped
    def backend(gm, example_inputs):
        raise BackendCompilerFailed(validating_backend, PlanError("plan has no site 'x'"), None)

    with pytest.raises(PlanError, match="plan has no site 'x'"):
        torch.compile(Tiny(), backend=backend)(torch.randn(2, 4))


def test_other_errors_keep_dynamos_report():
    """A bug is not dressed up as a user error: it stays BackendCompilerFailed, with Dynamo's hints."""
    @raises_unwrapped
    def buggy(gm, example_inputs):
        raise RuntimeError("a bug in the backend")

    with pytest.raises(BackendCompilerFailed, match="a bug in the backend"):
        torch.compile(Tiny(), backend=buggy)(torch.randn(2, 4))


def test_an_error_while_handling_a_compact_error_is_not_hidden():
    """A bug raised while a PlanError was being handled (`__context__`, not `__cause__`) is the news."""
    @raises_unwrapped
    def backend(gm, example_inputs):
        try:
            raise PlanError("plan has no site 'x'")
        except PlanError:
            raise RuntimeError("a bug in the strict=False path")

    with pytest.raises(BackendCompilerFailed, match="a bug in the strict=False path"):
        torch.compile(Tiny(), backend=backend)(torch.randn(2, 4))


def test_the_decorated_backend_keeps_its_name():
    assert unwrapped_backend.__name__ == "validating_backend"
    assert unwrapped_backend.__wrapped__ is validating_backend
