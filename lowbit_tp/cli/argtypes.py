"""argparse ``type=`` functions: a bad flag value is refused while parsing, in one line."""
from __future__ import annotations

import argparse

from lowbit_tp.configs import FEEDBACK_MODES

__all__ = ["add_feedback_flag", "feedback_flag", "nonneg_float", "nonneg_int", "port", "positive_float", "positive_int",
           "unit_interval"]


def _number(text: str, kind):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def nonneg_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def port(text: str) -> int:
    """A TCP port to listen on, 1-65535 (vLLM's server stopped with a traceback on 70000)."""
    value = _number(text, int)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port, 1-65535, got {text!r}")
    return value


def nonneg_float(text: str) -> float:
    value = _number(text, float)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    return value


def unit_interval(text: str) -> float:
    """A number in [0, 1)."""
    value = _number(text, float)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text!r}")
    return value


def feedback_flag(text: str) -> str:
    """``--error-feedback MODE``: the one mode with a name (a bare ``--error-feedback`` is True)."""
    if text not in FEEDBACK_MODES:
        raise argparse.ArgumentTypeError(f"the only mode is 'first-stage' (a bare --error-feedback feeds back every "
                                         f"error), got {text!r}")
    return text


def add_feedback_flag(parser: argparse.ArgumentParser, default, help: str) -> None:
    """``--error-feedback`` (every error) or ``--error-feedback first-stage`` (each rank's own
    encode errors only: two-shot's output of a row then does not depend on its batch)."""
    parser.add_argument("--error-feedback", nargs="?", const=True, default=default, type=feedback_flag,
                        metavar="first-stage",
                        help=help + "; 'first-stage': without two-shot's owner errors, so a row's output does not "
                                    "depend on its batch (README, Collectives)")
