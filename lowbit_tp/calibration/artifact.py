"""The calibration artifact: per-layer, per-rank channel statistics, on disk as safetensors.

A calibration holds, for every row-parallel layer and every *source* of communicated
values, the per-channel statistics of those values over calibration text:

* source ``r`` (``0 <= r < tp``): rank ``r``'s partial output ``Y_r`` of the layer;
* source ``"sum"``: the reduced output ``Y = sum_r Y_r``. Two-shot collectives quantize
  this sum a second time, and static codecs need scales calibrated on it.

Statistics per (layer, source), each ``[E]`` fp32: ``ema_min`` and ``ema_max`` (the
exponential moving average over calibration batches of each channel's min and max, as in
the seed paper) and ``absmax`` (the running max of ``|y|``). Optional, for the scale
ablations (artifacts written before they existed load without them, and a codec that needs
them refuses such an artifact with :class:`CalibrationError`): ``mean_min`` / ``mean_max``
(the plain mean of the batch min / max: an EMA whose decay follows the batch count,
``1 - 1/t`` at batch t, so every batch weighs the same) and ``p999`` (the mean over batches
of each channel's 99.9th percentile of ``|y|``).

Optional per layer (``lowbit-tp calibrate --fisher-weights N``): ``channel_weights[layer]``,
one ``[E]`` fp32 vector of positive finite channel weights shared by every source of the
layer (each rank's partial and the sum), stored as ``"{layer}|all|channel_weight"`` and
described by ``meta["channel_weights"]``. The ``+fisher`` codecs scale values by them before
encoding and divide after decoding (:mod:`lowbit_tp.codecs.mixed`); an artifact without them
loads as before, and such a codec refuses it with :class:`CalibrationError`.

File format (``schema_version`` 2): a safetensors file whose tensors are named
``"{layer}|{source}|{stat}"`` (source is ``rank{r}`` or ``sum``), and whose safetensors
metadata holds one key, ``"lowbit_tp"``, a JSON object::

    {"schema_version": 1, "model": {"name", "weights_sha256", "model_type"}, "tp", "hidden_size",
     "k", "statistic", "ema_decay", "layers": [...], "text": {...}, "versions": {...},
     "tensor_sha256": "<sha256 of all tensors' names, shapes and bytes in sorted-name order>",
     "header_sha256": "<sha256 of this JSON object without header_sha256, keys sorted>"}

The two checksums catch a file whose tensors or header (the bit allocation plan, k, tp...)
were truncated or altered after it was written (version 1 checked only the tensors); the
fingerprint covers both. A structurally invalid header is a :class:`CalibrationError`.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Union

import torch

from lowbit_tp.errors import UserError
from lowbit_tp.fileio import atomic_write_with

SCHEMA_VERSION = 2
STATS = ("ema_min", "ema_max", "absmax")
OPTIONAL_STATS = ("mean_min", "mean_max", "p999")
WEIGHT_SOURCE, WEIGHT_STAT = "all", "channel_weight"  # tensor "{layer}|all|channel_weight"
PERCENTILE = 0.999
Source = Union[int, str]  # a rank index, or "sum"

# A row-parallel layer's name ends in layers.N.self_attn.o_proj or layers.N.mlp.down_proj in
# every architecture the adapters know (HF names; vLLM's prefixes differ only before "layers").
_LAYER_TAIL = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn\.o_proj|mlp\.down_proj)$")


def layer_key(name: str) -> tuple[int, str] | None:
    """``(layer index, "self_attn.o_proj" | "mlp.down_proj")`` of a row-parallel module name,
    or None for a name of another shape."""
    m = _LAYER_TAIL.search(name)
    return (int(m.group(1)), m.group(2)) if m else None


class CalibrationError(UserError):
    """A calibration artifact that is missing, corrupted, or does not fit the run."""


def default_outlier_k(hidden: int) -> int:
    """Channels kept in bf16 when nobody says otherwise: ``hidden // 64`` (the seed paper's
    1/64). The one place this rule lives; a calibration records its own ``k``."""
    return hidden // 64


def _source_key(source: Source) -> str:
    if source == "sum":
        return "sum"
    if isinstance(source, int) and source >= 0:
        return f"rank{source}"
    raise ValueError(f"calibration source must be a rank index or 'sum', got {source!r}")


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel statistics of one (layer, source); each tensor is ``[E]`` fp32."""

    ema_min: torch.Tensor
    ema_max: torch.Tensor
    absmax: torch.Tensor
    mean_min: torch.Tensor | None = None
    mean_max: torch.Tensor | None = None
    p999: torch.Tensor | None = None

    @property
    def range(self) -> torch.Tensor:
        """``ema_max - ema_min``: the paper's outlier score."""
        return self.ema_max - self.ema_min

    def require(self, name: str) -> torch.Tensor:
        """An optional statistic, or a :class:`CalibrationError` naming what to do."""
        value = getattr(self, name)
        if value is None:
            raise CalibrationError(f"this calibration has no {name!r} statistics (it predates them); "
                                   f"recalibrate with `lowbit-tp calibrate`")
        return value


@dataclass
class Calibration:
    """Channel statistics for every (layer, source) plus the metadata that identifies them.

    ``meta`` is the JSON header (see the module docstring); ``stats`` maps
    ``(layer, source)`` to :class:`ChannelStats`.
    """

    meta: dict[str, Any]
    stats: dict[tuple[str, Source], ChannelStats] = field(default_factory=dict)
    channel_weights: dict[str, torch.Tensor] = field(default_factory=dict)

    # ------------------------------------------------------------------ queries
    @property
    def tp(self) -> int:
        return int(self.meta["tp"])

    @property
    def hidden_size(self) -> int:
        return int(self.meta["hidden_size"])

    @property
    def layers(self) -> list[str]:
        return list(self.meta["layers"])

    @property
    def k(self) -> int:
        """Kept (bf16) channels for codecs that take k from the calibration: ``meta["k"]``
        (``lowbit-tp calibrate --k``), else :func:`default_outlier_k`."""
        k = self.meta.get("k")
        return default_outlier_k(self.hidden_size) if k is None else int(k)

    def get(self, layer: str, source: Source) -> ChannelStats:
        """Stats of one (layer, source); a clear error when the artifact lacks them, or when they
        hold NaN/Inf (load and save refuse such files; this catches a Calibration built in code,
        whose static scales would decode finite input to NaN)."""
        st = self.stats.get((layer, source))
        if st is None:
            self._missing(layer, source)
        for name in STATS + OPTIONAL_STATS:
            t = getattr(st, name, None)
            if t is not None and not bool(torch.isfinite(t).all()):
                raise CalibrationError(f"calibration statistics {layer}|{source}|{name} hold NaN/Inf; recalibrate")
        return st

    def _missing(self, layer: str, source: Source) -> None:
        have = self.layers
        if layer not in have:
            shown = ", ".join(have[:4]) + (" ..." if len(have) > 4 else "")
            raise CalibrationError(
                f"calibration has no layer {layer!r} (it has {len(have)} layers: {shown}); "
                f"was it made for another model?"
            )
        if isinstance(source, int) and not isinstance(source, bool) and source >= self.tp:
            raise CalibrationError(
                f"calibration was made for TP degree {self.tp} and has no rank {source} "
                f"(layer {layer!r}); recalibrate with the TP degree of this run"
            )
        raise CalibrationError(
            f"calibration has no statistics for source {source!r} of layer {layer!r} "
            f"(tp={self.tp}); two-shot needs 'sum' statistics"
        )

    def channel_weight(self, layer: str, *, codec: str = "this codec") -> torch.Tensor:
        """The ``[E]`` channel weights of ``layer``; a one-line :class:`CalibrationError` when the
        artifact has none (``codec`` names who asked)."""
        w = self.channel_weights.get(layer)
        if w is None:
            if self.channel_weights:
                raise CalibrationError(f"calibration has no channel weights for layer {layer!r}")
            raise CalibrationError(f"{codec} needs per-channel Fisher weights, which this calibration lacks; "
                                   f"add them with `lowbit-tp calibrate --model M --tp N --from CAL "
                                   f"--fisher-weights 4 --out NEW` (or calibrate with --fisher-weights)")
        return w

    def with_channel_weights(self, weights: dict[str, torch.Tensor], info: dict[str, Any]) -> "Calibration":
        """A copy holding ``weights`` (layer -> ``[E]`` positive finite fp32, every layer) and
        ``info`` as ``meta["channel_weights"]``; checked as :meth:`load` checks them."""
        meta = {k: v for k, v in self.meta.items() if k not in ("tensor_sha256", "header_sha256")}
        meta["channel_weights"] = dict(info)
        weights = {n: w.detach().float().contiguous().clone() for n, w in weights.items()}
        _check_weights(meta, weights, "channel weights")
        return Calibration(meta=meta, stats=dict(self.stats), channel_weights=weights)

    def fingerprint(self) -> str:
        """A short hash of the header and the tensors (used to check that ranks agree)."""
        meta = dict(self.meta)
        meta["tensor_sha256"] = meta.get("tensor_sha256") or _tensor_digest(self._tensors())
        return _header_digest(meta)[:16]

    def check_compatible(
        self,
        *,
        tp: int | None = None,
        hidden_size: int | None = None,
        weights_sha256: str | None = None,
        model_name: str | None = None,
        num_layers: int | None = None,
    ) -> None:
        """Raise :class:`CalibrationError` if this artifact was made for another run setup.

        ``num_layers`` (the model config's ``num_hidden_layers``): the artifact must cover both
        row-parallel layers of each block, checked where its layer names have the usual
        ``layers.N.self_attn.o_proj`` / ``layers.N.mlp.down_proj`` tails (other names are left
        to the run, which looks each layer up)."""
        model = self.meta.get("model", {})
        if weights_sha256 is not None and model.get("weights_sha256") not in (None, weights_sha256):
            raise CalibrationError(
                f"calibration was made for model {model.get('name')!r} "
                f"(weights sha256 {str(model.get('weights_sha256'))[:12]}...), not for "
                f"{model_name or 'this model'} (weights sha256 {weights_sha256[:12]}...)"
            )
        if tp is not None and tp != self.tp:
            raise CalibrationError(
                f"calibration was made for TP degree {self.tp}, but this run uses TP {tp}; "
                f"recalibrate with --tp {tp}"
            )
        if hidden_size is not None and hidden_size != self.hidden_size:
            raise CalibrationError(
                f"calibration has hidden size {self.hidden_size}, the model has {hidden_size}"
            )
        keys = [] if num_layers is None else [layer_key(n) for n in self.layers]
        if keys and None not in keys:
            want = {(i, kind) for i in range(num_layers) for kind in ("self_attn.o_proj", "mlp.down_proj")}
            if not want <= set(keys):
                raise CalibrationError(
                    f"calibration lacks {len(want - set(keys))} of the model's {len(want)} row-parallel layers "
                    f"(it has {len(keys)}, made for {model.get('name') or 'another model'!r}); "
                    f"was it made for another model?")

    # ------------------------------------------------------------------ I/O
    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for (layer, source), st in self.stats.items():
            for name in STATS + OPTIONAL_STATS:
                if getattr(st, name) is not None:
                    out[f"{layer}|{_source_key(source)}|{name}"] = getattr(st, name).float().contiguous()
        for layer, w in self.channel_weights.items():
            out[f"{layer}|{WEIGHT_SOURCE}|{WEIGHT_STAT}"] = w.float().contiguous()
        return out

    def save(self, path: str | Path) -> Path:
        """Write the artifact (safetensors + JSON header with a checksum) in one step: a reader
        never sees a half-written file, and a failed write leaves an earlier file whole."""
        from safetensors.torch import save_file

        tensors = self._tensors()
        # what load would refuse is not written: the statistics as stored (fp32: _tensors casts,
        # so stats built in code in another float dtype still save)
        stored = {k: t for k, t in tensors.items() if not k.endswith(f"|{WEIGHT_SOURCE}|{WEIGHT_STAT}")}
        _check_stats(self.meta, _stats_from_tensors(stored, Path(path)), Path(path))
        meta = dict(self.meta)
        meta["schema_version"] = SCHEMA_VERSION
        meta["tensor_sha256"] = _tensor_digest(tensors)
        meta["header_sha256"] = _header_digest(meta)
        self.meta = meta
        # via a temporary file: a crash or Ctrl-C while writing leaves an earlier file at ``path``
        # whole (safetensors truncates its target first), e.g. the calibration being redone
        header = {"lowbit_tp": json.dumps(meta, sort_keys=True)}
        return atomic_write_with(path, lambda tmp: save_file(tensors, tmp, metadata=header))

    @classmethod
    def load_for(cls, source: "Calibration | str | Path | None", *, tp: int, model: Any) -> "Calibration | None":
        """``source`` (an artifact, or its path; None: no calibration) checked with
        :meth:`check_compatible` against the TP degree and ``model`` (anything with ``name``,
        ``hidden_size`` and ``weights_sha256``, e.g. a model registry's ``ModelInfo``).
        The one load-and-check of every path that takes a calibration for a model."""
        if source is None:
            return None
        cal = source if isinstance(source, Calibration) else cls.load(source)
        cal.check_compatible(tp=tp, hidden_size=model.hidden_size, weights_sha256=model.weights_sha256,
                             model_name=model.name, num_layers=getattr(model, "num_layers", None))
        return cal

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        """Read and verify an artifact; a clear :class:`CalibrationError` on any problem."""
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            raise CalibrationError(f"calibration path {path} is a directory, not a calibration file")
        if not path.is_file():
            raise CalibrationError(f"calibration file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get("lowbit_tp")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises several types for bad headers
            raise CalibrationError(f"{path} is not a readable safetensors file: {exc}") from exc
        if raw is None:
            raise CalibrationError(f"{path} is a safetensors file but not a lowbit-tp calibration")
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{path}: calibration header is not valid JSON: {exc}") from exc
        if not isinstance(meta, dict):
            raise CalibrationError(f"{path}: calibration header must be a JSON object, got {type(meta).__name__}")
        version = meta.get("schema_version")
        if version != SCHEMA_VERSION:
            raise CalibrationError(
                f"{path}: calibration schema version {version!r} is not supported "
                f"(this lowbit-tp reads version {SCHEMA_VERSION}); recalibrate"
            )
        if _header_digest(meta) != meta.get("header_sha256"):
            raise CalibrationError(
                f"{path}: header checksum mismatch (calibration header edited after it was written)"
            )
        digest = _tensor_digest(tensors)
        if digest != meta.get("tensor_sha256"):
            raise CalibrationError(
                f"{path}: tensor checksum mismatch (file corrupted or edited after it was written)"
            )
        _check_header(meta, path)
        weights = {key.rsplit("|", 2)[0]: tensors.pop(key) for key in list(tensors)
                   if key.endswith(f"|{WEIGHT_SOURCE}|{WEIGHT_STAT}")}
        stats = _stats_from_tensors(tensors, path)
        _check_stats(meta, stats, path)
        _check_weights(meta, weights, str(path))
        return cls(meta=meta, stats=stats, channel_weights=weights)


def _header_digest(meta: dict[str, Any]) -> str:
    """sha256 of the header without its own checksum, as sorted-key JSON."""
    body = {k: v for k, v in meta.items() if k != "header_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_header(meta: dict[str, Any], path: Path) -> None:
    """The header fields codecs and runs read, with the types they need."""
    def bad(what: str):
        raise CalibrationError(f"{path}: calibration header {what}; recalibrate")

    for key in ("tp", "hidden_size"):
        if not _is_int(meta.get(key)) or meta[key] < 1:
            bad(f"needs a positive integer {key!r}, got {meta.get(key)!r}")
    k = meta.get("k")
    if k is not None and (not _is_int(k) or not 0 <= k <= meta["hidden_size"]):
        bad(f"has k={k!r}, not an integer in [0, hidden_size={meta['hidden_size']}]")
    layers = meta.get("layers")
    if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
        bad("needs 'layers', a list of layer names")
    for key in ("model", "text", "versions", "bit_allocation", "channel_weights"):
        if key in meta and meta[key] is not None and not isinstance(meta[key], dict):
            bad(f"field {key!r} must be an object, got {type(meta[key]).__name__}")
    plan = meta.get("bit_allocation")
    if plan is not None:
        lay = plan.get("layers")
        if not isinstance(lay, dict) or not all(isinstance(a, str) and isinstance(b, str) for a, b in lay.items()):
            bad("field 'bit_allocation' needs 'layers', an object of layer name -> codec name")


def _check_stats(meta: dict[str, Any], stats: dict[tuple[str, Source], ChannelStats], path: Path) -> None:
    """Every statistic belongs to a listed layer and a source of this TP degree, and is [E] fp32."""
    layers, tp, e = set(meta["layers"]), meta["tp"], meta["hidden_size"]
    for (layer, source), st in stats.items():
        if layer not in layers:
            raise CalibrationError(f"{path}: statistics for layer {layer!r}, which the header does not list")
        if source != "sum" and not source < tp:
            raise CalibrationError(f"{path}: statistics for rank {source} of layer {layer!r}, but tp={tp}")
        for name in STATS + OPTIONAL_STATS:
            t = getattr(st, name)
            if t is None and name in OPTIONAL_STATS:
                continue
            if t.dtype != torch.float32 or tuple(t.shape) != (e,):
                raise CalibrationError(
                    f"{path}: {layer}|{source}|{name} is {t.dtype} {tuple(t.shape)}, expected float32 ({e},)")
            if not bool(torch.isfinite(t).all()):  # a static codec would decode finite input to NaN
                raise CalibrationError(f"{path}: {layer}|{source}|{name} holds NaN/Inf; recalibrate")


def _check_weights(meta: dict[str, Any], weights: dict[str, torch.Tensor], where: str) -> None:
    """Channel weights: none, or one ``[E]`` fp32 vector of positive finite values for every
    listed layer, described by ``meta["channel_weights"]``."""
    if not weights:
        if meta.get("channel_weights") is not None:
            raise CalibrationError(f"{where}: header describes channel weights but the file holds none")
        return
    if not isinstance(meta.get("channel_weights"), dict):
        raise CalibrationError(f"{where}: channel weights without their 'channel_weights' header entry")
    layers, e = list(meta["layers"]), meta["hidden_size"]
    extra = sorted(set(weights) - set(layers))
    missing = [n for n in layers if n not in weights]
    if extra or missing:
        raise CalibrationError(f"{where}: channel weights must cover exactly the listed layers "
                               f"({'unlisted ' + repr(extra[0]) if extra else 'missing ' + repr(missing[0])})")
    for layer, w in weights.items():
        if w.dtype != torch.float32 or tuple(w.shape) != (e,):
            raise CalibrationError(f"{where}: {layer}|{WEIGHT_SOURCE}|{WEIGHT_STAT} is {w.dtype} "
                                   f"{tuple(w.shape)}, expected float32 ({e},)")
        if not bool((torch.isfinite(w) & (w > 0)).all()):
            raise CalibrationError(f"{where}: channel weights of layer {layer!r} must be positive and finite")


def _stats_from_tensors(tensors: dict[str, torch.Tensor], path: Path) -> dict[tuple[str, Source], ChannelStats]:
    grouped: dict[tuple[str, Source], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        parts = key.rsplit("|", 2)
        src = parts[1] if len(parts) == 3 else ""
        if len(parts) != 3 or parts[2] not in STATS + OPTIONAL_STATS or not (
                src == "sum" or (src.startswith("rank") and src[4:].isdigit() and src[4:].isascii())):
            raise CalibrationError(f"{path}: unexpected tensor name {key!r} (expected 'layer|rankN|stat' or "
                                   f"'layer|sum|stat', stat one of {', '.join(STATS + OPTIONAL_STATS)})")
        layer, stat = parts[0], parts[2]
        source: Source = "sum" if src == "sum" else int(src[4:])
        grouped.setdefault((layer, source), {})[stat] = t
    out = {}
    for k, d in grouped.items():
        missing = [s for s in STATS if s not in d]
        if missing:
            raise CalibrationError(f"{path}: layer {k[0]!r} source {k[1]!r} lacks {missing}")
        out[k] = ChannelStats(**{s: d[s] for s in STATS + OPTIONAL_STATS if s in d})
    return out


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class StatsAccumulator:
    """Accumulates :class:`ChannelStats` over batches of communicated values.

    ``update(layer, source, y)`` takes ``y [tokens, E]``; the EMA follows the paper:
    ``ema = decay * ema + (1 - decay) * batch_stat``, initialised with the first batch. The
    plain means of the batch min / max and of the per-batch 99.9th percentile of ``|y|``
    are kept too (see the module docstring).
    """

    def __init__(self, *, ema_decay: float = 0.9):
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.ema_decay = ema_decay
        self._state: dict[tuple[str, Source], list[torch.Tensor]] = {}
        self._batches: dict[tuple[str, Source], int] = {}
        self._order: list[str] = []

    def update(self, layer: str, source: Source, y: torch.Tensor) -> None:
        y = y.detach().reshape(-1, y.shape[-1]).float()
        # One pass for min and max per channel; NaN propagates into them, so the finiteness
        # check runs on two [E] vectors instead of the whole batch.
        bmin, bmax = torch.aminmax(y, dim=0)
        if not (bool(torch.isfinite(bmin).all()) and bool(torch.isfinite(bmax).all())):
            # a CalibrationError (a UserError): the CLI says it in one line, not a traceback
            raise CalibrationError(f"non-finite values in calibration activations of {layer!r} (source {source!r}): "
                                   f"the model gives NaN/Inf on this text (its weights, or its dtype's range)")
        babs = torch.maximum(-bmin, bmax)
        # the ceil(0.999 n)-th smallest |y|, found as the (n - that + 1)-th largest: topk of a
        # few values is several times faster than kthvalue over the whole column
        kth = max(1, math.ceil(PERCENTILE * y.shape[0]))
        bpct = y.abs().topk(y.shape[0] - kth + 1, dim=0).values[-1]
        key = (layer, source)
        if layer not in self._order:
            self._order.append(layer)
        st = self._state.get(key)
        if st is None:
            self._state[key] = [bmin, bmax, babs, bmin.clone(), bmax.clone(), bpct]
            self._batches[key] = 1
            return
        d = self.ema_decay
        st[0] = d * st[0] + (1 - d) * bmin
        st[1] = d * st[1] + (1 - d) * bmax
        st[2] = torch.maximum(st[2], babs)
        n = self._batches[key] = self._batches[key] + 1
        for i, b in ((3, bmin), (4, bmax), (5, bpct)):  # running means: decay 1 - 1/n
            st[i] = st[i] + (b - st[i]) / n

    def build(self, meta: dict[str, Any], *, layers: Iterable[str] | None = None) -> Calibration:
        """Freeze into a :class:`Calibration`; ``meta`` must give at least ``tp`` and ``hidden_size``."""
        meta = dict(meta)
        meta.setdefault("ema_decay", self.ema_decay)
        meta["layers"] = list(layers) if layers is not None else list(self._order)
        stats = {k: ChannelStats(*[t.clone() for t in v]) for k, v in self._state.items()}
        return Calibration(meta=meta, stats=stats)
