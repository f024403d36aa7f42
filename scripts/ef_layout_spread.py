"""How much error feedback's quality moves when only the batch layout changes (the simulator).

SmolLM2-135M (Q4_1 GGUF dequantized to fp32 by transformers), TP 3, ``int4-outlier`` on every
message, two-shot, the calibration and the 8 held-out windows of 128 tokens that
tests/test_vllm_engine.py uses. For each layout (how the 8 windows are split into batches: the
four of that test's ``EF_LAYOUTS``, then ``--random`` random splits of a shuffled order), the
per-window prompt NLL change (nats/token) against the uncompressed model run in the same
layout, without and with error feedback. Without feedback the changes are the same bits in
every layout (on this CPU the model's rows do not depend on their batch); with it they are
not: two-shot cuts a pass's rows into N chunks, so the rank that owns a row's second-stage
error, and feeds it back into its next partial, depends on the row count, and another owner
rounds differently. The spread across layouts is what a comparison between engines (vLLM
against the simulator) has to allow.

A third column feeds back only each rank's own first-stage errors (``error_feedback=
"first-stage"``: the owners keep their second-stage errors out of the carries), which are
row-local: its changes must be the same bits in every layout, and the column says what that
costs against full feedback.

    PYTHONPATH=. python scripts/ef_layout_spread.py --out docs/bench/ef_layout_spread.json

Writes the JSON and a markdown table next to it (``.md``).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path
from lowbit_tp.results import json_text

FIXED = ([list(range(8))], [[i] for i in range(8)], [[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 4], [1, 5], [2, 6], [3, 7]])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--random", type=int, default=8, help="random layouts after the four fixed ones")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    from lowbit_tp.codecs import make_codec
    from lowbit_tp.data import chunk_tokens, load_split
    from lowbit_tp.demo import cached_calibration
    from lowbit_tp.models import load_model
    from lowbit_tp.simulator import TPSimulator

    bundle = load_model("smollm2-135m", progress=False)
    model, tokenizer, _ = bundle
    cal, _ = cached_calibration(bundle, tp=3, samples=32)
    ids = chunk_tokens(tokenizer, load_split(None).evaluation, num_samples=8, seq_len=128, seed=1).input_ids

    def nll(codec, ef, groups):
        out = [0.0] * len(ids)
        for group in groups:
            built = None if codec is None else make_codec(codec, calibration=cal)
            x = ids[group]
            with torch.no_grad(), TPSimulator(model, tp=3, codec=built, algorithm="two-shot", error_feedback=ef):
                logits = model(x).logits.float()
            lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, x[:, 1:, None])[..., 0]
            for i, v in zip(group, (-lp.mean(1)).tolist()):
                out[i] = v
        return out

    rng = random.Random(args.seed)
    layouts = [list(g) for g in FIXED]
    for _ in range(args.random):
        order = list(range(8))
        rng.shuffle(order)
        cut = rng.choice(range(1, 9))
        layouts.append([order[:cut], order[cut:]] if cut < 8 else [order])
    rows = []
    for groups in layouts:
        exact = nll(None, False, groups)
        plain = [c - b for c, b in zip(nll("int4-outlier", False, groups), exact)]
        ef = [c - b for c, b in zip(nll("int4-outlier", True, groups), exact)]
        first = [c - b for c, b in zip(nll("int4-outlier", "first-stage", groups), exact)]
        rows.append({"layout": groups, "exact": statistics.fmean(exact), "plain": statistics.fmean(plain),
                     "ef": statistics.fmean(ef), "first": statistics.fmean(first), "plain_per_window": plain,
                     "ef_per_window": ef, "first_per_window": first})
        print(groups, f"plain {rows[-1]['plain']:+.5f} ef {rows[-1]['ef']:+.5f} first-stage {rows[-1]['first']:+.5f}",
              flush=True)
    summary = {k: {"min": min(r[k] for r in rows), "max": max(r[k] for r in rows),
                   "sd_of_means": statistics.stdev(r[k] for r in rows),
                   "max_window_range": max(max(w) - min(w) for w in zip(*(r[f"{k}_per_window"] for r in rows)))}
               for k in ("plain", "ef", "first")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python scripts/ef_layout_spread.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out.write_text(json_text({"command": command, "model": "smollm2-135m (Q4_1 GGUF dequantized to fp32)",
                               "tp": 3, "codec": "int4-outlier", "algorithm": "two-shot", "rows": rows,
                               "summary": summary}, indent=1) + "\n")
    lines = [f"Command: `{command}`; SmolLM2-135M (Q4_1 GGUF dequantized to fp32), TP 3, int4-outlier, "
             "two-shot, 8 held-out windows of 128 tokens. NLL change (nats/token) against the uncompressed "
             "model in the same layout; first-stage: `error_feedback=\"first-stage\"` (no owner errors).", "",
             "| layout | uncompressed NLL | change, no feedback | change, feedback | change, first-stage feedback |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['layout']} | {r['exact']:.5f} | {r['plain']:+.5f} | {r['ef']:+.5f} | {r['first']:+.5f} |"
              for r in rows]
    lines += ["", "| | min | max | sd of the layouts' means | largest range of one window |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['min']:+.5f} | {v['max']:+.5f} | {v['sd_of_means']:.5f} | {v['max_window_range']:.5f} |"
              for k, v in summary.items()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
