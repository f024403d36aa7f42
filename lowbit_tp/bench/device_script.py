"""What the device-check scripts share (``scripts/gpu_check.py``, ``gpu_reduce_split.py``,
``gpu_feedback_cost.py``, ``sweep_group.py``, ``sweep_static.py``, ``sweep_rot.py``).

Each of them runs on one GPU, or with ``--device cpu`` as a dry run of the same code on CPU
tensors under the Triton interpreter. ``triton.jit`` picks the interpreter when a kernel is
*decorated*, that is when a ``lowbit_tp.kernels.triton_*`` module is imported, so
``TRITON_INTERPRET=1`` must be in the environment before then. Hence:

* this module imports neither torch nor triton nor a kernel module at import time (a test
  checks this), so a script can import it at its top;
* :func:`open_device` sets the variable, refuses (instead of silently compiling for a GPU
  that is not there) when a kernel module was already imported without it, imports torch,
  and afterwards checks that Triton's own setting says to interpret.

The timers are :func:`lowbit_tp.bench.common.eager_seconds` and ``device_seconds`` (that
module imports torch).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from lowbit_tp.results import strict_json

INTERPRET = "TRITON_INTERPRET"
_KERNEL_MODULES = "lowbit_tp.kernels.triton"  # the modules holding @triton.jit kernels


def open_device(script: str, device: str, *, interpret: bool | None = None) -> Any:
    """The ``torch.device`` for a script's ``--device`` (``"cuda"`` or ``"cpu"``).

    ``interpret`` (default: ``device == "cpu"``) sets ``TRITON_INTERPRET=1`` first. Exits with
    a message naming ``script`` when ``device`` is ``"cuda"`` and there is none; raises
    RuntimeError when the interpreter is asked for and a kernel module was imported without it,
    or when the kernels turn out not to be interpreted."""
    dry = device == "cpu" if interpret is None else interpret
    if dry:
        os.environ[INTERPRET] = "1"
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"{script}: no CUDA device (use --device cpu for a dry run under the Triton interpreter)")
    if dry:
        from triton import knobs  # what triton.jit reads when a kernel module is imported

        if not knobs.runtime.interpret:
            raise RuntimeError(f"{script}: Triton would compile the kernels, not interpret them, although "
                               f"{INTERPRET}={os.environ.get(INTERPRET)!r}")
        # every kernel module imports triton_common: if one came before the variable was set, its
        # kernels were made for a GPU (a JITFunction), and a dry run would try to compile them
        from lowbit_tp.kernels import triton_common

        if type(triton_common.round_half_even).__name__ != "InterpretedFunction":
            raise RuntimeError(f"{script}: --device cpu needs {INTERPRET}=1 before the Triton kernels are "
                               f"imported, but {_KERNEL_MODULES}_common already is (import kernel modules "
                               "after open_device)")
    return torch.device(device)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"2048x8192,8192x8192"`` -> ``[(2048, 8192), (8192, 8192)]``."""
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",") if s]


def same_bits(a: Any, b: Any) -> bool:
    """fp32 tensors equal bit for bit, NaN compared by position (its payload bits are not)."""
    import torch

    a, b = a.reshape(-1).cpu(), b.reshape(-1).cpu()
    na, nb = torch.isnan(a), torch.isnan(b)
    return bool(torch.equal(na, nb) and torch.equal(a[~na].view(torch.int32), b[~nb].view(torch.int32)))


def command_line(script: str, argv: list[str] | None, *, prefix: str = "python3") -> str:
    """The command that reproduces a run, for the JSON and markdown: ``argv`` (``sys.argv[1:]``
    when the script was called from the shell) after ``prefix scripts/<script>.py``."""
    return " ".join([prefix, f"scripts/{script}.py", *(sys.argv[1:] if argv is None else argv)])


def device_name(dev: Any, cpu: str) -> str:
    """The GPU's name, or ``cpu`` (a script's words for its CPU run)."""
    if dev.type == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return cpu


def write_json(path: Path, doc: dict, *, indent: int = 1, newline: bool = True) -> None:
    """``doc`` to ``path`` (its folder made), as the scripts have always written it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(strict_json(doc), indent=indent, allow_nan=False) + ("\n" if newline else ""))
