"""Shared pieces of the benchmark scripts: timing, medians, JSON + markdown output."""
from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

import lowbit_tp


def median_seconds(fn: Callable[[], Any], *, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def environment() -> dict[str, Any]:
    """What a reader needs to judge the numbers: machine, versions, threads."""
    return {
        "lowbit_tp": lowbit_tp.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


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
    from lowbit_tp.fileio import atomic_write_text

    path = Path(path)
    atomic_write_text(path, json.dumps(payload, indent=2, default=str))
    atomic_write_text(path.with_suffix(".md"), table + "\n")
