"""Per-channel weights that make a codec spend its error where the model is sensitive.

A ``+fisher`` codec sends ``x * w`` and divides the decoded sum by ``w``. After the
rotation of a ``rot-*`` codec the quantization error of a token is spread evenly over the
channels, with a variance proportional to the mean square of what was encoded,
``sum_j w_j**2 m_j``; dividing by ``w`` leaves channel j an error variance proportional to
``1 / w_j**2``. The KL that error causes is ``0.5 * sum_j F_j err_j**2`` (``F``: the diagonal
Fisher of the model's next-token distribution at the all-reduce output), so the weights
minimise ``(sum_j w_j**2 m_j) * (sum_j F_j / w_j**2)``; by Cauchy-Schwarz at
``w_j**2 ∝ sqrt(F_j / m_j)``. The scale of ``w`` does not matter to a codec with dynamic
scales; it is fixed by ``mean(w**2) = 1``.
"""
from __future__ import annotations

import torch

__all__ = ["fisher_channel_weights"]

_TINY = 1e-30


def fisher_channel_weights(fisher: torch.Tensor, mean_square: torch.Tensor) -> torch.Tensor:
    """``w`` with ``w_j**2 ∝ sqrt(fisher_j / mean_square_j)`` and ``mean(w**2) = 1`` along the
    last dimension (see the module docstring), as fp32.

    ``fisher [..., E]``: the diagonal Fisher at the all-reduce output, averaged over tokens
    (>= 0). ``mean_square [..., E]``: the mean square of the values the codec encodes, per
    channel; one row per rank gives each rank its own weights, the sum over ranks gives the
    one vector a shared weighting (what the ``+fisher`` codecs use) minimises the summed
    error with. Zeros are floored at 1e-30, so a channel that is always zero gets a large
    weight (its error is divided away) and one the model ignores a small one.
    """
    if fisher.shape[-1] != mean_square.shape[-1]:
        raise ValueError(f"fisher has {fisher.shape[-1]} channels, mean_square {mean_square.shape[-1]}")
    for name, t in (("fisher", fisher), ("mean_square", mean_square)):
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise ValueError(f"{name} must be finite and >= 0")
    f = fisher.double().clamp_min(_TINY)
    m = mean_square.double().clamp_min(_TINY)
    w = (f / m).pow(0.25)
    return (w / w.pow(2).mean(-1, keepdim=True).sqrt()).float()
