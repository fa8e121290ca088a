"""Test-session setup shared by all test directories.

Triton picks its interpreter when it is imported, so TRITON_INTERPRET must be set before anything
imports triton: here, first. Only on machines without CUDA (CPU-only CI), where Triton kernels can
run in no other way; on a GPU machine the same tests run the compiled kernels. Inductor and
FlexAttention on CPU generate C++, so they are unaffected.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import compact_compile  # noqa: E402
from compact_compile.schedule import CLOCK  # noqa: E402

# Helpers and tiny model builders shared by the tests live in tests/support.py.


@pytest.fixture(autouse=True)
def exact_fp32_on_the_gpu():
    """fp32 stays fp32 on a GPU: the tests hold fp32 to 1e-5 of float64, and cuDNN's convolutions take
    TF32 by default (off by ~1e-3). Restored after each test, so a test that turns TF32 on in-process
    (the example's training) does not change later ones."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts with no compiled code, an empty compact report and a step clock that has seen no
    timestep (and leaves none behind): the clock is process-wide, and a step left by an earlier test made
    a later model without a timestep input run its default dense warm-up."""
    torch._dynamo.reset()
    compact_compile.report(clear=True)
    CLOCK.reset()
    yield
    CLOCK.reset()
    torch._dynamo.reset()
    compact_compile.report(clear=True)
