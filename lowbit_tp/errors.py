"""The error type for input a user can fix; the CLI prints it as one line, no traceback."""
from __future__ import annotations

__all__ = ["Terminated", "UserError", "one_line"]


class UserError(ValueError):
    """Bad input the user can fix: a flag value, a path, a model / TP degree / codec mismatch.

    A ``ValueError``, so library callers that catch ``ValueError`` keep working. The
    ``lowbit-tp`` command prints ``lowbit-tp: error: <message>`` and exits with status 2.
    """


class Terminated(BaseException):
    """Raised in the main thread by the SIGTERM handler that the CLI and
    :func:`~lowbit_tp.collectives.spawn_ranks` install, so ``finally`` blocks run: spawned
    ranks are killed and temporary directories removed. A ``BaseException``, like
    ``KeyboardInterrupt``, so ``except Exception`` does not swallow it."""

    def __init__(self, signum: int = 15):
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


def one_line(text: str) -> str:
    """A multi-line error message as the one line the CLI prints: its non-blank lines joined
    by ``"; "`` (by a space after a line that ends in ``:``, which introduces the next)."""
    out = ""
    for ln in (ln.strip() for ln in str(text).splitlines()):
        if ln:
            out += (" " if out.endswith(":") else "; ") + ln if out else ln
    return out
