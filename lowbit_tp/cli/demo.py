"""``lowbit-tp demo``: the main job (calibrate, measure, generate at TP 3), or ``--synthetic``."""
from __future__ import annotations

from lowbit_tp.cli.argtypes import positive_int
from lowbit_tp.cli.common import default, write_json
from lowbit_tp.configs import DemoConfig
from lowbit_tp.errors import UserError
from lowbit_tp.fileio import check_output_path


def register(sub) -> None:
    p = sub.add_parser("demo", help="the main job: calibrate, measure, and generate at TP 3 on the default model")
    p.add_argument("--model", default=default(DemoConfig, "model"))
    p.add_argument("--tp", type=positive_int, default=default(DemoConfig, "tp"))
    p.add_argument("--codec", action="append",
                   help=f"repeatable; default: {', '.join(default(DemoConfig, 'codecs'))}")
    p.add_argument("--max-new-tokens", type=positive_int, default=default(DemoConfig, "max_new_tokens"))
    p.add_argument("--synthetic", action="store_true",
                   help="instead: every codec and collective on synthetic partials at TP 2 (no model, seconds)")
    p.add_argument("--json", help="also write the rows as JSON")
    p.set_defaults(func=cmd)


def config_from_args(args) -> DemoConfig:
    kw = {"codecs": tuple(args.codec)} if args.codec else {}
    return DemoConfig(model=args.model, tp=args.tp, max_new_tokens=args.max_new_tokens, **kw)


def cmd(args) -> None:
    # Library code (torch) is imported when the command runs, so that `--help` stays fast.
    from lowbit_tp.demo import codec_demo, model_demo
    from lowbit_tp.preflight import check_codecs, check_model_tp

    if args.synthetic:  # its own tour (every codec, TP 2, no model): the model demo's flags would be ignored
        given = [flag for flag, value, dflt in (("--model", args.model, default(DemoConfig, "model")),
                                                ("--tp", args.tp, default(DemoConfig, "tp")),
                                                ("--codec", args.codec, None),
                                                ("--max-new-tokens", args.max_new_tokens,
                                                 default(DemoConfig, "max_new_tokens"))) if value != dflt]
        if given:
            raise UserError(f"{', '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to the model demo; "
                            f"--synthetic runs every codec at TP 2 without a model")
    if args.json:
        check_output_path(args.json)
    cfg = config_from_args(args)
    if args.synthetic:
        rows, table = codec_demo()
    else:
        check_model_tp(cfg.model, cfg.tp)
        check_codecs(cfg.codecs, build=False)
        rows, table = model_demo(model=cfg.model, tp=cfg.tp, codecs=cfg.codecs, max_new_tokens=cfg.max_new_tokens)
    print(table)
    write_json(args.json, rows)
