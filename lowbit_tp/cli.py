"""The ``lowbit-tp`` command line. Each subcommand is a thin layer over a library call."""
from __future__ import annotations

import argparse
import json
import sys


def _add_bench_comm(sub):
    p = sub.add_parser("bench-comm", help="bytes and latency of the compressed all-reduce on spawned ranks")
    p.add_argument("--world-size", type=int, action="append", help="repeatable; default 2")
    p.add_argument("--codec", action="append", help="repeatable; default: a representative set")
    p.add_argument("--numel", type=int, action="append", help="values per message, repeatable; default 64KB-64MB of bf16")
    p.add_argument("--algorithm", action="append", choices=["gather", "two-shot"],
                   help="repeatable; default both (bf16 exact always runs as the baseline)")
    p.add_argument("--hidden", type=int, default=4096, help="channels E of the [tokens, E] message")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    p.add_argument("--threads-per-rank", type=int, default=1)
    p.add_argument("--chunk-bytes", type=int, action="append",
                   help="pipelining chunk size in bf16 bytes (0: unchunked), repeatable; default the AutoPolicy's")
    p.add_argument("--no-throughput", action="store_true", help="skip the single-thread codec throughput table")
    p.add_argument("--json", help="write results here (and a .md table next to it)")
    p.set_defaults(func=_cmd_bench_comm)


def _cmd_bench_comm(args):
    from lowbit_tp.bench.comm import CommBenchConfig, run_comm_bench

    cfg = CommBenchConfig()
    kw = {}
    if args.world_size:
        kw["world_sizes"] = tuple(args.world_size)
    if args.codec:
        kw["codecs"] = tuple(args.codec)
    if args.numel:
        kw["numels"] = tuple(args.numel)
    if args.algorithm:
        kw["algorithms"] = tuple(args.algorithm)
    if args.chunk_bytes:
        kw["chunk_bytes"] = tuple(args.chunk_bytes)
    cfg = CommBenchConfig(**{**cfg.__dict__, **kw, "hidden": args.hidden, "repeats": args.repeats,
                             "backend": args.backend, "threads_per_rank": args.threads_per_rank})
    out = run_comm_bench(cfg, json_path=args.json, throughput=not args.no_throughput)
    print(out["markdown"])


def _add_demo(sub):
    p = sub.add_parser("demo", help="the main job: calibrate, measure, and generate at TP 3 on the default model")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tp", type=int, default=3)
    p.add_argument("--codec", action="append", help="repeatable; default: bf16, int4-outlier, default")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--synthetic", action="store_true",
                   help="instead: every codec and collective on synthetic partials at TP 2 (no model, seconds)")
    p.add_argument("--json", help="also write the rows as JSON")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args):
    from lowbit_tp.demo import codec_demo, model_demo

    if args.synthetic:
        rows, table = codec_demo()
    else:
        rows, table = model_demo(model=args.model, tp=args.tp, codecs=tuple(args.codec or ("bf16", "int4-outlier", "default")),
                                 max_new_tokens=args.max_new_tokens)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowbit-tp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    _add_bench_comm(sub)
    for register in _extra_commands():
        register(sub)
    return parser


# Modules that contribute subcommands (calibrate, eval, run, bench-e2e) through a
# ``register(subparsers)`` function; imported here, not at the top, so `--help` stays fast.
_EXTRA_MODULES = ("lowbit_tp.evaluation.cli", "lowbit_tp.runtime.cli", "lowbit_tp.bench.e2e",
                  "lowbit_tp.integrations.vllm.cli")


def _extra_commands() -> list:
    import importlib

    return [importlib.import_module(mod).register for mod in _EXTRA_MODULES]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
