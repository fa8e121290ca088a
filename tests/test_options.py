"""CompactOptions: parsing and validation of torch.compile(..., options={...})."""
import dataclasses
import math

import pytest
import torch
from support import SelfAttention, Wrapper, raises_from_backend

import compact_compile
from compact_compile.layout import TokenLayout
from compact_compile.options import KERNELS, CompactOptions, OptionsError
from compact_compile.plan import Plan, SitePlan
from compact_compile.planner import load_plan


@pytest.fixture(autouse=True)
def no_env_plan(monkeypatch):
    monkeypatch.delenv("COMPACT_PLAN", raising=False)


def write_plan(path, grid=(2, 8, 8), tile=(1, 8, 8), heads=2, site="attn"):
    plan = Plan(grid, tile, math.prod(tile))
    layout = TokenLayout(grid, tile, plan.block_size)
    blocks = torch.eye(layout.n_blocks, dtype=torch.bool)[None]
    plan.sites[site] = SitePlan(heads, 16, layout.seq_len, 0, 0, blocks)
    plan.save(path)
    return str(path)


def test_defaults():
    opts = CompactOptions.from_dict(None)
    assert opts == CompactOptions.from_dict({}) == CompactOptions()
    assert (opts.plan, opts.window, opts.grid, opts.tile, opts.block_size, opts.strict, opts.inner) == (
        "window", (3, 3, 3), None, "auto", None, True, "inductor")
    assert opts.kernel in KERNELS


def test_valid_values_are_normalised(tmp_path):
    path = write_plan(tmp_path / "p.safetensors")
    opts = CompactOptions.from_dict(dict(plan=tmp_path / "p.safetensors", window=[1, 3, 5], grid=[3, 8, 9],
                                         tile=(2, 4, 8), block_size=64, kernel="auto", strict=False, inner="eager"))
    assert opts.plan == path and isinstance(opts.plan, str)
    assert opts.window == (1, 3, 5) and opts.grid == (3, 8, 9) and opts.tile == (2, 4, 8)
    plan = Plan.load(path)
    assert CompactOptions.from_dict({"plan": plan}).plan is plan


@pytest.mark.parametrize("key", ["plan_file", "blocksize", "sparsity", "Plan"])
def test_unknown_key_is_named(key):
    with pytest.raises(OptionsError, match=f"unknown compact option '{key}'"):
        CompactOptions.from_dict({"plan": "dense", key: 1})


def test_unknown_key_through_torch_compile():
    model = Wrapper(SelfAttention()).eval()
    compiled = torch.compile(model, backend="compact", options={"grid": (2, 8, 8), "windw": (3, 3, 3)})
    with torch.no_grad(), raises_from_backend(OptionsError, "unknown compact option 'windw'"):
        compiled(torch.randn(1, 128, 32))


BAD_VALUES = [
    ("plan", 3), ("plan", None), ("plan", "sparse"), ("plan", "/nonexistent/plan.safetensors"), ("plan", ["dense"]),
    ("window", (2, 3, 3)), ("window", (3, 3)), ("window", (3, 3, 3, 3)), ("window", (0, 1, 1)), ("window", (-1, 3, 3)),
    ("window", (1.5, 3, 3)), ("window", "333"), ("window", 3), ("window", None),
    ("window", (True, True, True)), ("window", (3.0, 3, 3)),
    ("grid", (0, 8, 8)), ("grid", (3, 8)), ("grid", ("a", 8, 8)), ("grid", (3.5, 8, 8)), ("grid", 216),
    ("grid", (True, 8, 8)), ("grid", (2, 8, False)),
    ("tile", (1, 8, 4)), ("tile", (1, 4, 4)), ("tile", (1, 8)), ("tile", (0, 8, 8)), ("tile", "cube"), ("tile", None),
    ("block_size", 32), ("block_size", 256), ("block_size", "64"), ("block_size", 0), ("block_size", 64.0),
    ("block_size", 127.9), ("kernel", "triton_typo"), ("kernel", None), ("kernel", "FLEX"),
    ("strict", "yes"), ("strict", 1), ("strict", None),
    ("inner", "cudagraphs"), ("inner", None), ("inner", "Inductor"),
    ("observer", 3), ("observer", "print"),
    ("dense_steps", -1), ("dense_steps", 1.5), ("dense_steps", True), ("dense_steps", "2"),
    ("mode", "reduce-overhead"), ("mode", "max-autotune"), ("mode", 1),
    ("quantize", "int4"), ("quantize", "FP8"), ("quantize", 8), ("quantize", True),
    ("inductor", "multi_kernel"), ("inductor", {"multi_kernel": 1}), ("inductor", {"triton.cudagraphs": True}),
    ("inductor", [("triton.multi_kernel", 1)]),
]


@pytest.mark.parametrize("key, value", BAD_VALUES, ids=[f"{k}={v!r}" for k, v in BAD_VALUES])
def test_bad_value_is_an_error_naming_the_key(key, value):
    with pytest.raises(OptionsError, match=f"'{key}'"):
        CompactOptions.from_dict({key: value})


def test_bools_are_not_integers():
    """(True, True, True) used to pass as (1, 1, 1): a one-tile window nobody asked for."""
    with pytest.raises(OptionsError, match="'tile' must be three positive integers"):
        CompactOptions.from_dict({"tile": (True, 8, 8), "block_size": 64})
    assert CompactOptions.from_dict({"tile": (1, 8, 8), "block_size": 64}).tile == (1, 8, 8)


@pytest.mark.parametrize("options", [["plan", "window"], "window", ("plan", "dense"), 3, [("plan", "dense")]],
                         ids=["list", "str", "tuple", "int", "pairs"])
def test_options_must_be_a_dict(options):
    with pytest.raises(OptionsError, match=r"options must be a dict such as \{'plan': 'window'\}, not"):
        CompactOptions.from_dict(options)


def test_option_names_must_be_strings():
    with pytest.raises(OptionsError, match="compact option names are strings, not 3"):
        CompactOptions.from_dict({3: "window"})


def test_inductor_option_names_a_near_config_and_needs_inductor():
    with pytest.raises(OptionsError, match=r"Inductor has no config 'triton.multi_kernal'; did you mean "
                                           r"'triton.multi_kernel'"):
        CompactOptions.from_dict({"inductor": {"triton.multi_kernal": 1}})
    with pytest.raises(OptionsError, match=r"option 'inductor' configures Inductor; inner='aot_eager' does not use it"):
        CompactOptions.from_dict({"inductor": {"triton.multi_kernel": 1}, "inner": "aot_eager"})
    opts = CompactOptions.from_dict({"inductor": {"triton.multi_kernel": 1, "coordinate_descent_tuning": True}})
    assert opts.inductor == {"triton.multi_kernel": 1, "coordinate_descent_tuning": True}


def test_help_shows_every_option():
    doc = CompactOptions.__doc__
    for f in dataclasses.fields(CompactOptions):
        assert f"\n    {f.name} " in doc, f.name


def test_tile_must_hold_the_block_size():
    assert CompactOptions.from_dict({"tile": (1, 8, 8), "block_size": 64}).tile == (1, 8, 8)
    assert CompactOptions.from_dict({"tile": (2, 8, 8)}).tile == (2, 8, 8)  # default block size 128
    with pytest.raises(OptionsError, match="'tile'.*64 tokens.*block_size = 128"):
        CompactOptions.from_dict({"tile": (1, 8, 8), "block_size": 128})


def test_replace_validates():
    opts = CompactOptions(plan="dense")
    assert opts.replace(window=(1, 1, 1)).window == (1, 1, 1)
    with pytest.raises(OptionsError, match="'window'"):
        opts.replace(window=(2, 2, 2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.plan = "window"


# ----------------------------------------------------------------------------------------------
# COMPACT_PLAN


def test_env_plan_used_when_options_have_none(tmp_path, monkeypatch):
    path = write_plan(tmp_path / "env.plan.safetensors")
    monkeypatch.setenv("COMPACT_PLAN", path)
    assert CompactOptions.from_dict(None).plan == path
    assert CompactOptions.from_dict({"strict": False}).plan == path
    assert CompactOptions.from_dict({"plan": "dense"}).plan == "dense"     # options win
    monkeypatch.setenv("COMPACT_PLAN", "dense")
    assert CompactOptions.from_dict({}).plan == "dense"
    monkeypatch.setenv("COMPACT_PLAN", "")
    assert CompactOptions.from_dict({}).plan == "window"


def test_env_plan_that_does_not_exist(monkeypatch):
    monkeypatch.setenv("COMPACT_PLAN", "/nonexistent/from-env.plan.safetensors")
    with pytest.raises(OptionsError, match="'plan'.*from-env.plan.safetensors"):
        CompactOptions.from_dict({"grid": (2, 8, 8)})


def test_env_plan_reaches_the_backend(tmp_path, monkeypatch):
    """A framework calls torch.compile(backend="compact") itself: the plan comes from the environment."""
    path = write_plan(tmp_path / "env.plan.safetensors")
    monkeypatch.setenv("COMPACT_PLAN", path)
    model = Wrapper(SelfAttention()).eval()
    with torch.no_grad():
        torch.compile(model, backend="compact", options={"inner": "eager"})(torch.randn(1, 128, 32))
    [site] = compact_compile.report().sites
    assert site["rewritten"] and site["grid_source"] == "plan" and tuple(site["grid"]) == (2, 8, 8)
    assert site["density"] == pytest.approx(Plan.load(path).sites["attn"].density) and site["density"] < 1


def test_nonexistent_plan_path_through_torch_compile():
    model = Wrapper(SelfAttention()).eval()
    compiled = torch.compile(model, backend="compact", options={"plan": "/nonexistent/x.plan.safetensors"})
    with torch.no_grad(), raises_from_backend(OptionsError, "'plan'.*'/nonexistent/x.plan.safetensors'"):
        compiled(torch.randn(1, 128, 32))


# ----------------------------------------------------------------------------------------------
# options next to a plan file


@pytest.mark.parametrize("options, match", [
    ({"block_size": 128}, "'block_size' 128 contradicts the plan's 64"),
    ({"tile": (2, 8, 8), "block_size": 128}, "contradicts the plan's 64"),
    ({"tile": (1, 4, 16), "block_size": 64}, r"'tile' \(1, 4, 16\) contradicts the plan's \(1, 8, 8\)"),
    ({"tile": (1, 4, 8)}, r"'tile' \(1, 4, 8\) contradicts the plan's \(1, 8, 8\)"),
    ({"grid": (2, 8, 9)}, r"'grid' \(2, 8, 9\) contradicts the plan's \(2, 8, 8\)"),
], ids=["block_size", "tile-and-block", "tile", "tile-no-block", "grid"])
def test_options_contradicting_the_plan(tmp_path, options, match):
    path = write_plan(tmp_path / "p.safetensors")
    with pytest.raises(OptionsError, match=match):
        load_plan(CompactOptions.from_dict({"plan": path, **options}))


def test_options_agreeing_with_the_plan(tmp_path):
    """Restating the plan's own layout is fine, the tile included (its block size is the plan's)."""
    path = write_plan(tmp_path / "p.safetensors")
    for options in ({"block_size": 64}, {"tile": (1, 8, 8), "block_size": 64}, {"tile": (1, 8, 8)},
                    {"grid": (2, 8, 8)}):
        plan = load_plan(CompactOptions.from_dict({"plan": path, **options}))
        assert (plan.grid, plan.tile, plan.block_size) == ((2, 8, 8), (1, 8, 8), 64)
    assert load_plan(CompactOptions.from_dict({"plan": "window"})) is None


def test_import_is_quiet_and_does_not_load_torchao():
    """torchao (for the quantize option) is imported only when quantizing: importing the package, its
    backend or its CLI prints nothing and loads no torchao."""
    import subprocess
    import sys

    code = ("import sys, compact_compile, compact_compile.backend, compact_compile.cli, compact_compile.quantize; "
            "print('torchao' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False" and done.stderr == ""


def test_the_fp8_paths_torch_side_loads_no_triton():
    """Triton is loaded where a Triton kernel runs: importing FP8's tiles and their torch quantizer, the
    FP8 linear's op and its graph pass loads none (the kernels' e4m3 helpers live in fp8_triton.py)."""
    import subprocess
    import sys

    code = ("import sys, compact_compile.kernels.fp8, compact_compile.kernels.quant_rows, "
            "compact_compile.passes.fp8_linear; print('triton' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
