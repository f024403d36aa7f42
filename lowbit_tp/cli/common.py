"""What every subcommand module shares: flag defaults read from a config dataclass, warnings."""
from __future__ import annotations

import json
import sys
from dataclasses import MISSING, fields
from typing import Any

from lowbit_tp.fileio import atomic_write_text


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
        atomic_write_text(path, json.dumps(obj, indent=2, default=str))
