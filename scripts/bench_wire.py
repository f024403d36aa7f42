#!/usr/bin/env python3
"""One prefill-sized all-reduce at a time on an emulated link: where bench-e2e's TP-2 time goes.

Starts 2 gloo ranks in their own network namespaces (``scripts/netns.sh``, needs root), each
with a ``[tokens, hidden]`` fp32 partial (bench-e2e's 2048-token prefill message at hidden 2048).
Per round, every variant ``CODEC:CHUNK_BYTES`` (gather; ``CHUNK_BYTES`` is
``AutoPolicy.chunk_bytes``, 0 = one message) runs once, interleaved: an idle gap (``--gap``
seconds, as the ~0.6 s of compute between bench-e2e's prefill all-reduces: the TCP connection
goes idle), a barrier, then one timed :func:`~lowbit_tp.collectives.all_reduce`. A call's time
is the slower rank's (the step waits for it); the arrival skew of bench-e2e is excluded by the
barrier. The first round is a warm-up. Writes JSON and a markdown table.

    PYTHONPATH=. python3 scripts/bench_wire.py --json docs/bench/tp2_wire.json

``--nice -15`` runs the ranks at that nice level (a shared machine's other jobs then disturb
them less; their gloo threads still compete for the cores).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("bf16:0", "int4-outlier:0", "bf16:524288", "int4-outlier:524288", "bf16:1048576",
            "int4-outlier:1048576", "bf16:2097152", "int4-outlier:2097152")
PREFIX = "lbtwire"
LAYER = "model.layers.0.mlp.down_proj"


def _worker(spec_path: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from lowbit_tp.calibration.artifact import Calibration
    from lowbit_tp.codecs import make_codec
    from lowbit_tp.collectives import all_reduce
    from lowbit_tp.collectives.launch import init_from_env
    from lowbit_tp.configs import AutoPolicy

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    rank, _world = init_from_env(backend="gloo", timeout_s=300)
    cal = Calibration.load(spec["calibration"])
    x = torch.randn(spec["tokens"], spec["hidden"], generator=torch.Generator().manual_seed(rank)) * 0.05
    codecs: dict = {}
    times: dict[str, list[float]] = {v: [] for v in spec["variants"]}
    try:
        for _ in range(spec["rounds"] + 1):
            for v in spec["variants"]:
                name, chunk = v.rsplit(":", 1)
                if name not in codecs:
                    codecs[name] = make_codec(name, calibration=cal)
                time.sleep(spec["gap"])
                dist.barrier()
                t0 = time.perf_counter()
                all_reduce(x, codecs[name], algorithm="gather", layer=LAYER,
                           policy=AutoPolicy(chunk_bytes=int(chunk)))
                times[v].append(time.perf_counter() - t0)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(times))


def _calibration(tmp: str, hidden: int) -> str:
    from lowbit_tp.bench.e2e.model import save_random_llama
    from lowbit_tp.bench.e2e.run import calibrate_for

    model = save_random_llama(Path(tmp, "model"), hidden=hidden, intermediate=5632, layers=1, heads=16, kv_heads=4,
                              max_positions=256)
    return calibrate_for(model, 2, 8, Path(tmp, "cal.safetensors"), allocate=False)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--network", default="1gbit", help="a tc rate (1gbit)")
    p.add_argument("--variant", action="append", help=f"CODEC:CHUNK_BYTES, repeatable; default {VARIANTS}")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--gap", type=float, default=0.3, help="idle seconds before each call")
    p.add_argument("--nice", type=int, default=0, help="nice level of the ranks")
    p.add_argument("--congestion", help="TCP congestion control inside the namespaces (e.g. cubic); "
                                        "default: what they inherit (bbr on this machine)")
    p.add_argument("--json", help="write results here (and a .md next to it)")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(*args.worker)
        return
    from lowbit_tp.bench.common import environment
    from lowbit_tp.bench.netns import emulated_link, netns_command
    from lowbit_tp.collectives.launch import set_parent_death_signal
    from lowbit_tp.results import markdown_table, write_results

    variants = tuple(args.variant or VARIANTS)
    t_start, load0 = time.time(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="lowbit_tp_wire_") as tmp:
        spec = {"calibration": _calibration(tmp, args.hidden), "variants": variants, "tokens": args.tokens,
                "hidden": args.hidden, "rounds": args.rounds, "gap": args.gap}
        Path(tmp, "spec.json").write_text(json.dumps(spec))
        with emulated_link(world=2, rate=args.network, prefix=PREFIX) as hosts:
            procs = []
            for r in range(2):
                if args.congestion:  # per route: the namespaces' sysctl may be read-only
                    subprocess.run(["ip", "-n", f"{PREFIX}{r}", "route", "replace", "10.77.0.0/24", "dev", "eth0",
                                    "congctl", args.congestion], check=True)
                env = {**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "MASTER_ADDR": hosts[0],
                       "MASTER_PORT": "29733", "GLOO_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": "1"}
                argv = [sys.executable, str(Path(__file__).resolve()), "--worker", str(Path(tmp, "spec.json")), tmp]
                if args.nice:
                    argv = ["nice", "-n", str(args.nice), *argv]
                procs.append(subprocess.Popen(netns_command(r, argv, prefix=PREFIX), env=env,
                                              preexec_fn=set_parent_death_signal))
            for proc in procs:
                proc.wait(timeout=3600)
            if any(proc.returncode for proc in procs):
                raise SystemExit("bench_wire: a rank failed")
            per_rank = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(2)]
    rows = []
    base: dict[int, float] = {}
    for v in variants:
        name, chunk = v.rsplit(":", 1)
        slowest = [1e3 * max(a, b) for a, b in zip(per_rank[0][v][1:], per_rank[1][v][1:])]
        row = {"codec": name, "chunk_bytes": int(chunk), "tokens": args.tokens, "hidden": args.hidden,
               "median_ms": statistics.median(slowest), "min_ms": min(slowest),
               "rank0_median_ms": 1e3 * statistics.median(per_rank[0][v][1:]), "calls_ms": slowest}
        if name == "bf16":
            base[int(chunk)] = row["median_ms"]
        rows.append(row)
    best_bf16 = min(base.values()) if base else float("nan")
    for row in rows:
        row["speedup_vs_bf16_same_chunks"] = base.get(row["chunk_bytes"], float("nan")) / row["median_ms"]
        row["speedup_vs_best_bf16"] = best_bf16 / row["median_ms"]
    env = {**environment(), "loadavg_start": load0, "loadavg_end": os.getloadavg()[0]}
    import shlex

    cli_args = sys.argv[1:] if argv is None else list(argv)
    out = {"config": {**vars(args), "variants": variants}, "environment": env, "rows": rows,
           "seconds": round(time.time() - t_start, 1),
           "command": "PYTHONPATH=. python3 scripts/bench_wire.py " + shlex.join(cli_args)}
    cols = ["codec", "chunk_bytes", "median_ms", "min_ms", "rank0_median_ms", "speedup_vs_bf16_same_chunks",
            "speedup_vs_best_bf16"]
    table = markdown_table(rows, cols)
    cc = args.congestion or "inherited"
    write_results(args.json, out, f"Load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
                                  f"(2 shared cores); {args.rounds} rounds, gap {args.gap} s, nice {args.nice}, "
                                  f"TCP congestion control {cc}.\n\n{table}")
    print(table)
    print(f"load {load0:.1f} -> {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
