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

import math

import torch

__all__ = [
    "has_nonfinite",
    "value_range",
    "pack_int4",
    "unpack_int4",
    "quantize_symmetric",
    "dequantize_symmetric",
    "float_to_bytes",
    "bytes_to_float",
    "group_absmax",
    "e2m1_encode",
    "hadamard_block",
    "fwht",
    "pack_bitplanes",
    "unpack_bitplanes",
    "E2M1_MAX",
    "FP16_MAX",
    "BF16_MAX",
]

E2M1_MAX = 6.0
FP16_MAX = 65504.0
BF16_MAX = float(torch.finfo(torch.bfloat16).max)  # 3.3895e38: fp32 beyond it rounds to Inf in bf16


def value_range(x: torch.Tensor) -> tuple[float, float]:
    """``(min, max)`` of ``x`` as Python floats, ``(0, 0)`` when empty; NaN if ``x`` holds one.

    One ``aminmax`` pass (NaN propagates through both, +-Inf shows in one): how codecs find
    NaN/Inf and out-of-range values on every message, several times faster than a mask.
    """
    if x.numel() == 0:
        return 0.0, 0.0
    lo, hi = torch.aminmax(x)
    return lo.item(), hi.item()  # float(t) warns for a tensor that requires grad (a model run outside no_grad)


def has_nonfinite(x: torch.Tensor) -> bool:
    """True if ``x`` holds a NaN or an Inf (one :func:`value_range` pass)."""
    lo, hi = value_range(x)
    return not (math.isfinite(lo) and math.isfinite(hi))


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int8 values in ``[-8, 7]`` (any shape, row-major order) into ``ceil(n/2)`` bytes.

    Value ``2i`` goes to the low nibble of byte ``i``, value ``2i+1`` to its high nibble.
    """
    flat = q.reshape(-1)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    # Read value pairs as little-endian int16 words: value 2i is the low byte. Keep its
    # low nibble, and move the high byte's low nibble to bits 4-7; one fused pass.
    w = flat.contiguous().view(torch.int16)
    return ((w & 0x0F) | ((w >> 4) & 0xF0)).to(torch.uint8)


_DEVICE_COPIES: dict = {}


def _on_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A lookup table on ``device``, copied there once."""
    if device.type == "cpu":
        return table
    key = (id(table), device)
    if key not in _DEVICE_COPIES:
        _DEVICE_COPIES[key] = table.to(device)
    return _DEVICE_COPIES[key]


def _nibble_pairs() -> torch.Tensor:
    """Lookup table: byte -> its two sign-extended nibbles as one little-endian int16 word."""
    b = torch.arange(256, dtype=torch.int16)
    lo, hi = b & 0xF, b >> 4
    lo, hi = torch.where(lo >= 8, lo - 16, lo), torch.where(hi >= 8, hi - 16, hi)
    return (lo & 0xFF) | (hi << 8)


_NIBBLE_PAIRS = _nibble_pairs()


def _float_pairs(values: torch.Tensor) -> torch.Tensor:
    """Lookup table: byte -> fp32 values of its (low, high) nibble codes, as one int64 word."""
    b = torch.arange(256)
    pairs = torch.stack([values[b & 0xF], values[b >> 4]], dim=1).float().contiguous()
    return pairs.view(torch.int64).reshape(256)


# int4 two's complement codes as floats; the sentinel -8 decodes to NaN.
_INT4_FLOATS = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, float("nan"), -7, -6, -5, -4, -3, -2, -1])
_INT4_PAIRS = _float_pairs(_INT4_FLOATS)


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``n`` int8 values in ``[-8, 7]`` from packed bytes."""
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise TypeError(f"packed int4 must be a 1-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"{packed.numel()} packed bytes cannot hold exactly {n} int4 values")
    # One table lookup per byte yields both values (a 512-byte table stays in L1).
    lut = _on_device(_NIBBLE_PAIRS, packed.device)
    return torch.index_select(lut, 0, packed.int()).view(torch.int8)[:n]


def unpack_int4_float(packed: torch.Tensor, n: int, *, table: torch.Tensor | None = None) -> torch.Tensor:
    """Packed 4-bit codes straight to fp32 values through a byte -> value-pair table.

    ``table`` (from ``_float_pairs``) maps codes to values; the default is int4 with the
    sentinel as NaN. Used by decoders: one gather instead of unpack + convert.
    """
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (n + 1) // 2:
        raise ValueError(f"expected {(n + 1) // 2} packed uint8 bytes for {n} values, got {packed.dtype} {tuple(packed.shape)}")
    lut = _on_device(_INT4_PAIRS if table is None else table, packed.device)
    return torch.index_select(lut, 0, packed.int()).view(torch.float32)[:n]


def quantize_symmetric(x: torch.Tensor, *, bits: int, inv_scale: torch.Tensor | None = None,
                       scale: torch.Tensor | None = None, nonfinite: bool | None = None) -> torch.Tensor:
    """Round ``x / scale`` to the symmetric grid ``[-qmax, qmax]``; returns int8.

    Give exactly one of ``inv_scale`` (multiply: fastest; for static scales computed once on
    the CPU) or ``scale`` (IEEE division, correctly rounded on every device: for scales
    computed per message, so CPU and GPU senders produce identical bytes; a zero scale
    must only meet zeros). Both broadcast against ``x``. Non-finite inputs map to the
    sentinel code ``-qmax - 1``; ``nonfinite`` says whether ``x`` may hold any (``None``:
    find out; ``False`` skips the mask).
    """
    if (inv_scale is None) == (scale is None):
        raise ValueError("give exactly one of inv_scale or scale")
    qmax = 2 ** (bits - 1) - 1
    xf = x if x.dtype == torch.float32 else x.float()
    y = xf * inv_scale if scale is None else xf / scale
    q = y.round_().clamp_(-qmax, qmax)
    if nonfinite is None:
        nonfinite = has_nonfinite(x)
    if nonfinite:
        q = torch.where(torch.isfinite(x), q, torch.full_like(q, -qmax - 1))
    return q.to(torch.int8)


def dequantize_symmetric(q: torch.Tensor, scale: torch.Tensor, *, bits: int) -> torch.Tensor:
    """``q * scale`` in fp32, with the sentinel code decoded to NaN."""
    sentinel = -(2 ** (bits - 1))
    y = q.float().mul_(scale)  # widen first: a mixed int8 * fp32 multiply is ~10x slower
    if q.numel() and int(q.min()) == sentinel:  # a cheap reduction; the mask only when needed
        y = y.masked_fill(q == sentinel, float("nan"))
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


def group_absmax(x: torch.Tensor, group: int, *, nonfinite: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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
    if nonfinite is None:
        nonfinite = has_nonfinite(x)
    if nonfinite:
        mag = torch.where(torch.isfinite(mag), mag, torch.zeros_like(mag))
    return xg, mag.amax(dim=-1)


def e2m1_encode(y: torch.Tensor) -> torch.Tensor:
    """Round already-scaled values to FP4 E2M1 codes (uint8, 0..15: sign in bit 3).

    Round to nearest, ties to even code; magnitudes above 6 saturate to 6. The grid has
    step 0.5 below 2, step 1 in [2, 4) and step 2 in [4, 6], so each range rounds with one
    ``torch.round`` (half to even) at its own step.
    """
    m = y.abs().clamp_(max=E2M1_MAX)
    fine = torch.round(m * 2)            # units of 0.5: codes 0..4 for m < 2
    mid = torch.round(m) + 2             # units of 1 from 2 up: 2 -> code 4, 3 -> 5, 4 -> 6
    top = torch.round(m * 0.5) + 4       # units of 2 from 4 up: 4 -> code 6, 6 -> 7
    code = torch.where(m < 2, fine, torch.where(m < 4, mid, top))
    code = code.to(torch.uint8)
    return code | ((y < 0).to(torch.uint8) << 3)


E2M1_FLOATS = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
E2M1_PAIRS = _float_pairs(E2M1_FLOATS)


# ---------------------------------------------------------------- rotation and bit-planes
def hadamard_block(e: int, max_block: int = 256) -> int:
    """Largest power of two <= ``max_block`` that divides ``e``."""
    b = 1
    while b * 2 <= max_block and e % (b * 2) == 0:
        b *= 2
    return b


def fwht(x: torch.Tensor, block: int) -> torch.Tensor:
    """Orthonormal fast Walsh-Hadamard transform over consecutive blocks of the last dim."""
    shape = x.shape
    y = x.reshape(-1, block)
    h = 1
    while h < block:
        y = y.reshape(-1, block // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return (y.reshape(shape) * (1.0 / math.sqrt(block)))


def pack_bitplanes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (< 2**bits) to ``bits`` bit-planes of ``ceil(n/8)`` bytes each."""
    c = codes.reshape(-1).to(torch.uint8)
    n = c.numel()
    pad = (-n) % 8
    if pad:
        c = torch.cat([c, c.new_zeros(pad)])
    weights = (2 ** torch.arange(8, dtype=torch.uint8, device=c.device))
    planes = [(((c >> j) & 1).reshape(-1, 8) * weights).sum(1, dtype=torch.uint8) for j in range(bits)]
    return torch.cat(planes)


def unpack_bitplanes(buf: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_bitplanes`: ``n`` codes (uint8) from ``bits`` planes."""
    nb = (n + 7) // 8
    if buf.numel() != nb * bits:
        raise ValueError(f"expected {nb * bits} bit-plane bytes for {n} {bits}-bit codes, got {buf.numel()}")
    shifts = torch.arange(8, dtype=torch.uint8, device=buf.device)
    out = torch.zeros(nb * 8, dtype=torch.uint8, device=buf.device)
    for j in range(bits):
        plane = ((buf[j * nb:(j + 1) * nb].unsqueeze(1) >> shifts) & 1).reshape(-1)
        out |= plane << j
    return out[:n]
