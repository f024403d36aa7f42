"""Error feedback along depth: a rank sends its last quantization error back at its next all-reduce.

In a pre-norm transformer (Llama, SmolLM2, Mistral, Qwen2) every row-parallel all-reduce
adds straight into the residual stream, ``h <- h + AR_l``. With a lossy codec
``AR_l = Delta_l + E_l``, where ``E_l = sum_r e_{l,r}`` and ``e_{l,r} = decode(payload) - sent``
is rank r's quantization error, which rank r knows exactly (it can decode its own payload).
Without feedback the residual after step l carries ``E_1 + ... + E_l``. With feedback, rank r
sends ``p_{l,r} + c_{l,r}`` with ``c_{l,r} = -e_{l-1,r}``, so ``AR_l = Delta_l - E_{l-1} + E_l``
and the residual telescopes: after any step it carries only that step's ``E_l`` (plus what
the earlier one-step errors changed in the later blocks' outputs, which nobody can send
back). Same payloads, same bytes: bits/value do not change. This is the error feedback of
compressed-gradient training (EF-SGD), applied along the depth of one forward pass.

Where the error of each algorithm lands:

* ``gather``: rank r's payload is all the wire carries of its partial, so its compensation
  is ``sent_r - decode(payload_r)``.
* ``two-shot``: rank r's row chunks carry the same first-stage error; the owner j of a
  chunk re-encodes the chunk's sum, and that second error ``S_j - decode(enc(S_j))`` joins
  rank j's compensation on the chunk's rows (any rank may compensate any row: partials are
  summed).

A compensation is kept in fp32 and is zero wherever the error is not finite (NaN/Inf in the
input in ``nonfinite="propagate"`` mode never travel to the next layer this way).

This module is the per-rank arithmetic (:func:`compensate`, :func:`feedback_of`), the in/out
record of one all-reduce (:class:`Feedback`), and the state across one forward pass's
all-reduces (:class:`FeedbackChain`). The collectives (``dist.all_reduce``,
``simulate.simulate_all_reduce``) run the same functions, so they stay bitwise equal.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

__all__ = ["Feedback", "FeedbackChain", "compensate", "feedback_of"]


def compensate(partial: torch.Tensor, carry: torch.Tensor | None) -> torch.Tensor:
    """What a rank encodes: its partial unchanged without a carry, else ``partial + carry`` in fp32."""
    if carry is None:
        return partial
    if carry.shape != partial.shape:
        raise ValueError(f"error-feedback carry of shape {tuple(carry.shape)} for a partial of shape "
                         f"{tuple(partial.shape)}")
    return partial.float() + carry


def feedback_of(sent: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
    """The compensation for the next all-reduce: ``sent - decoded`` in fp32, 0 where not finite."""
    err = sent.float() - decoded.float()
    return torch.where(torch.isfinite(err), err, torch.zeros((), dtype=err.dtype, device=err.device))


@dataclass
class Feedback:
    """One rank's error feedback through one all-reduce.

    In: ``carry``, the compensation to add to the partial before encoding (``[tokens, E]``
    fp32, or None for none). Out: the collective sets ``next``, this rank's compensation for
    its next all-reduce (fp32, the partial's shape).
    """

    carry: torch.Tensor | None = None
    next: torch.Tensor | None = None


@dataclass
class FeedbackChain:
    """The carries of ``ranks`` ranks held by this process across one forward pass.

    ``order`` lists the row-parallel layers in the order a forward pass reduces them (the TP
    plan's order: ``layers.0.self_attn.o_proj``, ``layers.0.mlp.down_proj``, ...). A call
    for ``order[i]`` gets the carries left by ``order[i-1]``; any other call (the first layer,
    so each new forward pass, prefill or decode step, whatever its token count) starts
    without one. ``ranks``: all N in a simulation, 1 on a rank of a real TP group.
    """

    order: tuple[str, ...]
    ranks: int = 1
    _index: dict[str, int] = field(init=False, repr=False)
    _last: str | None = field(default=None, init=False, repr=False)
    _carries: list = field(default_factory=list, init=False, repr=False)

    def __post_init__(self):
        self.order = tuple(self.order)
        if not self.order:
            raise ValueError("error feedback needs the row-parallel layers in forward order, got none")
        if len(set(self.order)) != len(self.order):
            raise ValueError("error feedback: a layer appears twice in the forward order")
        if self.ranks < 1:
            raise ValueError(f"error feedback: ranks must be >= 1, got {self.ranks}")
        self._index = {name: i for i, name in enumerate(self.order)}

    def start(self, layer: str) -> list[Feedback]:
        """One :class:`Feedback` per rank for this call of ``layer``, carrying the previous
        layer's compensations when ``layer`` follows it in ``order``."""
        carries = self.pending(layer)
        self._last, self._carries = None, []
        return [Feedback(carry=c) for c in carries]

    def pending(self, layer: str) -> list:
        """The carries (per rank, None for none) that :meth:`start` would hand ``layer`` now,
        without starting it (tracing reads them)."""
        if layer not in self._index:
            raise ValueError(f"error feedback: layer {layer!r} is not in the forward order of this model's plan")
        i = self._index[layer]
        follows = i > 0 and self._last == self.order[i - 1] and len(self._carries) == self.ranks
        return list(self._carries) if follows else [None] * self.ranks

    def finish(self, layer: str, feedback: Sequence[Feedback]) -> None:
        """Keep the compensations the collective produced for the next layer."""
        if len(feedback) != self.ranks or any(f.next is None for f in feedback):
            raise ValueError(f"error feedback for {layer!r}: the collective left no compensation for every rank")
        self._last, self._carries = layer, [f.next for f in feedback]

    def reset(self) -> None:
        """Forget the carries (the next call starts without one)."""
        self._last, self._carries = None, []
