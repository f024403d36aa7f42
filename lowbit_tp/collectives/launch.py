"""Start N local ranks of a function under torch.distributed, with a hard deadline.

Used by the tests, ``bench-comm`` and the local TP runtime. Under ``torchrun`` the
runtime initialises the process group from the environment instead (``init_from_env``).
"""
from __future__ import annotations

import datetime
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class RankFailure(RuntimeError):
    """One or more spawned ranks raised, died, or missed the deadline."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(*, rank: int, world_size: int, init_method: str, backend: str = "gloo",
                       timeout_s: float = 60.0) -> None:
    """``dist.init_process_group`` with an explicit timeout: collectives fail after it."""
    dist.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))


def init_from_env(*, backend: str | None = None, timeout_s: float = 60.0) -> tuple[int, int]:
    """Initialise from torchrun's ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``; returns (rank, world)."""
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def _entry(rank, world_size, init_method, backend, timeout_s, out_dir, threads, fn, args, kwargs):
    torch.set_num_threads(threads)
    path = Path(out_dir) / f"rank{rank}.pt"
    try:
        init_process_group(rank=rank, world_size=world_size, init_method=init_method, backend=backend,
                           timeout_s=timeout_s)
        result = fn(rank, world_size, *args, **kwargs)
        torch.save({"ok": True, "result": result}, path)
    except BaseException as exc:  # report everything to the parent, including SystemExit
        torch.save({"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}, path)
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def spawn_ranks(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo",
                timeout_s: float = 60.0, deadline_s: float | None = None, threads: int = 1,
                allow_failures: bool = False, **kwargs: Any) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` fresh processes.

    ``fn`` must be importable (module level). ``timeout_s`` is the process group's
    collective timeout; ``deadline_s`` (default ``timeout_s + 60``) bounds the whole run,
    after which stragglers are killed and :class:`RankFailure` is raised. Returns the
    ranks' results in rank order. With ``allow_failures`` a failed rank's entry is a dict
    ``{"error": ..., "traceback": ...}`` (or ``{"error": "died"...}``) instead of raising.
    """
    deadline_s = timeout_s + 60.0 if deadline_s is None else deadline_s
    ctx = mp.get_context("spawn")
    init_method = f"tcp://127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory(prefix="lowbit_tp_ranks_") as out_dir:
        procs = [ctx.Process(target=_entry, args=(r, world_size, init_method, backend, timeout_s, out_dir,
                                                  threads, fn, args, kwargs), daemon=False)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        end = time.monotonic() + deadline_s
        for p in procs:
            p.join(max(0.0, end - time.monotonic()))
        stuck = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        results, errors = [], []
        for r in range(world_size):
            f = Path(out_dir) / f"rank{r}.pt"
            if r in stuck:
                rec = {"ok": False, "error": f"rank {r} still running after the {deadline_s:.0f}s deadline; killed"}
            elif not f.exists():
                rec = {"ok": False, "error": f"rank {r} died without a result (exit code {procs[r].exitcode})"}
            else:
                rec = torch.load(f, weights_only=False)
            if rec["ok"]:
                results.append(rec["result"])
            else:
                errors.append(f"rank {r}: {rec['error']}\n{rec.get('traceback', '')}")
                results.append({"error": rec["error"], "traceback": rec.get("traceback", "")})
        if errors and not allow_failures:
            raise RankFailure("spawned ranks failed:\n" + "\n".join(errors))
        return results
