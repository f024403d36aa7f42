"""``lowbit-tp calibrate``: record channel statistics of a model's communicated partials."""
from __future__ import annotations

from lowbit_tp.cli.argtypes import nonneg_float, nonneg_int, positive_int, unit_interval
from lowbit_tp.cli.common import default, warn
from lowbit_tp.configs import ALLOC_LADDER, CalibrationConfig
from lowbit_tp.errors import UserError


def register(sub) -> None:
    d = CalibrationConfig  # defaults are read from its fields
    p = sub.add_parser("calibrate", help="record channel statistics of a model's communicated partials")
    p.add_argument("--model", default=default(d, "model"), help="registry name, local HF checkpoint dir, or .gguf file")
    p.add_argument("--tp", type=positive_int, required=True)
    p.add_argument("--out", required=True, help="the .safetensors artifact to write")
    p.add_argument("--samples", type=positive_int, default=default(d, "samples"))
    p.add_argument("--seq-len", type=int, default=default(d, "seq_len"))
    p.add_argument("--batch-size", type=positive_int, default=default(d, "batch_size"))
    p.add_argument("--seed", type=int, default=default(d, "seed"))
    p.add_argument("--ema-decay", type=unit_interval, default=default(d, "ema_decay"))
    p.add_argument("--k", type=nonneg_int, default=default(d, "k"),
                   help="bf16 (kept) channels for int4-outlier, int4-random-k and rot-* "
                        "codecs without -kN, stored in the calibration (default hidden/64)")
    p.add_argument("--text", default=default(d, "text"),
                   help="calibration text: a file or a directory of UTF-8 text files (default: Shakespeare)")
    p.add_argument("--text-glob", default=default(d, "text_glob"),
                   help="files of a --text directory to read (default '%(default)s'; e.g. '**/*.md')")
    p.add_argument("--allocate", type=nonneg_float, metavar="BITS", default=default(d, "allocate"),
                   help="measure per-layer sensitivity and store a bit allocation with this mean bits/value budget, "
                        "used by --codec alloc (= default); 0 skips it (default %(default)s)")
    p.add_argument("--alloc-low", default=default(d, "alloc_low"), help="codec for most layers (default %(default)s)")
    p.add_argument("--alloc-high", default=default(d, "alloc_high"),
                   help="codec for the most sensitive layers (default %(default)s)")
    p.add_argument("--alloc-codecs", default=",".join(default(d, "alloc_codecs")), metavar="A,B,...",
                   help="candidate codecs, comma-separated: allocate one per layer by predicted KL (the KL of "
                        "--alloc-low scaled by each codec's measured error at that layer) instead of low/high; "
                        f"'ladder': {','.join(ALLOC_LADDER)}")
    p.add_argument("--alloc-error-feedback", action="store_true",
                   help="measure the per-layer KL with error feedback along depth: the plan for runs with "
                        "--error-feedback")
    p.add_argument("--alloc-samples", type=positive_int, default=default(d, "alloc_samples"),
                   help="probe windows (128 tokens) for the per-layer sensitivity (default %(default)s)")
    p.add_argument("--fisher-weights", type=nonneg_int, metavar="DRAWS", default=default(d, "fisher_draws"),
                   help="also store per-channel Fisher weights for the NAME+fisher codecs, from this many sampled "
                        "label draws (one backward pass each); 0 skips it (default %(default)s)")
    p.add_argument("--fisher-windows", type=positive_int, default=default(d, "fisher_windows"),
                   help="calibration windows the Fisher pass reads (the first ones; default %(default)s)")
    p.add_argument("--from", dest="from_path", metavar="CAL",
                   help="add the Fisher weights to this existing calibration (its statistics, allocation and "
                        "windows are kept; only --fisher-* apply) and write the result to --out")
    p.set_defaults(func=cmd)


def config_from_args(args) -> CalibrationConfig:
    return CalibrationConfig(model=args.model, tp=args.tp, samples=args.samples, seq_len=args.seq_len,
                             batch_size=args.batch_size, seed=args.seed, ema_decay=args.ema_decay, k=args.k,
                             text=args.text, text_glob=args.text_glob, allocate=args.allocate or None,
                             alloc_low=args.alloc_low, alloc_high=args.alloc_high, alloc_samples=args.alloc_samples,
                             alloc_codecs=_alloc_codecs(args.alloc_codecs),
                             alloc_error_feedback=args.alloc_error_feedback,
                             fisher_draws=args.fisher_weights, fisher_windows=args.fisher_windows)


def _alloc_codecs(text: str) -> tuple[str, ...]:
    """The comma-separated list, with ``ladder`` standing for :data:`ALLOC_LADDER` (in order, once)."""
    names = [n for c in (c.strip() for c in text.split(",")) if c for n in (ALLOC_LADDER if c == "ladder" else (c,))]
    return tuple(dict.fromkeys(names))


# What --from keeps from the source calibration: these flags would not change a thing.
NOT_WITH_FROM = ("samples", "seq_len", "batch_size", "seed", "ema_decay", "k", "text", "text_glob", "allocate",
                 "alloc_low", "alloc_high", "alloc_codecs", "alloc_samples", "alloc_error_feedback")


def _check_from_flags(cfg: CalibrationConfig) -> None:
    """Refuse the flags that ``--from`` ignores (they were silently): the source calibration's
    statistics, windows and allocation are kept. A flag left at its default passes."""
    given = [f"--{f.replace('_', '-')}" for f in NOT_WITH_FROM if getattr(cfg, f) != default(CalibrationConfig, f)]
    if given:
        raise UserError(f"{', '.join(given)} {'do' if len(given) > 1 else 'does'} not apply with --from (its "
                        f"statistics, windows and allocation are kept; only --fisher-* apply)")


def _check_fisher_flags(cfg: CalibrationConfig) -> None:
    """``--fisher-windows`` without ``--fisher-weights`` ran no Fisher pass, without a word."""
    if not cfg.fisher_draws and cfg.fisher_windows != default(CalibrationConfig, "fisher_windows"):
        raise UserError(f"--fisher-windows {cfg.fisher_windows} applies to the Fisher pass: give --fisher-weights "
                        f"DRAWS too")


ALLOC_FLAGS = ("alloc_low", "alloc_high", "alloc_codecs", "alloc_samples", "alloc_error_feedback")


def _check_alloc_flags(cfg: CalibrationConfig) -> None:
    """``--allocate 0`` skips the probe, so the ``--alloc-*`` flags did nothing (silently). A
    flag left at its default passes."""
    given = [f"--{f.replace('_', '-')}" for f in ALLOC_FLAGS if getattr(cfg, f) != default(CalibrationConfig, f)]
    if given and not cfg.allocate:
        raise UserError(f"{', '.join(given)} {'apply' if len(given) > 1 else 'applies'} to the bit allocation, "
                        f"which --allocate 0 skips")


def cmd(args) -> None:
    # Library code (torch) is imported when the command runs, so that `--help` stays fast.
    from lowbit_tp.calibration.pipeline import calibrate, fisher_from
    from lowbit_tp.preflight import preflight_calibrate, preflight_fisher_from

    cfg = config_from_args(args)
    if args.from_path:  # only the Fisher pass, added to an existing calibration
        _check_from_flags(cfg)
        preflight_fisher_from(cfg, source=args.from_path, out=args.out)
        path = fisher_from(cfg, args.from_path).save(args.out)
        print(f"wrote {path}: {args.from_path} plus Fisher channel weights ({cfg.fisher_draws} draws over the first "
              f"{cfg.fisher_windows} calibration windows)")
        return
    _check_fisher_flags(cfg)
    _check_alloc_flags(cfg)
    preflight_calibrate(cfg, out=args.out, warn=warn)
    cal = calibrate(cfg)
    path = cal.save(args.out)
    print(f"wrote {path}: {len(cal.layers)} layers x {cfg.tp} ranks (+ sum), hidden {cal.hidden_size}, "
          f"k={cal.meta['k']}, {cal.meta['seconds']} s; text: {cal.meta['text']['description']}")
    if cal.meta.get("bit_allocation_error"):  # stored in the file; said here so that it is not found out later
        warn(f"no bit allocation stored in {path} ({cal.meta['bit_allocation_error']}): codec 'default' (alloc) "
             f"will refuse it; give a budget it can meet with --allocate, or --allocate 0 to skip the probe")

