"""Fixed-rate entropy-coded scalar quantization (ECSQ) after the Hadamard rotation.

A research codec (issue 11): the rotated values of a token row are close to Gaussian, so
one static prefix code for the integers ``q = round(z / d)`` serves every layer and rank.
Each row gets a fixed byte budget, so the payload has a fixed size (all-gather friendly);
the encoder picks, per row, the finest step ``d`` whose coded length fits the budget.

Encoding one token row ``x [E]`` (the first two steps are those of the ``rot-*`` codecs):

1. the ``k`` calibrated outlier channels go out as bf16 and are zeroed in ``x``;
2. ``z = H_B · (s ⊙ x)`` (random signs, blockwise orthonormal Hadamard);
3. rate control: ``d_j = bf16(base · 2**(-j/64))`` with ``base`` = 4 × the row's absmax
   rounded up to bf16 (so ``j = 0`` codes every value as 0); the encoder takes the largest
   ``j`` in [0, 1023] whose codes all lie in ``[-L, L]`` and whose codewords fit the row's
   bit budget (a row's coded length never shrinks as ``j`` grows, so a bracketed search
   finds it); a row of zeros sends ``d = 0``;
4. ``q = round(z / d)`` (half to even), each written as its canonical prefix codeword,
   MSB first, one row after another in fixed-size slots; unused bits are zero.

Payload: ``[ T*k bf16 kept | T bf16 steps | T slots of C bytes ]`` with
``C = row_bytes - 2k - 2``. Decoding reads only these bytes: ``x = s ⊙ H_Bᵀ (q·d)``, kept
channels put back. docs/wire-format.md has the layout; the prefix-code tables are literal
code lengths below (``design_gaussian_lengths`` derives them; tests/test_ecsq.py checks it).
"""
from __future__ import annotations

import heapq
import math
from typing import Sequence

import torch

from lowbit_tp.codecs import functional as F
from lowbit_tp.codecs.base import Codec, check_int_option, register_codec
from lowbit_tp.codecs.rotation import ROTATE_MAX, KeptRotation, RotParams
from lowbit_tp.kernels import cpu as cpu_kernels

STEP_SEARCH = 1024  # candidate steps per row: base * 2**(-j/64), j in [0, 1024)
STEP_RATIO = 64
_STEP_TABLE = torch.exp2(-torch.arange(STEP_SEARCH, dtype=torch.float64) / STEP_RATIO).float()


# ---------------------------------------------------------------- prefix codes
def gaussian_code_pmf(ratio: float, half: int) -> list[float]:
    """P(round(z / d) = q) for z ~ N(0, 1), d = ``ratio``, q in [-half, half]; the tails
    beyond ``half`` are folded into the end symbols."""
    def cdf(v):
        return 0.5 * (1.0 + math.erf(v / math.sqrt(2.0)))
    p = [cdf((q + 0.5) * ratio) - cdf((q - 0.5) * ratio) for q in range(-half, half + 1)]
    p[0] += cdf((-half - 0.5) * ratio)
    p[-1] += 1.0 - cdf((half + 0.5) * ratio)
    return p


def huffman_lengths(pmf: Sequence[float], *, max_len: int = 16, floor: float = 2.0 ** -14) -> list[int]:
    """Huffman code lengths of ``pmf`` (over q = -half..half) after flooring every
    probability at ``floor`` (so that every codeword has at most ``max_len`` bits; checked).

    The multiset of lengths is Huffman's; they are handed out shortest first in order of
    ``|q|`` (negative first), which is optimal when the pmf falls with ``|q|`` (a Gaussian's
    does; a noisy histogram's tail nearly does). The lengths then never shrink as ``|q|``
    grows, which makes a row's coded length monotone in the step (the rate control relies
    on it). A complete code (Kraft sum 1).
    """
    w = [max(float(p), floor) for p in pmf]
    if len(w) < 2:
        raise ValueError("a prefix code needs at least two symbols")
    heap = [(v, i, (i,)) for i, v in enumerate(w)]
    heapq.heapify(heap)
    depth = [0] * len(w)
    order = len(w)
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        for s in a[2] + b[2]:
            depth[s] += 1
        heapq.heappush(heap, (a[0] + b[0], order, a[2] + b[2]))
        order += 1
    if max(depth) > max_len:
        raise ValueError(f"longest codeword {max(depth)} bits exceeds {max_len}; raise the floor")
    half = (len(w) - 1) / 2
    by_prob = sorted(range(len(w)), key=lambda s: (abs(s - half), s))
    out = [0] * len(w)
    for s, v in zip(by_prob, sorted(depth)):
        out[s] = v
    return out


def canonical_codes(lengths: Sequence[int]) -> list[int]:
    """Canonical prefix codewords (as integers, MSB first) for code ``lengths``: symbols
    sorted by (length, index) take consecutive values, shifted left at each longer length."""
    order = sorted(range(len(lengths)), key=lambda s: (lengths[s], s))
    codes = [0] * len(lengths)
    code, prev = 0, lengths[order[0]]
    for i, s in enumerate(order):
        if i:
            code = (code + 1) << (lengths[s] - prev)
        codes[s] = code
        prev = lengths[s]
    if code + 1 != 1 << prev:
        raise ValueError("code lengths do not make a complete prefix code (Kraft sum != 1)")
    return codes


def decode_table(lengths: Sequence[int], codes: Sequence[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(symbol, length)`` for every ``width``-bit window: the codeword it starts with."""
    sym = torch.full((1 << width,), -1, dtype=torch.int32)
    ln = torch.zeros(1 << width, dtype=torch.int32)
    for s, (l, c) in enumerate(zip(lengths, codes)):
        lo = c << (width - l)
        sym[lo:lo + (1 << (width - l))] = s
        ln[lo:lo + (1 << (width - l))] = l
    if bool((sym < 0).any()):
        raise ValueError("incomplete prefix code")
    return sym, ln


# ---------------------------------------------------------------- rate control
def round_up_bf16(v: torch.Tensor) -> torch.Tensor:
    """The smallest bf16 value >= ``v`` (fp32, finite, >= 0), as fp32."""
    b = v.to(torch.bfloat16)
    low = b.float() < v
    b = torch.where(low, (b.view(torch.int16) + 1).view(torch.bfloat16), b)
    return b.float()


def quantize(v: torch.Tensor, d: torch.Tensor, offset: float = 0.5) -> torch.Tensor:
    """Integer codes of ``v / d``: nearest (half to even) for ``offset`` 0.5, else
    ``sign · floor(|v / d| + offset)`` (an offset below 0.5 widens the zero bin: fewer bits
    for the same step). Encoder-only: the decoder reads ``q · d`` either way."""
    r = v / d
    return torch.round(r) if offset == 0.5 else torch.sign(r) * torch.floor(r.abs() + offset)


def choose_steps(z: torch.Tensor, lengths: torch.Tensor, budget_bits: int, half: int, *,
                 offset: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Rate control: per row of ``z [T, E]`` (finite fp32) the finest candidate step whose
    codes ``round(z / d)`` lie in ``[-half, half]`` and whose codeword ``lengths`` (int,
    indexed by ``q + half``, never shorter for larger ``|q|``) sum to at most ``budget_bits``.

    Returns ``(d [T] fp32, exactly bf16 values; q [T, E] int64)``; an all-zero row gets
    ``d = 0``. The coarsest candidate codes every value as 0, so the caller must ensure
    ``E * lengths[half] <= budget_bits``. Whether a row fits is monotone in ``j``, so a
    bracketed search finds the largest fitting ``j``: it starts from a Gaussian-rate guess,
    then alternates secant steps (about one bit per value per 64 ``j``) and bisection.
    """
    t, e = z.shape
    dev = z.device
    amax = z.abs().amax(1) if e else z.new_zeros(t)
    base = round_up_bf16(amax * 4)
    base = torch.where(base > 0, base, torch.ones_like(base))
    table = _STEP_TABLE.to(dev)
    lens = lengths.to(dev).float()

    def step_at(j, rows=slice(None)):
        return (base[rows] * table[j]).to(torch.bfloat16).float().clamp_min(2.0 ** -126)

    def evaluate(j, rows):
        d = step_at(j, rows)
        q = quantize(z[rows], d.unsqueeze(1), offset)
        top = quantize(amax[rows], d, offset)  # monotone: the largest |q|
        idx = q.clamp_(-half, half).add_(half).long()
        used = lens[idx].sum(1)
        return (top <= half) & (used <= budget_bits), used

    lo = torch.zeros(t, dtype=torch.long, device=dev)  # fits (every code 0)
    hi = torch.full((t,), STEP_SEARCH, dtype=torch.long, device=dev)  # first j known not to fit
    # guess: a Gaussian row of rms s codes at about 2.05 - log2(d / s) bits per value
    rms = z.pow(2).mean(1).sqrt() if e else z.new_zeros(t)
    per = budget_bits / max(e, 1)
    guess = (STEP_RATIO * torch.log2(base / (rms.clamp_min(1e-30) * 2.0 ** (2.05 - per)))).round().long()
    rows = torch.arange(t, device=dev)
    last = None  # (j, used) of the previous evaluation, for the secant
    it = 0
    while rows.numel():
        l, h = lo[rows], hi[rows]
        if it == 0:
            j = guess[rows]
        elif it % 2 == 1 and last is not None:  # secant on the coded length, one bit per value per 64 j
            j = last[0] + ((budget_bits - last[1]) * STEP_RATIO / max(e, 1)).floor().long()
        else:
            j = (l + h) // 2
        j = torch.minimum(torch.maximum(j, l + 1), h - 1)
        ok, used = evaluate(j, rows)
        lo[rows] = torch.where(ok, j, l)
        hi[rows] = torch.where(ok, h, j)
        keep = hi[rows] - lo[rows] > 1
        last = (j[keep], used[keep])
        rows = rows[keep]
        it += 1
    d = step_at(lo)
    q = quantize(z, d.unsqueeze(1), offset)
    return d.masked_fill(amax == 0, 0.0), q.long()  # an all-zero row sends step 0


# ---------------------------------------------------------------- bit packing
def pack_rows(q: torch.Tensor, lengths: torch.Tensor, codes: torch.Tensor, half: int, nbytes: int) -> torch.Tensor:
    """Codewords of ``q [T, E]`` (values in ``[-half, half]``), MSB first, row by row in
    ``nbytes``-byte slots, zero-padded: ``[T, nbytes]`` uint8. Rows must fit (checked).

    A codeword of at most 16 bits starting at bit ``o`` lies within the 3 bytes from
    ``o // 8``: each is shifted into a 24-bit window and its bytes added in place (the
    codewords do not overlap, so adding is OR)."""
    t, e = q.shape
    if t == 0 or e == 0:
        return torch.zeros(t, nbytes, dtype=torch.uint8, device=q.device)
    if int(lengths.max()) > 16:
        raise ValueError("codewords longer than 16 bits")
    idx = (q + half).long()
    ln = lengths.to(q.device)[idx]
    cw = codes.to(q.device)[idx]
    end = ln.cumsum(1)
    nbits = nbytes * 8
    if int(end[:, -1].max()) > nbits:
        raise ValueError(f"a row's codewords need {int(end[:, -1].max())} bits, more than its {nbits}")
    start = end - ln
    win = cw << (24 - ln - start % 8)
    byte = start // 8
    out = torch.zeros(t, nbytes + 3, dtype=torch.int32, device=q.device)
    for i, shift in enumerate((16, 8, 0)):
        out.scatter_add_(1, byte + i, ((win >> shift) & 0xFF).int())
    return out[:, :nbytes].to(torch.uint8)


def unpack_rows(slots: torch.Tensor, e: int, table: tuple[torch.Tensor, torch.Tensor], half: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: the ``e`` codes of each ``[T, C]`` uint8 slot.

    All rows at once, one codeword after another: the ``width``-bit window at each row's
    bit position is looked up in ``table`` (symbol and codeword length there). Raises
    ValueError when a row's ``e`` codewords do not fit its slot (corrupt payload).
    """
    sym_t, len_t = (v.to(slots.device).long() for v in table)
    width = int(math.log2(sym_t.numel()))
    t, c = slots.shape
    nbits = 8 * c
    if t == 0 or e == 0:
        return torch.zeros(t, e, dtype=torch.long, device=slots.device)
    nb = (width + 7) // 8 + 1
    s = torch.cat([slots, slots.new_zeros(t, nb)], 1).long()
    # every byte position's big-endian nb-byte word, so a window is one gather and a shift
    words = torch.zeros(t, c, dtype=torch.long, device=slots.device)
    for i in range(nb):
        words = (words << 8) | s[:, i:i + c]
    mask = (1 << width) - 1
    pos = torch.zeros(t, 1, dtype=torch.long, device=slots.device)
    out = torch.empty(t, e, dtype=torch.long, device=slots.device)
    for i in range(e):
        w = words.gather(1, (pos >> 3).clamp_max(c - 1))
        win = (w >> (8 * nb - width - (pos & 7))) & mask
        out[:, i:i + 1] = sym_t[win]
        pos = pos + len_t[win]
    if bool((pos > nbits).any()):
        raise ValueError("corrupt ECSQ payload: a row's codewords run past its slot")
    return out - half


def design_gaussian_lengths(coded_bits: float, half: int, *, max_len: int = 16) -> tuple[float, list[int]]:
    """A Huffman table for the integer codes of a Gaussian whose mean codeword length is
    ``coded_bits``: ``(step / sigma, lengths)``, the ratio searched on a 0.001 grid."""
    best = None
    for i in range(50, 2000):
        r = i / 1000
        pmf = gaussian_code_pmf(r, half)
        ln = huffman_lengths(pmf, max_len=max_len)
        avg = sum(p * v for p, v in zip(pmf, ln))
        if best is None or abs(avg - coded_bits) < abs(best[0] - coded_bits):
            best = (avg, r, ln)
    return best[1], best[2]


# ---------------------------------------------------------------- the codec

HALF = 40  # codes q in [-HALF, HALF]: 81 symbols
DECODE_WIDTH = 16  # longest codeword, bits (the decoder's window)


class EcsqCodec(KeptRotation, Codec):
    """Fixed-rate ECSQ after the rotation (see the module doc): ``bits`` all-in per value.

    Options: ``bits`` (row budget ``floor(bits * E / 8)`` bytes, everything included),
    ``k`` kept bf16 channels (None: the calibration's), ``table`` the prefix code's
    lengths for q = -HALF..HALF (a table of :data:`TABLES` by name, or literal lengths),
    ``rounding`` the encoder's rounding offset (:func:`quantize`; 0.5 = nearest).
    """

    max_input = ROTATE_MAX  # so the fp32 rotation and the bf16 step cannot overflow

    def __init__(self, *, bits: float = 3.5, k: int | None = 4, table: str | Sequence[int] = "gauss3.5",
                 rounding: float = 0.5, seed: int = 0, name: str | None = None, **kw):
        k = check_int_option(k, "k", minimum=0, optional=True)
        self.needs_calibration = k != 0
        super().__init__(**kw)
        if not (isinstance(bits, (int, float)) and 1.0 <= float(bits) <= 16.0):
            raise ValueError(f"bits must be a number in [1, 16], got {bits!r}")
        lengths = TABLES[table] if isinstance(table, str) and table in TABLES else table
        if isinstance(lengths, str):
            raise ValueError(f"unknown ECSQ table {table!r}; known: {', '.join(TABLES)}")
        lengths = [int(v) for v in lengths]
        if len(lengths) != 2 * HALF + 1 or not all(1 <= v <= DECODE_WIDTH for v in lengths):
            raise ValueError(f"an ECSQ table has {2 * HALF + 1} code lengths in [1, {DECODE_WIDTH}]")
        codes = canonical_codes(lengths)  # raises on an incomplete code
        if any(lengths[HALF + i] > lengths[HALF + i + 1] or lengths[HALF - i] > lengths[HALF - i - 1]
               for i in range(HALF)):
            raise ValueError("ECSQ code lengths must not shrink as |q| grows (the rate control relies on it)")
        if not 0.0 < float(rounding) <= 0.5:
            raise ValueError(f"rounding must be in (0, 0.5], got {rounding!r}")
        self.bits, self.k, self.seed, self.rounding = float(bits), k, seed, float(rounding)
        self.table = table if isinstance(table, str) else tuple(lengths)
        self._lengths = torch.tensor(lengths, dtype=torch.long)
        self._codes = torch.tensor(codes, dtype=torch.long)
        self._decode_table = decode_table(lengths, codes, DECODE_WIDTH)
        self.name = name or f"rot-ecsq{bits:g}"

    def options(self):
        return {"bits": self.bits, "k": self.k, "table": list(self.table) if isinstance(self.table, tuple)
                else self.table, "rounding": self.rounding, "seed": self.seed}

    def row_bytes(self, e: int) -> int:
        """Bytes per token row, all included."""
        return int(math.floor(self.bits * e / 8 + 1e-9))

    def slot_bytes(self, e: int) -> int:
        """Bytes of one row's codewords: the row budget less the kept channels and the step."""
        c = self.row_bytes(e) - 2 * self.num_kept(e) - 2
        if e and 8 * c < e * int(self._lengths[HALF]):
            raise ValueError(f"{self.name}: {self.bits:g} bits/value leave {max(c, 0)} code bytes per row of {e} "
                             f"values, fewer than the all-zero row needs ({e * int(self._lengths[HALF])} bits)")
        return c

    def payload_nbytes(self, shape, layer=None):
        t, e = shape
        return t * (2 * self.num_kept(e) + 2 + self.slot_bytes(e))

    def _encode(self, x, p: RotParams, nonfinite, *, out=None, flags=(None, None)):
        t, e = x.shape
        c = self.slot_bytes(e)
        xf = x.float()
        head = None
        if p.outliers.numel():
            head = F.float_to_bytes(xf.index_select(1, p.outliers), torch.bfloat16)
            xf = xf.index_fill(1, p.outliers, 0.0)
        bad_rows = None
        if nonfinite:  # such rows send step NaN and all-zero codes: they decode to NaN
            bad_rows = ~torch.isfinite(xf).all(1)
            xf = torch.where(bad_rows.unsqueeze(1), torch.zeros_like(xf), xf)
        on_cpu = self.kernel_backend(xf.device) == "cpu"  # the same rotation, steps and bytes, in C++
        if on_cpu:
            z = cpu_kernels.ecsq_rotate(xf, signs=p.signs, block=F.hadamard_block(e), encode=True)
            d, q = cpu_kernels.ecsq_steps(z, table=_STEP_TABLE, lengths=self._lengths, budget_bits=8 * c, half=HALF,
                                          offset=self.rounding)
        else:
            z = F.fwht(xf * p.signs.to(xf.device), F.hadamard_block(e))
            d, q = choose_steps(z, self._lengths, 8 * c, HALF, offset=self.rounding)
        if bad_rows is not None:
            d = d.masked_fill(bad_rows, float("nan"))
        if on_cpu:
            slots = cpu_kernels.ecsq_pack(q, lengths=self._lengths, codes=self._codes, half=HALF, nbytes=c)
        else:
            slots = pack_rows(q, self._lengths, self._codes, HALF, c)
        parts = ([head] if head is not None else []) + [F.float_to_bytes(d, torch.bfloat16), slots.reshape(-1)]
        return torch.cat(parts)

    def rotated(self, x: torch.Tensor, *, layer: str | None = None, source=0) -> torch.Tensor:
        """The values the prefix code sees for finite ``x [T, E]``: kept channels zeroed,
        rotated (a research helper: scripts/ecsq_screen.py fits code tables on them)."""
        p = self.params(layer, source, x.shape[1], x.device)
        xf = x.float().index_fill(1, p.outliers.to(x.device), 0.0)
        return F.fwht(xf * p.signs.to(xf.device), F.hadamard_block(x.shape[1]))

    def _decode(self, payload, shape, p: RotParams):
        t, e = shape
        k = p.outliers.numel()
        c = self.slot_bytes(e)
        off = 2 * t * k
        d = F.bytes_to_float(payload[off:off + 2 * t], torch.bfloat16)
        slots = payload[off + 2 * t:].reshape(t, c)
        if self.kernel_backend(slots.device) == "cpu":  # the same codes and rotation, in C++
            sym, ln = self._decode_table
            q = cpu_kernels.ecsq_unpack(slots, e, symbols=sym, lengths=ln, half=HALF)
            x = cpu_kernels.ecsq_rotate(q.float() * d.unsqueeze(1), signs=p.signs, block=F.hadamard_block(e),
                                        encode=False)
        else:
            q = unpack_rows(slots, e, self._decode_table, HALF)
            x = F.fwht(q.float() * d.unsqueeze(1), F.hadamard_block(e)) * p.signs.to(payload.device)
        if k:
            x.index_copy_(1, p.outliers, F.bytes_to_float(payload[:off], torch.bfloat16).reshape(t, k))
        return x


# Code lengths for q = -HALF..HALF: Huffman tables of Gaussian codes at the mean codeword
# length each budget leaves at E = 576 and k = 4 (design_gaussian_lengths(8 * slot_bytes / E,
# HALF); tests/test_ecsq.py re-derives them). Part of the wire format.
TABLES: dict[str, list[int]] = {
    # 3.5 bits/value -> 3.361 code bits/value; step / sigma 0.419
    "gauss3.5": [14] * 18 + [13] * 13 + [12, 10, 8, 7, 6, 5, 4, 3, 3, 2, 3, 3, 4, 5, 6, 7, 8, 10, 12] + [13] * 13
    + [14] * 18,
    # 4.25 bits/value -> 4.111 code bits/value; step / sigma 0.248
    "gauss4.25": [15] * 24 + [14, 14, 13, 12, 10, 9, 8, 7, 6, 6, 5, 4, 4, 4, 4, 3, 3, 3, 4, 4, 4, 5, 5, 6, 6, 7, 8, 9,
                              11, 12, 13, 14, 14] + [15] * 24,
    # the finer ladder for bit allocation (issue 11, Gemma 3 at 4.25 bits); same design rule
    # 3.875 bits/value -> 3.736 code bits/value; step / sigma 0.316
    "gauss3.875": [15] * 18 + [14] * 11 + [12, 11, 9, 8, 7, 6, 5, 4, 4, 3, 3, 3, 3, 3, 4, 4, 5, 6, 7, 8, 9, 11, 12]
    + [14] * 11 + [15] * 18,
    # 4.625 bits/value -> 4.486 code bits/value; step / sigma 0.188
    "gauss4.625": [14] * 20 + [13, 13, 12, 11, 10, 9, 8, 8, 7, 6, 6, 6, 5, 5, 5, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 5,
                               5, 5, 6, 6, 7, 7, 8, 9, 9, 11, 11, 12, 13, 13] + [14] * 20,
    # 5 bits/value -> 4.861 code bits/value; step / sigma 0.146
    "gauss5": [14] * 16 + [13, 13, 12, 11, 10, 10, 9, 9, 8, 8, 7, 7, 6, 6, 6, 5, 5, 5, 5, 5, 4, 4, 4, 4, 4, 4, 4, 4,
                           5, 5, 5, 5, 5, 5, 6, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 12, 13, 13] + [14] * 16,
}


def _reg(name, **opts):
    register_codec(name, lambda **kw: EcsqCodec(name=name, **{**opts, **kw}), needs_calibration=True)


_reg("rot-ecsq3.5-k4", bits=3.5, k=4, table="gauss3.5")
_reg("rot-ecsq4.25-k4", bits=4.25, k=4, table="gauss4.25")
_reg("rot-ecsq3.875-k4", bits=3.875, k=4, table="gauss3.875")
_reg("rot-ecsq4.625-k4", bits=4.625, k=4, table="gauss4.625")
_reg("rot-ecsq5-k4", bits=5.0, k=4, table="gauss5")
