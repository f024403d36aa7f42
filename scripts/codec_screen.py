"""Screen codec variants by predicted KL: one forward pass, no per-codec evaluation.

For every variant (a registered name plus option overrides), the squared error of its
gather all-reduce at every layer on the exact model's partials (probe windows of the
calibration side, as ``calibrate``'s allocation probe draws them); the predicted KL is
``sum over layers of sensitivity[L] * mse[L][variant] / mse[L][reference]`` with the
per-layer KL of the reference codec from an ``alloc_study.py`` ``measure.json`` (or the
calibration's own plan). A ranking to choose what to evaluate, not a result.

    PYTHONPATH=. python scripts/codec_screen.py --model smollm2-135m --tp 3 \\
        --calibration CAL.safetensors --measure OUT/measure.json --out OUT/screen.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from lowbit_tp.results import json_text, nan_for_null

# label: (registered codec, option overrides)
VARIANTS = {
    "rot-lm4-g64-lg8-k4": ("rot-lm4-g64-lg8-k4", {}),
    "rot-lm4-g64-lg8-k0": ("rot-lm4-g64-lg8-k4", {"k": 0}),
    "rot-lm4-g64-lg8-k2": ("rot-lm4-g64-lg8-k4", {"k": 2}),
    "rot-lm4-g64-lg8-k9": ("rot-lm4-g64-lg8-k4", {"k": 9}),
    "rot-lm4-g64-lg8-k16": ("rot-lm4-g64-lg8-k4", {"k": 16}),
    "rot-lm4-g128-lg8-k4": ("rot-lm4-g64-lg8-k4", {"group": 128}),
    "rot-lm4-g32-lg8-k4": ("rot-lm4-g32-lg8-k4", {}),
    "rot-int4-g64-lg8-k4": ("rot-lm4-g64-lg8-k4", {"levels": "int"}),
    "rot-lm3-g64-lg8-k4": ("rot-lm3-g64-lg8-k4", {}),
    "rot-lm3-g32-lg8-k4": ("rot-lm3-g32-lg8-k4", {}),
    "rot-int5-g64-lg8-k4": ("rot-int5-g64-lg8-k4", {}),
    "rot-int5-g128-lg8-k4": ("rot-int5-g64-lg8-k4", {"group": 128}),
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--tp", type=int, required=True)
    ap.add_argument("--calibration", required=True)
    ap.add_argument("--measure", required=True, help="alloc_study.py's measure.json (sensitivity, reference, probe)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import torch

    from lowbit_tp.calibration import Calibration
    from lowbit_tp.codecs import make_codec
    from lowbit_tp.collectives import simulate_all_reduce
    from lowbit_tp.data import chunk_tokens, load_split
    from lowbit_tp.models import load_model
    from lowbit_tp.simulator import TPSimulator

    m = nan_for_null(json.loads(Path(args.measure).read_text()))  # a non-finite error was written as null
    cal = Calibration.load(args.calibration)
    model, tokenizer, info = load_model(args.model)
    split = load_split(cal.meta.get("config", {}).get("text"))
    pm = m["probe"]
    probe = chunk_tokens(tokenizer, split.calibration, num_samples=pm["num_samples"], seq_len=pm["seq_len"],
                         seed=pm["seed"])
    if probe.manifest()["samples"] != pm["samples"]:
        raise SystemExit("probe windows differ from measure.json's")
    codecs = {lab: make_codec(n, calibration=cal, **o) for lab, (n, o) in VARIANTS.items()}
    sq = {}
    cnt = {}

    def observe(layer, partials, total):
        row = sq.setdefault(layer, dict.fromkeys(codecs, 0.0))
        for lab, c in codecs.items():
            y = simulate_all_reduce(list(partials), c, "gather", layer=layer)
            row[lab] += float((y.float() - total.float()).pow(2).sum())
        cnt[layer] = cnt.get(layer, 0) + total.numel()

    with torch.no_grad(), TPSimulator(model, tp=args.tp, observer=observe, name=info.name):
        model(probe.input_ids)
    ref = m["reference"]
    sens = m["sensitivity_kl"]
    shape = (256, cal.hidden_size)
    rows = []
    for lab, c in codecs.items():
        pred = sum(sens[l] * sq[l][lab] / sq[l][ref] for l in sens)
        rows.append({"variant": lab, "bits_per_value": round(c.bits_per_value(shape), 4),
                     "predicted_kl": round(pred, 5),
                     "mse_vs_reference": round(sum(sq[l][lab] for l in sq) / sum(sq[l][ref] for l in sq), 4)})
    rows.sort(key=lambda r: r["bits_per_value"])
    for r in rows:
        print(r)
    Path(args.out).write_text(json_text({"reference": ref, "probe": pm, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
