"""Results on disk: a payload as JSON and its markdown table next to it.

Used by evaluation, the demo, the benchmarks and the scripts that write docs/.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from lowbit_tp.fileio import atomic_write_text

__all__ = ["markdown_table", "write_results"]


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
    """Write ``payload`` as JSON to ``path`` and the markdown table next to it (``.md``)."""
    if path is None:
        return
    path = Path(path)
    atomic_write_text(path, json.dumps(payload, indent=2, default=str))
    atomic_write_text(path.with_suffix(".md"), table + "\n")
