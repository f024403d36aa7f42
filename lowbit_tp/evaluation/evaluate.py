"""Evaluate codecs on a real model through the TP simulator, against the unmodified model."""
from __future__ import annotations

import math
import time
from dataclasses import asdict
from typing import Any, Sequence

import torch
from tqdm import tqdm

from lowbit_tp.calibration import Calibration
from lowbit_tp.codecs import make_codec
from lowbit_tp.configs import DEFAULT_ALGORITHM, CalibrationConfig, EvalConfig
from lowbit_tp.data import chunk_tokens, lambada_passages, load_split, token_char_spans, window_spans
from lowbit_tp.evaluation.metrics import LMComparison, bootstrap_ci, last_word_correct, mean_per_token
from lowbit_tp.evaluation.records import CodecEvalRow, EvalResult
from lowbit_tp.models import load_model
from lowbit_tp.simulator import TPSimulator

def eval_inputs(cfg: EvalConfig, tokenizer, info, calibration=None, *, warn=None):
    """What every evaluation path reads: the checked calibration, the text split, the
    evaluation token windows and the last-word items, all fixed by ``cfg``.

    ``cfg.split == "test"``: windows and items from the evaluation (held-out) side.
    ``"dev"``: from the calibration side, never overlapping a window the calibration read
    (:func:`dev_exclusions`). Returns ``(calibration, split, chunks, items, split_info)``.
    """
    # fails before any model work on an artifact for another run
    calibration = Calibration.load_for(calibration if calibration is not None else cfg.calibration, tp=cfg.tp,
                                       model=info)
    split = load_split(cfg.text, glob=cfg.text_glob)
    if cfg.split == "test":
        docs, exclude, info_ = split.evaluation, {}, {"name": "test", "documents": [d.name for d in split.evaluation]}
    else:
        docs = split.calibration
        exclude, source = dev_exclusions(tokenizer, split, calibration)
        info_ = {"name": "dev", "documents": [d.name for d in docs],
                 "excluded": source, "excluded_windows": sum(len(v) for v in exclude.values())}
    chunks = chunk_tokens(tokenizer, docs, num_samples=cfg.samples, seq_len=cfg.seq_len, seed=cfg.seed,
                          exclude=exclude)
    items = ()
    if cfg.lambada:
        chars = token_char_spans(tokenizer, docs, exclude) if exclude else None
        items = lambada_passages(tokenizer, docs, num_passages=cfg.lambada, context_tokens=cfg.lambada_context,
                                 seed=cfg.seed, exclude_chars=chars, warn=warn)
    return calibration, split, chunks, items, info_


def dev_exclusions(tokenizer, split, calibration=None) -> tuple[dict[str, list[tuple[int, int]]], str]:
    """Token spans (by document sha256) the dev split must avoid, and where they come from.

    With a calibration: every window it recorded (its statistics windows and, if it has
    a bit allocation, the probe windows). Without: the windows a default
    ``lowbit-tp calibrate`` draws from this split (same text, default samples, length, seed).
    """
    manifests = []
    if calibration is not None:
        text = calibration.meta.get("text", {})
        if text.get("side", "calibration") != "calibration":
            raise ValueError("the dev split needs a calibration made on the calibration side of the text")
        manifests.append(text["chunks"])
        probe = calibration.meta.get("bit_allocation", {}).get("probe")
        if probe:
            manifests.append(probe)
        source = f"the calibration's {sum(len(m['samples']) for m in manifests)} windows"
    else:

        d = CalibrationConfig()
        manifests.append(chunk_tokens(tokenizer, split.calibration, num_samples=d.samples, seq_len=d.seq_len,
                                      seed=d.seed).manifest())
        source = f"the {d.samples} windows of a default calibration (no calibration given)"
    out: dict[str, list[tuple[int, int]]] = {}
    for m in manifests:
        for sha, spans in window_spans(m).items():
            out.setdefault(sha, []).extend(spans)
    return out, source


def result_record(cfg: EvalConfig, info, split, chunks, items, calibration, rows: Sequence[CodecEvalRow],
                  split_info: dict | None = None) -> EvalResult:
    """The whole result: config, model identity, the exact text used, calibration, rows."""
    return EvalResult(
        config=asdict(cfg),
        model={"name": info.name, "weights_sha256": info.weights_sha256, "model_type": info.model_type},
        text={"description": split.description, "split": split_info or {"name": cfg.split},
              "chunks": chunks.manifest(),
              "lambada": [it.manifest() for it in items]},
        calibration=None if calibration is None else {"fingerprint": calibration.fingerprint(),
                                                      "text": calibration.meta.get("text", {}).get("description"),
                                                      "config": calibration.meta.get("config")},
        rows=tuple(rows),
    )


def lambada_intervals(hits: Sequence[bool], baseline_hits: Sequence[bool] | None) -> dict[str, list[float] | None]:
    """95% bootstrap intervals over last-word items: the codec's accuracy
    (``lambada_acc_ci95``) and, paired on the same items, its accuracy minus the unmodified
    model's (``lambada_acc_delta_ci95``, needs ``baseline_hits``). None below 2 items."""
    if len(hits) < 2:
        return {"lambada_acc_ci95": None, "lambada_acc_delta_ci95": None}
    per_item = {"tokens": [1.0] * len(hits), "hits": [float(h) for h in hits]}
    out = {"lambada_acc_ci95": bootstrap_ci(per_item, mean_per_token("hits")), "lambada_acc_delta_ci95": None}
    if baseline_hits is not None:
        if len(baseline_hits) != len(hits):
            raise ValueError(f"{len(hits)} last-word hits, but {len(baseline_hits)} of the baseline")
        per_item["base"] = [float(h) for h in baseline_hits]
        out["lambada_acc_delta_ci95"] = bootstrap_ci(per_item, lambda s: (s["hits"] - s["base"]) / s["tokens"])
    return out


def result_row(cfg: EvalConfig, info, codec: str, comparison: dict, stats, lambada_hits: Sequence[bool],
               lambada_baseline: float, seconds: float, *, num_layers: int,
               lambada_baseline_hits: Sequence[bool] | None = None) -> CodecEvalRow:
    """One codec's result row, shared by the simulator and the real-runtime evaluation.
    ``comparison`` is :meth:`LMComparison.result`; ``num_layers`` counts row-parallel layers;
    ``lambada_baseline_hits`` (the unmodified model's per-item hits) gives the paired interval
    of the accuracy change."""
    acc = sum(lambada_hits) / len(lambada_hits) if lambada_hits else float("nan")
    return CodecEvalRow(
        model=info.name, tp=cfg.tp, codec=codec, algorithm=cfg.algorithm, split=cfg.split,
        error_feedback=cfg.error_feedback,
        **comparison,
        lambada_acc=acc, lambada_acc_baseline=lambada_baseline,
        bits_per_value=stats.bits_per_value,
        ring_equiv_bits=stats.ring_equiv_bits,
        # all row-parallel layers together, per token that went through the model
        bytes_sent_per_rank_per_token=stats.bytes_sent * num_layers / max(1, stats.values // info.hidden_size),
        ppl_increase_pct=100.0 * (comparison["ppl"] / comparison["ppl_baseline"] - 1.0),
        pct_of_baseline_lambada=100.0 * acc / lambada_baseline if lambada_baseline else float("nan"),
        seconds=round(seconds, 2),
        **lambada_intervals(lambada_hits, lambada_baseline_hits),
    )


def _lambada(model, items, batch_size: int) -> list[bool]:
    out = []
    for i in range(0, len(items), batch_size):
        group = items[i:i + batch_size]
        seqs = [list(it.context_ids) + list(it.target_ids[:-1]) for it in group]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        for j, s in enumerate(seqs):  # right padding: earlier positions never see it (causal)
            ids[j, :len(s)] = torch.tensor(s)
        logits = model(ids).logits
        for j, it in enumerate(group):
            out.append(last_word_correct(logits[j], len(it.context_ids), list(it.target_ids)))
    return out


def evaluate_codecs(cfg: EvalConfig, *, bundle=None, calibration=None, progress: bool = True,
                    warn=None) -> EvalResult:
    """Baseline once, then every codec of ``cfg.codecs``; returns an :class:`EvalResult`
    with one :class:`CodecEvalRow` per codec.

    Metrics per codec: perplexity (baseline and codec), mean per-token KL(baseline || codec),
    top-1 next-token agreement, last-word accuracy, and wire bits/value measured from the
    payloads the simulated collectives produced. ``warn(message)`` reports what is used in
    place of what was asked (fewer last-word items than ``cfg.lambada``); default
    :func:`warnings.warn`.
    """
    model, tokenizer, info = bundle if bundle is not None else load_model(cfg.model)
    calibration, split, chunks, items, split_info = eval_inputs(cfg, tokenizer, info, calibration, warn=warn)
    sims = {name: TPSimulator(model, tp=cfg.tp, name=info.name, algorithm=cfg.algorithm,
                              error_feedback=cfg.error_feedback,
                              codec=make_codec(name, calibration=calibration, **cfg.codec_options.get(name, {})))
            for name in cfg.codecs}
    comps = {name: LMComparison() for name in cfg.codecs}
    seconds = {name: 0.0 for name in cfg.codecs}
    batches = list(chunks.input_ids.split(cfg.batch_size))
    # closed on an error too: the CLI's one-line error then starts its own line, after the bar
    with tqdm(total=len(batches) * (1 + len(sims)), desc="eval", unit="fwd", disable=not progress) as bar, \
            torch.no_grad():
        for ids in batches:
            base = model(ids).logits
            bar.update(1)
            for name, sim in sims.items():
                t0 = time.perf_counter()
                with sim:
                    logits = model(ids).logits
                seconds[name] += time.perf_counter() - t0
                comps[name].update(ids, base, logits)
                bar.update(1)
        lam_base = _lambada(model, items, cfg.batch_size)
        lam = {}
        for name, sim in sims.items():
            with sim:
                lam[name] = _lambada(model, items, cfg.batch_size)
    base_acc = sum(lam_base) / len(lam_base) if lam_base else float("nan")
    rows = [result_row(cfg, info, name, comps[name].result(), sim.comm_stats(), lam[name], base_acc,
                       seconds[name], num_layers=len(sim.layers), lambada_baseline_hits=lam_base)
            for name, sim in sims.items()]
    return result_record(cfg, info, split, chunks, items, calibration, rows, split_info)


def calibrate_and_evaluate(model: str, tp: int, codecs: Sequence[str], *, algorithm: str = DEFAULT_ALGORITHM,
                           samples: int = 32, cal_samples: int = 64, lambada: int = 128, batch_size: int = 8,
                           split: str = "test", seed: int = EvalConfig.seed, bundle=None, progress: bool = True,
                           **cal_options) -> EvalResult:
    """Calibrate ``model`` at ``tp`` on the calibration text, then evaluate ``codecs`` on the
    ``split`` (``test``: held-out text; ``dev``: calibration works off the calibration windows).

    ``seed`` picks the evaluation windows (:class:`EvalConfig`); ``cal_options`` go to
    :class:`CalibrationConfig` (e.g. ``allocate=4.5`` for codec ``alloc``).
    """
    # Not at the top: calibration.pipeline -> calibration.allocate -> evaluation (metrics) would be a cycle.
    from lowbit_tp.calibration.pipeline import calibrate

    bundle = bundle if bundle is not None else load_model(model)
    cal = calibrate(CalibrationConfig(model=model, tp=tp, samples=cal_samples, batch_size=batch_size, **cal_options),
                    bundle=bundle, progress=progress)
    return evaluate_codecs(EvalConfig(model=model, tp=tp, codecs=tuple(codecs), algorithm=algorithm,
                                      samples=samples, lambada=lambada, batch_size=batch_size, split=split,
                                      seed=seed),
                           bundle=bundle,
                           calibration=cal, progress=progress)


def setup_tag(result: dict[str, Any]) -> str:
    """A result's collective set-up as a row-name suffix: ``@ALGORITHM``, plus ``+ef`` or
    ``+ef=MODE`` when its all-reduces fed their error forward (``@two-shot+ef=first-stage``)."""
    cfg = result["config"]
    ef = cfg.get("error_feedback", False)
    return f"@{cfg.get('algorithm')}" + ("" if not ef else "+ef" if ef is True else f"+ef={ef}")


def _per_sequence(res: dict[str, Any]) -> dict[str, Any] | None:
    """A result's per-window sums (its first row's; every row of one run has the same baseline)."""
    return res["rows"][0].get("per_sequence") if res["rows"] else None


def _same_baseline(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two results' rows (both with per-window sums) saw the same unmodified model on the
    same windows: every window's token count and baseline NLL sum agree (to float noise: a
    baseline is recomputed in each run)."""
    sa, sb = _per_sequence(a), _per_sequence(b)
    if sa["tokens"] != sb["tokens"] or len(sa["nll_base"]) != len(sb["nll_base"]):
        return False
    return all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-6) for x, y in zip(sa["nll_base"], sb["nll_base"]))


def merge_results(results: Sequence[dict[str, Any]], *, by_setup: bool = False,
                  labels: Sequence[str] | None = None) -> dict[str, Any]:
    """One result from several ``lowbit-tp eval`` results of the same model, TP, split,
    windows and calibration (e.g. codecs evaluated in groups); rows in the given order.
    Refuses results that were not measured on the same text or calibration, or (unless
    ``by_setup``) with another algorithm or error feedback. ``by_setup``: the results may
    differ in those two, and each row's codec name gets its result's :func:`setup_tag`
    (``default@two-shot+ef=first-stage``), so one codec's rows under several set-ups pair.
    ``labels`` (one per result): the results may come from other calibrations of the same model
    and TP (e.g. other Fisher weights), provided each window's baseline NLL agrees, and each row's
    codec name gets ``@LABEL``; with ``by_setup``, its set-up tag follows."""
    if not results:
        raise ValueError("no results to merge")
    if labels is not None and (len(labels) != len(results) or len(set(labels)) < len(labels)):
        raise ValueError(f"labels must name each result once, got {list(labels)} for {len(results)} results")
    first = results[0]

    def same(res) -> tuple:
        cfg = res["config"]
        setup = () if by_setup else (cfg.get("algorithm"), cfg.get("error_feedback", False))
        cal = () if labels is not None else (res["calibration"] and res["calibration"]["fingerprint"],)
        return (cfg["model"], cfg["tp"], cfg.get("split"), *setup, res["text"]["chunks"], *cal)

    for i, res in enumerate(results[1:], 1):
        if same(res) != same(first):
            what = "" if by_setup else ", algorithm or error feedback (--by-setup pairs those)"
            cal = "" if labels is not None else " or calibration"
            raise ValueError(f"result {i} was measured on other windows, model, split{what}{cal} than result 0")
        bare = next((k for k, r in ((0, first), (i, res)) if not _per_sequence(r)), None) if labels is not None else None
        if bare is not None:
            raise ValueError(f"result {bare} has no per-window sums (per_sequence): results of other calibrations "
                             f"pair only by them")
        if labels is not None and not _same_baseline(res, first):
            raise ValueError(f"result {i}'s baseline NLL differs from result 0's on the same windows: "
                             f"not the same model weights, so its rows cannot be paired")
    out = dict(first)

    def name(row, i, res):
        return row["codec"] + ("" if labels is None else f"@{labels[i]}") + (setup_tag(res) if by_setup else "")

    out["rows"] = [{**row, "codec": name(row, i, res)} for i, res in enumerate(results) for row in res["rows"]]
    names = [row["codec"] for row in out["rows"]]
    if (by_setup or labels is not None) and len(set(names)) < len(names):  # a pair would take the first of them
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"rows named {', '.join(twice)} appear more than once (the same codec and set-up in two results)")
    out["config"] = {**first["config"], "codecs": [row["codec"] for row in out["rows"]]}
    if labels is not None:  # no one calibration stands for the merged rows
        out["calibration"] = None
        out["calibrations"] = {label: res["calibration"] for label, res in zip(labels, results)}
    return out
