"""``lowbit-tp bench-comm`` and ``lowbit-tp bench-e2e``: the collective alone, and whole TP generation."""
from __future__ import annotations

from lowbit_tp.cli.argtypes import nonneg_int, positive_float, positive_int
from lowbit_tp.cli.common import command_line, default
from lowbit_tp.configs import CommBenchConfig, E2EConfig
from lowbit_tp.fileio import check_output_path


def register(sub) -> None:
    _register_comm(sub)
    _register_e2e(sub)


def _register_comm(sub) -> None:
    d = CommBenchConfig  # defaults are read from its fields
    p = sub.add_parser("bench-comm", help="bytes and latency of the compressed all-reduce on spawned ranks")
    p.add_argument("--world-size", type=positive_int, action="append",
                   help=f"repeatable; default {default(d, 'world_sizes')}")
    p.add_argument("--codec", action="append", help=f"repeatable; default {default(d, 'codecs')}")
    p.add_argument("--numel", type=positive_int, action="append",
                   help=f"values per message, repeatable; default {default(d, 'numels')} (64KB-64MB of bf16)")
    p.add_argument("--algorithm", action="append", choices=["gather", "two-shot"],
                   help=f"repeatable; default {default(d, 'algorithms')} (bf16 exact always runs as the baseline)")
    p.add_argument("--hidden", type=positive_int, default=default(d, "hidden"), help="channels E of the [tokens, E] message")
    p.add_argument("--repeats", type=positive_int, default=default(d, "repeats"))
    p.add_argument("--backend", default=default(d, "backend"), choices=["gloo", "nccl"])
    p.add_argument("--threads-per-rank", type=positive_int, default=default(d, "threads_per_rank"))
    p.add_argument("--timeout", type=positive_float, default=default(d, "timeout_s"),
                   help="collective timeout in seconds: a dead or stalled rank ends the run after it")
    p.add_argument("--chunk-bytes", type=nonneg_int, action="append",
                   help=f"pipelining chunk size in bf16 bytes (0: unchunked), repeatable; default "
                        f"{default(d, 'chunk_bytes')} (the AutoPolicy's)")
    p.add_argument("--no-throughput", action="store_true", help="skip the single-thread codec throughput table")
    p.add_argument("--json", help="write results here (and a .md table next to it)")
    p.set_defaults(func=cmd_comm)


def comm_config_from_args(args) -> CommBenchConfig:
    lists = {k: tuple(v) for k, v in (("world_sizes", args.world_size), ("codecs", args.codec),
                                      ("numels", args.numel), ("algorithms", args.algorithm),
                                      ("chunk_bytes", args.chunk_bytes)) if v}
    return CommBenchConfig(**lists, hidden=args.hidden, repeats=args.repeats, backend=args.backend,
                           threads_per_rank=args.threads_per_rank, timeout_s=args.timeout)


def cmd_comm(args) -> None:
    # Library code (torch) is imported when the command runs, so that `--help` stays fast.
    from lowbit_tp.bench.comm import run_comm_bench

    if args.json:
        check_output_path(args.json)
    out = run_comm_bench(comm_config_from_args(args), json_path=args.json, throughput=not args.no_throughput,
                         command=command_line())
    print(out["markdown"])


def _register_e2e(sub) -> None:
    d = E2EConfig  # defaults are read from its fields
    p = sub.add_parser("bench-e2e", help="end-to-end TP generation latency on loopback and emulated links")
    p.add_argument("--network", action="append",
                   help=f"loopback or a tc rate (10gbit); repeatable; default {default(d, 'networks')}")
    p.add_argument("--tp", type=positive_int, action="append", help=f"repeatable; default {default(d, 'tps')}")
    p.add_argument("--codec", action="append", help=f"compressed codecs, repeatable; default {default(d, 'codecs')}")
    p.add_argument("--algorithm", default=default(d, "algorithm"), choices=["gather", "two-shot"])
    p.add_argument("--no-exact", action="store_true", help="skip the bf16 exact (fp32 on CPU) reference run")
    p.add_argument("--prompt-len", type=positive_int, action="append",
                   help=f"tokens, repeatable; default {default(d, 'prompt_lens')}")
    p.add_argument("--new-tokens", type=positive_int, default=default(d, "new_tokens"))
    p.add_argument("--repeats", type=positive_int, default=default(d, "repeats"), help="prompts of each length per launch")
    p.add_argument("--rounds", type=positive_int, default=default(d, "rounds"),
                   help="launches per variant, interleaved across variants")
    p.add_argument("--model", default=default(d, "model"), help="random-llama, a registry name or a checkpoint directory")
    p.add_argument("--hidden", type=positive_int, default=default(d, "hidden"))
    p.add_argument("--intermediate", type=positive_int, default=default(d, "intermediate"))
    p.add_argument("--layers", type=positive_int, default=default(d, "layers"))
    p.add_argument("--heads", type=positive_int, default=default(d, "heads"))
    p.add_argument("--kv-heads", type=positive_int, default=default(d, "kv_heads"))
    p.add_argument("--delay", default=default(d, "delay"), help="one-way delay on emulated links, e.g. 0.5ms (needs netem)")
    p.add_argument("--threads-per-rank", type=positive_int, default=default(d, "threads_per_rank"))
    p.add_argument("--no-sync-wire", action="store_true",
                   help="no barrier before each collective (wire time then includes the ranks' skew)")
    p.add_argument("--chunk-bytes", type=nonneg_int, default=default(d, "chunk_bytes"),
                   help="pipelining chunk size in bf16 bytes for every variant alike (0: whole messages); "
                        "default %(default)s (the AutoPolicy's)")
    p.add_argument("--error-feedback", choices=["off", "on", "both"], default=default(d, "error_feedback"),
                   help="run the compressed codecs without error feedback (off), with it (on), or both ways "
                        "in the same rounds (both: its cost measured in one run); default %(default)s")
    p.add_argument("--json", help="write results here (and a .md next to it)")
    p.set_defaults(func=cmd_e2e)


def e2e_config_from_args(args) -> E2EConfig:
    lists = {k: tuple(v) for k, v in (("networks", args.network), ("tps", args.tp), ("codecs", args.codec),
                                      ("prompt_lens", args.prompt_len)) if v}
    return E2EConfig(**lists, algorithm=args.algorithm, exact_baseline=not args.no_exact, new_tokens=args.new_tokens,
                     repeats=args.repeats, rounds=args.rounds, model=args.model, hidden=args.hidden,
                     intermediate=args.intermediate, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                     delay=args.delay, threads_per_rank=args.threads_per_rank, sync_wire=not args.no_sync_wire,
                     chunk_bytes=args.chunk_bytes, error_feedback=args.error_feedback)


def cmd_e2e(args) -> None:
    # Library code (torch) is imported when the command runs, so that `--help` stays fast.
    from lowbit_tp.bench.e2e.run import run_e2e_bench

    if args.json:
        check_output_path(args.json)
    out = run_e2e_bench(e2e_config_from_args(args), json_path=args.json, command=command_line())
    print(out["markdown"])
