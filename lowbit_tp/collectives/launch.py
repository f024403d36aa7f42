"""Start N local ranks of a function under torch.distributed, with a hard deadline.

Used by the tests, ``bench-comm`` and the local TP runtime. Under ``torchrun`` the
runtime initialises the process group from the environment instead (``init_from_env``).

Lifecycle of a local run (:func:`spawn_ranks`):

* the rendezvous store is served by the parent on a socket bound to 127.0.0.1, and gloo
  is pinned to the loopback interface: nothing listens on other interfaces;
* every rank asks the kernel for SIGKILL when its parent dies (``PR_SET_PDEATHSIG``), so
  a ``kill -9`` of the parent leaves no rank behind; a SIGTERM or SIGINT of the parent
  kills the ranks before it exits;
* a rank hands its result (or error) to the parent through a pipe, as ``torch.save``
  bytes, never through a file: a run, even one ended by ``kill -9``, leaves nothing on disk;
* ranks start with SIGINT ignored and then die silently on it (after releasing, below),
  so a terminal Ctrl-C prints one line (the parent's), not one traceback per rank;
* the parent watches all ranks at once: the first rank that fails (raises, dies, is
  killed) is reported at once and the others are stopped, instead of waiting for the
  deadline on a rank that will never finish;
* a rank that leaves early (it raised, the parent stopped it, Ctrl-C) first releases what
  multiprocessing registered with the parent's resource tracker (the named semaphore of
  tqdm's write lock, made by any tqdm bar, e.g. the GGUF loader's); the parent stops
  ranks with SIGTERM and sends SIGKILL only to those still alive after a short grace.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import io
import os
import pickle
import signal
import socket
import sys
import threading
import time
import traceback
from multiprocessing.connection import wait as wait_for_any
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lowbit_tp.collectives.dist import CollectiveError
from lowbit_tp.errors import Terminated, UserError, one_line

class RankFailure(RuntimeError):
    """One or more spawned ranks raised, died, or missed the deadline.

    ``str()`` holds every failed rank's error and traceback; :attr:`summary` is one line
    naming the first failure (what the CLI prints); :attr:`failures` is a list of
    ``(rank, error)`` in the order the parent saw them.
    """

    def __init__(self, message: str, *, summary: str | None = None, failures: list | None = None):
        super().__init__(message)
        self.summary = summary or message.splitlines()[0]
        self.failures = failures or []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(*, rank: int, world_size: int, init_method: str | None = None, backend: str = "gloo",
                       timeout_s: float = 60.0, store=None) -> None:
    """``dist.init_process_group`` with an explicit timeout: collectives fail after it.
    Give either ``init_method`` (``tcp://host:port``) or a ready ``store``."""
    dist.init_process_group(backend=backend, init_method=None if store is not None else init_method, store=store,
                            rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))


_RENDEZVOUS_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def init_from_env(*, backend: str | None = None, timeout_s: float = 60.0) -> tuple[int, int]:
    """Initialise from torchrun's ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``; returns (rank, world).
    A rendezvous that fails (a peer that never joins within ``timeout_s``, a master address no
    one serves, a peer gone during set-up: torch's ``DistError`` family) raises
    :class:`~lowbit_tp.collectives.CollectiveError` naming this rank and the address, as a failed
    collective does. A setup mistake (a backend this torch lacks, a variable missing or not a
    number) raises :class:`~lowbit_tp.errors.UserError` saying so, not a rendezvous hint."""
    env = os.environ
    me = f"rank {env.get('RANK', '?')}/{env.get('WORLD_SIZE', '?')}"
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_backend_available(backend):  # torch's own refusal is a bare AssertionError or RuntimeError
        have = [b for b in dist.Backend.backend_list if b not in ("undefined", "fake") and dist.is_backend_available(b)]
        raise UserError(f"{me}: torch.distributed backend {backend!r} is not available in this torch build "
                        f"(available: {', '.join(have) or 'none'})")
    try:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    except dist.DistError as exc:  # the store's, the network's, or the backend's own connect (a peer gone in set-up)
        raise CollectiveError(
            f"{me}: joining the process group at "
            f"{env.get('MASTER_ADDR', '?')}:{env.get('MASTER_PORT', '?')} failed: {str(exc).rstrip('. ')}. Did every "
            f"rank start (timeout {timeout_s:g} s)?") from exc
    except ValueError as exc:  # env:// read a variable that is missing or not an integer
        bad_env = any(k not in env for k in _RENDEZVOUS_VARS) or any(
            not env[k].strip().isdigit() for k in ("RANK", "WORLD_SIZE", "MASTER_PORT"))
        if not bad_env and "env://" not in str(exc):
            raise  # another mistake (a second init of the default group ...): torch's own message
        shown = ", ".join(f"{k}={env[k]!r}" if k in env else f"{k} unset"
                          for k in _RENDEZVOUS_VARS)
        raise UserError(f"{me}: torch.distributed could not read its setup from the environment ({shown}): "
                        f"{one_line(str(exc)).rstrip('. ')}; start the ranks with torchrun or set these "
                        f"variables") from exc
    return dist.get_rank(), dist.get_world_size()


# ---------------------------------------------------------------------- in the rank
_PR_SET_PDEATHSIG = 1


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_release_lock = threading.Lock()
_released = False


def _release_shared_resources() -> None:
    """Run multiprocessing's exit finalizers of priority >= 0 (the first step of a normal
    process exit, ``multiprocessing.util._exit_function``) before a rank leaves by
    ``os._exit`` or by a signal, which skip them. Once per process, from any thread.

    They unlink the named semaphores this rank made, such as tqdm's write lock (made by the
    first tqdm bar, even a disabled one: the GGUF loader's), and unregister them from the
    resource tracker, which a spawned rank shares with the parent. A name left registered
    is unlinked by the tracker when the parent exits, with "resource_tracker: There appear
    to be N leaked semaphore objects to clean up at shutdown" on the user's terminal.
    Finalizers below priority 0 (joining queue feeder threads) are not run: they may block.
    """
    global _released
    from multiprocessing import util

    # bounded: the main thread may hold a lock a finalizer needs (the resource tracker's) while
    # the watcher thread releases; then skip (the tracker warns, as before) rather than hang
    if not _release_lock.acquire(timeout=1.0):
        return
    try:
        if not _released:
            _released = True
            util._run_finalizers(0)
    finally:
        _release_lock.release()


def _set_disposition(signum: int, action: int) -> None:
    """``signal(2)`` through libc: Python's ``signal.signal`` works in the main thread only.
    ``action``: 0 (SIG_DFL) or 1 (SIG_IGN)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.signal.restype = ctypes.c_void_p
    libc.signal(signum, action)


def _die_releasing(signum: int) -> None:
    """Release the shared resources, then die by ``signum``'s default action, silently, so
    the exit status still names the signal. Runs in the main thread (the Python handler)
    or the watcher thread (:func:`_watch_stop_signals`), whichever comes first."""
    try:
        for other in _STOP_SIGNALS:  # a second signal must not end the release half-way
            _set_disposition(other, 1)
        _release_shared_resources()
        _set_disposition(signum, 0)
        os.kill(os.getpid(), signum)
    finally:
        os._exit(128 + signum)  # reached only if the above failed


def _stopped_by_signal(signum, frame) -> None:
    """The rank's SIGTERM and SIGINT handler (the parent stops ranks with SIGTERM; a terminal
    Ctrl-C sends SIGINT to every rank)."""
    _die_releasing(signum)


def _watch_stop_signals(fd: int) -> None:
    """A thread that reads the signal numbers Python's C handler writes to the wakeup fd.
    The kernel may deliver a signal to any thread of the rank (gloo's, tqdm's monitor): then
    the main thread sleeps or waits on in C and the Python handler runs late or never (the
    parent's SIGKILL came first). This thread acts at once, also while the main thread
    computes in C++ (torch releases the GIL there)."""
    while True:
        try:
            data = os.read(fd, 64)
        except OSError:
            return
        if not data:
            return
        for signum in data:
            if signum in _STOP_SIGNALS:
                _die_releasing(signum)


def _install_stop_handlers() -> None:
    """In the rank's main thread: SIGINT and SIGTERM release the shared resources and end
    the rank silently (:func:`_die_releasing`), whichever thread the kernel hands them to."""
    for signum in _STOP_SIGNALS:
        signal.signal(signum, _stopped_by_signal)
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    threading.Thread(target=_watch_stop_signals, args=(r,), name="lowbit-tp-stop", daemon=True).start()


def set_parent_death_signal() -> None:
    """Ask Linux to SIGKILL this process when its parent exits (``PR_SET_PDEATHSIG``).
    A no-op on other systems (there the parent's handlers are the only guard). Usable as a
    ``subprocess.Popen(preexec_fn=...)``."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass


def die_with_parent(parent_pid: int) -> None:
    """:func:`set_parent_death_signal`, and exit now if the parent is already gone."""
    set_parent_death_signal()
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _send_record(conn, record: dict) -> None:
    """One ``torch.save`` byte string through the pipe: plain bytes, so no tensor travels as
    a shared-memory handle that would die with this process."""
    buf = io.BytesIO()
    torch.save(record, buf)
    conn.send_bytes(buf.getbuffer())


def _entry(rank, world_size, store_addr, backend, timeout_s, conn, threads, parent_pid, fn, args, kwargs):
    die_with_parent(parent_pid)
    # Started with SIGINT ignored (no KeyboardInterrupt traceback during start-up); now a
    # Ctrl-C ends this rank silently (no KeyboardInterrupt either), the parent reports it.
    _install_stop_handlers()
    torch.set_num_threads(threads)
    ok = False
    try:
        host, port = store_addr
        store = dist.TCPStore(host, port, world_size, False, datetime.timedelta(seconds=timeout_s))
        init_process_group(rank=rank, world_size=world_size, backend=backend, timeout_s=timeout_s, store=store)
        result = fn(rank, world_size, *args, **kwargs)
        _send_record(conn, {"ok": True, "result": result})
        ok = True
    except BaseException as exc:  # report everything to the parent, including SystemExit
        _send_record(conn, {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
    conn.close()
    if not ok:
        # A failed rank exits 1 at once: the parent sees the failure from the exit code and
        # stops the others; tearing down a process group whose peer is gone, and the
        # interpreter, can take seconds. os._exit skips multiprocessing's finalizers: run the
        # ones that release what the parent's resource tracker holds for this rank (with the
        # stop signals ignored: their handler would wait for this release's lock).
        for signum in _STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        _release_shared_resources()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:
            pass


# ---------------------------------------------------------------------- in the parent
@contextlib.contextmanager
def _loopback_store(timeout_s: float):
    """A TCPStore server in this process, listening on 127.0.0.1 only; yields (host, port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    host, port = sock.getsockname()
    # The store gets a duplicate descriptor of the socket and owns it; this one stays ours to
    # close. Closing the one a failed store had closed already raised EBADF, or could close an
    # unrelated file that reused the number (a failed start may now leak the duplicate instead).
    with sock:
        # The server connects a client to itself with this timeout; the ranks' stores and process
        # group keep ``timeout_s``. Below a few seconds that self-connection could time out here.
        store = dist.TCPStore(host, port, None, True, datetime.timedelta(seconds=max(timeout_s, 30.0)),
                              wait_for_workers=False, master_listen_fd=os.dup(sock.fileno()))
    try:
        yield host, port
    finally:
        del store


def _loopback_interface() -> str | None:
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    return "lo" if "lo" in names else ("lo0" if "lo0" in names else None)


@contextlib.contextmanager
def _child_start_conditions():
    """What the ranks inherit at start: SIGINT ignored, no tqdm bars (N ranks loading a
    model would interleave N bars), no C++ warnings, gloo on the loopback interface.
    Restored after."""
    env = {"TQDM_DISABLE": "1"}
    if "TORCH_CPP_LOG_LEVEL" not in os.environ:  # c10d's socket warnings: the parent reports failures
        env["TORCH_CPP_LOG_LEVEL"] = "ERROR"
    lo = _loopback_interface()
    if lo and "GLOO_SOCKET_IFNAME" not in os.environ:
        env["GLOO_SOCKET_IFNAME"] = lo
    saved = {k: os.environ.get(k) for k in env}
    main = threading.current_thread() is threading.main_thread()
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if main:
            signal.signal(signal.SIGINT, old_int)


def _raise_terminated(signum, frame):
    raise Terminated(signum)


@contextlib.contextmanager
def _terminate_raises():
    """SIGTERM raises :class:`Terminated` while ranks run (unless the program set its own
    handler), so the ranks are killed before the parent exits."""
    install = (threading.current_thread() is threading.main_thread()
               and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
    old = signal.signal(signal.SIGTERM, _raise_terminated) if install else None
    try:
        yield
    finally:
        if install:
            signal.signal(signal.SIGTERM, old)


# How long a rank may take to leave after SIGTERM (it releases its named semaphores,
# _stopped_by_signal) before it is killed. Python runs the handler only between bytecodes,
# so a rank inside a long C++ call is killed after this and may leave its names to the tracker.
STOP_GRACE_S = 2.0


def _kill(procs, grace_s: float = STOP_GRACE_S) -> None:
    """Stop the ranks still running: SIGTERM, then SIGKILL for those alive after ``grace_s``
    (SIGKILL also ends a stopped (SIGSTOP) or hung rank, which cannot release anything)."""
    signalled = []
    for p in procs:
        if p.is_alive():
            try:
                p.terminate()
                signalled.append(p)
            except (OSError, ValueError):
                pass
    end = time.monotonic() + grace_s
    for p in signalled:
        p.join(max(0.0, end - time.monotonic()))
    for p in procs:
        if p.is_alive():
            try:
                p.kill()
            except (OSError, ValueError):
                pass
    for p in procs:
        p.join(5)


def _exit_reason(rank: int, code: int | None) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"rank {rank} was killed by {name}"
    return f"rank {rank} died without a result (exit code {code})"


def _receive(reader, rank: int, records: dict) -> None:
    """Read rank ``rank``'s record if its pipe holds a whole one; a rank that died before or
    while sending leaves none (its exit code tells why)."""
    try:
        if reader.poll(0):
            records[rank] = torch.load(io.BytesIO(reader.recv_bytes()), weights_only=False)
    except (EOFError, OSError, RuntimeError, pickle.UnpicklingError):
        pass


def spawn_ranks(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo",
                timeout_s: float = 60.0, deadline_s: float | None = None, threads: int = 1,
                allow_failures: bool = False, **kwargs: Any) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` fresh processes.

    ``fn`` must be importable (module level). ``timeout_s`` is the process group's
    collective timeout; ``deadline_s`` (default ``timeout_s + 60``) bounds the whole run,
    after which stragglers are killed and :class:`RankFailure` is raised. Returns the
    ranks' results in rank order.

    The first rank to fail (raise, die, be killed) ends the run at once: the other ranks
    are killed and :class:`RankFailure` names that first failure. With ``allow_failures``
    the parent instead waits for every rank (up to the deadline), and a failed rank's
    entry is a dict ``{"error": ..., "traceback": ...}`` instead of raising.

    A KeyboardInterrupt or SIGTERM in the parent kills the ranks before it propagates
    (SIGTERM as :class:`~lowbit_tp.errors.Terminated`).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise UserError(f"world size must be a positive integer, got {world_size!r}")
    deadline_s = timeout_s + 60.0 if deadline_s is None else deadline_s
    ctx = mp.get_context("spawn")
    procs: list = []
    first: list[int] = []  # failed ranks, in the order the parent saw them
    records: dict[int, dict] = {}  # what each rank sent through its pipe
    readers: dict = {}  # the parent's read end of each rank's pipe -> rank, until read
    all_readers: list = []
    stuck: list[int] = []
    with _terminate_raises(), _loopback_store(timeout_s) as store_addr:
        try:
            try:
                with _child_start_conditions():
                    for r in range(world_size):
                        reader, writer = ctx.Pipe(duplex=False)
                        readers[reader] = r
                        all_readers.append(reader)
                        p = ctx.Process(target=_entry, args=(r, world_size, store_addr, backend, timeout_s, writer,
                                                             threads, os.getpid(), fn, args, kwargs), daemon=False)
                        p.start()
                        writer.close()  # the rank holds the only write end
                        procs.append(p)
                end = time.monotonic() + deadline_s
                pending = {p.sentinel: r for r, p in enumerate(procs)}
                while pending and not (first and not allow_failures):
                    left = end - time.monotonic()
                    if left <= 0:
                        break
                    # Results are read as they come: a rank sending more than the pipe holds
                    # waits for the parent, so it could not exit before its result is read.
                    for s in wait_for_any(list(pending) + list(readers), timeout=min(left, 1.0)):
                        if s in readers:
                            _receive(s, readers.pop(s), records)
                            continue
                        r = pending.pop(s)
                        procs[r].join()
                        if procs[r].exitcode != 0:
                            first.append(r)
                stuck = [r for r, p in enumerate(procs) if p.is_alive()]
            finally:
                _kill(procs)
            for reader, r in readers.items():  # what the ranks sent just before they exited
                if r not in stuck:
                    _receive(reader, r, records)
        finally:
            for reader in all_readers:
                reader.close()
        stopped = bool(first) and not allow_failures
        results, errors, failures = [], [], []
        for r in range(world_size):
            if r in stuck:
                why = ("stopped after another rank failed" if stopped
                       else f"still running after the {deadline_s:.0f}s deadline; killed")
                rec = {"ok": False, "error": f"rank {r} {why}"}
            elif r in records and procs[r].exitcode in (0, 1):
                rec = records[r]
            else:
                rec = {"ok": False, "error": _exit_reason(r, procs[r].exitcode)}
            if rec["ok"]:
                results.append(rec["result"])
            else:
                errors.append(f"rank {r}: {rec['error']}\n{rec.get('traceback', '')}")
                results.append({"error": rec["error"], "traceback": rec.get("traceback", "")})
                failures.append((r, rec["error"]))
        if errors and not allow_failures:
            order = first + [r for r, _ in failures if r not in first]
            by_rank = dict(failures)
            lead = order[0]
            msg = by_rank[lead] if by_rank[lead].startswith("rank ") else f"rank {lead}: {by_rank[lead]}"
            summary = one_line(msg)
            if stopped and stuck:
                summary += f" (stopped the other {len(stuck)} rank{'s' if len(stuck) > 1 else ''})"
            raise RankFailure("spawned ranks failed:\n" + "\n".join(errors), summary=summary,
                              failures=[(r, by_rank[r]) for r in order])
        return results
