"""Per-layer bit allocation study: measure once, write one calibration per plan.

Loads a calibration (``lowbit-tp calibrate ... --allocate 0`` or any other), measures on
probe windows of the *calibration* side of the text (drawn as ``lowbit-tp calibrate``
draws its allocation probe; recorded in every written artifact, so ``eval --split dev``
avoids them):

1. each layer's KL with the reference codec alone (``layer_sensitivity``);
2. each candidate codec's all-reduce squared error at each layer (``layer_errors``);

then writes, for every budget and candidate set, a copy of the calibration whose
``bit_allocation`` is that plan (``allocate_many``; ``--two`` also the two-codec
``allocate`` of low/high), to be evaluated with
``lowbit-tp eval --split dev --codec alloc --calibration OUT/<plan>.safetensors``.

    PYTHONPATH=. python scripts/alloc_study.py --model smollm2-135m --tp 3 \\
        --calibration CAL.safetensors --out-dir OUT --budgets 4.25 3.5

``--error-feedback``: the per-layer KL is measured with feedback along depth, and the dev
evaluation (``--eval-samples``) runs every codec with it. OUT/measure.json is reused only
for the same model, TP, reference, feedback, probe windows and codecs.

``--sensitivity-from OTHER/measure.json``: the per-layer KL of an earlier study of the same
setup (checked) is reused and only the candidates' errors are measured, e.g. to add
candidates without the sensitivity pass (36 forward passes with feedback on Gemma).

``--eval-plans NAME=PATH``: the dev run also evaluates the plan of another artifact written
from the same calibration (checked), e.g. an earlier study's plan, on the same windows and
baseline, so that ``scripts/paired_diff.py`` can pair the plans.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from lowbit_tp.models.registry import sha256_of_files
from lowbit_tp.results import json_text, nan_for_null

CANDIDATES = ("rot-lm2-g64-lg8-k4", "rot-lm3-g64-lg8-k4", "rot-lm4-g64-lg8-k4", "rot-int5-g64-lg8-k4",
              "rot-int6-g64-lg8-k4", "rot-int8-g64-lg8-k4")


def check_cached(m: dict, *, model: str, tp: int, reference: str, error_feedback: bool, probe: dict, codecs,
                 path, sensitivity: str = "alone", own_sensitivity: bool = False,
                 calibration_sha256: str | None = None, sensitivity_from: str | None = None) -> None:
    """Refuse an OUT/measure.json written for another study: its sensitivities would be reused
    silently (e.g. a plan "with error feedback" built on a KL measured without it, the
    calibration's own KL taken as a fresh measurement, or errors of another calibration)."""
    want = {"model": model, "tp": tp, "reference": reference, "error_feedback": bool(error_feedback),
            "sensitivity": sensitivity, "own_sensitivity": bool(own_sensitivity),
            "sensitivity_from": sensitivity_from}
    if calibration_sha256 is not None:
        want["calibration_sha256"] = calibration_sha256
    # files written before these fields: the defaults of the time; no calibration recorded = refused
    older = {"error_feedback": False, "sensitivity": "alone", "own_sensitivity": False, "sensitivity_from": None}
    got = {k: m.get(k, older.get(k)) for k in want}
    if got != want:
        raise SystemExit(f"{path} was measured for {got}, not {want}: use another --out-dir or delete it")
    if m.get("probe", {}).get("samples") != probe["samples"] or m["probe"].get("seq_len") != probe["seq_len"]:
        raise SystemExit(f"{path} was measured on other probe windows: use another --out-dir or delete it")
    missing = sorted({c for c in codecs if any(c not in row for row in m["mse"].values())})
    if missing:
        raise SystemExit(f"{path} has no errors for {missing}: use another --out-dir or delete it")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--tp", type=int, required=True)
    ap.add_argument("--calibration", required=True)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--reference", default="rot-lm4-g64-lg8-k4")
    ap.add_argument("--codecs", nargs="+", default=list(CANDIDATES))
    ap.add_argument("--budgets", nargs="+", type=float, default=[4.25, 3.5])
    ap.add_argument("--probe-samples", type=int, default=8)
    ap.add_argument("--probe-seq-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0, help="the calibration's seed (probe windows use seed+1000)")
    ap.add_argument("--own-sensitivity", action="store_true",
                    help="take the per-layer KL from the calibration's own plan (its probe, its reference "
                         "codec) instead of measuring it again; only the errors are measured")
    ap.add_argument("--sensitivity-from", metavar="MEASURE.json",
                    help="take the per-layer KL from an earlier study's OUT/measure.json instead of measuring it "
                         "again (same model, TP, reference, feedback, sensitivity and probe windows: checked, and "
                         "the calibration's sha256 where that file recorded one); only the errors are measured")
    ap.add_argument("--error-feedback", action="store_true",
                    help="measure the per-layer KL with error feedback along depth (the plan for runs with "
                         "--error-feedback); not with --own-sensitivity")
    ap.add_argument("--sensitivity", choices=("alone", "in-context"), default="alone",
                    help="alone: each layer's KL with --reference there and bf16 elsewhere (layer_sensitivity); "
                         "in-context: the KL saved by taking the layer alone to bf16 while every other layer uses "
                         "--reference (layer_marginal_kl)")
    ap.add_argument("--two", nargs="*", type=float, default=[],
                    help="also today's two-codec rule (allocate: --reference for most layers, --high for the "
                         "most sensitive) at these budgets, on the same sensitivity")
    ap.add_argument("--high", default="rot-int6-g64-lg8-k4")
    ap.add_argument("--eval-samples", type=int, default=0,
                    help="then evaluate every plan (and the calibration's own plan, if any, as 'alloc-own', and "
                         "--eval-codecs) on the dev split in one run: same windows, one baseline")
    ap.add_argument("--eval-codecs", nargs="*", default=[])
    ap.add_argument("--eval-plans", nargs="*", default=[], metavar="NAME=PATH",
                    help="also evaluate the plan of another artifact written from the same calibration (e.g. "
                         "an earlier study's OUT/alloc-4.25.safetensors) as codec NAME, in the same dev run, "
                         "so that scripts/paired_diff.py can pair it with this study's plans")
    ap.add_argument("--eval-batch-size", type=int, default=4)
    ap.add_argument("--eval-seed", type=int, default=1,
                    help="the dev windows' seed (1: the windows docs/design-dev.md reports; another seed draws "
                         "other dev windows, e.g. to add windows to a comparison)")
    ap.add_argument("--json", help="write the dev result here")
    return ap.parse_args(argv)


def dev_eval_config(args: argparse.Namespace, plans, text):
    """The dev-split evaluation of ``plans`` (and ``--eval-codecs``): ``--eval-seed`` (default 1,
    the dev windows docs/design-dev.md reports; EvalConfig now defaults to 10). Plans measured with error
    feedback are evaluated with it, as is every other codec of the run (same chain, one baseline)."""
    from lowbit_tp.evaluation import EvalConfig

    return EvalConfig(model=args.model, tp=args.tp, codecs=(*plans, *args.eval_codecs), split="dev",
                      seed=args.eval_seed,
                      samples=args.eval_samples, lambada=0, text=text, batch_size=args.eval_batch_size,
                      error_feedback=args.error_feedback)


def sensitivity_from(args: argparse.Namespace, probe: dict, cal_sha: str, layers) -> dict:
    """The per-layer KL of an earlier study's measure.json (``--sensitivity-from``), refused
    unless it was measured for this model, TP, reference, feedback, sensitivity kind and probe
    windows (and this calibration, where the file recorded one) and covers every layer."""
    path = Path(args.sensitivity_from)
    src = json.loads(path.read_text())
    check_cached(src, model=args.model, tp=args.tp, reference=args.reference, error_feedback=args.error_feedback,
                 probe=probe, codecs=[], path=path, sensitivity=args.sensitivity,
                 own_sensitivity=bool(src.get("own_sensitivity", False)),
                 calibration_sha256=cal_sha if "calibration_sha256" in src else None,
                 sensitivity_from=src.get("sensitivity_from"))
    sens = nan_for_null(src["sensitivity_kl"])  # a non-finite KL was written as null
    missing = [l for l in layers if l not in sens]
    if missing:
        raise SystemExit(f"{path} has no sensitivity for {missing[0]!r}")
    return {l: sens[l] for l in layers}


def without_plan_fingerprint(cal) -> str:
    """The calibration's fingerprint with its ``bit_allocation`` left out: equal for two
    artifacts that differ only in their plan."""
    c = copy.copy(cal)
    c.meta = {k: v for k, v in cal.meta.items() if k != "bit_allocation"}
    return c.fingerprint()


def extra_plans(specs, cal, load) -> dict:
    """``NAME=PATH`` -> {NAME: the plan of the artifact at PATH}; refused unless that artifact
    is ``cal`` with another per-layer plan (same statistics and header) and NAME is new."""
    out = {}
    base = without_plan_fingerprint(cal)
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--eval-plans takes NAME=PATH, got {spec!r}")
        if name in out or name.startswith("alloc-") or name == "alloc":
            raise SystemExit(f"--eval-plans: the name {name!r} is taken (this study's plans are alloc-*)")
        other = load(path)
        plan = other.meta.get("bit_allocation")
        if not plan or not isinstance(plan.get("layers"), dict):
            raise SystemExit(f"--eval-plans: {path} has no per-layer plan")
        if without_plan_fingerprint(other) != base:
            raise SystemExit(f"--eval-plans: {path} was not written from --calibration (other statistics or header)")
        out[name] = plan
    return out


def merge_probes(excl: dict, probe: dict | None, what: str) -> dict:
    """The windows the dev split must avoid: ``excl`` plus those of ``probe`` it lacks (same
    window length); ``excl`` itself when it has them all."""
    new = [s for s in (probe or {}).get("samples", []) if s not in excl["samples"]]
    if not new:
        return excl
    if probe["seq_len"] != excl["seq_len"]:
        raise SystemExit(f"{what}'s probe has another window length")
    samples = excl["samples"] + new
    return {**excl, "samples": samples, "num_samples": len(samples)}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.sensitivity_from and not Path(args.sensitivity_from).is_file():  # before the model loads
        raise SystemExit(f"--sensitivity-from: no file {args.sensitivity_from}")

    import torch

    from lowbit_tp.calibration import Calibration
    from lowbit_tp.calibration.allocate import (allocate, allocate_many, layer_errors, layer_marginal_kl,
                                                 layer_sensitivity)
    from lowbit_tp.data import chunk_tokens, load_split
    from lowbit_tp.models import load_model

    torch.manual_seed(0)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cal = Calibration.load(args.calibration)
    model, tokenizer, info = load_model(args.model)
    text = cal.meta.get("config", {}).get("text")
    split = load_split(text, glob=cal.meta.get("config", {}).get("text_glob", "*"))
    own = cal.meta.get("bit_allocation")
    if args.own_sensitivity and (args.error_feedback or args.sensitivity != "alone"):
        raise SystemExit("--own-sensitivity reuses a KL measured alone without error feedback; "
                         "drop --own-sensitivity or --error-feedback/--sensitivity")
    if args.own_sensitivity and args.sensitivity_from:
        raise SystemExit("--own-sensitivity and --sensitivity-from are two sources of the per-layer KL: give one")
    if args.own_sensitivity:
        if not own or own.get("low") != args.reference:
            raise SystemExit(f"--own-sensitivity: the calibration has no plan measured with {args.reference}")
        args.probe_samples, args.probe_seq_len = own["probe"]["num_samples"], own["probe"]["seq_len"]
    probe = chunk_tokens(tokenizer, split.calibration, num_samples=args.probe_samples, seq_len=args.probe_seq_len,
                         seed=args.seed + 1000)
    if args.own_sensitivity and probe.manifest()["samples"] != own["probe"]["samples"]:
        raise SystemExit("--own-sensitivity: the calibration's probe windows differ from the ones drawn here")
    meas = out / "measure.json"
    cal_sha = sha256_of_files([Path(args.calibration)])
    src_sha = sha256_of_files([Path(args.sensitivity_from)]) if args.sensitivity_from else None
    if meas.exists():
        m = json.loads(meas.read_text())
        check_cached(m, model=args.model, tp=args.tp, reference=args.reference, error_feedback=args.error_feedback,
                     probe=probe.manifest(), codecs=[args.reference, *args.codecs], path=meas,
                     sensitivity=args.sensitivity, own_sensitivity=args.own_sensitivity,
                     calibration_sha256=cal_sha, sensitivity_from=src_sha)
        sens, errs = nan_for_null(m["sensitivity_kl"]), nan_for_null(m["mse"])  # non-finite: written as null
    else:
        # checked before the errors are measured (minutes): a source for another setup is refused at once
        reused = sensitivity_from(args, probe.manifest(), cal_sha, list(cal.layers)) if args.sensitivity_from else None
        t0 = time.perf_counter()
        codecs = list(dict.fromkeys([args.reference, *args.codecs]))
        errs = layer_errors(model, probe.input_ids, cal, tp=args.tp, codecs=codecs, name=info.name)
        t1 = time.perf_counter()
        measure = layer_marginal_kl if args.sensitivity == "in-context" else layer_sensitivity
        if reused is not None:
            sens = reused
        elif args.own_sensitivity:
            sens = own["sensitivity_kl"]
        else:
            sens = measure(model, probe.input_ids, cal, tp=args.tp, codec=args.reference, name=info.name,
                           error_feedback=args.error_feedback)
        t2 = time.perf_counter()
        meas.write_text(json_text({"model": args.model, "tp": args.tp, "reference": args.reference,
                                    "error_feedback": args.error_feedback, "sensitivity": args.sensitivity,
                                    "own_sensitivity": bool(args.own_sensitivity), "calibration_sha256": cal_sha,
                                    "sensitivity_from": src_sha, "sensitivity_from_path": args.sensitivity_from,
                                    "probe": probe.manifest(), "sensitivity_kl": sens, "mse": errs,
                                    "seconds": {"errors": round(t1 - t0, 1), "sensitivity": round(t2 - t1, 1)}},
                                   indent=1))
    plans = {}
    for budget in args.budgets:
        plan = allocate_many(sens, errs, reference=args.reference, codecs=args.codecs, budget=budget,
                             calibration=cal)
        plans[f"alloc-{budget:g}"] = plan
    for budget in args.two:
        plans[f"alloc2-{budget:g}"] = allocate(sens, low=args.reference, high=args.high, budget=budget,
                                               calibration=cal)
    # The probe windows this study read, plus the calibration's own probe (if its plan is
    # evaluated): the dev split avoids them all.
    excl = probe.manifest()
    if own and own.get("probe") and own["probe"]["samples"] != excl["samples"]:
        if own["probe"]["seq_len"] != excl["seq_len"]:
            raise SystemExit("the calibration's probe has another window length")
        excl = {**excl, "samples": excl["samples"] + own["probe"]["samples"]}
        excl["num_samples"] = len(excl["samples"])
    extra = extra_plans(args.eval_plans, cal, Calibration.load)
    for name, plan in extra.items():
        excl = merge_probes(excl, plan.get("probe"), name)
    for name, plan in plans.items():
        plan["probe"] = excl
        c2 = copy.copy(cal)
        c2.meta = {**cal.meta, "bit_allocation": plan}
        path = out / f"{name}.safetensors"
        c2.save(path)
        counts = plan.get("counts") or {plan["high"]: plan["n_high"]}
        print(f"{path}: mean {plan['mean_bits']:.4f} bits, {counts}, predicted KL {plan.get('predicted_kl', 0):.5f}")
    if args.eval_samples:
        from lowbit_tp.codecs import register_codec
        from lowbit_tp.codecs.mixed import AllocatedCodec
        from lowbit_tp.evaluation import evaluate_codecs
        from lowbit_tp.evaluation.records import DEV_COLUMNS

        if own:
            plans["alloc-own"] = own
        plans.update(extra)
        for name, plan in plans.items():
            register_codec(name, lambda _p=plan, **kw: AllocatedCodec(plan=_p, **kw), needs_calibration=True)
        c2 = copy.copy(cal)
        c2.meta = {**cal.meta, "bit_allocation": {**(own or next(iter(plans.values()))), "probe": excl}}
        cfg = dev_eval_config(args, plans, text)
        res = evaluate_codecs(cfg, bundle=(model, tokenizer, info), calibration=c2)
        print(res.table(DEV_COLUMNS))
        if args.json:
            plans_json = {n: {k: v for k, v in p.items() if k not in ("mse", "sensitivity_kl", "probe")}
                          for n, p in plans.items()}
            Path(args.json).write_text(json_text({"args": vars(args), **res.to_json(), "plans": plans_json}, indent=1))


if __name__ == "__main__":
    main()
