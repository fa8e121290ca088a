"""benchmarks/e2e_multigpu.py end to end on two CPU processes (gloo), as a user runs it: diffusers'
own context parallelism (`enable_parallelism`, Ulysses 2) on a tiny Wan, a plan calibrated in the
run (per layer, per head), the whole model compiled, the heads balanced. Each rank runs its rows of
every layer's plan, and the parallel output equals one process's (fp32: exactly). Run as two calls,
one phase each (--state), which also covers the one-call form's code."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path, *args, ok=True):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(ROOT / "benchmarks" / "e2e_multigpu.py"), "--smoke", "--model", "wan14b", "--variants", "perhead",
           "--reps", "1", "--state", str(tmp_path / "state"), *args]
    # the smoke run is CPU and gloo: on a GPU machine diffusers would place each rank on a GPU of its own
    run = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OUT": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""},
                         capture_output=True, text=True, timeout=600)
    assert (run.returncode == 0) == ok, run.stderr[-3000:]
    return run


def test_a_calibrated_per_layer_plan_runs_under_diffusers_ulysses(tmp_path):
    """In two runs, as on a GPU where each call has 10 minutes: the first calibrates and runs one GPU,
    the second runs Ulysses 2 against the first one's saved plan and outputs."""
    _run(tmp_path, "--calibrate", "0.3", "--phases", "1gpu")
    other = _run(tmp_path, "--phases", "parallel", "--steps", "2", ok=False)     # not the first call's run
    assert "its 1gpu phase ran with" in other.stderr and "'steps': 0" in other.stderr
    _run(tmp_path, "--phases", "parallel")
    result = json.loads((tmp_path / "e2e-multigpu-smoke-wan14b-calibrated-ulysses2.json").read_text())
    assert result["1gpu_phase"].startswith("an earlier call")
    plan = result["per_head_plan"]
    assert plan["calibration"]["density"] == 0.3 and plan["head_permutations"]
    one, two = result["results"]["1gpu"]["compact-perhead"], result["results"]["ulysses2"]["compact-perhead"]
    for phase in (one, two):
        video = [s for s in phase["attention_sites"] if s["kind"] == "video self-attention"]
        assert video == [dict(kind="video self-attention", rewritten=True, kernel_or_reason=video[0]["kernel_or_reason"],
                              sites=2)]                                   # both layers' sites, sparse
    assert two["model_heads"] == [[0, 1], [2, 3]]
    assert two["rel_diff_vs_1gpu"] == [0.0, 0.0]
    assert 0.0 < two["density"] < 1.0
