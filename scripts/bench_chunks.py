#!/usr/bin/env python3
"""Sweep the pipelining chunk size (``AutoPolicy.chunk_bytes``) on loopback and on an emulated link.

For each network (``loopback``, or a tc rate such as ``1gbit``: one network namespace per
rank, see ``scripts/netns.sh``; needs root) this starts ``--world`` gloo ranks that run
``lowbit-tp bench-comm``'s rank loop (:func:`lowbit_tp.bench.comm._bench_rank`): each codec
over ``gather`` at each chunk size, next to a bf16 ``exact`` all-reduce of the same message in
the same run, medians of ``--repeats`` timed calls after a barrier each. Messages are
``[numel / hidden, hidden]`` bf16 partials. Writes JSON and a markdown table.

    PYTHONPATH=. python3 scripts/bench_chunks.py --network loopback --network 1gbit \
        --json docs/bench/comm_chunks_net.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHUNKS = (0, 262144, 1048576, 4194304)


def _worker(cfg_path: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from lowbit_tp.bench.comm import _bench_rank
    from lowbit_tp.configs import CommBenchConfig
    from lowbit_tp.collectives.launch import init_from_env

    spec = json.loads(Path(cfg_path).read_text())
    cfg = CommBenchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()})
    torch.set_num_threads(cfg.threads_per_rank)
    rank, world = init_from_env(backend="gloo", timeout_s=cfg.timeout_s)
    try:
        rows = _bench_rank(rank, world, cfg)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if rank == 0:
        Path(out_dir, "rows.json").write_text(json.dumps([r.to_json() for r in rows]))


def _launch(cfg, *, world: int, hosts, port: int, timeout_s: float) -> list[dict]:
    from lowbit_tp.bench.netns import netns_command
    from lowbit_tp.collectives.launch import set_parent_death_signal

    with tempfile.TemporaryDirectory(prefix="lowbit_tp_chunks_") as tmp:
        Path(tmp, "config.json").write_text(json.dumps(asdict(cfg)))
        procs = []
        for r in range(world):
            env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r),
                   "MASTER_ADDR": "127.0.0.1" if hosts is None else hosts[0], "MASTER_PORT": str(port),
                   "GLOO_SOCKET_IFNAME": "lo" if hosts is None else "eth0", "OMP_NUM_THREADS": "1"}
            argv = [sys.executable, str(Path(__file__).resolve()), "--worker", str(Path(tmp, "config.json")), tmp]
            if hosts is not None:
                argv = netns_command(r, argv, prefix=PREFIX)
            procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True, preexec_fn=set_parent_death_signal))
        logs = []
        for p in procs:
            try:
                logs.append(p.communicate(timeout=timeout_s)[0])
            except subprocess.TimeoutExpired:
                p.kill()
                logs.append(p.communicate()[0])
        if any(p.returncode for p in procs) or not Path(tmp, "rows.json").exists():
            raise RuntimeError("chunk sweep ranks failed:\n" + "\n".join(x[-2000:] for x in logs))
        return json.loads(Path(tmp, "rows.json").read_text())


PREFIX = "lbtck"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--network", action="append", help="loopback or a tc rate (1gbit); repeatable")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--codec", action="append", help="default int4-outlier")
    p.add_argument("--numel", type=int, action="append", help="values per message; default 1048576 and 4194304")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--chunk-bytes", type=int, action="append", help=f"default {CHUNKS}")
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--json", help="write results here (and a .md next to it)")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(*args.worker)
        return
    from lowbit_tp.configs import CommBenchConfig
    from lowbit_tp.bench.common import environment
    from lowbit_tp.collectives.launch import free_port
    from lowbit_tp.bench.netns import emulated_link
    from lowbit_tp.results import markdown_table, write_results

    cfg = CommBenchConfig(world_sizes=(args.world,), codecs=tuple(args.codec or ["int4-outlier"]),
                          numels=tuple(args.numel or [1048576, 4194304]), algorithms=("gather",),
                          hidden=args.hidden, repeats=args.repeats,
                          chunk_bytes=tuple(args.chunk_bytes or CHUNKS))
    rows, t0, load0 = [], time.time(), os.getloadavg()[0]
    for net in args.network or ["loopback"]:
        if net == "loopback":
            got = _launch(cfg, world=args.world, hosts=None, port=free_port(), timeout_s=1800)
        else:
            with emulated_link(world=args.world, rate=net, prefix=PREFIX) as hosts:
                got = _launch(cfg, world=args.world, hosts=hosts, port=29700, timeout_s=1800)
        rows += [{"network": net, **r} for r in got]
        print(f"{net}: done ({time.time() - t0:.0f} s)", flush=True)
    env = {**environment(), "loadavg_start": load0, "loadavg_end": os.getloadavg()[0]}
    out = {"config": {**asdict(cfg), "networks": args.network}, "environment": env, "rows": rows}
    cols = ["network", "codec", "algorithm", "chunk_bytes", "numel", "message_bytes", "bits_per_value",
            "latency_ms", "ratio_vs_bf16"]
    table = markdown_table(rows, cols)
    write_results(args.json, out, table)
    print(table)


if __name__ == "__main__":
    main()
