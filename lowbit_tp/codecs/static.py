"""Codecs with no per-message metadata: bf16, static int8/int4, and the seed paper's codec.

Payload layouts (row-major ``[tokens, E]``, all little-endian; see docs/wire-format.md):

* ``bf16``:          ``T*E`` bf16 values.
* ``int8``:          ``T*E`` int8 codes; value = code * scale[channel].
* ``int4``:          ``T*E`` int4 codes packed two per byte (even index low nibble).
* ``int4-outlier`` / ``int4-random-k``: ``[ T*k bf16 | ceil(T*(E-k)/2) bytes of int4 ]``;
  the bf16 block holds each token's k kept channels in ascending channel order, the int4
  block each token's remaining E-k channels in ascending order.

Scales and channel sets are static (from calibration), so nothing else travels.

Scale ablations (codec options, same wire format; ``docs/results.md`` measures them):
``scale_stat`` picks the per-channel magnitude a scale is fitted to (``ema``: the paper's
EMA extremes, the default; ``absmax``: the running absmax; ``p999``: the mean per-batch
99.9th percentile of ``|y|``, clipping the rest; ``mean``: equal-weight means of the batch
extremes, i.e. an EMA whose decay follows the batch count, used for the outlier ranking
too), and ``zero_point=True`` fits the 15 levels to ``[min, max]`` around a per-channel
centre instead of to ``[-absmax, absmax]``. ``int4-outlier`` keeps the paper's closest
reading: symmetric scales ``max(|EMA min|, |EMA max|) / 7``, top-k by EMA range (the paper
tracks per-channel min and max with an EMA and quantizes the rest to symmetric int4).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import torch

from lowbit_tp.calibration.artifact import CalibrationError, ChannelStats, Source
from lowbit_tp.codecs import functional as F
from lowbit_tp.codecs.base import Codec, _check_buffer, check_int_option, register_codec


def _triton_kernels():
    """``lowbit_tp.kernels.triton_static``, imported on the Triton path only (triton is optional)."""
    from lowbit_tp.kernels import triton_static

    return triton_static


SCALE_STATS = ("ema", "absmax", "p999", "mean")
_TINY = 1e-12


@register_codec("bf16")
class BF16Codec(Codec):
    """Exact baseline: values cast to bfloat16 (16 bits/value)."""

    name = "bf16"
    max_input = F.BF16_MAX

    def payload_nbytes(self, shape, layer=None):
        return 2 * shape[0] * shape[1]

    def _encode(self, x, params, nonfinite, **_):
        return F.float_to_bytes(x, torch.bfloat16)

    def _decode(self, payload, shape, params):
        return F.bytes_to_float(payload, torch.bfloat16).reshape(shape)

    def _decode_sum(self, payloads, shape, params, out=None):
        # The base class's sum, without its fp32 temporaries: each payload is read as a bf16
        # view and added into the fp32 accumulator (bf16 -> fp32 is exact, so the bits are
        # those of decode(p).float() summed in rank order). This is the bf16/gather baseline
        # of the benchmarks; fresh multi-MB temporaries cost it page faults on every call.
        acc = torch.empty(shape, dtype=torch.float32, device=payloads[0].device) if out is None else out
        for r, p in enumerate(payloads):
            if p.storage_offset() % 2 or not p.is_contiguous():  # a view needs contiguous, aligned bytes
                p = p.clone(memory_format=torch.contiguous_format)
            v = p.view(torch.bfloat16).view(shape)
            acc.copy_(v) if r == 0 else acc.add_(v)
        return acc


@dataclass(frozen=True)
class StaticParams:
    """Static parameters of one (layer, source).

    ``scale``/``inv_scale`` are ``[E - k]`` fp32 for the quantized channels ``inliers``;
    ``outliers`` (``[k]``, ascending) travel as bf16. ``k == 0`` for plain int codecs.
    """

    scale: torch.Tensor
    inv_scale: torch.Tensor
    inliers: torch.Tensor
    outliers: torch.Tensor
    offset: torch.Tensor | None = None  # [E - k] per-channel centre (zero_point codecs only)


def channel_absmax(stats: ChannelStats, scale_stat: str) -> torch.Tensor:
    """The per-channel magnitude a symmetric static scale is fitted to."""
    if scale_stat == "ema":
        return torch.maximum(stats.ema_min.abs(), stats.ema_max.abs())
    if scale_stat == "absmax":
        return stats.absmax
    if scale_stat == "p999":
        return stats.require("p999")
    if scale_stat == "mean":
        return torch.maximum(stats.require("mean_min").abs(), stats.require("mean_max").abs())
    raise ValueError(f"scale_stat must be one of {SCALE_STATS}, got {scale_stat!r}")


def channel_bounds(stats: ChannelStats, scale_stat: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel ``(low, high)`` an asymmetric (zero-point) scale is fitted to."""
    if scale_stat == "ema":
        return stats.ema_min, stats.ema_max
    if scale_stat == "mean":
        return stats.require("mean_min"), stats.require("mean_max")
    raise ValueError(f"zero_point needs per-channel min and max: scale_stat 'ema' or 'mean', got {scale_stat!r}")


def outlier_score(stats: ChannelStats, scale_stat: str) -> torch.Tensor:
    """The range that ranks outlier channels: the paper's EMA range, or for ``mean`` the
    range of the equal-weight means (the whole statistic changes with the decay rule)."""
    if scale_stat == "mean":
        return stats.require("mean_max") - stats.require("mean_min")
    return stats.range


def topk_channels(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, ascending; ties broken by lower index."""
    order = torch.argsort(score, descending=True, stable=True)
    return torch.sort(order[:k]).values


def random_channels(hidden: int, k: int, *, seed: int, layer: str | None, source: Source) -> torch.Tensor:
    """``k`` channels drawn without replacement, fixed by ``(seed, layer, source)``.

    crc32 rather than ``hash()`` so that every process draws the same set.
    """
    key = zlib.crc32(f"{seed}|{layer}|{source}".encode())
    g = torch.Generator().manual_seed(key)
    return torch.sort(torch.randperm(hidden, generator=g)[:k]).values


class _StaticIntCodec(Codec):
    """Symmetric int codec with static per-channel scales, optionally keeping k channels in bf16."""

    needs_calibration = True
    bits = 4
    # Quantized channels clamp to the calibrated range by design; this bounds the bf16 ones.
    max_input = F.BF16_MAX
    cpu_sum_casts = True
    triton_sum_casts = True

    def __init__(self, *, k: int | None = 0, scale_stat: str = "ema", zero_point: bool = False, **kw):
        k = check_int_option(k, "k", minimum=0, optional=True)
        super().__init__(**kw)
        if scale_stat not in SCALE_STATS:
            raise ValueError(f"scale_stat must be one of {SCALE_STATS}, got {scale_stat!r}")
        if zero_point and scale_stat not in ("ema", "mean"):
            raise ValueError(f"zero_point needs per-channel min and max: scale_stat 'ema' or 'mean', "
                             f"got {scale_stat!r}")
        if zero_point and self.backend not in ("auto", "reference"):
            from lowbit_tp.kernels import BackendUnavailable

            raise BackendUnavailable(f"{self.name}: zero_point has no {self.backend} kernel; use backend='reference'")
        self.k = k
        self.scale_stat = scale_stat
        self.zero_point = bool(zero_point)

    def options(self):
        opts = {"k": self.k, "scale_stat": self.scale_stat}
        return {**opts, "zero_point": True} if self.zero_point else opts

    def kernel_backend(self, device) -> str:
        # the fused kernels know symmetric scales only; zero_point runs the reference code
        return "reference" if self.zero_point else super().kernel_backend(device)

    def num_kept(self, hidden: int) -> int:
        """Channels kept in bf16: ``k``, or the calibration's k (``calibrate --k``) when None."""
        k = self.calibration.k if self.k is None else int(self.k)
        if not 0 <= k <= hidden:
            raise ValueError(f"{self.name}: k={k} outside [0, {hidden}]")
        return k

    def _select(self, stats: ChannelStats, k: int, layer, source) -> torch.Tensor:
        return topk_channels(outlier_score(stats, self.scale_stat), k)

    def _make_params(self, layer, source, hidden):
        stats = self.calibration.get(layer, source)
        if stats.absmax.numel() != hidden:
            raise ValueError(f"{self.name}: calibration of {layer!r} has {stats.absmax.numel()} channels, input has {hidden}")
        k = self.num_kept(hidden)
        outliers = self._select(stats, k, layer, source) if k else torch.empty(0, dtype=torch.long)
        mask = torch.ones(hidden, dtype=torch.bool)
        mask[outliers] = False
        inliers = torch.nonzero(mask).reshape(-1)
        qmax = 2 ** (self.bits - 1) - 1
        if self.zero_point:  # 2*qmax+1 levels spanning [low, high]: centre + q * scale, |q| <= qmax
            low, high = channel_bounds(stats, self.scale_stat)
            offset = ((low + high) / 2)[inliers].float()
            scale = (((high - low) / 2)[inliers] / qmax).clamp_min(_TINY).float()
            if not (bool(torch.isfinite(offset).all()) and bool(torch.isfinite(scale).all())):
                # |min| or |max| near fp32's limit: the centre or the span overflowed, and finite
                # input decoded to NaN; refused once, when the layer's parameters are built
                raise CalibrationError(f"{self.name}: calibration statistics of {layer!r}|{source} span more than "
                                       f"fp32 can hold (min {float(low.min()):.3g}, max {float(high.max()):.3g}); "
                                       f"recalibrate")
            return StaticParams(scale=scale, inv_scale=1.0 / scale, inliers=inliers, outliers=outliers, offset=offset)
        scale = (channel_absmax(stats, self.scale_stat)[inliers] / qmax).clamp_min(_TINY).float()
        return StaticParams(scale=scale, inv_scale=1.0 / scale, inliers=inliers, outliers=outliers)

    def payload_nbytes(self, shape, layer=None):
        t, e = shape
        k = self.num_kept(e)
        n = t * (e - k)
        return 2 * t * k + (n + 1) // 2 if self.bits == 4 else 2 * t * k + n

    def _fused_encode(self, hidden):
        return True  # zero_point codecs never reach the Triton backend (kernel_backend)

    def _encode(self, x, p: StaticParams, nonfinite, *, out=None, flags=(None, None)):
        backend = self.kernel_backend(x.device)
        if backend == "cpu":
            from lowbit_tp.kernels import cpu
            return cpu.static_encode(x, outliers=p.outliers, inv_scale=p.inv_scale, bits=self.bits,
                                     nbytes=self.payload_nbytes(tuple(x.shape)), out=out)[0]
        if backend == "triton":
            return self._triton_encode(x, p, out, flags)
        k = p.outliers.numel()
        rest = x if k == 0 else x.index_select(1, p.inliers)
        if p.offset is not None:
            rest = rest - p.offset
        q = F.quantize_symmetric(rest, inv_scale=p.inv_scale, bits=self.bits, nonfinite=nonfinite)
        body = F.pack_int4(q) if self.bits == 4 else q.reshape(-1).view(torch.uint8)
        if k == 0:
            return body
        head = F.float_to_bytes(x.index_select(1, p.outliers), torch.bfloat16)
        return torch.cat([head, body])

    def _encode_with_scan(self, x, p: StaticParams, out=None):
        if self.kernel_backend(x.device) != "cpu":
            return None
        from lowbit_tp.kernels import cpu
        return cpu.static_encode(x, outliers=p.outliers, inv_scale=p.inv_scale, bits=self.bits,
                                 nbytes=self.payload_nbytes(tuple(x.shape)), out=out)

    # -------------------------------------------------------------- fused kernels
    def _decode_sum(self, payloads, shape, params, out=None):
        backend = self.kernel_backend(payloads[0].device)
        if backend == "cpu":
            from lowbit_tp.kernels import cpu
            return cpu.static_decode_sum(payloads, shape, scales=[p.scale for p in params],
                                         outliers=[p.outliers for p in params], bits=self.bits, out=out)
        if backend == "triton":
            return self._triton_decode_sum(payloads, shape, params, out)
        return super()._decode_sum(payloads, shape, params, out)

    def encode_feedback(self, x, carry, *, layer=None, source=0, out=None, next_out=None):
        """The Triton and CPU encoders with error feedback fused in (:meth:`Codec.encode_feedback`):
        one read of the partial and the carry, one write of the payload and of the next carry."""
        self._check_next_out(x, next_out)
        backend = self._feedback_backend(x, carry)
        if backend not in ("triton", "cpu") or (carry is not None and not carry.is_contiguous()):
            return None
        self._check_tensor(x, layer, source)
        nbytes = self.payload_nbytes(tuple(x.shape), layer)
        if out is not None:
            _check_buffer(out, torch.uint8, (nbytes,), x.device, f"{self.name}: encode_feedback out=")
        p = self.params(layer, source, x.shape[1], x.device)
        K = _triton_kernels() if backend == "triton" else None
        if K is not None and not K.feedback_fits(x.shape[1], p.outliers.numel(), self.bits, out):
            return None  # before allocating: the general path runs
        if backend == "cpu":
            from lowbit_tp.kernels import cpu

            payload, nxt, scan = cpu.static_encode_feedback(x, carry, outliers=p.outliers, inv_scale=p.inv_scale,
                                                            scale=p.scale, bits=self.bits, nbytes=nbytes, out=out,
                                                            next_out=next_out)
            # NaN/Inf or a value beyond max_input: the general path raises or saturates as the reference does
            return None if scan.nonfinite or scan.amax > self.max_input else (payload, nxt)
        inl, inv, outl = self._enc_tables(p)
        scale = self._kernel_table(("scale", id(p)), lambda: p.scale.float().contiguous())
        payload = torch.empty(nbytes, dtype=torch.uint8, device=x.device) if out is None else out
        nxt = torch.empty(x.shape, dtype=torch.float32, device=x.device) if next_out is None else next_out
        flag, range_flag = self._kernel_flags(layer, source, x.device)
        return K.encode_feedback(x.contiguous(), carry, inl, inv, scale, outl, payload, nxt, bits=self.bits,
                                 max_input=self.max_input, flag=flag, range_flag=range_flag)

    def _triton_encode(self, x, p: StaticParams, out, flags):
        K = _triton_kernels()

        inl, inv, outl = self._enc_tables(p)
        if out is None:
            out = torch.empty(self.payload_nbytes(tuple(x.shape)), dtype=torch.uint8, device=x.device)
        return K.encode(x.contiguous(), inl, inv, outl, out, bits=self.bits,
                        max_input=self.max_input, flag=flags[0], range_flag=flags[1])

    def _encode_chunks(self, x, chunks, p: StaticParams, out, flags):
        K = _triton_kernels()

        t, e = x.shape
        nk = p.outliers.numel()
        if not K.chunks_fit(t // chunks, e, nk, self.bits, out.numel() // chunks):
            return None  # the flat encoder (an odd int4 body row) or an odd-sized payload: chunk by chunk
        inl, inv, outl = self._enc_tables(p)
        return K.encode_chunks(x.contiguous(), inl, inv, outl, out, chunks=chunks, bits=self.bits,
                               max_input=self.max_input, flag=flags[0], range_flag=flags[1])

    def _decode_chunks(self, payload, shape, chunks, p: StaticParams, out=None):
        K = _triton_kernels()

        colmap, scale = self._dec_tables([p])
        if out is None:
            out = torch.empty(chunks * shape[0], shape[1], dtype=torch.float32, device=payload.device)
        return K.decode_chunks(payload, colmap, scale, out, chunks=chunks, nk=p.outliers.numel(), bits=self.bits)

    def _enc_tables(self, p: StaticParams):
        """Encoder tables of one (layer, source), int32/fp32 on its device, built once (the
        outlier table already cut to its k entries: an empty view of a real buffer when k = 0)."""
        return self._kernel_table(("enc", id(p)), lambda: (
            p.inliers.int(), p.inv_scale.float().contiguous(),
            p.outliers.int() if p.outliers.numel() else p.inliers[:1].int()[:0]))

    def _dec_tables(self, params):
        """Decoder tables of N sources: ``colmap [N, E]`` (slot of each kept channel, ``-(j+1)``
        for bf16 channel j) and ``scale [N, E - k]``, built once per parameter tuple."""
        def build():
            p0 = params[0]
            e = p0.inliers.numel() + p0.outliers.numel()
            colmap = torch.empty(len(params), e, dtype=torch.int32, device=p0.inliers.device)
            for r, p in enumerate(params):
                colmap[r, p.inliers] = torch.arange(p.inliers.numel(), dtype=torch.int32, device=colmap.device)
                colmap[r, p.outliers] = -1 - torch.arange(p.outliers.numel(), dtype=torch.int32, device=colmap.device)
            return colmap, torch.stack([p.scale.float() for p in params]).contiguous()

        return self._kernel_table(("dec", tuple(id(p) for p in params)), build)

    def _triton_decode_sum(self, payloads, shape, params, out):
        K = _triton_kernels()

        colmap, scale = self._dec_tables(params)
        if out is None:
            out = torch.empty(shape, dtype=torch.float32, device=payloads[0].device)
        return K.decode_sum([q.contiguous() for q in payloads], colmap, scale, out, nk=params[0].outliers.numel(),
                            bits=self.bits)

    def _reduce_encode(self, payloads, shape, layer, sources, out_source, out=None):
        if not payloads or self.kernel_backend(payloads[0].device) != "triton":
            return None
        K = _triton_kernels()
        from lowbit_tp.kernels.triton_common import reduce_fused

        if not reduce_fused(K.REDUCE_VARIANT):  # "split": decode-and-sum, then encode (the base class's path)
            return None

        shape, params = self._payload_params(payloads, shape, layer, sources)
        t, e = shape
        dev = payloads[0].device
        sp = self.params(layer, out_source, e, dev)
        colmap, scale = self._dec_tables(params)
        inl, inv, outl = self._enc_tables(sp)
        if out is None:
            out = torch.empty(self.payload_nbytes((t, e)), dtype=torch.uint8, device=dev)
        flag, range_flag = self._kernel_flags(layer, out_source, dev)  # deferred error mode: checked per step
        return K.reduce_encode([q.contiguous() for q in payloads], colmap, scale, inl, inv, outl,
                               out, t=t, e=e, bits=self.bits, max_input=self.max_input, flag=flag,
                               range_flag=range_flag)

    def _decode(self, payload, shape, p: StaticParams):
        if self.kernel_backend(payload.device) in ("cpu", "triton"):  # the fused decode-and-sum of one payload
            return self._decode_sum([payload], shape, [p])
        t, e = shape
        k = p.outliers.numel()
        split = 2 * t * k
        n = t * (e - k)
        body = payload[split:]
        if self.bits == 4:
            vals = F.unpack_int4_float(body, n).reshape(t, e - k)  # sentinel already NaN
            rest = vals.mul_(p.scale)
        else:
            rest = F.dequantize_symmetric(body.view(torch.int8).reshape(t, e - k), p.scale, bits=8)
        if p.offset is not None:
            rest = rest + p.offset
        if k == 0:
            return rest
        out = torch.empty(t, e, dtype=torch.float32, device=payload.device).index_copy_(1, p.inliers, rest)
        kept = F.bytes_to_float(payload[:split], torch.bfloat16).reshape(t, k)
        return out.index_copy_(1, p.outliers, kept)


@register_codec("int8")
class Int8Codec(_StaticIntCodec):
    """Static per-channel symmetric int8 (the paper's Int8 baseline, 8 bits/value)."""

    name = "int8"
    bits = 8

    def __init__(self, **kw):
        kw.setdefault("k", 0)
        super().__init__(**kw)


@register_codec("int4")
class Int4Codec(_StaticIntCodec):
    """Static per-channel symmetric int4 everywhere (the paper's Int4 baseline, 4 bits/value)."""

    name = "int4"

    def __init__(self, **kw):
        kw.setdefault("k", 0)
        super().__init__(**kw)


@register_codec("int4-outlier")
class OutlierInt4Codec(_StaticIntCodec):
    """The seed method: calibrated top-k channels by range in bf16, the rest static int4.

    ``k`` defaults to the calibration's k, itself ``E // 64`` unless ``calibrate --k``
    said otherwise (4.1875 bits/value at ``E // 64``).
    """

    name = "int4-outlier"

    def __init__(self, *, k: int | None = None, **kw):
        super().__init__(k=k, **kw)


@register_codec("int4-random-k")
class RandomKInt4Codec(_StaticIntCodec):
    """Ablation: as ``int4-outlier`` but the k bf16 channels are random (fixed ``seed``)."""

    name = "int4-random-k"

    def __init__(self, *, k: int | None = None, seed: int = 0, **kw):
        super().__init__(k=k, **kw)
        self.seed = seed

    def options(self) -> dict[str, Any]:
        return {**super().options(), "seed": self.seed}

    def _select(self, stats, k, layer, source):
        return random_channels(stats.range.numel(), k, seed=self.seed, layer=layer, source=source)


# Scale ablations of the seed codec (module docstring); same bits and wire format.
_ABLATIONS = {
    "int4-outlier-asym": {"zero_point": True},
    "int4-outlier-absmax": {"scale_stat": "absmax"},
    "int4-outlier-p999": {"scale_stat": "p999"},
    "int4-outlier-mean": {"scale_stat": "mean"},
    "int4-outlier-mean-asym": {"scale_stat": "mean", "zero_point": True},
}


def _ablation(name: str, opts: dict):
    def make(**kw) -> Codec:
        codec = OutlierInt4Codec(**{**opts, **kw})
        codec.name = name
        return codec

    return make


for _name, _opts in _ABLATIONS.items():
    register_codec(_name, _ablation(_name, _opts), needs_calibration=True)
