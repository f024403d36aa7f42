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

from lowbit_tp.kernels.triton_common import (FP_OPTIONS, as_stored, bf16_bits, bf16_from_bits, chunk_bases,
                                             clamp_keep_nan, flag_any, flag_if, int4_from_nibble, is_finite, load_u16,
                                             payload_at, RINT_MAGIC, round_half_even, round_to_int_small, saturate)


def launch_config(n: int) -> tuple[int, int]:
    """(elements per program, warps) of the flat encoder over ``n`` elements (int4 with an odd
    body row, where one byte can hold the codes of two tokens; everything else is tiled)."""
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


# ---------------------------------------------------------------- tiled kernels
# A program works on BT tokens x a block of columns (decode: output channels; encode: body
# slots taken in pairs, or kept channels). Channel maps and scales are loaded once per tile
# column and reused over its BT rows; no division or modulo per element.
def tile_config(tokens: int, width: int, sources: int = 1) -> tuple[int, int, int]:
    """(rows, columns, warps) of a tile over a ``tokens x width`` index space; the bytes do not
    depend on it. ``rows * sources <= 8`` (4 rows for an encode or a world-2 decode-and-sum,
    one for world 8) and ``columns * sources <= 2048`` (up to 512), so that a decode-and-sum
    program's slot and scale tables (8 bytes per column and source) stay in L1 while it walks
    down the rows (:func:`row_iterations`); 4 warps. ptxas sm_90a (scripts/ptx_stats.py): <= 93
    registers, no spills for N up to 8."""
    n = triton.next_power_of_2(max(sources, 1))
    cols = min(triton.next_power_of_2(max(width, 2)), 512, max(64, 2048 // n))
    rows = max(1, min(triton.next_power_of_2(tokens), 2048 // cols, 8 // n))
    return rows, cols, 4


@triton.jit
def _head_bits(p, idx, m, H16: tl.constexpr):
    """The bf16 bits (int32) of the ``idx``-th kept value of payload ``p``: one 16-bit load when
    every payload starts 2-byte aligned (``H16``), else two byte loads."""
    if H16:
        return tl.load(p.to(tl.pointer_type(tl.int16)) + idx, mask=m).to(tl.int32)  # sign bits: masked off later
    else:
        return load_u16(p, 2 * idx, m)


@triton.jit
def _sum_cols(payloads, colmap_ptr, scale_ptr, t, ch, mt, mc, T, E, NK, N: tl.constexpr, BITS: tl.constexpr,
              H16: tl.constexpr, ROW_BYTES: tl.constexpr):
    """``sum_r decode(payloads[r])[t, ch]`` in fp32, rank order, for a row index ``t`` and a
    channel index ``ch`` that broadcast (``t [BT, 1, ..]``, ``ch [1, ...]``): each source's slot,
    scale, code byte column and nibble shift are worked out per column, so an element costs one
    code load (and, for the few bf16 channels, one 16-bit load), two shifts, a multiply and an add.

    ``colmap[r, e]`` is the kept-channel slot of channel ``e`` for source ``r``, or
    ``-(j + 1)`` when ``e`` is that source's ``j``-th bf16 channel; ``scale[r, slot]``.
    ``ROW_BYTES``: every body row starts at a byte (int8, or an even ``E - NK``); else the
    nibble of each element follows from its flat index.
    """
    NI = E - NK
    head_bytes = 2 * T * NK
    m = mt & mc
    for r in tl.static_range(N):
        p = payloads[r]
        slot = tl.load(colmap_ptr + r * E + ch, mask=mc, other=0)
        inl = slot >= 0
        sc = tl.load(scale_ptr + r * NI + slot, mask=mc & inl, other=1.0)
        if ROW_BYTES:
            s0 = tl.where(inl, slot, 0)  # a bf16 channel reads slot 0's code, thrown away below
            if BITS == 4:
                b = tl.load(p + (head_bytes + t * (NI // 2)) + (s0 >> 1), mask=m).to(tl.int32)
                q = (b << (28 - 4 * (s0 & 1))) >> 28  # the sign-extended nibble
            else:
                q = tl.load(p + (head_bytes + t * NI) + s0, mask=m).to(tl.int8, bitcast=True).to(tl.int32)
        else:
            f = t * NI + slot
            b = tl.load(p + head_bytes + (f >> 1), mask=m & inl, other=0).to(tl.int32)
            q = (b << (28 - 4 * (f & 1))) >> 28  # the sign-extended nibble of flat index f
        sentinel = q == (-8 if BITS == 4 else -128)
        v = tl.where(sentinel, float("nan"), q.to(tl.float32) * sc)
        kept = bf16_from_bits(_head_bits(p, t * NK + (-1 - slot), m & ~inl, H16))
        v = tl.where(inl, v, kept)
        if r == 0:
            acc = v
        else:
            acc = acc + v
    return acc


@triton.jit
def _value_cols(src, colmap_ptr, scale_ptr, t, ch, mt, mc, T, E, NK, N: tl.constexpr, BITS: tl.constexpr,
                H16: tl.constexpr):
    """What is encoded at ``[t, ch]``: ``src[0]`` (``N == 0``, a partial) or the decoded sum of
    the ``N`` payloads in ``src`` (two-shot's fused reduce)."""
    if N == 0:
        x = tl.load(src[0] + t * E + ch, mask=mt & mc, other=0.0).to(tl.float32)
    else:
        x = _sum_cols(src, colmap_ptr, scale_ptr, t, ch, mt, mc, T, E, NK, N, BITS, H16, True)
    return x


@triton.jit
def static_decode_sum_tile_kernel(payloads, colmap_ptr, scale_ptr, out_ptr, T, E, NK, N: tl.constexpr,
                                  BITS: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, H16: tl.constexpr,
                                  ROW_BYTES: tl.constexpr, ITERS: tl.constexpr, PS=0, OS=0,
                                  CHUNKED: tl.constexpr = False):
    """``out[t, e] = sum_r decode(payloads[r])[t, e]`` in fp32, rank order, written once: ``ITERS``
    tiles of ``BT x BE`` down the rows per program, so a column block's slot and scale tables
    come from L2 once per ``ITERS * BT`` rows (the H100 run 2 had them re-read per 1-4 rows:
    ``N * 8`` bytes a value of L2 traffic, more than the payloads and sum at world 8).
    ``CHUNKED`` (``N == 1``): grid axis 2 is a two-shot chunk of ``T`` rows, its payload at
    ``+ PS`` bytes and its rows of ``out`` at ``+ OS`` values per chunk."""
    payloads, out_ptr = chunk_bases(payloads, out_ptr, PS, OS, CHUNKED)
    e = tl.program_id(1) * BE + tl.arange(0, BE)[None, :]
    mc = e < E
    for i in tl.range(0, ITERS):
        t = (tl.program_id(0) * ITERS + i) * BT + tl.arange(0, BT)[:, None]
        mt = t < T
        acc = _sum_cols(payloads, colmap_ptr, scale_ptr, t, e, mt, mc, T, E, NK, N, BITS, H16, ROW_BYTES)
        tl.store(out_ptr + t * E + e, as_stored(acc, out_ptr), mask=mt & mc)


@triton.jit
def static_encode_tile_kernel(src, colmap_ptr, scale_ptr, inl_ptr, inv_ptr, outl_ptr, head_ptr, body_ptr, flag_ptr,
                              range_ptr, T, E, NK, NB, max_in, N: tl.constexpr, BITS: tl.constexpr,
                              HAS_K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, FLAG: tl.constexpr,
                              RANGE: tl.constexpr, H16: tl.constexpr, ITERS: tl.constexpr, XS=0, HS=0, PS=0,
                              CHUNKED: tl.constexpr = False):
    """Encode ``src[0]`` (``N == 0``) or the decoded sum of the ``N`` payloads in ``src`` (two-shot's
    reduce and re-encode, one pass). Column tiles ``[0, NB)`` write ``BC`` body slots of ``BT``
    tokens, taken in pairs (an int4 byte's two codes meet in one thread; int4 needs an even
    ``E - NK``), the rest ``BC`` channels of the bf16 head ``[T, NK]``. A program walks ``ITERS``
    such tiles down the rows, so its column tables (inlier map, reciprocal scales) stay in L1.
    ``CHUNKED`` (``N == 0``): grid axis 2 is a two-shot chunk of ``T`` rows, its input at ``+ XS``
    values, its payload (bf16 head, body) at ``+ PS`` bytes (``+ HS = PS / 2`` int16) per chunk."""
    src, body_ptr = chunk_bases(src, body_ptr, XS, PS, CHUNKED)
    if CHUNKED:
        head_ptr += tl.program_id(2) * HS
    NI = E - NK
    HB: tl.constexpr = BC // 2
    QMAX: tl.constexpr = 7 if BITS == 4 else 127
    c = tl.program_id(1)
    for it in tl.range(0, ITERS):
        t = (tl.program_id(0) * ITERS + it) * BT + tl.arange(0, BT)[:, None]
        mt = t < T
        if c < NB:
            ip = c * HB + tl.arange(0, HB)
            i = 2 * ip[:, None] + tl.arange(0, 2)[None, :]  # [HB, 2] body slots
            mi = i < NI
            inv = tl.load(inv_ptr + i, mask=mi, other=1.0)[None, :, :]
            if HAS_K:
                ch = tl.load(inl_ptr + i, mask=mi, other=0)
            else:
                ch = i
            t3 = t[:, :, None]
            m = mt[:, :, None] & mi[None, :, :]
            if N == 0 and not HAS_K:  # contiguous: one 2-D load, 16 bytes a thread
                cc = c * BC + tl.arange(0, BC)[None, :]
                x = tl.load(src[0] + t * E + cc, mask=mt & (cc < NI), other=0.0).to(tl.float32)
                x = tl.reshape(x, [BT, HB, 2])
            else:
                x = _value_cols(src, colmap_ptr, scale_ptr, t3, ch[None, :, :], mt[:, :, None], mi[None, :, :], T, E,
                                NK, N, BITS, H16)
            if FLAG:
                flag_if(flag_ptr, m & ~is_finite(x))
            if RANGE:
                flag_if(range_ptr, m & is_finite(x) & (tl.abs(x) > max_in))
            x = saturate(x, max_in)
            q = round_to_int_small(clamp_keep_nan(x * inv, -QMAX * 1.0, QMAX * 1.0)).to(tl.int32)
            q = tl.where(is_finite(x), q, -QMAX - 1)
            if BITS == 4:
                lo, hi = tl.split(q)
                tl.store(body_ptr + t * (NI // 2) + ip[None, :], ((lo & 0xF) | ((hi & 0xF) << 4)).to(tl.uint8),
                         mask=mt & (ip < NI // 2)[None, :])
            else:
                cc = c * BC + tl.arange(0, BC)[None, :]
                tl.store(body_ptr + t * NI + cc, tl.reshape(q & 0xFF, [BT, BC]).to(tl.uint8), mask=mt & (cc < NI))
        else:
            j = (c - NB) * BC + tl.arange(0, BC)[None, :]  # (names apart from the body branch's: other shapes)
            mj = j < NK
            chj = tl.load(outl_ptr + j, mask=mj, other=0)
            xj = _value_cols(src, colmap_ptr, scale_ptr, t, chj, mt, mj, T, E, NK, N, BITS, H16)
            mh = mt & mj
            if FLAG:
                flag_if(flag_ptr, mh & ~is_finite(xj))
            if RANGE:
                flag_if(range_ptr, mh & is_finite(xj) & (tl.abs(xj) > max_in))
            tl.store(head_ptr + t * NK + j, bf16_bits(saturate(xj, max_in)).to(tl.int16), mask=mh)


# ---------------------------------------------------------------- launchers (no codec logic)
def row_iterations(tokens: int, rows: int) -> int:
    """Tiles per program down the rows (decode-and-sum and the tiled encoder): up to 32 rows a
    program, while a message keeps >= 32 programs per column block (a decode-sized one keeps
    one tile per program)."""
    return max(1, min(32 // rows, tokens // (rows * 32)))


def _aligned2(payloads) -> bool:
    """Every payload starts at an even address (its kept bf16 values load as 16-bit words)."""
    return all(p.data_ptr() % 2 == 0 for p in payloads)


def _launch_encode(src, colmap, scale, t, e, inliers, inv_scale, outliers, out, *, bits, max_input, flag, range_flag,
                   chunks=1, variant=None):
    """``t`` rows per chunk; ``chunks > 1`` (the tiled and the fast kernels): ``src[0]`` holds ``chunks * t``
    rows and ``out`` the ``chunks`` payloads one after another (an even payload size when
    there is a bf16 head)."""
    nk = outliers.numel()
    n = t * (e - nk)
    if t == 0:
        return out
    if nk and out.data_ptr() % 2:  # a payload at an odd address (two-shot's chunk j of an odd size):
        # its bf16 head cannot be stored as int16, so encode into an aligned buffer and copy
        return out.copy_(_launch_encode(src, colmap, scale, t, e, inliers, inv_scale, outliers, torch.empty_like(out),
                                        bits=bits, max_input=max_input, flag=flag, range_flag=range_flag,
                                        chunks=chunks, variant=variant))
    head, body = out[: 2 * t * nk].view(torch.int16), out[2 * t * nk:]
    n_src = len(src) if colmap is not None else 0
    variant = _check_variant(ENCODE_VARIANT if variant is None else variant, ENCODE_VARIANTS)
    if n_src == 0 and (bits == 8 or (e - nk) % 2 == 0) and variant != "tile":
        _encode_fast(src[0], inliers, inv_scale, outliers, head, body, t, e, bits=bits, max_input=max_input,
                     flag=flag, range_flag=range_flag, chunks=chunks, ps=out.numel() // chunks, variant=variant)
        return out
    common = dict(N=n_src, BITS=bits, HAS_K=nk > 0, FLAG=flag is not None, RANGE=range_flag is not None)
    tables = (inliers if colmap is None else colmap, inv_scale if scale is None else scale, inliers, inv_scale,
              outliers, head, body, inliers if flag is None else flag, inliers if range_flag is None else range_flag)
    if bits == 8 or (e - nk) % 2 == 0:
        rows, cols, warps = tile_config(t, max(e - nk, nk), max(n_src, 2))
        nb = triton.cdiv(e - nk, cols)
        iters = row_iterations(t, rows)
        grid = (triton.cdiv(t, rows * iters), nb + triton.cdiv(nk, cols))
        ps = out.numel() // chunks
        extra = {} if chunks == 1 else {"XS": t * e, "HS": ps // 2, "PS": ps, "CHUNKED": True}
        static_encode_tile_kernel[grid + ((chunks,) if chunks > 1 else ())](
            tuple(src), *tables, t, e, nk, nb, max_input, BT=rows, BC=cols, H16=n_src > 0 and _aligned2(src),
            ITERS=iters, num_warps=warps, **common, **extra, **FP_OPTIONS)
        return out
    assert chunks == 1, "the flat encoder has no batched form"
    # int4 with an odd body row: a byte can hold codes of two tokens, so the flat kernel pairs them
    nbody = (n + 1) // 2
    block, warps = launch_config(max(nbody, t * nk))
    n_body_programs = triton.cdiv(nbody, block)
    static_encode_kernel[(n_body_programs + triton.cdiv(t * nk, block),)](
        tuple(src), *tables, t, e, nk, n_body_programs, max_input, BLOCK=block, num_warps=warps, **common,
        **FP_OPTIONS)
    return out


def encode(x, inliers, inv_scale, outliers, out, *, bits: int, max_input: float, flag=None, range_flag=None,
           variant: str | None = None):
    """Fill ``out`` (the whole payload, uint8) from ``x [T, E]``; tables are int32/fp32 on x's device.

    Finite values beyond ``max_input`` saturate; ``flag`` / ``range_flag`` (int32, optional)
    are set to 1 if ``x`` holds NaN/Inf / finite values beyond ``max_input``. ``variant``: "tile" or
    "fast" kernels, default :data:`ENCODE_VARIANT` (same bytes).
    """
    t, e = x.shape
    return _launch_encode([x], None, None, t, e, inliers, inv_scale, outliers, out, bits=bits, max_input=max_input,
                          flag=flag, range_flag=range_flag, variant=variant)


def feedback_fits(e: int, nk: int, bits: int, out, *, variant: str | None = None) -> bool:
    """Whether :func:`encode_feedback` runs for a ``[T, e]`` message with ``nk`` bf16 channels into
    ``out`` (the fast encoders: not the "tile" variant, an even int4 body row, an aligned head)."""
    return (_check_variant(ENCODE_VARIANT if variant is None else variant, ENCODE_VARIANTS) != "tile"
            and (bits == 8 or (e - nk) % 2 == 0) and not (nk and out is not None and out.data_ptr() % 2))


def encode_feedback(x, carry, inliers, inv_scale, scale, outliers, out, nxt, *, bits: int, max_input: float,
                    flag=None, range_flag=None, variant: str | None = None):
    """Error feedback fused into the encoder: ``out`` gets :func:`encode` of ``x + carry`` (fp32;
    ``carry`` None: of ``x``) and ``nxt [T, E]`` fp32 what its decode lost, ``sent - decode``
    with +0.0 where not finite (``scale``: the inliers' fp32 scales, as the decoder's). One read
    of ``x`` and ``carry``, where encode, decode and the difference took five passes. Only the
    fast encoders have it: the caller checks :func:`feedback_fits` first."""
    t, e = x.shape
    nk = outliers.numel()
    assert feedback_fits(e, nk, bits, out, variant=variant), "no fused feedback encoder for this message"
    if t:
        _encode_fast(x, inliers, inv_scale, outliers, out[: 2 * t * nk].view(torch.int16), out[2 * t * nk:], t, e,
                     bits=bits, max_input=max_input, flag=flag, range_flag=range_flag, chunks=1, ps=out.numel(),
                     variant=variant or ENCODE_VARIANT, feedback=(carry, nxt, scale))
    return out, nxt


def chunks_fit(t: int, e: int, nk: int, bits: int, payload_bytes: int) -> bool:
    """Whether :func:`encode_chunks` / :func:`decode_chunks` take chunks of ``[t, e]`` with ``nk``
    bf16 channels: the tiled encoder (int8 or an even int4 body row) and, with a bf16 head, an
    even payload size (each chunk's head starts 2-byte aligned, as one message's does)."""
    return (bits == 8 or (e - nk) % 2 == 0) and (nk == 0 or payload_bytes % 2 == 0)


def encode_chunks(x, inliers, inv_scale, outliers, out, *, chunks: int, bits: int, max_input: float, flag=None,
                  range_flag=None, variant: str | None = None):
    """Two-shot's N chunk encodes in one launch (:func:`chunks_fit` must hold): ``out`` (``chunks``
    payloads one after another) gets ``encode(x[j*R:(j+1)*R])`` at ``j * payload_nbytes([R, E])``."""
    t, e = x.shape
    return _launch_encode([x], None, None, t // chunks, e, inliers, inv_scale, outliers, out, bits=bits,
                          max_input=max_input, flag=flag, range_flag=range_flag, chunks=chunks, variant=variant)


def decode_chunks(payload, colmap, scale, out, *, chunks: int, nk: int, bits: int, variant: str | None = None):
    """Two-shot's N chunk decodes in one launch: ``out [chunks * R, E]`` fp32 gets the decode of
    chunk ``j`` of ``payload`` (``chunks`` payloads of ``[R, E]`` one after another) in its rows."""
    t, e = out.shape
    rows = t // chunks
    if rows * e == 0:
        return out
    ps = payload.numel() // chunks
    if _use_fast(DECODE_VARIANT if variant is None else variant, e, nk, bits):
        return _decode_fast([payload], colmap, scale, out, rows, e, nk, bits, variant or DECODE_VARIANT,
                            chunks=chunks, ps=ps)
    bt, cols, warps = tile_config(rows, e, 1)
    iters = row_iterations(rows, bt)
    static_decode_sum_tile_kernel[(triton.cdiv(rows, bt * iters), triton.cdiv(e, cols), chunks)](
        (payload,), colmap, scale, out, rows, e, nk, N=1, BITS=bits, BT=bt, BE=cols,
        H16=_aligned2([payload]) and ps % 2 == 0, ROW_BYTES=bits == 8 or (e - nk) % 2 == 0, ITERS=iters,
        PS=ps, OS=rows * e, CHUNKED=True, num_warps=warps, **FP_OPTIONS)
    return out


# Two-shot's owner stage: "fused" runs :func:`reduce_encode` (one kernel, the fp32 sum never in
# memory), "split" has the codec run decode-and-sum into an fp32 buffer, then encode (the fast
# kernels above; same bytes). The fused kernel predates the fast kernels and gathers every value
# through the channel map; scripts/gpu_reduce_split.py timed split 1.3-5.6x faster on one H100
# (worlds 2-8, docs/bench/gpu_reduce_split_h100_stop26_run2.md).
REDUCE_VARIANT = "split"  # one of triton_common.REDUCE_VARIANTS


def reduce_encode(payloads, colmap, scale, inliers, inv_scale, outliers, out, *, t: int, e: int, bits: int,
                  max_input: float, flag=None, range_flag=None):
    """Fill ``out`` with encode(sum of the decoded ``payloads``) of a ``[t, e]`` chunk in one pass:
    ``colmap``/``scale`` as :func:`decode_sum` (the sources), the rest as :func:`encode` (``"sum"``)."""
    return _launch_encode(list(payloads), colmap, scale, t, e, inliers, inv_scale, outliers, out, bits=bits,
                          max_input=max_input, flag=flag, range_flag=range_flag)


def decode_sum(payloads, colmap, scale, out, *, nk: int, bits: int, variant: str | None = None):
    """Fill ``out [T, E]`` fp32 with the rank-ordered sum of the decoded ``payloads``.
    ``variant``: "tile" or "fast" kernels, default :data:`DECODE_VARIANT` (same sums)."""
    t, e = out.shape
    if t * e == 0:
        return out
    variant = _auto_sources(DECODE_VARIANT if variant is None else variant, len(payloads))
    if _use_fast(variant, e, nk, bits):
        return _decode_fast(list(payloads), colmap, scale, out, t, e, nk, bits, variant)
    rows, cols, warps = tile_config(t, e, len(payloads))
    iters = row_iterations(t, rows)
    static_decode_sum_tile_kernel[(triton.cdiv(t, rows * iters), triton.cdiv(e, cols))](
        tuple(payloads), colmap, scale, out, t, e, nk, N=len(payloads), BITS=bits, BT=rows, BE=cols,
        H16=_aligned2(payloads), ROW_BYTES=bits == 8 or (e - nk) % 2 == 0, ITERS=iters, num_warps=warps,
        **FP_OPTIONS)
    return out


# ---------------------------------------------------------------- fast kernels (issue 8, stop 21)
# The tile kernels above load every code (and scale, and bf16 value) of a tile element by element
# through the channel map, with a mask and a 64-bit address per value and source; Triton 3.6 (the
# GPU machine's) gives their decode-and-sum 223 registers and layout conversions through shared
# memory (12.5 % occupancy; the H200 measured 22-28 % of a copy for every static codec).
#
# * No bf16 channels (int4 with an even E, int8): the channel map is the identity, so codes,
#   scales and ``x`` load as contiguous 16-byte vectors of the tile's own columns; a byte's two
#   int4 codes come from the even and odd columns (as in triton_group). No gather at all.
# * bf16 channels: 1-D column vectors. A program loads each source's per-column tables once
#   (code byte pointer, nibble shift, bf16 pointer, scale; for the encoder the inlier channel and
#   reciprocal), then walks ``BT <= T`` rows in straight-line code at constant offsets from its
#   first row: per value and source one unmasked code load and one bf16 load predicated on the
#   bf16 channels, no address work (the last program of a ragged T starts at T - BT). No 2-D
#   tile, so no layout conversion, and no tables re-read per row.
#
# ``DECODE_VARIANT`` / ``ENCODE_VARIANT`` pick the kernels: "tile" the kernels above, "fast" (and
# "auto") these; scripts/sweep_static.py sets them to time both in one process. The bytes and sums
# do not depend on the choice.
DECODE_VARIANT = "auto"
DECODE_VARIANTS = ("auto", "tile", "fast", "fast-b", "src", "src-c", "src-2")
# Decode-and-sum variants of stop 22: the row-walking decode with sources outside and rows inside
# (static_decode_sum_rows_src_kernel; "src-c" also puts the column blocks on grid axis 0); without
# bf16 channels the window decode with a run-time loop over sources (static_decode_sum_win_loop_kernel,
# the same for both). "auto" runs "src" above 4 sources (AUTO_MANY), "fast" up to 4.
# "src" and "src-c" read each value with one 16-bit load where the payloads allow (ONE16), "src-2"
# with the code byte and the predicated bf16 load of "fast" (to tell the two changes apart).
SRC_VARIANTS = ("src", "src-c", "src-2")
ENCODE_VARIANT = "auto"
ENCODE_VARIANTS = ("auto", "tile", "fast", "fast-b")
AUTO = "fast"  # the variant "auto" runs (decode-and-sum: up to 4 sources)
# "auto"'s decode-and-sum of more than 4 sources (FAST_TILES' third bucket). The H100 sweeps of
# stop 24 (scripts/sweep_static.py; docs/bench/sweep_static_h100_stop24_run{1,2}.md; fraction of a
# same-size copy at [2048, 8192] / [8192, 8192], GPU time alone), "src" against "fast":
#   8 sources: int4-outlier 0.418 / 0.411 against 0.147 / 0.121; int8 0.898 / 0.899 against 0.782 / 0.777;
#   4 sources: int4-outlier 0.344 / 0.374 against 0.490 / 0.472; int8 0.834 / 0.844 against 0.820 / 0.856;
#   3 sources: int4-outlier 0.431 / 0.450 against 0.552 / 0.546; int8 1.045 / 0.932 against 1.029 / 0.909;
#   2 sources: int4-outlier 0.602 / 0.629 against 0.652 / 0.643; int8 0.921 / 0.926 against 0.921 / 0.927.
# 5-7 sources were not timed; they share the 8-source tiles, where "fast" collapses.
AUTO_MANY = "src"
# Tile shapes (rows, columns) of the fast kernels per variant: "fast-b" is the alternative the
# sweep times next to "fast". "dec_win" and "dec_rows" per source count (<= 2, <= 4, more).
# Picked from the H200 sweep of stop 21 (scripts/sweep_static.py, run 2, int4-outlier, fraction of
# a same-size copy at [2048, 8192] / [8192, 8192]): dec_rows 16 x 256 0.536 / 0.548 against
# 8 x 512 0.411 / 0.433 at world 2; at world 8 16 x 128 0.113 / 0.098 against 32 x 128 0.114 /
# 0.093 (a tie at 2048 rows; 16 x 128 has half the unrolled code); enc_rows 16 x 512 0.626 / 0.739
# against 8 x 1024 0.608 / 0.682. The int4/int8 rows of that run were cut by its time budget:
# dec_win and enc_win were picked by compile-time evidence (ptx_stats, Triton 3.6); run 6 then measured
# them at 83-94% of a copy (encode) and 73-90% (decode-and-sum, world 2).
FAST_TILES = {
    "fast": {"dec_win": ((8, 512), (4, 512), (2, 512)), "dec_rows": ((16, 256), (16, 128), (16, 128)),
             "enc_win": (8, 512), "enc_rows": (16, 512)},
    "fast-b": {"dec_win": ((4, 512), (4, 512), (4, 512)), "dec_rows": ((8, 512), (16, 256), (32, 128)),
               "enc_win": (4, 512), "enc_rows": (8, 1024)},
}
# The "src" variants' row tiles: ptxas sm_90a, Triton 3.6, int4-outlier [8192, 8192]
# (docs/bench/ptx_world8_stop22.md; global loads a thread / in flight a thread, mean): "fast" world 2
# 16 x 256 40 registers, 134 / 4.6; world 8 16 x 128 64, 272 / 2.7. "src" (one 16-bit load a value)
# world 2 16 x 256 56, 70 / 11.1; world 8 8 x 128 64, 80 / 15.8 (16 x 128: 168 registers). "src-2"
# (two loads a value as "fast") world 2 16 x 256 90, 134 / 21.5; world 8 16 x 128 96, 272 / 29.3.
# Without bf16 channels they run static_decode_sum_win_loop_kernel (a run-time source loop), whose
# code does not grow with N, so every world keeps world 2's 8 x 512 tile: world 8 74 registers,
# 16-byte code loads, ~81 SASS a value counting the loop's 7 trips (the unrolled 2 x 512: 48, byte
# loads, 95).
FAST_TILES["src"] = {**FAST_TILES["fast"], "dec_rows": ((16, 256), (16, 128), (8, 128)),
                     "dec_win": ((8, 512), (8, 512), (8, 512))}
FAST_TILES["src-2"] = {**FAST_TILES["src"], "dec_rows": ((16, 256), (16, 128), (16, 128))}
FAST_TILES["src-c"] = FAST_TILES["src"]


# The row-walking kernels take at most tokens / SHORT_ROWS rows a program (a short message keeps
# programs enough to spread over the SMs); the tests lower it to reach several rows on tiny inputs.
SHORT_ROWS = 32


def _fast_rows(rows: int, tokens: int) -> int:
    return max(1, min(rows, triton.next_power_of_2(max(tokens, 1)) // SHORT_ROWS))


def _auto_sources(variant: str, sources: int) -> str:
    """The decode-and-sum variant ``variant`` names for ``sources`` payloads: "auto" is
    :data:`AUTO_MANY` above 4 sources; any other name is itself."""
    return AUTO_MANY if variant == "auto" and sources > 4 else variant


def _check_variant(variant: str, known) -> str:
    if variant not in known:
        raise ValueError(f"kernel variant must be one of {known}, got {variant!r}")
    return AUTO if variant == "auto" else variant


def win_tile_config(tokens: int, hidden: int, sources: int, variant: str = "auto") -> tuple[int, int, int]:
    """(rows, columns, warps) of :func:`static_decode_sum_win_kernel`: the variant's tile for the
    source count, at most the message's rows (rounded up to a power of two). ptxas sm_90a,
    Triton 3.6, int4 [8192, 8192]: 2 sources 8 x 512 88 registers, 22 SASS/value, 4 x 512 48,
    25 (the tile kernel: 223, 81); 8 sources 2 x 512 48, 95, 4 x 512 128, 82 (tile: 56, 480)."""
    shapes = FAST_TILES[_check_variant(variant, DECODE_VARIANTS)]["dec_win"]
    rows, cols = shapes[0] if sources <= 2 else shapes[1] if sources <= 4 else shapes[2]
    cols = min(cols, max(32, triton.next_power_of_2(max(hidden, 2))))
    return max(1, min(triton.next_power_of_2(max(tokens, 1)), rows)), cols, 4


def rows_tile_config(tokens: int, hidden: int, sources: int, variant: str = "auto") -> tuple[int, int, int]:
    """(rows, columns, warps) of :func:`static_decode_sum_rows_kernel`: fewer columns a thread as
    sources grow (per source and column about 7 table registers), up to 32 rows a program, at
    most ``tokens / SHORT_ROWS`` (a short message still spreads over the SMs) and ``tokens``.
    ptxas sm_90a, Triton 3.6, int4-outlier [8192, 8192]: 2 sources 16 x 256 40 registers, 28
    SASS/value (8 x 512: 66, 31); 8 sources 16 x 128 64, 116 (32 x 128: 64, 108); no spills, no
    shared memory (the tile kernel: 223 registers, 81 SASS/value; 56, 480 with 164 shared-memory
    accesses). Measured on the H200: :data:`FAST_TILES`."""
    shapes = FAST_TILES[_check_variant(variant, DECODE_VARIANTS)]["dec_rows"]
    rows, cols = shapes[0] if sources <= 2 else shapes[1] if sources <= 4 else shapes[2]
    cols = min(cols, max(32, triton.next_power_of_2(max(hidden, 2))))
    return min(_fast_rows(rows, tokens), max(tokens, 1)), cols, 4


@triton.jit
def _win_rank(p, r, scale_ptr, t, mt, ce, co, E, RB, BITS: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr):
    """Decoded values of source ``r`` (no bf16 channels) at the even (``ce``) and odd (``co``)
    columns ``[1, BE/2]`` of the rows ``t``: two fp32 ``[BT, BE/2]``."""
    H: tl.constexpr = BE // 2
    SENT: tl.constexpr = -8 if BITS == 4 else -128
    sce = tl.load(scale_ptr + r * E + ce, mask=ce < E, other=1.0)
    sco = tl.load(scale_ptr + r * E + co, mask=co < E, other=1.0)
    if BITS == 4:  # E even: byte i of the row holds columns 2i, 2i + 1
        bi = tl.program_id(1) * H + tl.arange(0, H)[None, :]
        b = tl.load(p + t * RB + bi, mask=mt & (bi < RB), other=0).to(tl.int32)
        qe = (b << 28) >> 28
        qo = (b << 24) >> 28
    else:
        c = tl.program_id(1) * BE + tl.arange(0, BE)[None, :]
        b = tl.load(p + t * RB + c, mask=mt & (c < RB), other=0).to(tl.int8, bitcast=True)
        qe, qo = tl.split(tl.reshape(b.to(tl.int32), [BT, H, 2]))
    ve = tl.where(qe == SENT, float("nan"), qe.to(tl.float32) * sce)
    vo = tl.where(qo == SENT, float("nan"), qo.to(tl.float32) * sco)
    return ve, vo


@triton.jit
def static_decode_sum_win_kernel(payloads, scale_ptr, out_ptr, T, E, RB: tl.constexpr, N: tl.constexpr,
                                 BITS: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, PS=0, OS=0,
                                 CHUNKED: tl.constexpr = False):
    """``out[t, e] = sum_r decode(payloads[r])[t, e]`` in fp32, rank order, written once, for
    codecs without bf16 channels, one ``BT x BE`` tile per program: 16-byte code loads of the
    tile's own columns. ``RB`` = bytes of a body row (int4: ``E / 2``, E even; int8: ``E``),
    a constexpr so that rows are known 16-byte aligned where they are. ``CHUNKED`` (``N == 1``)
    as :func:`static_decode_sum_tile_kernel`."""
    payloads, out_ptr = chunk_bases(payloads, out_ptr, PS, OS, CHUNKED)
    H: tl.constexpr = BE // 2
    t = tl.program_id(0) * BT + tl.arange(0, BT)[:, None]
    mt = t < T
    ce = tl.program_id(1) * BE + 2 * tl.arange(0, H)[None, :]
    co = ce + 1
    for r in tl.static_range(N):
        ve, vo = _win_rank(payloads[r], r, scale_ptr, t, mt, ce, co, E, RB, BITS, BT, BE)
        if r == 0:
            acc_e = ve
            acc_o = vo
        else:
            acc_e = acc_e + ve
            acc_o = acc_o + vo
    v = tl.reshape(tl.join(acc_e, acc_o), [BT, BE])
    c = tl.program_id(1) * BE + tl.arange(0, BE)[None, :]
    tl.store(out_ptr + t * E + c, as_stored(v, out_ptr), mask=mt & (c < E))


@triton.jit
def static_decode_sum_win_loop_kernel(payloads, scale_ptr, out_ptr, T, E, RB: tl.constexpr, N: tl.constexpr,
                                      BITS: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, PS=0, OS=0,
                                      CHUNKED: tl.constexpr = False):
    """:func:`static_decode_sum_win_kernel` with a run-time loop over sources 1..N-1 (variants
    "src", "src-c"): the fp32 accumulator tile stays in registers, one source's codes and scales
    are live at a time, and the code is one source's body whatever ``N``, so a world-8 decode can
    keep world 2's wide tile (16-byte code loads) instead of the unrolled kernel's 2-row one.
    Rank order as before: ``acc = v_0``, then ``acc + v_r`` for r = 1, 2, ... (same bits)."""
    payloads, out_ptr = chunk_bases(payloads, out_ptr, PS, OS, CHUNKED)
    t = tl.program_id(0) * BT + tl.arange(0, BT)[:, None]
    mt = t < T
    ce = tl.program_id(1) * BE + 2 * tl.arange(0, BE // 2)[None, :]
    co = ce + 1
    acc_e, acc_o = _win_rank(payloads[0], 0, scale_ptr, t, mt, ce, co, E, RB, BITS, BT, BE)
    for r in tl.range(1, N):
        ve, vo = _win_rank(payload_at(payloads, r, N), r, scale_ptr, t, mt, ce, co, E, RB, BITS, BT, BE)
        acc_e = acc_e + ve
        acc_o = acc_o + vo
    v = tl.reshape(tl.join(acc_e, acc_o), [BT, BE])
    c = tl.program_id(1) * BE + tl.arange(0, BE)[None, :]
    tl.store(out_ptr + t * E + c, as_stored(v, out_ptr), mask=mt & (c < E))


@triton.jit
def static_decode_sum_rows_kernel(payloads, colmap_ptr, scale_ptr, out_ptr, T, E: tl.constexpr, NK: tl.constexpr,
                                  HEADB, RB: tl.constexpr, N: tl.constexpr, BITS: tl.constexpr, BT: tl.constexpr,
                                  BE: tl.constexpr, H16: tl.constexpr, PS=0, OS=0, CHUNKED: tl.constexpr = False):
    """The decode-and-sum of codecs with bf16 channels as 1-D column vectors: each source's slot
    and scale of the ``BE`` columns are loaded once and turned into per-column code and bf16
    pointers at the program's first row, then ``BT <= T`` rows are walked in straight-line code,
    row ``k`` at constant offsets ``k * RB`` / ``k * NK`` / ``k * E`` from them (``E``, ``NK``,
    ``RB``: constexprs), unmasked: no 2-D tile, so no layout conversion, and no address work
    per value. The last program of a ragged ``T`` starts at ``T - BT`` and rewrites some of its
    neighbour's rows with the same values instead of masking."""
    payloads, out_ptr = chunk_bases(payloads, out_ptr, PS, OS, CHUNKED)
    NI: tl.constexpr = E - NK
    c = tl.program_id(1) * BE + tl.arange(0, BE)
    mc = c < E
    t0 = tl.minimum(tl.program_id(0) * BT, T - BT)
    codes = ()  # per source, per column: code byte pointer at row t0, nibble shift, bf16 pointer, is bf16, scale
    shifts = ()
    heads = ()
    kept = ()
    scales = ()
    for r in tl.static_range(N):  # the tables, once per program
        p = payloads[r]
        slot = tl.load(colmap_ptr + r * E + c, mask=mc, other=0)  # a column past E: slot 0, thrown away
        inl = slot >= 0
        z = tl.where(inl, slot, 0)  # a bf16 channel reads slot 0's code, thrown away below
        if BITS == 4:
            codes = codes + (p + HEADB + t0 * RB + (z >> 1),)
            shifts = shifts + (28 - 4 * (z & 1),)
        else:
            codes = codes + (p + HEADB + t0 * RB + z,)
            shifts = shifts + (24,)
        h = tl.where(inl, 0, -1 - slot)  # the bf16 index (0 for a quantized channel: not read)
        if H16:
            heads = heads + (p.to(tl.pointer_type(tl.int16)) + t0 * NK + h,)
        else:
            heads = heads + (p + 2 * (t0 * NK + h),)
        kept = kept + (~inl,)
        scales = scales + (tl.load(scale_ptr + r * NI + z, mask=mc, other=1.0),)
    dst = out_ptr + t0 * E + c
    for k in tl.static_range(BT):
        for r in tl.static_range(N):
            b = tl.load(codes[r] + k * RB).to(tl.int32)
            q = (b << shifts[r]) >> 28 if BITS == 4 else (b << 24) >> 24
            v = tl.where(q == (-8 if BITS == 4 else -128), float("nan"), q.to(tl.float32) * scales[r])
            if H16:
                hb = tl.load(heads[r] + k * NK, mask=kept[r]).to(tl.int32)  # sign bits: masked off below
            else:
                hb = load_u16(heads[r], 2 * k * NK, kept[r])
            v = tl.where(kept[r], bf16_from_bits(hb), v)
            if r == 0:
                acc = v
            else:
                acc = acc + v
        tl.store(dst + k * E, as_stored(acc, dst), mask=mc)


@triton.jit
def static_decode_sum_rows_src_kernel(payloads, colmap_ptr, scale_ptr, out_ptr, T, E: tl.constexpr,
                                      NK: tl.constexpr, HEADB, RB: tl.constexpr, N: tl.constexpr, BITS: tl.constexpr,
                                      BT: tl.constexpr, BE: tl.constexpr, H16: tl.constexpr,
                                      COLS_FIRST: tl.constexpr, PS=0, OS=0, CHUNKED: tl.constexpr = False,
                                      ONE16: tl.constexpr = False):
    """:func:`static_decode_sum_rows_kernel` with the loops swapped (variants "src" and "src-c"):
    sources outside, rows inside. Each source's per-column tables are loaded, used for the ``BT``
    rows and dropped before the next source's, and ``BT`` fp32 accumulators (one per row) stay
    in registers, each summed in rank order as before (``acc_k = v_0``, then ``+ v_1``, ...), so
    the sums are the same bits. Live state is the accumulators plus one source's tables instead
    of every source's tables (at world 8 the row-major kernel holds 8 sets), and a source's
    ``BT`` code loads are independent of each other, so more loads can be in flight
    (scripts/ptx_stats.py's ``ldg_in_flight``). ``COLS_FIRST``: grid axis 0 is the column
    block, so programs launched together cover whole rows of the payloads and the output
    rather than one column block of many rows (a guess at DRAM locality, for the GPU sweep).
    ``ONE16`` (payloads 2-byte aligned, ``H16``, and an even body row ``RB``): one aligned 16-bit
    load per value and source instead of a code byte plus a predicated bf16 load: a quantized
    column reads the 16-bit word holding its code byte (body offsets are even, so the word lies
    inside the payload), a bf16 column its kept value, through one per-column pointer that moves
    ``RB / 2`` or ``NK`` words a row."""
    payloads, out_ptr = chunk_bases(payloads, out_ptr, PS, OS, CHUNKED)
    NI: tl.constexpr = E - NK
    if COLS_FIRST:
        cb = tl.program_id(0)
        rb = tl.program_id(1)
    else:
        rb = tl.program_id(0)
        cb = tl.program_id(1)
    c = cb * BE + tl.arange(0, BE)
    mc = c < E
    t0 = tl.minimum(rb * BT, T - BT)
    dst = out_ptr + t0 * E + c
    TOP: tl.constexpr = 28 if BITS == 4 else 24  # ONE16: a code's sign bit is moved to bit 31
    accs = ()
    for r in tl.static_range(N):
        p = payloads[r]
        slot = tl.load(colmap_ptr + r * E + c, mask=mc, other=0)  # a column past E: slot 0, thrown away
        inl = slot >= 0
        z = tl.where(inl, slot, 0)  # a bf16 channel reads slot 0's code, thrown away below
        if BITS == 4:
            code = p + HEADB + t0 * RB + (z >> 1)
            shift = 28 - 4 * (z & 1)
        else:
            code = p + HEADB + t0 * RB + z
            shift = 24
        h = tl.where(inl, 0, -1 - slot)  # the bf16 index (0 for a quantized channel: not read)
        if H16:
            head = p.to(tl.pointer_type(tl.int16)) + t0 * NK + h
        else:
            head = p + 2 * (t0 * NK + h)
        kept = ~inl
        scale = tl.load(scale_ptr + r * NI + z, mask=mc, other=1.0)
        if ONE16:  # the int16 word of code byte zb (bit 8 * (zb & 1) up) or of the bf16 value
            zb = (z >> 1) if BITS == 4 else z
            lsh = TOP - 8 * (zb & 1) - (4 * (z & 1) if BITS == 4 else 0)
            p16 = p.to(tl.pointer_type(tl.int16))
            word = tl.where(kept, p16 + t0 * NK + h, p16 + (HEADB // 2 + t0 * (RB // 2)) + (zb >> 1))
            step = tl.where(kept, NK, RB // 2)
        new = ()
        for k in tl.static_range(BT):
            if ONE16:
                w = tl.load(word).to(tl.int32)  # sign bits: shifted out below
                word += step
                q = (w << lsh) >> TOP
                v = tl.where(q == (-8 if BITS == 4 else -128), float("nan"), q.to(tl.float32) * scale)
                v = tl.where(kept, bf16_from_bits(w), v)
            else:
                b = tl.load(code + k * RB).to(tl.int32)
                q = (b << shift) >> 28 if BITS == 4 else (b << 24) >> 24
                v = tl.where(q == (-8 if BITS == 4 else -128), float("nan"), q.to(tl.float32) * scale)
                if H16:
                    hb = tl.load(head + k * NK, mask=kept).to(tl.int32)  # sign bits: masked off below
                else:
                    hb = load_u16(head, 2 * k * NK, kept)
                v = tl.where(kept, bf16_from_bits(hb), v)
            if r > 0:
                v = accs[k] + v
            if r == N - 1:
                tl.store(dst + k * E, as_stored(v, dst), mask=mc)
            new = new + (v,)
        accs = new


def _use_fast(variant: str, e: int, nk: int, bits: int) -> bool:
    """Whether a fast decode-and-sum runs: asked for (not "tile"), some channel is quantized (with
    every channel kept in bf16 there is no code or scale to read) and every body row starts at a
    byte (int8, or an even ``E - NK``; an odd int4 row keeps the tile kernel)."""
    return (_check_variant(variant, DECODE_VARIANTS) != "tile" and e > nk
            and (bits == 8 or (e - nk) % 2 == 0))


def _decode_fast(payloads, colmap, scale, out, t, e, nk, bits, variant, *, chunks=1, ps=0):
    """The fast decode-and-sum over ``out [chunks * t, E]`` (``chunks > 1``: one payload of
    ``chunks`` chunk payloads ``ps`` bytes apart, as :func:`decode_chunks`)."""
    n = len(payloads)
    extra = {} if chunks == 1 else {"PS": ps, "OS": t * e, "CHUNKED": True}
    rb = (e - nk) // 2 if bits == 4 else e - nk
    if nk:
        rows, cols, warps = rows_tile_config(t, e, n, variant)
        grid = (triton.cdiv(t, rows), triton.cdiv(e, cols)) + ((chunks,) if chunks > 1 else ())
        h16 = _aligned2(payloads) and (chunks == 1 or ps % 2 == 0)
        v = _check_variant(variant, DECODE_VARIANTS)
        if v in SRC_VARIANTS:
            cols_first = v == "src-c" and grid[0] <= 65535  # grid axis 1 holds at most 65535 blocks
            if cols_first:
                grid = (grid[1], grid[0]) + grid[2:]
            static_decode_sum_rows_src_kernel[grid](tuple(payloads), colmap, scale, out, t, E=e, NK=nk,
                                                    HEADB=2 * t * nk, RB=rb, N=n, BITS=bits, BT=rows, BE=cols,
                                                    H16=h16, COLS_FIRST=cols_first,
                                                    ONE16=h16 and rb % 2 == 0 and v != "src-2", num_warps=warps,
                                                    **extra, **FP_OPTIONS)
            return out
        static_decode_sum_rows_kernel[grid](tuple(payloads), colmap, scale, out, t, E=e, NK=nk, HEADB=2 * t * nk,
                                            RB=rb, N=n, BITS=bits, BT=rows, BE=cols, H16=h16, num_warps=warps,
                                            **extra, **FP_OPTIONS)
    else:
        rows, cols, warps = win_tile_config(t, e, n, variant)
        grid = (triton.cdiv(t, rows), triton.cdiv(e, cols)) + ((chunks,) if chunks > 1 else ())
        kernel = static_decode_sum_win_loop_kernel if _check_variant(variant, DECODE_VARIANTS) in SRC_VARIANTS \
            else static_decode_sum_win_kernel
        kernel[grid](tuple(payloads), scale, out, t, e, RB=rb, N=n, BITS=bits, BT=rows, BE=cols, num_warps=warps,
                     **extra, **FP_OPTIONS)
    return out


@triton.jit
def _codes(x, inv, fin, max_in, QMAX: tl.constexpr):
    """int32 codes of fp32 ``x`` (``fin``: is_finite(x)): the reference's saturate, scale, clamp
    and round half even, NaN/Inf -> the sentinel. min/max stand for the clamps: same bits for
    finite values, and a non-finite value's result is replaced by the sentinel."""
    y = tl.minimum(tl.maximum(tl.minimum(tl.maximum(x, -max_in), max_in) * inv, -QMAX * 1.0), QMAX * 1.0)
    # round half to even by one add (RINT_MAGIC; |y| <= 127 here): the integer is the bit
    # pattern less the magic constant's (0x4B400000)
    return tl.where(fin, (y + RINT_MAGIC).to(tl.int32, bitcast=True) - 0x4B400000, -QMAX - 1)


@triton.jit
def _error(x, q, scale):
    """Error feedback's compensation of one quantized value: ``x - q * scale`` (the sent value
    less its decode, in fp32, as two roundings: no fused multiply-add), +0.0 where not finite
    (the sentinel code of a NaN/Inf ``x`` included): :func:`lowbit_tp.collectives.feedback.feedback_of`."""
    r = x - q.to(tl.float32) * scale
    return tl.where(is_finite(r), r, 0.0)


@triton.jit
def _enc_codes(x, inv, m, max_in, flag_ptr, range_ptr, QMAX: tl.constexpr, FLAG: tl.constexpr, RANGE: tl.constexpr):
    """int32 codes of fp32 ``x`` (the reference's saturate, scale, clamp, round half even; NaN/Inf
    -> the sentinel), NaN/Inf and out-of-range values recorded once per program (``flag_any``).
    min/max stand for the clamps: same bits for finite values, and a non-finite value's result
    is replaced by the sentinel."""
    fin = is_finite(x)
    if FLAG:
        flag_any(flag_ptr, m & ~fin)
    if RANGE:
        flag_any(range_ptr, m & fin & (tl.abs(x) > max_in))
    return _codes(x, inv, fin, max_in, QMAX)


@triton.jit
def static_encode_win_kernel(src, inv_ptr, body_ptr, flag_ptr, range_ptr, T, max_in, E: tl.constexpr,
                             BITS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, FLAG: tl.constexpr,
                             RANGE: tl.constexpr, XS=0, PS=0, CHUNKED: tl.constexpr = False, carry_ptr=0,
                             next_ptr=0, scale_ptr=0, CARRY: tl.constexpr = False, FEEDBACK: tl.constexpr = False):
    """Encode a partial ``src[0] [T, E]`` without bf16 channels (int4 with an even E, int8), one
    ``BT x BC`` tile per program: contiguous 16-byte loads of ``x`` and of the reciprocal
    scales, a byte's two int4 codes from the even and odd columns (as triton_group's encoder).
    ``CHUNKED`` as :func:`static_encode_tile_kernel`. ``CARRY``/``FEEDBACK``: error feedback
    fused in (:func:`encode_feedback`)."""
    src, body_ptr = chunk_bases(src, body_ptr, XS, PS, CHUNKED)
    H: tl.constexpr = BC // 2
    QMAX: tl.constexpr = 7 if BITS == 4 else 127
    t = tl.program_id(0) * BT + tl.arange(0, BT)[:, None]
    mt = t < T
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    m = mt & (c < E)[None, :]
    x = tl.load(src[0] + t * E + c[None, :], mask=m, other=0.0).to(tl.float32)
    if CARRY:
        x = x + tl.load(carry_ptr + t * E + c[None, :], mask=m, other=0.0)
    inv = tl.load(inv_ptr + c, mask=c < E, other=1.0)
    if BITS == 4:
        xe, xo = tl.split(tl.reshape(x, [BT, H, 2]))
        ie, io = tl.split(tl.reshape(inv, [H, 2]))
        qe = _enc_codes(xe, ie[None, :], mt, max_in, flag_ptr, range_ptr, QMAX, FLAG, RANGE)
        qo = _enc_codes(xo, io[None, :], mt, max_in, flag_ptr, range_ptr, QMAX, FLAG, RANGE)
        bi = tl.program_id(1) * H + tl.arange(0, H)[None, :]
        tl.store(body_ptr + t * (E // 2) + bi, ((qe & 0xF) | ((qo & 0xF) << 4)).to(tl.uint8), mask=mt & (bi < E // 2))
        if FEEDBACK:
            se, so = tl.split(tl.reshape(tl.load(scale_ptr + c, mask=c < E, other=1.0), [H, 2]))
            r = tl.reshape(tl.join(_error(xe, qe, se[None, :]), _error(xo, qo, so[None, :])), [BT, BC])
            tl.store(next_ptr + t * E + c[None, :], r, mask=m)
    else:
        q = _enc_codes(x, inv[None, :], m, max_in, flag_ptr, range_ptr, QMAX, FLAG, RANGE)
        tl.store(body_ptr + t * E + c[None, :], (q & 0xFF).to(tl.uint8), mask=m)
        if FEEDBACK:
            sc = tl.load(scale_ptr + c, mask=c < E, other=1.0)
            tl.store(next_ptr + t * E + c[None, :], _error(x, q, sc[None, :]), mask=m)


@triton.jit
def static_encode_rows_kernel(src, inl_ptr, inv_ptr, outl_ptr, head_ptr, body_ptr, flag_ptr, range_ptr, T, NB,
                              max_in, E: tl.constexpr, NK: tl.constexpr, BITS: tl.constexpr, BT: tl.constexpr,
                              BC: tl.constexpr, FLAG: tl.constexpr, RANGE: tl.constexpr, XS=0, HS=0, PS=0,
                              CHUNKED: tl.constexpr = False, carry_ptr=0, next_ptr=0, scale_ptr=0,
                              CARRY: tl.constexpr = False, FEEDBACK: tl.constexpr = False):
    """Encode a partial ``src[0] [T, E]`` with ``NK`` bf16 channels (int4: an even ``E - NK``) as
    1-D column vectors: column blocks ``[0, NB)`` write ``BC`` body slots, the rest ``BC``
    channels of the bf16 head, each over ``BT`` rows in straight-line code after loading the
    block's inlier map and reciprocal scales once; a value costs one unmasked ``x`` load at a
    per-column pointer at the program's first row plus the constant ``k * E`` (``BT <= T``; the
    last program of a ragged ``T`` starts at ``T - BT`` and rewrites some of its neighbour's
    bytes with the same values instead of masking). NaN/Inf (as the NaN of a running sum of
    ``x * 0``) and range hits are gathered over the rows and flagged once a program. ``CHUNKED``
    as :func:`static_encode_tile_kernel`. ``CARRY``/``FEEDBACK``: error feedback fused in
    (:func:`encode_feedback`; ``carry`` and ``next`` are ``[T, E]`` fp32, read and written at
    ``x``'s offsets)."""
    src, body_ptr = chunk_bases(src, body_ptr, XS, PS, CHUNKED)
    if CHUNKED:
        head_ptr += tl.program_id(2) * HS
    NI: tl.constexpr = E - NK
    H: tl.constexpr = BC // 2
    QMAX: tl.constexpr = 7 if BITS == 4 else 127
    t0 = tl.minimum(tl.program_id(0) * BT, T - BT)
    x0 = src[0] + t0 * E  # row t0 of the partial
    c0 = carry_ptr + t0 * E  # row t0 of the carry and of the next carry (FEEDBACK)
    n0 = next_ptr + t0 * E
    cb = tl.program_id(1)
    if cb < NB:
        if BITS == 4:
            i = cb * H + tl.arange(0, H)  # body byte: slots 2i, 2i + 1
            mi = i < NI // 2
            ce = tl.load(inl_ptr + 2 * i, mask=mi, other=0)
            co = tl.load(inl_ptr + 2 * i + 1, mask=mi, other=0)
            ie = tl.load(inv_ptr + 2 * i, mask=mi, other=1.0)
            io = tl.load(inv_ptr + 2 * i + 1, mask=mi, other=1.0)
            xe_ptr = x0 + ce
            xo_ptr = x0 + co
            dst = body_ptr + t0 * (NI // 2) + i
            if FEEDBACK:
                se = tl.load(scale_ptr + 2 * i, mask=mi, other=1.0)
                so = tl.load(scale_ptr + 2 * i + 1, mask=mi, other=1.0)
            bad = tl.zeros([H], dtype=tl.float32)  # NaN once a NaN/Inf went by (x * 0 is NaN just for those)
            big = tl.zeros([H], dtype=tl.int1)
            for k in tl.static_range(BT):
                xe = tl.load(xe_ptr + k * E).to(tl.float32)
                xo = tl.load(xo_ptr + k * E).to(tl.float32)
                if CARRY:
                    xe = xe + tl.load(c0 + ce + k * E)
                    xo = xo + tl.load(c0 + co + k * E)
                fe = is_finite(xe)
                fo = is_finite(xo)
                if FLAG:
                    bad = bad + (xe * 0.0 + xo * 0.0)
                if RANGE:
                    big = big | (fe & (tl.abs(xe) > max_in)) | (fo & (tl.abs(xo) > max_in))
                qe = _codes(xe, ie, fe, max_in, QMAX)
                qo = _codes(xo, io, fo, max_in, QMAX)
                tl.store(dst + k * (NI // 2), ((qe & 0xF) | ((qo & 0xF) << 4)).to(tl.uint8), mask=mi)
                if FEEDBACK:
                    tl.store(n0 + ce + k * E, _error(xe, qe, se), mask=mi)
                    tl.store(n0 + co + k * E, _error(xo, qo, so), mask=mi)
            if FLAG:
                flag_any(flag_ptr, (bad != bad) & mi)
            if RANGE:
                flag_any(range_ptr, big & mi)
        else:
            i = cb * BC + tl.arange(0, BC)
            mi = i < NI
            ch = tl.load(inl_ptr + i, mask=mi, other=0)
            inv = tl.load(inv_ptr + i, mask=mi, other=1.0)
            x_src = x0 + ch
            dst = body_ptr + t0 * NI + i
            if FEEDBACK:
                sc = tl.load(scale_ptr + i, mask=mi, other=1.0)
            bad = tl.zeros([BC], dtype=tl.float32)
            big = tl.zeros([BC], dtype=tl.int1)
            for k in tl.static_range(BT):
                x = tl.load(x_src + k * E).to(tl.float32)
                if CARRY:
                    x = x + tl.load(c0 + ch + k * E)
                f = is_finite(x)
                if FLAG:
                    bad = bad + x * 0.0
                if RANGE:
                    big = big | (f & (tl.abs(x) > max_in))
                q = _codes(x, inv, f, max_in, QMAX)
                tl.store(dst + k * NI, (q & 0xFF).to(tl.uint8), mask=mi)
                if FEEDBACK:
                    tl.store(n0 + ch + k * E, _error(x, q, sc), mask=mi)
            if FLAG:
                flag_any(flag_ptr, (bad != bad) & mi)
            if RANGE:
                flag_any(range_ptr, big & mi)
    else:
        j = (cb - NB) * BC + tl.arange(0, BC)  # (names apart from the body branch's: other shapes)
        mj = j < NK
        chj = tl.load(outl_ptr + j, mask=mj, other=0)
        xh_src = x0 + chj
        hdst = head_ptr + t0 * NK + j
        badj = tl.zeros([BC], dtype=tl.float32)
        bigj = tl.zeros([BC], dtype=tl.int1)
        for k in tl.static_range(BT):
            xh = tl.load(xh_src + k * E).to(tl.float32)
            if CARRY:
                xh = xh + tl.load(c0 + chj + k * E)
            fh = is_finite(xh)
            if FLAG:
                badj = badj + xh * 0.0
            if RANGE:
                bigj = bigj | (fh & (tl.abs(xh) > max_in))
            hb = bf16_bits(saturate(xh, max_in))
            tl.store(hdst + k * NK, hb.to(tl.int16), mask=mj)
            if FEEDBACK:  # the kept value's decode is its bf16: the bits in the high half of an fp32
                rh = xh - (hb << 16).to(tl.float32, bitcast=True)
                tl.store(n0 + chj + k * E, tl.where(is_finite(rh), rh, 0.0), mask=mj)
        if FLAG:
            flag_any(flag_ptr, (badj != badj) & mj)
        if RANGE:
            flag_any(range_ptr, bigj & mj)


def _encode_fast(x, inliers, inv_scale, outliers, head, body, t, e, *, bits, max_input, flag, range_flag, chunks,
                 ps, variant, feedback=None):
    """The fast encoders (one partial, no fused reduce) over ``chunks`` chunks of ``t`` rows.
    ptxas sm_90a, Triton 3.6, [8192, 8192], FLAG: int4 8 x 512 80 registers, 22.5 SASS/value
    (4 x 512: 48, 26.5); int4-outlier 8 x 512 39, 48 (8 x 1024: 72, 43); the tile kernel without
    FLAG 80, 48.5 and 115, 53.5."""
    nk = outliers.numel()
    tiles = FAST_TILES[_check_variant(variant, ENCODE_VARIANTS)]
    common = dict(BITS=bits, FLAG=flag is not None, RANGE=range_flag is not None, num_warps=4, **FP_OPTIONS)
    if feedback is not None:  # (carry or None, next, scale): encode_feedback
        assert chunks == 1, "error feedback is fused for one message (the carry has no chunk offset)"
        carry, nxt, scale = feedback
        common.update(carry_ptr=nxt if carry is None else carry, next_ptr=nxt, scale_ptr=scale,
                      CARRY=carry is not None, FEEDBACK=True)
    flags = (inliers if flag is None else flag, inliers if range_flag is None else range_flag)
    if nk == 0:
        rows, cols = tiles["enc_win"]
        cols = min(cols, max(32, triton.next_power_of_2(e)))
        rows = max(1, min(rows, triton.next_power_of_2(t)))
        extra = {} if chunks == 1 else {"XS": t * e, "PS": ps, "CHUNKED": True}
        grid = (triton.cdiv(t, rows), triton.cdiv(e, cols)) + ((chunks,) if chunks > 1 else ())
        static_encode_win_kernel[grid]((x,), inv_scale, body, *flags, t, max_input, E=e, BT=rows, BC=cols,
                                       **extra, **common)
        return
    rows, cols = tiles["enc_rows"]
    cols = min(cols, max(32, triton.next_power_of_2(max(e - nk, nk))))
    rows = min(_fast_rows(rows, t), t)
    nb = triton.cdiv(e - nk, cols)
    extra = {} if chunks == 1 else {"XS": t * e, "HS": ps // 2, "PS": ps, "CHUNKED": True}
    grid = (triton.cdiv(t, rows), nb + triton.cdiv(nk, cols)) + ((chunks,) if chunks > 1 else ())
    static_encode_rows_kernel[grid]((x,), inliers, inv_scale, outliers, head, body, *flags, t, nb, max_input, E=e,
                                    NK=nk, BT=rows, BC=cols, **extra, **common)
