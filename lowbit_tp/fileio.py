"""Result files: check an output path before the work, write it atomically after.

Every result writer (``run --json``, ``eval --json``, the benchmarks) goes through
:func:`check_output_path` before it starts and :func:`atomic_write_text` at the end, so a
run never ends by losing its results to a missing directory, and a reader never sees a
half-written file (the text goes to a temporary file in the same directory, then
``os.replace``).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from lowbit_tp.errors import UserError

__all__ = ["atomic_write_text", "atomic_write_with", "check_output_path", "run_tempdir"]


def check_output_path(path: str | os.PathLike, *, what: str = "output file") -> Path:
    """Create ``path``'s directory if needed and check a file can be written there.

    Raises :class:`~lowbit_tp.errors.UserError` when ``path`` is or names a directory (ends in a
    separator), its parent
    is a file, or the directory is not writable. Returns ``path`` as a ``Path``.
    """
    p = Path(path).expanduser()
    if str(path) == "" or p.is_dir():
        raise UserError(f"{what} {str(path)!r} is a directory; give a file name")
    if str(path).endswith((os.sep, "/")):  # Path() drops the slash: the file would be written as the directory's name
        raise UserError(f"{what} {str(path)!r} names a directory (it ends in {os.sep!r}); give a file name")
    parent = p.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"cannot write {what} {p}: a part of {parent} is a file, not a directory") from None
    except OSError as exc:
        raise UserError(f"cannot create the directory of {what} {p}: {exc.strerror or exc}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {what} {p}: directory {parent} is not writable")
    try:  # what the writer will do (a temporary file there): some directories pass os.access and refuse it
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise UserError(f"cannot write {what} {p}: a file cannot be created in {parent} "
                        f"({exc.strerror or exc})") from None
    return p


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file in the same directory and ``os.replace``."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write_with(path, write)


def atomic_write_with(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """``write(tmp)`` writes the whole file at ``tmp``, a new file in ``path``'s directory, which
    then replaces ``path`` in one step (``os.replace``). An error or a signal while writing leaves
    ``path`` as it was (an earlier file there is not truncated) and no temporary file behind."""
    p = check_output_path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # what open() would have given; mkstemp makes it 0600
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return p


@contextlib.contextmanager
def run_tempdir(prefix: str) -> Iterator[str]:
    """A temporary directory for one run (``tempfile.TemporaryDirectory``), named
    ``{prefix}{pid}_...``. No handler runs on SIGKILL, so a killed run leaves its directory (the
    evaluation's baseline logits: up to GBs); entering removes those that earlier runs with the
    same ``prefix`` left, where that run is over and the directory is this user's.

    A run holds an ``flock`` on ``.lock`` in its directory while it lives (the kernel drops it
    when the process dies, even by SIGKILL), so "over" is a lock anyone can take: a pid alone
    would misjudge a run in another pid namespace sharing this /tmp (a container). A directory
    without the lock file (another version's) falls back to its pid. The directory comes into
    view (is renamed to its name) only once its lock is held; a run killed in the instant before
    leaves an empty hidden ``.{prefix}...`` directory."""
    base = Path(tempfile.gettempdir())
    for old in base.glob(f"{prefix}*"):
        pid = old.name[len(prefix):].partition("_")[0]
        try:
            mine = old.is_dir() and not old.is_symlink() and old.stat().st_uid == os.getuid()
        except OSError:
            continue
        if pid.isdigit() and mine and _run_over(old, int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    # Made under a hidden name, locked, then renamed into view: a directory that showed its name
    # before its lock was held looked over to a concurrent run, which could delete it live.
    staging = Path(tempfile.mkdtemp(prefix=f".{prefix}{os.getpid()}_", dir=base))
    tmp = None
    try:
        with open(staging / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            visible = str(base / staging.name[1:])
            os.rename(staging, visible)  # fails (ENOTEMPTY) rather than take over another's directory
            tmp = visible
            yield tmp
    finally:
        shutil.rmtree(tmp or staging, ignore_errors=True)


def _run_over(directory: Path, pid: int) -> bool:
    """Whether the run that made ``directory`` is gone: its ``.lock`` can be locked, or,
    without one, its pid is not alive."""
    try:
        fd = os.open(directory / ".lock", os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return not _alive(pid)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held: the run lives (here or in another pid namespace)
        return False
    finally:
        os.close(fd)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, as another user's process
        return True
    return True


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
