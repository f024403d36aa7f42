"""Pure quantization and packing functions shared by every codec.

Everything here is stateless: tensors in, tensors out. Codecs (``lowbit_tp.codecs``)
compose these; the simulator and the runtime reach them only through codecs.

Conventions (the wire format depends on them, see ``docs/wire-format.md``):

* Symmetric integer grids use ``[-qmax, qmax]`` with ``qmax = 2**(bits-1) - 1``. The one
  remaining code, ``-qmax - 1`` (``-8`` for int4, ``-128`` for int8), is reserved as the
  *non-finite sentinel*: it decodes to NaN. It only appears when a codec is asked to
  propagate NaN/Inf instead of raising.
* Rounding is ``torch.round`` (half to even) of ``x * (1 / scale)``.
* Int4 packing: two values per byte, the value with the even flat index in the low
  nibble, two's complement nibbles. An odd count pads the last high nibble with 0.
* Byte order is little-endian everywhere (bf16/fp16 blocks are their native LE bytes).
"""
from __future__ import annotations

import torch

__all__ = [
    "pack_int4",
    "unpack_int4",
    "quantize_symmetric",
    "dequantize_symmetric",
    "float_to_bytes",
    "bytes_to_float",
    "group_absmax",
    "e2m1_encode",
    "e2m1_decode",
    "E2M1_MAX",
]

E2M1_MAX = 6.0
# Magnitudes of the 8 positive FP4 E2M1 codes (OCP MX v1.0): code = index.
_E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
# Midpoints between neighbouring magnitudes; used to round to nearest.
_E2M1_BOUNDS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int8 values in ``[-8, 7]`` (any shape, row-major order) into ``ceil(n/2)`` bytes.

    Value ``2i`` goes to the low nibble of byte ``i``, value ``2i+1`` to its high nibble.
    """
    flat = q.reshape(-1)
    n = flat.numel()
    if n % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    u = flat.view(torch.uint8).reshape(-1, 2)
    return (u[:, 0] & 0x0F) | (u[:, 1] << 4)


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``n`` int8 values in ``[-8, 7]`` from packed bytes."""
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise TypeError(f"packed int4 must be a 1-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"{packed.numel()} packed bytes cannot hold exactly {n} int4 values")
    s = packed.view(torch.int8)
    out = torch.empty(packed.numel(), 2, dtype=torch.int8, device=packed.device)
    # Shift left then arithmetic-shift right sign-extends each nibble.
    out[:, 0] = (s << 4) >> 4
    out[:, 1] = s >> 4
    return out.reshape(-1)[:n]


def quantize_symmetric(x: torch.Tensor, inv_scale: torch.Tensor, *, bits: int) -> torch.Tensor:
    """Round ``x * inv_scale`` to the symmetric grid ``[-qmax, qmax]``; returns int8.

    ``inv_scale`` broadcasts against ``x`` (per channel, per group ...). Non-finite inputs
    map to the sentinel code ``-qmax - 1``; callers that must refuse them check first.
    """
    qmax = 2 ** (bits - 1) - 1
    y = x.float() * inv_scale
    q = torch.round(y).clamp_(-qmax, qmax)
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        q = torch.where(finite, q, torch.full_like(q, -qmax - 1))
    return q.to(torch.int8)


def dequantize_symmetric(q: torch.Tensor, scale: torch.Tensor, *, bits: int) -> torch.Tensor:
    """``q * scale`` in fp32, with the sentinel code decoded to NaN."""
    sentinel = -(2 ** (bits - 1))
    y = q.float() * scale
    bad = q == sentinel
    if bool(bad.any()):
        y = y.masked_fill(bad, float("nan"))
    return y


def float_to_bytes(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast to ``dtype`` (bf16/fp16/fp32) and return its raw little-endian bytes, 1-D uint8."""
    return x.to(dtype).contiguous().reshape(-1).view(torch.uint8)


def bytes_to_float(buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret raw bytes as a 1-D tensor of ``dtype`` and widen to fp32.

    The wire format has no alignment padding, so a block may start at an odd byte
    offset; such a slice is copied before it is reinterpreted.
    """
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if buf.storage_offset() % itemsize:
        buf = buf.clone()
    return buf.contiguous().view(dtype).float()


def group_absmax(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the last dim of ``x [T, E]`` into groups of ``group`` (the last may be ragged).

    Returns ``(xg [T, G, group] fp32 zero-padded, absmax [T, G] fp32)`` with
    ``G = ceil(E / group)``. Non-finite values are ignored in the absmax so one NaN does
    not poison its neighbours' scale.
    """
    t, e = x.shape
    g = -(-e // group)
    xf = x.float()
    if g * group != e:
        xf = torch.nn.functional.pad(xf, (0, g * group - e))
    xg = xf.reshape(t, g, group)
    mag = xg.abs()
    if not bool(torch.isfinite(mag).all()):
        mag = torch.where(torch.isfinite(mag), mag, torch.zeros_like(mag))
    return xg, mag.amax(dim=-1)


def e2m1_encode(y: torch.Tensor) -> torch.Tensor:
    """Round already-scaled values to FP4 E2M1 codes (uint8, 0..15: sign in bit 3).

    Magnitudes above 6 saturate to 6. Ties round to the smaller magnitude.
    """
    mag = y.abs()
    code = torch.bucketize(mag, _E2M1_BOUNDS.to(mag.device), right=False).to(torch.uint8)
    sign = (y < 0).to(torch.uint8) << 3
    return code | sign


def e2m1_decode(code: torch.Tensor) -> torch.Tensor:
    """FP4 E2M1 codes (uint8, 0..15) to fp32 values."""
    c = code.long()
    mag = _E2M1_VALUES.to(code.device)[c & 7]
    return torch.where((c & 8) != 0, -mag, mag)
