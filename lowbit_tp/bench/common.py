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


def capture_graph(fn: Callable[[], Any], calls: int = 1) -> "torch.cuda.CUDAGraph":
    """``calls`` calls of ``fn`` captured in one CUDA graph, after a warm-up call on a side
    stream (as torch.cuda.graphs asks)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


def graph_call_seconds(fn: Callable[[], Any], *, repeats: int, calls: int = 5,
                       on_capture_error: Callable[[Exception], None] | None = None) -> float:
    """The GPU's time alone for one call of ``fn``: ``calls`` calls captured in one CUDA graph,
    the median of ``repeats`` replays timed by CUDA events, divided by ``calls``. If the
    capture fails and ``on_capture_error`` is given, it gets the error and ``calls`` eager calls
    are timed the same way instead (the host's launch cost then included); else it raises."""
    try:
        run = capture_graph(fn, calls).replay
    except Exception as exc:
        if on_capture_error is None:
            raise
        on_capture_error(exc)
        torch.cuda.synchronize()

        def run():
            for _ in range(calls):
                fn()
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / calls)
    return statistics.median(times)


def eager_seconds(fn: Callable[[], Any], dev: torch.device, *, repeats: int) -> float:
    """Median seconds of one call of ``fn``, the host's launch cost included (synchronised on a GPU)."""
    def synced():
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    return median_seconds(synced, repeats=repeats)


def device_seconds(fn: Callable[[], Any], dev: torch.device, *, repeats: int) -> float:
    """On a GPU its time alone for one call of ``fn`` (:func:`graph_call_seconds`); on a CPU
    :func:`eager_seconds`."""
    if dev.type == "cuda":
        return graph_call_seconds(fn, repeats=repeats)
    return eager_seconds(fn, dev, repeats=repeats)
