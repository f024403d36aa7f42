"""Triton kernels of the dynamic group codecs ``int4-g32`` / ``int4-g128`` and ``mxfp4``.

Bitwise the same payloads and sums as :class:`lowbit_tp.codecs.dynamic.GroupInt4Codec`:
``[ packed int4 of T*E | T*G fp16 scales ]``, scale = fp16(group absmax / 7), codes =
round-half-even(x / scale) with an IEEE division. Two-shot's reduce-and-re-encode is the
encoder reading the decoded sum of N payloads instead of a partial. The encoder packs a token's codes in
pairs, so it needs an even E (the codec falls back to the reference otherwise); the
decoder reads any shape. Error feedback's encode (:func:`encode_feedback`,
:func:`mx_encode_feedback`) is the encoder with the carry added and the payload decoded in
registers into the next carry, one kernel (even E).
"""
import torch
import triton
import triton.language as tl

from lowbit_tp.kernels.triton_common import (FP_OPTIONS, as_stored, chunk_bases, flag_any, flag_if, fp16_bits,
                                             fp16_from_bits, RINT_MAGIC, int4_from_nibble, is_finite, load_u16,
                                             round_to_int_small, store_u16)

_FP16_MAX = tl.constexpr(65504.0)


# ---------------------------------------------------------------- tiled kernels (even E)
def tile_config(tokens: int, hidden: int, group: int, values: int = 4096) -> tuple[int, int, int]:
    """(rows per tile, groups per tile, warps) of the tiled kernels; the bytes do not depend on it.

    A tile is ``rows x (groups * group)`` values, whole groups along E (each program works out
    its own scales), up to 1024 columns and ``values`` values at 4 warps: 4096 for decode-and-sum
    (16 payload bytes a thread), 2048 for the encoders (whose IEEE divisions need registers:
    ptxas sm_90a 63 registers at 2048, 104 at 4096), so a prefill-sized message has thousands of
    programs and a decode-sized one still spreads over the SMs.
    """
    cols = min(triton.next_power_of_2(max(hidden, group)), 1024)
    ngt = max(1, cols // group)
    rows = max(1, min(triton.next_power_of_2(tokens), values // (ngt * group)))
    return rows, ngt, 4


@triton.jit
def _tile_index(T, EH, BT: tl.constexpr, NGT: tl.constexpr, GROUP: tl.constexpr):
    """Row, group and half-group vectors of this program's tile, the payload byte index of each
    code pair ``[NGT, H]`` (row-relative) and the masks of the rows and of the pairs.

    Masks are written on the byte index (``< EH = E / 2``), contiguous along the tile, so that
    the compiler can prove them constant over a vector and load/store 16 bytes at a time."""
    H: tl.constexpr = GROUP // 2
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    g = tl.program_id(1) * NGT + tl.arange(0, NGT)
    j = tl.arange(0, H)
    bi = g[:, None] * H + j[None, :]
    mt = t < T
    return t, g, bi, mt, mt[:, None, None] & (bi < EH)[None, :, :]


@triton.jit
def _nibbles(byte):
    """Sign-extended low and high int4 codes (int32) of a byte tile."""
    b = byte.to(tl.int32)
    return (b << 28) >> 28, (b << 24) >> 28


@triton.jit
def _tile_sum(payloads, t, g, bi, mt, m, EH, G, NQ, N: tl.constexpr, GROUP: tl.constexpr):
    """``sum_r decode(payloads[r])`` over a tile, as the even and odd columns ``[BT, NGT, H]``."""
    boff = t[:, None, None] * EH + bi[None, :, :]
    soff = NQ + 2 * (t[:, None] * G + g[None, :])
    ms = mt[:, None] & (g < G)[None, :]
    for r in tl.static_range(N):
        p = payloads[r]
        lo, hi = _nibbles(tl.load(p + boff, mask=m, other=0))
        s = fp16_from_bits(load_u16(p, soff, ms))[:, :, None]
        vl = tl.where(lo == -8, float("nan"), lo.to(tl.float32)) * s
        vh = tl.where(hi == -8, float("nan"), hi.to(tl.float32)) * s
        if r == 0:
            acc_l = vl
            acc_h = vh
        else:
            acc_l = acc_l + vl
            acc_h = acc_h + vh
    return acc_l, acc_h


@triton.jit
def _minus(v, minus_ptr, o, m):
    """Error feedback's epilogue: ``minus[o] - v`` in fp32 (``minus`` any float dtype, widened
    exactly), +0.0 where not finite: ``collectives.feedback.feedback_of(minus, v)``."""
    diff = tl.load(minus_ptr + o, mask=m, other=0.0).to(tl.float32) - v
    return tl.where(is_finite(diff), diff, 0.0)


@triton.jit
def _feedback_of(sent, v):
    """Error feedback's next carry of one value in registers: ``sent - v`` in fp32 (``sent`` fp32,
    ``v`` its decode), +0.0 where not finite: :func:`_minus` without the load."""
    diff = sent - v
    return tl.where(is_finite(diff), diff, 0.0)


@triton.jit
def _store_pairs(out_ptr, t, g, mt, E, lo, hi, BT: tl.constexpr, NGT: tl.constexpr, GROUP: tl.constexpr,
                 minus_ptr=0, MINUS: tl.constexpr = False):
    """Store even/odd column tiles ``[BT, NGT, H]`` interleaved as fp32 rows of ``out [T, E]``;
    ``MINUS``: ``minus - value`` instead (:func:`_minus`, ``minus [T, E]``)."""
    v = tl.reshape(tl.join(lo, hi), [BT, NGT * GROUP])
    c = tl.program_id(1) * (NGT * GROUP) + tl.arange(0, NGT * GROUP)
    o = t[:, None] * E + c[None, :]
    m = mt[:, None] & (c < E)[None, :]
    if MINUS:
        v = _minus(v, minus_ptr, o, m)
    tl.store(out_ptr + o, as_stored(v, out_ptr), mask=m)


@triton.jit
def group_decode_sum_tile_kernel(payloads, out_ptr, T, E, EH, G, NQ, N: tl.constexpr, GROUP: tl.constexpr,
                                 BT: tl.constexpr, NGT: tl.constexpr, PS=0, OS=0, CHUNKED: tl.constexpr = False,
                                 minus_ptr=0, MINUS: tl.constexpr = False):
    """``out = sum_r decode(payloads[r])`` in fp32, rank order, for an even E: each payload byte
    is loaded once and split into its two codes, each scale once per tile row. ``CHUNKED``
    (``N == 1``): grid axis 2 is a two-shot chunk, its payload at ``+ PS`` bytes and its
    ``[T, E]`` rows of ``out`` at ``+ OS`` values per chunk (:func:`chunk_bases`). ``MINUS``
    (error feedback, one message): ``out = minus - sum``, +0.0 where not finite."""
    payloads, out_ptr = chunk_bases(payloads, out_ptr, PS, OS, CHUNKED)
    t, g, bi, mt, m = _tile_index(T, EH, BT, NGT, GROUP)
    lo, hi = _tile_sum(payloads, t, g, bi, mt, m, EH, G, NQ, N, GROUP)
    _store_pairs(out_ptr, t, g, mt, E, lo, hi, BT, NGT, GROUP, minus_ptr, MINUS)


@triton.jit
def _load_pairs(src_ptr, t, mt, E, BT: tl.constexpr, NGT: tl.constexpr, GROUP: tl.constexpr,
                EVEN: tl.constexpr = False):
    """fp32 even and odd columns ``[BT, NGT, H]`` of this tile of ``src [T, E]`` (zeros outside);
    ``EVEN``: the launcher knows the tile lies inside ``src`` (no mask)."""
    H: tl.constexpr = GROUP // 2
    c = tl.program_id(1) * (NGT * GROUP) + tl.arange(0, NGT * GROUP)
    if EVEN:
        x = tl.load(src_ptr + t[:, None] * E + c[None, :])
    else:
        x = tl.load(src_ptr + t[:, None] * E + c[None, :], mask=mt[:, None] & (c < E)[None, :], other=0.0)
    return tl.split(tl.reshape(x.to(tl.float32), [BT, NGT, H, 2]))


@triton.jit
def _store_full_tile(out_ptr, t, EH, byte, BT: tl.constexpr, NGT: tl.constexpr, H: tl.constexpr):
    """Store a full tile's payload bytes ``[BT, NGT, H]`` (rows ``t`` of ``EH`` bytes, ``EH`` even: the
    launcher's ``EVEN``) as 16-bit words: a thread's two adjacent bytes are joined in registers,
    so the layout change before the store moves half as many elements (a byte store tile was
    converted through shared memory one 16-bit half at a time)."""
    lo, hi = tl.split(tl.reshape(byte, [BT, NGT, H // 2, 2]))
    w = (lo.to(tl.int32) | (hi.to(tl.int32) << 8)).to(tl.int16)
    wi = (tl.program_id(1) * NGT + tl.arange(0, NGT))[:, None] * (H // 2) + tl.arange(0, H // 2)[None, :]
    tl.store(out_ptr.to(tl.pointer_type(tl.int16)) + t[:, None, None] * (EH // 2) + wi[None, :, :], w)



@triton.jit
def _feedback_asserts(N: tl.constexpr, CHUNKED: tl.constexpr, CARRY: tl.constexpr, FEEDBACK: tl.constexpr):
    """The encoders' error-feedback constexprs that make sense, as compile errors: feedback is
    fused for one message's encode only. The carry and ``next`` have no chunk offset and the
    reduce (``N > 0``) never reads the carry, so either would drop it silently; a ``CARRY``
    without ``FEEDBACK`` would add the carry and never write ``next``."""
    tl.static_assert(N == 0 or not (CARRY or FEEDBACK),
                     "error feedback is fused into one message's encode (N == 0), not the reduce")
    tl.static_assert(not CHUNKED or not (CARRY or FEEDBACK),
                     "error feedback is fused for one message (the carry has no chunk offset)")
    tl.static_assert(FEEDBACK or not CARRY, "CARRY needs FEEDBACK (else next is never written)")


@triton.jit
def group_encode_kernel(src, out_ptr, flag_ptr, range_ptr, T, E, EH, G, NQ, max_in, N: tl.constexpr,
                        BT: tl.constexpr, NGT: tl.constexpr, GROUP: tl.constexpr, FLAG: tl.constexpr,
                        RANGE: tl.constexpr, XS=0, PS=0, CHUNKED: tl.constexpr = False, FAST: tl.constexpr = False,
                        EVEN: tl.constexpr = False, S16: tl.constexpr = False, carry_ptr=0, next_ptr=0,
                        CARRY: tl.constexpr = False, FEEDBACK: tl.constexpr = False):
    """Encode ``src[0]`` (``N == 0``, a partial ``[T, E]``, E even) or the decoded sum of the ``N``
    payloads in ``src`` (two-shot's reduce and re-encode in one pass), one tile of whole groups
    per program. Works on the even and odd columns apart, so a byte's two codes meet in one thread.
    ``CHUNKED`` (``N == 0``): grid axis 2 is a two-shot chunk of ``T`` rows, its input at ``+ XS``
    values and its payload at ``+ PS`` bytes per chunk. ``FAST``: :func:`_group_fast` first, this
    code only for the tiles it cannot take (same bytes). ``EVEN``: every tile lies inside the
    message (``T % BT == 0``, ``E % (NGT * GROUP) == 0``): no masks. ``S16``: ``NQ`` is even (so
    is every chunk's payload size), each fp16 scale is one aligned 16-bit store. ``CARRY`` /
    ``FEEDBACK`` (``N == 0``, one message): error feedback fused in (:func:`encode_feedback`):
    the partial plus the fp32 ``carry [T, E]`` is encoded, and ``next [T, E]`` gets what its
    decode lost, the codes and scales just written decoded in registers (:func:`_feedback_of`)."""
    H: tl.constexpr = GROUP // 2
    _feedback_asserts(N, CHUNKED, CARRY, FEEDBACK)
    src, out_ptr = chunk_bases(src, out_ptr, XS, PS, CHUNKED)
    t, g, bi, mt, m = _tile_index(T, EH, BT, NGT, GROUP)
    if N == 0:
        xl, xh = _load_pairs(src[0], t, mt, E, BT, NGT, GROUP, EVEN)
        if CARRY:  # collectives.feedback.compensate: the partial widened exactly, one fp32 add
            cl, ch = _load_pairs(carry_ptr, t, mt, E, BT, NGT, GROUP, EVEN)
            xl = xl + cl
            xh = xh + ch
    else:
        xl, xh = _tile_sum(src, t, g, bi, mt, m, EH, G, NQ, N, GROUP)
        xl = tl.where(m, xl, 0.0)
        xh = tl.where(m, xh, 0.0)
    if FAST:
        fast, byte, sbits, amax = _group_fast(xl, xh, max_in, BT, NGT, H)
        if fast:
            if RANGE:  # every value is finite: the range flag is the groups' absmax against max_in
                flag_any(range_ptr, amax > max_in)
        else:
            byte, sbits = _group_codes(xl, xh, m, flag_ptr, range_ptr, max_in, BT, NGT, H, FLAG, RANGE)
    else:
        byte, sbits = _group_codes(xl, xh, m, flag_ptr, range_ptr, max_in, BT, NGT, H, FLAG, RANGE)
    if EVEN:
        _store_full_tile(out_ptr, t, EH, byte, BT, NGT, H)
    else:
        tl.store(out_ptr + t[:, None, None] * EH + bi[None, :, :], byte, mask=m)
    ms = None if EVEN else mt[:, None] & (g < G)[None, :]
    if S16:  # the scales start at an even byte: one 16-bit store each
        tl.store((out_ptr + NQ).to(tl.pointer_type(tl.int16)) + (t[:, None] * G + g[None, :]), sbits.to(tl.int16),
                 mask=ms)
    else:
        store_u16(out_ptr, NQ + 2 * (t[:, None] * G + g[None, :]), sbits, ms)
    if FEEDBACK:  # the decoder's arithmetic (_tile_sum) on the bytes and scale just stored
        lo, hi = _nibbles(byte)
        s = fp16_from_bits(sbits)[:, :, None]
        dl = _feedback_of(xl, tl.where(lo == -8, float("nan"), lo.to(tl.float32)) * s)
        dh = _feedback_of(xh, tl.where(hi == -8, float("nan"), hi.to(tl.float32)) * s)
        _store_pairs(next_ptr, t, g, mt, E, dl, dh, BT, NGT, GROUP)


@triton.jit
def _group_codes(xl, xh, m, flag_ptr, range_ptr, max_in, BT: tl.constexpr, NGT: tl.constexpr, H: tl.constexpr,
                 FLAG: tl.constexpr, RANGE: tl.constexpr):
    """Payload bytes ``[BT, NGT, H]`` and fp16 scale bits ``[BT, NGT]`` of a tile's even and odd
    columns, any values (NaN/Inf, beyond max_in, subnormal scales); sets the flags."""
    if FLAG:
        flag_if(flag_ptr, m & ~(is_finite(xl) & is_finite(xh)))
    if RANGE:
        flag_if(range_ptr, m & ((is_finite(xl) & (tl.abs(xl) > max_in)) | (is_finite(xh) & (tl.abs(xh) > max_in))))
    # Finite values saturate at +-max_in (the reference's saturate); a NaN/Inf's code is -8 and
    # it adds 0 to the group's absmax, so what the min/max make of it is thrown away.
    fl = is_finite(xl)
    fh = is_finite(xh)
    sl = tl.minimum(tl.maximum(xl, -max_in), max_in)
    sh = tl.minimum(tl.maximum(xh, -max_in), max_in)
    amax = tl.max(tl.maximum(tl.where(fl, tl.abs(sl), 0.0), tl.where(fh, tl.abs(sh), 0.0)), axis=2)
    s = tl.math.div_rn(amax, tl.full([BT, NGT], 7.0, tl.float32))
    sbits = fp16_bits(tl.where(s > _FP16_MAX, _FP16_MAX, s))
    s32 = fp16_from_bits(sbits)
    s32 = tl.broadcast_to(tl.where(s32 == 0.0, 1.0, s32)[:, :, None], [BT, NGT, H])
    ql = tl.where(fl, _code(sl, s32), -8)
    qh = tl.where(fh, _code(sh, s32), -8)
    byte = ((ql & 0xF) | ((qh & 0xF) << 4)).to(tl.uint8)
    return byte, sbits


@triton.jit
def _max_nan(a, b):
    """``max(a, b)``, NaN if either is (the reductions' default drops NaN on a GPU, keeps it in numpy)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _absmax_nan(xl, xh):
    """Group absmax ``[BT, NGT]`` of even/odd column tiles: NaN where a group holds a NaN, Inf
    where it holds an Inf and no NaN, on a GPU and in the interpreter alike."""
    return tl.reduce(_max_nan(tl.abs(xl), tl.abs(xh)), 2, _max_nan)


# Largest |rint distance| of the fast path's quotient estimate that still proves the rounding:
# the estimate ``x * RN(1/s)`` is within ``2**-23 * |x / s| <= 7.25 * 2**-23 < 2**-20`` of ``x / s``.
_FAST_DIST = tl.constexpr(0.5 - 2.0 ** -20)


@triton.jit
def _group_fast(xl, xh, max_in, BT: tl.constexpr, NGT: tl.constexpr, H: tl.constexpr):
    """The common tile, in fewer instructions: ``(fast, bytes, scale bits, absmax)``, the bytes
    and scale bits those of :func:`_group_codes` wherever the scalar ``fast`` holds.

    ``fast``: every value of the tile is finite, every group's ``absmax <= 7.25 * s`` (``s`` its
    fp16 scale, 1 for 0; the product is exact, 16 significant bits) and no value lies within
    ``2**-20`` of a rounding boundary. Then, per group: the reference's absmax of the
    saturated values is ``min(absmax, max_in)`` (one min per group, not a clamp per value);
    every quotient ``|x / s| <= 7.25`` rounds into [-7, 7] with no clamp (a value beyond max_in
    has ``x / 65504`` in (7, 7.25], code 7 like its saturated ``max_in / 65504 = 7``); no value
    takes the NaN code. The code of ``x`` is ``round_half_even(RN(x / s))``, which equals
    ``rint(p)`` for the estimate ``p = RN(x * RN(1 / s))`` (one multiply instead of an IEEE
    division per value): ``|p - x / s| <= 2**-23 * 7.25 < 2**-20``, so where ``p`` is farther than
    ``2**-20`` from a half-integer, ``x / s`` lies strictly between the same two half-integers,
    and so does ``RN(x / s)`` (``RN(x / s)`` is a half-integer ``m`` only where ``x == m * s``:
    ``m * s`` is exact, and any other ``x`` is an ulp of ``x`` away, more than half an ulp of ``m``
    in quotient terms). ``rint(p)`` is one magic add, and ``p - rint(p)`` is exact.
    Not fast (the caller recomputes the tile): an fp16-subnormal scale that rounded down by
    more than 3.5% (absmax below ~4.3e-4), NaN/Inf anywhere in the tile, or a quotient within
    ``2**-20`` of a tie (about 2e-6 of uniformly spread values; exact ties always)."""
    amax = _absmax_nan(xl, xh)
    s = tl.math.div_rn(tl.minimum(amax, max_in), tl.full([BT, NGT], 7.0, tl.float32))
    sbits = fp16_bits(tl.where(s > _FP16_MAX, _FP16_MAX, s))
    s32 = fp16_from_bits(sbits)
    s32 = tl.where(s32 == 0.0, 1.0, s32)
    r = tl.broadcast_to(tl.math.div_rn(tl.full([BT, NGT], 1.0, tl.float32), s32)[:, :, None], [BT, NGT, H])
    pl = xl * r
    ph = xh * r
    bl = pl + RINT_MAGIC
    bh = ph + RINT_MAGIC
    dist = tl.max(tl.maximum(tl.abs(pl - (bl - RINT_MAGIC)), tl.abs(ph - (bh - RINT_MAGIC))), axis=2)
    ok = (amax <= 7.25 * s32) & (dist <= _FAST_DIST)  # False for a NaN/Inf absmax
    fast = tl.min(tl.reshape(ok.to(tl.int32), [BT * NGT]), axis=0) != 0
    byte = ((bh.to(tl.int32, bitcast=True) << 4) | (bl.to(tl.int32, bitcast=True) & 0xF)).to(tl.uint8)
    return fast, byte, sbits, amax


@triton.jit
def _code(x, s):
    """int4 code (int32) of a finite saturated ``x`` at scale ``s > 0``: round-half-even of the IEEE
    quotient clamped to [-7, 7] (the quotient is finite, so min/max clamp it like the reference)."""
    return round_to_int_small(tl.minimum(tl.maximum(tl.math.div_rn(x, s), -7.0), 7.0)).to(tl.int32)


# ---------------------------------------------------------------- flat decode (odd E: a row starts mid-byte)
@triton.jit
def _sum_at(payloads, t, e, m, T, E, G, NQ, N: tl.constexpr, GROUP: tl.constexpr):
    """``sum_r decode(payloads[r])[t, e]`` in fp32, rank order, for index tensors ``t``, ``e``."""
    o = t * E + e
    acc = tl.zeros(o.shape, dtype=tl.float32)
    for r in tl.static_range(N):
        p = payloads[r]
        q = int4_from_nibble(tl.load(p + o // 2, mask=m, other=0), (o & 1) == 1)
        s = fp16_from_bits(load_u16(p, NQ + 2 * (t * G + e // GROUP), m))
        v = tl.where(q == -8, float("nan"), q.to(tl.float32)) * s
        if r == 0:
            acc = v
        else:
            acc = acc + v
    return acc


@triton.jit
def group_decode_sum_kernel(payloads, out_ptr, T, E, G, NQ, N: tl.constexpr, GROUP: tl.constexpr,
                            BLOCK: tl.constexpr, minus_ptr=0, MINUS: tl.constexpr = False):
    """``out = sum_r decode(payloads[r])`` in fp32, rank order; flat over ``T*E`` (any E);
    ``MINUS`` as :func:`group_decode_sum_tile_kernel`'s."""
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < T * E
    v = _sum_at(payloads, o // E, o % E, m, T, E, G, NQ, N, GROUP)
    if MINUS:
        v = _minus(v, minus_ptr, o, m)
    tl.store(out_ptr + o, as_stored(v, out_ptr), mask=m)


# ---------------------------------------------------------------- launchers (no codec logic)
def _tile_grid(t: int, e: int, group: int, values: int = 4096):
    rows, ngt, warps = tile_config(t, e, group, values)
    return (triton.cdiv(t, rows), triton.cdiv(triton.cdiv(e, group), ngt)), rows, ngt, warps


# Which encoder the launchers run (each launcher also takes ``variant=``); every variant writes
# the same bytes. "ref": one code path for every tile (masked loads and stores, per-value
# saturation, clamps and NaN selects, an IEEE division per value), as measured in GPU run 1.
# "fast": a fast path for the common tile (:func:`_group_fast`, :func:`_mx_fast`), the
# reference path kept for the others, no masks where the launcher knows every tile is full;
# "fast4k": the same on tiles of 4096 values instead of 2048 (the per-tile reductions and
# layout changes amortized over twice the values). scripts/sweep_group.py times them.
ENCODE_VARIANTS = {"ref": (2048, False), "fast": (2048, True), "fast4k": (4096, True)}  # (tile values, fast path)
# Defaults from stop 21's kernel sweep (one H200, scripts/sweep_group.py, CUDA-graph kernel time, docs/kernels.md):
# int4-g32/g128 encode "fast" 23.3/81.1 us at [2048|8192, 8192] (fast4k 25.5/83.3, ref 29.2/106.6),
# reduce_encode 41.7 us (fast4k 46.0); mxfp4 encode fast4k 21.4/73.6 us (fast 21.7/74.2, ref
# 30.5/110.2), reduce_encode 34.7 us (fast 37.2, ref 42.6).
ENCODE_VARIANT = "fast"  # int4-g32 / int4-g128 (encode, encode_chunks, reduce_encode)
MX_ENCODE_VARIANT = "fast4k"  # mxfp4 (mx_encode, mx_encode_chunks, mx_reduce_encode)


def _variant(variant) -> tuple[int, bool]:
    """(tile values, fast path) of an encoder ``variant`` (None: ``ENCODE_VARIANT``; the mxfp4
    launcher passes ``MX_ENCODE_VARIANT`` for None)."""
    variant = ENCODE_VARIANT if variant is None else variant
    if variant not in ENCODE_VARIANTS:
        raise ValueError(f"unknown encoder variant {variant!r}; one of {sorted(ENCODE_VARIANTS)}")
    return ENCODE_VARIANTS[variant]


def _variant_consts(variant, t: int, e: int, rows: int, cols: int, n_sources: int, even_out: bool = True) -> dict:
    """The kernel constexprs of an encoder ``variant`` for ``[t, e]`` in tiles of ``rows x cols``;
    ``even_out``: every payload (each chunk's) starts at an even address (the 16-bit stores)."""
    if not _variant(variant)[1]:
        return {}
    return {"FAST": True, "EVEN": even_out and n_sources == 0 and t % rows == 0 and e % cols == 0}


def _group_consts(variant, t: int, e: int, rows: int, cols: int, n_sources: int, even_out: bool = True) -> dict:
    """:func:`_variant_consts` plus the int4 encoder's ``S16`` (its fp16 scales start at an even byte)."""
    consts = _variant_consts(variant, t, e, rows, cols, n_sources, even_out)
    if consts:
        consts["S16"] = even_out and (t * e) % 4 == 0
    return consts


def _even_out(out, chunks: int) -> bool:
    """Whether every one of the ``chunks`` payloads in ``out`` starts at an even address."""
    return out.data_ptr() % 2 == 0 and (chunks == 1 or (out.numel() // chunks) % 2 == 0)


def _feedback_consts(feedback, chunks: int) -> dict:
    """The encoders' error-feedback arguments: none without ``feedback``, else ``(carry or None,
    next)`` of one message (``CARRY``/``FEEDBACK``; the carry's pointer is ``next``'s when None)."""
    if feedback is None:
        return {}
    assert chunks == 1, "error feedback is fused for one message (the carry has no chunk offset)"
    carry, nxt = feedback
    return {"carry_ptr": nxt if carry is None else carry, "next_ptr": nxt, "CARRY": carry is not None,
            "FEEDBACK": True}


def _launch_encode(src, n_sources, out, t, e, *, group, max_input, flag, range_flag, chunks=1, variant=None,
                   feedback=None):
    """``t`` rows per chunk; ``chunks > 1``: ``src[0]`` holds ``chunks * t`` rows and ``out``
    the ``chunks`` payloads one after another. ``feedback``: ``(carry or None, next)``
    (:func:`encode_feedback`)."""
    if t == 0:
        return out
    grid, rows, ngt, warps = _tile_grid(t, e, group, _variant(variant)[0])
    dummy = out
    extra = {} if chunks == 1 else {"XS": t * e, "PS": out.numel() // chunks, "CHUNKED": True}
    extra.update(_feedback_consts(feedback, chunks))
    # 16-bit stores pair a group's bytes: a group of 2 (one byte) has none to pair
    extra.update(_group_consts(variant, t, e, rows, ngt * group, n_sources,
                               _even_out(out, chunks) and group % 4 == 0))
    group_encode_kernel[grid + ((chunks,) if chunks > 1 else ())](
        tuple(src), out, dummy if flag is None else flag, dummy if range_flag is None else range_flag, t, e, e // 2,
        triton.cdiv(e, group), (t * e + 1) // 2, max_input, N=n_sources, BT=rows, NGT=ngt, GROUP=group,
        FLAG=flag is not None, RANGE=range_flag is not None, num_warps=warps, **extra, **FP_OPTIONS)
    return out


def encode(x, out, *, group: int, max_input: float, flag=None, range_flag=None, variant=None):
    """Fill the payload ``out`` from ``x [T, E]`` (E even); ``flag``/``range_flag`` as the static encoder's."""
    t, e = x.shape
    return _launch_encode([x], 0, out, t, e, group=group, max_input=max_input, flag=flag, range_flag=range_flag,
                          variant=variant)


def _check_feedback(x, carry, nxt) -> None:
    """The one-message tensors :func:`encode_feedback` takes (asserted: the codec checks them first)."""
    t, e = x.shape
    assert e % 2 == 0 and x.is_contiguous(), "the tiled encoders take a contiguous [T, E] with E even"
    assert (nxt.dtype == torch.float32 and nxt.is_contiguous() and nxt.shape == x.shape
            and nxt.device == x.device), "next: a contiguous fp32 [T, E] buffer"
    assert carry is None or (carry.dtype == torch.float32 and carry.is_contiguous() and carry.shape == x.shape
                             and carry.device == x.device), "carry: a contiguous fp32 [T, E] tensor"


def encode_feedback(x, carry, out, nxt, *, group: int, max_input: float, flag=None, range_flag=None, variant=None):
    """Error feedback fused into the encoder (E even): ``out`` gets :func:`encode` of ``x + carry``
    (fp32; ``carry`` None: of ``x``) and ``nxt [T, E]`` fp32 what its decode lost, ``sent -
    decode`` with +0.0 where not finite (what ``decode_sum(..., minus=sent)`` writes), the codes
    and scales decoded in registers: one read of ``x`` and ``carry``, one write of the payload
    and of ``nxt``, where the carry add, the encode and the decode with its difference took
    three launches. ``nxt`` may be the carry itself (each program reads an element before it
    writes it), not a buffer that overlaps it at an offset.
    Returns ``(out, nxt)``."""
    _check_feedback(x, carry, nxt)
    t, e = x.shape
    if t * e:
        _launch_encode([x], 0, out, t, e, group=group, max_input=max_input, flag=flag, range_flag=range_flag,
                       variant=variant, feedback=(carry, nxt))
    return out, nxt


def encode_chunks(x, out, *, chunks: int, group: int, max_input: float, flag=None, range_flag=None, variant=None):
    """Two-shot's N chunk encodes in one launch: ``out`` (``chunks`` payloads one after another)
    gets ``encode(x[j*R:(j+1)*R])`` at ``j * payload_nbytes([R, E])``, ``R = T / chunks`` (E even)."""
    t, e = x.shape
    return _launch_encode([x], 0, out, t // chunks, e, group=group, max_input=max_input, flag=flag,
                          range_flag=range_flag, chunks=chunks, variant=variant)


def reduce_encode(payloads, out, *, t: int, e: int, group: int, max_input: float, flag=None, range_flag=None,
                  variant=None):
    """Fill ``out`` with encode(sum of the decoded ``payloads``) of a ``[t, e]`` chunk (E even), one pass."""
    return _launch_encode(list(payloads), len(payloads), out, t, e, group=group, max_input=max_input, flag=flag,
                          range_flag=range_flag, variant=variant)


def _launch_decode_chunks(kernel, payload, out, chunks: int, group: int, **consts):
    """One launch of a tiled decode-and-sum ``kernel`` over the ``chunks`` payloads (one after
    another in ``payload``) into ``out [chunks * R, E]`` (E even)."""
    t, e = out.shape
    rows = t // chunks
    if rows * e == 0:
        return out
    grid, bt, ngt, warps = _tile_grid(rows, e, group)
    kernel[grid + (chunks,)](
        (payload,), out, rows, e, e // 2, triton.cdiv(e, group), (rows * e + 1) // 2, N=1, BT=bt, NGT=ngt,
        PS=payload.numel() // chunks, OS=rows * e, CHUNKED=True, num_warps=warps, **consts, **FP_OPTIONS)
    return out


def decode_chunks(payload, out, *, chunks: int, group: int):
    """Two-shot's N chunk decodes in one launch (E even): ``out [chunks * R, E]`` fp32 gets
    ``decode(payload chunk j)`` in rows ``[j*R, (j+1)*R)``; ``payload`` holds the ``chunks``
    payloads of ``[R, E]`` one after another."""
    return _launch_decode_chunks(group_decode_sum_tile_kernel, payload, out, chunks, group, GROUP=group)


def _minus_args(payloads, out, minus) -> dict:
    """The decode kernels' ``MINUS`` arguments: none without ``minus``; else ``minus`` must be one
    message's contiguous float ``[T, E]`` (the kernel reads it at the output's offsets)."""
    if minus is None:
        return {}
    assert (len(payloads) == 1 and minus.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and minus.is_contiguous() and minus.shape == out.shape and minus.device == out.device), \
        "minus: one message's contiguous float [T, E] sent values"
    return {"minus_ptr": minus, "MINUS": True}


def decode_sum(payloads, out, *, group: int, minus=None):
    """Fill ``out [T, E]`` fp32 with the rank-ordered sum of the decoded ``payloads`` (tiled for even E).

    ``minus`` (one payload; float ``[T, E]``, the sent values): ``out`` gets ``minus - decode``
    instead, in fp32, +0.0 where not finite (error feedback's next carry, one pass)."""
    t, e = out.shape
    extra = _minus_args(payloads, out, minus)
    if t * e == 0:
        return out
    g, nq = triton.cdiv(e, group), (t * e + 1) // 2
    if e % 2 == 0:
        grid, rows, ngt, warps = _tile_grid(t, e, group)
        group_decode_sum_tile_kernel[grid](tuple(payloads), out, t, e, e // 2, g, nq, N=len(payloads), GROUP=group,
                                           BT=rows, NGT=ngt, num_warps=warps, **extra, **FP_OPTIONS)
        return out
    block = 1024 if t * e >= 1 << 16 else 256
    group_decode_sum_kernel[(triton.cdiv(t * e, block),)](tuple(payloads), out, t, e, g, nq, N=len(payloads),
                                                          GROUP=group, BLOCK=block, num_warps=4, **extra,
                                                          **FP_OPTIONS)
    return out


# ---------------------------------------------------------------- mxfp4 (OCP MX: E2M1 codes, E8M0 scale per 32)
@triton.jit
def _e2m1_value(c):
    """fp32 value of the E2M1 code ``c`` (0..15, sign in bit 3), as ``E2M1_FLOATS[c]``."""
    mag = c & 7
    v = tl.where(mag < 4, mag.to(tl.float32) * 0.5,
                 tl.where(mag == 7, 6.0, tl.where(mag == 6, 4.0, (mag - 2).to(tl.float32))))
    return (v.to(tl.int32, bitcast=True) | ((c & 8) << 28)).to(tl.float32, bitcast=True)  # -0.0 too (not 0 - v)


@triton.jit
def _e8m0_scale(b):
    """``2**(b - 127)`` for an E8M0 byte ``b`` (0 is the subnormal 2**-127), NaN for 255."""
    s = tl.where(b == 0, 0x400000, b << 23).to(tl.float32, bitcast=True)
    return tl.where(b == 255, float("nan"), s)


@triton.jit
def _mx_sum_at(payloads, t, e, m, E, G, NQ, N: tl.constexpr):
    """``sum_r decode(payloads[r])[t, e]`` of mxfp4 payloads in fp32, rank order."""
    o = t * E + e
    acc = tl.zeros(o.shape, dtype=tl.float32)
    for r in tl.static_range(N):
        p = payloads[r]
        c = (tl.load(p + o // 2, mask=m, other=0).to(tl.int32) >> (4 * (o & 1))) & 0xF
        b = tl.load(p + NQ + t * G + e // 32, mask=m, other=127).to(tl.int32)
        v = _e2m1_value(c) * _e8m0_scale(b)
        if r == 0:
            acc = v
        else:
            acc = acc + v
    return acc


@triton.jit
def _mx_tile_sum(payloads, t, g, bi, mt, m, EH, G, NQ, N: tl.constexpr):
    """``sum_r decode(payloads[r])`` of mxfp4 payloads over a tile, as even and odd columns ``[BT, NGT, 16]``."""
    boff = t[:, None, None] * EH + bi[None, :, :]
    soff = NQ + t[:, None] * G + g[None, :]
    ms = mt[:, None] & (g < G)[None, :]
    for r in tl.static_range(N):
        p = payloads[r]
        b = tl.load(p + boff, mask=m, other=0).to(tl.int32)
        s = _e8m0_scale(tl.load(p + soff, mask=ms, other=127).to(tl.int32))[:, :, None]
        vl = _e2m1_value(b & 0xF) * s
        vh = _e2m1_value(b >> 4) * s
        if r == 0:
            acc_l = vl
            acc_h = vh
        else:
            acc_l = acc_l + vl
            acc_h = acc_h + vh
    return acc_l, acc_h


@triton.jit
def _mx_code(x, inv):
    """E2M1 code (sign in bit 3) of ``x * inv`` (exact: ``inv`` a power of two), rounding half to even
    within each range; a NaN's code is 0 (what PyTorch's CPU cast of NaN to uint8 writes on x86)."""
    y = x * inv
    mag = tl.abs(y)
    mag = tl.where(mag > 6.0, 6.0, mag)  # NaN stays NaN
    fine = round_to_int_small(mag * 2.0)
    mid = round_to_int_small(mag) + 2.0
    top = round_to_int_small(mag * 0.5) + 4.0
    code = tl.where(mag < 2.0, fine, tl.where(mag < 4.0, mid, top))
    return tl.where(mag != mag, 0, code.to(tl.int32)) | ((y < 0.0).to(tl.int32) << 3)


@triton.jit
def mx_encode_kernel(src, out_ptr, flag_ptr, T, E, EH, G, NQ, N: tl.constexpr, BT: tl.constexpr, NGT: tl.constexpr,
                     FLAG: tl.constexpr, XS=0, PS=0, CHUNKED: tl.constexpr = False, FAST: tl.constexpr = False,
                     EVEN: tl.constexpr = False, carry_ptr=0, next_ptr=0, CARRY: tl.constexpr = False,
                     FEEDBACK: tl.constexpr = False):
    """mxfp4-encode ``src[0]`` (``N == 0``) or the decoded sum of the ``N`` mxfp4 payloads in ``src``,
    one tile of whole 32-groups per program, even and odd columns apart.

    Shared exponent ``floor(log2(absmax)) - 2`` from the fp32 exponent bits (what ``frexp``
    gives), ``y = x * 2**-exp`` (exact), E2M1 rounding half to even per range; a group
    holding NaN/Inf gets the E8M0 NaN byte 255. ``CHUNKED`` as :func:`group_encode_kernel`'s;
    ``FAST``: :func:`_mx_fast` first, :func:`_mx_codes` only for tiles holding NaN/Inf (same
    bytes); ``EVEN``: every tile full, no masks. ``CARRY`` / ``FEEDBACK``: error feedback fused in,
    as :func:`group_encode_kernel`'s (:func:`mx_encode_feedback`).
    """
    _feedback_asserts(N, CHUNKED, CARRY, FEEDBACK)
    src, out_ptr = chunk_bases(src, out_ptr, XS, PS, CHUNKED)
    t, g, bi, mt, m = _tile_index(T, EH, BT, NGT, 32)
    if N == 0:
        xl, xh = _load_pairs(src[0], t, mt, E, BT, NGT, 32, EVEN)
        if CARRY:
            cl, ch = _load_pairs(carry_ptr, t, mt, E, BT, NGT, 32, EVEN)
            xl = xl + cl
            xh = xh + ch
    else:
        xl, xh = _mx_tile_sum(src, t, g, bi, mt, m, EH, G, NQ, N)
        xl = tl.where(m, xl, 0.0)
        xh = tl.where(m, xh, 0.0)
    if FAST:
        slow, code, ebyte = _mx_fast(xl, xh, BT, NGT)
        if slow:
            code, ebyte = _mx_codes(xl, xh, m, flag_ptr, BT, NGT, FLAG)
    else:
        code, ebyte = _mx_codes(xl, xh, m, flag_ptr, BT, NGT, FLAG)
    if EVEN:
        _store_full_tile(out_ptr, t, EH, code, BT, NGT, 16)
        tl.store(out_ptr + NQ + t[:, None] * G + g[None, :], ebyte)
    else:
        tl.store(out_ptr + t[:, None, None] * EH + bi[None, :, :], code, mask=m)
        tl.store(out_ptr + NQ + t[:, None] * G + g[None, :], ebyte, mask=mt[:, None] & (g < G)[None, :])
    if FEEDBACK:  # the decoder's arithmetic (_mx_tile_sum) on the bytes just stored
        b = code.to(tl.int32)
        s = _e8m0_scale(ebyte.to(tl.int32))[:, :, None]
        dl = _feedback_of(xl, _e2m1_value(b & 0xF) * s)
        dh = _feedback_of(xh, _e2m1_value(b >> 4) * s)
        _store_pairs(next_ptr, t, g, mt, E, dl, dh, BT, NGT, 32)


@triton.jit
def _mx_exponent(amax):
    """Shared exponent ``ex`` (int32 in [-127, 127]) of group absmaxes and ``2**-ex`` (fp32)."""
    a = tl.where(amax < 2.0 ** -126, 2.0 ** -126, amax).to(tl.int32, bitcast=True)
    ex = ((a >> 23) & 0xFF) - 129
    ex = tl.where(ex < -127, -127, tl.where(ex > 127, 127, ex))
    return ex, ((127 - ex) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _mx_codes(xl, xh, m, flag_ptr, BT: tl.constexpr, NGT: tl.constexpr, FLAG: tl.constexpr):
    """Code bytes ``[BT, NGT, 16]`` and E8M0 bytes ``[BT, NGT]`` of a tile's even and odd
    columns, any values; sets the NaN flag."""
    fl = is_finite(xl)
    fh = is_finite(xh)
    if FLAG:
        flag_if(flag_ptr, m & ~(fl & fh))
    amax = tl.max(tl.maximum(tl.where(fl, tl.abs(xl), 0.0), tl.where(fh, tl.abs(xh), 0.0)), axis=2)
    ex, inv = _mx_exponent(amax)
    inv = tl.broadcast_to(inv[:, :, None], [BT, NGT, 16])  # 2**-ex
    code = _mx_code(xl, inv) | (_mx_code(xh, inv) << 4)
    bad = tl.minimum(tl.min((fl & fh).to(tl.int32), axis=2), 1) == 0
    return code.to(tl.uint8), tl.where(bad, 255, ex + 127).to(tl.uint8)


@triton.jit
def _mx_code_fast(y):
    """:func:`_mx_code` of a finite ``y`` in fewer instructions. With ``m = min(|y|, 6)``, the
    three range roundings are ``rint(2m)``, ``rint(m) + 2`` and ``rint(m / 2) + 4`` (each by one
    magic add: the offsets 2 and 4 are even, so ties still go to the even integer), and the
    code is their minimum (the grid is concave: each range's own rounding is the smallest of
    the three there; tests/test_triton_group_variants.py runs every rounding boundary through
    the kernel); the low three bits of the magic sum are that code. Sign: ``y < 0``, bit 31 of
    ``y + 0.0`` (which turns -0.0 into +0.0 and leaves every other value), brought to bit 3 by
    an arithmetic shift, whose copies above bit 3 the caller masks off (``& 0xF``) or shifts
    out (``<< 4`` into a byte): one select-merge ``c & 7 | s & ~7`` per value."""
    m = tl.minimum(tl.abs(y), 6.0)
    c = tl.minimum(tl.minimum(m * 2.0 + RINT_MAGIC, m + (RINT_MAGIC + 2.0)), m * 0.5 + (RINT_MAGIC + 4.0))
    top = (y + 0.0).to(tl.int32, bitcast=True) >> 28
    return (c.to(tl.int32, bitcast=True) & 7) | (top & ~7)


@triton.jit
def _mx_fast(xl, xh, BT: tl.constexpr, NGT: tl.constexpr):
    """``(slow, code bytes, E8M0 bytes)`` of a tile, those of :func:`_mx_codes` unless the scalar
    ``slow`` is set: some group absmax is NaN/Inf (the NaN-keeping absmax of the values)."""
    amax = _absmax_nan(xl, xh)
    ex, inv = _mx_exponent(amax)
    inv = tl.broadcast_to(inv[:, :, None], [BT, NGT, 16])
    slow = tl.max(tl.reshape(tl.where(amax < float("inf"), 0, 1), [BT * NGT]), axis=0) != 0  # NaN < inf is False
    code = (_mx_code_fast(xl * inv) & 0xF) | (_mx_code_fast(xh * inv) << 4)
    return slow, code.to(tl.uint8), (ex + 127).to(tl.uint8)


@triton.jit
def mx_decode_sum_tile_kernel(payloads, out_ptr, T, E, EH, G, NQ, N: tl.constexpr, BT: tl.constexpr,
                              NGT: tl.constexpr, PS=0, OS=0, CHUNKED: tl.constexpr = False, minus_ptr=0,
                              MINUS: tl.constexpr = False):
    """``out = sum_r decode(payloads[r])`` of mxfp4 payloads in fp32, rank order, for an even E;
    ``CHUNKED`` and ``MINUS`` as :func:`group_decode_sum_tile_kernel`'s."""
    payloads, out_ptr = chunk_bases(payloads, out_ptr, PS, OS, CHUNKED)
    t, g, bi, mt, m = _tile_index(T, EH, BT, NGT, 32)
    lo, hi = _mx_tile_sum(payloads, t, g, bi, mt, m, EH, G, NQ, N)
    _store_pairs(out_ptr, t, g, mt, E, lo, hi, BT, NGT, 32, minus_ptr, MINUS)


@triton.jit
def mx_decode_sum_kernel(payloads, out_ptr, T, E, G, NQ, N: tl.constexpr, BLOCK: tl.constexpr, minus_ptr=0,
                         MINUS: tl.constexpr = False):
    """``out = sum_r decode(payloads[r])`` of mxfp4 payloads in fp32, rank order; any E; ``MINUS``
    as :func:`group_decode_sum_tile_kernel`'s."""
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < T * E
    v = _mx_sum_at(payloads, o // E, o % E, m, E, G, NQ, N)
    if MINUS:
        v = _minus(v, minus_ptr, o, m)
    tl.store(out_ptr + o, as_stored(v, out_ptr), mask=m)


def _mx_launch(src, n_src, out, t, e, flag, chunks=1, variant=None, feedback=None):
    if t == 0:
        return out
    variant = MX_ENCODE_VARIANT if variant is None else variant
    grid, rows, ngt, warps = _tile_grid(t, e, 32, _variant(variant)[0])
    extra = {} if chunks == 1 else {"XS": t * e, "PS": out.numel() // chunks, "CHUNKED": True}
    extra.update(_feedback_consts(feedback, chunks))
    extra.update(_variant_consts(variant, t, e, rows, ngt * 32, n_src, _even_out(out, chunks)))
    mx_encode_kernel[grid + ((chunks,) if chunks > 1 else ())](
        tuple(src), out, out if flag is None else flag, t, e, e // 2, triton.cdiv(e, 32), (t * e + 1) // 2, N=n_src,
        BT=rows, NGT=ngt, FLAG=flag is not None, num_warps=warps, **extra, **FP_OPTIONS)
    return out


def mx_encode_chunks(x, out, *, chunks: int, flag=None, variant=None):
    """:func:`encode_chunks` for mxfp4 (E even)."""
    return _mx_launch([x], 0, out, x.shape[0] // chunks, x.shape[1], flag, chunks, variant)


def mx_decode_chunks(payload, out, *, chunks: int):
    """:func:`decode_chunks` for mxfp4 (E even)."""
    return _launch_decode_chunks(mx_decode_sum_tile_kernel, payload, out, chunks, 32)


def mx_encode(x, out, *, flag=None, variant=None):
    """Fill the mxfp4 payload ``out`` from ``x [T, E]`` (E even)."""
    return _mx_launch([x], 0, out, x.shape[0], x.shape[1], flag, variant=variant)


def mx_encode_feedback(x, carry, out, nxt, *, flag=None, variant=None):
    """:func:`encode_feedback` for mxfp4 (E even; the NaN flag only): returns ``(out, nxt)``."""
    _check_feedback(x, carry, nxt)
    t, e = x.shape
    if t * e:
        _mx_launch([x], 0, out, t, e, flag, variant=variant, feedback=(carry, nxt))
    return out, nxt


def mx_reduce_encode(payloads, out, *, t: int, e: int, flag=None, variant=None):
    """Fill ``out`` with the mxfp4 encoding of the sum of the decoded mxfp4 ``payloads`` (E even), one pass."""
    return _mx_launch(list(payloads), len(payloads), out, t, e, flag, variant=variant)


def mx_decode_sum(payloads, out, *, minus=None):
    """Fill ``out [T, E]`` fp32 with the rank-ordered sum of the decoded mxfp4 ``payloads`` (tiled for
    even E); ``minus`` as :func:`decode_sum`'s."""
    t, e = out.shape
    extra = _minus_args(payloads, out, minus)
    if t * e == 0:
        return out
    g, nq = triton.cdiv(e, 32), (t * e + 1) // 2
    if e % 2 == 0:
        grid, rows, ngt, warps = _tile_grid(t, e, 32)
        mx_decode_sum_tile_kernel[grid](tuple(payloads), out, t, e, e // 2, g, nq, N=len(payloads), BT=rows,
                                        NGT=ngt, num_warps=warps, **extra, **FP_OPTIONS)
        return out
    block = 1024 if t * e >= 1 << 16 else 256
    mx_decode_sum_kernel[(triton.cdiv(t * e, block),)](tuple(payloads), out, t, e, g, nq, N=len(payloads),
                                                       BLOCK=block, num_warps=4, **extra, **FP_OPTIONS)
    return out
