"""The Fisher pass of ``lowbit-tp calibrate --fisher-weights N``: per-channel weights for the
``+fisher`` codecs, measured on calibration windows only.

Two passes over the same windows: the diagonal Fisher of the model's own next-token
distribution at every all-reduce output (``N`` sampled label draws, one backward pass
each), and the mean square of every rank's partial (the TP simulator's observer). The
weights are :func:`lowbit_tp.calibration.weights.fisher_channel_weights` of the two, with
the mean squares summed over ranks (one vector per layer, shared by all ranks).
"""
from __future__ import annotations

import time
from typing import Any

import torch

from lowbit_tp.calibration.artifact import Calibration, CalibrationError
from lowbit_tp.calibration.weights import fisher_channel_weights
from lowbit_tp.data import TokenChunks, chunk_tokens, load_split
from lowbit_tp.simulator import TPSimulator

__all__ = ["calibration_windows", "diagonal_fisher", "partial_mean_squares", "fisher_weights", "add_fisher_weights"]

FORMULA = "w_j**2 ∝ sqrt(F_j / sum_r E[y_rj**2]), mean(w**2) = 1; F: diagonal Fisher at the all-reduce output"


def diagonal_fisher(model: Any, input_ids: torch.Tensor, *, layers: list[str], draws: int, seed: int = 0,
                    batch_size: int = 4, per_token: bool = False) -> dict[str, torch.Tensor]:
    """``F[t, j] = E_y (d log p(y) / d h[t, j])**2`` at the output ``h`` of every module in
    ``layers`` (the row-parallel layers, whose output is the all-reduce's), ``y`` drawn from
    the model's own next-token distribution at every position (``draws`` draws, a
    ``torch.Generator`` seeded with ``seed``), ``log p(y)`` summed over a window's positions.

    Returns ``layer -> [E]``, the mean over tokens, or ``[T, E]`` per token (``per_token``,
    tokens in ``input_ids`` order). The model's weights get no gradients.
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    mods = dict(model.named_modules())
    missing = [n for n in layers if n not in mods]
    if missing:
        raise CalibrationError(f"the model has no module {missing[0]!r}; was the calibration made for another model?")
    outs: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, inputs, output):
            outs[name] = output
        return hook

    hooks = [mods[n].register_forward_hook(keep(n)) for n in layers]
    # the weights need no gradient, so make the activations carry one from the embeddings on
    hooks.append(model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True)))
    g = torch.Generator().manual_seed(seed)
    acc: dict[str, Any] = {}
    try:
        with torch.enable_grad():
            for b, ids in enumerate(input_ids.split(batch_size)):
                for _ in range(draws):
                    lp = torch.log_softmax(model(ids).logits.float(), -1)
                    y = torch.multinomial(lp.detach().exp().reshape(-1, lp.shape[-1]), 1, generator=g)
                    loss = lp.reshape(-1, lp.shape[-1]).gather(-1, y).sum()
                    grads = torch.autograd.grad(loss, [outs[n] for n in layers])
                    for n, gr in zip(layers, grads):
                        sq = gr.detach().reshape(-1, gr.shape[-1]).float().pow(2) / draws
                        if per_token:
                            rows = acc.setdefault(n, {})
                            rows[b] = rows.get(b, 0.0) + sq
                        else:
                            acc[n] = acc.get(n, 0.0) + sq.sum(0)
                    outs.clear()
    finally:
        for h in hooks:
            h.remove()
    if per_token:
        return {n: torch.cat([acc[n][b] for b in sorted(acc[n])]) for n in layers}
    return {n: acc[n] / input_ids.numel() for n in layers}


def partial_mean_squares(model: Any, input_ids: torch.Tensor, *, tp: int, name: str = "",
                         batch_size: int = 8) -> dict[str, torch.Tensor]:
    """``layer -> [tp, E]``: the mean over tokens of each rank's partial squared, per channel
    (the simulated TP split of ``model``)."""
    sums: dict[str, torch.Tensor] = {}

    def observe(layer, partials, total):
        sq = torch.stack([p.detach().reshape(-1, p.shape[-1]).float().pow(2).sum(0) for p in partials])
        sums[layer] = sums[layer] + sq if layer in sums else sq

    with torch.no_grad(), TPSimulator(model, tp=tp, observer=observe, name=name):
        for ids in input_ids.split(batch_size):
            model(ids)
    return {n: s / input_ids.numel() for n, s in sums.items()}


def fisher_weights(model: Any, input_ids: torch.Tensor, *, layers: list[str], tp: int, draws: int, seed: int = 0,
                   name: str = "", batch_size: int = 4) -> dict[str, torch.Tensor]:
    """``layer -> [E]`` shared channel weights (module docstring) from ``input_ids``."""
    fisher = diagonal_fisher(model, input_ids, layers=layers, draws=draws, seed=seed, batch_size=batch_size)
    ms = partial_mean_squares(model, input_ids, tp=tp, name=name, batch_size=batch_size)
    return {n: fisher_channel_weights(fisher[n], ms[n].sum(0)) for n in layers}


def calibration_windows(cal: Calibration, tokenizer: Any) -> TokenChunks:
    """The windows ``cal`` was calibrated on, drawn again from its recorded config and checked
    against the manifest it stores (a :class:`CalibrationError` when they differ)."""
    cfg = cal.meta.get("config") or {}
    recorded = (cal.meta.get("text") or {}).get("chunks") or {}
    if cfg.get("side", "calibration") != "calibration" or "samples" not in recorded:
        raise CalibrationError("this calibration does not record calibration-side windows to draw again")
    split = load_split(cfg.get("text"), glob=cfg.get("text_glob", "*"))
    chunks = chunk_tokens(tokenizer, split.calibration, num_samples=recorded["num_samples"],
                          seq_len=cfg["seq_len"], seed=cfg["seed"])
    if chunks.manifest()["samples"] != recorded["samples"]:
        raise CalibrationError("the calibration's windows cannot be drawn again from this text and tokenizer")
    return chunks


def add_fisher_weights(cal: Calibration, model: Any, chunks: TokenChunks, *, draws: int, windows: int,
                       seed: int = 0, name: str = "", batch_size: int = 4) -> Calibration:
    """``cal`` with Fisher channel weights from the first ``windows`` of ``chunks`` (which
    must be ``cal``'s calibration windows) and ``draws`` label draws."""
    if not 1 <= windows <= chunks.input_ids.shape[0]:
        raise ValueError(f"fisher windows must be in [1, {chunks.input_ids.shape[0]}] (the calibration's "
                         f"windows), got {windows}")
    t0 = time.perf_counter()
    ids = chunks.input_ids[:windows]
    weights = fisher_weights(model, ids, layers=cal.layers, tp=cal.tp, draws=draws, seed=seed, name=name,
                             batch_size=batch_size)
    prov = chunks.manifest()["samples"][:windows]
    info = {"method": "fisher", "formula": FORMULA, "shared_over_sources": True, "draws": draws,
            "windows": windows, "tokens": int(ids.numel()), "seed": seed, "samples": prov,
            "seconds": round(time.perf_counter() - t0, 2)}
    return cal.with_channel_weights(weights, info)
