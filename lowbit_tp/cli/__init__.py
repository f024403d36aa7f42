"""The ``lowbit-tp`` command line. Each subcommand is a thin layer over a library call.

One module per subcommand group (``demo``, ``calibrate``, ``eval``, ``run``, ``serve``,
``bench``), each with a ``register(subparsers)``. Flag defaults are read from the config
dataclasses of :mod:`lowbit_tp.configs`, never restated. Building the parser imports only
those torch-free modules, so ``lowbit-tp --help`` does not import torch; each command
imports its library code when it runs.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from lowbit_tp import __version__
from lowbit_tp.cli import bench, calibrate, demo, eval, run, serve
from lowbit_tp.errors import Terminated, UserError, one_line

__all__ = ["build_parser", "main"]

COMMANDS = (demo, calibrate, eval, run, serve, bench)


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad flag reported in one line (no usage block) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lowbit-tp", description=__doc__.split("\n\n")[0],
                     epilog="User errors print one line; LOWBIT_TP_DEBUG=1 shows the traceback instead.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def _debug() -> bool:
    return os.environ.get("LOWBIT_TP_DEBUG", "") not in ("", "0")


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. User errors (bad flags, paths, model/TP/codec/calibration
    mismatches, a failed rank) print ONE line to stderr: status 2 for user errors, 1 for a
    failed rank, 130 on Ctrl-C, 143 on SIGTERM. ``LOWBIT_TP_DEBUG=1`` re-raises instead."""
    args = build_parser().parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there
    old_term = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("lowbit-tp: interrupted", file=sys.stderr)
        return 130
    except Terminated as exc:
        print(f"lowbit-tp: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except UserError as exc:
        if _debug():
            raise
        print(f"lowbit-tp: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        # RankFailure lives with the collectives (torch); a failed command has paid that import already.
        from lowbit_tp.codecs.base import NonFiniteError
        from lowbit_tp.collectives import CollectiveError, RankFailure

        if isinstance(exc, NonFiniteError) and not _debug():  # the simulator's (in this process): NaN/Inf
            print(f"lowbit-tp: error: {exc} (LOWBIT_TP_DEBUG=1 shows the traceback)", file=sys.stderr)
            return 1
        if isinstance(exc, CollectiveError) and not _debug():
            # this process is a rank (torchrun): a dead or stalled peer, a rendezvous that timed
            # out, ranks that disagree on the configuration; spawned ranks' come as a RankFailure
            print(f"lowbit-tp: error: {one_line(exc)} (LOWBIT_TP_DEBUG=1 shows the traceback)", file=sys.stderr)
            return 1
        if not isinstance(exc, RankFailure) or _debug():
            raise
        print(f"lowbit-tp: error: {exc.summary} (LOWBIT_TP_DEBUG=1 shows every rank's traceback)", file=sys.stderr)
        return 1
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old_term)
    return 0
