"""The compressed all-reduce as a ``torch.library`` custom op, and the per-process reducers it calls.

``torch.ops.lowbit_tp.all_reduce(partial, layer, reducer)`` returns the sum of ``partial``
over the reducer's group. It is opaque to ``torch.compile`` (its fake implementation only
gives the output's shape and dtype), so vLLM's compiled graph (``fullgraph=True``) keeps
it as one node, as it does for vLLM's own ``torch.ops.vllm.all_reduce``. The string
arguments select, at run time, the :class:`~lowbit_tp.tp.Reducer` registered under
``reducer`` in this process and the calibration layer name the codec uses.

Nothing here imports vLLM: the plugin passes vLLM's group and vLLM's own all-reduce in.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from lowbit_tp.collectives.feedback import FeedbackChain
from lowbit_tp.results import json_text
from lowbit_tp.tp import DECODER_PLAN, DistReducer, Reducer

_REDUCERS: dict[str, Reducer] = {}


@dataclass
class GatedReducer:
    """One vLLM worker's reducer: a size gate in front of a :class:`~lowbit_tp.tp.DistReducer`.

    Implements the :class:`~lowbit_tp.tp.Reducer` contract for one rank's partial:
    messages with ``2 * numel < min_bytes`` go to ``fallback`` (vLLM's own all-reduce,
    faster for small, latency-bound decode messages); larger ones to ``inner`` (the
    compressed :func:`~lowbit_tp.collectives.all_reduce`, traffic in ``inner.stats``).
    ``seconds``/``calls`` count wall time and calls per path (``"compressed"``,
    ``"fallback"``). ``capture_dir``/``capture_layer`` (tracing; layers comma-separated) keep
    each such layer's latest compressed call: this rank's partial, the error-feedback carry
    it got (None: none) and the result, rewritten (atomically) on every call, so a reader
    sees the call of the last request; ``report_dir`` (tracing) gets :meth:`report` as JSON,
    rewritten at most every 0.5 s (how a server's workers show it).

    ``feedback_layers``: error feedback on (None: off). vLLM's layers append their names as
    they are built; the first call, after the whole model is built, gives ``inner`` the
    chain ``make_chain(feedback_layers)`` (default: a plain chain in the plan's forward order;
    the plugin passes the adapter's ``feedback_chain_for``, which maps the carry through
    Gemma 2/3's post-norms). All row-parallel messages of one forward
    pass have the same size, so the gate sends a whole pass one way; a pass that goes to
    ``fallback`` (exact, nothing lost) leaves no carry.
    """

    inner: DistReducer
    rank: int
    min_bytes: int = 64 * 1024
    fallback: Callable[[torch.Tensor], torch.Tensor] | None = None
    capture_dir: str | None = None
    capture_layer: str | None = None
    report_dir: str | None = None
    feedback_layers: list[str] | None = None
    make_chain: Callable[[Sequence[str]], FeedbackChain] | None = None
    seconds: dict[str, float] = field(default_factory=lambda: {"compressed": 0.0, "fallback": 0.0})
    calls: dict[str, int] = field(default_factory=lambda: {"compressed": 0, "fallback": 0})
    _written: float = field(default=0.0, repr=False)  # perf_counter of the last report write

    def gated(self, partial: torch.Tensor) -> bool:
        """True when ``partial`` is large enough to compress."""
        return self.fallback is None or 2 * partial.numel() >= self.min_bytes

    def reduce(self, partials: Sequence[torch.Tensor], *, layer: str) -> torch.Tensor:
        (partial,) = partials
        t0 = time.perf_counter()
        if self.feedback_layers is not None and self.inner.feedback is None:
            self.inner.feedback = (self.make_chain(self.feedback_layers) if self.make_chain is not None else
                                   FeedbackChain(DECODER_PLAN.forward_order(self.feedback_layers), ranks=1))
        if self.gated(partial):
            path = "compressed"
            capture = self.capture_dir and layer in (self.capture_layer or "").split(",")
            carry = self.inner.feedback.pending(layer)[0] if capture and self.inner.feedback is not None else None
            out = self.inner.reduce([partial], layer=layer)
            if capture:
                self._capture(partial, carry, out, layer)
        else:
            path = "fallback"
            out = self.fallback(partial)
            if self.inner.feedback is not None:
                self.inner.feedback.reset()
        now = time.perf_counter()
        self.seconds[path] += now - t0
        self.calls[path] += 1
        if self.report_dir and now - self._written >= 0.5:
            self._write_report(now)
        return out

    def _write_report(self, now: float) -> None:
        path = Path(self.report_dir) / f"report.rank{self.rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json_text(self.report(), indent=None))  # bits/value of no messages: null
        tmp.replace(path)
        self._written = now

    def _capture(self, partial: torch.Tensor, carry: torch.Tensor | None, out: torch.Tensor, layer: str) -> None:
        path = Path(self.capture_dir) / f"{layer}.rank{self.rank}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"layer": layer, "rank": self.rank, "algorithm": self.inner.algorithm,
                    "partial": partial.detach().clone(), "carry": None if carry is None else carry.clone(),
                    "output": out.detach().clone()}, tmp)
        tmp.replace(path)

    def report(self) -> dict[str, Any]:
        return {"rank": self.rank, "codec": self.inner.codec.config(), "algorithm": self.inner.algorithm,
                "min_bytes": self.min_bytes, "error_feedback": self.feedback_layers is not None, "seconds": dict(self.seconds), "calls": dict(self.calls),
                "comm": self.inner.stats.as_dict()}


def register_reducer(key: str, reducer: Reducer) -> None:
    """Make ``reducer`` (any :class:`~lowbit_tp.tp.Reducer`) reachable by the op as ``key``."""
    _REDUCERS[key] = reducer


def get_reducer(key: str) -> Reducer:
    try:
        return _REDUCERS[key]
    except KeyError:
        raise RuntimeError(f"no lowbit-tp reducer {key!r} in this process (have {sorted(_REDUCERS)})") from None


def reports() -> list[dict[str, Any]]:
    """Every :class:`GatedReducer` of this process, as :meth:`GatedReducer.report` dicts."""
    return [dict(r.report(), key=k) for k, r in sorted(_REDUCERS.items()) if isinstance(r, GatedReducer)]


@torch.library.custom_op("lowbit_tp::all_reduce", mutates_args=())
def compressed_all_reduce(partial: torch.Tensor, layer: str, reducer: str) -> torch.Tensor:
    """Sum ``partial`` over the group of the reducer registered as ``reducer``; a new tensor."""
    out = get_reducer(reducer).reduce([partial], layer=layer)
    # A custom op's output may not alias its input (world size 1 returns the input).
    return out.clone() if out.data_ptr() == partial.data_ptr() else out


@compressed_all_reduce.register_fake
def _(partial: torch.Tensor, layer: str, reducer: str) -> torch.Tensor:
    return torch.empty_like(partial)
