"""``lowbit-tp eval``: perplexity, KL, top-1 and last-word accuracy of codecs."""
from __future__ import annotations

from lowbit_tp.cli.argtypes import add_feedback_flag, nonneg_int, positive_float, positive_int
from lowbit_tp.cli.common import default, warn, write_json
from lowbit_tp.configs import ALGORITHMS, SPLITS, EvalConfig, RankOptions
from lowbit_tp.errors import UserError

COLUMNS = ["codec", "algorithm", "error_feedback", "runtime", "split", "bits_per_value", "ppl_baseline", "ppl", "ppl_increase_pct",
           "ppl_increase_pct_ci95", "kl", "kl_ci95", "top1", "top1_ci95", "lambada_acc_baseline", "lambada_acc",
           "lambada_acc_ci95", "lambada_acc_delta_ci95", "pct_of_baseline_lambada"]


def register(sub) -> None:
    d = EvalConfig  # defaults are read from its fields
    e = sub.add_parser("eval", help="perplexity, KL, top-1 and last-word accuracy of codecs via the TP simulator "
                                    "or the multi-process TP runtime")
    e.add_argument("--model", default=default(d, "model"))
    e.add_argument("--tp", type=positive_int, required=True)
    e.add_argument("--codec", action="append", required=True, help="repeatable")
    e.add_argument("--algorithm", default=default(d, "algorithm"), choices=[a for a in ALGORITHMS if a != "exact"],
                   help="collective (default %(default)s, the one default of every API)")
    add_feedback_flag(e, default(d, "error_feedback"),
                      "each rank adds its previous all-reduce's quantization error back into its next partial "
                      "within a forward pass (same bytes on the wire; docs/design-dev.md)")
    e.add_argument("--calibration", default=default(d, "calibration"),
                   help="artifact from `lowbit-tp calibrate` (static codecs need it)")
    e.add_argument("--samples", type=positive_int, default=default(d, "samples"))
    e.add_argument("--seq-len", type=int, default=default(d, "seq_len"))
    e.add_argument("--batch-size", type=positive_int, default=default(d, "batch_size"))
    e.add_argument("--lambada", type=nonneg_int, default=default(d, "lambada"), help="last-word items (0 to skip)")
    e.add_argument("--seed", type=int, default=default(d, "seed"))
    e.add_argument("--text", default=default(d, "text"),
                   help="text: a file or a directory of UTF-8 text files (default: Shakespeare), split "
                        "into calibration and test sides")
    e.add_argument("--text-glob", default=default(d, "text_glob"),
                   help="files of a --text directory to read (default '%(default)s'; e.g. '**/*.md')")
    e.add_argument("--split", default=default(d, "split"), choices=SPLITS,
                   help="test: the held-out side (report numbers); dev: windows of the calibration side that the "
                        "calibration did not read (tune on this)")
    e.add_argument("--runtime", default="sim", choices=["sim", "tp"],
                   help="sim: single-process TP simulator; tp: --tp spawned gloo ranks, each holding one shard")
    e.add_argument("--timeout", type=positive_float, default=default(RankOptions, "timeout_s"),
                   help="--runtime tp: collective timeout in seconds")
    e.add_argument("--threads-per-rank", type=positive_int, default=default(RankOptions, "threads_per_rank"),
                   help="--runtime tp: torch threads per rank")
    e.add_argument("--json", help="write the full result here")
    e.set_defaults(func=cmd)


def config_from_args(args) -> EvalConfig:
    return EvalConfig(model=args.model, tp=args.tp, codecs=tuple(args.codec), algorithm=args.algorithm,
                      calibration=args.calibration, samples=args.samples, seq_len=args.seq_len,
                      batch_size=args.batch_size, lambada=args.lambada, seed=args.seed, text=args.text,
                      text_glob=args.text_glob, split=args.split, error_feedback=args.error_feedback)


def _check_runtime_flags(args) -> None:
    """Refuse the rank options without ``--runtime tp`` (the simulator ignored them silently);
    a flag left at its default passes."""
    given = [f"{flag} {value}" for flag, value, field in (("--timeout", args.timeout, "timeout_s"),
                                                          ("--threads-per-rank", args.threads_per_rank,
                                                           "threads_per_rank"))
             if value != default(RankOptions, field)]
    if given and args.runtime != "tp":
        raise UserError(f"{', '.join(given)} only appl{'y' if len(given) > 1 else 'ies'} with --runtime tp "
                        f"(the simulator runs in this process)")


def cmd(args) -> None:
    _check_runtime_flags(args)
    # Library code (torch) is imported when the command runs, so that `--help` stays fast.
    from lowbit_tp.evaluation import evaluate_codecs
    from lowbit_tp.evaluation.on_ranks import evaluate_codecs_tp
    from lowbit_tp.preflight import preflight_eval

    cfg = config_from_args(args)
    preflight_eval(cfg, out=args.json, warn=warn)
    if args.runtime == "tp":
        res = evaluate_codecs_tp(cfg, timeout_s=args.timeout, threads_per_rank=args.threads_per_rank, warn=warn)
    else:
        res = evaluate_codecs(cfg, warn=warn).on("sim")
    print(res.table(COLUMNS))
    write_json(args.json, res.to_json())
