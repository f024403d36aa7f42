"""Start the rank processes of one run torchrun-style (in network namespaces on emulated links)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from lowbit_tp.bench.netns import netns_command
from lowbit_tp.collectives.launch import RankFailure, free_port, set_parent_death_signal
from lowbit_tp.fileio import run_tempdir


# Tries of a loopback launch on a fresh port, when another process took the chosen one first.
PORT_TRIES = 3


def launch_ranks(run_cfg: dict, *, world: int, hosts: list[str] | None, port: int | None,
                 timeout_s: float) -> list[dict]:
    """Start ``world`` rank processes (in namespaces when ``hosts``), wait, return their JSON.

    ``port`` None (loopback only): a free port, chosen here. It is free when chosen and closed
    again before rank 0 binds it, so another process can take it in between; rank 0 then fails
    with EADDRINUSE, and the launch is tried again on a new port (``PORT_TRIES`` in all)."""
    if port is not None:
        return _launch_once(run_cfg, world=world, hosts=hosts, port=port, timeout_s=timeout_s)
    if hosts is not None:
        raise ValueError("launch_ranks: the ranks in network namespaces need an explicit port")
    for attempt in range(PORT_TRIES):
        try:
            return _launch_once(run_cfg, world=world, hosts=None, port=free_port(), timeout_s=timeout_s)
        except RankFailure as e:
            rank0 = next((text for r, text in e.failures if r == 0), "")
            if "EADDRINUSE" not in rank0 or attempt == PORT_TRIES - 1:
                raise
    raise AssertionError("unreachable")


def _launch_once(run_cfg: dict, *, world: int, hosts: list[str] | None, port: int, timeout_s: float) -> list[dict]:
    with run_tempdir("lowbit_tp_e2e_") as tmp:
        cfg_path = Path(tmp, "config.json")
        cfg_path.write_text(json.dumps(run_cfg))
        procs, logs = [], []
        for r in range(world):
            env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r),
                   "MASTER_ADDR": "127.0.0.1" if hosts is None else hosts[0], "MASTER_PORT": str(port),
                   "GLOO_SOCKET_IFNAME": "lo" if hosts is None else "eth0",
                   "OMP_NUM_THREADS": str(run_cfg["threads_per_rank"]), "TOKENIZERS_PARALLELISM": "false"}
            argv = [sys.executable, "-m", "lowbit_tp.bench.e2e", "--worker", str(cfg_path), tmp]
            if hosts is not None:
                argv = netns_command(r, argv)
            log = open(Path(tmp, f"rank{r}.log"), "w")
            logs.append(log)
            # The ranks die with this process, even when it is SIGKILLed.
            procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          preexec_fn=set_parent_death_signal))
        end = time.monotonic() + timeout_s
        first = None  # the first rank seen failing: the others are stopped at once, not left to
        try:          # wait for it in a collective until their own timeout (300 s)
            while first is None and time.monotonic() < end and any(p.poll() is None for p in procs):
                first = next((r for r, p in enumerate(procs) if p.poll() not in (None, 0)), None)
                time.sleep(0.05)
            if first is None:
                first = next((r for r, p in enumerate(procs) if p.poll() not in (None, 0)), None)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            for log in logs:
                log.close()
        outs, errors = [], []
        for r, p in enumerate(procs):
            f = Path(tmp, f"rank{r}.json")
            if p.returncode == 0 and f.exists():
                outs.append(json.loads(f.read_text()))
            else:
                tail = Path(tmp, f"rank{r}.log").read_text()[-3000:]
                errors.append((r, f"rank {r} (exit {p.returncode}):\n{tail}"))
        if errors:
            if first is None:  # nobody failed on its own: the deadline stopped them
                summary = f"bench-e2e run: rank {errors[0][0]} did not finish within {timeout_s:g} s"
            else:
                lines = [l for l in Path(tmp, f"rank{first}.log").read_text().splitlines() if l.strip()]
                summary = (f"bench-e2e run: rank {first} failed (exit {procs[first].returncode}): "
                           f"{lines[-1].strip() if lines else 'no output'}")
            raise RankFailure(summary + "\n" + "\n".join(e for _, e in errors), summary=summary,
                              failures=[(r, e) for r, e in errors])
        return outs
