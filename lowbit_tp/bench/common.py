"""Shared pieces of the benchmarks: timing medians and the environment a result was measured in
(JSON + markdown output is :mod:`lowbit_tp.results`)."""
from __future__ import annotations

import platform
import statistics
import time
from typing import Any, Callable

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
