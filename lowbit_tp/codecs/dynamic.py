"""Codecs with per-message scales computed from the values themselves (no calibration).

Payload layouts (row-major ``[tokens, E]``; groups run along E within a token, the last
group of a row may be shorter when ``E % group != 0``; see docs/wire-format.md):

* ``int4-g32`` / ``int4-g128``: ``[ ceil(T*E/2) bytes of int4 | T*G fp16 scales ]`` with
  ``G = ceil(E / group)``; value = code * scale, scale = group absmax / 7 rounded to fp16.
  QuickReduce-style Q4 (4.5 bits/value at group 32, 4.125 at 128).
* ``mxfp4``: ``[ ceil(T*E/2) bytes of FP4 E2M1 codes | T*G E8M0 exponents ]`` with group
  32 (OCP MX v1.0): value = e2m1(code) * 2**(exp - 127); exponent byte 255 is NaN.
"""
from __future__ import annotations

import math

import torch

from lowbit_tp.codecs import functional as F
from lowbit_tp.codecs.base import Codec, _check_buffer, check_int_option, codes_as, register_codec


def _triton_kernels():
    """``lowbit_tp.kernels.triton_group``, imported on the Triton path only (triton is optional)."""
    from lowbit_tp.kernels import triton_group

    return triton_group


# Largest group absmax an fp16 scale (absmax / 7) carries: 7 * 65504.
GROUP_INT4_MAX = 7 * F.FP16_MAX


def _scale_groups(vals: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """``vals [T, E] * scale [T, G]`` broadcast over groups of ``group`` channels (in place)."""
    t, e = vals.shape
    g = scale.shape[1]
    if g * group == e:
        return vals.view(t, g, group).mul_(scale.unsqueeze(-1)).view(t, e)
    return vals.mul_(scale.repeat_interleave(group, dim=1)[:, :e])


def _fused_reduce_encode(codec: Codec, kernel, payloads, shape, layer, sources, out_source, out):
    """The Triton two-shot step shared by the group and MX codecs: decode, sum and re-encode
    ``payloads`` in one kernel, ``kernel(parts, out, t, e, flags)``, into ``out`` (allocated
    when None). ``flags`` are the (NaN, range) device flags of ``(layer, out_source)``, read
    once per step (deferred error mode). None where the fused path does not apply, so the
    caller falls back to decode-sum and encode."""
    if not payloads or codec.kernel_backend(payloads[0].device) != "triton" or not codec._fused_encode(int(shape[1])):
        return None
    shape, _ = codec._payload_params(payloads, shape, layer, sources)
    dev = payloads[0].device
    if out is None:
        out = torch.empty(codec.payload_nbytes(shape), dtype=torch.uint8, device=dev)
    flags = codec._kernel_flags(layer, out_source, dev)
    return kernel([p.contiguous() for p in payloads], out, shape[0], shape[1], flags)


def _fused_feedback(codec: Codec, owner: type, kernel, x, carry, layer, source, out, next_out):
    """Error feedback in one Triton kernel, shared by the group and MX codecs
    (:meth:`Codec.encode_feedback`): ``kernel(x, carry, payload, next, flags)`` encodes ``x + carry``
    into ``payload`` exactly as :meth:`Codec.encode` does on this path (no host scan; the kernel
    saturates and records NaN/Inf and range into the (layer, source) flags) and writes ``sent -
    decode`` (+0.0 where not finite) into ``next``, the bytes just written decoded in registers.
    None where it does not apply (not the Triton backend, an odd E, a carry that is not a
    contiguous fp32 tensor of ``x``'s shape, a subclass of ``owner``, the class whose bytes
    ``kernel`` writes, that changes encode or decode: :func:`~lowbit_tp.codecs.base.codes_as`):
    the caller then takes the two-kernel path of :meth:`Codec.encode_feedback` or the general one."""
    codec._check_next_out(x, next_out)
    if (codec._feedback_backend(x, carry) != "triton" or not codec._fused_encode(int(x.shape[1]))
            or (carry is not None and not carry.is_contiguous()) or not codes_as(type(codec), owner)):
        return None
    codec._check_tensor(x, layer, source)
    nbytes = codec.payload_nbytes(tuple(x.shape), layer)
    if out is not None:
        _check_buffer(out, torch.uint8, (nbytes,), x.device, f"{codec.name}: encode_feedback out=")
    payload = torch.empty(nbytes, dtype=torch.uint8, device=x.device) if out is None else out
    nxt = torch.empty(x.shape, dtype=torch.float32, device=x.device) if next_out is None else next_out
    return kernel(x.contiguous(), carry, payload, nxt, codec._kernel_flags(layer, source, x.device))


class GroupInt4Codec(Codec):
    """Symmetric int4 with a dynamic fp16 scale per ``group`` values of each token."""

    max_input = GROUP_INT4_MAX  # the fp16 scale absmax / 7 stays <= 65504
    cpu_sum_casts = True
    triton_sum_casts = True

    def __init__(self, *, group: int = 32, **kw):
        super().__init__(**kw)
        self.group = check_int_option(group, "group", minimum=1)
        self.name = f"int4-g{group}"

    def options(self):
        return {"group": self.group}

    def payload_nbytes(self, shape, layer=None):
        t, e = shape
        return (t * e + 1) // 2 + 2 * t * math.ceil(e / self.group)

    def _fused_encode(self, hidden):
        return hidden % 2 == 0  # the kernel packs a token's codes in pairs

    def _encode(self, x, params, nonfinite, *, out=None, flags=(None, None)):
        if self.kernel_backend(x.device) == "cpu":
            from lowbit_tp.kernels import cpu
            return cpu.group_encode(x, group=self.group, nbytes=self.payload_nbytes(tuple(x.shape)), out=out)[0]
        t, e = x.shape
        if self._fused_encode(e) and self.kernel_backend(x.device) == "triton":
            K = _triton_kernels()
            if out is None:
                out = torch.empty(self.payload_nbytes((t, e)), dtype=torch.uint8, device=x.device)
            return K.encode(x.contiguous(), out, group=self.group, max_input=self.max_input, flag=flags[0],
                            range_flag=flags[1])
        g = math.ceil(e / self.group)
        xg, amax = F.group_absmax(x, self.group, nonfinite=nonfinite)
        # Round the scale to fp16 *before* quantizing so that the receiver, which only
        # has the fp16 scale, reconstructs exactly what the sender meant.
        # Tensor / tensor: PyTorch's CUDA kernel turns division by a Python scalar into a
        # multiply by its reciprocal, which rounds differently from the CPU.
        # max_input keeps absmax / 7 <= 65504; the clamp covers propagate mode on the Triton
        # backend, which skips the host-side input scan (the kernel clamps the same way).
        scale = torch.div(amax, torch.full_like(amax, 7.0)).clamp_(max=F.FP16_MAX).half()
        # Divide (not multiply by a reciprocal) so every device rounds identically; an
        # all-zero group has scale 0 and is divided by 1 instead.
        s32 = scale.float().masked_fill_(scale == 0, 1.0)
        q = F.quantize_symmetric(xg, scale=s32.unsqueeze(-1), bits=4, nonfinite=nonfinite).reshape(t, g * self.group)[:, :e]
        return torch.cat([F.pack_int4(q), scale.reshape(-1).view(torch.uint8)])

    def _encode_with_scan(self, x, params, out=None):
        if self.kernel_backend(x.device) != "cpu":
            return None
        from lowbit_tp.kernels import cpu
        return cpu.group_encode(x, group=self.group, nbytes=self.payload_nbytes(tuple(x.shape)), out=out)

    def _reduce_encode(self, payloads, shape, layer, sources, out_source, out=None):
        def kernel(parts, out, t, e, flags):
            K = _triton_kernels()
            return K.reduce_encode(parts, out, t=t, e=e, group=self.group, max_input=self.max_input,
                                   flag=flags[0], range_flag=flags[1])

        return _fused_reduce_encode(self, kernel, payloads, shape, layer, sources, out_source, out)

    def _decode_sum(self, payloads, shape, params, out=None):
        backend = self.kernel_backend(payloads[0].device)
        if backend == "cpu":
            from lowbit_tp.kernels import cpu
            return cpu.group_decode_sum(payloads, shape, group=self.group, out=out)
        if backend == "triton":
            K = _triton_kernels()
            if out is None:
                out = torch.empty(shape, dtype=torch.float32, device=payloads[0].device)
            return K.decode_sum([p.contiguous() for p in payloads], out, group=self.group)
        return super()._decode_sum(payloads, shape, params, out)

    def encode_feedback(self, x, carry, *, layer=None, source=0, out=None, next_out=None):
        """One Triton kernel for an even E (:func:`_fused_feedback`); else the encode, then the
        decode kernel writing the difference (Triton for an odd E, the CPU kernels), or None."""
        def kernel(x, carry, payload, nxt, flags):
            return _triton_kernels().encode_feedback(x, carry, payload, nxt, group=self.group,
                                                     max_input=self.max_input, flag=flags[0], range_flag=flags[1])

        got = _fused_feedback(self, GroupInt4Codec, kernel, x, carry, layer, source, out, next_out)
        return got if got is not None else super().encode_feedback(x, carry, layer=layer, source=source, out=out,
                                                                   next_out=next_out)

    decode_error_backends = ("cpu", "triton")

    def _decode_error(self, payload, shape, sent, params, out=None):
        if self.kernel_backend(payload.device) == "triton":  # the decode kernel's MINUS epilogue (odd E)
            K = _triton_kernels()
            if out is None:
                out = torch.empty(shape, dtype=torch.float32, device=payload.device)
            return K.decode_sum([payload.contiguous()], out, group=self.group, minus=sent.contiguous())
        from lowbit_tp.kernels import cpu

        return cpu.group_decode_error(payload, shape, sent, group=self.group, out=out)

    def _encode_chunks(self, x, chunks, params, out, flags):
        K = _triton_kernels()
        return K.encode_chunks(x.contiguous(), out, chunks=chunks, group=self.group, max_input=self.max_input,
                               flag=flags[0], range_flag=flags[1])

    def _decode_chunks(self, payload, shape, chunks, params, out=None):
        if shape[1] % 2:
            return None  # the flat odd-E decoder has no batched form: chunk by chunk
        K = _triton_kernels()
        if out is None:
            out = torch.empty(chunks * shape[0], shape[1], dtype=torch.float32, device=payload.device)
        return K.decode_chunks(payload, out, chunks=chunks, group=self.group)

    def _decode(self, payload, shape, params):
        if self.kernel_backend(payload.device) in ("cpu", "triton"):  # the fused decode-and-sum of one payload
            return self._decode_sum([payload], shape, [params])
        t, e = shape
        g = math.ceil(e / self.group)
        nq = (t * e + 1) // 2
        vals = F.unpack_int4_float(payload[:nq], t * e).reshape(t, e)  # sentinel already NaN
        scale = F.bytes_to_float(payload[nq:], torch.float16).reshape(t, g)
        return _scale_groups(vals, scale, self.group)


class MXFP4Codec(Codec):
    """OCP MX FP4: E2M1 values with one shared E8M0 power-of-two scale per 32 values."""

    name = "mxfp4"
    group = 32
    triton_sum_casts = True

    def payload_nbytes(self, shape, layer=None):
        t, e = shape
        return (t * e + 1) // 2 + t * math.ceil(e / self.group)

    def _fused_encode(self, hidden):
        return hidden % 2 == 0  # the kernel packs a token's codes in pairs

    def _encode(self, x, params, nonfinite, *, out=None, flags=(None, None)):
        t, e = x.shape
        if self._fused_encode(e) and self.kernel_backend(x.device) == "triton":
            K = _triton_kernels()
            if out is None:
                out = torch.empty(self.payload_nbytes((t, e)), dtype=torch.uint8, device=x.device)
            return K.mx_encode(x.contiguous(), out, flag=flags[0])  # no range limit: nothing else to record
        xg, amax = F.group_absmax(x, self.group, nonfinite=nonfinite)
        # OCP MX: shared exponent = floor(log2(amax)) - emax(E2M1), emax = 2. frexp gives
        # floor(log2) exactly (amax = m * 2**e, m in [0.5, 1)), identically on every device.
        _, e2 = torch.frexp(amax.clamp_min(2.0**-126))
        exp = (e2 - 3).float().clamp_(-127, 127)
        y = xg * torch.exp2(-exp).unsqueeze(-1)
        codes = F.e2m1_encode(y.clamp(-F.E2M1_MAX, F.E2M1_MAX)).reshape(t, xg.shape[1] * self.group)[:, :e]
        ebyte = (exp + 127).to(torch.uint8)
        if nonfinite:
            ebyte = ebyte.masked_fill(~torch.isfinite(xg).all(dim=-1), 255)  # E8M0 NaN: the whole block decodes to NaN
        return torch.cat([F.pack_int4(codes.view(torch.int8)), ebyte.reshape(-1)])

    def _decode_sum(self, payloads, shape, params, out=None):
        if self.kernel_backend(payloads[0].device) != "triton":
            return super()._decode_sum(payloads, shape, params, out)
        K = _triton_kernels()
        if out is None:
            out = torch.empty(shape, dtype=torch.float32, device=payloads[0].device)
        return K.mx_decode_sum([p.contiguous() for p in payloads], out)

    def encode_feedback(self, x, carry, *, layer=None, source=0, out=None, next_out=None):
        """One Triton kernel for an even E (:func:`_fused_feedback`); an odd E: the encode, then the
        decode kernel writing the difference; other backends: None."""
        def kernel(x, carry, payload, nxt, flags):  # no range limit: only the NaN flag
            return _triton_kernels().mx_encode_feedback(x, carry, payload, nxt, flag=flags[0])

        got = _fused_feedback(self, MXFP4Codec, kernel, x, carry, layer, source, out, next_out)
        return got if got is not None else super().encode_feedback(x, carry, layer=layer, source=source, out=out,
                                                                   next_out=next_out)

    decode_error_backends = ("triton",)  # (no CPU kernel: the CPU backend decodes mxfp4 with the reference)

    def _decode_error(self, payload, shape, sent, params, out=None):
        K = _triton_kernels()  # the decode kernel's MINUS epilogue (odd E)
        if out is None:
            out = torch.empty(shape, dtype=torch.float32, device=payload.device)
        return K.mx_decode_sum([payload.contiguous()], out, minus=sent.contiguous())

    def _reduce_encode(self, payloads, shape, layer, sources, out_source, out=None):
        def kernel(parts, out, t, e, flags):  # no range limit: only the NaN flag
            K = _triton_kernels()
            return K.mx_reduce_encode(parts, out, t=t, e=e, flag=flags[0])

        return _fused_reduce_encode(self, kernel, payloads, shape, layer, sources, out_source, out)

    def _encode_chunks(self, x, chunks, params, out, flags):
        K = _triton_kernels()
        return K.mx_encode_chunks(x.contiguous(), out, chunks=chunks, flag=flags[0])

    def _decode_chunks(self, payload, shape, chunks, params, out=None):
        if shape[1] % 2:
            return None  # the flat odd-E decoder has no batched form: chunk by chunk
        K = _triton_kernels()
        if out is None:
            out = torch.empty(chunks * shape[0], shape[1], dtype=torch.float32, device=payload.device)
        return K.mx_decode_chunks(payload, out, chunks=chunks)

    def _decode(self, payload, shape, params):
        if self.kernel_backend(payload.device) == "triton":  # the fused decode-and-sum of one payload
            return self._decode_sum([payload], shape, [params])
        t, e = shape
        g = math.ceil(e / self.group)
        nq = (t * e + 1) // 2
        vals = F.unpack_int4_float(payload[:nq], t * e, table=F.E2M1_PAIRS).reshape(t, e)
        ebyte = payload[nq:].reshape(t, g)
        scale = torch.exp2(ebyte.float() - 127)
        scale = scale.masked_fill(ebyte == 255, float("nan"))
        return _scale_groups(vals, scale, self.group)


register_codec("int4-g32", lambda **kw: GroupInt4Codec(group=32, **kw), needs_calibration=False)
register_codec("int4-g128", lambda **kw: GroupInt4Codec(group=128, **kw), needs_calibration=False)
register_codec("mxfp4", MXFP4Codec)
