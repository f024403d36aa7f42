"""Typed result records of ``lowbit-tp eval``: an :class:`EvalResult` with one
:class:`CodecEvalRow` per codec.

The evaluation builds each row as a :class:`CodecEvalRow` and writes ``to_json()``: the
same field names, in the same order, as the JSON files written before this type existed
(``docs/results.json``, read by ``scripts/reproduce_paper.py`` and ``scripts/frontier.py``).
``from_json`` reads such a row back and refuses unknown or missing fields.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping, Sequence

from lowbit_tp.results import markdown_table, record_kwargs

__all__ = ["CodecEvalRow", "DEV_COLUMNS", "EvalResult"]

# What the research scripts print of a dev-split evaluation.
DEV_COLUMNS = ("codec", "split", "bits_per_value", "ppl_increase_pct", "ppl_increase_pct_ci95", "kl", "kl_ci95",
               "top1")
# Left out of a row's JSON when None (rows written before them lack them).
OPTIONAL_FIELDS = ("runtime", "per_sequence", "lambada_acc_ci95", "lambada_acc_delta_ci95")
# Read when present, written only when True.
FLAG_FIELDS = ("error_feedback",)


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
    ``error_feedback``: whether the all-reduces fed their quantization error forward
    (:mod:`~lowbit_tp.collectives.feedback`): False, True or ``"first-stage"``
    (:data:`~lowbit_tp.configs.FEEDBACK_MODES`); written to the JSON only when set.
    ``per_sequence``: the per-sequence sums behind the intervals (``tokens``, ``nll_base``,
    ``nll_codec``, ``kl``, ``top1`` lists, one entry per window), for paired comparisons of
    codecs (``scripts/paired_diff.py``); None in rows written before it, and then left out.
    ``lambada_acc_ci95``: 95% bootstrap interval of ``lambada_acc`` over items;
    ``lambada_acc_delta_ci95``: of ``lambada_acc - lambada_acc_baseline``, paired on the same
    items; both None (and left out of the JSON) below 2 items.
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
    lambada_acc_ci95: list[float] | None = None
    lambada_acc_delta_ci95: list[float] | None = None
    runtime: str | None = None
    error_feedback: bool | str = False
    per_sequence: dict[str, list[float]] | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        """The row as written to JSON (field order kept; the fields after ``seconds`` only
        when set: not None, ``error_feedback`` only when on)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in OPTIONAL_FIELDS:
            if out[key] is None:
                del out[key]
        if not out["error_feedback"]:
            del out["error_feedback"]
        return out

    @classmethod
    def from_json(cls, row: Mapping[str, Any]) -> "CodecEvalRow":
        return cls(**record_kwargs(cls, row, required=True, optional=OPTIONAL_FIELDS + FLAG_FIELDS))

    def on(self, runtime: str) -> "CodecEvalRow":
        """This row, recorded as measured on ``runtime`` (``sim`` or ``tp``)."""
        return replace(self, runtime=runtime)


@dataclass(frozen=True)
class EvalResult:
    """A whole evaluation: ``config`` (:class:`EvalConfig` as a dict), the model's identity,
    the exact text used (split, windows, last-word items), the calibration (fingerprint,
    text, config; None without one) and one :class:`CodecEvalRow` per codec. ``runtime``:
    the settings and per-rank reports of an evaluation on real ranks (None in the
    simulator); ``logits``: rank 0's logits per codec when asked for (tests; never in JSON)."""

    config: dict[str, Any]
    model: dict[str, Any]
    text: dict[str, Any]
    calibration: dict[str, Any] | None
    rows: tuple[CodecEvalRow, ...]
    runtime: dict[str, Any] | None = None
    logits: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    def row(self, codec: str) -> CodecEvalRow:
        """The row of ``codec``."""
        for r in self.rows:
            if r.codec == codec:
                return r
        raise KeyError(f"no row for codec {codec!r}; rows: {[r.codec for r in self.rows]}")

    def table(self, columns: Sequence[str] = DEV_COLUMNS) -> str:
        """The rows as a markdown table of ``columns``."""
        return markdown_table([r.to_json() for r in self.rows], columns)

    def on(self, runtime: str) -> "EvalResult":
        """Every row recorded as measured on ``runtime`` (``sim`` or ``tp``)."""
        return replace(self, rows=tuple(r.on(runtime) for r in self.rows))

    def to_json(self) -> dict[str, Any]:
        """The result as ``lowbit-tp eval --json`` writes it (``runtime`` only when set)."""
        out = {"config": self.config, "model": self.model, "text": self.text, "calibration": self.calibration,
               "rows": [r.to_json() for r in self.rows]}
        if self.runtime is not None:
            out["runtime"] = self.runtime
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "EvalResult":
        known = {"config", "model", "text", "calibration", "rows", "runtime"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"not an EvalResult: unknown fields {unknown}")
        return cls(config=d["config"], model=d["model"], text=d["text"], calibration=d["calibration"],
                   rows=tuple(CodecEvalRow.from_json(r) for r in d["rows"]), runtime=d.get("runtime"))
