"""How far two calibrations' Fisher channel weights (``calibrate --fisher-weights``) differ, per layer:
the correlation of their logs and the median |log ratio| (a channel's relative change).

    PYTHONPATH=. python scripts/fisher_weights_diff.py A.safetensors B.safetensors [--json OUT]

Used in docs/design-dev.md ("Fisher weights from 16 windows") to ask whether a larger Fisher pass
moved the weights at all.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from lowbit_tp.calibration import Calibration
from lowbit_tp.results import json_text


def compare(a: Calibration, b: Calibration) -> dict:
    if a.layers != b.layers or not a.channel_weights or not b.channel_weights:
        raise SystemExit("error: both calibrations need Fisher channel weights for the same layers")
    layers = {}
    for layer in a.layers:
        x, y = (c.channel_weights[layer].double().flatten().log() for c in (a, b))
        if x.shape != y.shape:
            raise SystemExit(f"error: layer {layer}: {tuple(x.shape)} against {tuple(y.shape)} weights")
        layers[layer] = {"log_corr": torch.corrcoef(torch.stack([x, y]))[0, 1].item(),
                         "median_abs_log_ratio": (x - y).abs().quantile(0.5).item()}  # the mean of the two middle ones
    corr = [v["log_corr"] for v in layers.values()]
    change = [v["median_abs_log_ratio"] for v in layers.values()]
    return {"median_log_corr": statistics.median(corr), "min_log_corr": min(corr),
            "median_abs_log_ratio": statistics.median(change), "max_layer_abs_log_ratio": max(change),
            "layers": layers}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    out = compare(Calibration.load(args.a), Calibration.load(args.b))
    print(f"log-weight correlation per layer: median {out['median_log_corr']:.3f}, lowest {out['min_log_corr']:.3f}; "
          f"median |log ratio|: median layer {out['median_abs_log_ratio']:.3f}, largest {out['max_layer_abs_log_ratio']:.3f}")
    if args.json:
        args.json.write_text(json_text({"a": str(args.a), "b": str(args.b), **out}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
