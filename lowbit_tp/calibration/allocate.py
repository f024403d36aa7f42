"""Measure each row-parallel layer's sensitivity and allocate bits under a global budget.

Sensitivity of layer L: mean per-token KL(baseline || model) when *only* L's all-reduce
uses the cheap codec (every other layer exact), on a few calibration windows. Then the
most sensitive layers get the wide codec, as many as keep the mean bits/value (every layer
moves the same number of values per token) within the budget.
"""
from __future__ import annotations

import torch

from lowbit_tp.calibration.artifact import Calibration
from lowbit_tp.codecs import make_codec
from lowbit_tp.evaluation.metrics import LMComparison


def layer_sensitivity(model, ids: torch.Tensor, cal: Calibration, *, tp: int, codec: str, name: str | None = None,
                      progress: bool = True) -> dict[str, float]:
    """KL caused by ``codec`` at each layer alone (gather collective), keyed by layer."""
    from tqdm import tqdm

    from lowbit_tp.codecs.mixed import AllocatedCodec
    from lowbit_tp.simulator import TPSimulator

    with torch.no_grad():
        base = model(ids).logits
        out = {}
        for layer in tqdm(cal.layers, desc="sensitivity", disable=not progress):
            plan = {"layers": {l: (codec if l == layer else "bf16") for l in cal.layers}}
            with TPSimulator(model, tp=tp, codec=AllocatedCodec(plan=plan, calibration=cal), algorithm="gather",
                             name=name):
                logits = model(ids).logits
            cmp = LMComparison()
            cmp.update(ids, base, logits)
            out[layer] = cmp.result()["kl"]
    return out


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
