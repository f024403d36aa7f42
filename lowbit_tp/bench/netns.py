"""An emulated cluster network on one machine: one Linux network namespace per rank.

:func:`emulated_link` runs ``scripts/netns.sh`` (the only place that touches ``ip``/``tc``)
and always tears the namespaces down again. Ranks are then started inside their namespace
with :func:`netns_command` (``ip netns exec lbtpR ...``) and reach each other at the
returned addresses, over veth pairs joined by a bridge, shaped on each rank's egress.
See the script's header for the layout and the shaping (tbf for rate; netem for delay where
the kernel has it). Needs root.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator, Sequence

__all__ = ["NetnsError", "emulated_link", "measure_transfer", "netns_available", "netns_command", "namespace"]

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "netns.sh"
PREFIX = "lbtp"


class NetnsError(RuntimeError):
    """The emulated network could not be set up (not root, no iproute2, kernel lacks a qdisc)."""


def namespace(rank: int, *, prefix: str = PREFIX) -> str:
    """Name of rank ``rank``'s network namespace."""
    return f"{prefix}{rank}"


def netns_command(rank: int, argv: Sequence[str], *, prefix: str = PREFIX) -> list[str]:
    """``argv`` run inside rank ``rank``'s namespace."""
    return ["ip", "netns", "exec", namespace(rank, prefix=prefix), *argv]


def _script(*args: str, prefix: str = PREFIX, timeout: float = 60.0) -> str:
    if os.geteuid() != 0:
        raise NetnsError("the emulated network needs root (network namespaces and tc need CAP_NET_ADMIN); "
                         "run as root or benchmark on loopback only")
    if shutil.which("ip") is None or shutil.which("tc") is None:
        raise NetnsError("iproute2 (ip, tc) is not installed")
    res = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "NETNS_PREFIX": prefix})
    if res.returncode != 0:
        raise NetnsError(f"{SCRIPT.name} {' '.join(args)} failed (exit {res.returncode}): {res.stderr.strip()}")
    return res.stdout


def netns_available(*, prefix: str = PREFIX) -> tuple[bool, str]:
    """Whether :func:`emulated_link` can work here, and why not."""
    try:
        with emulated_link(world=1, rate="none", delay="0", prefix=prefix):
            pass
    except (NetnsError, OSError, subprocess.SubprocessError) as exc:
        return False, str(exc)
    return True, ""


@contextlib.contextmanager
def emulated_link(*, world: int, rate: str = "1gbit", delay: str = "0",
                  prefix: str = PREFIX) -> Iterator[list[str]]:
    """Bring up ``world`` namespaces linked at ``rate`` per direction; yield each rank's IP.

    ``rate``: a tc rate (``10gbit``, ``1gbit``) or ``none``; ``delay``: one-way delay per
    packet (``0.5ms``), ``0`` for none (needs netem otherwise). Leftovers of an earlier run
    are removed first; everything is removed on exit, also on error. ``prefix`` names the
    namespaces (``{prefix}0``...), so that separate users do not remove each other's.
    """
    try:
        _script("up", str(world), rate, delay, prefix=prefix)
        yield _script("hosts", str(world), prefix=prefix).split()
    finally:
        with contextlib.suppress(NetnsError, OSError, subprocess.SubprocessError):
            _script("down", prefix=prefix)


# ----------------------------------------------------------------- transfer check
_RECEIVER = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1)
print("ready", flush=True)
c, _ = s.accept(); n = 0; t0 = None
while True:
    b = c.recv(1 << 20)
    if not b: break
    if t0 is None: t0 = time.perf_counter()
    n += len(b)
print(n, time.perf_counter() - t0, flush=True)
"""


def measure_transfer(*, nbytes: int = 32 << 20, src: int = 0, dst: int = 1, hosts: Sequence[str] | None = None,
                     port: int = 29411, timeout: float = 60.0, prefix: str = PREFIX) -> float:
    """Send ``nbytes`` over TCP from rank ``src``'s namespace to rank ``dst``'s; return bits/s.

    With ``hosts=None`` both ends run in the root namespace on 127.0.0.1 (a loopback
    reference). The receiver times from the first to the last byte.
    """
    import sys

    addr = "127.0.0.1" if hosts is None else hosts[dst]
    recv_cmd = [sys.executable, "-c", _RECEIVER, addr, str(port)]
    if hosts is not None:
        recv_cmd = netns_command(dst, recv_cmd, prefix=prefix)
    proc = subprocess.Popen(recv_cmd, stdout=subprocess.PIPE, text=True)
    try:
        if proc.stdout.readline().strip() != "ready":
            raise NetnsError("transfer receiver did not start")
        send = (f"import socket,sys\ns=socket.create_connection(('{addr}',{port}))\n"
                f"b=bytes(1<<20)\nfor _ in range({nbytes >> 20}): s.sendall(b)\ns.close()\n")
        send_cmd = [sys.executable, "-c", send]
        if hosts is not None:
            send_cmd = netns_command(src, send_cmd, prefix=prefix)
        subprocess.run(send_cmd, check=True, timeout=timeout)
        out, _ = proc.communicate(timeout=timeout)
        got, seconds = out.split()
        return 8 * int(got) / float(seconds)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _check_rates() -> None:  # pragma: no cover - manual check: python -m lowbit_tp.bench.netns
    print(f"loopback: {measure_transfer() / 1e9:.2f} Gbit/s")
    for rate in ("none", "10gbit", "1gbit"):
        with emulated_link(world=2, rate=rate) as hosts:
            t0 = time.perf_counter()
            bps = measure_transfer(hosts=hosts, nbytes=(64 if rate != "1gbit" else 32) << 20)
            print(f"netns rate={rate}: {bps / 1e9:.2f} Gbit/s ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":  # pragma: no cover
    _check_rates()
