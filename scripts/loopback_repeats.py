"""Repeated loopback runs of one compressed all-reduce against bf16 ``exact`` (issue 8's
"TP 2, 1M values, ratio_vs_bf16 <= 1.0" check).

One ``bench-comm`` run swings by 2x on a shared machine, so this runs the same sweep
``--runs`` times in a row and reports every run's ratio (measured within that run), their
median, and the 1-minute load average before each run. Writes JSON + markdown:

    PYTHONPATH=. python3 scripts/loopback_repeats.py --runs 5 --out docs/bench/comm_loopback_1m_repeats
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowbit_tp.bench.comm import run_comm_bench  # noqa: E402
from lowbit_tp.bench.common import environment  # noqa: E402
from lowbit_tp.configs import CommBenchConfig  # noqa: E402
from lowbit_tp.results import markdown_table, write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--codec", default="int4-outlier")
    ap.add_argument("--numel", type=int, default=1 << 20)
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=21, help="timed calls per run (median)")
    ap.add_argument("--out", default="docs/bench/comm_loopback_1m_repeats", help="path without extension")
    a = ap.parse_args()
    cfg = CommBenchConfig(world_sizes=(a.world_size,), codecs=(a.codec,), numels=(a.numel,), algorithms=("gather",),
                          repeats=a.repeats, chunk_bytes=(0,))
    runs = []
    for i in range(a.runs):
        load = os.getloadavg()[0]
        rows = run_comm_bench(cfg, throughput=False)["rows"]
        rows = [r if isinstance(r, dict) else r.to_json() for r in rows]
        base = next(r for r in rows if r["algorithm"] == "exact")
        mine = next(r for r in rows if r["codec"] == a.codec)
        runs.append({"run": i + 1, "load_avg_1min": round(load, 2), "bf16_exact_ms": base["latency_ms"],
                     f"{a.codec}_gather_ms": mine["latency_ms"], "ratio_vs_bf16": mine["ratio_vs_bf16"],
                     "backend": mine.get("backend")})
        print(runs[-1], flush=True)
    med = statistics.median(r["ratio_vs_bf16"] for r in runs)
    cmd = "PYTHONPATH=. python3 scripts/loopback_repeats.py " + " ".join(sys.argv[1:])
    out = {"command": cmd, "config": {k: v for k, v in vars(a).items()}, "environment": environment(),
           "runs": runs, "median_ratio_vs_bf16": med}
    text = (f"# Loopback, TP {a.world_size}, {a.numel} values: {a.codec} over gather vs bf16 exact, {a.runs} runs\n\n"
            f"Command: `{cmd}`\n\nEach run is one `bench-comm` sweep (gloo over loopback, bf16 partials, "
            f"CPU kernels, one message, median of {a.repeats} timed calls; the ratio is against bf16 `exact` "
            f"in the same run). The machine is shared: the 1-minute load average before each run is listed.\n\n"
            + markdown_table(runs, list(runs[0])) + f"\n\nMedian ratio_vs_bf16 over {a.runs} runs: **{med:.3g}**\n")
    write_results(a.out + ".json", out, text)
    print(f"median ratio_vs_bf16 {med:.3g}")


if __name__ == "__main__":
    main()
