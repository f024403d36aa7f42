"""Triton kernels of the rotated group codecs (``rot-*``, what ``default``/``alloc`` uses).

Bitwise the same payloads and sums as :class:`lowbit_tp.codecs.rotation.RotatedGroupCodec`:
outliers to bf16, random signs, the blockwise Sylvester-Hadamard butterfly (same add/sub
order as ``fwht``, then one multiply by fp32 ``1/sqrt(B)``), group absmax, the fp16 / lg8 /
E8M0 scale, an IEEE division, and the level search with ``torch.bucketize`` semantics
(NaN lands in the top bucket). A program owns whole tokens, so the encoder needs an even E
for 4-bit codes and E % 8 == 0 for bit-planes (the codec falls back to the reference
otherwise); the decoder reads any E.
"""
import math

import numpy as np
import torch
import triton
import triton.language as tl

from lowbit_tp.kernels import triton_interpreted
from lowbit_tp.kernels.triton_common import (FP_OPTIONS, as_stored, bf16_bits, bf16_from_bits, chunk_bases,
                                             clamp_keep_nan, flag_any,
                                             fp16_bits, fp16_from_bits, is_finite, load_u16, payload_at,
                                             saturate_minmax, store_u16)

SCALE_FORMAT_IDS = {"fp16": 0, "e8m0": 1, "lg8": 2}
_FP16_NAN = tl.constexpr(0x7E00)  # what Tensor.masked_fill_(nan) writes into an fp16 tensor
_BF16_MAX = tl.constexpr(3.3895313892515355e38)  # the lg8 base is clamped here (bf16's largest finite)
# lg8 code search by cells of the ratio's fp32 bits: cell = (bits - 2**-16's bits) >> 18, clamped
# to [0, 511] (ratios lie in [0, 1]; see lg8_cells)
_LG8_CELL_BASE = tl.constexpr(0x37800000)
_LG8_CELL_SHIFT = tl.constexpr(18)
_LG8_CELLS = tl.constexpr(512)


# Widest column tile of the column-tiled kernels. Tests lower it (and LG8_PROGRAMS) to reach
# the tile edges and loops with small E; the bits do not depend on either.
MAX_TILE_COLS = 256
# lg8 encoders split a row block's column tiles over programs until about this many run.
LG8_PROGRAMS = 512

# Launch and algorithm choices; none changes a bit of the output (the tests run every
# variant against the reference). scripts/sweep_rot.py times them against each other on a GPU.
#   enc_values / dec_values / dec_values_wide: values of one payload per program (encode,
#     decode-and-sum of <= 4 payloads, of more), i.e. values per thread x 32 x warps;
#   warps: warps per program (more than one puts warps on different rows of the tile);
#   cell: the encoders' level search from a cell table (a coarse uniform grid on [-1, 1]
#     whose cells each hold at most one bound: one lookup and one comparison per value,
#     see bucket_cells) instead of a BITS-step binary search;
#   xpose: bit-plane codes (3, 5, 6 bits) packed and unpacked 8 at a time through two int32
#     and an 8x8 bit transpose instead of one reduction (encode) / extraction (decode) per plane;
#   row_tile / row_vpt: encoders (and reduce-encode) whose padded E is at most row_tile take
#     whole rows per program, row_vpt values a thread (warps = W / (32 row_vpt), at most 16),
#     so lg8 rotates each value once instead of twice (0: column tiles as before);
#   asm_enc / asm_dec: on a GPU the per-value table reads of the encoders (cell tables) / of
#     decode-and-sum (levels) are elementwise inline ld.global.nc (no layout change around them;
#     reduce-encode follows asm_enc); True, False, or the code widths (bits) it applies to;
#   lg8_cell: the encoders' lg8 code per group from a cell table of the ratio's bits (one read
#     and one comparison, see lg8_cells) instead of an 8-step search of the lg8 table;
#   dec_loop: decode-and-sum of more than 2 payloads walks sources 1..N-1 in a run-time loop
#     (stop 22): one source's code and registers at any N, so a world-8 decode can take world 2's
#     16 values a thread (dec_values_loop 512; scripts/sweep_rot.py's "new_loop"; the unrolled
#     kernels, and two-shot's reduce-encode at any N, keep dec_values / dec_values_wide). On by default
#     since the H100 sweeps of stop 24 (docs/bench/sweep_rot_h100_stop24_run{1,2}.md, [8192, 8192],
#     GPU time alone, fraction of a copy, lm4 / int6, loop against unrolled): 8 payloads 0.204 /
#     0.207 against 0.155 / 0.135 (then 0.206 / 0.208 against 0.156 / 0.135), 4 payloads 0.298 /
#     0.276 against 0.264 / 0.227, 3 payloads 0.335 / 0.326 against 0.333 / 0.320; 2 payloads
#     do not loop (0.484 / 0.454 both).
CONFIG = {"enc_values": 512, "dec_values": 512, "dec_values_wide": 256, "warps": 1, "cell": True, "xpose": True,
          "row_tile": 0, "row_vpt": 16, "asm_enc": True, "asm_dec": (4,), "lg8_cell": True, "dec_loop": True,
          "dec_values_loop": 512}


def tile_config(tokens: int, hidden: int, group: int, block: int, nranks: int = 1, *,
                encode: bool = False, loop: bool = False, config: dict | None = None) -> tuple[int, int, int]:
    """(rows per program, tile width W, warps) of the column-tiled kernels.

    ``W`` is a power of two that Hadamard blocks and groups divide, so a tile holds whole
    blocks and whole groups (a group cut by E is cut the same way as in the reference). One
    warp per program keeps the butterfly's exchanges inside a warp (shuffles, no barriers);
    ~32 values per thread per payload keeps the state in registers. ``config`` overrides
    :data:`CONFIG` entries (``encode``: the encoders' values per program; ``loop``: decode-and-sum's
    run-time source loop, ``dec_values_loop``).
    """
    cfg = {**CONFIG, **(config or {})}
    w = max(block, group, min(MAX_TILE_COLS, triton.next_power_of_2(hidden)))
    per_program = (cfg["enc_values"] if encode else cfg["dec_values_loop"] if loop
                   else cfg["dec_values_wide"] if nranks > 4 else cfg["dec_values"])
    rows = max(1, min(triton.next_power_of_2(tokens), per_program // w))
    warps = max(1, min(cfg["warps"], rows))  # warps own whole rows
    return rows, w, warps


def encode_config(tokens: int, hidden: int, group: int, block: int, nranks: int = 1, *,
                  config: dict | None = None) -> tuple[int, int, int, bool]:
    """(rows, W, warps, one) of the encoders (``nranks`` > 1: reduce-encode's sizing): whole rows
    per program (``one``) where ``CONFIG["row_tile"]`` allows, else :func:`tile_config`'s
    column tiles (``one`` when a tile spans E anyway)."""
    cfg = {**CONFIG, **(config or {})}
    e2 = triton.next_power_of_2(hidden)
    if cfg["row_tile"] and e2 <= cfg["row_tile"] and e2 > MAX_TILE_COLS:
        w = max(block, group, e2)
        rows = max(1, min(triton.next_power_of_2(tokens), cfg["enc_values"] // w))
        warps = max(1, min(16, rows * w // (32 * cfg["row_vpt"])))
        return rows, w, warps, True
    rows, w, warps = tile_config(tokens, hidden, group, block, nranks, encode=nranks == 1, config=cfg)
    return rows, w, warps, w >= hidden


def bucket_cells(bounds: torch.Tensor, max_log2: int = 10):
    """The cell tables of the encoders' level search for these ascending fp32 bounds, or None.

    The kernel maps ``y`` in ``[-1, 1]`` to the cell ``min(int(y * K/2 + K/2), K - 1)`` (two
    exact-order IEEE operations and a truncation: monotone in ``y``), reads ``lo[cell]`` =
    ``bucketize`` of the cell's smallest value and ``bnd[cell]`` = ``bounds[lo]`` (+inf past
    the last), and returns ``lo + (bnd < y)``. That is ``torch.bucketize(y, bounds)`` exactly
    when no cell's values span two bounds, which is checked here value by value at the cell
    edges (the smallest K = 2**j, j >= 6, that passes is used). NaN is sent as 1.0, which
    needs every bound < 1 (checked too: bucketize puts NaN and 1.0 in the top bucket).
    Returns ``(lo int32 [K], bnd fp32 [K], log2 K)`` on the CPU.
    """
    b = bounds.detach().float().cpu().contiguous()
    nb = b.numel()
    if nb == 0 or not bool((b[1:] >= b[:-1]).all()) or not float(b[-1]) < 1.0:
        return None

    def key(y):  # fp32 -> int64 whose order is the floats' order
        i = y.view(torch.int32).to(torch.int64)
        return torch.where(i < 0, -(i & 0x7FFFFFFF) - 1, i)

    def unkey(k):
        i = torch.where(k < 0, (-(k + 1)) | -0x80000000, k)
        return i.to(torch.int32).view(torch.float32)

    for log2k in range(6, max_log2 + 1):
        k = 1 << log2k
        half = torch.tensor(k / 2, dtype=torch.float32)

        def cell(y):
            u = (y * half) + half  # two ops, each rounded, as in the kernel (no fused multiply-add)
            return torch.clamp(u.to(torch.int32), max=k - 1)

        lo_key = torch.full((k,), int(key(torch.tensor([-1.0]))[0]), dtype=torch.int64)
        hi_key = torch.full((k,), int(key(torch.tensor([1.0]))[0]), dtype=torch.int64)
        target = torch.arange(k, dtype=torch.int32)
        # smallest y in [-1, 1] with cell(y) >= j, by bisection on the ordered keys
        a, z = lo_key.clone(), hi_key.clone() + 1
        while bool((a < z).any()):
            mid = (a + z) // 2
            ok = cell(unkey(mid)) >= target
            z = torch.where(ok & (a < z), mid, z)
            a = torch.where(~ok & (a < z), mid + 1, a)
        first = a  # == hi_key + 1 where no value reaches cell j
        last = torch.cat([first[1:] - 1, hi_key[:1]])
        nonempty = first <= last
        y_first = unkey(torch.minimum(first, hi_key))
        y_last = unkey(torch.minimum(last, hi_key))
        lo = torch.bucketize(y_first, b).to(torch.int32)
        hi = torch.bucketize(y_last, b).to(torch.int32)
        if bool((~nonempty | (hi - lo <= 1)).all()) and bool((cell(y_first)[nonempty] == target[nonempty]).all()):
            bnd = torch.where(lo < nb, b[torch.clamp(lo, max=nb - 1).long()], torch.tensor(float("inf")))
            return lo.contiguous(), bnd.contiguous(), log2k
    return None


def inv_sqrt(block: int) -> float:
    """``1/sqrt(block)`` rounded to fp32, as the reference's tensor * Python-float multiply uses it."""
    return float(np.float32(1.0 / math.sqrt(block)))


@triton.jit
def _butterfly(y, M: tl.constexpr, B: tl.constexpr, H: tl.constexpr):
    """One stage on ``[M, B]``: view it as ``[., 2, H]`` and map ``(a, b) -> (a + b, a - b)``.

    Each value gets its partner from an xor-reduction over the size-2 axis (``v ^ (v ^ w) = w``
    on the bits), so the tensor keeps its layout: partners in the same thread cost nothing,
    partners in other lanes one shuffle, and no stage goes through shared memory (split/join
    made Triton convert layouts there)."""
    y3 = tl.reshape(y, [M * B // (2 * H), 2, H])
    yi = y3.to(tl.int32, bitcast=True)
    p = (yi ^ tl.xor_sum(yi, 1, True)).to(tl.float32, bitcast=True)
    lower = (tl.arange(0, 2) == 0)[None, :, None]
    return tl.reshape(tl.where(lower, y3 + p, p - y3), [M, B])


@triton.jit
def _fwht_rows(z, M: tl.constexpr, B: tl.constexpr, LOG2B: tl.constexpr):
    """Unnormalised butterfly over consecutive blocks of ``B <= 256`` values: the reference's
    stages in its order (strides 1, 2, 4, ...). Written out because a reshape needs literal
    constexpr sizes, which a loop variable is not when compiled for a GPU.
    """
    y = tl.reshape(z, [M, B])
    if LOG2B > 0:
        y = _butterfly(y, M, B, 1)
    if LOG2B > 1:
        y = _butterfly(y, M, B, 2)
    if LOG2B > 2:
        y = _butterfly(y, M, B, 4)
    if LOG2B > 3:
        y = _butterfly(y, M, B, 8)
    if LOG2B > 4:
        y = _butterfly(y, M, B, 16)
    if LOG2B > 5:
        y = _butterfly(y, M, B, 32)
    if LOG2B > 6:
        y = _butterfly(y, M, B, 64)
    if LOG2B > 7:
        y = _butterfly(y, M, B, 128)
    return y


@triton.jit
def _bucket(y, bounds_ptr, BITS: tl.constexpr):
    """``torch.bucketize(y, bounds)`` for ``2**BITS - 1`` ascending bounds (NaN -> the top code):
    a binary search, each step one comparison ``bound >= y``. Up to 4 bits the bounds are
    scalars and each step's bound is picked by a select tree on the bits found so far (no
    per-value table loads); wider codes load it from the table."""
    if BITS > 4:
        idx = tl.zeros(y.shape, dtype=tl.int32)
        for s in tl.static_range(BITS):
            half = 1 << (BITS - 1 - s)
            b = tl.load(bounds_ptr + idx + (half - 1))
            idx = tl.where(b >= y, idx, idx + half)
        return idx
    H: tl.constexpr = 1 << (BITS - 1)
    Q: tl.constexpr = H // 2
    O: tl.constexpr = H // 4
    Z: tl.constexpr = H // 8
    a = ~(tl.load(bounds_ptr + (H - 1)) >= y)
    idx = tl.where(a, H, 0)
    if BITS >= 2:
        t = tl.where(a, tl.load(bounds_ptr + (H + Q - 1)), tl.load(bounds_ptr + (Q - 1)))
        b = ~(t >= y)
        idx += tl.where(b, Q, 0)
        if BITS >= 3:
            t = tl.where(a, tl.where(b, tl.load(bounds_ptr + (H + Q + O - 1)), tl.load(bounds_ptr + (H + O - 1))),
                         tl.where(b, tl.load(bounds_ptr + (Q + O - 1)), tl.load(bounds_ptr + (O - 1))))
            c = ~(t >= y)
            idx += tl.where(c, O, 0)
            if BITS >= 4:
                hi = tl.where(b, tl.where(c, tl.load(bounds_ptr + (H + Q + O + Z - 1)),
                                          tl.load(bounds_ptr + (H + Q + Z - 1))),
                              tl.where(c, tl.load(bounds_ptr + (H + O + Z - 1)), tl.load(bounds_ptr + (H + Z - 1))))
                lo = tl.where(b, tl.where(c, tl.load(bounds_ptr + (Q + O + Z - 1)), tl.load(bounds_ptr + (Q + Z - 1))),
                              tl.where(c, tl.load(bounds_ptr + (O + Z - 1)), tl.load(bounds_ptr + (Z - 1))))
                d = ~(tl.where(a, hi, lo) >= y)
                idx += tl.where(d, Z, 0)
    return idx


@triton.jit
def _gather32(ptr, idx, ASM: tl.constexpr):
    """``ptr[idx]`` of a 32-bit table as int32 bits. ``ASM`` (GPU): an elementwise ``ld.global.nc``
    that keeps ``idx``'s register layout; ``tl.load`` would make the compiler move the tensor
    into a one-value-a-thread layout and back (a shared-memory round trip per value)."""
    if ASM:
        return tl.inline_asm_elementwise("ld.global.nc.b32 $0, [$1];", "=r,l", [(ptr + idx).to(tl.int64, bitcast=True)],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        return tl.load(ptr + idx).to(tl.int32, bitcast=True)


@triton.jit
def _bucket_cell(y, lo_ptr, bnd_ptr, LOG2K: tl.constexpr, ASM: tl.constexpr = False):
    """``torch.bucketize(y, bounds)`` for ``y`` in ``[-1, 1]`` or NaN from the cell tables of
    :func:`bucket_cells`: NaN goes as 1.0 (same top bucket), then one cell lookup and one
    comparison with the one bound the cell may hold."""
    K: tl.constexpr = 1 << LOG2K
    HALF: tl.constexpr = K // 2
    yc = tl.where(y < 1.0, y, 1.0)
    cell = tl.minimum((yc * HALF + HALF).to(tl.int32), K - 1)
    lo = _gather32(lo_ptr, cell, ASM)
    return lo + (_gather32(bnd_ptr, cell, ASM).to(tl.float32, bitcast=True) < yc).to(tl.int32)


@triton.jit
def _xpose8_32(lo, hi):
    """Transpose the 8x8 bit matrix held in two int32 (byte ``r`` of ``lo`` for ``r < 4``, of
    ``hi`` for ``r >= 4``; bit ``8r + c`` <-> bit ``8c + r``): 8 codes one per byte <-> their
    bit-planes one per byte. Its own inverse. Every right shift is masked below the bits an
    arithmetic shift fills, so signed int32 gives the logical result."""
    t = (lo ^ (lo >> 7)) & 0x00AA00AA
    lo = lo ^ t ^ (t << 7)
    t = (hi ^ (hi >> 7)) & 0x00AA00AA
    hi = hi ^ t ^ (t << 7)
    t = (lo ^ (lo >> 14)) & 0x0000CCCC
    lo = lo ^ t ^ (t << 14)
    t = (hi ^ (hi >> 14)) & 0x0000CCCC
    hi = hi ^ t ^ (t << 14)
    t = (hi ^ (lo >> 4)) & 0x0F0F0F0F  # the int64 transpose's 28-bit step: lo's high nibbles <-> hi's low ones
    return lo ^ (t << 4), hi ^ t


@triton.jit
def _load_codes(p, CODE_OFF, NCB, t, tm, c0, E, ROWS: tl.constexpr, W: tl.constexpr, BITS: tl.constexpr,
                PACKED: tl.constexpr, XPOSE: tl.constexpr = False):
    """The codes (int32) of tokens ``t`` at columns ``c0 + [0, W)``, each payload byte read once.

    ``PACKED``: rows start on a byte (E even for 4-bit codes, E % 8 == 0 for bit-planes), so
    whole bytes are loaded and split; otherwise each code reads its own byte."""
    c = c0 + tl.arange(0, W)
    m = tm[:, None] & (c[None, :] < E)
    if BITS == 8:
        code = tl.load(p + CODE_OFF + t[:, None] * E + c[None, :], mask=m, other=0).to(tl.int32)
    elif BITS == 4:
        if PACKED:
            i = c0 // 2 + tl.arange(0, W // 2)
            b = tl.load(p + CODE_OFF + t[:, None] * (E // 2) + i[None, :], mask=tm[:, None] & (2 * i < E)[None, :],
                        other=0).to(tl.int32)
            code = tl.reshape(tl.join(b & 0xF, b >> 4), [ROWS, W])
        else:
            f = t[:, None] * E + c[None, :]
            code = (tl.load(p + CODE_OFF + f // 2, mask=m, other=0).to(tl.int32) >> (4 * (f & 1))) & 0xF
    else:  # bit-planes: plane j holds bit j of every code, 8 codes per byte, LSB first
        if PACKED:
            i = c0 // 8 + tl.arange(0, W // 8)
            off = CODE_OFF + t[:, None] * (E // 8) + i[None, :]
            pm = tm[:, None] & (8 * i < E)[None, :]
            if XPOSE:  # the planes of 8 codes into two int32, one bit transpose, one byte per code
                lo = tl.zeros([ROWS, W // 8], dtype=tl.int32)
                hi = tl.zeros([ROWS, W // 8], dtype=tl.int32)
                for j in tl.static_range(BITS):
                    plane = tl.load(p + off + j * NCB, mask=pm, other=0).to(tl.int32) << (8 * (j & 3))
                    if j < 4:
                        lo = lo | plane
                    else:
                        hi = hi | plane
                lo, hi = _xpose8_32(lo, hi)
                k8 = tl.arange(0, 8)[None, None, :]
                word = tl.where(k8 < 4, lo[:, :, None], hi[:, :, None])
                code = tl.reshape((word >> (8 * (k8 & 3))) & 0xFF, [ROWS, W])
            else:
                sh = tl.arange(0, 8)[None, None, :]
                code3 = tl.zeros([ROWS, W // 8, 8], dtype=tl.int32)
                for j in tl.static_range(BITS):
                    plane = tl.load(p + off + j * NCB, mask=pm, other=0).to(tl.int32)
                    code3 = code3 | (((plane[:, :, None] >> sh) & 1) << j)
                code = tl.reshape(code3, [ROWS, W])
        else:
            f = t[:, None] * E + c[None, :]
            code = tl.zeros([ROWS, W], dtype=tl.int32)
            for j in tl.static_range(BITS):
                plane = tl.load(p + CODE_OFF + j * NCB + f // 8, mask=m, other=0).to(tl.int32)
                code = code | (((plane >> (f & 7)) & 1) << j)
    return code


@triton.jit
def _group_scales(p, SCALE_OFF, lg8_ptr, t, tm, c0, T, G, ROWS: tl.constexpr, W: tl.constexpr,
                  GROUP: tl.constexpr, FMT: tl.constexpr):
    """The decoded scales ``[ROWS, W // GROUP]`` of the groups of columns ``c0 + [0, W)``."""
    gq = c0 // GROUP + tl.arange(0, W // GROUP)
    gm = tm[:, None] & (gq < G)[None, :]
    gidx = t[:, None] * G + gq[None, :]
    if FMT == 0:
        scale = fp16_from_bits(load_u16(p, SCALE_OFF + 2 * gidx, gm))
    elif FMT == 1:
        sb = tl.load(p + SCALE_OFF + gidx, mask=gm, other=127).to(tl.int32)
        scale = tl.where(sb == 0, 0x400000, sb << 23).to(tl.float32, bitcast=True)
        scale = tl.where(sb == 255, float("nan"), scale)
    else:
        q = tl.load(p + SCALE_OFF + gidx, mask=gm, other=0).to(tl.int32)
        base = bf16_from_bits(load_u16(p, SCALE_OFF + T * G + 2 * t, tm))
        scale = base[:, None] * tl.load(lg8_ptr + q)
        scale = tl.where(q == 255, float("nan"), scale)
    return scale


@triton.jit
def _decode_tile(p, r, t, tm, c0, signs, colmap_ptr, levels_ptr, lg8_ptr, T, E, G, NK, NCB, CODE_OFF, SCALE_OFF,
                 ROWS: tl.constexpr, W: tl.constexpr, B: tl.constexpr, LOG2B: tl.constexpr,
                 GROUP: tl.constexpr, BITS: tl.constexpr, FMT: tl.constexpr, HAS_K: tl.constexpr,
                 PACKED: tl.constexpr, XPOSE: tl.constexpr = False, ASM: tl.constexpr = False):
    """``decode(payload p)`` of tokens ``t`` at columns ``c0 + [0, W)``: fp32 ``[ROWS, W]``;
    ``signs`` = the random signs times ``1/sqrt(B)``.

    The tile holds whole Hadamard blocks and whole groups, so nothing outside it is read."""
    code = _load_codes(p, CODE_OFF, NCB, t, tm, c0, E, ROWS, W, BITS, PACKED, XPOSE)
    scale = _group_scales(p, SCALE_OFF, lg8_ptr, t, tm, c0, T, G, ROWS, W, GROUP, FMT)
    vals = _gather32(levels_ptr, code, ASM).to(tl.float32, bitcast=True)
    z = tl.reshape(tl.reshape(vals, [ROWS, W // GROUP, GROUP]) * scale[:, :, None], [ROWS, W])
    # (h * inv) * sign == h * (inv * sign) bit for bit: the sign only flips the rounded product
    x = tl.reshape(_fwht_rows(z, ROWS * W // B, B, LOG2B), [ROWS, W]) * signs
    if HAS_K:
        c = c0 + tl.arange(0, W)
        cm = tl.load(colmap_ptr + r * E + c, mask=c < E, other=-1)
        if tl.max(cm, axis=0) >= 0:  # most tiles hold no kept channel of this rank
            cm2 = tl.broadcast_to(cm[None, :], [ROWS, W])
            kept = bf16_from_bits(load_u16(p, 2 * (t[:, None] * NK + cm2), tm[:, None] & (cm2 >= 0)))
            x = tl.where(cm2 >= 0, kept, x)
    return x


@triton.jit
def rot_decode_sum_kernel(payloads, signs_ptr, colmap_ptr, levels_ptr, lg8_ptr, out_ptr, T, E, G, NK, NCB, CODE_OFF,
                          SCALE_OFF, inv_sqrt_b, N: tl.constexpr, ROWS: tl.constexpr, W: tl.constexpr,
                          B: tl.constexpr, LOG2B: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr,
                          FMT: tl.constexpr, HAS_K: tl.constexpr, PACKED: tl.constexpr, PS=0, OS=0,
                          CHUNKED: tl.constexpr = False, XPOSE: tl.constexpr = False, ASM: tl.constexpr = False,
                          LOOP: tl.constexpr = False, minus_ptr=0, MINUS: tl.constexpr = False):
    """``out = sum_r decode(payloads[r])`` in fp32, rank order, written once; one program per
    ``[ROWS, W]`` tile (grid: token blocks x column tiles). ``CHUNKED`` (``N == 1``): grid axis 2
    is a two-shot chunk of ``T`` rows, its payload at ``+ PS`` bytes and its rows of ``out`` at
    ``+ OS`` values per chunk. ``LOOP`` (``CONFIG["dec_loop"]``): sources 1..N-1 in a run-time
    loop (the payload picked by a select chain) instead of unrolled, so the code and the live
    registers are one source's at any N (same rank order, same bits). ``MINUS`` (error feedback,
    one message): ``out = minus - sum``, +0.0 where not finite, ``minus`` fp32 ``[T, E]``."""
    payloads, out_ptr = chunk_bases(payloads, out_ptr, PS, OS, CHUNKED)
    t = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    c0 = tl.program_id(1) * W
    c = c0 + tl.arange(0, W)
    tm = t < T
    signs = (tl.load(signs_ptr + c, mask=c < E, other=1.0) * inv_sqrt_b)[None, :]
    acc = _decode_tile(payloads[0], 0, t, tm, c0, signs, colmap_ptr, levels_ptr, lg8_ptr, T, E, G, NK, NCB, CODE_OFF,
                       SCALE_OFF, ROWS, W, B, LOG2B, GROUP, BITS, FMT, HAS_K, PACKED, XPOSE, ASM)
    if LOOP:
        for r in tl.range(1, N):
            acc = acc + _decode_tile(payload_at(payloads, r, N), r, t, tm, c0, signs, colmap_ptr, levels_ptr, lg8_ptr,
                                     T, E, G, NK, NCB, CODE_OFF, SCALE_OFF, ROWS, W, B, LOG2B, GROUP, BITS, FMT, HAS_K,
                                     PACKED, XPOSE, ASM)
    else:
        for r in tl.static_range(1, N):
            acc = acc + _decode_tile(payloads[r], r, t, tm, c0, signs, colmap_ptr, levels_ptr, lg8_ptr, T, E, G, NK,
                                     NCB, CODE_OFF, SCALE_OFF, ROWS, W, B, LOG2B, GROUP, BITS, FMT, HAS_K, PACKED,
                                     XPOSE, ASM)
    m = tm[:, None] & (c < E)[None, :]
    if MINUS:
        diff = tl.load(minus_ptr + t[:, None] * E + c[None, :], mask=m, other=0.0) - acc
        acc = tl.where(is_finite(diff), diff, 0.0)
    tl.store(out_ptr + t[:, None] * E + c[None, :], as_stored(acc, out_ptr), mask=m)


@triton.jit
def _butterflied(x, c, em, signs_ptr, colmap_ptr, max_in, rotate_max, ROWS: tl.constexpr, W: tl.constexpr,
                 B: tl.constexpr, LOG2B: tl.constexpr, HAS_K: tl.constexpr, RANGE: tl.constexpr):
    """The unnormalised Hadamard butterfly ``[ROWS, W]`` of the fp32 tile ``x`` at columns ``c``:
    kept channels zeroed, finite values saturated at ``max_in`` and then (unless ``RANGE``)
    at ``rotate_max``, which is the one clamp at ``rotate_max < max_in``, random signs."""
    xz = saturate_minmax(x, max_in if RANGE else rotate_max)
    if HAS_K:
        cm = tl.load(colmap_ptr + c, mask=em, other=-1)
        xz = tl.where(cm[None, :] >= 0, 0.0, xz)
    xz = xz * tl.load(signs_ptr + c, mask=em, other=1.0)[None, :]
    return tl.reshape(_fwht_rows(xz, ROWS * W // B, B, LOG2B), [ROWS, W])


@triton.jit
def _rotate_cols(x, c, em, signs_ptr, colmap_ptr, inv_sqrt_b, max_in, rotate_max, ROWS: tl.constexpr,
                 W: tl.constexpr, B: tl.constexpr, LOG2B: tl.constexpr, GROUP: tl.constexpr, HAS_K: tl.constexpr,
                 RANGE: tl.constexpr):
    """The rotated groups ``[ROWS, W/GROUP, GROUP]`` of the tile (see :func:`_butterflied`)."""
    h = _butterflied(x, c, em, signs_ptr, colmap_ptr, max_in, rotate_max, ROWS, W, B, LOG2B, HAS_K, RANGE)
    return tl.reshape(h, [ROWS, W // GROUP, GROUP]) * inv_sqrt_b


@triton.jit
def _group_amax(z):
    """Per group: the absmax of the finite values, and whether any value is not finite."""
    fin = is_finite(z)
    return tl.max(tl.where(fin, tl.abs(z), 0.0), axis=2), tl.min(fin.to(tl.int32), axis=2) == 0


@triton.jit
def _finite_abs(x, c0, E, signs_ptr, colmap_ptr, max_in, rotate_max, ROWS: tl.constexpr, W: tl.constexpr,
                B: tl.constexpr, LOG2B: tl.constexpr, HAS_K: tl.constexpr, RANGE: tl.constexpr):
    """``|butterfly|`` of the tile where finite, else 0: the lg8 bases' first pass keeps the
    running elementwise max of this over a row's tiles, and reduces it once at the end."""
    c = c0 + tl.arange(0, W)
    h = _butterflied(x, c, c < E, signs_ptr, colmap_ptr, max_in, rotate_max, ROWS, W, B, LOG2B, HAS_K, RANGE)
    return tl.where(is_finite(h), tl.abs(h), 0.0)


@triton.jit
def _row_top(habs, inv_sqrt_b, scale_max):
    """The rows' largest clamped group absmax from the running max of :func:`_finite_abs`.

    ``round(m * inv)`` and ``min(., scale_max)`` are monotone, so the max over the row of
    ``min(round(|h| * inv), scale_max)`` (the clamped group absmax of every group) is
    ``min(round(max|h| * inv), scale_max)``: one multiply per row instead of one per value."""
    top = tl.max(habs, axis=1) * inv_sqrt_b
    return tl.where(top > scale_max, scale_max, top)


@triton.jit
def _lg8_base(top):
    """The per-token bf16 base >= ``top`` (bits, and fp32 with 0 -> 1)."""
    bbits = bf16_bits(tl.where(top > _BF16_MAX, _BF16_MAX, top))
    bbits = tl.where(bf16_from_bits(bbits) < top, bbits + 1, bbits)
    b32 = bf16_from_bits(bbits)
    return tl.where(b32 == 0.0, 1.0, b32), bbits


@triton.jit
def _encode_cols(x, t, tm, c0, b32, signs_ptr, colmap_ptr, bounds_ptr, lg8_ptr, lg8_asc_ptr, head_ptr, code_ptr,
                 scale_ptr, flag_ptr, range_ptr, E, G, NK, NCB, inv_sqrt_b, max_in, rotate_max, scale_max,
                 ROWS: tl.constexpr, W: tl.constexpr, B: tl.constexpr, LOG2B: tl.constexpr, GROUP: tl.constexpr,
                 BITS: tl.constexpr, FMT: tl.constexpr, HAS_K: tl.constexpr, FLAG: tl.constexpr,
                 RANGE: tl.constexpr, cell_lo_ptr, cell_bnd_ptr, LOG2K: tl.constexpr, XPOSE: tl.constexpr = False,
                 T=0, ONE: tl.constexpr = False, ASM: tl.constexpr = False, lg8_cnt_ptr=None, lg8_thr_ptr=None,
                 LG8C: tl.constexpr = False):
    """Encode the fp32 tile ``x [ROWS, W]`` of tokens ``t`` at columns ``c0 + [0, W)`` (whole
    Hadamard blocks and groups); ``b32`` = the rows' lg8 bases. Finite inputs saturate at
    ``max_in``, rotated channels at ``rotate_max`` and group absmax at ``scale_max``. With
    ``RANGE`` (error mode) nothing saturates: an input beyond ``max_in``, a group absmax
    beyond ``scale_max`` or an overflow sets ``range_ptr[0]`` for the codec to raise."""
    GP: tl.constexpr = W // GROUP
    c = c0 + tl.arange(0, W)
    em = c < E
    m = tm[:, None] & em[None, :]
    if FLAG:
        flag_any(flag_ptr, m & ~is_finite(x))
    if RANGE:
        flag_any(range_ptr, m & is_finite(x) & (tl.abs(x) > max_in))
    z = _rotate_cols(x, c, em, signs_ptr, colmap_ptr, inv_sqrt_b, max_in, rotate_max, ROWS, W, B, LOG2B, GROUP, HAS_K,
                     RANGE)
    if HAS_K:
        cm = tl.load(colmap_ptr + c, mask=em, other=-1)
        if tl.max(cm, axis=0) >= 0:  # most tiles hold no kept channel
            cm2 = tl.broadcast_to(cm[None, :], [ROWS, W])
            tl.store(head_ptr + t[:, None] * NK + cm2, bf16_bits(saturate_minmax(x, max_in)).to(tl.int16),
                     mask=m & (cm2 >= 0))
    amax, bad = _group_amax(z)
    if FMT == 2:
        if ONE:  # the tile holds whole rows: the lg8 bases from this rotation, no first pass. Same
            # bits as _row_top's: amax is max(finite |h * inv|) per group, and rounding is monotone
            top = tl.max(amax, axis=1)
            b32, bbits = _lg8_base(tl.where(top > scale_max, scale_max, top))
            store_u16(scale_ptr, T * G + 2 * t, bbits, tm)
    if RANGE:  # the input was finite (checked): a non-finite rotated value is an fp32 overflow
        flag_any(range_ptr, (amax > scale_max) | bad)
    amax = tl.where(amax > scale_max, scale_max, amax)
    g = c0 // GROUP + tl.arange(0, GP)
    gm = tm[:, None] & (g[None, :] < G)
    sidx = t[:, None] * G + g[None, :]
    if FMT == 0:  # fp16 scale per group
        sbits = fp16_bits(tl.where(amax > 65504.0, 65504.0, amax))
        scale = fp16_from_bits(sbits)
        scale = tl.where(scale == 0.0, 1.0, scale)
        store_u16(scale_ptr, 2 * sidx, tl.where(bad, _FP16_NAN, sbits), gm)
    elif FMT == 1:  # E8M0: the smallest power of two >= amax
        a = tl.where(amax < 2.0 ** -126, 2.0 ** -126, amax).to(tl.int32, bitcast=True)
        ex = ((a >> 23) & 0xFF) - 126 - ((a & 0x7FFFFF) == 0).to(tl.int32)
        ex = tl.where(ex > 127, 127, tl.where(ex < -127, -127, ex))
        scale = ((ex + 127) << 23).to(tl.float32, bitcast=True)
        tl.store(scale_ptr + sidx, tl.where(bad, 255, ex + 127).to(tl.uint8), mask=gm)
    else:  # lg8: a log-step code per group under the token's bf16 base
        ratio = tl.math.div_rn(amax, tl.broadcast_to(b32[:, None], [ROWS, GP]))
        if LG8C:  # the count from a cell of ratio's bits (see lg8_cells): one read, one comparison
            u = ratio.to(tl.int32, bitcast=True) & 0x7FFFFFFF
            cell = tl.minimum(tl.maximum((u - _LG8_CELL_BASE) >> _LG8_CELL_SHIFT, 0), _LG8_CELLS - 1)
            cnt = _gather32(lg8_cnt_ptr, cell, ASM) + (
                _gather32(lg8_thr_ptr, cell, ASM).to(tl.float32, bitcast=True) < ratio).to(tl.int32)
        else:
            cnt = tl.zeros([ROWS, GP], dtype=tl.int32)  # table entries < ratio (255 and 256 both give q = 0)
            for s in tl.static_range(8):
                half = 128 >> s
                v = tl.load(lg8_asc_ptr + cnt + (half - 1))
                cnt = tl.where(v >= ratio, cnt, cnt + half)
        q = 255 - cnt  # largest q with table[q] >= ratio; code 255 is the NaN sentinel
        q = tl.where(q > 254, 254, tl.where(q < 0, 0, q))
        scale = b32[:, None] * tl.load(lg8_ptr + q)
        tl.store(scale_ptr + sidx, tl.where(bad, 255, q).to(tl.uint8), mask=gm)
    y = tl.math.div_rn(z, tl.broadcast_to(scale[:, :, None], [ROWS, GP, GROUP]))
    if LOG2K > 0:  # y >= -1 (NaN kept); the cell search maps NaN and y > 1 to the top
        code = tl.reshape(_bucket_cell(tl.where(y < -1.0, -1.0, y), cell_lo_ptr, cell_bnd_ptr, LOG2K, ASM), [ROWS, W])
    else:
        code = tl.reshape(_bucket(clamp_keep_nan(y, -1.0, 1.0), bounds_ptr, BITS), [ROWS, W])
    if BITS == 8:
        tl.store(code_ptr + t[:, None] * E + c[None, :], code.to(tl.uint8), mask=m)
    elif BITS == 4:  # E even: a row's codes start on a byte
        lo, hi = tl.split(tl.reshape(code, [ROWS, W // 2, 2]))
        i = c0 // 2 + tl.arange(0, W // 2)
        tl.store(code_ptr + t[:, None] * (E // 2) + i[None, :], (lo | (hi << 4)).to(tl.uint8),
                 mask=tm[:, None] & (2 * i[None, :] < E))
    else:  # bit-planes (E % 8 == 0): plane j holds bit j of every code, 8 codes per byte, LSB first
        c8 = tl.reshape(code, [ROWS, W // 8, 8])
        i = c0 // 8 + tl.arange(0, W // 8)
        pm = tm[:, None] & (8 * i[None, :] < E)
        if XPOSE:  # 8 codes one per byte of two int32 (two reductions), one bit transpose: plane j = byte j
            k8 = tl.arange(0, 8)[None, None, :]
            sh = (c8 << (8 * (k8 & 3)))
            lo = tl.sum(tl.where(k8 < 4, sh, 0), axis=2)
            hi = tl.sum(tl.where(k8 < 4, 0, sh), axis=2)
            lo, hi = _xpose8_32(lo, hi)
            for j in tl.static_range(BITS):
                word = lo if j < 4 else hi
                tl.store(code_ptr + j * NCB + t[:, None] * (E // 8) + i[None, :],
                         ((word >> (8 * (j & 3))) & 0xFF).to(tl.uint8), mask=pm)
        else:
            wt = (1 << tl.arange(0, 8))[None, None, :]
            for j in tl.static_range(BITS):
                byte = tl.sum(((c8 >> j) & 1) * wt, axis=2)
                tl.store(code_ptr + j * NCB + t[:, None] * (E // 8) + i[None, :], byte.to(tl.uint8), mask=pm)


@triton.jit
def _load_x(x_ptr, t, tm, c0, E, W: tl.constexpr):
    c = c0 + tl.arange(0, W)
    return tl.load(x_ptr + t[:, None] * E + c[None, :], mask=tm[:, None] & (c < E)[None, :], other=0.0).to(tl.float32)


@triton.jit
def rot_encode_kernel(x_ptr, signs_ptr, colmap_ptr, bounds_ptr, lg8_ptr, lg8_asc_ptr, head_ptr, code_ptr, scale_ptr,
                      flag_ptr, range_ptr, T, E, G, NK, NCB, inv_sqrt_b, max_in, rotate_max, scale_max,
                      ROWS: tl.constexpr, W: tl.constexpr, B: tl.constexpr, LOG2B: tl.constexpr,
                      GROUP: tl.constexpr, BITS: tl.constexpr, FMT: tl.constexpr, HAS_K: tl.constexpr,
                      FLAG: tl.constexpr, RANGE: tl.constexpr, SPLIT: tl.constexpr, XS=0, HS=0, PS=0,
                      CHUNKED: tl.constexpr = False, cell_lo_ptr=None, cell_bnd_ptr=None, LOG2K: tl.constexpr = 0,
                      XPOSE: tl.constexpr = False, ONE: tl.constexpr = False, ASM: tl.constexpr = False,
                      lg8_cnt_ptr=None, lg8_thr_ptr=None, LG8C: tl.constexpr = False):
    """Encode tokens ``[ROWS]`` in column tiles ``c0 = pid1 * W, + SPLIT * W, ...``. lg8 first
    makes a pass over the whole rows for the bases (the tile is rotated again in the second
    pass: re-reading x costs less than holding whole rows). ``CHUNKED``: grid axis 2 is a
    two-shot chunk of ``T`` rows, its input at ``+ XS`` values and its payload (bf16 head,
    codes, scales) at ``+ PS`` bytes (``+ HS = PS / 2`` int16) per chunk. ``ONE``: the tile
    holds whole rows (``W >= E``, one program per row block), so lg8 takes its bases from the
    one rotation and makes no first pass."""
    if CHUNKED:
        j = tl.program_id(2)
        x_ptr += j * XS
        head_ptr += j * HS
        code_ptr += j * PS
        scale_ptr += j * PS
    t = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    tm = t < T
    b32 = tl.full([ROWS], 1.0, tl.float32)
    if FMT * (1 - ONE) == 2:
        habs = tl.zeros([ROWS, W], dtype=tl.float32)
        for c0 in range(0, E, W):
            habs = tl.maximum(habs, _finite_abs(_load_x(x_ptr, t, tm, c0, E, W), c0, E, signs_ptr, colmap_ptr, max_in,
                                                rotate_max, ROWS, W, B, LOG2B, HAS_K, RANGE))
        b32, bbits = _lg8_base(_row_top(habs, inv_sqrt_b, scale_max))
        store_u16(scale_ptr, T * G + 2 * t, bbits, tm & (tl.program_id(1) == 0))
    for c0 in range(tl.program_id(1) * W, E, SPLIT * W):
        _encode_cols(_load_x(x_ptr, t, tm, c0, E, W), t, tm, c0, b32, signs_ptr, colmap_ptr, bounds_ptr, lg8_ptr,
                     lg8_asc_ptr, head_ptr, code_ptr, scale_ptr, flag_ptr, range_ptr, E, G, NK, NCB, inv_sqrt_b,
                     max_in, rotate_max, scale_max, ROWS, W, B, LOG2B, GROUP, BITS, FMT, HAS_K, FLAG, RANGE,
                     cell_lo_ptr, cell_bnd_ptr, LOG2K, XPOSE, T, ONE, ASM, lg8_cnt_ptr, lg8_thr_ptr, LG8C)


@triton.jit
def _sum_cols(payloads, t, tm, c0, signs_ptr, colmap_ptr, levels_ptr, lg8_ptr, T, E, G, NK, NCB, CODE_OFF, SCALE_OFF,
              inv_sqrt_b, N: tl.constexpr, ROWS: tl.constexpr, W: tl.constexpr, B: tl.constexpr,
              LOG2B: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr, FMT: tl.constexpr, HAS_K: tl.constexpr,
              PACKED: tl.constexpr, XPOSE: tl.constexpr = False, ASM: tl.constexpr = False):
    """``sum_r decode(payloads[r])`` of the tile in fp32, rank order (0 outside ``[T, E]``)."""
    c = c0 + tl.arange(0, W)
    signs = (tl.load(signs_ptr + c, mask=c < E, other=1.0) * inv_sqrt_b)[None, :]
    acc = _decode_tile(payloads[0], 0, t, tm, c0, signs, colmap_ptr, levels_ptr, lg8_ptr, T, E, G, NK, NCB, CODE_OFF,
                       SCALE_OFF, ROWS, W, B, LOG2B, GROUP, BITS, FMT, HAS_K, PACKED, XPOSE, ASM)
    for r in tl.static_range(1, N):
        acc = acc + _decode_tile(payloads[r], r, t, tm, c0, signs, colmap_ptr, levels_ptr, lg8_ptr, T, E, G, NK, NCB,
                                 CODE_OFF, SCALE_OFF, ROWS, W, B, LOG2B, GROUP, BITS, FMT, HAS_K, PACKED, XPOSE, ASM)
    return tl.where(tm[:, None] & (c < E)[None, :], acc, 0.0)


@triton.jit
def rot_reduce_encode_kernel(payloads, signs_ptr, dec_colmap_ptr, levels_ptr, lg8_ptr, CODE_OFF, SCALE_OFF,
                             enc_colmap_ptr, bounds_ptr, lg8_asc_ptr, head_ptr, code_ptr, scale_ptr, flag_ptr,
                             range_ptr, T, E, G, NK, NCB, inv_sqrt_b, max_in, rotate_max, scale_max,
                             N: tl.constexpr, ROWS: tl.constexpr, W: tl.constexpr, B: tl.constexpr,
                             LOG2B: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr, FMT: tl.constexpr,
                             HAS_K: tl.constexpr, FLAG: tl.constexpr, RANGE: tl.constexpr, SPLIT: tl.constexpr,
                             cell_lo_ptr=None, cell_bnd_ptr=None, LOG2K: tl.constexpr = 0,
                             XPOSE: tl.constexpr = False, ONE: tl.constexpr = False,
                             ASM: tl.constexpr = False, lg8_cnt_ptr=None, lg8_thr_ptr=None,
                             LG8C: tl.constexpr = False):
    """Two-shot owner stage in one kernel: decode and sum the N payloads of a chunk, encode the
    sum (for lg8 the sum is decoded twice: once for the bases, once to encode, unless ``ONE``:
    the tile holds whole rows)."""
    t = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    tm = t < T
    b32 = tl.full([ROWS], 1.0, tl.float32)
    if FMT * (1 - ONE) == 2:
        habs = tl.zeros([ROWS, W], dtype=tl.float32)
        for c0 in range(0, E, W):
            s = _sum_cols(payloads, t, tm, c0, signs_ptr, dec_colmap_ptr, levels_ptr, lg8_ptr, T, E, G, NK, NCB,
                          CODE_OFF, SCALE_OFF, inv_sqrt_b, N, ROWS, W, B, LOG2B, GROUP, BITS, FMT, HAS_K, True, XPOSE,
                          ASM)
            habs = tl.maximum(habs, _finite_abs(s, c0, E, signs_ptr, enc_colmap_ptr, max_in, rotate_max, ROWS, W, B,
                                                LOG2B, HAS_K, RANGE))
        b32, bbits = _lg8_base(_row_top(habs, inv_sqrt_b, scale_max))
        store_u16(scale_ptr, T * G + 2 * t, bbits, tm & (tl.program_id(1) == 0))
    for c0 in range(tl.program_id(1) * W, E, SPLIT * W):
        s = _sum_cols(payloads, t, tm, c0, signs_ptr, dec_colmap_ptr, levels_ptr, lg8_ptr, T, E, G, NK, NCB, CODE_OFF,
                      SCALE_OFF, inv_sqrt_b, N, ROWS, W, B, LOG2B, GROUP, BITS, FMT, HAS_K, True, XPOSE, ASM)
        _encode_cols(s, t, tm, c0, b32, signs_ptr, enc_colmap_ptr, bounds_ptr, lg8_ptr, lg8_asc_ptr, head_ptr, code_ptr,
                     scale_ptr, flag_ptr, range_ptr, E, G, NK, NCB, inv_sqrt_b, max_in, rotate_max, scale_max, ROWS, W,
                     B, LOG2B, GROUP, BITS, FMT, HAS_K, FLAG, RANGE, cell_lo_ptr, cell_bnd_ptr, LOG2K, XPOSE, T, ONE,
                     ASM, lg8_cnt_ptr, lg8_thr_ptr, LG8C)


# ---------------------------------------------------------------- launchers (no codec logic)
def _split(tokens: int, hidden: int, rows: int, w: int, scale_format: str) -> int:
    """Column tiles per row block: every tile its own program, except lg8 (a program makes the
    bases' pass over whole rows), which splits the encode pass only while few row blocks exist."""
    tiles = triton.cdiv(hidden, w)
    if scale_format != "lg8":
        return tiles
    return max(1, min(tiles, LG8_PROGRAMS // triton.cdiv(tokens, rows)))


def lg8_cells(lg8_asc: torch.Tensor):
    """Cell tables of the lg8 code search for the ascending fp32 table ``lg8_asc``, or None.

    The kernel needs ``cnt(r)`` = the number of entries below the ratio ``r`` in ``[0, 1]``. Cell
    ``c`` holds the ratios whose bits minus those of ``2**-16`` shift right by 18 to ``c``
    (clamped to ``[0, 511]``); the table gives ``cnt`` at the cell's smallest ratio and the next
    entry, and ``cnt(r) = cnt_lo + (next < r)``: exact when no cell holds two entries and no
    entry lies below ``2**-16`` (both checked here; lg8's entries are ``2**(-q/16)``, at least
    ``2**(1/16) - 1`` apart relatively, and cells are at most ``2**-5`` wide).
    Returns ``(cnt int32 [512], next fp32 [512])`` on the CPU."""
    asc = lg8_asc.detach().float().cpu().contiguous()
    base, shift, n = 0x37800000, 18, 512
    c = torch.arange(n, dtype=torch.int64)
    rmin = ((c << shift) + base).to(torch.int32).view(torch.float32)
    rmax = ((c << shift) + base + (1 << shift) - 1).to(torch.int32).view(torch.float32)
    rmax[-1] = 1.0  # ratios of 1.0 clamp into the last cell
    lo = torch.searchsorted(asc, rmin)  # entries < rmin
    hi = torch.searchsorted(asc, rmax, right=True)  # entries <= rmax
    if bool((asc[1:] < asc[:-1]).any()) or bool((asc < 2.0 ** -16).any()) or bool((hi - lo > 1).any()):
        return None
    nxt = torch.where(lo < asc.numel(), asc[torch.clamp(lo, max=asc.numel() - 1)], torch.tensor(float("inf")))
    return lo.to(torch.int32).contiguous(), nxt.contiguous()


def _lg8_args(lg8_asc, scale_format: str, cfg) -> dict:
    """The lg8 cell search's arguments (tables built once per table tensor and kept on it)."""
    if scale_format != "lg8" or not cfg["lg8_cell"]:
        return {}
    cells = getattr(lg8_asc, "_lowbit_lg8_cells", False)
    if cells is False:
        c = lg8_cells(lg8_asc)
        cells = None if c is None else (c[0].to(lg8_asc.device), c[1].to(lg8_asc.device))
        lg8_asc._lowbit_lg8_cells = cells
    return {} if cells is None else {"lg8_cnt_ptr": cells[0], "lg8_thr_ptr": cells[1], "LG8C": True}


def _cell_args(bounds, cells, cfg) -> dict:
    """The cell-search arguments of an encoder launch: ``cells`` (from :func:`bucket_cells`, on
    the device) if given, else built from ``bounds`` once per bounds tensor and kept on it as an
    attribute (one host copy the first time; the codecs keep their device tables for their
    lifetime); none where the config turns the search off or no table fits."""
    if not cfg["cell"]:
        return {}
    if cells is None:
        cells = getattr(bounds, "_lowbit_cells", False)
        if cells is False:
            c = bucket_cells(bounds)
            cells = None if c is None else (c[0].to(bounds.device), c[1].to(bounds.device), c[2])
            bounds._lowbit_cells = cells
    if cells is None:
        return {}
    return {"cell_lo_ptr": cells[0], "cell_bnd_ptr": cells[1], "LOG2K": cells[2]}


def _asm_args(device, cfg, key: str, bits: int) -> dict:
    """Table reads as elementwise inline PTX where ``cfg[key]`` is true or a collection holding
    ``bits`` (GPU only: the interpreter runs tl.load)."""
    on = cfg[key]
    on = bits in on if isinstance(on, (tuple, list, set, frozenset)) else bool(on)
    asm = on and not triton_interpreted() and device.type == "cuda"
    return {"ASM": True} if asm else {}


def _xpose_args(bits: int, cfg) -> dict:
    """Bit-plane codes (not 4 or 8 bits) packed / unpacked with one 8x8 bit transpose per 8 codes."""
    return {"XPOSE": True} if cfg["xpose"] and bits not in (4, 8) else {}


def encode(x, *, signs, colmap, bounds, lg8, lg8_asc, out, nk: int, code_bytes: int, group: int, block: int,
           bits: int, scale_format: str, max_input: float, rotate_max: float, scale_max: float, flag=None,
           range_flag=None, chunks: int = 1, cells=None, config: dict | None = None):
    """Fill the payload ``out`` from ``x [T, E]``; ``colmap[e]`` = bf16 slot of channel e or -1.

    ``chunks > 1`` (two-shot's N chunk encodes in one launch): ``out`` gets the ``chunks``
    payloads of ``x``'s row chunks one after another (``code_bytes`` is one chunk's; with a bf16
    head the payload size must be even, see :func:`chunks_fit`). ``cells``: the device copy of
    :func:`bucket_cells` (built from ``bounds`` if not given); ``config`` overrides :data:`CONFIG`."""
    t, e = x.shape[0] // chunks, x.shape[1]
    if t == 0:
        return out
    if nk and out.data_ptr() % 2:  # a payload at an odd address (two-shot's chunk j of an odd size):
        # its bf16 head cannot be stored as int16, so encode into an aligned buffer and copy
        return out.copy_(encode(x, signs=signs, colmap=colmap, bounds=bounds, lg8=lg8, lg8_asc=lg8_asc,
                                out=torch.empty_like(out), nk=nk, code_bytes=code_bytes, group=group, block=block,
                                bits=bits, scale_format=scale_format, max_input=max_input, rotate_max=rotate_max,
                                scale_max=scale_max, flag=flag, range_flag=range_flag, chunks=chunks, cells=cells,
                                config=config))
    cfg = {**CONFIG, **(config or {})}
    rows, w, warps, one = encode_config(t, e, group, block, config=cfg)
    split = 1 if one else _split(t, e, rows, w, scale_format)
    off = 2 * t * nk
    head = out[:off].view(torch.int16)
    ps = out.numel() // chunks
    extra = {} if chunks == 1 else {"XS": t * e, "HS": ps // 2, "PS": ps, "CHUNKED": True}
    rot_encode_kernel[(triton.cdiv(t, rows), split) + ((chunks,) if chunks > 1 else ())](
        x, signs, colmap, bounds, lg8, lg8_asc, head, out[off:off + code_bytes], out[off + code_bytes:],
        colmap if flag is None else flag, colmap if range_flag is None else range_flag, t, e, triton.cdiv(e, group),
        nk, (t * e + 7) // 8, inv_sqrt(block), max_input, rotate_max, scale_max, ROWS=rows, W=w, B=block,
        LOG2B=block.bit_length() - 1, GROUP=group, BITS=bits, FMT=SCALE_FORMAT_IDS[scale_format], HAS_K=nk > 0,
        FLAG=flag is not None, RANGE=range_flag is not None, SPLIT=split, num_warps=warps, **extra,
        **_cell_args(bounds, cells, cfg), **_xpose_args(bits, cfg), **({"ONE": True} if one else {}),
        **_asm_args(x.device, cfg, "asm_enc", bits), **_lg8_args(lg8_asc, scale_format, cfg), **FP_OPTIONS)
    return out


def chunks_fit(nk: int, payload_bytes: int) -> bool:
    """Whether :func:`encode` takes ``chunks > 1`` for these chunks: each chunk's bf16 head must
    start 2-byte aligned (an even payload size), as one message's does."""
    return nk == 0 or payload_bytes % 2 == 0


# Two-shot's owner stage: "fused" runs :func:`reduce_encode` (one kernel, the fp32 sum never in
# memory), "split" has the codec run decode-and-sum into an fp32 buffer, then encode (same
# bytes). scripts/gpu_reduce_split.py timed split 1.3-5.6x faster on one H100 (worlds 2-8,
# docs/bench/gpu_reduce_split_h100_stop26_run2.md).
REDUCE_VARIANT = "split"  # one of triton_common.REDUCE_VARIANTS


def reduce_encode(payloads, *, signs, dec_colmap, enc_colmap, levels, bounds, lg8, lg8_asc, out, t: int, e: int,
                  nk: int, code_bytes: int, group: int, block: int, bits: int, scale_format: str, max_input: float,
                  rotate_max: float, scale_max: float, flag=None, range_flag=None, cells=None,
                  config: dict | None = None):
    """Fill ``out`` with encode(sum of the decoded ``payloads``) for a ``[t, e]`` chunk, in one kernel."""
    if t == 0:
        return out
    cfg = {**CONFIG, **(config or {})}
    rows, w, warps, one = encode_config(t, e, group, block, len(payloads), config=cfg)
    split = 1 if one else _split(t, e, rows, w, scale_format)
    off = 2 * t * nk
    rot_reduce_encode_kernel[(triton.cdiv(t, rows), split)](
        tuple(payloads), signs, dec_colmap, levels, lg8, off, off + code_bytes, enc_colmap, bounds, lg8_asc,
        out[:off].view(torch.int16), out[off:off + code_bytes], out[off + code_bytes:],
        enc_colmap if flag is None else flag, enc_colmap if range_flag is None else range_flag, t, e,
        triton.cdiv(e, group), nk, (t * e + 7) // 8, inv_sqrt(block), max_input, rotate_max, scale_max,
        N=len(payloads), ROWS=rows, W=w, B=block, LOG2B=block.bit_length() - 1, GROUP=group, BITS=bits,
        FMT=SCALE_FORMAT_IDS[scale_format], HAS_K=nk > 0, FLAG=flag is not None, RANGE=range_flag is not None,
        SPLIT=split, num_warps=warps, **_cell_args(bounds, cells, cfg), **_xpose_args(bits, cfg),
        **({"ONE": True} if one else {}), **_asm_args(out.device, cfg, "asm_enc", bits),
        **_lg8_args(lg8_asc, scale_format, cfg), **FP_OPTIONS)
    return out


def decode_sum(payloads, *, signs, colmap, levels, lg8, out, nk: int, code_bytes: int, group: int, block: int,
               bits: int, scale_format: str, chunks: int = 1, config: dict | None = None, minus=None):
    """Fill ``out [T, E]`` fp32 with the rank-ordered sum of the decoded ``payloads``.

    ``minus`` (fp32 ``[T, E]``, one message): ``out`` gets ``minus - sum`` instead, +0.0 where
    not finite (error feedback's next carry, ``minus`` the sent values).

    ``chunks > 1`` (two-shot's N chunk decodes in one launch): ``payloads`` is one buffer of
    ``chunks`` payloads one after another, and ``out [chunks * R, E]`` gets chunk ``j``'s
    decode in its rows ``[j*R, (j+1)*R)`` (``code_bytes`` is one chunk's)."""
    t, e = out.shape[0] // chunks, out.shape[1]
    assert minus is None or (len(payloads) == 1 and chunks == 1 and minus.dtype == torch.float32
                             and minus.is_contiguous() and tuple(minus.shape) == (t, e)), \
        "minus: one message's fp32 [T, E] sent values (the kernel reads them at the output's offsets)"
    if t == 0:
        return out
    cfg = {**CONFIG, **(config or {})}
    loop = bool(cfg.get("dec_loop")) and len(payloads) > 2
    rows, w, warps = tile_config(t, e, group, block, len(payloads), loop=loop, config=cfg)
    off = 2 * t * nk
    packed = bits == 8 or (bits == 4 and e % 2 == 0) or e % 8 == 0
    extra = {} if chunks == 1 else {"PS": payloads[0].numel() // chunks, "OS": t * e, "CHUNKED": True}
    rot_decode_sum_kernel[(triton.cdiv(t, rows), triton.cdiv(e, w)) + ((chunks,) if chunks > 1 else ())](
        tuple(payloads), signs, colmap, levels, lg8, out, t, e, triton.cdiv(e, group), nk, (t * e + 7) // 8,
        off, off + code_bytes, inv_sqrt(block), N=len(payloads), ROWS=rows, W=w, B=block,
        LOG2B=block.bit_length() - 1, GROUP=group, BITS=bits, FMT=SCALE_FORMAT_IDS[scale_format], HAS_K=nk > 0,
        PACKED=packed, num_warps=warps, **extra, **_xpose_args(bits, cfg), **_asm_args(out.device, cfg, "asm_dec", bits),
        **({"LOOP": True} if loop else {}), **({} if minus is None else {"minus_ptr": minus, "MINUS": True}),
        **FP_OPTIONS)
    return out
