"""The ``lowbit-tp`` command line. Each subcommand is a thin layer over a library call."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

from lowbit_tp.argtypes import nonneg_int, positive_float, positive_int
from lowbit_tp.errors import Terminated, UserError


def _add_bench_comm(sub):
    p = sub.add_parser("bench-comm", help="bytes and latency of the compressed all-reduce on spawned ranks")
    p.add_argument("--world-size", type=positive_int, action="append", help="repeatable; default 2")
    p.add_argument("--codec", action="append", help="repeatable; default: a representative set")
    p.add_argument("--numel", type=positive_int, action="append", help="values per message, repeatable; default 64KB-64MB of bf16")
    p.add_argument("--algorithm", action="append", choices=["gather", "two-shot"],
                   help="repeatable; default both (bf16 exact always runs as the baseline)")
    p.add_argument("--hidden", type=positive_int, default=4096, help="channels E of the [tokens, E] message")
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    p.add_argument("--threads-per-rank", type=positive_int, default=1)
    p.add_argument("--timeout", type=positive_float, default=300.0,
                   help="collective timeout in seconds: a dead or stalled rank ends the run after it")
    p.add_argument("--chunk-bytes", type=nonneg_int, action="append",
                   help="pipelining chunk size in bf16 bytes (0: unchunked), repeatable; default the AutoPolicy's")
    p.add_argument("--no-throughput", action="store_true", help="skip the single-thread codec throughput table")
    p.add_argument("--json", help="write results here (and a .md table next to it)")
    p.set_defaults(func=_cmd_bench_comm)


def _cmd_bench_comm(args):
    from lowbit_tp.bench.comm import CommBenchConfig, run_comm_bench
    from lowbit_tp.fileio import check_output_path

    if args.json:
        check_output_path(args.json)
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
                             "backend": args.backend, "threads_per_rank": args.threads_per_rank,
                             "timeout_s": args.timeout})
    out = run_comm_bench(cfg, json_path=args.json, throughput=not args.no_throughput)
    print(out["markdown"])


def _add_demo(sub):
    p = sub.add_parser("demo", help="the main job: calibrate, measure, and generate at TP 3 on the default model")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tp", type=positive_int, default=3)
    p.add_argument("--codec", action="append", help="repeatable; default: bf16, int4-outlier, default")
    p.add_argument("--max-new-tokens", type=positive_int, default=24)
    p.add_argument("--synthetic", action="store_true",
                   help="instead: every codec and collective on synthetic partials at TP 2 (no model, seconds)")
    p.add_argument("--json", help="also write the rows as JSON")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args):
    from lowbit_tp.demo import codec_demo, model_demo
    from lowbit_tp.fileio import atomic_write_text, check_output_path
    from lowbit_tp.preflight import check_codecs, check_model_tp

    if args.json:
        check_output_path(args.json)
    codecs = tuple(args.codec or ("bf16", "int4-outlier", "default"))
    if args.synthetic:
        rows, table = codec_demo()
    else:
        check_model_tp(args.model, args.tp)
        check_codecs(codecs, build=False)
        rows, table = model_demo(model=args.model, tp=args.tp, codecs=codecs, max_new_tokens=args.max_new_tokens)
    print(table)
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=2, default=str))


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad flag reported in one line (no usage block) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lowbit-tp", description=__doc__,
                     epilog="User errors print one line; LOWBIT_TP_DEBUG=1 shows the traceback instead.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    _add_bench_comm(sub)
    for register in _extra_commands():
        register(sub)
    return parser


# Modules that contribute subcommands (calibrate, eval, run, bench-e2e) through a
# ``register(subparsers)`` function; imported here, not at the top, so `--help` stays fast.
_EXTRA_MODULES = ("lowbit_tp.evaluation.cli", "lowbit_tp.runtime.cli", "lowbit_tp.bench.e2e.cli",
                  "lowbit_tp.integrations.vllm.cli")


def _extra_commands() -> list:
    import importlib

    return [importlib.import_module(mod).register for mod in _EXTRA_MODULES]


def _debug() -> bool:
    return os.environ.get("LOWBIT_TP_DEBUG", "") not in ("", "0")


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. User errors (bad flags, paths, model/TP/codec/calibration
    mismatches, a failed rank) print ONE line to stderr: status 2 for user errors, 1 for a
    failed rank, 130 on Ctrl-C, 143 on SIGTERM. ``LOWBIT_TP_DEBUG=1`` re-raises instead."""
    args = build_parser().parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there
    old_term = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("lowbit-tp: interrupted", file=sys.stderr)
        return 130
    except Terminated as exc:
        print(f"lowbit-tp: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except UserError as exc:
        if _debug():
            raise
        print(f"lowbit-tp: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from lowbit_tp.collectives.launch import RankFailure

        if not isinstance(exc, RankFailure) or _debug():
            raise
        print(f"lowbit-tp: error: {exc.summary} (LOWBIT_TP_DEBUG=1 shows every rank's traceback)", file=sys.stderr)
        return 1
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old_term)
    return 0


if __name__ == "__main__":
    sys.exit(main())
