"""The `compact-compile` command line: calibrate a tiny random Wan model, search saved statistics
again, inspect and plot the plans, and report unusable files."""
import importlib
import json
import re
import subprocess
import sys

import matplotlib.image
import pytest
import torch

from compact_compile.cli import main
from compact_compile.plan import Plan

MODEL = ["--layers", "1", "--heads", "2", "--latent", "4,32,32", "--steps", "3", "--dense-steps", "1",
         "--inputs", "2", "--inner", "eager", "--tile", "1,8,8"]


@pytest.fixture(autouse=True)
def fresh_clock():
    from compact_compile.schedule import CLOCK

    CLOCK.reset()
    yield
    CLOCK.reset()


def test_calibrate_inspect_plot(tmp_path, capsys):
    plan_path, stats_path = tmp_path / "tiny.plan.safetensors", tmp_path / "tiny.stats.safetensors"
    assert main(["calibrate", *MODEL, "--cost", "inf", "--out", str(plan_path), "--save-stats", str(stats_path)]) == 0
    assert "wrote" in capsys.readouterr().out
    plan = Plan.load(plan_path)
    assert list(plan.sites) == ["blocks.0.attn1"]
    cal = plan.info["calibration"]
    assert cal["inputs"]["generations"] == 2 and cal["inputs"]["calls"] == 8     # 2 inputs × 2 steps × CFG
    assert plan.info["schedule"]["dense_steps"] == 1 and min(plan.info["heads"]["blocks.0.attn1"]["recall"]) >= 0.9

    # the saved statistics searched again, with a stricter τ: denser masks that keep it
    strict_path = tmp_path / "strict.plan.safetensors"
    assert main(["calibrate", "--stats", str(stats_path), "--recall", "0.97", "--cost", "inf",
                 "--out", str(strict_path)]) == 0
    strict = Plan.load(strict_path)
    assert min(strict.info["heads"]["blocks.0.attn1"]["recall"]) >= 0.97
    assert strict.info["schedule"]["dense_steps"] == 1
    assert strict.sites["blocks.0.attn1"].density >= plan.sites["blocks.0.attn1"].density
    # and at a density budget: λ found for it, at most that share of the blocks
    tenth_path = tmp_path / "budget.plan.safetensors"
    assert main(["calibrate", "--stats", str(stats_path), "--density", "0.4", "--out", str(tenth_path)]) == 0
    budget = Plan.load(tenth_path)
    assert budget.sites["blocks.0.attn1"].density <= 0.4 and budget.info["calibration"]["density"] == 0.4

    capsys.readouterr()
    assert main(["inspect", str(plan_path)]) == 0
    out = capsys.readouterr().out
    assert "grid (4, 16, 16)  tile (1, 8, 8)  block size 64" in out
    assert "schedule: dense for steps < 1" in out and "2 generations, 8 calls" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("blocks.0.attn1")]
    assert [r[1] for r in rows] == ["0", "1"]
    for r, rec, dens in zip(rows, plan.info["heads"]["blocks.0.attn1"]["recall"],
                            plan.sites["blocks.0.attn1"].blocks.float().mean((-1, -2)).tolist()):
        assert float(r[2]) == pytest.approx(dens, abs=1e-3) and float(r[3]) == pytest.approx(rec, abs=1e-4)
        assert r[4] in ("local", "cross", "global", "temporal", "mixed")

    plots = tmp_path / "plots"
    assert main(["plot", str(plan_path), "--out", str(plots)]) == 0
    names = sorted(p.name for p in plots.iterdir())
    assert names == ["curves_blocks.0.attn1.png", "masks_blocks.0.attn1.png", "overview.png",
                     "patterns_blocks.0.attn1.png"]
    for p in plots.iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = matplotlib.image.imread(p)
        assert img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0.01   # a picture, not a blank


def test_unusable_files_are_reported(tmp_path, capsys):
    bad = tmp_path / "bad.plan.safetensors"
    bad.write_bytes(b"not a plan at all")
    assert main(["inspect", str(bad)]) == 2
    assert re.search(r"compact-compile inspect: error: .*not a readable compact_compile plan", capsys.readouterr().err)
    assert main(["calibrate", "--stats", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "not a readable compact_compile statistics file" in capsys.readouterr().err


def test_module_entry_point_help():
    done = subprocess.run([sys.executable, "-m", "compact_compile.cli", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and all(c in done.stdout for c in ("calibrate", "inspect", "plot"))


# ----------------------------------------------------------------------------------------------
# every argument is checked before any work: exit code 2, one line, the model never built

@pytest.fixture
def no_work(monkeypatch):
    """Any model build, statistics read or search is a failure: bad arguments must stop before."""
    from compact_compile import cli

    calibrate_pkg = importlib.import_module("compact_compile.calibrate")   # the attribute is the function

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(cli, "_build_model", forbidden)
    monkeypatch.setattr(calibrate_pkg, "load_stats", forbidden)
    monkeypatch.setattr(calibrate_pkg, "build_plan", forbidden)


def rejected(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert len(err.strip().splitlines()) == 1, err          # one line, no usage block, no traceback
    return err


@pytest.fixture
def stats_file(tmp_path):
    path = tmp_path / "run.stats.safetensors"
    path.write_bytes(b"only needs to exist for the argument checks")
    return str(path)


@pytest.fixture
def model_dir(tmp_path):
    """A tiny diffusers model saved with save_pretrained, as a real checkpoint directory is."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                  out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=1,
                                  qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
    model.save_pretrained(tmp_path / "wan")
    return tmp_path / "wan"


BAD_CALIBRATE = [
    (["--out", "/nonexistent/x.plan.safetensors"], "directory '/nonexistent' does not exist"),
    (["--out", "{tmp}"], "is a directory"),
    (["--tile", "2,2,2"], "--tile 2,2,2 holds 8 tokens; it must hold --block-size 64"),
    (["--tile", "1,8"], "argument --tile: '1,8' is not three positive integers"),
    (["--tile", "1,x,8"], "argument --tile"),
    (["--tile", "0,8,8"], "argument --tile"),
    (["--recall", "1.5"], r"argument --recall: '1.5' is not a recall in \(0, 1\]"),
    (["--recall", "0"], "argument --recall"),
    (["--recall", "high"], "argument --recall"),
    (["--cost", "0"], "argument --cost: '0' is not a cost > 0"),
    (["--cost", "-1"], "argument --cost"),
    (["--cost", "nan"], "argument --cost"),
    (["--steps", "0"], "argument --steps: '0' is not an integer ≥ 1"),
    (["--steps", "10"], "--dense-steps 15 \\(the default\\) leaves none of the 10 --steps to record"),
    (["--steps", "3", "--dense-steps", "3"], "--dense-steps 3 leaves none of the 3 --steps"),
    (["--dense-steps", "-1"], "argument --dense-steps"),
    (["--dense-layers", "-2"], "argument --dense-layers"),
    (["--layers", "0"], "argument --layers"),
    (["--heads", "two"], "argument --heads"),
    (["--inputs", "0"], "argument --inputs"),
    (["--groups", "0,3,1"], "--groups 0,3,1: edges must be increasing and ≥ 0"),
    (["--groups", "a"], "argument --groups"),
    (["--latent", "8,31,32"], "--latent 8,31,32 is not divisible by the patch size 1,2,2"),
    (["--block-size", "96"], "argument --block-size: invalid choice"),
    (["--save-stats", "/nonexistent/s.safetensors"], "--save-stats .*directory '/nonexistent' does not exist"),
    (["--device", "gpu0"], "--device 'gpu0' is not a torch device"),
    (["--device", "cuda:99"], "--device cuda:99: this machine has [0-9]+ CUDA devices"),
    (["--model-dir", "/nonexistent/model"], "holds no config.json"),
    (["--model-dir", "{model}", "--heads", "4"], "--heads shapes the random model; with --model-dir the model's"),
    (["--stats", "/nonexistent/run.stats.safetensors"], "--stats '/nonexistent/run.stats.safetensors' does not exist"),
    (["--stats", "{stats}", "--save-stats", "{tmp}/s.safetensors"], "--save-stats and --model-dir belong to a model"),
    (["--stats", "{stats}", "--recall", "2"], "argument --recall"),
]


@pytest.mark.parametrize("extra, match", BAD_CALIBRATE, ids=[" ".join(a) for a, _ in BAD_CALIBRATE])
def test_bad_calibrate_argument(tmp_path, stats_file, model_dir, no_work, capsys, extra, match):
    extra = [a.format(tmp=tmp_path, stats=stats_file, model=model_dir) for a in extra]
    argv = ["calibrate", *(["--out", str(tmp_path / "p.plan.safetensors")] if "--out" not in extra else []), *extra]
    err = rejected(argv, capsys)
    assert err.startswith("compact-compile calibrate: error: ")
    assert re.search(match, err), err
    assert not (tmp_path / "p.plan.safetensors").exists()


def test_model_dir_whose_class_is_not_a_wan_like_model(tmp_path, no_work, capsys):
    folder = tmp_path / "vae"
    folder.mkdir()
    for name, match in (("NoSuchModel", "'NoSuchModel' .* is not a diffusers model class"),
                        ("AutoencoderKL", "AutoencoderKL is not called like Wan")):
        (folder / "config.json").write_text(json.dumps({"_class_name": name, "in_channels": 3}))
        assert re.search(match, rejected(["calibrate", "--model-dir", str(folder), "--out", str(tmp_path / "p")],
                                         capsys))
    (folder / "config.json").write_text("{not json")
    assert "is not a diffusers config" in rejected(["calibrate", "--model-dir", str(folder), "--out", "p"], capsys)


@pytest.mark.parametrize("argv, match", [
    (["inspect", "/nonexistent/p.plan.safetensors"], "plan file '/nonexistent/p.plan.safetensors' does not exist"),
    (["inspect", "{plan}", "--sites", "0"], "argument --sites"),
    (["plot", "/nonexistent/p.plan.safetensors", "--out", "{tmp}/plots"], "does not exist"),
    (["plot", "{plan}", "--out", "{plan}/plots"], "cannot create the directory"),
    (["plot", "{plan}", "--out", "{tmp}/plots", "--sites", "-1"], "argument --sites"),
    (["calibrat", "--out", "x"], "invalid choice: 'calibrat'"),
], ids=["inspect-missing", "inspect-sites", "plot-missing", "plot-out-under-a-file", "plot-sites", "command"])
def test_bad_inspect_and_plot_arguments(tmp_path, capsys, argv, match):
    plan = tmp_path / "p.plan.safetensors"
    plan.write_bytes(b"exists")
    err = rejected([a.format(tmp=tmp_path, plan=plan) for a in argv], capsys)
    assert re.search(match, err), err


def test_help_has_examples():
    for command in ([], ["calibrate"], ["inspect"], ["plot"]):
        done = subprocess.run([sys.executable, "-m", "compact_compile.cli", *command, "--help"], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0 and "examples:" in done.stdout and "compact-compile inspect" in done.stdout


def test_calibrate_a_saved_model_directory(tmp_path, model_dir, capsys):
    """--model-dir: the class comes from config.json, the weights from the directory."""
    out = tmp_path / "dir.plan.safetensors"
    assert main(["calibrate", "--model-dir", str(model_dir), "--latent", "4,32,32", "--steps", "3", "--dense-steps",
                 "1", "--inner", "eager", "--tile", "1,8,8", "--cost", "inf", "--out", str(out)]) == 0
    plan = Plan.load(out)
    assert list(plan.sites) == ["blocks.0.attn1"] and plan.sites["blocks.0.attn1"].heads == 2
    assert plan.grid == (4, 16, 16) and plan.info["calibration"]["inputs"]["calls"] == 4   # 2 steps × CFG


def test_cost_and_density_together_are_refused_before_any_model_runs(tmp_path, capsys, monkeypatch):
    """--density sets λ itself: giving --cost too is one error, before the model is built."""
    import compact_compile.cli as cli

    monkeypatch.setattr(cli, "_run_model", lambda args: pytest.fail("the model must not run"))
    with pytest.raises(SystemExit) as e:
        cli.main(["calibrate", "--out", str(tmp_path / "p.plan.safetensors"), "--density", "0.1", "--cost", "0.05"])
    assert e.value.code == 2 and "give one" in capsys.readouterr().err
