"""Triton kernels of the static codecs (``int8``, ``int4``, ``int4-outlier``, ``int4-random-k``):
encode, decode-and-sum, and two-shot's fused reduce-and-re-encode (the encode kernel reading
the decoded sum of N payloads instead of a partial).

Bitwise the same payloads and sums as :mod:`lowbit_tp.codecs.static`; the layout is in
docs/wire-format.md. Inputs are contiguous; static tables (channel maps, scales) come from
the codec, already on the device.
"""
import torch
import triton
import triton.language as tl

from lowbit_tp.kernels.triton_common import (FP_OPTIONS, bf16_bits, bf16_from_bits, clamp_keep_nan, flag_if,
                                             int4_from_nibble, is_finite, load_u16, round_half_even, saturate)


def launch_config(n: int) -> tuple[int, int]:
    """(elements per program, warps) for a 1-D kernel over ``n`` elements."""
    block = 1024 if n >= 1 << 16 else 256
    return block, 4


@triton.jit
def _sum_at(payloads, colmap_ptr, scale_ptr, t, e, m, T, E, NK, N: tl.constexpr, BITS: tl.constexpr):
    """``sum_r decode(payloads[r])[t, e]`` in fp32, rank order, for index tensors ``t``, ``e``.

    ``colmap[r, e]`` is the kept-channel slot of channel ``e`` for source ``r``, or
    ``-(j + 1)`` when ``e`` is that source's ``j``-th bf16 channel; ``scale[r, slot]``.
    """
    NI = E - NK
    head_bytes = 2 * T * NK
    acc = tl.zeros(t.shape, dtype=tl.float32)
    for r in tl.static_range(N):
        p = payloads[r]
        slot = tl.load(colmap_ptr + r * E + e, mask=m, other=0)
        inl = slot >= 0
        f = t * NI + slot
        mi = m & inl
        if BITS == 4:
            q = int4_from_nibble(tl.load(p + head_bytes + f // 2, mask=mi, other=0), (f & 1) == 1)
            sentinel = q == -8
        else:
            q = tl.load(p + head_bytes + f, mask=mi, other=0).to(tl.int8, bitcast=True).to(tl.int32)
            sentinel = q == -128
        v = q.to(tl.float32) * tl.load(scale_ptr + r * NI + slot, mask=mi, other=1.0)
        v = tl.where(sentinel, float("nan"), v)
        mo = m & (slot < 0)
        kept = bf16_from_bits(load_u16(p, 2 * (t * NK + (-slot - 1)), mo))
        v = tl.where(inl, v, kept)
        if r == 0:
            acc = v
        else:
            acc = acc + v
    return acc


@triton.jit
def _value_at(src, colmap_ptr, scale_ptr, t, ch, m, T, E, NK, N: tl.constexpr, BITS: tl.constexpr):
    """What is encoded at ``[t, ch]``: ``src[0]`` itself (``N == 0``, a partial) or the decoded
    sum of the ``N`` payloads in ``src`` (two-shot's fused reduce)."""
    if N == 0:
        x = tl.load(src[0] + t * E + ch, mask=m, other=0.0).to(tl.float32)
    else:
        x = _sum_at(src, colmap_ptr, scale_ptr, t, ch, m, T, E, NK, N, BITS)
    return x


@triton.jit
def _check(x, m, flag_ptr, range_ptr, max_in, FLAG: tl.constexpr, RANGE: tl.constexpr):
    """Record NaN/Inf (``FLAG``) and finite values beyond ``max_in`` (``RANGE``) on the device."""
    if FLAG:
        flag_if(flag_ptr, m & ~is_finite(x))
    if RANGE:
        flag_if(range_ptr, m & is_finite(x) & (tl.abs(x) > max_in))


@triton.jit
def _quantize_at(src, colmap_ptr, scale_ptr, inl_ptr, inv_ptr, flag_ptr, range_ptr, i, n, T, E, NK, max_in,
                 N: tl.constexpr, BITS: tl.constexpr, HAS_K: tl.constexpr, QMAX: tl.constexpr, FLAG: tl.constexpr,
                 RANGE: tl.constexpr):
    """int32 code of flat body index ``i`` (token ``i // NI``, kept-channel slot ``i % NI``)."""
    NI = E - NK
    m = i < n
    t = i // NI
    c = i % NI
    if HAS_K:
        ch = tl.load(inl_ptr + c, mask=m, other=0)
    else:
        ch = c
    x = _value_at(src, colmap_ptr, scale_ptr, t, ch, m, T, E, NK, N, BITS)
    _check(x, m, flag_ptr, range_ptr, max_in, FLAG, RANGE)
    x = saturate(x, max_in)
    y = x * tl.load(inv_ptr + c, mask=m, other=1.0)
    q = round_half_even(clamp_keep_nan(y, -QMAX * 1.0, QMAX * 1.0)).to(tl.int32)
    return tl.where(is_finite(x), q, -QMAX - 1)


@triton.jit
def static_encode_kernel(src, colmap_ptr, scale_ptr, inl_ptr, inv_ptr, outl_ptr, head_ptr, body_ptr, flag_ptr,
                         range_ptr, T, E, NK, n_body_programs, max_in, N: tl.constexpr, BITS: tl.constexpr,
                         HAS_K: tl.constexpr, BLOCK: tl.constexpr, FLAG: tl.constexpr, RANGE: tl.constexpr):
    """Encode ``src[0]`` (``N == 0``) or the decoded sum of the ``N`` payloads in ``src``
    (two-shot's reduce and re-encode, one pass; the sum never reaches memory).

    Programs ``[0, n_body_programs)`` write the int body, the rest the bf16 head ``[T, NK]``.
    """
    pid = tl.program_id(0)
    n = T * (E - NK)
    if pid < n_body_programs:
        b = pid * BLOCK + tl.arange(0, BLOCK)
        if BITS == 4:
            q0 = _quantize_at(src, colmap_ptr, scale_ptr, inl_ptr, inv_ptr, flag_ptr, range_ptr, 2 * b, n, T, E, NK,
                              max_in, N, BITS, HAS_K, 7, FLAG, RANGE)
            q1 = _quantize_at(src, colmap_ptr, scale_ptr, inl_ptr, inv_ptr, flag_ptr, range_ptr, 2 * b + 1, n, T, E,
                              NK, max_in, N, BITS, HAS_K, 7, FLAG, RANGE)
            q1 = tl.where(2 * b + 1 < n, q1, 0)  # an odd count pads the last high nibble with 0
            tl.store(body_ptr + b, ((q0 & 0xF) | ((q1 & 0xF) << 4)).to(tl.uint8), mask=2 * b < n)
        else:
            q = _quantize_at(src, colmap_ptr, scale_ptr, inl_ptr, inv_ptr, flag_ptr, range_ptr, b, n, T, E, NK,
                             max_in, N, BITS, HAS_K, 127, FLAG, RANGE)
            tl.store(body_ptr + b, (q & 0xFF).to(tl.uint8), mask=b < n)
    else:
        j = (pid - n_body_programs) * BLOCK + tl.arange(0, BLOCK)
        m = j < T * NK
        t = j // NK
        ch = tl.load(outl_ptr + j % NK, mask=m, other=0)
        x = _value_at(src, colmap_ptr, scale_ptr, t, ch, m, T, E, NK, N, BITS)
        _check(x, m, flag_ptr, range_ptr, max_in, FLAG, RANGE)
        tl.store(head_ptr + j, bf16_bits(saturate(x, max_in)).to(tl.int16), mask=m)


@triton.jit
def static_decode_sum_kernel(payloads, colmap_ptr, scale_ptr, out_ptr, T, E, NK,
                             N: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr):
    """``out[t, e] = sum_r decode(payloads[r])[t, e]`` in fp32, rank order, written once."""
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < T * E
    acc = _sum_at(payloads, colmap_ptr, scale_ptr, o // E, o % E, m, T, E, NK, N, BITS)
    tl.store(out_ptr + o, acc, mask=m)


# ---------------------------------------------------------------- launchers (no codec logic)
def _launch_encode(src, colmap, scale, t, e, inliers, inv_scale, outliers, out, *, bits, max_input, flag, range_flag):
    nk = outliers.numel()
    n = t * (e - nk)
    nbody = (n + 1) // 2 if bits == 4 else n
    block, warps = launch_config(max(nbody, t * nk))
    n_body_programs = triton.cdiv(nbody, block)
    grid = (n_body_programs + triton.cdiv(t * nk, block),)
    if grid[0] == 0:
        return out
    head = out[: 2 * t * nk].view(torch.int16)
    static_encode_kernel[grid](tuple(src), inliers if colmap is None else colmap,
                               inv_scale if scale is None else scale, inliers, inv_scale, outliers, head, out[2 * t * nk:],
                               inliers if flag is None else flag, inliers if range_flag is None else range_flag,
                               t, e, nk, n_body_programs, max_input, N=len(src) if colmap is not None else 0,
                               BITS=bits, HAS_K=nk > 0, BLOCK=block, FLAG=flag is not None,
                               RANGE=range_flag is not None, num_warps=warps, **FP_OPTIONS)
    return out


def encode(x, inliers, inv_scale, outliers, out, *, bits: int, max_input: float, flag=None, range_flag=None):
    """Fill ``out`` (the whole payload, uint8) from ``x [T, E]``; tables are int32/fp32 on x's device.

    Finite values beyond ``max_input`` saturate; ``flag`` / ``range_flag`` (int32, optional)
    are set to 1 if ``x`` holds NaN/Inf / finite values beyond ``max_input``.
    """
    t, e = x.shape
    return _launch_encode([x], None, None, t, e, inliers, inv_scale, outliers, out, bits=bits, max_input=max_input,
                          flag=flag, range_flag=range_flag)


def reduce_encode(payloads, colmap, scale, inliers, inv_scale, outliers, out, *, t: int, e: int, bits: int,
                  max_input: float, flag=None, range_flag=None):
    """Fill ``out`` with encode(sum of the decoded ``payloads``) of a ``[t, e]`` chunk in one pass:
    ``colmap``/``scale`` as :func:`decode_sum` (the sources), the rest as :func:`encode` (``"sum"``)."""
    return _launch_encode(list(payloads), colmap, scale, t, e, inliers, inv_scale, outliers, out, bits=bits,
                          max_input=max_input, flag=flag, range_flag=range_flag)


def decode_sum(payloads, colmap, scale, out, *, nk: int, bits: int):
    """Fill ``out [T, E]`` fp32 with the rank-ordered sum of the decoded ``payloads``."""
    t, e = out.shape
    block, warps = launch_config(t * e)
    grid = (triton.cdiv(t * e, block),)
    if grid[0] == 0:
        return out
    static_decode_sum_kernel[grid](tuple(payloads), colmap, scale, out, t, e, nk,
                                   N=len(payloads), BITS=bits, BLOCK=block, num_warps=warps, **FP_OPTIONS)
    return out
