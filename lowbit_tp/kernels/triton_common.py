"""Triton device functions shared by the codec kernels: exact rounding and bit conversions.

Every function here is written with operations that round the same way on a GPU and in
Triton's numpy interpreter (IEEE add/sub/mul, ``floor``, comparisons, integer bit ops,
``div_rn``), so the kernels that use them match the eager PyTorch reference bit for bit.
No ``libdevice`` (the interpreter cannot run it) and no fast-math division.
"""
import triton
import triton.language as tl

# Launch options for every codec kernel: no fused multiply-add on the GPU, because the
# reference rounds every product and every sum separately.
FP_OPTIONS = {"enable_fp_fusion": False}


@triton.jit
def is_finite(x):
    """True where ``x`` is neither NaN nor +-Inf."""
    return tl.abs(x) < float("inf")


@triton.jit
def flag_if(flag_ptr, cond):
    """Set the int32 ``flag_ptr[0]`` to 1 where ``cond`` holds (benign same-value race)."""
    tl.store(flag_ptr + tl.zeros(cond.shape, dtype=tl.int32), tl.full(cond.shape, 1, tl.int32), mask=cond)


@triton.jit
def clamp_keep_nan(y, lo, hi):
    """``torch.clamp(y, lo, hi)``: NaN stays NaN (``tl.minimum``/``maximum`` leave it unspecified)."""
    return tl.where(y < lo, lo, tl.where(y > hi, hi, y))


@triton.jit
def saturate(x, lim):
    """Finite values clamped to ``[-lim, lim]``; NaN/Inf unchanged (the codecs' propagate mode)."""
    return tl.where(is_finite(x), clamp_keep_nan(x, -lim, lim), x)


@triton.jit
def round_half_even(y):
    """``torch.round`` (ties to even) of finite fp32 ``y`` with ``|y| < 2**22``, from exact ops.

    ``y - floor(y)`` is exact in fp32, and so are ``f * 0.5`` and ``f + 1`` in that range, so
    no step depends on the device's rounding of an intermediate.
    """
    f = tl.floor(y)
    d = y - f
    h = f * 0.5
    odd = (h - tl.floor(h)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def bf16_bits(x):
    """fp32 -> bfloat16 bit pattern (int32 in [0, 65535]) exactly as PyTorch's CPU cast does.

    Round to nearest even; every NaN becomes 0xFFFF, what PyTorch's vectorized CPU cast
    writes (its scalar path writes 0x7FC0 and CUDA's cast 0x7FFF, which is why the
    reference's GPU bytes differed from the CPU's for NaN: docs/bench/gpu_check_h200_unfused.md).
    """
    u = x.to(tl.uint32, bitcast=True)
    bias = ((u >> 16) & 1) + 0x7FFF
    r = ((u + bias) >> 16).to(tl.int32)
    return tl.where(x != x, 0xFFFF, r)


@triton.jit
def as_stored(v, ptr):
    """fp32 ``v`` in the element type of ``ptr``, for a decode written straight into a bf16 result:
    rounded to nearest even on the bits (:func:`bf16_bits`, bitwise PyTorch's cast; a NaN stays
    a NaN). An fp32 ``ptr`` takes ``v`` as it is. (Not the store's implicit cast: the interpreter
    truncates there, so only this one is tested bitwise on the CPU.)"""
    if ptr.dtype.element_ty == tl.bfloat16:
        return bf16_bits(v).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v


@triton.jit
def bf16_from_bits(b):
    """bfloat16 bit pattern (any int type, low 16 bits used) -> fp32, exactly."""
    return ((b.to(tl.uint32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)


@triton.jit
def fp16_bits(x):
    """fp32 -> fp16 bit pattern (int32 in [0, 65535]), round to nearest even like ``Tensor.half()``."""
    return x.to(tl.float16, fp_downcast_rounding="rtne").to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def fp16_from_bits(b):
    """fp16 bit pattern (int, low 16 bits used) -> fp32, exactly."""
    return (b & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def load_u16(ptr, offs, mask):
    """A little-endian 16-bit word at byte offsets ``offs`` (any alignment) of a uint8 buffer."""
    lo = tl.load(ptr + offs, mask=mask, other=0).to(tl.int32)
    hi = tl.load(ptr + offs + 1, mask=mask, other=0).to(tl.int32)
    return lo | (hi << 8)


@triton.jit
def store_u16(ptr, offs, bits, mask):
    """Store the low 16 bits of ``bits`` little-endian at byte offsets ``offs`` of a uint8 buffer."""
    tl.store(ptr + offs, (bits & 0xFF).to(tl.uint8), mask=mask)
    tl.store(ptr + offs + 1, ((bits >> 8) & 0xFF).to(tl.uint8), mask=mask)


@triton.jit
def int4_from_nibble(byte, high):
    """Sign-extended int4 code (int32) from the low (``high`` false) or high nibble of ``byte``."""
    b = byte.to(tl.int32)
    nib = tl.where(high, b >> 4, b) & 0xF
    return tl.where(nib >= 8, nib - 16, nib)


# Magic constant of rounding by one add: ``y + 1.5 * 2**23`` (|y| < 2**22) is an fp32 in
# [2**23, 2**24), spacing 1, so the add itself rounds ``y`` half to even and the low bits of its
# bit pattern are that integer in two's complement (the fast encoders read them directly, without
# the subtract and the float-to-int conversion of round_to_int_small).
RINT_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def round_to_int_small(y):
    """The integer ``torch.round(y)`` (ties to even) as fp32 for ``|y| <= 2**22`` (or NaN), in two
    exact IEEE operations: adding ``1.5 * 2**23`` leaves no fraction bits, so the add itself
    rounds half to even. Only for results cast to an integer: where ``torch.round`` gives
    ``-0.0`` (``-0.5 <= y <= -0.0``) this gives ``+0.0``."""
    return (y + RINT_MAGIC) - RINT_MAGIC


@triton.jit
def flag_any(flag_ptr, cond):
    """Set the int32 ``flag_ptr[0]`` to 1 if ``cond`` holds anywhere in the tile: one reduction
    and one store per program instead of a masked store per element (benign same-value race)."""
    hit = tl.max(tl.reshape(cond, [cond.numel]).to(tl.int32), axis=0)
    tl.store(flag_ptr, hit, mask=hit > 0)


@triton.jit
def saturate_minmax(x, lim):
    """:func:`saturate` (finite values clamped to ``[-lim, lim]``, NaN/Inf unchanged) from
    min/max: same bits (max(-0, -lim) = -0), fewer instructions; the min/max of a non-finite
    value is discarded."""
    return tl.where(is_finite(x), tl.minimum(tl.maximum(x, -lim), lim), x)


@triton.jit
def chunk_bases(src, dst_ptr, SRC_STRIDE, DST_STRIDE, CHUNKED: tl.constexpr):
    """Two-shot's batched launches: with ``CHUNKED``, grid axis 2 is a row chunk, and ``src[0]``
    and ``dst_ptr`` move on by ``SRC_STRIDE`` / ``DST_STRIDE`` elements per chunk (chunk ``j``'s
    payload starts at ``j * payload_nbytes(chunk)``, its rows at ``j * rows * E``); the kernel
    then works on the chunk exactly as on one message (``src`` holds one pointer). Without it
    both are returned unchanged, so the one-message kernels compile as before."""
    if CHUNKED:
        j = tl.program_id(2)
        return (src[0] + j * SRC_STRIDE,), dst_ptr + j * DST_STRIDE
    else:
        return src, dst_ptr


@triton.jit
def payload_at(payloads, r, N: tl.constexpr):
    """``payloads[r]`` for a run-time ``r`` (a tuple takes constexpr indices only): a chain of
    ``N - 1`` scalar selects, uniform over the program; for decode-and-sum loops over sources."""
    p = payloads[0]
    for j in tl.static_range(1, N):
        p = tl.where(r == j, payloads[j], p)
    return p


# Two-shot's owner stage of the static and rot-* codecs (each module's REDUCE_VARIANT): "fused"
# runs the module's reduce_encode kernel, "split" the decode-and-sum then the encode.
REDUCE_VARIANTS = ("fused", "split")


def reduce_fused(variant: str) -> bool:
    """Whether an owner stage set to ``variant`` runs the fused kernel; an unknown name is an error."""
    if variant not in REDUCE_VARIANTS:
        raise ValueError(f"REDUCE_VARIANT must be one of {REDUCE_VARIANTS}, got {variant!r}")
    return variant == "fused"
