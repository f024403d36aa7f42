"""Triton kernels of the dynamic group codecs ``int4-g32`` / ``int4-g128`` and ``mxfp4``.

Bitwise the same payloads and sums as :class:`lowbit_tp.codecs.dynamic.GroupInt4Codec`:
``[ packed int4 of T*E | T*G fp16 scales ]``, scale = fp16(group absmax / 7), codes =
round-half-even(x / scale) with an IEEE division. Two-shot's reduce-and-re-encode is the
encoder reading the decoded sum of N payloads instead of a partial. The encoder packs a token's codes in
pairs, so it needs an even E (the codec falls back to the reference otherwise); the
decoder reads any shape.
"""
import torch
import triton
import triton.language as tl

from lowbit_tp.kernels.triton_common import (FP_OPTIONS, clamp_keep_nan, flag_if, fp16_bits, fp16_from_bits,
                                             int4_from_nibble, is_finite, load_u16, round_half_even, saturate,
                                             store_u16)

_FP16_MAX = tl.constexpr(65504.0)


def launch_config(tokens: int, hidden: int, group: int) -> tuple[int, int, int, int]:
    """(rows per program, padded row width, group width in the tile, warps)."""
    e_pad = triton.next_power_of_2(hidden)
    gw = min(group, e_pad)
    rows = max(1, min(triton.next_power_of_2(tokens), 4096 // e_pad))
    warps = 8 if rows * e_pad >= 8192 else 4
    return rows, e_pad, gw, warps


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
def group_encode_kernel(src, out_ptr, flag_ptr, range_ptr, T, E, G, NQ, max_in, N: tl.constexpr,
                        ROWS: tl.constexpr, E_PAD: tl.constexpr, GW: tl.constexpr, GROUP: tl.constexpr,
                        FLAG: tl.constexpr, RANGE: tl.constexpr):
    """Encode ``src[0]`` (``N == 0``, a partial ``[T, E]``) or the decoded sum of the ``N``
    payloads in ``src`` (two-shot's reduce and re-encode in one pass)."""
    pid = tl.program_id(0)
    GP: tl.constexpr = E_PAD // GW
    t = pid * ROWS + tl.arange(0, ROWS)
    e = tl.arange(0, E_PAD)
    m = (t[:, None] < T) & (e[None, :] < E)
    if N == 0:
        x = tl.load(src[0] + t[:, None] * E + e[None, :], mask=m, other=0.0).to(tl.float32)
    else:
        x = _sum_at(src, t[:, None], e[None, :], m, T, E, G, NQ, N, GROUP)
        x = tl.where(m, x, 0.0)
    if FLAG:
        flag_if(flag_ptr, m & ~is_finite(x))
    if RANGE:
        flag_if(range_ptr, m & is_finite(x) & (tl.abs(x) > max_in))
    xg = tl.reshape(saturate(x, max_in), [ROWS, GP, GW])
    amax = tl.max(tl.where(is_finite(xg), tl.abs(xg), 0.0), axis=2)
    s = tl.math.div_rn(amax, tl.full([ROWS, GP], 7.0, tl.float32))
    sbits = fp16_bits(tl.where(s > _FP16_MAX, _FP16_MAX, s))
    s32 = fp16_from_bits(sbits)
    s32 = tl.where(s32 == 0.0, 1.0, s32)
    y = tl.math.div_rn(xg, tl.broadcast_to(s32[:, :, None], [ROWS, GP, GW]))
    q = round_half_even(clamp_keep_nan(y, -7.0, 7.0)).to(tl.int32)
    q = tl.where(is_finite(xg), q, -8)
    lo, hi = tl.split(tl.reshape(q, [ROWS, E_PAD // 2, 2]))
    byte = ((lo & 0xF) | ((hi & 0xF) << 4)).to(tl.uint8)
    i = tl.arange(0, E_PAD // 2)
    tl.store(out_ptr + t[:, None] * (E // 2) + i[None, :], byte, mask=(t[:, None] < T) & (2 * i[None, :] < E))
    g = tl.arange(0, GP)
    store_u16(out_ptr, NQ + 2 * (t[:, None] * G + g[None, :]), sbits, (t[:, None] < T) & (g[None, :] < G))


@triton.jit
def group_decode_sum_kernel(payloads, out_ptr, T, E, G, NQ, N: tl.constexpr, GROUP: tl.constexpr,
                            BLOCK: tl.constexpr):
    """``out = sum_r decode(payloads[r])`` in fp32, rank order; flat over ``T*E`` (any E)."""
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < T * E
    tl.store(out_ptr + o, _sum_at(payloads, o // E, o % E, m, T, E, G, NQ, N, GROUP), mask=m)


# ---------------------------------------------------------------- launchers (no codec logic)
def _launch_encode(src, n_sources, out, t, e, *, group, max_input, flag, range_flag):
    rows, e_pad, gw, warps = launch_config(t, e, group)
    if t == 0:
        return out
    dummy = out
    group_encode_kernel[(triton.cdiv(t, rows),)](tuple(src), out, dummy if flag is None else flag,
                                                 dummy if range_flag is None else range_flag, t, e,
                                                 triton.cdiv(e, group), (t * e + 1) // 2, max_input, N=n_sources,
                                                 ROWS=rows, E_PAD=e_pad, GW=gw, GROUP=group, FLAG=flag is not None,
                                                 RANGE=range_flag is not None, num_warps=warps, **FP_OPTIONS)
    return out


def encode(x, out, *, group: int, max_input: float, flag=None, range_flag=None):
    """Fill the payload ``out`` from ``x [T, E]`` (E even); ``flag``/``range_flag`` as the static encoder's."""
    t, e = x.shape
    return _launch_encode([x], 0, out, t, e, group=group, max_input=max_input, flag=flag, range_flag=range_flag)


def reduce_encode(payloads, out, *, t: int, e: int, group: int, max_input: float, flag=None, range_flag=None):
    """Fill ``out`` with encode(sum of the decoded ``payloads``) of a ``[t, e]`` chunk (E even), one pass."""
    return _launch_encode(list(payloads), len(payloads), out, t, e, group=group, max_input=max_input, flag=flag,
                          range_flag=range_flag)


def decode_sum(payloads, out, *, group: int):
    t, e = out.shape
    if t * e == 0:
        return out
    block = 1024 if t * e >= 1 << 16 else 256
    group_decode_sum_kernel[(triton.cdiv(t * e, block),)](tuple(payloads), out, t, e, triton.cdiv(e, group),
                                                          (t * e + 1) // 2, N=len(payloads), GROUP=group,
                                                          BLOCK=block, num_warps=4, **FP_OPTIONS)
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
def mx_encode_kernel(src, out_ptr, flag_ptr, T, E, G, NQ, N: tl.constexpr, ROWS: tl.constexpr,
                     E_PAD: tl.constexpr, GW: tl.constexpr, FLAG: tl.constexpr):
    """mxfp4-encode ``src[0]`` (``N == 0``) or the decoded sum of the ``N`` mxfp4 payloads in ``src``.

    Shared exponent ``floor(log2(absmax)) - 2`` from the fp32 exponent bits (what ``frexp``
    gives), ``y = x * 2**-exp`` (exact), E2M1 rounding half to even per range; a group
    holding NaN/Inf gets the E8M0 NaN byte 255, and a NaN's code is 0 (what PyTorch's CPU
    cast of NaN to uint8 writes on x86).
    """
    GP: tl.constexpr = E_PAD // GW
    t = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    e = tl.arange(0, E_PAD)
    m = (t[:, None] < T) & (e[None, :] < E)
    if N == 0:
        x = tl.load(src[0] + t[:, None] * E + e[None, :], mask=m, other=0.0).to(tl.float32)
    else:
        x = tl.where(m, _mx_sum_at(src, t[:, None], e[None, :], m, E, G, NQ, N), 0.0)
    if FLAG:
        flag_if(flag_ptr, m & ~is_finite(x))
    xg = tl.reshape(x, [ROWS, GP, GW])
    fin = is_finite(xg)
    amax = tl.max(tl.where(fin, tl.abs(xg), 0.0), axis=2)
    a = tl.where(amax < 2.0 ** -126, 2.0 ** -126, amax).to(tl.int32, bitcast=True)
    ex = ((a >> 23) & 0xFF) - 129
    ex = tl.where(ex < -127, -127, tl.where(ex > 127, 127, ex))
    inv = ((127 - ex) << 23).to(tl.float32, bitcast=True)  # 2**-ex, normal for ex in [-127, 125]
    y = xg * tl.broadcast_to(inv[:, :, None], [ROWS, GP, GW])
    mag = tl.abs(y)
    mag = tl.where(mag > 6.0, 6.0, mag)  # NaN stays NaN
    fine = round_half_even(mag * 2.0)
    mid = round_half_even(mag) + 2.0
    top = round_half_even(mag * 0.5) + 4.0
    code = tl.where(mag < 2.0, fine, tl.where(mag < 4.0, mid, top))
    code = tl.where(mag != mag, 0, code.to(tl.int32)) | ((y < 0.0).to(tl.int32) << 3)
    lo, hi = tl.split(tl.reshape(code, [ROWS, E_PAD // 2, 2]))
    i = tl.arange(0, E_PAD // 2)
    tl.store(out_ptr + t[:, None] * (E // 2) + i[None, :], (lo | (hi << 4)).to(tl.uint8),
             mask=(t[:, None] < T) & (2 * i[None, :] < E))
    bad = tl.min(fin.to(tl.int32), axis=2) == 0
    g = tl.arange(0, GP)
    tl.store(out_ptr + NQ + t[:, None] * G + g[None, :], tl.where(bad, 255, ex + 127).to(tl.uint8),
             mask=(t[:, None] < T) & (g[None, :] < G))


@triton.jit
def mx_decode_sum_kernel(payloads, out_ptr, T, E, G, NQ, N: tl.constexpr, BLOCK: tl.constexpr):
    """``out = sum_r decode(payloads[r])`` of mxfp4 payloads in fp32, rank order; any E."""
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < T * E
    tl.store(out_ptr + o, _mx_sum_at(payloads, o // E, o % E, m, E, G, NQ, N), mask=m)


def _mx_launch(src, n_src, out, t, e, flag):
    if t == 0:
        return out
    rows, e_pad, gw, warps = launch_config(t, e, 32)
    mx_encode_kernel[(triton.cdiv(t, rows),)](tuple(src), out, out if flag is None else flag, t, e,
                                              triton.cdiv(e, 32), (t * e + 1) // 2, N=n_src, ROWS=rows,
                                              E_PAD=e_pad, GW=gw, FLAG=flag is not None, num_warps=warps,
                                              **FP_OPTIONS)
    return out


def mx_encode(x, out, *, flag=None):
    """Fill the mxfp4 payload ``out`` from ``x [T, E]`` (E even)."""
    return _mx_launch([x], 0, out, x.shape[0], x.shape[1], flag)


def mx_reduce_encode(payloads, out, *, t: int, e: int, flag=None):
    """Fill ``out`` with the mxfp4 encoding of the sum of the decoded mxfp4 ``payloads`` (E even), one pass."""
    return _mx_launch(list(payloads), len(payloads), out, t, e, flag)


def mx_decode_sum(payloads, out):
    t, e = out.shape
    if t * e == 0:
        return out
    block = 1024 if t * e >= 1 << 16 else 256
    mx_decode_sum_kernel[(triton.cdiv(t * e, block),)](tuple(payloads), out, t, e, triton.cdiv(e, 32),
                                                       (t * e + 1) // 2, N=len(payloads), BLOCK=block,
                                                       num_warps=4, **FP_OPTIONS)
    return out
