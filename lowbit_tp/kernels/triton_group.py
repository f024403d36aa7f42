"""Triton kernels of the dynamic group codecs ``int4-g32`` / ``int4-g128``.

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
