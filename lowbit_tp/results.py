"""Results on disk: a payload as JSON and its markdown table next to it.

Used by evaluation, the demo, the benchmarks and the scripts that write docs/.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from dataclasses import fields
from typing import Any, Mapping, Sequence

from lowbit_tp.fileio import atomic_write_text

__all__ = ["json_text", "markdown_table", "nan_for_null", "record_kwargs", "strict_json", "write_results"]


def strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±Inf) replaced by None, through dicts, lists
    and tuples: strict JSON (RFC 8259) has no NaN, and ``json.dumps`` would write a bare
    ``NaN`` that ``jq``, JavaScript and most other readers refuse (e.g. ``lambada_acc`` with
    no last-word items, ``bits_per_value`` of a run that sent nothing)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def nan_for_null(obj: Any) -> Any:
    """The inverse of :func:`strict_json` for numeric tables (e.g. a study's per-layer errors):
    every None in dicts and lists becomes NaN (an infinity written as null comes back NaN too),
    so arithmetic carries it instead of raising."""
    if obj is None:
        return math.nan
    if isinstance(obj, dict):
        return {k: nan_for_null(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [nan_for_null(v) for v in obj]
    return obj


def json_text(obj: Any, *, indent: int | None = 2) -> str:
    """``obj`` as strict JSON text: non-finite floats as null (:func:`strict_json`), other
    objects through ``str``."""
    return json.dumps(strict_json(obj), indent=indent, default=str, allow_nan=False)


def record_kwargs(cls: type, d: Mapping[str, Any], *, derived: Sequence[str] = (), required: bool = False,
                  optional: Sequence[str] = (), what: str | None = None) -> dict[str, Any]:
    """The fields of the dataclass ``cls`` found in the JSON object ``d``, as keyword arguments.

    Keys that are not fields raise ValueError, except ``derived`` ones (values a record
    computes and writes, which are dropped here); with ``required``, so do missing fields
    other than ``optional``. ``what`` names the record in the message (default: "a" and the
    class name). A null where the field is a plain ``float`` reads as NaN: it is how
    :func:`strict_json` writes one."""
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(d) - set(known) - set(derived))
    missing = [k for k in known if k not in d and k not in optional] if required else []
    if unknown or missing:
        msg = f"not {what or 'a ' + cls.__name__}: unknown fields {unknown}"
        raise ValueError(msg + (f", missing fields {missing}" if required else ""))
    floats = {f.name for f in fields(cls) if f.type in ("float", float)}
    return {k: (math.nan if v is None and k in floats else v) for k, v in d.items() if k in known}


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub markdown table of ``columns`` (floats to 3 significant digits, lists as ``[a, b]``,
    None and NaN blank)."""

    def fmt(v):
        if isinstance(v, (list, tuple)):  # e.g. a confidence interval [low, high]
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        if isinstance(v, float):
            if math.isnan(v):  # not measured (e.g. last-word accuracy with --lambada 0): blank, as None
                return ""
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
        return "" if v is None else str(v)

    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(out)


def write_results(path: str | Path | None, payload: dict[str, Any], table: str) -> None:
    """Write ``payload`` as JSON to ``path`` and the markdown table next to it (``.md``).

    A ``payload["command"]`` (the command line that made it) heads the markdown, so a rerun
    that overwrites the file keeps saying how to reproduce it."""
    if path is None:
        return
    path = Path(path)
    atomic_write_text(path, json_text(payload))
    head = f"Command: `{payload['command']}`\n\n" if payload.get("command") else ""
    atomic_write_text(path.with_suffix(".md"), head + table + "\n")
