"""What the vLLM plugin does, from environment variables or vLLM's ``additional_config``.

Environment (read in every vLLM process; the ``mp`` executor's workers inherit it):

=============================  ===========================================================
``LOWBIT_TP_CODEC``            codec name; unset or empty: the plugin leaves vLLM alone
``LOWBIT_TP_CALIBRATION``      calibration ``.safetensors`` (static codecs need one)
``LOWBIT_TP_ALGORITHM``        ``auto`` (default) | ``exact`` | ``gather`` | ``two-shot``
``LOWBIT_TP_MIN_BYTES``        size gate: messages below this many bf16 bytes (``2*numel``)
                               go to vLLM's own all-reduce (default 65536, as ``auto``)
``LOWBIT_TP_NONFINITE``        ``propagate`` (default) | ``error``: NaN/Inf in a partial
                               (see :class:`PluginConfig`)
``LOWBIT_TP_ERROR_FEEDBACK``   ``1``: error feedback along depth (default off; see
                               :class:`PluginConfig`)
``LOWBIT_TP_CAPTURE_DIR``      tracing: save one call's partial and result per rank here
``LOWBIT_TP_CAPTURE_LAYER``    ... for these layers (calibration names, comma-separated),
                               each layer's latest gated call
``LOWBIT_TP_REPORT_DIR``       tracing: each rank rewrites its reducer report (time and
                               calls per path, traffic) here at most every 0.5 s
=============================  ===========================================================

``--additional-config '{"lowbit_tp": {"codec": ..., "calibration": ..., "algorithm": ...,
"min_bytes": ...}}'`` overrides the environment key by key.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

from lowbit_tp.configs import ALGORITHMS, FEEDBACK_MODES

ENV = {
    "codec": "LOWBIT_TP_CODEC",
    "calibration": "LOWBIT_TP_CALIBRATION",
    "algorithm": "LOWBIT_TP_ALGORITHM",
    "min_bytes": "LOWBIT_TP_MIN_BYTES",
    "nonfinite": "LOWBIT_TP_NONFINITE",
    "error_feedback": "LOWBIT_TP_ERROR_FEEDBACK",
    "capture_dir": "LOWBIT_TP_CAPTURE_DIR",
    "capture_layer": "LOWBIT_TP_CAPTURE_LAYER",
    "report_dir": "LOWBIT_TP_REPORT_DIR",
}


@dataclass(frozen=True)
class PluginConfig:
    """The plugin's settings; ``codec=None`` means disabled (vLLM's own all-reduce everywhere).

    ``min_bytes`` is the size gate, as in vLLM's QuickReduce: a message of ``numel``
    values is compressed when ``2 * numel >= min_bytes`` (its size in bf16), otherwise it
    goes to vLLM's own all-reduce, which is faster for small, latency-bound decode messages.
    ``min_bytes=0`` compresses everything.

    ``nonfinite`` is the codec's NaN/Inf policy. The default ``"propagate"`` does what vLLM's
    own all-reduce does: vLLM runs the model on rows it then discards (its start-up profile
    run leaves attention outputs uninitialised, so ``o_proj`` partials may hold NaN there),
    and the sum carries them on as NaN. ``"error"`` raises instead, which stops vLLM.

    ``error_feedback``: each worker feeds its quantization error forward along the layers
    (:mod:`~lowbit_tp.collectives.feedback`, as ``--error-feedback`` elsewhere), through the
    same :class:`~lowbit_tp.tp.DistReducer`. One forward pass of vLLM is one call of the
    model on all its scheduled tokens (rows: any mix of requests' prefill chunks and decode
    tokens); the chain starts over at its first row-parallel layer, so nothing crosses
    forward passes or requests. ``"first-stage"`` (``LOWBIT_TP_ERROR_FEEDBACK=first-stage``):
    without two-shot's owner errors, so a request's output does not depend on what else is
    in its batch (:data:`~lowbit_tp.configs.FEEDBACK_MODES`).
    """

    codec: str | None = None
    calibration: str | None = None
    algorithm: str = "auto"
    min_bytes: int = 64 * 1024
    nonfinite: str = "propagate"
    error_feedback: bool | str = False
    capture_dir: str | None = None
    capture_layer: str | None = None
    report_dir: str | None = None

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"lowbit-tp plugin: unknown algorithm {self.algorithm!r}; choose one of "
                             f"{', '.join(ALGORITHMS)}")
        if self.algorithm == "exact" and self.codec and self.codec != "bf16":  # refused before vLLM starts
            raise ValueError(f"lowbit-tp plugin: algorithm 'exact' (vLLM-sized messages uncompressed) would ignore "
                             f"codec {self.codec!r}; use gather, two-shot or auto, or codec bf16")
        if self.nonfinite not in ("propagate", "error"):
            raise ValueError(f"lowbit-tp plugin: nonfinite must be 'propagate' or 'error', got {self.nonfinite!r}")
        if self.min_bytes < 0:
            raise ValueError(f"lowbit-tp plugin: min_bytes must be >= 0, got {self.min_bytes}")

    @property
    def enabled(self) -> bool:
        return bool(self.codec)

    def as_env(self) -> dict[str, str]:
        """The environment that reproduces this config in another process."""
        return {ENV[f.name]: str(getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "PluginConfig":
        env = os.environ if environ is None else environ
        return cls.from_mapping({k: env[v] for k, v in ENV.items() if env.get(v)})

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, base: "PluginConfig | None" = None) -> "PluginConfig":
        if not isinstance(values, Mapping):  # a string was read as its characters: "unknown setting(s) ['-', ...]"
            raise ValueError(f"lowbit-tp plugin: settings must be a mapping such as {{\"codec\": \"int4-g32\"}}, "
                             f"got {type(values).__name__} {values!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"lowbit-tp plugin: unknown setting(s) {unknown}; known: {sorted(known)}")
        kw = dict(values)
        if "min_bytes" in kw:
            try:
                v = kw["min_bytes"]
                if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                    raise ValueError  # int() would take JSON's true as 1 and 1.9 as 1
                kw["min_bytes"] = int(v)
            except (TypeError, ValueError, OverflowError):  # int()'s own message does not name the setting
                raise ValueError(f"lowbit-tp plugin: min_bytes must be an integer number of bytes, "
                                 f"got {kw['min_bytes']!r}") from None
        if "error_feedback" in kw:
            kw["error_feedback"] = _flag(kw["error_feedback"])
        return replace(base or cls(), **kw)


def _flag(value: Any) -> bool | str:
    """The feedback setting from the environment's text (``1``/``true``/``0``/``false``/
    ``first-stage``), a bool, or ``"first-stage"``."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    if text in FEEDBACK_MODES:  # the named modes ("first-stage")
        return text
    raise ValueError(f"lowbit-tp plugin: error_feedback must be 1/true, 0/false or first-stage, got {value!r}")


def resolve_config(additional_config: Mapping[str, Any] | None) -> PluginConfig:
    """Environment first, then ``additional_config["lowbit_tp"]`` on top."""
    cfg = PluginConfig.from_env()
    extra = (additional_config or {}).get("lowbit_tp") if isinstance(additional_config, Mapping) else None
    return PluginConfig.from_mapping(extra, base=cfg) if extra else cfg
