"""What every subcommand module shares: flag defaults read from a config dataclass, warnings."""
from __future__ import annotations

import os
import shlex
import sys
from dataclasses import MISSING, fields
from typing import Any

from lowbit_tp.fileio import atomic_write_text
from lowbit_tp.results import json_text


def default(config: type, name: str) -> Any:
    """The default of field ``name`` of the dataclass ``config`` (a flag's default: stated once, there)."""
    for f in fields(config):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:
                return f.default_factory()
            raise TypeError(f"{config.__name__}.{name} has no default")
    raise AttributeError(f"{config.__name__} has no field {name!r}")


def warn(text: str) -> None:
    print(f"lowbit-tp: warning: {text}", file=sys.stderr)


def write_json(path: str | None, obj: Any) -> None:
    """Write a command's result as indented JSON (atomically), when ``--json`` was given."""
    if path:
        atomic_write_text(path, json_text(obj))


# Environment variables that change what a benchmark measures, so they belong in its command line.
COMMAND_ENV = ("NETNS_PREFIX", "TRITON_INTERPRET")


def command_line(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> str:
    """The command as a user would retype it: ``[VAR=value ...] lowbit-tp ARGS`` (for result files)."""
    argv = sys.argv[1:] if argv is None else argv
    environ = os.environ if environ is None else environ
    env = [f"{k}={shlex.quote(environ[k])}" for k in COMMAND_ENV if environ.get(k)]
    return " ".join([*env, "lowbit-tp", shlex.join(argv)])
