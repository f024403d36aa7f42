"""The Fisher predictor of a codec's KL (dev work; shared by kl_anatomy.py and ecsq_screen.py).

On calibration windows: the diagonal Fisher of the model's own next-token distribution at
every all-reduce output, ``F[t, j] = E_y (d log p(y) / d h[t, j])**2`` (``y`` drawn from
the model, one backward pass per draw), and every layer's TP partials. Then
``0.5 * sum F * err**2 / T`` predicts the KL per token that an all-reduce error ``err``
at that layer causes (checked against measured single-layer KLs in docs/design-dev.md).
"""
from __future__ import annotations

import argparse
from typing import Any, NamedTuple

import torch


def add_capture_args(ap: argparse.ArgumentParser) -> None:
    """The arguments of every screen that captures on calibration windows: the model, its TP
    degree, the calibration whose windows are read, how many, and the Fisher's label draws."""
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tp", type=int, default=3)
    ap.add_argument("--calibration", required=True)
    ap.add_argument("--windows", type=int, default=4, help="calibration windows used (even)")
    ap.add_argument("--draws", type=int, default=4, help="sampled label draws for the Fisher")


class Capture(NamedTuple):
    cal: Any
    model: Any
    tokenizer: Any
    info: Any
    ids: torch.Tensor  # [windows, seq_len]
    names: list  # the calibration's row-parallel layers
    hidden: int


def load_capture(args: argparse.Namespace) -> Capture:
    """Seed torch (0), load ``args.calibration`` and ``args.model``, and draw the first
    ``args.windows`` calibration windows (:func:`calibration_windows`)."""
    from lowbit_tp.calibration import Calibration
    from lowbit_tp.models import load_model

    torch.manual_seed(0)
    cal = Calibration.load(args.calibration)
    model, tokenizer, info = load_model(args.model, progress=False)
    ids = calibration_windows(cal, tokenizer, args.windows)
    return Capture(cal, model, tokenizer, info, ids, list(cal.meta["layers"]), cal.hidden_size)


def calibration_windows(cal, tokenizer, windows: int) -> torch.Tensor:
    """The first ``windows`` calibration windows of ``cal`` (the artifact lists them, so
    ``eval --split dev`` never reads them); ``[windows, seq_len]`` token ids."""
    from lowbit_tp.calibration.fisher import calibration_windows as windows_of

    return windows_of(cal, tokenizer).input_ids[:windows]


def diagonal_fisher(model, ids: torch.Tensor, names: list[str], hidden: int, *, draws: int) -> dict:
    """``{layer: F [tokens, hidden]}`` at every all-reduce output: the library's Fisher pass
    (``lowbit_tp.calibration.fisher``), per token."""
    from lowbit_tp.calibration.fisher import diagonal_fisher as fisher_of

    return {n: f.reshape(-1, hidden) for n, f in fisher_of(model, ids, layers=names, draws=draws, per_token=True).items()}


def tp_partials(model, ids: torch.Tensor, *, tp: int, name: str) -> dict:
    """``{layer: (partials [tp, tokens, E] fp32, exact sum [tokens, E] fp32)}``."""
    from lowbit_tp.simulator import TPSimulator

    parts: dict = {}

    def observe(layer, partials, total):
        parts[layer] = (torch.stack([p.float() for p in partials]).clone(), total.float().clone())

    with torch.no_grad(), TPSimulator(model, tp=tp, observer=observe, name=name):
        model(ids)
    return parts


def predicted_kl(fisher_layer: torch.Tensor, err: torch.Tensor, rows=slice(None)) -> float:
    """Predicted KL per token of the all-reduce error ``err [tokens, E]`` (the ``rows`` of
    the Fisher it was measured on)."""
    return 0.5 * float((fisher_layer[rows] * err.pow(2)).sum()) / err.shape[0]
