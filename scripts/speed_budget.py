"""Time the two budgets of the calibration/evaluation issue on this machine.

    python scripts/speed_budget.py

1. calibrate SmolLM2-135M at TP 3 on 64 sequences of 256 tokens (budget: 3 minutes),
   without and with the per-layer allocation that the default codec needs;
2. one evaluation of 32 x 256 tokens per codec (budget: 1 minute per codec).
Writes docs/bench/speed_budget.json and .md.
"""
from __future__ import annotations

import time

from lowbit_tp.bench.common import environment
from lowbit_tp.results import markdown_table, write_results
from lowbit_tp.calibration.pipeline import CalibrationConfig, calibrate
from lowbit_tp.evaluation import EvalConfig, evaluate_codecs
from lowbit_tp.models import load_model


def main() -> None:
    t0 = time.perf_counter()
    bundle = load_model("smollm2-135m")
    rows = [{"step": "load smollm2-135m", "seconds": time.perf_counter() - t0, "budget_s": None}]
    t0 = time.perf_counter()
    calibrate(CalibrationConfig(tp=3, samples=64, seq_len=256, allocate=None), bundle=bundle, progress=False)
    rows.append({"step": "calibrate TP 3, 64 x 256, statistics only", "seconds": time.perf_counter() - t0,
                 "budget_s": 180})
    t0 = time.perf_counter()
    cal = calibrate(CalibrationConfig(tp=3, samples=64, seq_len=256), bundle=bundle, progress=False)
    rows.append({"step": "calibrate TP 3, 64 x 256, with the default's bit allocation",
                 "seconds": time.perf_counter() - t0, "budget_s": 180})
    t0 = time.perf_counter()
    evaluate_codecs(EvalConfig(tp=3, codecs=(), samples=32, seq_len=256, lambada=0), bundle=bundle,
                    calibration=cal, progress=False)
    base = time.perf_counter() - t0
    rows.append({"step": "evaluate 32 x 256: baseline forward only", "seconds": base, "budget_s": None})
    for codec in ("int4-outlier", "default"):
        t0 = time.perf_counter()
        evaluate_codecs(EvalConfig(tp=3, codecs=(codec,), samples=32, seq_len=256, lambada=0), bundle=bundle,
                        calibration=cal, progress=False)
        rows.append({"step": f"evaluate 32 x 256 with {codec} (baseline + codec)",
                     "seconds": time.perf_counter() - t0, "budget_s": 60})
    for r in rows:
        r["within_budget"] = None if r["budget_s"] is None else r["seconds"] <= r["budget_s"]
    table = markdown_table(rows, ["step", "seconds", "budget_s", "within_budget"])
    write_results("docs/bench/speed_budget.json", {"environment": environment(), "rows": rows,
                                                   "command": "python scripts/speed_budget.py"}, table)
    print(table)


if __name__ == "__main__":
    main()
