"""Typed result records of ``lowbit-tp eval``: one :class:`CodecEvalRow` per codec.

The evaluation builds each row as a :class:`CodecEvalRow` and writes ``to_json()``: the
same field names, in the same order, as the JSON files written before this type existed
(``docs/results.json``, read by ``scripts/reproduce_paper.py`` and ``scripts/frontier.py``).
``from_json`` reads such a row back and refuses unknown or missing fields.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

__all__ = ["CodecEvalRow"]


@dataclass(frozen=True)
class CodecEvalRow:
    """One codec's quality and traffic on one model, TP degree, collective and text split.

    ``ppl*`` perplexity of the unmodified model (``_baseline``) and with the codec; ``kl`` mean
    per-token KL(baseline || codec); ``top1`` next-token agreement; ``*_ci95`` 95% bootstrap
    intervals over sequences (``[low, high]``; None below 2 sequences); ``lambada_acc*``
    last-word accuracy (NaN with no items). ``bits_per_value`` and ``ring_equiv_bits`` are
    counted from the payloads; ``bytes_sent_per_rank_per_token`` sums every row-parallel
    layer. ``seconds``: forward time of this codec. ``runtime``: ``sim`` (the simulator) or
    ``tp`` (real ranks); None when the caller did not say, and then left out of the JSON.
    """

    model: str
    tp: int
    codec: str
    algorithm: str
    split: str
    tokens: int
    sequences: int
    ppl_baseline: float
    ppl: float
    kl: float
    top1: float
    ppl_increase_pct_ci95: list[float] | None
    kl_ci95: list[float] | None
    top1_ci95: list[float] | None
    lambada_acc: float
    lambada_acc_baseline: float
    bits_per_value: float
    ring_equiv_bits: float
    bytes_sent_per_rank_per_token: float
    ppl_increase_pct: float
    pct_of_baseline_lambada: float
    seconds: float
    runtime: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The row as written to JSON (field order kept; ``runtime`` only when set)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if out["runtime"] is None:
            del out["runtime"]
        return out

    @classmethod
    def from_json(cls, row: Mapping[str, Any]) -> "CodecEvalRow":
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(row) - set(known))
        missing = [k for k in known if k not in row and k != "runtime"]
        if unknown or missing:
            raise ValueError(f"not a CodecEvalRow: unknown fields {unknown}, missing fields {missing}")
        return cls(**row)

    def on(self, runtime: str) -> "CodecEvalRow":
        """This row, recorded as measured on ``runtime`` (``sim`` or ``tp``)."""
        return replace(self, runtime=runtime)
