"""Calibrate a real model: run calibration text through the simulated TP model and record
per-channel statistics of every rank's partial and of their sum, for every row-parallel layer.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import torch
from tqdm import tqdm

import lowbit_tp
from lowbit_tp.calibration.allocate import allocate, allocate_many, layer_errors, layer_sensitivity
from lowbit_tp.calibration.artifact import Calibration, StatsAccumulator, default_outlier_k
from lowbit_tp.calibration.fisher import add_fisher_weights, calibration_windows
from lowbit_tp.codecs.static import topk_channels
from lowbit_tp.configs import CalibrationConfig
from lowbit_tp.data import chunk_tokens, load_split
from lowbit_tp.models import load_model
from lowbit_tp.simulator import TPSimulator



def versions() -> dict[str, str]:
    import transformers


    return {"lowbit_tp": lowbit_tp.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__}


def calibrate(cfg: CalibrationConfig, *, bundle: tuple[Any, Any, Any] | None = None,
              progress: bool = True) -> Calibration:
    """Run the calibration and return the artifact (not yet saved).

    ``bundle``: an already loaded ``(model, tokenizer, ModelInfo)``; loaded from
    ``cfg.model`` when None.
    """
    model, tokenizer, info = bundle if bundle is not None else load_model(cfg.model)
    split = load_split(cfg.text, glob=cfg.text_glob)
    if cfg.side not in ("calibration", "evaluation"):
        raise ValueError(f"side must be 'calibration' or 'evaluation', got {cfg.side!r}")
    docs = split.calibration if cfg.side == "calibration" else split.evaluation
    chunks = chunk_tokens(tokenizer, docs, num_samples=cfg.samples, seq_len=cfg.seq_len, seed=cfg.seed)
    acc = StatsAccumulator(ema_decay=cfg.ema_decay)

    def observe(layer, partials, total):
        for r, p in enumerate(partials):
            acc.update(layer, r, p)
        acc.update(layer, "sum", total)

    t0 = time.perf_counter()
    batches = list(chunks.input_ids.split(cfg.batch_size))
    # the bar is closed on an error too, so the CLI's one-line error starts its own line
    with _progress(len(batches), "calibrate", progress) as bar, torch.no_grad(), \
            TPSimulator(model, tp=cfg.tp, observer=observe, name=info.name) as sim:
        for ids in batches:
            model(ids)
            bar.update(1)
    hidden = info.hidden_size
    k = default_outlier_k(hidden) if cfg.k is None else cfg.k
    if not 0 <= k <= hidden:
        raise ValueError(f"k={k} kept channels is outside [0, hidden size {hidden}]")
    meta = {
        "model": {"name": info.name, "weights_sha256": info.weights_sha256, "model_type": info.model_type,
                  "source": info.source},
        "tp": cfg.tp,
        "hidden_size": hidden,
        "k": k,
        "statistic": (f"per-channel EMA (decay {cfg.ema_decay}) of batch min and max, plus running absmax, "
                      f"over each rank's partial and over the reduced sum; top-k by EMA range"),
        "ema_decay": cfg.ema_decay,
        "config": asdict(cfg),
        "text": {"description": split.description, "side": cfg.side, "chunks": chunks.manifest()},
        "versions": versions(),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    cal = acc.build(meta, layers=sim.layer_names)
    cal.meta["topk_channels"] = {
        layer: {str(src): topk_channels(cal.get(layer, src).range, k).tolist() for src in [*range(cfg.tp), "sum"]}
        for layer in cal.layers
    }
    if cfg.allocate is not None:
        probe = chunk_tokens(tokenizer, docs, num_samples=cfg.alloc_samples, seq_len=min(cfg.seq_len, 128),
                             seed=cfg.seed + 1000)
        sens = layer_sensitivity(model, probe.input_ids, cal, tp=cfg.tp, codec=cfg.alloc_low, name=info.name,
                                 progress=progress, error_feedback=cfg.alloc_error_feedback)
        try:
            if cfg.alloc_codecs:
                errs = layer_errors(model, probe.input_ids, cal, tp=cfg.tp, name=info.name,
                                    codecs=list(dict.fromkeys([cfg.alloc_low, *cfg.alloc_codecs])))
                cal.meta["bit_allocation"] = allocate_many(sens, errs, reference=cfg.alloc_low,
                                                           codecs=cfg.alloc_codecs, budget=cfg.allocate,
                                                           calibration=cal)
            else:
                cal.meta["bit_allocation"] = allocate(sens, low=cfg.alloc_low, high=cfg.alloc_high,
                                                      budget=cfg.allocate, calibration=cal)
            cal.meta["bit_allocation"]["probe"] = probe.manifest()
            cal.meta["bit_allocation"]["error_feedback"] = bool(cfg.alloc_error_feedback)
        except ValueError as exc:  # e.g. a hidden size so small that the budget is out of reach
            cal.meta["bit_allocation_error"] = str(exc)
    if cfg.fisher_draws:
        cal = add_fisher_weights(cal, model, chunks, draws=cfg.fisher_draws, windows=min(cfg.fisher_windows, cfg.samples),
                                 seed=cfg.seed, name=info.name)
    return cal


def fisher_from(cfg: CalibrationConfig, source: Calibration | str, *,
                bundle: tuple[Any, Any, Any] | None = None) -> Calibration:
    """An existing calibration plus Fisher channel weights (``cfg.fisher_draws`` draws over
    its first ``cfg.fisher_windows`` calibration windows, drawn again from its own record);
    its statistics and allocation are kept. ``bundle`` as in :func:`calibrate`."""
    model, tokenizer, info = bundle if bundle is not None else load_model(cfg.model)
    cal = Calibration.load_for(source, tp=cfg.tp, model=info)
    seed = int((cal.meta.get("config") or {}).get("seed", 0))
    return add_fisher_weights(cal, model, calibration_windows(cal, tokenizer), draws=cfg.fisher_draws,
                              windows=cfg.fisher_windows, seed=seed, name=info.name)


def _progress(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, disable=not enabled, unit="batch")
