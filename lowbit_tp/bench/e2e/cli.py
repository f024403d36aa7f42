"""``lowbit-tp bench-e2e``: the subcommand on top of :class:`~lowbit_tp.bench.e2e.config.E2EConfig`."""
from __future__ import annotations

from dataclasses import replace

from lowbit_tp.argtypes import positive_int
from lowbit_tp.bench.e2e.config import E2EConfig
from lowbit_tp.bench.e2e.run import run_e2e_bench


def register(sub) -> None:
    """Add ``bench-e2e`` to the ``lowbit-tp`` subcommands."""
    d = E2EConfig()
    p = sub.add_parser("bench-e2e", help="end-to-end TP generation latency on loopback and emulated links")
    p.add_argument("--network", action="append", help=f"loopback or a tc rate (10gbit); repeatable; default {d.networks}")
    p.add_argument("--tp", type=positive_int, action="append", help=f"repeatable; default {d.tps}")
    p.add_argument("--codec", action="append", help=f"compressed codecs, repeatable; default {d.codecs}")
    p.add_argument("--algorithm", default=d.algorithm, choices=["gather", "two-shot"])
    p.add_argument("--no-exact", action="store_true", help="skip the bf16 exact (fp32 on CPU) reference run")
    p.add_argument("--prompt-len", type=positive_int, action="append", help=f"tokens, repeatable; default {d.prompt_lens}")
    p.add_argument("--new-tokens", type=positive_int, default=d.new_tokens)
    p.add_argument("--repeats", type=positive_int, default=d.repeats, help="prompts of each length per launch")
    p.add_argument("--rounds", type=positive_int, default=d.rounds, help="launches per variant, interleaved across variants")
    p.add_argument("--model", default=d.model, help="random-llama, a registry name or a checkpoint directory")
    p.add_argument("--hidden", type=positive_int, default=d.hidden)
    p.add_argument("--intermediate", type=positive_int, default=d.intermediate)
    p.add_argument("--layers", type=positive_int, default=d.layers)
    p.add_argument("--heads", type=positive_int, default=d.heads)
    p.add_argument("--kv-heads", type=positive_int, default=d.kv_heads)
    p.add_argument("--delay", default=d.delay, help="one-way delay on emulated links, e.g. 0.5ms (needs netem)")
    p.add_argument("--threads-per-rank", type=positive_int, default=d.threads_per_rank)
    p.add_argument("--no-sync-wire", action="store_true",
                   help="no barrier before each collective (wire time then includes the ranks' skew)")
    p.add_argument("--json", help="write results here (and a .md next to it)")
    p.set_defaults(func=_cmd)


def _cmd(args) -> None:
    from lowbit_tp.fileio import check_output_path

    if args.json:
        check_output_path(args.json)
    cfg = E2EConfig()
    kw = {k: tuple(v) for k, v in (("networks", args.network), ("tps", args.tp), ("codecs", args.codec),
                                   ("prompt_lens", args.prompt_len)) if v}
    cfg = replace(cfg, **kw, algorithm=args.algorithm, exact_baseline=not args.no_exact, new_tokens=args.new_tokens,
                  repeats=args.repeats, rounds=args.rounds, model=args.model, hidden=args.hidden, intermediate=args.intermediate,
                  layers=args.layers, heads=args.heads, kv_heads=args.kv_heads, delay=args.delay,
                  threads_per_rank=args.threads_per_rank, sync_wire=not args.no_sync_wire)
    out = run_e2e_bench(cfg, json_path=args.json)
    print(out["markdown"])
