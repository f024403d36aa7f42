"""Results on disk: a payload as JSON and its markdown table next to it.

Used by evaluation, the demo, the benchmarks and the scripts that write docs/.
"""
from __future__ import annotations

import json
from pathlib import Path
from dataclasses import fields
from typing import Any, Mapping, Sequence

from lowbit_tp.fileio import atomic_write_text

__all__ = ["markdown_table", "record_kwargs", "write_results"]


def record_kwargs(cls: type, d: Mapping[str, Any], *, derived: Sequence[str] = (), required: bool = False,
                  optional: Sequence[str] = (), what: str | None = None) -> dict[str, Any]:
    """The fields of the dataclass ``cls`` found in the JSON object ``d``, as keyword arguments.

    Keys that are not fields raise ValueError, except ``derived`` ones (values a record
    computes and writes, which are dropped here); with ``required``, so do missing fields
    other than ``optional``. ``what`` names the record in the message (default: "a" and the
    class name)."""
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(d) - set(known) - set(derived))
    missing = [k for k in known if k not in d and k not in optional] if required else []
    if unknown or missing:
        msg = f"not {what or 'a ' + cls.__name__}: unknown fields {unknown}"
        raise ValueError(msg + (f", missing fields {missing}" if required else ""))
    return {k: v for k, v in d.items() if k in known}


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub markdown table of ``columns`` (floats to 3 significant digits, lists as ``[a, b]``)."""

    def fmt(v):
        if isinstance(v, (list, tuple)):  # e.g. a confidence interval [low, high]
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        if isinstance(v, float):
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
    atomic_write_text(path, json.dumps(payload, indent=2, default=str))
    head = f"Command: `{payload['command']}`\n\n" if payload.get("command") else ""
    atomic_write_text(path.with_suffix(".md"), head + table + "\n")
