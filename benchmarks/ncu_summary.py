"""What bounds a kernel, from Nsight Compute's exports of one `ncu_kernels.py` run: per kernel the
pipes' utilization, the issue rate, the warp stall reasons per issued instruction, and, over the SASS
of its main loop (the instructions executed most often), the instruction mix per iteration and where
the warps' stall samples fall, by opcode.

    ncu --set full -o rep … python benchmarks/ncu_kernels.py [--fp8]
    ncu -i rep.ncu-rep --page raw --csv > raw.csv
    ncu -i rep.ncu-rep --page source --csv --print-source sass > sass.csv
    python benchmarks/ncu_summary.py raw.csv sass.csv > summary.json
"""
import collections
import csv
import json
import sys

PIPES = {"tensor": "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active",
         "xu (exp2, conversions)": "sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active",
         "fma": "sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active",
         "alu": "sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active",
         "lsu": "sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active",
         "issue slots": "smsp__issue_active.avg.pct_of_peak_sustained_active"}
STALL = "smsp__average_warps_issue_stalled_"
SCALE = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6, "Hz": 1e-9, "Khz": 1e-6, "Mhz": 1e-3, "Ghz": 1.0}  # → µs, GHz


def number(text: str) -> float:
    return float(text.replace(",", ""))


def counters(raw_csv: str) -> dict:
    """{kernel name: its pipes, clocks and stall reasons}, from `--page raw --csv` (one row a kernel)."""
    rows = list(csv.reader(open(raw_csv)))
    out = {}
    units = dict(zip(rows[0], rows[1]))
    for row in rows[2:]:      # the header, then a row of units
        m = dict(zip(rows[0], row))

        def scaled(key):
            return number(m[key]) * SCALE[units[key]]

        stalls = {k[len(STALL):].removesuffix("_per_issue_active.ratio"): number(v) for k, v in m.items()
                  if k.startswith(STALL) and k.endswith("_per_issue_active.ratio") and number(v) >= 0.01}
        out[m["Kernel Name"]] = dict(
            duration_us=scaled("gpu__time_duration.sum"), sm_ghz=scaled("smsp__cycles_elapsed.avg.per_second"),
            active_cycles=number(m["sm__cycles_active.avg"]),
            pipes_pct={name: round(number(m[key]), 1) for name, key in PIPES.items()},
            stalls_per_issue=dict(sorted(stalls.items(), key=lambda kv: -kv[1])))
    return out


def main_loops(sass_csv: str) -> dict:
    """{kernel name: its main loop's instruction mix and stall samples by opcode}, from `--page source`."""
    loops, kernel, header = {}, None, None
    per_kernel = collections.defaultdict(list)
    for row in csv.reader(open(sass_csv)):
        if row and row[0] == "Kernel Name":
            kernel = row[1]
        elif row and row[0] == "Address":
            header = row
        elif row and header:
            per_kernel[kernel].append(dict(zip(header, row)))
    for kernel, rows in per_kernel.items():
        executed = collections.Counter(int(number(r["Instructions Executed"] or "0")) for r in rows)
        # the loop body: the execution count that most of the executed instructions share
        body = max(executed, key=lambda count: count * executed[count])
        stall_cols = [c for c in rows[0] if c.startswith("stall_") and "Not Issued" not in c]
        mix, samples = collections.Counter(), collections.defaultdict(collections.Counter)
        for r in rows:
            if int(number(r["Instructions Executed"] or "0")) != body:
                continue
            opcode = next(w for w in r["Source"].split() if not w.startswith("@")).split(".")[0]
            mix[opcode] += 1
            for c in stall_cols:
                samples[opcode][c[len("stall_"):]] += int(number(r[c] or "0"))
        total = sum(sum(c.values()) for c in samples.values())
        loops[kernel] = dict(
            executions_per_instruction=body, instructions_per_iteration=sum(mix.values()), mix=dict(mix.most_common()),
            reasons_pct={k: round(100 * v / total, 1) for k, v in
                         sum(samples.values(), collections.Counter()).most_common(10)},
            by_opcode_pct={op: dict(share=round(100 * sum(c.values()) / total, 1),
                                    reasons={k: round(100 * v / sum(c.values())) for k, v in c.most_common(3)})
                           for op, c in sorted(samples.items(), key=lambda kv: -sum(kv[1].values()))[:12]
                           if sum(c.values())})
    return loops


def main():
    raw_csv, sass_csv = sys.argv[1:3]
    loops = main_loops(sass_csv)
    summary = {name: dict(stats, main_loop=loops.get(name)) for name, stats in counters(raw_csv).items()}
    json.dump(summary, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
