"""Beyond the paper: outlier channels in bf16, a randomized Hadamard rotation of the rest,
and dynamic group scales, with uniform or non-uniform levels at 2-4 bits.

Encoding one token row ``x [E]``:

1. the ``k`` calibrated outlier channels (top-k EMA range for this (layer, source), as in
   ``int4-outlier``) go out as bf16 and are zeroed in ``x``;
2. ``z = H_B · (s ⊙ x)``: random signs ``s`` (fixed by the codec's seed, the same on every
   rank) then an orthonormal Sylvester-Hadamard transform on blocks of ``B`` channels
   (``B`` the largest power of two <= 256 that divides E). Rotation spreads what energy
   remains evenly, so group values become near-Gaussian and a group's absmax is no longer
   set by one spike. It is linear and orthonormal: decoding applies ``s ⊙ H_Bᵀ``, and the
   rotation commutes with the sum over ranks;
3. ``z`` is quantized in groups of ``group`` values with a scale per group (a format of
   ``SCALE_FORMATS``: fp16; an 8-bit E8M0 power of two; or lg8, an 8-bit log-step code
   under a bf16 base per token), onto the symmetric integer grid (``levels="int"``) or
   Lloyd-Max levels (``levels="lm"``), at ``bits`` per value.

Payload: ``[ T*k bf16 | codes of T*E values | scales ]``. 8-bit codes are one byte each,
4-bit codes use the int4 nibble packing, other widths are bit-planes (plane j holds bit j
of every code, 8 codes per byte, LSB first). docs/wire-format.md gives the exact bytes, the
representable range of each scale format and what ``nonfinite="propagate"`` poisons.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable

import torch

from lowbit_tp.codecs import functional as F
from lowbit_tp.codecs.base import Codec, check_int_option, register_codec
from lowbit_tp.codecs.functional import fwht, hadamard_block, pack_bitplanes, unpack_bitplanes  # noqa: F401
from lowbit_tp.codecs.static import topk_channels


def _triton_kernels():
    """``lowbit_tp.kernels.triton_rotation``, imported on the Triton path only (triton is optional)."""
    from lowbit_tp.kernels import triton_rotation

    return triton_rotation


def random_signs(e: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(f"rotation|{seed}|{e}".encode()))
    return (torch.randint(0, 2, (e,), generator=g) * 2 - 1).float()


# Lloyd-Max levels for absmax-normalised Gaussian groups (what rotated values look like):
# 1-D k-means on N(0,1) samples divided by their group's absmax, symmetrised. Fixed here
# because they are part of the wire format. scripts/lloyd_max_levels.py re-fits them: the
# 2- and 3-bit rows match within 0.25%; the 4-bit rows are an unconverged fit (3-6% closer
# to zero) whose squared error is within 0.5% of the converged levels', so they stay.
LLOYD_MAX = {
    (2, 32): [0.1965, 0.6647],
    (3, 32): [0.1017, 0.3145, 0.5589, 0.8827],
    (4, 32): [0.0479, 0.1455, 0.2469, 0.3548, 0.473, 0.6079, 0.7674, 0.9666],
    (2, 64): [0.1787, 0.6035],
    (3, 64): [0.0945, 0.2918, 0.5207, 0.8315],
    (4, 64): [0.0448, 0.1355, 0.2301, 0.3325, 0.4458, 0.5765, 0.7345, 0.9453],
}


def lloyd_max_levels(bits: int, group: int) -> torch.Tensor:
    """The 2**bits symmetric levels in [-1, 1] (ascending) for ``group`` (32 or 64)."""
    half = torch.tensor(LLOYD_MAX[(bits, 32 if group <= 32 else 64)])
    return torch.cat([-half.flip(0), half])


# ---------------------------------------------------------------- scale formats
# One entry per group-scale format. ``encode(amax [T, G]) -> (scale [T, G] fp32, bytes)``
# gives the scale that quantizes (no value clips below ``max_amax``) and its wire bytes;
# ``decode(bytes, T, G)`` the scale the receiver uses; ``poison(bytes, bad [T, G])`` marks
# groups holding NaN/Inf so they decode to NaN; ``nbytes(T, G)`` is the block's size.


def _fp16_encode(amax):
    s = amax.half()  # round to nearest; amax <= 65504 (checked by the codec)
    return s.float().masked_fill_(s == 0, 1.0), s.reshape(-1).view(torch.uint8)


def _fp16_decode(sb, t, g):
    return F.bytes_to_float(sb, torch.float16).reshape(t, g)


def _fp16_poison(sb, bad):
    s = sb.view(torch.float16).clone().reshape(bad.shape).masked_fill_(bad, float("nan"))  # sb is fresh, aligned
    return s.reshape(-1).view(torch.uint8)


def _e8m0_encode(amax):
    """E8M0: the smallest power of two >= amax (frexp: exact on every device), so no value clips."""
    m, e2 = torch.frexp(amax.clamp_min(2.0 ** -126))
    exp = (e2 - (m == 0.5).int()).clamp(-127, 127)
    return torch.exp2(exp.float()), (exp + 127).to(torch.uint8).reshape(-1)


def _e8m0_decode(sb, t, g):
    return torch.exp2(sb.float() - 127).masked_fill(sb == 255, float("nan")).reshape(t, g)


def _e8m0_poison(sb, bad):
    return sb.reshape(bad.shape).masked_fill(bad, 255).reshape(-1)


# lg8: group scale = token base * 2**(-q/16), q in 0..254 (4.4% steps over a 2**15.9 range);
# q = 255 is the non-finite sentinel (the group decodes to NaN).
_LG8_TABLE = torch.exp2(-torch.arange(256, dtype=torch.float64) / 16).float()
LG8_NAN = 255


def _lg8_encode(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token bf16 base (>= the token's largest group absmax) and a log-step code per group.

    The base is the token's largest group absmax rounded *up* to bf16 (fp32's exponent
    range, so any absmax up to bf16's max fits). The code is the largest q <= 254 with
    ``base * 2**(-q/16) >= amax`` (no clipping), found by a search in a fixed fp32 table
    after an IEEE division, so every device gets the same bytes.
    """
    t, g = amax.shape
    top = amax.amax(dim=1) if g else amax.new_zeros(t)
    base = top.to(torch.bfloat16)
    low = base.float() < top  # bf16 rounded down: step to the next representable value
    base = torch.where(low, (base.view(torch.int16) + 1).view(torch.bfloat16), base)
    b32 = base.float().masked_fill(base == 0, 1.0)
    ratio = torch.div(amax, b32.unsqueeze(1))
    table = _LG8_TABLE.to(amax.device).flip(0)  # ascending
    # number of table entries >= ratio, minus one, is the largest admissible q
    q = (256 - torch.searchsorted(table, ratio.contiguous(), right=False)) - 1
    q = q.clamp_(0, LG8_NAN - 1)
    scale = b32.unsqueeze(1) * _LG8_TABLE.to(amax.device)[q]
    return scale, torch.cat([q.to(torch.uint8).reshape(-1), base.reshape(-1).view(torch.uint8)])


def _lg8_decode(sb: torch.Tensor, t: int, g: int) -> torch.Tensor:
    codes = sb[: t * g].reshape(t, g)
    base = F.bytes_to_float(sb[t * g:], torch.bfloat16).reshape(t, 1)
    scale = base * _LG8_TABLE.to(sb.device)[codes.long()]
    return scale.masked_fill(codes == LG8_NAN, float("nan"))


def _lg8_poison(sb, bad):
    t, g = bad.shape
    codes = sb[: t * g].reshape(t, g).masked_fill(bad, LG8_NAN)
    return torch.cat([codes.reshape(-1), sb[t * g:]])


@dataclass(frozen=True)
class ScaleFormat:
    max_amax: float  # largest rotated-group absmax the format carries
    nbytes: Callable[[int, int], int]
    encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    decode: Callable[[torch.Tensor, int, int], torch.Tensor]
    poison: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


SCALE_FORMATS = {
    "fp16": ScaleFormat(F.FP16_MAX, lambda t, g: 2 * t * g, _fp16_encode, _fp16_decode, _fp16_poison),
    "e8m0": ScaleFormat(2.0 ** 127, lambda t, g: t * g, _e8m0_encode, _e8m0_decode, _e8m0_poison),
    # a code per group plus one bf16 base per token
    "lg8": ScaleFormat(F.BF16_MAX, lambda t, g: t * g + 2 * t, _lg8_encode, _lg8_decode, _lg8_poison),
}
# Rotated channels are clamped to this magnitude in "propagate" mode before the fp32
# Hadamard transform, so that it cannot overflow (256 * 2**100 is far below fp32's max).
ROTATE_MAX = 2.0 ** 100
FP32_MAX = float(torch.finfo(torch.float32).max)


@dataclass(frozen=True)
class RotParams:
    outliers: torch.Tensor  # [k] ascending
    signs: torch.Tensor  # [E]


class KeptRotation:
    """The static side of every rotated codec (``self.k``, ``self.seed``, ``self.calibration``):
    the calibrated top-k channels kept in bf16 and the random signs of the rotation."""

    def num_kept(self, e: int) -> int:
        """Channels kept in bf16: ``k`` (``-kN`` names), else the calibration's k."""
        k = self.calibration.k if self.k is None else int(self.k)
        if not 0 <= k <= e:
            raise ValueError(f"{self.name}: k={k} outside [0, {e}]")
        return k

    def _make_params(self, layer, source, hidden):
        k = self.num_kept(hidden)
        outl = topk_channels(self.calibration.get(layer, source).range, k) if k else torch.empty(0, dtype=torch.long)
        return RotParams(outliers=outl, signs=random_signs(hidden, self.seed))


class RotatedGroupCodec(KeptRotation, Codec):
    """Outliers in bf16 + randomized Hadamard + dynamic group quantization (see module doc)."""

    max_input = F.BF16_MAX  # the bf16 kept channels; the scales are checked after rotation
    cpu_sum_casts = True
    triton_sum_casts = True

    def __init__(self, *, bits: int = 4, group: int = 64, k: int | None = None, levels: str = "int",
                 scale_format: str = "fp16", seed: int = 0, name: str | None = None, **kw):
        k = check_int_option(k, "k", minimum=0, optional=True)
        group = check_int_option(group, "group", minimum=1)
        self.needs_calibration = k != 0
        super().__init__(**kw)
        if bits not in (2, 3, 4, 5, 6, 8):
            raise ValueError(f"bits must be 2, 3, 4, 5, 6 or 8, got {bits}")
        if bits > 4 and levels != "int":
            raise ValueError("rotated codecs above 4 bits use the integer grid")
        if levels not in ("int", "lm"):
            raise ValueError(f"levels must be 'int' (uniform) or 'lm' (Lloyd-Max), got {levels!r}")
        if scale_format not in SCALE_FORMATS:
            raise ValueError(f"scale_format must be one of {tuple(SCALE_FORMATS)}, got {scale_format!r}")
        self.bits, self.group, self.k, self.levels, self.scale_format, self.seed = bits, group, k, levels, scale_format, seed
        self._fmt = SCALE_FORMATS[scale_format]
        self.name = name or f"rot-{levels}{bits}-g{group}"
        if levels == "lm":
            self._levels = lloyd_max_levels(bits, group)
        else:  # symmetric integer grid scaled to [-1, 1]; the top negative code is unused
            q = 2 ** (bits - 1) - 1
            self._levels = torch.arange(-q - 1, q + 1).float() / q
        self._bounds = (self._levels[1:] + self._levels[:-1]) / 2

    def options(self):
        return {"bits": self.bits, "group": self.group, "k": self.k, "levels": self.levels,
                "scale_format": self.scale_format, "seed": self.seed}


    def _code_bytes(self, n: int) -> int:
        if self.bits == 8:
            return n
        return (n + 1) // 2 if self.bits == 4 else ((n + 7) // 8) * self.bits

    def _pack(self, code: torch.Tensor) -> torch.Tensor:
        if self.bits == 8:
            return code.reshape(-1)
        return F.pack_int4(code.view(torch.int8)) if self.bits == 4 else pack_bitplanes(code, self.bits)

    def _unpack(self, body: torch.Tensor, n: int) -> torch.Tensor:
        if self.bits == 8:
            return body
        if self.bits == 4:
            return F.unpack_int4(body, n).view(torch.uint8) & 0x0F
        return unpack_bitplanes(body, n, self.bits)

    def payload_nbytes(self, shape, layer=None):
        t, e = shape
        g = math.ceil(e / self.group)
        n = t * e
        codes = self._code_bytes(n)
        return 2 * t * self.num_kept(e) + codes + self._fmt.nbytes(t, g)

    def _amax_limit(self, e: int) -> float:
        """The largest rotated-group absmax an encode accepts at width ``e``: the scale format's
        own limit, and no more than fp32's max / (2B) for the B-wide Hadamard block, because the
        decode's inverse transform adds B values of up to twice the group absmax (a scale rounds
        up) in fp32. Beyond it a finite spike of ~3e38 / sqrt(B) (2e37-4.5e37 here) passed the
        format's limit and decoded to Inf/NaN. Only "error" mode ever gets there: the other modes
        clamp rotated channels to ROTATE_MAX first, far below it, so their bytes are unchanged."""
        return min(self._fmt.max_amax, FP32_MAX / (2 * hadamard_block(e)))

    # -------------------------------------------------------------- encode / decode
    def _encode(self, x, p: RotParams, nonfinite, *, out=None, flags=(None, None)):
        t, e = x.shape
        backend = self.kernel_backend(x.device)
        if self._kernel_packs(e) and backend == "triton":
            return self._triton_encode(x, p, out, flags)
        if backend == "cpu":
            payload = self._cpu_encode(x, p)
            if payload is not None:
                return payload
        xf = x.float()
        head = None
        if p.outliers.numel():
            head = F.float_to_bytes(xf.index_select(1, p.outliers), torch.bfloat16)
            xf = xf.index_fill(1, p.outliers, 0.0)
        if self.nonfinite != "error":  # propagate/flag: saturate so the fp32 rotation cannot overflow
            xf = self._fit_range(xf, ROTATE_MAX, "value")
        z = fwht(xf * p.signs, hadamard_block(e))
        zg, amax = F.group_absmax(z, self.group, nonfinite=nonfinite)
        # Finite input whose rotation overflowed fp32 shows up here as an Inf/NaN absmax.
        amax = self._fit_range(amax.nan_to_num(nan=float("inf")) if not nonfinite else amax,
                               self._amax_limit(e), "rotated group absmax")
        scale, sbytes = self._fmt.encode(amax)
        y = zg / scale.unsqueeze(-1)
        code = torch.bucketize(y.clamp(-1.0, 1.0), self._bounds.to(y.device)).to(torch.uint8)
        code = code.reshape(t, zg.shape[1] * self.group)[:, :e]
        if nonfinite:  # no sentinel among the codes: a group holding NaN/Inf gets a NaN scale
            sbytes = self._fmt.poison(sbytes, ~torch.isfinite(zg).all(-1))
        body = self._pack(code)
        parts = ([head] if head is not None else []) + [body, sbytes]
        return torch.cat(parts)

    # -------------------------------------------------------------- fused kernels
    def _kernel_packs(self, e: int) -> bool:
        """Whether the encode kernel can pack ``E = e`` (a program owns whole tokens)."""
        return self.bits == 8 or (self.bits == 4 and e % 2 == 0) or e % 8 == 0

    def _fused_encode(self, hidden):
        return self._kernel_packs(hidden)

    def _kernel_args(self, p: RotParams, t: int, e: int, device) -> dict:
        """Arguments every rot kernel takes; the lookup tables are copied to ``device`` once,
        and the set is built once per (parameters, hidden size, device), so serving's ever-changing
        token counts add no entries: a fresh dict each call with this call's ``code_bytes``
        (callers drop the entries their kernel does not take)."""
        def build():
            levels, bounds, lg8, lg8_asc = self._kernel_table(("tables", device), lambda: tuple(
                v.float().contiguous().to(device) for v in (self._levels, self._bounds, _LG8_TABLE,
                                                            _LG8_TABLE.flip(0))))
            return dict(signs=p.signs.float().contiguous(), lg8=lg8, levels=levels, bounds=bounds, lg8_asc=lg8_asc,
                        nk=p.outliers.numel(), group=self.group, bits=self.bits,
                        block=hadamard_block(e), scale_format=self.scale_format)

        return dict(self._kernel_table(("args", id(p), e, device), build), code_bytes=self._code_bytes(t * e))

    @staticmethod
    def _colmap(ps, e: int, device) -> torch.Tensor:
        """``[len(ps), e]`` int32: the bf16 slot of each kept channel per source, -1 elsewhere."""
        cm = torch.full((len(ps), e), -1, dtype=torch.int32, device=device)
        for r, p in enumerate(ps):
            cm[r, p.outliers] = torch.arange(p.outliers.numel(), dtype=torch.int32, device=device)
        return cm

    def _triton_encode(self, x, p: RotParams, out, flags, chunks: int = 1):
        """One message, or (``chunks > 1``, ``out`` given) two-shot's ``chunks`` row chunks of
        ``x`` in one launch, their payloads one after another in ``out``."""
        K = _triton_kernels()

        t, e = x.shape[0] // chunks, x.shape[1]
        kw = self._kernel_args(p, t, e, x.device)
        del kw["levels"]
        colmap = self._kernel_table(("enc", id(p)), lambda: self._colmap([p], e, x.device)[0])
        if out is None:
            out = torch.empty(self.payload_nbytes((t, e)), dtype=torch.uint8, device=x.device)
        # deferred "error" mode: the kernel records NaN/Inf, inputs beyond max_input, a rotated
        # group absmax beyond the scale's range and fp32 overflow in the rotation, for
        # check_nonfinite(); the other modes saturate, as the reference does.
        return K.encode(x.contiguous(), colmap=colmap, out=out, flag=flags[0], range_flag=flags[1],
                        max_input=self.max_input, rotate_max=ROTATE_MAX, scale_max=self._amax_limit(e), chunks=chunks,
                        **kw)

    def _encode_chunks(self, x, chunks, p: RotParams, out, flags):
        if not _triton_kernels().chunks_fit(p.outliers.numel(), out.numel() // chunks):
            return None  # a bf16 head at an odd address: chunk by chunk
        return self._triton_encode(x, p, out, flags, chunks=chunks)

    def _decode_chunks(self, payload, shape, chunks, p: RotParams, out=None):
        return self._triton_decode_sum([payload], shape, [p], out=out, chunks=chunks)

    def _reduce_encode(self, payloads, shape, layer, sources, out_source, out=None):
        if not payloads or self.kernel_backend(payloads[0].device) != "triton" or not self._kernel_packs(int(shape[1])):
            return None
        K = _triton_kernels()
        from lowbit_tp.kernels.triton_common import reduce_fused

        if not reduce_fused(K.REDUCE_VARIANT):  # "split": decode-and-sum, then encode (the base class's path)
            return None

        shape, params = self._payload_params(payloads, shape, layer, sources)
        t, e = shape
        dev = payloads[0].device
        sp = self.params(layer, out_source, e, dev)
        kw = self._kernel_args(sp, t, e, dev)
        dec_colmap = self._kernel_table(("dec", tuple(id(p) for p in params)), lambda: self._colmap(params, e, dev))
        enc_colmap = self._kernel_table(("enc", id(sp)), lambda: self._colmap([sp], e, dev)[0])
        if out is None:
            out = torch.empty(self.payload_nbytes((t, e)), dtype=torch.uint8, device=dev)
        flag, range_flag = self._kernel_flags(layer, out_source, dev)  # deferred error mode: checked per step
        return K.reduce_encode([q.contiguous() for q in payloads], dec_colmap=dec_colmap, enc_colmap=enc_colmap,
                               out=out, t=t, e=e, flag=flag, range_flag=range_flag, max_input=self.max_input,
                               rotate_max=ROTATE_MAX, scale_max=self._amax_limit(e), **kw)

    decode_error_backends = ("cpu", "triton")

    def _decode_error(self, payload, shape, sent, params, out=None):
        if self.kernel_backend(payload.device) == "triton":
            return self._triton_decode_sum([payload], shape, [params], out=out, minus=sent.float().contiguous())
        from lowbit_tp.kernels import cpu

        return cpu.rot_decode_error(payload, shape, sent, outliers=params.outliers, out=out,
                                    **self._cpu_args(shape[1]))

    def _cpu_args(self, e: int) -> dict:
        """What the CPU rot kernels take besides the data; tables are torch's own values."""
        def build():
            from lowbit_tp.kernels import cpu

            block = hadamard_block(e)
            spec = cpu.rot_spec(e=e, k=self.num_kept(e), group=self.group, block=block, bits=self.bits,
                                scale_format=self.scale_format)
            exp2 = torch.exp2(torch.arange(256, dtype=torch.float32) - 127)
            tables = [random_signs(e, self.seed).float().contiguous(), self._levels.float().contiguous(),
                      self._bounds.float().contiguous(), _LG8_TABLE.float().contiguous(), exp2]
            inv = float(torch.tensor(1.0 / math.sqrt(block), dtype=torch.float32))
            return dict(spec=spec, tables=tables, inv_sqrt_block=inv)
        return self._kernel_table(("cpu", e), build)

    def _cpu_encode(self, x, p: RotParams, scan: bool = False, out=None):
        """The CPU kernel's payload (with its input scan if ``scan``), or None where the
        reference must decide (it raises)."""
        from lowbit_tp.kernels import cpu

        t, e = x.shape
        payload, status, seen = cpu.rot_encode(
            x, outliers=p.outliers, propagate=self.nonfinite != "error", rotate_max=ROTATE_MAX,
            scale_max=self._amax_limit(e), nbytes=self.payload_nbytes((t, e)), out=out, **self._cpu_args(e))
        if status & 2 and self.nonfinite == "error":  # out of range: the reference raises OutOfRangeError
            return None
        return (payload, seen) if scan else payload

    def _encode_with_scan(self, x, p: RotParams, out=None):
        return self._cpu_encode(x, p, scan=True, out=out) if self.kernel_backend(x.device) == "cpu" else None

    def _decode_sum(self, payloads, shape, params, out=None):
        backend = self.kernel_backend(payloads[0].device)
        if backend == "cpu":
            from lowbit_tp.kernels import cpu

            return cpu.rot_decode_sum(payloads, shape, outliers=[p.outliers for p in params], out=out,
                                      **self._cpu_args(shape[1]))
        if backend != "triton":
            return super()._decode_sum(payloads, shape, params, out)
        return self._triton_decode_sum(payloads, shape, params, out)

    def _triton_decode_sum(self, payloads, shape, params, out=None, chunks: int = 1, minus=None):
        """The rank-ordered sum of the decoded ``payloads`` of ``shape``, or (``chunks > 1``, one
        payload) two-shot's ``chunks`` consecutive chunk payloads of ``shape`` decoded in one launch
        into ``[chunks * T, E]``; ``minus``: ``minus - sum`` instead (error feedback's next carry)."""
        K = _triton_kernels()

        t, e = shape
        dev = payloads[0].device
        kw = self._kernel_args(params[0], t, e, dev)
        del kw["bounds"], kw["lg8_asc"]
        colmap = self._kernel_table(("dec", tuple(id(p) for p in params)), lambda: self._colmap(params, e, dev))
        if out is None:
            out = torch.empty(chunks * t, e, dtype=torch.float32, device=dev)
        return K.decode_sum([q.contiguous() for q in payloads], colmap=colmap, out=out, chunks=chunks, minus=minus,
                            **kw)

    def _decode(self, payload, shape, p: RotParams):
        if self.kernel_backend(payload.device) in ("cpu", "triton"):  # the fused decode-and-sum of one payload
            return self._decode_sum([payload], shape, [p])
        t, e = shape
        k = p.outliers.numel()
        g = math.ceil(e / self.group)
        n = t * e
        off = 2 * t * k
        ncode = self._code_bytes(n)
        code = self._unpack(payload[off:off + ncode], n)
        vals = self._levels.to(payload.device)[code.long()].reshape(t, e)
        scale = self._fmt.decode(payload[off + ncode:], t, g)
        z = vals * scale.repeat_interleave(self.group, dim=1)[:, :e]
        x = fwht(z, hadamard_block(e)) * p.signs
        if k:
            x.index_copy_(1, p.outliers, F.bytes_to_float(payload[:off], torch.bfloat16).reshape(t, k))
        return x


def _reg(name, **opts):
    register_codec(name, lambda **kw: RotatedGroupCodec(name=name, **{**opts, **kw}),
                   needs_calibration=opts.get("k") != 0)  # k=None: k = E/64 from the calibration


# The names measured in docs/frontier.md. Bits/value at E=576 (k = 9 unless -k says) in the comments.
_reg("rot-int4-g64", bits=4, group=64, levels="int")                          # 4.5
_reg("rot-lm4-g64", bits=4, group=64, levels="lm")                            # 4.5
_reg("rot-int4-g32", bits=4, group=32, levels="int")                          # 4.75
_reg("rot-lm4-g32-e8", bits=4, group=32, levels="lm", scale_format="e8m0")    # 4.5
_reg("rot-lm3-g64", bits=3, group=64, levels="lm")                            # 3.5
_reg("rot-lm3-g32-e8", bits=3, group=32, levels="lm", scale_format="e8m0")    # 3.5
_reg("rot-lm2-g32-e8", bits=2, group=32, levels="lm", scale_format="e8m0")    # 2.5
_reg("rot-lm4-g64-e8", bits=4, group=64, levels="lm", scale_format="e8m0")    # 4.375
_reg("rot-lm4-g64-lg8", bits=4, group=64, levels="lm", scale_format="lg8")    # 4.40
_reg("rot-lm4-g32-lg8-k4", bits=4, group=32, levels="lm", scale_format="lg8", k=4)  # 4.39
_reg("rot-lm4-g64-lg8-k4", bits=4, group=64, levels="lm", scale_format="lg8", k=4)  # 4.26
_reg("rot-lm3-g32-lg8-k4", bits=3, group=32, levels="lm", scale_format="lg8", k=4)  # 3.39
# Per-layer allocation candidates: same k, groups and scales, so they differ by whole bits.
_reg("rot-lm2-g64-lg8-k4", bits=2, group=64, levels="lm", scale_format="lg8", k=4)  # 2.26
_reg("rot-lm3-g64-lg8-k4", bits=3, group=64, levels="lm", scale_format="lg8", k=4)  # 3.26
_reg("rot-int5-g64-lg8-k4", bits=5, group=64, levels="int", scale_format="lg8", k=4)  # 5.26
_reg("rot-int8-g64-lg8-k4", bits=8, group=64, levels="int", scale_format="lg8", k=4)  # 8.26
_reg("rot-int6-g64-lg8-k4", bits=6, group=64, levels="int", scale_format="lg8", k=4)  # 6.26: sensitive layers
_reg("rot-int8-g64-e8", bits=8, group=64, levels="int", scale_format="e8m0")  # 8.375: sensitive layers
