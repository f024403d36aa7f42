"""Typed results of ``lowbit-tp run`` (engines ``native`` and ``transformers``).

:func:`~lowbit_tp.runtime.engine.rank_main` returns one :class:`RunResult` per rank; the
engine merges them into rank 0's result with a :class:`RankSummary` per rank. ``to_json()``
writes the same field names, in the same order, as the JSON ``lowbit-tp run --json`` wrote
before these types existed; ``from_json`` reads it back (a test round-trips both ways).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Mapping, Sequence

from lowbit_tp.collectives import CommStats
from lowbit_tp.results import record_kwargs
from lowbit_tp.runtime.generate import GenerationResult

__all__ = ["RankSummary", "RunResult"]


@dataclass(frozen=True)
class RankSummary:
    """One rank of a merged run: its shard and memory reports, all its traffic, load time."""

    rank: int
    shard: dict[str, Any]
    memory: dict[str, Any]
    comm_total: CommStats
    load_s: float

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "shard": self.shard, "memory": self.memory,
                "comm_total": self.comm_total.as_dict(), "load_s": self.load_s}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "RankSummary":
        return cls(**{**record_kwargs(cls, d, required=True), "comm_total": CommStats.from_dict(d["comm_total"])})


@dataclass(frozen=True)
class RunResult:
    """A run as seen by rank ``rank``: its config (:meth:`RunConfig.as_dict`), model identity,
    codec config, shard report (parameter bytes), resident memory in MiB, seconds loading,
    torch threads, one :class:`GenerationResult` per prompt, and its total all-reduce traffic.
    ``per_rank`` is set on the merged result only (rank 0's, with every rank's summary)."""

    rank: int
    config: dict[str, Any]
    model: dict[str, Any]
    codec: dict[str, Any]
    shard: dict[str, Any]
    memory: dict[str, Any]
    load_s: float
    threads: int
    results: tuple[GenerationResult, ...]
    comm_total: CommStats
    per_rank: tuple[RankSummary, ...] | None = None

    def summary(self) -> RankSummary:
        return RankSummary(rank=self.rank, shard=self.shard, memory=self.memory, comm_total=self.comm_total,
                           load_s=self.load_s)

    def merged(self, ranks: Sequence["RunResult"]) -> "RunResult":
        """This (rank 0's) result with every rank's :class:`RankSummary`, in rank order."""
        return replace(self, per_rank=tuple(r.summary() for r in ranks))

    def without_logits(self) -> "RunResult":
        """The same result with no ``prefill_logits`` (what ranks exchange)."""
        return replace(self, results=tuple(replace(r, prefill_logits=None) for r in self.results))

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["results"] = [r.to_json() for r in self.results]
        out["comm_total"] = self.comm_total.as_dict()
        if self.per_rank is None:
            del out["per_rank"]
        else:
            out["per_rank"] = [p.to_json() for p in self.per_rank]
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "RunResult":
        per_rank = d.get("per_rank")
        return cls(**{**record_kwargs(cls, d, required=True, optional=("per_rank",)),
                      "results": tuple(GenerationResult.from_json(r) for r in d["results"]),
                      "comm_total": CommStats.from_dict(d["comm_total"]),
                      "per_rank": None if per_rank is None else tuple(RankSummary.from_json(p) for p in per_rank)})
