"""lowbit-tp: low-bit communication for tensor-parallel LLM inference."""
from __future__ import annotations


def _version() -> str:
    # The installed distribution's version (pyproject.toml); a source tree that was never
    # installed (PYTHONPATH only) reports "0+unknown" rather than a made-up number.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lowbit-tp")
    except PackageNotFoundError:
        return "0+unknown"


__version__ = _version()
