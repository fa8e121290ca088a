"""benchmarks/ncu_summary.py on small exports in Nsight Compute's CSV forms: units are read from the
units row, and the main loop is the code where most instructions were executed, not the code that
most instruction addresses share."""
import csv
import json

from benchmarks.ncu_summary import counters, main_loops

RAW = {"Kernel Name": ("", "attn"), "gpu__time_duration.sum": ("ms", "0.783"),
       "smsp__cycles_elapsed.avg.per_second": ("Ghz", "1.78"), "sm__cycles_active.avg": ("cycle", "1,365,276"),
       "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active": ("%", "42.6"),
       "sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active": ("%", "43.9"),
       "sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active": ("%", "18.5"),
       "sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active": ("%", "22.4"),
       "sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active": ("%", "14.8"),
       "smsp__issue_active.avg.pct_of_peak_sustained_active": ("%", "48.5"),
       "smsp__average_warps_issue_stalled_wait_per_issue_active.ratio": ("", "1.02"),
       "smsp__average_warps_issue_stalled_gmma_per_issue_active.ratio": ("", "0.001")}
# (source, executions, wait samples, mio samples): two loop instructions run 1,000 times; three
# prologue instructions run 10 times
SASS = [("S2R R1, SR_TID.X", 10, 5, 0), ("LDC R2, c[0x0][0x28]", 10, 1, 0), ("@P0 BRA 0x10", 10, 0, 0),
        ("MUFU.EX2 R3, R3", 1000, 30, 50), ("FMNMX R4, R3, R4, !PT", 1000, 20, 0)]


def test_counters_and_main_loop(tmp_path):
    raw, sass = tmp_path / "raw.csv", tmp_path / "sass.csv"
    with open(raw, "w", newline="") as f:
        w = csv.writer(f)
        w.writerows([list(RAW), [u for u, _ in RAW.values()], [v for _, v in RAW.values()]])
    with open(sass, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Kernel Name", "attn"])
        w.writerow(["Address", "Source", "Instructions Executed", "stall_wait", "stall_mio", "stall_mio (Not Issued)"])
        w.writerows([f"0x{i:x}", src, n, wait, mio, 0] for i, (src, n, wait, mio) in enumerate(SASS))
    [(name, stats)] = counters(str(raw)).items()
    assert name == "attn" and stats["duration_us"] == 783.0 and stats["sm_ghz"] == 1.78
    assert stats["active_cycles"] == 1365276 and stats["pipes_pct"]["tensor"] == 42.6
    assert stats["stalls_per_issue"] == {"wait": 1.02}          # reasons under 0.01 left out
    loop = main_loops(str(sass))["attn"]
    assert loop["executions_per_instruction"] == 1000 and loop["mix"] == {"MUFU": 1, "FMNMX": 1}
    assert loop["reasons_pct"] == {"mio": 50.0, "wait": 50.0}
    assert loop["by_opcode_pct"]["MUFU"]["share"] == 80.0
    json.dumps(loop)
