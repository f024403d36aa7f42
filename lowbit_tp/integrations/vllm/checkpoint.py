"""Checkpoints for vLLM: GGUF registry models exported to HF safetensors directories, layer
names mapped to the calibration's, and the start-up check of a calibration against a run.

vLLM reads HF checkpoint directories; our registry models ship as GGUF.
:func:`~lowbit_tp.models.export.export_hf`
dequantizes one to fp32 (the same weights the simulator and the native runtime use) and
writes it once to the cache, with a sidecar file ``lowbit_tp_export.json`` that records
the GGUF's sha256, so a calibration made from the GGUF (``lowbit-tp calibrate --model
smollm2-135m``) is recognised as belonging to the export.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

from lowbit_tp.calibration import Calibration, CalibrationError
from lowbit_tp.calibration.artifact import layer_key
from lowbit_tp.codecs import make_codec
from lowbit_tp.codecs.mixed import plan_feedback_warnings
from lowbit_tp.collectives.feedback import FeedbackChain, PostNorm
from lowbit_tp.models import check_tp, get_adapter
from lowbit_tp.models.adapters import post_norm_from_weight
from lowbit_tp.models.export import SIDECAR
from lowbit_tp.models.quick_config import quick_config
from lowbit_tp.models.registry import resolve_source

# vLLM prefixes and HF module names share this tail for every architecture we support
# (Llama: "model.layers.3.mlp.down_proj"; Gemma 3 multimodal: "language_model.model.layers.3...").


# Gemma 2/3's norms between a row-parallel output and the residual, by the same tail.
_NORM_TAIL = re.compile(r"(?:^|\.)layers\.(\d+)\.(post_attention_layernorm|post_feedforward_layernorm)$")


def calibration_layer_name(vllm_prefix: str, calibration_layers: list[str] | None) -> str:
    """The calibration's name for vLLM's layer ``vllm_prefix`` (same index and kind).

    Without a calibration the vLLM prefix itself is returned. Raises
    :class:`CalibrationError` when the calibration has no such layer.
    """
    if not calibration_layers:
        return vllm_prefix
    if vllm_prefix in calibration_layers:
        return vllm_prefix
    key = layer_key(vllm_prefix)
    for name in calibration_layers:
        if key is not None and layer_key(name) == key:
            return name
    raise CalibrationError(
        f"calibration has no layer matching vLLM's {vllm_prefix!r} (it has {len(calibration_layers)} layers, "
        f"e.g. {calibration_layers[0]!r}); was it made for another model?")


@dataclass(frozen=True)
class CheckpointIdentity:
    """What a calibration is matched against: the weights' sha256 values that count as this model."""

    directory: Path
    hidden_size: int
    num_layers: int
    weights_sha256: tuple[str, ...]


def identity(directory: str | Path) -> CheckpointIdentity:
    """Hash the directory's weight files; an export's GGUF sha256 counts too."""
    from lowbit_tp.models import sha256_of_files
    from lowbit_tp.models.registry import resolve_source

    directory = Path(directory)
    src = resolve_source(str(directory))
    cfg = json.loads((directory / "config.json").read_text())
    text = cfg.get("text_config") or cfg
    shas = [sha256_of_files(src.weight_files())]
    side = directory / SIDECAR
    if side.is_file():
        shas.append(json.loads(side.read_text())["source_weights_sha256"])
    return CheckpointIdentity(directory=directory, hidden_size=int(text["hidden_size"]),
                              num_layers=int(text["num_hidden_layers"]), weights_sha256=tuple(shas))


def check_calibration(cal: Calibration, ident: CheckpointIdentity, *, tp: int, path: str = "") -> None:
    """Raise :class:`CalibrationError` unless ``cal`` was made for this checkpoint and TP degree."""
    where = f"calibration {path}: " if path else ""
    made_for = (cal.meta.get("model") or {}).get("weights_sha256")
    if made_for is not None and made_for not in ident.weights_sha256:
        raise CalibrationError(
            f"{where}made for model {cal.meta['model'].get('name')!r} (weights sha256 {made_for[:12]}...), "
            f"not for {ident.directory} (sha256 {ident.weights_sha256[0][:12]}...); recalibrate for this model")
    try:
        cal.check_compatible(tp=tp, hidden_size=ident.hidden_size)
    except CalibrationError as exc:
        raise CalibrationError(f"{where}{exc}") from None
    # vLLM finds each layer by these tails, so here every name must have one (unlike the native run)
    want = {(i, k) for i in range(ident.num_layers) for k in ("self_attn.o_proj", "mlp.down_proj")}
    have = {layer_key(n) for n in cal.layers}
    if not want <= have:
        raise CalibrationError(f"{where}lacks {len(want - have)} of the model's {len(want)} row-parallel layers; "
                               f"was it made for another model?")


@dataclass(frozen=True)
class CheckpointPostNorms:
    """Gemma 2/3's post-norms as the checkpoint holds them, for error feedback in vLLM (whose
    layers never see their model): ``norms`` maps ``(layer index, norm name)`` to its
    :class:`PostNorm` (gain ``1 + weight``, the config's ``rms_norm_eps``, as vLLM's Gemma
    RMSNorm computes it). Called with a norm's full name under any prefix (the calibration's
    or vLLM's), it gives that layer's norm."""

    directory: Path
    norms: dict

    def __call__(self, name: str) -> PostNorm:
        m = _NORM_TAIL.search(name)
        key = None if m is None else (int(m.group(1)), m.group(2))
        if key not in self.norms:
            raise ValueError(f"error feedback: checkpoint {self.directory} has no weight for the post-norm {name!r}")
        return self.norms[key]


def read_post_norms(directory: str | Path) -> CheckpointPostNorms:
    """Every ``layers.<i>.post_attention_layernorm`` / ``post_feedforward_layernorm`` weight of
    the safetensors checkpoint in ``directory`` (a few KiB: read once per worker)."""
    from safetensors import safe_open

    directory = Path(directory)
    cfg = json.loads((directory / "config.json").read_text())
    eps = float((cfg.get("text_config") or cfg).get("rms_norm_eps", 1e-6))
    norms = {}
    for path in resolve_source(str(directory)).weight_files():
        if path.suffix != ".safetensors":
            raise ValueError(f"error feedback on a post-norm model reads its norms from safetensors, not {path.name}")
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                m = _NORM_TAIL.search(key.removesuffix(".weight")) if key.endswith(".weight") else None
                if m is not None:
                    norms[(int(m.group(1)), m.group(2))] = post_norm_from_weight(f.get_tensor(key), eps=eps)
    return CheckpointPostNorms(directory=directory, norms=norms)


def feedback_chain_maker(config: Any, model_dir: str | Path, *, tp: int,
                         owner_errors: bool = True) -> Callable[[Sequence[str]], FeedbackChain]:
    """What the plugin's :class:`~lowbit_tp.integrations.vllm.op.GatedReducer` builds its
    error-feedback chain with, once vLLM has built every layer: the adapter's
    :meth:`~lowbit_tp.models.adapters.ArchitectureAdapter.feedback_chain_for` at TP ``tp``, one
    rank per worker, with Gemma 2/3's post-norms read from the checkpoint in ``model_dir``
    (``config``: the model's HF config); ``owner_errors``: :attr:`FeedbackChain.owner_errors`."""
    adapter = get_adapter(config)
    norm_of = read_post_norms(model_dir) if adapter.post_norm else None
    return partial(adapter.feedback_chain_for, tp=tp, ranks=1, norm_of=norm_of, owner_errors=owner_errors)


def preflight(model_dir: str | Path, *, tp: int, calibration: str | None = None, error_feedback: bool = False,
              codec: str | None = None, name: str | None = None) -> list[str]:
    """The start-up check, run before vLLM starts: one :class:`CalibrationError` (or, for a TP
    degree the model's heads do not fit, error feedback on a post-norm model whose norms the
    checkpoint lacks, or a ``codec`` that is not registered, ``ValueError``) with one message.
    ``name`` labels the model there (default: its directory). ``codec`` is built here once with
    the calibration, as each worker will build it: an unknown name or a static codec without a
    calibration used to pass and stop every worker with a traceback after vLLM's start-up, and
    vLLM's own refusal of a TP degree (TP 2 on SmolLM2's 9 heads) was a 57-line traceback.
    Returns warnings for the caller to show (a plan made for error feedback served without it)."""
    check_tp(quick_config(str(model_dir)), tp, name=name)
    if error_feedback:
        from transformers import AutoConfig

        adapter = get_adapter(AutoConfig.from_pretrained(str(model_dir)))
        if adapter.post_norm:  # the workers will read these norms; say now if one is missing
            norms = read_post_norms(model_dir)
            for i in range(adapter.geometry.num_layers):
                for layer in (f"layers.{i}.self_attn.o_proj", f"layers.{i}.mlp.down_proj"):
                    norms(adapter.post_norm_name(layer))
    cal = None
    if calibration is not None:
        cal = Calibration.load(calibration)
        check_calibration(cal, identity(model_dir), tp=tp, path=str(calibration))
    if codec is not None:
        try:
            make_codec(codec, calibration=cal)
        except KeyError as exc:  # the registry's KeyError: its message, without KeyError's quotes
            raise ValueError(str(exc.args[0]) if exc.args else str(exc)) from None
    return plan_feedback_warnings(cal, [codec] if codec else [], error_feedback)
