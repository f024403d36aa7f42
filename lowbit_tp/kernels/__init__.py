"""Fast paths for the codecs: Triton kernels (GPU, or CPU under ``TRITON_INTERPRET=1``) and
CPU kernels. Everything here is optional and imported lazily: the eager PyTorch code in
:mod:`lowbit_tp.codecs` is the reference, and every kernel must produce bitwise the same
payloads and sums (tests compare them on small odd shapes).

Which path a codec takes is decided in one place, :func:`resolve_backend`, from the
codec's ``backend`` option (``"auto"``, ``"reference"``, ``"triton"``, ``"cpu"``) and the
device of the tensor. Kernel modules hold kernels only; each codec's dispatch lives next to
the codec.
"""
from __future__ import annotations

import functools
import importlib
import os

import torch

BACKENDS = ("auto", "reference", "triton", "cpu")


class BackendUnavailable(RuntimeError):
    """A codec was told to use a kernel backend that cannot run here."""


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether ``triton`` imports (on a CPU-only machine it runs only under TRITON_INTERPRET=1)."""
    try:
        importlib.import_module("triton")
    except Exception:  # ImportError, or a broken install
        return False
    return True


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def cpu_kernels_available() -> bool:
    """Whether the compiled CPU kernels (``lowbit_tp.kernels.cpu``) load on this machine."""
    try:
        mod = importlib.import_module("lowbit_tp.kernels.cpu")
    except Exception:
        return False
    return bool(getattr(mod, "available", lambda: False)())


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs on ``device``: ``"reference"``, ``"triton"`` or ``"cpu"``.

    ``auto`` takes Triton for CUDA tensors and the CPU kernels for CPU tensors when they are
    available, else the reference. An explicitly named backend that cannot run raises
    :class:`BackendUnavailable` instead of silently falling back.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    if backend == "auto":
        if device.type == "cuda" and triton_available():
            return "triton"
        if device.type == "cpu" and cpu_kernels_available():
            return "cpu"
        return "reference"
    if backend == "triton":
        if not triton_available():
            raise BackendUnavailable("backend='triton' but triton does not import")
        if device.type == "cpu" and not triton_interpreted():
            raise BackendUnavailable("backend='triton' on CPU tensors needs TRITON_INTERPRET=1")
        return "triton"
    if device.type != "cpu" or not cpu_kernels_available():
        raise BackendUnavailable(f"backend='cpu' cannot run on {device} (CPU kernels unavailable or not a CPU tensor)")
    return "cpu"
