"""The compressed all-reduce as a ``torch.library`` custom op, and the per-process reducers it calls.

``torch.ops.lowbit_tp.all_reduce(partial, layer, reducer)`` returns the sum of ``partial``
over the reducer's group. It is opaque to ``torch.compile`` (its fake implementation only
gives the output's shape and dtype), so vLLM's compiled graph (``fullgraph=True``) keeps
it as one node, as it does for vLLM's own ``torch.ops.vllm.all_reduce``. The string
arguments select, at run time, the :class:`Reducer` registered under ``reducer`` in this
process and the calibration layer name the codec uses.

Nothing here imports vLLM: the plugin passes vLLM's group and vLLM's own all-reduce in.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from lowbit_tp.codecs.base import Codec
from lowbit_tp.collectives import AutoPolicy, CommStats, all_reduce

_REDUCERS: dict[str, "Reducer"] = {}


@dataclass
class Reducer:
    """One process's compressed all-reduce over ``group``, with a size gate.

    ``__call__(partial, layer)``: messages with ``2 * numel < min_bytes`` go to
    ``fallback`` (vLLM's own all-reduce); larger ones to
    :func:`~lowbit_tp.collectives.all_reduce` with ``codec`` and ``algorithm``. ``stats``
    counts the compressed calls' traffic (from their payloads); ``seconds`` is wall time
    spent in each path (``"compressed"``, ``"fallback"``). ``capture`` (tracing) saves the
    first compressed call of one layer.
    """

    codec: Codec
    group: Any
    rank: int
    algorithm: str = "auto"
    min_bytes: int = 64 * 1024
    fallback: Callable[[torch.Tensor], torch.Tensor] | None = None
    capture_dir: str | None = None
    capture_layer: str | None = None
    stats: CommStats = field(default_factory=CommStats)
    seconds: dict[str, float] = field(default_factory=lambda: {"compressed": 0.0, "fallback": 0.0})
    calls: dict[str, int] = field(default_factory=lambda: {"compressed": 0, "fallback": 0})

    def gated(self, partial: torch.Tensor) -> bool:
        """True when ``partial`` is large enough to compress."""
        return self.fallback is None or 2 * partial.numel() >= self.min_bytes

    def __call__(self, partial: torch.Tensor, layer: str) -> torch.Tensor:
        t0 = time.perf_counter()
        if self.gated(partial):
            path = "compressed"
            out = all_reduce(partial.reshape(-1, partial.shape[-1]), self.codec, self.group,
                             algorithm=self.algorithm, layer=layer,
                             policy=AutoPolicy(min_bytes=self.min_bytes), stats=self.stats).reshape(partial.shape)
            if self.capture_dir and layer == self.capture_layer:
                self._capture(partial, out, layer)
        else:
            path = "fallback"
            out = self.fallback(partial)
        self.seconds[path] += time.perf_counter() - t0
        self.calls[path] += 1
        return out

    def _capture(self, partial: torch.Tensor, out: torch.Tensor, layer: str) -> None:
        path = Path(self.capture_dir) / f"{layer}.rank{self.rank}.pt"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"layer": layer, "rank": self.rank, "algorithm": self.algorithm,
                        "partial": partial.detach().clone(), "output": out.detach().clone()}, path)

    def report(self) -> dict[str, Any]:
        return {"rank": self.rank, "codec": self.codec.config(), "algorithm": self.algorithm,
                "min_bytes": self.min_bytes, "seconds": dict(self.seconds), "calls": dict(self.calls),
                "comm": self.stats.as_dict()}


def register_reducer(key: str, reducer: Reducer) -> None:
    _REDUCERS[key] = reducer


def get_reducer(key: str) -> Reducer:
    try:
        return _REDUCERS[key]
    except KeyError:
        raise RuntimeError(f"no lowbit-tp reducer {key!r} in this process (have {sorted(_REDUCERS)})") from None


def reports() -> list[dict[str, Any]]:
    """Every reducer of this process, as :meth:`Reducer.report` dicts."""
    return [dict(r.report(), key=k) for k, r in sorted(_REDUCERS.items())]


@torch.library.custom_op("lowbit_tp::all_reduce", mutates_args=())
def compressed_all_reduce(partial: torch.Tensor, layer: str, reducer: str) -> torch.Tensor:
    """Sum ``partial`` over the group of the reducer registered as ``reducer``; a new tensor."""
    out = get_reducer(reducer)(partial, layer)
    # A custom op's output may not alias its input (world size 1 returns the input).
    return out.clone() if out.data_ptr() == partial.data_ptr() else out


@compressed_all_reduce.register_fake
def _(partial: torch.Tensor, layer: str, reducer: str) -> torch.Tensor:
    return torch.empty_like(partial)
