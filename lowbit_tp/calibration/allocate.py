"""Measure each row-parallel layer's sensitivity and allocate bits under a global budget.

Sensitivity of layer L: mean per-token KL(baseline || model) when *only* L's all-reduce
uses a reference codec (every other layer exact), on a few calibration windows.

Two allocators, both keeping the mean bits/value (every layer moves the same number of
values per token) within the budget:

- :func:`allocate` (two codecs): the most sensitive layers get the wide codec, as many as
  the budget allows.
- :func:`allocate_many` (any number of candidate codecs): the KL of codec c at layer L is
  predicted as ``sensitivity[L] * mse[L][c] / mse[L][ref]``, where ``mse`` is the squared
  error of c's gather all-reduce on L's own partials (:func:`layer_errors`, one forward
  pass for all codecs; small independent errors add up in KL roughly in proportion to
  their energy). Every layer starts at the cheapest candidate; then the upgrade with the
  largest predicted KL saved per added bit is taken while the budget allows (the greedy
  rule of the multiple-choice knapsack).
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from lowbit_tp.calibration.artifact import Calibration
from lowbit_tp.codecs import make_codec
from lowbit_tp.codecs.mixed import AllocatedCodec
from lowbit_tp.collectives import simulate_all_reduce
from lowbit_tp.evaluation.metrics import LMComparison
from lowbit_tp.simulator import TPSimulator


def layer_sensitivity(model, ids: torch.Tensor, cal: Calibration, *, tp: int, codec: str, name: str | None = None,
                      progress: bool = True, error_feedback: bool = False) -> dict[str, float]:
    """KL caused by ``codec`` at each layer alone (gather collective), keyed by layer.

    ``error_feedback``: measured with error feedback along depth (the next layer, in bf16,
    sends the error back), i.e. the sensitivity that matters when the run uses it."""
    with torch.no_grad(), tqdm(cal.layers, desc="sensitivity", disable=not progress) as layers:
        base = model(ids).logits
        out = {}
        for layer in layers:
            plan = {"layers": {l: (codec if l == layer else "bf16") for l in cal.layers}}
            with TPSimulator(model, tp=tp, codec=AllocatedCodec(plan=plan, calibration=cal), algorithm="gather",
                             name=name, error_feedback=error_feedback):
                logits = model(ids).logits
            cmp = LMComparison()
            cmp.update(ids, base, logits)
            out[layer] = cmp.result()["kl"]
    return out


def layer_marginal_kl(model, ids: torch.Tensor, cal: Calibration, *, tp: int, codec: str, name: str | None = None,
                      progress: bool = True, error_feedback: bool = False) -> dict[str, float]:
    """KL saved by taking each layer alone back to bf16 while every other layer uses ``codec``
    (gather collective), keyed by layer; negative savings (noise) are clipped to 0.

    The sensitivity in context: with ``error_feedback`` a layer's error is sent back by a
    next layer that is itself quantized, and errors of many layers interact, which
    :func:`layer_sensitivity` (every other layer in bf16) does not see."""
    def kl(plan):
        with TPSimulator(model, tp=tp, codec=AllocatedCodec(plan={"layers": plan}, calibration=cal),
                         algorithm="gather", name=name, error_feedback=error_feedback):
            logits = model(ids).logits
        cmp = LMComparison()
        cmp.update(ids, base, logits)
        return cmp.result()["kl"]

    with torch.no_grad(), tqdm(cal.layers, desc="marginal KL", disable=not progress) as layers:
        base = model(ids).logits
        full = kl(dict.fromkeys(cal.layers, codec))
        return {layer: max(0.0, full - kl({l: ("bf16" if l == layer else codec) for l in cal.layers}))
                for layer in layers}


def layer_errors(model, ids: torch.Tensor, cal: Calibration, *, tp: int, codecs, name: str | None = None
                 ) -> dict[str, dict[str, float]]:
    """Mean squared error of each codec's gather all-reduce at each layer, on the exact
    model's own partials (one forward pass; every codec sees the same partials)."""
    made = {c: make_codec(c, calibration=cal) for c in codecs}
    sq: dict[str, dict[str, float]] = {}
    count: dict[str, int] = {}

    def observe(layer, partials, total):
        ref = total.float()
        row = sq.setdefault(layer, dict.fromkeys(made, 0.0))
        for c, codec in made.items():
            y = simulate_all_reduce(list(partials), codec, "gather", layer=layer)
            row[c] += float((y.float() - ref).pow(2).sum())
        count[layer] = count.get(layer, 0) + ref.numel()

    with torch.no_grad(), TPSimulator(model, tp=tp, observer=observe, name=name):
        model(ids)
    return {layer: {c: v / count[layer] for c, v in row.items()} for layer, row in sq.items()}


def allocate_many(sensitivity: dict[str, float], errors: dict[str, dict[str, float]], *, reference: str,
                  codecs, budget: float, calibration: Calibration, tokens: int = 256) -> dict:
    """The plan: one of ``codecs`` per layer, predicted KL minimal (greedily) with mean bits <= ``budget``.

    ``sensitivity``: KL per layer with ``reference`` alone; ``errors``: :func:`layer_errors`
    (which must include ``reference`` and every codec of ``codecs``).
    """
    shape = (tokens, calibration.hidden_size)
    codecs = list(dict.fromkeys(codecs))
    bits = {c: make_codec(c, calibration=calibration).bits_per_value(shape) for c in codecs}
    order = sorted(codecs, key=lambda c: bits[c])
    layers = list(calibration.layers)
    n = len(layers)
    if budget < bits[order[0]] - 1e-9:
        raise ValueError(f"budget {budget} is below the cheapest codec's {bits[order[0]]:.3f} bits/value")

    def predicted(layer, c):
        ref = errors[layer][reference]
        return sensitivity[layer] * (errors[layer][c] / ref if ref > 0 else (0.0 if errors[layer][c] == 0 else 1.0))

    pred = {l: {c: predicted(l, c) for c in codecs} for l in layers}
    pick = dict.fromkeys(layers, order[0])
    total = bits[order[0]] * n
    while True:
        best = None
        for l in layers:
            cur = pick[l]
            for c in order:
                extra = bits[c] - bits[cur]
                gain = pred[l][cur] - pred[l][c]
                if extra <= 0 or gain <= 0 or (total + extra) / n > budget + 1e-9:
                    continue
                if best is None or gain / extra > best[0]:
                    best = (gain / extra, l, c, extra)
        if best is None:
            break
        _, l, c, extra = best
        pick[l] = c
        total += extra
    return {"budget": budget, "codecs": order, "reference": reference, "mean_bits": total / n,
            "counts": {c: sum(v == c for v in pick.values()) for c in order},
            "predicted_kl": sum(pred[l][pick[l]] for l in layers),
            "layers": pick, "sensitivity_kl": sensitivity, "mse": errors}


def allocate(sensitivity: dict[str, float], *, low: str, high: str, budget: float, calibration: Calibration,
             tokens: int = 256) -> dict:
    """The plan: ``high`` for the most sensitive layers while the mean bits stay <= ``budget``."""
    shape = (tokens, calibration.hidden_size)
    lo = make_codec(low, calibration=calibration).bits_per_value(shape)
    hi = make_codec(high, calibration=calibration).bits_per_value(shape)
    n = len(sensitivity)
    if budget < lo:
        raise ValueError(f"budget {budget} is below the cheap codec's {lo:.3f} bits/value")
    n_high = 0 if hi <= lo else min(n, int((budget - lo) * n / (hi - lo) + 1e-9))
    ranked = sorted(sensitivity, key=lambda l: -sensitivity[l])
    layers = {l: (high if i < n_high else low) for i, l in enumerate(ranked)}
    mean_bits = (n_high * hi + (n - n_high) * lo) / n
    return {"budget": budget, "low": low, "high": high, "mean_bits": mean_bits, "n_high": n_high,
            "layers": {l: layers[l] for l in calibration.layers}, "sensitivity_kl": sensitivity}
