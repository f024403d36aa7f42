"""``lowbit-tp calibrate`` and ``lowbit-tp eval``."""
from __future__ import annotations

import json
import sys

from lowbit_tp.argtypes import nonneg_int, positive_float, positive_int, unit_interval


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="record channel statistics of a model's communicated partials")
    p.add_argument("--model", default="smollm2-135m", help="registry name, local HF checkpoint dir, or .gguf file")
    p.add_argument("--tp", type=positive_int, required=True)
    p.add_argument("--out", required=True, help="the .safetensors artifact to write")
    p.add_argument("--samples", type=positive_int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ema-decay", type=unit_interval, default=0.9)
    p.add_argument("--k", type=nonneg_int, help="bf16 (kept) channels for int4-outlier, int4-random-k and rot-* "
                   "codecs without -kN, stored in the calibration (default hidden/64)")
    p.add_argument("--text", help="calibration text: a file or a directory of UTF-8 text files (default: Shakespeare)")
    p.add_argument("--text-glob", default="*", help="files of a --text directory to read (default '*'; e.g. '**/*.md')")
    p.add_argument("--allocate", type=float, metavar="BITS", default=4.5,
                   help="measure per-layer sensitivity and store a bit allocation with this mean bits/value budget, "
                        "used by --codec alloc (= default); 0 skips it (default 4.5)")
    p.add_argument("--alloc-low", default="rot-lm4-g64-lg8-k4", help="codec for most layers")
    p.add_argument("--alloc-high", default="rot-int6-g64-lg8-k4", help="codec for the most sensitive layers")
    p.add_argument("--alloc-codecs", default="", metavar="A,B,...",
                   help="candidate codecs, comma-separated: allocate one per layer by predicted KL (the KL of "
                        "--alloc-low scaled by each codec's measured error at that layer) instead of low/high")
    p.add_argument("--alloc-samples", type=positive_int, default=2, help="probe windows (128 tokens) for the "
                   "per-layer sensitivity (default 2)")
    p.set_defaults(func=_calibrate)

    e = sub.add_parser("eval", help="perplexity, KL, top-1 and last-word accuracy of codecs via the TP simulator "
                                    "or the multi-process TP runtime")
    e.add_argument("--model", default="smollm2-135m")
    e.add_argument("--tp", type=positive_int, required=True)
    e.add_argument("--codec", action="append", required=True, help="repeatable")
    e.add_argument("--algorithm", default="gather", choices=["gather", "two-shot", "auto"],
                   help="collective (default gather, the one default of every API)")
    e.add_argument("--calibration", help="artifact from `lowbit-tp calibrate` (static codecs need it)")
    e.add_argument("--samples", type=positive_int, default=32)
    e.add_argument("--seq-len", type=int, default=256)
    e.add_argument("--batch-size", type=positive_int, default=8)
    e.add_argument("--lambada", type=nonneg_int, default=128, help="last-word items (0 to skip)")
    e.add_argument("--seed", type=int, default=1)
    e.add_argument("--text", help="text: a file or a directory of UTF-8 text files (default: Shakespeare), split "
                                  "into calibration and test sides")
    e.add_argument("--text-glob", default="*", help="files of a --text directory to read (default '*'; e.g. '**/*.md')")
    e.add_argument("--split", default="test", choices=["test", "dev"],
                   help="test: the held-out side (report numbers); dev: windows of the calibration side that the "
                        "calibration did not read (tune on this)")
    e.add_argument("--runtime", default="sim", choices=["sim", "tp"],
                   help="sim: single-process TP simulator; tp: --tp spawned gloo ranks, each holding one shard")
    e.add_argument("--timeout", type=positive_float, default=60.0, help="--runtime tp: collective timeout in seconds")
    e.add_argument("--threads-per-rank", type=positive_int, default=1, help="--runtime tp: torch threads per rank")
    e.add_argument("--json", help="write the full result here")
    e.set_defaults(func=_eval)


def _warn(text: str) -> None:
    print(f"lowbit-tp: warning: {text}", file=sys.stderr)


def _calibrate(args) -> None:
    from lowbit_tp.calibration.pipeline import CalibrationConfig, calibrate
    from lowbit_tp.preflight import preflight_calibrate

    cfg = CalibrationConfig(model=args.model, tp=args.tp, samples=args.samples, seq_len=args.seq_len,
                            batch_size=args.batch_size, seed=args.seed, ema_decay=args.ema_decay, k=args.k,
                            text=args.text, text_glob=args.text_glob, allocate=args.allocate or None, alloc_low=args.alloc_low,
                            alloc_high=args.alloc_high, alloc_samples=args.alloc_samples,
                            alloc_codecs=tuple(c for c in args.alloc_codecs.split(",") if c))
    preflight_calibrate(cfg, out=args.out, warn=_warn)
    cal = calibrate(cfg)
    path = cal.save(args.out)
    print(f"wrote {path}: {len(cal.layers)} layers x {cfg.tp} ranks (+ sum), hidden {cal.hidden_size}, "
          f"k={cal.meta['k']}, {cal.meta['seconds']} s; text: {cal.meta['text']['description']}")


def _eval(args) -> None:
    from lowbit_tp.results import markdown_table
    from lowbit_tp.evaluation import EvalConfig, evaluate_codecs
    from lowbit_tp.fileio import atomic_write_text
    from lowbit_tp.preflight import preflight_eval

    cfg = EvalConfig(model=args.model, tp=args.tp, codecs=tuple(args.codec), algorithm=args.algorithm,
                     calibration=args.calibration, samples=args.samples, seq_len=args.seq_len,
                     batch_size=args.batch_size, lambada=args.lambada, seed=args.seed, text=args.text,
                     text_glob=args.text_glob, split=args.split)
    preflight_eval(cfg, out=args.json, warn=_warn)
    if args.runtime == "tp":
        from lowbit_tp.evaluation.on_ranks import evaluate_codecs_tp

        res = evaluate_codecs_tp(cfg, timeout_s=args.timeout, threads_per_rank=args.threads_per_rank)
    else:
        res = evaluate_codecs(cfg)
        for row in res["rows"]:
            row["runtime"] = "sim"
    cols = ["codec", "algorithm", "runtime", "split", "bits_per_value", "ppl_baseline", "ppl", "ppl_increase_pct",
            "ppl_increase_pct_ci95", "kl", "kl_ci95", "top1", "top1_ci95", "lambada_acc_baseline", "lambada_acc",
            "pct_of_baseline_lambada"]
    print(markdown_table(res["rows"], cols))
    if args.json:
        atomic_write_text(args.json, json.dumps(res, indent=2, default=str))
