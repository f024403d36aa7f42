"""Per-layer bit allocation under a global budget: one codec per row-parallel layer.

The plan lives in the calibration artifact (``meta["bit_allocation"]``, written by
``lowbit-tp calibrate --allocate BUDGET``): every layer gets a cheap codec except the
layers that calibration measured as most sensitive, which get a wider one, as many as
the average budget allows. All ranks hold the same calibration, so they agree on the plan
without sending anything; every payload is the chosen sub-codec's own payload.
"""
from __future__ import annotations

import hashlib
import json

import torch

from lowbit_tp.calibration.artifact import CalibrationError
from lowbit_tp.codecs.base import (Codec, NonFiniteError, OutOfRangeError, codec_spec, make_codec, register_codec,
                                   register_codec_variant)
from lowbit_tp.codecs.rotation import KeptRotation


class _DelegatingCodec(Codec):
    """A codec that hands each call to a sub-codec chosen by (layer, source); the sub-codec
    validates the input and owns the bytes."""

    def _pick(self, layer, source) -> Codec:
        raise NotImplementedError

    def _subcodecs(self) -> list[Codec]:
        raise NotImplementedError

    def check_nonfinite(self) -> None:
        """Check every sub-codec's flags (``"flag"`` and deferred ``"error"`` mode); one error
        naming them all (:class:`OutOfRangeError` when that is all they found)."""
        errors = []
        for c in self._subcodecs():
            try:
                c.check_nonfinite()
            except NonFiniteError as exc:
                errors.append(exc)
        if errors:
            kind = OutOfRangeError if all(isinstance(e, OutOfRangeError) for e in errors) else NonFiniteError
            raise kind("; ".join(str(e) for e in errors))

    def defers_errors(self, device) -> bool:
        return any(c.defers_errors(device) for c in self._subcodecs())

    def payload_nbytes(self, shape, layer=None):
        return self._pick(layer, 0).payload_nbytes(shape, layer)

    def encode(self, x, *, layer=None, source=0, out=None):
        return self._pick(layer, source).encode(x, layer=layer, source=source, out=out)

    def encode_feedback(self, x, carry, *, layer=None, source=0, out=None, next_out=None):
        return self._pick(layer, source).encode_feedback(x, carry, layer=layer, source=source, out=out,
                                                         next_out=next_out)

    def decode(self, payload, shape, *, layer=None, source=0):
        return self._pick(layer, source).decode(payload, shape, layer=layer, source=source)

    def encode_chunks(self, x, chunks, *, layer=None, source=0, out=None):
        return self._pick(layer, source).encode_chunks(x, chunks, layer=layer, source=source, out=out)

    def decode_chunks(self, payload, chunk_shape, chunks, *, layer=None, source=0, out=None):
        return self._pick(layer, source).decode_chunks(payload, chunk_shape, chunks, layer=layer, source=source,
                                                       out=out)

    def reduce_encode(self, payloads, shape, *, layer=None, sources=None, out_source="sum", out=None,
                      scratch=None):
        sources = list(range(len(payloads))) if sources is None else list(sources)
        sub = self._pick(layer, out_source)
        if all(self._pick(layer, s) is sub for s in sources):  # one sub-codec: its fused path, if any
            return sub.reduce_encode(payloads, shape, layer=layer, sources=sources, out_source=out_source, out=out,
                                     scratch=scratch)
        return self.encode(self.decode_sum(payloads, shape, layer=layer, sources=sources, out=scratch), layer=layer,
                           source=out_source, out=out)

    def decode_sum(self, payloads, shape, *, layer=None, sources=None, out=None):
        if len(payloads) == 0:  # the base class's refusal (no sources would read as "different codecs")
            raise ValueError(f"{self.name}: decode_sum needs at least one payload")
        sources = list(range(len(payloads))) if sources is None else list(sources)
        picked = {id(self._pick(layer, s)): self._pick(layer, s) for s in sources}
        if len(picked) != 1:  # pragma: no cover - every source of one layer uses one sub-codec
            raise ValueError(f"{self.name}: sources {sources} of layer {layer!r} use different codecs")
        return next(iter(picked.values())).decode_sum(payloads, shape, layer=layer, sources=sources, out=out)

    def _encode(self, x, params, nonfinite, **_):  # pragma: no cover - encode() delegates
        raise NotImplementedError

    def _decode(self, payload, shape, params):  # pragma: no cover - decode() delegates
        raise NotImplementedError


@register_codec("alloc", needs_allocation=True)
class AllocatedCodec(_DelegatingCodec):
    """Delegates each layer to the codec its bit allocation names (see module docstring)."""

    name = "alloc"
    needs_calibration = True

    def __init__(self, *, plan: dict | None = None, **kw):
        super().__init__(**kw)
        plan = plan or self.calibration.meta.get("bit_allocation")
        if not plan:
            why = self.calibration.meta.get("bit_allocation_error")
            raise CalibrationError("codec 'alloc' (the default) needs a calibration that stores a per-layer plan "
                                   "(lowbit-tp calibrate --allocate BUDGET)"
                                   + (f"; this one could not make it: {why}" if why else ""))
        for layer, n in plan["layers"].items():  # (checked here: the artifact's checks do not know the registry)
            try:
                spec = codec_spec(n)
            except KeyError:
                raise CalibrationError(f"the bit allocation names unknown codec {n!r} for layer {layer!r}") from None
            if spec.needs_allocation:  # an allocation of allocations built itself until RecursionError
                raise CalibrationError(f"the bit allocation names {n!r} for layer {layer!r}, itself a per-layer "
                                       f"allocation; a plan names one plain codec per layer")
        self.plan = plan
        self._codecs = {n: make_codec(n, calibration=self.calibration, nonfinite=self.nonfinite, backend=self.backend)
                        for n in sorted(set(plan["layers"].values()))}

    def options(self):
        digest = hashlib.sha256(json.dumps(self.plan["layers"], sort_keys=True).encode()).hexdigest()[:12]
        return {"budget": self.plan.get("budget"), "plan_sha256": digest}

    def codec_for(self, layer: str | None) -> Codec:
        try:
            return self._codecs[self.plan["layers"][layer]]
        except KeyError:
            raise CalibrationError(f"the bit allocation has no layer {layer!r}") from None

    def _pick(self, layer, source) -> Codec:
        return self.codec_for(layer)

    def _subcodecs(self) -> list[Codec]:
        return list(self._codecs.values())


def _follows_a_plan(name: str) -> bool:
    """Whether codec ``name`` spends its bits by the calibration's plan, by the registry (so
    aliases such as ``default`` and variants such as ``+fisher`` count, as ``make_codec`` sees them)."""
    try:
        return codec_spec(name).needs_allocation
    except KeyError:  # an unknown name is refused, with the known ones, where the codec is made
        return False


def plan_feedback_warnings(cal, codecs, error_feedback) -> list[str]:
    """A bit allocation planned with error feedback (``calibrate --alloc-error-feedback``) used by a
    run without it: the plan spent its bits by each layer's cost with feedback, which hands a
    layer's error to the next layer; without feedback each layer costs another KL, so the run
    measures a plan made for another setting. The other way round (a plan measured without feedback, run
    with it) is the documented ``default --error-feedback`` and passes.
    ``cal``: a :class:`~lowbit_tp.calibration.Calibration` or None; ``codecs``: names."""
    plan = (cal.meta.get("bit_allocation") or {}) if cal is not None else {}
    if error_feedback or not plan.get("error_feedback"):
        return []
    uses = [c for c in codecs if _follows_a_plan(c)]
    return [f"codec {c!r}: the calibration's bit allocation was planned with error feedback "
            f"(calibrate --alloc-error-feedback); add --error-feedback to run it as planned" for c in uses]


class TwoStageCodec(_DelegatingCodec):
    """One codec for the partials, a wider one for the reduced sum of a two-shot collective.

    Two-shot quantizes twice: each rank's chunk (``source`` = its rank), then the reduced
    chunk (``source="sum"``), whose error lands on every rank unaveraged. Spending more bits
    on the second stage only costs the all-gather half of the traffic. ``payload_nbytes``
    is the partial stage's size; sum-stage payloads have ``second.payload_nbytes``.
    """

    def __init__(self, *, first: str, second: str, name: str, **kw):
        # Sub-codecs check for a calibration themselves; this wrapper needs none of its own.
        self.needs_calibration = False
        super().__init__(**kw)
        opts = {"calibration": self.calibration, "nonfinite": self.nonfinite, "backend": self.backend}
        self.first, self.second = make_codec(first, **opts), make_codec(second, **opts)
        self.name = name

    def options(self):
        return {"first": self.first.config(), "second": self.second.config()}

    def _pick(self, layer, source) -> Codec:
        return self.second if source == "sum" else self.first

    def _subcodecs(self) -> list[Codec]:
        return [self.first, self.second]


register_codec("rot-lm4-g64+sum8", lambda **kw: TwoStageCodec(first="rot-lm4-g64", second="rot-int8-g64-e8",
                                                               name="rot-lm4-g64+sum8", **kw),
               needs_calibration=True)  # its sub-codecs take k from the calibration


FISHER_SUFFIX = "+fisher"


class ChannelWeightedCodec(_DelegatingCodec):
    """``inner`` on ``x * w``, decoded sums divided by ``w``: the calibration's per-channel
    weights (:mod:`lowbit_tp.calibration.weights`), one ``[E]`` vector per layer.

    Payloads are ``inner``'s, byte for byte the payloads of the weighted values: the wire
    format and bits/value do not change, and the weights travel nowhere (every rank holds
    the calibration). One vector is shared by every source of a layer (each rank and the
    sum), because the receivers sum decoded partials: with a shared ``w``,
    ``sum_r dec(x_r * w) / w`` unscales the sum once, after ``inner``'s own fused
    decode-and-sum, instead of one division per received payload; and two-shot's reduce and
    re-encode stay in the weighted domain (:meth:`reduce_encode` is ``inner``'s, fused where
    it is). Per-rank weights fit each partial better (predicted KL on dev −12.6% against
    −10.3% for shared, docs/design-dev.md) at the price of one division per payload.

    Exact arithmetic (the contract a kernel must keep): encode sends
    ``inner.encode(x.float() * w)``; decode-and-sum returns ``inner.decode_sum(...) / w`` in
    fp32 (IEEE division), rounded once to a bf16/fp16 ``out``. Only ``rot-*`` codecs (the
    ``rot-ecsq*`` research codecs included), and ``alloc`` whose layers are all ``rot-*``,
    take weights: their rotation spreads the error evenly over channels, which is what the
    weights assume; static per-channel scales calibrated on unweighted values would clip.
    """

    needs_calibration = True

    def __init__(self, *, inner: str, **kw):
        super().__init__(**kw)
        self.inner = make_codec(inner, calibration=self.calibration, nonfinite=self.nonfinite, backend=self.backend)
        self.name = f"{inner}{FISHER_SUFFIX}"
        leaves = self.inner._subcodecs() if isinstance(self.inner, _DelegatingCodec) else [self.inner]
        if isinstance(self.inner, ChannelWeightedCodec) or not all(isinstance(c, KeptRotation) for c in leaves):
            raise ValueError(f"codec {self.name!r}: channel weights apply to rot-* codecs and alloc plans of "
                             f"rot-* codecs only")
        if not self.calibration.channel_weights:
            self.calibration.channel_weight("", codec=f"codec {self.name!r}")  # raises the one-line error
        self._w: dict = {}

    def options(self):
        return {"inner": self.inner.config()}

    def weight(self, layer, device) -> torch.Tensor:
        """The layer's ``[E]`` fp32 weights on ``device`` (cached)."""
        key = (layer, torch.device(device))
        if key not in self._w:
            self._w[key] = self.calibration.channel_weight(layer, codec=f"codec {self.name!r}").to(key[1])
        return self._w[key]

    def _pick(self, layer, source) -> Codec:
        return self.inner

    def _subcodecs(self) -> list[Codec]:
        return [self.inner]

    def encode(self, x, *, layer=None, source=0, out=None):
        self._check_tensor(x, layer, source)
        return self.inner.encode(x.float() * self.weight(layer, x.device), layer=layer, source=source, out=out)

    def encode_feedback(self, x, carry, *, layer=None, source=0, out=None, next_out=None):
        return None  # inner's would see the unweighted values: the caller's general path weights them

    def decode(self, payload, shape, *, layer=None, source=0):
        return self.inner.decode(payload, shape, layer=layer, source=source) / self.weight(layer, payload.device)

    def encode_chunks(self, x, chunks, *, layer=None, source=0, out=None):
        self._check_tensor(x, layer, source)
        return self.inner.encode_chunks(x.float() * self.weight(layer, x.device), chunks, layer=layer, source=source,
                                        out=out)

    def decode_chunks(self, payload, chunk_shape, chunks, *, layer=None, source=0, out=None):
        # = cat of decode(): the same IEEE division per value, in place in an fp32 ``out``
        direct = out if out is not None and out.dtype == torch.float32 else None
        got = self.inner.decode_chunks(payload, chunk_shape, chunks, layer=layer, source=source, out=direct)
        got.div_(self.weight(layer, payload.device))
        if out is None or got is out:
            return got
        self.check_chunks_out(out, tuple(chunk_shape), chunks, payload.device)  # (inner checked the shape)
        return out.copy_(got[:out.shape[0]])

    def decode_sum(self, payloads, shape, *, layer=None, sources=None, out=None):
        fp32_out = out if out is not None and out.dtype == torch.float32 else None
        acc = self.inner.decode_sum(payloads, shape, layer=layer, sources=sources, out=fp32_out)
        acc.div_(self.weight(layer, acc.device))
        return acc if out is None or acc is out else out.copy_(acc)

    def reduce_encode(self, payloads, shape, *, layer=None, sources=None, out_source="sum", out=None,
                      scratch=None):
        """Two-shot's owner stage in the weighted domain: ``inner.reduce_encode`` of the
        weighted partials is the encoding of ``w * sum``, with no unscale and rescale between."""
        return self.inner.reduce_encode(payloads, shape, layer=layer, sources=sources, out_source=out_source, out=out,
                                        scratch=scratch)



register_codec_variant(FISHER_SUFFIX, ChannelWeightedCodec)
