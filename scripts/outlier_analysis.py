"""Outlier-channel consistency between calibration and held-out text; writes docs/outliers/.

    python scripts/outlier_analysis.py --model smollm2-135m --tp 3

Calibrates the model twice, on the calibration plays and on the held-out plays, then
reports per layer and rank the overlap of the top-k channel sets and the share of the
range they carry, plus a heatmap of channel ranges across layers.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from lowbit_tp.results import markdown_table
from lowbit_tp.calibration.pipeline import CalibrationConfig, calibrate
from lowbit_tp.evaluation.outliers import consistency, range_heatmap, summarize
from lowbit_tp.models import load_model
from lowbit_tp.results import json_text

# What the registry's models are (the README and the results pages say the same).
BASELINES = {
    "smollm2-135m": "Model: SmolLM2-135M-Instruct from a Q4_1 GGUF, dequantized to fp32.\n\n",
    "gemma3-270m": "Model: Gemma 3 270M from a Q4_K_M GGUF, dequantized to fp32.\n\n",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tp", type=int, default=3)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--out", default="docs/outliers")
    args = ap.parse_args()
    out = Path(args.out)
    bundle = load_model(args.model)
    a = calibrate(CalibrationConfig(model=args.model, tp=args.tp, samples=args.samples, allocate=None), bundle=bundle)
    b = calibrate(CalibrationConfig(model=args.model, tp=args.tp, samples=args.samples, side="evaluation", allocate=None),
                  bundle=bundle)
    rows = consistency(a, b)
    summary = summarize(rows)
    tag = f"{args.model}-tp{args.tp}"
    png = range_heatmap(a, out / f"{tag}-ranges-rank0.png", source=0,
                        title=f"{args.model}, TP {args.tp}, rank 0: log10 channel range per layer")
    range_heatmap(a, out / f"{tag}-ranges-sum.png", source="sum",
                  title=f"{args.model}, TP {args.tp}, reduced sum: log10 channel range per layer")
    out.mkdir(parents=True, exist_ok=True)
    cmd = f"python scripts/outlier_analysis.py --model {args.model} --tp {args.tp} --samples {args.samples}"
    (out / f"{tag}.json").write_text(json_text({"command": cmd, "summary": summary, "rows": rows}, indent=2))
    table = markdown_table(rows, ["layer", "source", "overlap", "range_share_topk", "top_over_median_range"])
    summ = markdown_table([{"layers": k, **v} for k, v in summary.items()],
                          ["layers", "mean_overlap", "median_overlap", "min_overlap", "mean_range_share_topk",
                           "uniform_share"])
    (out / f"{tag}.md").write_text(f"# Outlier channels: {args.model}, TP {args.tp}\n\n{BASELINES.get(args.model, '')}"
                                   f"Command: `{cmd}`\n\n"
                                   f"Heatmap: ![]({png.name})\n\nSummary (k = E/64):\n\n{summ}\n\n"
                                   f"Per layer and source:\n\n{table}\n")
    print(summ)


if __name__ == "__main__":
    main()
