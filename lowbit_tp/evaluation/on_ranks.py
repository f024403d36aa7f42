"""Codec quality measured on the real multi-process TP runtime (``lowbit-tp eval --runtime tp``).

The counterpart of :func:`lowbit_tp.evaluation.evaluate_codecs`, which runs the
single-process simulator: same evaluation windows (``load_split`` + ``chunk_tokens`` with
``cfg.seed``), same last-word items, same metrics (:class:`LMComparison`), same row keys
plus ``"runtime": "tp"``. Because simulator and runtime share the codec and reduction code
(one implementation of the arithmetic) the two agree exactly; ``tests/test_runtime_eval.py`` holds them to that.

Who computes what:

* the parent loads the unmodified model once, draws the windows, computes the baseline
  logits batch by batch and writes them to a temporary directory (one ``torch.save`` file
  per batch, ``samples * seq_len * vocab * 4`` bytes in all: 1.6 GB for 32 x 256 tokens of
  a 49k vocabulary), computes the baseline last-word accuracy, then frees the model;
* ``cfg.tp`` spawned gloo ranks (:func:`eval_rank_main`) each load, check and shard the model with
  :func:`~lowbit_tp.runtime.startup.start_rank` (as generation does), once, and run every codec in turn by
  pointing the row-parallel layers at a fresh :class:`~lowbit_tp.tp.DistReducer`: full-sequence forwards
  (``use_cache=False``) over the windows, then the last-word items;
* rank 0 reads each batch's baseline logits, accumulates :class:`LMComparison` and returns
  its sums (numbers, not logits, unless ``keep_logits``); every rank returns its
  :class:`~lowbit_tp.collectives.CommStats`. Rows report rank 0's traffic, which is what
  the simulator counts.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from lowbit_tp.collectives import CommStats, spawn_ranks
from lowbit_tp.configs import RankOptions
from lowbit_tp.evaluation.evaluate import EvalConfig, _lambada, eval_inputs, result_record, result_row
from lowbit_tp.evaluation.records import EvalResult
from lowbit_tp.fileio import run_tempdir
from lowbit_tp.evaluation.metrics import LMComparison
from lowbit_tp.models import load_model
from lowbit_tp.runtime.startup import start_rank
from lowbit_tp.tp.row_parallel import DistReducer, RowParallelLinear

__all__ = ["eval_rank_main", "evaluate_codecs_tp"]


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()[:16]


def _use_reducer(model: torch.nn.Module, reducer: DistReducer) -> None:
    """Point every :class:`RowParallelLinear` of a sharded ``model`` at ``reducer`` (next codec)."""
    for m in model.modules():
        if isinstance(m, RowParallelLinear):
            m.reducer = reducer


def eval_rank_main(rank: int, world: int, cfg: EvalConfig, input_ids: torch.Tensor, items: Sequence,
                   baseline_dir: str, *, weights_sha256: str, keep_logits: bool = False,
                   group=None) -> dict[str, Any]:
    """One rank's evaluation of every codec of ``cfg``; all ranks of ``group`` call it together.

    ``input_ids [samples, seq_len]`` and ``items`` (last-word items) are the parent's, so
    every rank and the simulator see the same tokens. ``baseline_dir`` holds
    ``batch{b}.pt``, the unmodified model's logits of batch ``b`` (read by rank 0 only).
    ``weights_sha256`` is the parent's model hash: a rank that loaded other weights fails.

    Returns per codec: this rank's ``comm`` stats and forward ``seconds``; on rank 0 also the
    :class:`LMComparison` sums (``comparison``), last-word hits (``lambada``) and, with
    ``keep_logits``, the logits ``[samples, seq_len, vocab]``.
    """
    started = start_rank(rank, world, model=cfg.model, tp=cfg.tp, codecs=cfg.codecs, calibration=cfg.calibration,
                         algorithm=cfg.algorithm, codec_options=cfg.codec_options, weights_sha256=weights_sha256,
                         agree_on=lambda tokenizer: {
                             "input_ids_sha256": _digest(input_ids.tolist()),
                             "items_sha256": _digest([it.manifest() for it in items]), "batch_size": cfg.batch_size},
                         group=group, job="evaluation", error_feedback=cfg.error_feedback)
    model, codecs, shard = started.model, started.codecs, started.shard
    batches = list(input_ids.split(cfg.batch_size))
    out: dict[str, Any] = {"rank": rank, "shard": shard, "codecs": {}}
    with torch.no_grad():
        for name, codec in codecs.items():
            chain = started.reducer.feedback
            comm = DistReducer(codec=codec, group=group, algorithm=cfg.algorithm,
                               feedback=None if chain is None else chain.fresh(), in_place=started.reducer.in_place)
            _use_reducer(model, comm)
            comp, kept, seconds = LMComparison(), [], 0.0
            for b, ids in enumerate(batches):
                t0 = time.perf_counter()
                logits = model(ids, use_cache=False).logits
                seconds += time.perf_counter() - t0
                if rank == 0:
                    comp.update(ids, torch.load(Path(baseline_dir) / f"batch{b}.pt"), logits)
                    if keep_logits:
                        kept.append(logits)
            lam = _lambada(model, items, cfg.batch_size)
            row = {"config": codec.config(), "comm": comm.stats.as_dict(), "seconds": seconds}
            if rank == 0:
                row |= {"comparison": asdict(comp), "lambada": lam}
                if keep_logits:
                    row["logits"] = torch.cat(kept)
            out["codecs"][name] = row
    return out


def evaluate_codecs_tp(cfg: EvalConfig, *, timeout_s: float = RankOptions.timeout_s, deadline_s: float | None = None,
                       threads_per_rank: int = RankOptions.threads_per_rank, keep_logits: bool = False,
                       progress: bool = True, warn=None) -> EvalResult:
    """:func:`~lowbit_tp.evaluation.evaluate_codecs` on ``cfg.tp`` spawned ranks (gloo, CPU).

    ``cfg.model`` must be loadable by every rank (registry name or checkpoint path), and
    ``cfg.calibration`` a file path. ``timeout_s`` bounds each collective; ``deadline_s``
    (default ``timeout_s + 3600``) the whole spawned run. Returns the simulator path's
    :class:`EvalResult`; rows carry ``runtime="tp"``, and ``runtime`` at top level records the
    settings and each rank's shard and traffic. ``keep_logits`` adds rank 0's logits per
    codec under ``logits`` (tests; large for real vocabularies).
    Raises :class:`~lowbit_tp.collectives.RankFailure` if any rank fails.
    """
    from tqdm import tqdm

    model, tokenizer, info = load_model(cfg.model)
    # fails here, before spawning, on a wrong calibration artifact
    calibration, split, chunks, items, split_info = eval_inputs(cfg, tokenizer, info, warn=warn)
    batches = list(chunks.input_ids.split(cfg.batch_size))
    with run_tempdir("lowbit_tp_eval_baseline_") as base_dir:  # a SIGKILLed run's is removed by the next
        with torch.no_grad(), tqdm(batches, desc="baseline", unit="fwd", disable=not progress) as bar:
            for b, ids in enumerate(bar):
                torch.save(model(ids).logits, Path(base_dir) / f"batch{b}.pt")
            lam_base = _lambada(model, items, cfg.batch_size)
        del model  # the ranks load their own copies
        t0 = time.perf_counter()
        per_rank = spawn_ranks(eval_rank_main, cfg.tp, cfg, chunks.input_ids, tuple(items), base_dir,
                               weights_sha256=info.weights_sha256, keep_logits=keep_logits,
                               timeout_s=timeout_s, deadline_s=timeout_s + 3600.0 if deadline_s is None else deadline_s,
                               threads=threads_per_rank)
        wall_s = time.perf_counter() - t0

    base_acc = sum(lam_base) / len(lam_base) if lam_base else float("nan")
    rows, logits = [], {}
    for name in cfg.codecs:
        r0 = per_rank[0]["codecs"][name]
        row = result_row(cfg, info, name, LMComparison(**r0["comparison"]).result(), CommStats.from_dict(r0["comm"]),
                         r0["lambada"], base_acc, r0["seconds"], num_layers=2 * info.num_layers,
                         lambada_baseline_hits=lam_base)
        rows.append(row.on("tp"))
        if keep_logits:
            logits[name] = r0["logits"]
    runtime = {"kind": "tp", "timeout_s": timeout_s, "threads_per_rank": threads_per_rank,
               "wall_s": round(wall_s, 2),
               "per_rank": [{"rank": pr["rank"], "shard": pr["shard"],
                             "comm": {n: c["comm"] for n, c in pr["codecs"].items()}} for pr in per_rank]}
    return replace(result_record(cfg, info, split, chunks, items, calibration, rows, split_info),
                   runtime=runtime, logits=logits if keep_logits else None)
