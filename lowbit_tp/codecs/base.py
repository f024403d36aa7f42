"""The codec interface and the registry of codecs by name.

A codec turns one communicated tensor ``x [tokens, E]`` (a rank's partial output, or a
chunk of the reduced sum) into a flat ``uint8`` payload and back. The payload *is* the
message: collectives send exactly these bytes and count them, so bits/value is always
measured from real payloads (``8 * payload.numel() / x.numel()``).

Static codecs need a :class:`~lowbit_tp.calibration.Calibration` and the identity of the
values: ``layer`` (the row-parallel module's name) and ``source`` (the rank whose partial
it is, or ``"sum"`` for the reduced output in a two-shot collective). Dynamic codecs ignore
both. Decoding needs the same ``(layer, source)`` as encoding; every rank holds the whole
calibration, so any rank can decode any other rank's payload.
"""
from __future__ import annotations

import hashlib
import json
import math
import operator
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Callable, ClassVar, Sequence

import torch

from lowbit_tp.calibration.artifact import Calibration, CalibrationError, Source
from lowbit_tp.codecs import functional as F
from lowbit_tp.kernels import BACKENDS, resolve_backend

# decode_sum's per-shape cache holds at most this many (shape, layer, sources, device) keys
RECEIVED_CACHE_SIZE = 1024

__all__ = [
    "Codec",
    "NonFiniteError",
    "OutOfRangeError",
    "CodecSpec",
    "codec_spec",
    "register_codec",
    "register_codec_variant",
    "make_codec",
    "list_codecs",
    "CODEC_ALIASES",
]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NONFINITE_MODES = ("error", "propagate", "flag")


class NonFiniteError(FloatingPointError):
    """NaN or Inf reached a codec that was told to refuse them (the default)."""


class OutOfRangeError(NonFiniteError):
    """A finite value beyond what a codec's wire format can carry, in ``nonfinite="error"``
    mode (the alternative would be a silently clipped or non-finite decode).

    Each codec's representable range is in docs/wire-format.md. In ``"propagate"`` mode the
    codec saturates at its largest representable magnitude instead.
    """


class Codec(ABC):
    """Encode ``[tokens, E]`` floats to a flat uint8 payload and decode it to fp32.

    Subclasses implement :meth:`_encode`, :meth:`_decode` and :meth:`payload_nbytes`; the
    public methods here validate inputs once, in one place.

    Args (keyword-only):
        calibration: needed by static codecs, ignored by dynamic ones.
        nonfinite: ``"error"`` (default) raises :class:`NonFiniteError` naming the layer
            and source (:class:`OutOfRangeError` for finite values beyond the wire format);
            ``"propagate"`` encodes NaN/Inf so they decode as NaN. ``"flag"`` sends them as in
            propagate mode and records them on the device: :meth:`check_nonfinite` raises.
            On the fused Triton path (GPU) ``"error"`` is *deferred*: the kernels record
            NaN/Inf and out-of-range values per (layer, source) in device flags instead of a
            host-syncing scan of every message, and :meth:`check_nonfinite`, called once per
            step (the runtime's ``generate`` does), raises the error naming them. The
            reference and CPU paths raise at once, before sending anything.
        backend: ``"auto"`` (default), ``"reference"``, ``"triton"`` or ``"cpu"``: which
            implementation runs (see :func:`lowbit_tp.kernels.resolve_backend`). Every
            backend produces the same bytes and sums, so it is not part of :meth:`config`.
    """

    name: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False
    # Largest |x| the wire format carries (docs/wire-format.md); checked on every encode
    # from the same min/max pass that finds NaN/Inf, before any kernel runs.
    max_input: ClassVar[float] = math.inf
    #: whether the codec's CPU-kernel decode-sum rounds into a bf16/fp16 ``out`` itself
    cpu_sum_casts: ClassVar[bool] = False
    #: whether its Triton decode-sum kernels round into a bf16 ``out`` themselves (``as_stored``)
    triton_sum_casts: ClassVar[bool] = False

    def __init__(self, *, calibration: Calibration | None = None, nonfinite: str = "error",
                 backend: str = "auto"):
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if calibration is not None and not isinstance(calibration, Calibration):  # a path fails late otherwise
            raise TypeError(f"calibration must be a lowbit_tp Calibration (Calibration.load(path)), "
                            f"got {type(calibration).__name__}"
                            + (f" {str(calibration)!r}" if isinstance(calibration, (str, PurePath)) else ""))
        if self.needs_calibration and calibration is None:
            raise _no_calibration(self.name)
        self.calibration = calibration
        self.nonfinite = nonfinite
        self.backend = backend
        self._params: dict[tuple[str | None, Source], Any] = {}
        self._tables: dict[Any, Any] = {}
        self._backends: dict[Any, str] = {}  # kernel_backend's answer per device
        # decode_sum's checked (payload bytes, per-source params) per (shape, layer, sources, device);
        # bounded, oldest first out: a server sees a new token count at almost every step
        self._received: OrderedDict[tuple, tuple[int, list]] = OrderedDict()
        # int32 [2] device flags per (device, layer, source): [NaN/Inf seen, out of range seen]
        self._step_flags: dict[tuple[torch.device, str | None, Source], tuple[torch.Tensor, ...]] = {}

    # ------------------------------------------------------------------ contract
    @abstractmethod
    def payload_nbytes(self, shape: tuple[int, int], layer: str | None = None) -> int:
        """Exact payload size in bytes for an input of ``shape`` at ``layer``.

        Fixed per (shape, layer); only per-layer codecs (``alloc``) look at ``layer``.
        """

    @abstractmethod
    def _encode(self, x: torch.Tensor, params: Any, nonfinite: bool, *, out: torch.Tensor | None = None,
                flags: tuple = (None, None)) -> torch.Tensor:
        """Encode validated ``x``; ``nonfinite`` says whether it holds NaN/Inf to propagate.

        A fused path writes into ``out`` (checked by :meth:`encode`) when given and records
        NaN/Inf / out-of-range values into ``flags`` (int32 device views, or None); other
        paths may ignore both (:meth:`encode` copies into ``out``)."""

    @abstractmethod
    def _decode(self, payload: torch.Tensor, shape: tuple[int, int], params: Any) -> torch.Tensor: ...

    def _decode_sum(self, payloads: Sequence[torch.Tensor], shape: tuple[int, int],
                    params: Sequence[Any], out: torch.Tensor | None = None) -> torch.Tensor:
        """``sum_r _decode(payloads[r], shape, params[r])`` in fp32, left to right, into
        ``out`` when given.

        The reference; a codec with a fused kernel overrides this and dispatches on
        ``self.kernel_backend(payloads[0].device)``. The result must be bitwise the same.
        """
        first = self._decode(payloads[0], shape, params[0]).float()
        acc = first.clone() if out is None else out.copy_(first)
        for p, prm in zip(payloads[1:], params[1:]):
            acc.add_(self._decode(p, shape, prm).float())
        return acc

    def _make_params(self, layer: str | None, source: Source, hidden: int) -> Any:
        """Static parameters of one (layer, source); dynamic codecs have none."""
        return None

    def options(self) -> dict[str, Any]:
        """Constructor options that change the bytes; part of :meth:`config`."""
        return {}

    # ------------------------------------------------------------------ public API
    def config(self) -> dict[str, Any]:
        """Everything that must agree across ranks for payloads to decode correctly.

        Computed once per calibration object (hashing an in-memory calibration costs
        ~0.3 ms, and collectives ask on every call); options are fixed at construction.
        """
        return dict(self._config_entry()[1])

    def fingerprint(self) -> str:
        """A short hash of :meth:`config`. Asked by every compressed all-reduce (its
        configuration check's cache key), so it copies nothing."""
        return self._config_entry()[2]

    def _config_entry(self) -> tuple:
        """``(calibration, config, fingerprint)``, recomputed when the calibration object changes."""
        cached = getattr(self, "_config_cache", None)
        if cached is None or cached[0] is not self.calibration:
            cal = self.calibration.fingerprint() if self.calibration is not None and self.needs_calibration else None
            cfg = {"codec": self.name, **self.options(), "calibration": cal}
            fp = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]
            cached = self._config_cache = (self.calibration, cfg, fp)
        return cached

    def encode(self, x: torch.Tensor, *, layer: str | None = None, source: Source = 0,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """Encode ``x [tokens, E]`` (fp32/bf16/fp16) into a 1-D uint8 payload.

        ``out``: a contiguous uint8 buffer of :meth:`payload_nbytes` bytes on ``x``'s device
        to write the payload into (returned); fused kernels write it directly, so a caller
        that reuses its buffers allocates nothing per message. Same bytes either way.
        """
        self._check_tensor(x, layer, source)  # once: the scanned and the checked path both rely on it
        if out is not None:
            _check_buffer(out, torch.uint8, (self.payload_nbytes(tuple(x.shape), layer),), x.device,
                          f"{self.name}: encode out=")
        payload = self._encode_scanned(x, layer, source, out)
        if payload is not None:
            return payload if out is None or payload is out else out.copy_(payload)
        bad, over = self._check_input(x, layer, source)
        if over:  # propagate mode: saturate finite values beyond max_input (in fp32, where it is exact)
            x = x.float()
            x = torch.where(torch.isfinite(x), x.clamp(-self.max_input, self.max_input), x)
        try:
            got = self._encode(x, self.params(layer, source, x.shape[1], x.device), bad, out=out,
                               flags=self._kernel_flags(layer, source, x.device))
        except OutOfRangeError as exc:  # name the layer and source, which _encode does not know
            raise OutOfRangeError(f"{self.name}: {_where(layer, source)}: {exc}") from None
        return got if out is None or got is out else out.copy_(got)

    def encode_feedback(self, x: torch.Tensor, carry: torch.Tensor | None, *, layer: str | None = None,
                        source: Source = 0, out: torch.Tensor | None = None, next_out: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Error feedback's encode in one kernel pass, where this codec and backend have one.

        Returns ``(payload, next)``: the bytes of ``encode(x.float() + carry)`` (of ``x`` when
        ``carry`` is None; ``carry`` fp32, ``x``'s shape) and, fp32, the sent values less their
        decode, +0.0 where not finite (what ``collectives.feedback.feedback_of`` computes).
        None where there is no such kernel: the caller then encodes and decodes, which gives the
        same bytes and bits. ``out`` as in :meth:`encode`; ``next_out``: a contiguous fp32 buffer of
        ``x``'s shape on its device to write the next carry into (returned as ``next``). ``out``
        and ``next_out`` may be partly written even where this returns None (a kernel that met a
        non-finite value hands over to the general path, which writes them again).

        Here: codecs whose kernels can decode straight into the difference on this backend
        (:attr:`decode_error_backends`, :meth:`_decode_error`) encode, then decode and difference
        in one pass; the static, group and MX codecs override this with encoders that do it all in
        one pass (the group and MX codecs on Triton for an even E).
        """
        self._check_next_out(x, next_out)
        if (self._feedback_backend(x, carry) not in self.decode_error_backends
                or not codes_as(type(self), _definer(type(self), "_decode_error"))):
            return None  # (a subclass that transforms in encode/decode: _decode_error would bypass it)
        if carry is None:
            sent, into = x, next_out
        else:  # collectives.feedback.compensate's arithmetic (x widened exactly, one fp32 add), written
            # where the next carry goes: the decode then overwrites each sent value with its error
            # (the kernels read an element before writing it), one [T, E] fp32 buffer instead of two
            sent = torch.empty(x.shape, dtype=torch.float32, device=x.device) if next_out is None else next_out
            into = torch.add(x, carry, out=sent)
        payload = self.encode(sent, layer=layer, source=source, out=out)
        shape = tuple(sent.shape)
        return payload, self._decode_error(payload, shape, sent, self.params(layer, source, shape[1], x.device),
                                           out=into)

    def _check_next_out(self, x: torch.Tensor, next_out: torch.Tensor | None) -> None:
        if next_out is not None and isinstance(x, torch.Tensor):
            _check_buffer(next_out, torch.float32, tuple(x.shape), x.device, f"{self.name}: encode_feedback next_out=")

    def _feedback_backend(self, x, carry) -> str | None:
        """The kernel backend a one-pass :meth:`encode_feedback` of ``x`` and ``carry`` would run
        on, or None where only the caller's general path takes them: ``x`` not a 2-D
        fp32/bf16/fp16 tensor (the general path casts, as ``compensate`` does), or a carry that
        is not fp32 of ``x``'s shape on its device (the general path adds it, or refuses the shape)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in _FLOAT_DTYPES:
            return None
        if carry is not None and (carry.dtype != torch.float32 or carry.shape != x.shape or carry.device != x.device):
            return None
        return self.kernel_backend(x.device)

    # the kernel backends on which _decode_error exists (CPU: int4-g* and rot-*; Triton: those and mxfp4)
    decode_error_backends: tuple[str, ...] = ()

    def _decode_error(self, payload: torch.Tensor, shape: tuple[int, int], sent: torch.Tensor,
                      params: Any, out: torch.Tensor | None = None) -> torch.Tensor:
        """``sent - decode(payload)`` in fp32, +0.0 where not finite, from one kernel pass on the
        payload's backend (one of :attr:`decode_error_backends`); written into ``out`` (a checked
        contiguous fp32 ``shape`` buffer) when given."""
        raise NotImplementedError

    def decode(
        self, payload: torch.Tensor, shape: tuple[int, int], *, layer: str | None = None, source: Source = 0
    ) -> torch.Tensor:
        """Decode a payload made by :meth:`encode` for the same shape, layer and source; fp32."""
        shape = _as_shape(shape, self.name)
        expected = self.payload_nbytes(shape, layer)
        if payload.dtype != torch.uint8 or payload.dim() != 1 or payload.numel() != expected:
            raise ValueError(
                f"{self.name}: payload for shape {shape} must be {expected} uint8 bytes, "
                f"got {payload.dtype} {tuple(payload.shape)}"
            )
        return self._decode(payload, shape, self.params(layer, source, shape[1], payload.device))

    def decode_sum(
        self, payloads: Sequence[torch.Tensor], shape: tuple[int, int], *, layer: str | None = None,
        sources: Sequence[Source] | None = None, out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``decode(payloads[0]) + decode(payloads[1]) + ...`` in fp32, in that order.

        ``sources[r]`` is the source of ``payloads[r]`` (default: its index, i.e. its rank).
        This is the receiving side of every compressed collective; fused kernels read the N
        payloads once and write the sum once, bitwise equal to decoding one by one.
        ``out``: a contiguous ``shape`` buffer on the payloads' device to write the sum into
        (returned): fp32, or bf16/fp16 for the sum rounded once to that dtype (bitwise
        ``decode_sum(...).to(dtype)``; the CPU kernels round each row as they finish it, which
        saves the caller's cast pass). Same bits either way.
        """
        shape, params = self._payload_params(payloads, shape, layer, sources)
        direct = out
        if out is not None:
            dtype = out.dtype if out.dtype in _FLOAT_DTYPES else torch.float32
            _check_buffer(out, dtype, shape, payloads[0].device, f"{self.name}: decode_sum out=")
            if dtype != torch.float32 and not self._sum_casts(out.device, dtype):
                direct = None  # the fp32 sum, then one cast into ``out``
        got = self._decode_sum(list(payloads), shape, params, direct)
        return got if out is None or got is out else out.copy_(got)

    def encode_chunks(self, x: torch.Tensor, chunks: int, *, layer: str | None = None, source: Source = 0,
                      out: torch.Tensor | None = None) -> torch.Tensor:
        """Two-shot's chunk encodes: ``x [chunks * R, E]`` split into ``chunks`` row chunks of ``R``
        rows, chunk ``j`` encoded as :meth:`encode` would (``source`` for all) and written at bytes
        ``[j * P, (j + 1) * P)`` of the returned flat payload, ``P = payload_nbytes((R, E))``.

        A codec with a batched kernel (:meth:`_encode_chunks`, the Triton path) encodes all chunks
        in one launch; otherwise one :meth:`encode` per chunk. Same bytes either way. ``out``: a
        contiguous uint8 buffer of ``chunks * P`` bytes on ``x``'s device.
        """
        self._check_tensor(x, layer, source)
        t, e = int(x.shape[0]), int(x.shape[1])
        if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1 or t % chunks:
            raise ValueError(f"{self.name}: encode_chunks needs a row count divisible by chunks, got {t} rows "
                             f"and chunks={chunks!r}")
        rows = t // chunks
        nb = self.payload_nbytes((rows, e), layer)
        if out is not None:
            _check_buffer(out, torch.uint8, (chunks * nb,), x.device, f"{self.name}: encode_chunks out=")
        else:
            out = torch.empty(chunks * nb, dtype=torch.uint8, device=x.device)
        if chunks > 1 and rows * e > 0 and self.kernel_backend(x.device) == "triton" and self._fused_encode(e):
            # what encode() does on the fused path (no host scan: the kernel saturates and flags)
            got = self._encode_chunks(x, chunks, self.params(layer, source, e, x.device), out,
                                      self._kernel_flags(layer, source, x.device))
            if got is not None:
                return got
        for c, o in zip(x.split(rows, dim=0), out.split(nb)):
            self.encode(c, layer=layer, source=source, out=o)
        return out

    def decode_chunks(self, payload: torch.Tensor, chunk_shape: tuple[int, int], chunks: int, *,
                      layer: str | None = None, source: Source = 0, out: torch.Tensor | None = None) -> torch.Tensor:
        """Two-shot's chunk decodes: ``payload`` holds ``chunks`` payloads of ``chunk_shape``
        ``[R, E]`` one after another; returns fp32 ``[chunks * R, E]``, bitwise
        ``torch.cat([decode(chunk j) for j])`` (NaN payload bits aside). One launch where the codec
        has a batched kernel (:meth:`_decode_chunks`, the Triton path), else one decode per chunk.

        ``out`` (returned): a contiguous ``[n, E]`` buffer on the payload's device, ``n <= chunks * R``,
        fp32 or bf16/fp16 (as :meth:`decode_sum`'s), that gets the first ``n`` rows of that result,
        rounded once to its dtype: bitwise ``decode_chunks(...)[:n].to(out.dtype)``. Two-shot
        decodes its ``tokens`` rows straight into the all-reduce's result this way; the chunks
        holding only padding rows are not decoded. The whole chunks go in one launch (Triton,
        which rounds to ``out``'s dtype as it stores), else one :meth:`decode_sum` into ``out``'s
        rows each; a chunk cut by ``n`` is decoded whole and its first rows copied.
        """
        shape = _as_shape(chunk_shape, self.name)
        nb = self.payload_nbytes(shape, layer)
        if (not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1 or payload.dtype != torch.uint8
                or payload.dim() != 1
                or payload.numel() != chunks * nb):
            raise ValueError(f"{self.name}: decode_chunks needs {chunks!r} payloads of {nb} uint8 bytes for shape "
                             f"{shape} one after another, got {payload.dtype} {tuple(payload.shape)}")
        if out is not None:
            return self._decode_chunks_into(payload, shape, chunks, nb, layer, source, out)
        if chunks > 1 and nb > 0 and self.kernel_backend(payload.device) == "triton":
            got = self._decode_chunks(payload.contiguous(), shape, chunks,
                                      self.params(layer, source, shape[1], payload.device))
            if got is not None:
                return got
        parts = payload.split(nb) if nb else [payload] * chunks
        return torch.cat([self.decode(p, shape, layer=layer, source=source) for p in parts], dim=0)

    def check_chunks_out(self, out: torch.Tensor, chunk_shape: tuple[int, int], chunks: int,
                         device: torch.device) -> None:
        """:meth:`decode_chunks`'s ``out``: contiguous ``[n, E]``, ``0 <= n <= chunks * R``, fp32 or
        bf16/fp16, on ``device``."""
        rows, e = chunk_shape
        n = out.shape[0] if isinstance(out, torch.Tensor) and out.dim() == 2 else -1
        dtype = out.dtype if isinstance(out, torch.Tensor) and out.dtype in _FLOAT_DTYPES else torch.float32
        if not 0 <= n <= chunks * rows:
            raise ValueError(f"{self.name}: decode_chunks out= must have at most {chunks} * {rows} rows of {e} "
                             f"values, got {getattr(out, 'shape', type(out).__name__)}")
        _check_buffer(out, dtype, (n, e), device, f"{self.name}: decode_chunks out=")

    def _decode_chunks_into(self, payload, shape, chunks, nb, layer, source, out):
        """:meth:`decode_chunks` with ``out`` (checked here)."""
        self.check_chunks_out(out, shape, chunks, payload.device)
        rows, e = shape
        n = out.shape[0]
        if n * e == 0:
            return out
        whole, cut = divmod(n, rows)
        payload = payload.contiguous()
        done = False
        # the Triton decoders of codecs that set triton_sum_casts round to bf16 themselves
        # (as_stored); an fp16 out, or a codec without that, goes through decode_sum
        if (whole and self.kernel_backend(payload.device) == "triton"
                and (out.dtype == torch.float32 or self._sum_casts(payload.device, out.dtype))):
            done = self._decode_chunks(payload[:whole * nb], shape, whole,
                                       self.params(layer, source, e, payload.device), out[:whole * rows]) is not None
        # a subclass that changes decode (not decode_sum) is decoded through it, as without out=
        own = type(self).decode is Codec.decode
        for j in range(0 if done else whole):
            part, dst = payload[j * nb:(j + 1) * nb], out[j * rows:(j + 1) * rows]
            if own:
                self.decode_sum([part], shape, layer=layer, sources=[source], out=dst)
            else:
                dst.copy_(self.decode(part, shape, layer=layer, source=source))
        if cut:
            last = self.decode(payload[whole * nb:(whole + 1) * nb], shape, layer=layer, source=source)
            out[whole * rows:].copy_(last[:cut])
        return out

    def _encode_chunks(self, x: torch.Tensor, chunks: int, params: Any, out: torch.Tensor,
                       flags: tuple) -> torch.Tensor | None:
        """The batched Triton encode of :meth:`encode_chunks` into the checked ``out``, or None
        where the codec has none (the caller then encodes chunk by chunk)."""
        return None

    def _decode_chunks(self, payload: torch.Tensor, shape: tuple[int, int], chunks: int,
                       params: Any, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """The batched Triton decode of :meth:`decode_chunks` (``shape`` is one chunk's) into ``out``
        (``[chunks * R, E]``, fp32, bf16 or fp16, contiguous; fp32 allocated when None), or None."""
        return None

    def _payload_params(self, payloads, shape, layer, sources) -> tuple[tuple[int, int], list]:
        """Validate received payloads; returns the int shape and each source's parameters."""
        if len(payloads) == 0:
            raise ValueError(f"{self.name}: decode_sum needs at least one payload")
        shape = _as_shape(shape, self.name)
        dev = payloads[0].device
        # the size and the parameters depend only on this key: built once, the checks of the
        # payloads themselves run on every call
        key = (shape, layer, len(payloads), None if sources is None else tuple(sources), dev)
        known = self._received.get(key)
        if known is None:
            srcs = list(range(len(payloads))) if sources is None else list(sources)
            if len(srcs) != len(payloads):
                raise ValueError(f"{self.name}: {len(payloads)} payloads but {len(srcs)} sources")
            known = (self.payload_nbytes(shape, layer), [self.params(layer, s, shape[1], dev) for s in srcs])
            self._received[key] = known
            if len(self._received) > RECEIVED_CACHE_SIZE:
                self._received.popitem(last=False)
        expected, params = known
        for r, p in enumerate(payloads):
            if p.dtype != torch.uint8 or p.dim() != 1 or p.numel() != expected:
                raise ValueError(
                    f"{self.name}: payload {r} for shape {shape} must be {expected} uint8 bytes, "
                    f"got {p.dtype} {tuple(p.shape)}"
                )
            if p.device != dev:  # the kernel is picked by payload 0's device: a CPU kernel read another's pointer
                raise ValueError(f"{self.name}: payload {r} is on {p.device} but payload 0 on {dev}; decode the "
                                 f"payloads of one message on one device")
        return shape, params

    def reduce_encode(
        self, payloads: Sequence[torch.Tensor], shape: tuple[int, int], *, layer: str | None = None,
        sources: Sequence[Source] | None = None, out_source: Source = "sum", out: torch.Tensor | None = None,
        scratch: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``encode(decode_sum(payloads, shape), source=out_source)``: a two-shot owner's stage.

        A codec with a fused kernel (:meth:`_reduce_encode`) reads the N payloads once and
        writes the new payload once, with the same bytes; the fp32 sum never reaches memory.
        Otherwise (the static and ``rot-*`` codecs' Triton default since stop 26, whose fast
        decode and encode kernels beat their fused one) the sum goes through an fp32 ``shape``
        buffer: ``scratch`` when given (contiguous fp32 on the payloads' device; its contents
        are overwritten), else a fresh one. ``out`` as in :meth:`encode`; with ``out`` and
        ``scratch`` nothing is allocated. In deferred ``"error"`` mode (see the class doc) a
        non-finite or out-of-range sum is reported by :meth:`check_nonfinite` as
        ``source 'sum'`` (``out_source``).
        """
        dev = payloads[0].device if payloads else (out.device if out is not None else None)
        if out is not None:
            _check_buffer(out, torch.uint8, (self.payload_nbytes(_as_shape(shape, self.name), layer),),
                          dev, f"{self.name}: reduce_encode out=")
        if scratch is not None:
            _check_buffer(scratch, torch.float32, _as_shape(shape, self.name), dev,
                          f"{self.name}: reduce_encode scratch=")
        fused = self._reduce_encode(payloads, shape, layer, sources, out_source, out)
        if fused is not None:
            return fused
        return self.encode(self.decode_sum(payloads, shape, layer=layer, sources=sources, out=scratch), layer=layer,
                           source=out_source, out=out)

    def _reduce_encode(self, payloads, shape, layer, sources, out_source, out=None) -> torch.Tensor | None:
        """The fused version of :meth:`reduce_encode` (writing ``out`` when given), or None
        where there is none."""
        return None

    def _sum_casts(self, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> bool:
        """Whether :meth:`_decode_sum` writes a bf16/fp16 ``out`` itself (else it gets None and
        :meth:`decode_sum` casts the fp32 sum into ``out``): the CPU kernels of the codecs
        that set :attr:`cpu_sum_casts`, and for a bf16 ``out`` the Triton kernels of those that
        set :attr:`triton_sum_casts`."""
        backend = self.kernel_backend(device)
        return ((self.cpu_sum_casts and backend == "cpu")
                or (self.triton_sum_casts and backend == "triton" and dtype == torch.bfloat16))

    def _fused_encode(self, hidden: int) -> bool:
        """Whether the Triton encoder takes inputs of width ``hidden`` (else the reference runs)."""
        return False

    def kernel_backend(self, device: torch.device | str) -> str:
        """Which implementation runs for tensors on ``device``: reference, triton or cpu.

        Resolved once per device (the codec asks several times per message, and the answer
        depends only on its ``backend`` option and the device); a refusal is not cached."""
        got = self._backends.get(device)
        if got is None:
            got = self._backends[device] = resolve_backend(self.backend, torch.device(device))
        return got

    def roundtrip(self, x: torch.Tensor, *, layer: str | None = None, source: Source = 0) -> torch.Tensor:
        """``decode(encode(x))``: what a receiver sees, in fp32."""
        return self.decode(self.encode(x, layer=layer, source=source), tuple(x.shape), layer=layer, source=source)

    def bits_per_value(self, shape: tuple[int, int], layer: str | None = None) -> float:
        """Wire bits per value for ``shape``, from the payload size (metadata included); nan for
        a shape of no values (as :class:`~lowbit_tp.collectives.CommStats` gives; was ZeroDivisionError)."""
        shape = _as_shape(shape, self.name)
        values = shape[0] * shape[1]
        return 8.0 * self.payload_nbytes(shape, layer) / values if values else math.nan

    def params(self, layer: str | None, source: Source, hidden: int, device: torch.device | str = "cpu") -> Any:
        """Static parameters of (layer, source) at width ``hidden``, built once and cached per
        device and width.

        A calibrated codec refuses a width other than its calibration's here, where every
        encode, decode, decode-sum and fused path gets its parameters: a decode shape's E is
        the caller's word, and parameters of another width (outlier channel indices, rotation
        signs) would make the kernels read and write past the row."""
        device = torch.device(device)
        if self.needs_calibration and self.calibration is not None and hidden != self.calibration.hidden_size:
            raise ValueError(f"{self.name}: {_where(layer, source)}: shape has {hidden} channels but the calibration "
                             f"has hidden size {self.calibration.hidden_size}")
        key = (layer, source, device, hidden)
        if key not in self._params:
            p = self._make_params(layer, source, hidden)
            if p is not None and device.type != "cpu":
                # optional fields (a static codec's zero-point offset) stay None
                p = type(p)(**{f: None if getattr(p, f) is None else getattr(p, f).to(device)
                               for f in p.__dataclass_fields__})
            self._params[key] = p
        return self._params[key]

    def _kernel_table(self, key: Any, build: Callable[[], Any]) -> Any:
        """A kernel's lookup table, built (and copied to its device) once per ``key``."""
        if key not in self._tables:
            self._tables[key] = build()
        return self._tables[key]

    def defers_errors(self, device: torch.device | str) -> bool:
        """Whether ``nonfinite="error"`` is deferred to :meth:`check_nonfinite` on ``device``:
        on the fused Triton path, which records errors in device flags instead of syncing."""
        return self.nonfinite == "error" and self.kernel_backend(device) == "triton"

    def _step_flag(self, layer, source, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The int32 ``[2]`` device flags of (layer, source) and their two one-element views."""
        key = (torch.device(device), layer, source)
        if key not in self._step_flags:
            f = torch.zeros(2, dtype=torch.int32, device=key[0])
            self._step_flags[key] = (f, f[:1], f[1:])
        return self._step_flags[key]

    def _kernel_flags(self, layer, source, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """What a fused kernel records into: (NaN/Inf flag, out-of-range flag), each or both None.

        ``"flag"`` mode records NaN/Inf (and saturates out-of-range values, as propagate);
        deferred ``"error"`` mode records both; otherwise nothing is recorded.
        """
        if self.nonfinite == "propagate" or (self.nonfinite == "error" and not self.defers_errors(device)):
            return None, None
        _, nan_flag, range_flag = self._step_flag(layer, source, device)
        return nan_flag, (range_flag if self.nonfinite == "error" else None)

    def check_nonfinite(self) -> None:
        """Raise what the device flags recorded since the last check, then reset them.

        ``"flag"`` mode: :class:`NonFiniteError` if a message held NaN/Inf (they were sent
        on as NaN). Deferred ``"error"`` mode (fused Triton path): :class:`NonFiniteError`
        for NaN/Inf, else :class:`OutOfRangeError` for values beyond the wire format, naming
        every (layer, source) that had one. One device->host read per device (meant once
        per step, never per message); nothing to read when no flag exists.
        """
        nan_at, range_at = [], []
        by_device: dict[torch.device, list] = {}
        for key in self._step_flags:
            by_device.setdefault(key[0], []).append(key)
        for keys in by_device.values():
            seen = torch.stack([self._step_flags[k][0] for k in keys]).tolist()  # the one sync
            for key, (nan, big) in zip(keys, seen):
                if nan or big:
                    self._step_flags[key][0].zero_()
                    (nan_at if nan else range_at).append(key)
        if not nan_at and not range_at:
            return
        if self.nonfinite == "flag":
            raise NonFiniteError(f"{self.name}: NaN/Inf reached the codec since the last check at {_places(nan_at)}; "
                                 f"they were sent on as NaN")
        if nan_at:
            raise NonFiniteError(
                f"{self.name}: NaN/Inf value(s) in the communicated tensor of {_places(nan_at)} (found by the "
                f"fused kernels, reported once per step); pass nonfinite='propagate' to send them on as NaN")
        raise OutOfRangeError(
            f"{self.name}: {_places(range_at)}: a value beyond the largest this codec's wire format carries "
            f"(docs/wire-format.md; found by the fused kernels, reported once per step); "
            f"nonfinite='propagate' saturates instead")

    def _encode_scanned(self, x: torch.Tensor, layer: str | None, source: Source,
                        out: torch.Tensor | None = None) -> torch.Tensor | None:
        """The one-pass encode of a kernel that scans its own input (:meth:`_encode_with_scan`).

        The payload is kept only when the kernel saw what the checked path would pass through
        unchanged: all values finite and within :attr:`max_input`. Anything else (rare) returns
        None and :meth:`encode` takes the checked path, which raises or saturates exactly as
        the reference does. This saves the separate ``aminmax`` pass over every message.
        ``x`` has passed :meth:`_check_tensor`.
        """
        got = self._encode_with_scan(x, self.params(layer, source, x.shape[1], x.device), out)
        if got is None:
            return None
        payload, scan = got
        if scan.nonfinite or scan.amax > self.max_input:
            return None
        return payload

    def _encode_with_scan(self, x: torch.Tensor, params: Any,
                          out: torch.Tensor | None = None) -> tuple[torch.Tensor, Any] | None:
        """``(payload, scan)`` from a kernel that checks its input while encoding (``scan`` has
        ``nonfinite`` and ``amax``, the largest finite magnitude), or None where there is none.
        ``out``: the caller's checked payload buffer, which the kernel may write directly."""
        return None

    def _check_tensor(self, x: torch.Tensor, layer: str | None, source: Source) -> None:
        """Shape, dtype and hidden size of ``x`` (no pass over its values)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ValueError(f"{self.name}: expected a [tokens, E] tensor ({_where(layer, source)}), "
                             f"got shape {getattr(x, 'shape', None)}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{self.name}: expected fp32/bf16/fp16 values ({_where(layer, source)}), got {x.dtype}")
        if self.calibration is not None and self.needs_calibration and x.shape[1] != self.calibration.hidden_size:
            raise ValueError(
                f"{self.name}: {_where(layer, source)} has {x.shape[1]} channels but the calibration has hidden size "
                f"{self.calibration.hidden_size}"
            )

    def _check_input(self, x: torch.Tensor, layer: str | None, source: Source) -> tuple[bool, bool]:
        """Validate ``x``; returns whether it holds NaN/Inf (only possible in propagate mode)
        and whether it must be saturated at :attr:`max_input` (only in propagate mode).
        ``x`` has passed :meth:`_check_tensor`."""
        if self.kernel_backend(x.device) == "triton" and self._fused_encode(x.shape[1]):
            # the fused kernels mask, saturate and record NaN/Inf and range themselves: no host
            # sync (deferred "error" mode raises at check_nonfinite)
            return True, False
        where = _where(layer, source)  # for the messages below (not built on the fused path)
        lo, hi = F.value_range(x)
        bad = not (math.isfinite(lo) and math.isfinite(hi))  # NaN propagates into both, Inf shows in one
        if bad and self.nonfinite == "flag":
            self._step_flag(layer, source, x.device)[1].fill_(1)
        if bad and self.nonfinite == "error":
            n = int((~torch.isfinite(x)).sum())
            # a two-shot owner's sum with Inf but no NaN: finite partials that summed past fp32's range
            overflow = source == "sum" and not bool(torch.isnan(x).any())
            raise NonFiniteError(
                f"{self.name}: {n} NaN/Inf value(s) in the communicated tensor of {where}"
                + ("; the ranks' partials summed beyond the fp32 range" if overflow else "")
                + "; pass nonfinite='propagate' to send them on as NaN"
            )
        top = max(-lo, hi)
        if self.nonfinite == "error" and top > self.max_input:
            raise OutOfRangeError(
                f"{self.name}: {where}: |value| {top:.6g} exceeds {self.max_input:.6g}, the largest this "
                f"codec's wire format carries (docs/wire-format.md); nonfinite='propagate' saturates instead"
            )
        return bad, (bad or top > self.max_input) and math.isfinite(self.max_input)

    def _fit_range(self, v: torch.Tensor, limit: float, what: str) -> torch.Tensor:
        """``v`` checked against ``limit``, the largest magnitude the wire format carries.

        Beyond it: :class:`OutOfRangeError` in ``"error"`` mode; in ``"propagate"`` mode
        finite values saturate at ``±limit`` (NaN/Inf pass through, to be sent as NaN).
        ``inf`` made from finite input (an fp32 overflow inside a codec) counts as beyond.
        """
        big = v.abs() > limit  # NaN compares False
        if v.numel() == 0 or not bool(big.any()):
            return v
        if self.nonfinite == "error":
            raise OutOfRangeError(
                f"{what} {float(v.abs()[big].max()):.6g} exceeds {limit:.6g}, the largest magnitude this "
                f"codec's wire format carries (docs/wire-format.md); nonfinite='propagate' saturates instead"
            )
        return torch.where(big & torch.isfinite(v), v.clamp(-limit, limit), v)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options().items())
        return f"{type(self).__name__}({self.name}{', ' + opts if opts else ''})"


# What an encode and a decode run through: a fused kernel that does their work stands for these.
_CODING_HOOKS = ("_encode", "_encode_scanned", "_encode_with_scan", "_decode")


def codes_as(cls: type, owner: type) -> bool:
    """Whether codec class ``cls`` encodes and decodes exactly as ``owner`` (a class it derives
    from) does: :meth:`Codec.encode` / :meth:`Codec.decode` not overridden, nor the hooks they run
    through (``_encode``, ``_encode_scanned``, ``_encode_with_scan``, ``_decode``) below ``owner``.
    A kernel written for ``owner``'s bytes (error feedback in one pass) is only valid then."""
    return (cls.encode is Codec.encode and cls.decode is Codec.decode
            and all(getattr(cls, hook) is getattr(owner, hook) for hook in _CODING_HOOKS))


def _definer(cls: type, attr: str) -> type:
    """The class in ``cls``'s MRO that defines ``attr``."""
    return next(c for c in cls.__mro__ if attr in c.__dict__)


def _where(layer: str | None, source: Source) -> str:
    return f"layer {layer!r}, source {source!r}" if layer is not None else f"source {source!r}"


def _places(keys: list) -> str:
    """``(device, layer, source)`` keys as ``layer 'a', source 0 (cuda:0); ...`` (first 4 and a count)."""
    shown = "; ".join(f"{_where(layer, source)} ({dev})" for dev, layer, source in keys[:4])
    return shown + (f"; and {len(keys) - 4} more" if len(keys) > 4 else "")


def check_int_option(value, what: str, *, minimum: int, optional: bool = False):
    """A codec's integer option (``k``, ``group``): an int (not a bool) >= ``minimum``, or None
    where ``optional``. A float or a numeric string was truncated by ``int()`` while the codec's
    config recorded it as given (``k=1.5`` ran as k = 1); ``group=0`` divided by zero."""
    if value is None and optional:
        return value
    try:
        got = None if isinstance(value, bool) else operator.index(value)  # numpy/torch integers pass
    except TypeError:
        got = None
    if got is None or got < minimum:
        raise ValueError(f"{what} must be {'None or ' if optional else ''}an integer >= {minimum}, got {value!r}")
    return got


def _as_shape(shape, name: str) -> tuple[int, int]:
    """A decode's ``(tokens, E)``: two non-negative integers (a float, a third entry or a
    negative size was truncated, ignored, or failed inside torch)."""
    try:
        t, e = shape
        t, e = operator.index(t), operator.index(e)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: shape must be (tokens, E), two integers, got {shape!r}") from None
    if t < 0 or e < 0:
        raise ValueError(f"{name}: shape must be (tokens, E) >= 0, got {shape!r}")
    return t, e


def _check_buffer(buf: torch.Tensor, dtype: torch.dtype, shape: tuple, device: torch.device, what: str) -> None:
    """A caller-provided output buffer must be a contiguous tensor of exactly this dtype, shape and device."""
    if (not isinstance(buf, torch.Tensor) or buf.dtype != dtype or tuple(buf.shape) != tuple(shape)
            or buf.device != torch.device(device) or not buf.is_contiguous()):
        got = (f"{buf.dtype} {tuple(buf.shape)} on {buf.device}" + ("" if buf.is_contiguous() else ", not contiguous")
               if isinstance(buf, torch.Tensor) else type(buf).__name__)
        raise ValueError(f"{what} must be a contiguous {dtype} tensor of shape {tuple(shape)} on {device}, got {got}")


# ---------------------------------------------------------------------- registry
@dataclass(frozen=True)
class CodecSpec:
    """What the registry knows about a codec name without building it.

    ``needs_calibration``: building it without a calibration raises ``CalibrationError``.
    ``needs_allocation``: the calibration must also hold a per-layer bit allocation
    (``lowbit-tp calibrate`` with its default ``--allocate``).
    """

    name: str
    factory: Callable[..., Codec]
    needs_calibration: bool
    needs_allocation: bool = False


_REGISTRY: dict[str, CodecSpec] = {}
# Names that resolve to another codec name (``default`` is set by lowbit_tp.codecs).
CODEC_ALIASES: dict[str, str] = {}


def register_codec(name: str, factory: Callable[..., Codec] | None = None, *, needs_calibration: bool | None = None,
                   needs_allocation: bool = False):
    """Register ``factory(**options) -> Codec`` under ``name``; usable as a decorator.

    ``needs_calibration`` defaults to the class attribute when ``factory`` is a
    :class:`Codec` subclass; a plain function (a lambda) must state it.
    """

    def _add(f):
        if name in _REGISTRY:
            raise ValueError(f"codec {name!r} is already registered")
        needs = needs_calibration
        if needs is None:
            if not (isinstance(f, type) and issubclass(f, Codec)):
                raise TypeError(f"register_codec({name!r}): give needs_calibration= for a factory function")
            needs = bool(f.needs_calibration)
        _REGISTRY[name] = CodecSpec(name=name, factory=f, needs_calibration=needs,
                                    needs_allocation=needs_allocation)
        return f

    return _add(factory) if factory is not None else _add


# Name suffixes that wrap any registered codec: ``NAME+SUFFIX`` is built as
# ``wrapper(inner=NAME, **options)`` (e.g. ``+fisher``, lowbit_tp.codecs.mixed). Not listed
# by list_codecs(); the wrapper refuses inner codecs it cannot take.
_VARIANTS: dict[str, Callable[..., Codec]] = {}


def register_codec_variant(suffix: str, wrapper: Callable[..., Codec]) -> None:
    """Make ``NAME + suffix`` a codec for every codec name (alias) ``NAME``: ``wrapper(inner=NAME,
    **options)``. The variant needs a calibration; it needs an allocation where ``NAME`` does."""
    if suffix in _VARIANTS:
        raise ValueError(f"codec variant {suffix!r} is already registered")
    _VARIANTS[suffix] = wrapper


def codec_spec(name: str) -> CodecSpec:
    """The registry entry of ``name`` (aliases such as ``default`` and variant suffixes
    such as ``+fisher`` resolved)."""
    for suffix, wrapper in _VARIANTS.items():
        if name.endswith(suffix) and len(name) > len(suffix):
            inner = name[: -len(suffix)]
            spec = codec_spec(inner)
            return CodecSpec(name=name, factory=lambda _i=inner, _w=wrapper, **kw: _w(inner=_i, **kw),
                             needs_calibration=True, needs_allocation=spec.needs_allocation)
    name = CODEC_ALIASES.get(name, name)
    if name not in _REGISTRY:
        variants = f" (and NAME{', NAME'.join(_VARIANTS)} for some)" if _VARIANTS else ""
        raise KeyError(f"unknown codec {name!r}; known codecs: {', '.join(_REGISTRY)}{variants}")
    return _REGISTRY[name]


def list_codecs() -> list[str]:
    return list(_REGISTRY)


def make_codec(name: str, **options: Any) -> Codec:
    """Build a codec by its registered name, e.g. ``make_codec("int4-outlier", calibration=cal)``."""
    spec = codec_spec(name)
    if spec.needs_calibration and options.get("calibration") is None:
        raise _no_calibration(name)  # by the name asked for (a class may set its name only after the check)
    return spec.factory(**options)


def _no_calibration(name: str) -> CalibrationError:
    return CalibrationError(f"codec {name!r} uses static scales and needs a calibration "
                            f"(lowbit-tp calibrate ... --out cal.safetensors, then --calibration cal.safetensors)")
