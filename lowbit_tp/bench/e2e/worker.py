"""One rank of a benchmark run: ``lowbit-tp run``'s rank function with timers passed in as hooks.

Started as ``python -m lowbit_tp.bench.e2e --worker CONFIG_JSON OUT_DIR`` by
:func:`~lowbit_tp.bench.e2e.launch.launch_ranks`; writes ``rank{R}.json``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from lowbit_tp.collectives.dist import WAIT
from lowbit_tp.collectives.launch import init_from_env
from lowbit_tp.configs import AutoPolicy, RunConfig
from lowbit_tp.runtime.engine import rank_main
from lowbit_tp.tp.row_parallel import CommHooks


class Timers:
    """Wall time inside the row-parallel all-reduces, bucketed per generated token.

    With ``sync_wire`` every backend collective inside an all-reduce is preceded by a
    barrier, timed apart as ``skew_s``: the ranks reach a collective at different times
    (uneven CPU share), and without the barrier that wait would be counted as wire time.
    A pipelined message gets one barrier, before its first chunk moves; the waits for its
    chunks (``what`` starting with :data:`~lowbit_tp.collectives.dist.WAIT`) are wire time.
    """

    def __init__(self, *, sync_wire: bool = True):
        self.steps: list[dict[str, float]] = []
        self._cur = self._new()
        self.sync_wire = sync_wire

    @staticmethod
    def _new() -> dict[str, float]:
        return {"calls": 0, "all_reduce_s": 0.0, "wire_s": 0.0, "skew_s": 0.0}

    def on_step(self, step: int, token: int) -> None:
        self.steps.append(self._cur)
        self._cur = self._new()

    def around_reduce(self, layer: str, reduce):
        t0 = time.perf_counter()
        try:
            return reduce()
        finally:
            self._cur["all_reduce_s"] += time.perf_counter() - t0
            self._cur["calls"] += 1

    def around_wire(self, what: str, group, send):
        if self.sync_wire and not what.startswith(WAIT):
            t0 = time.perf_counter()
            dist.barrier(group=group)
            self._cur["skew_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        try:
            return send()
        finally:
            self._cur["wire_s"] += time.perf_counter() - t0

    def hooks(self):
        return CommHooks(around_reduce=self.around_reduce, around_wire=self.around_wire)


def worker_main(cfg_path: str, out_dir: str) -> None:
    """One rank, torchrun-style: run the config at ``cfg_path``, write ``rank{R}.json``."""
    spec = json.loads(Path(cfg_path).read_text())
    sync_wire = spec.pop("sync_wire", True)
    policy = AutoPolicy(chunk_bytes=spec.pop("chunk_bytes", AutoPolicy.chunk_bytes))
    cfg = RunConfig(**spec, policy=policy)
    torch.set_num_threads(cfg.threads_per_rank)
    timers = Timers(sync_wire=sync_wire)
    rank, world = init_from_env(backend="gloo", timeout_s=cfg.timeout_s)
    try:
        res = rank_main(rank, world, cfg, on_step=timers.on_step, hooks=timers.hooks())
        dist.barrier()
    finally:
        dist.destroy_process_group()
    n = cfg.max_new_tokens
    steps = timers.steps
    out = res.to_json()
    out["timers"] = [steps[i * n:(i + 1) * n] for i in range(len(cfg.prompts))]
    for r in out["results"]:  # the report reads times and traffic only
        for key in ("prompt", "text", "prompt_ids"):
            r.pop(key, None)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out, default=str))
