"""Synthetic partial sums with planted outlier channels, and calibrations built from them.

Used where no model is involved: codec/collective tests and ``bench-comm``. The shape of
the data follows what the seed paper reports for real communicated features: most
channels are roughly Gaussian, a few channels are consistently much larger.
"""
from __future__ import annotations

import torch

from lowbit_tp.calibration.artifact import Calibration, StatsAccumulator, default_outlier_k


def planted_outliers(hidden: int, *, num: int | None = None, seed: int = 0) -> torch.Tensor:
    """The channels that carry outliers (sorted); ``num`` defaults to ``hidden // 64``."""
    num = default_outlier_k(hidden) if num is None else num
    g = torch.Generator().manual_seed(10_000 + seed)
    return torch.sort(torch.randperm(hidden, generator=g)[:num]).values


def planted_partials(world: int, tokens: int, hidden: int, *, seed: int = 0, noise_seed: int | None = None,
                     outlier_gain: float = 40.0, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """``world`` partials ``[tokens, hidden]``; channels of :func:`planted_outliers` are scaled up.

    Each rank's partial has its own draw; the outlier channels are the same for every
    rank and every call with the same ``seed`` (they are "consistent", as in the paper);
    ``noise_seed`` (default: ``seed``) draws the values.
    """
    chans = planted_outliers(hidden, seed=seed)
    g = torch.Generator().manual_seed((seed if noise_seed is None else noise_seed) * 7919 + tokens)
    out = []
    for _ in range(world):
        x = torch.randn(tokens, hidden, generator=g)
        x[:, chans] *= outlier_gain
        out.append(x.to(dtype))
    return out


def synthetic_calibration(layers: list[str], *, world: int, hidden: int, tokens: int = 256, batches: int = 4,
                          seed: int = 0) -> Calibration:
    """A calibration over :func:`planted_partials` for every layer, every rank and the sum."""
    acc = StatsAccumulator()
    for b in range(batches):
        for i, layer in enumerate(layers):
            parts = planted_partials(world, tokens, hidden, seed=seed + i, noise_seed=1000 * (b + 1) + i)
            for r, p in enumerate(parts):
                acc.update(layer, r, p)
            acc.update(layer, "sum", torch.stack(parts).sum(0))
    meta = {"tp": world, "hidden_size": hidden, "k": default_outlier_k(hidden), "statistic": "ema-range",
            "model": {"name": "synthetic", "weights_sha256": None, "model_type": "synthetic"},
            "text": {"source": "synthetic planted outliers", "seed": seed}}
    return acc.build(meta, layers=layers)
