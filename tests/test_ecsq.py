"""The fixed-rate ECSQ research codec (lowbit_tp/codecs/ecsq.py) against pure-Python references.

The references here re-implement the documented format from its description: canonical
prefix codes from code lengths, the rate control's candidate steps, a bit writer and a bit
reader (MSB first), with Python floats and ``struct`` for fp32/bf16 rounding. They share
nothing with the codec but its rotation (``rotated``, covered by the rotation tests) and
its published code-length tables.
"""
import math
import struct

import pytest
import torch

from lowbit_tp.codecs import NonFiniteError, make_codec
from lowbit_tp.codecs.ecsq import (HALF, TABLES, EcsqCodec, design_gaussian_lengths, huffman_lengths,
                                   pack_rows, unpack_rows, canonical_codes, decode_table)
from lowbit_tp.kernels import cpu as cpu_kernels


# ------------------------------------------------------------------ references
def ref_canonical(lengths):
    """{symbol: bit string}: symbols by (length, index) take consecutive codes."""
    out, code, prev = {}, 0, None
    for s in sorted(range(len(lengths)), key=lambda s: (lengths[s], s)):
        if prev is not None:
            code = (code + 1) << (lengths[s] - prev)
        prev = lengths[s]
        out[s] = format(code, f"0{lengths[s]}b")
    return out


def f32(v):
    return struct.unpack("<f", struct.pack("<f", v))[0]


def bf16_bits(v):
    """Round-to-nearest-even fp32 -> bf16, as its 16-bit pattern."""
    u = struct.unpack("<I", struct.pack("<f", v))[0]
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF


def bf16_val(b):
    return struct.unpack("<f", struct.pack("<I", b << 16))[0]


def bf16_up(v):
    b = bf16_bits(v)
    return bf16_val(b + 1) if bf16_val(b) < v else bf16_val(b)


def ref_encode_row(z, lengths, budget_bits, offset=0.5):
    """(step, codes) of one row of fp32 values ``z`` (a list of floats): the documented rate control."""
    amax = max(abs(v) for v in z)
    if amax == 0:
        return 0.0, [0] * len(z)
    base = bf16_up(f32(4 * amax))
    best = None
    for j in range(1024):  # exhaustive, not a binary search: the largest j that fits
        d = max(bf16_val(bf16_bits(f32(base * f32(2.0 ** (-j / 64))))), 2.0 ** -126)
        if offset == 0.5:
            q = [round(f32(v / d)) for v in z]  # Python's round is half to even, as torch.round
        else:  # the zero bin widened: sign * floor(|v / d| + offset)
            q = [int(math.copysign(math.floor(abs(f32(v / d)) + offset), v)) for v in z]
        if max(abs(c) for c in q) <= HALF and sum(lengths[c + HALF] for c in q) <= budget_bits:
            best = (d, q)
    return best


def ref_bits(q, lengths, nbytes):
    codes = ref_canonical(lengths)
    s = "".join(codes[c + HALF] for c in q)
    s += "0" * (8 * nbytes - len(s))
    return bytes(int(s[i:i + 8], 2) for i in range(0, len(s), 8))


def ref_read(slot: bytes, e, lengths):
    codes = {v: k for k, v in ref_canonical(lengths).items()}
    bits = "".join(format(b, "08b") for b in slot)
    out, cur = [], ""
    for ch in bits:
        cur += ch
        if cur in codes:
            out.append(codes[cur] - HALF)
            cur = ""
            if len(out) == e:
                return out
    raise ValueError("ran out of bits")


def dense_hadamard(n):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def rows(t, e, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, e, generator=g) * torch.logspace(-3, 2, t).unsqueeze(1)
    x[1] = 0.0
    x[2, 3] = 40.0  # a spike
    return x


# ------------------------------------------------------------------ tests
def test_huffman_is_optimal_on_a_textbook_example():
    ln = huffman_lengths([0.1, 0.2, 0.4, 0.2, 0.1], floor=0.0)
    assert sum(p * v for p, v in zip([0.1, 0.2, 0.4, 0.2, 0.1], ln)) == pytest.approx(2.2)
    assert sum(2.0 ** -v for v in ln) == 1.0


def test_pack_rows_literal_bits():
    """Symbols -1, 0, 1 with lengths 2, 1, 2: canonical codes 0 -> '0', -1 -> '10', 1 -> '11'.
    Row [1, 0, -1, 1, 1] -> 11 0 10 11 11 (+ zero padding) = D7 80; row [0]*5 -> 00 00."""
    half = 1
    lengths = torch.tensor([2, 1, 2])
    codes = torch.tensor(canonical_codes([2, 1, 2]))
    q = torch.tensor([[1, 0, -1, 1, 1], [0, 0, 0, 0, 0]])
    got = pack_rows(q, lengths, codes, half, 2)
    assert got.tolist() == [[0xD7, 0x80], [0x00, 0x00]]
    table = decode_table([2, 1, 2], codes.tolist(), 4)
    assert torch.equal(unpack_rows(got, 5, table, half), q)


@pytest.mark.parametrize("name", ["gauss3.5", "gauss3.875", "gauss4.25", "gauss4.625", "gauss5"])
def test_tables_are_the_documented_gaussian_design(name):
    bits = float(name[5:])
    coded = 8 * (math.floor(bits * 576 / 8) - 2 * 4 - 2) / 576
    assert design_gaussian_lengths(coded, HALF)[1] == TABLES[name]
    assert sum(2.0 ** -v for v in TABLES[name]) == 1.0


BACKENDS = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(
    not cpu_kernels.available(), reason=f"CPU kernels unavailable: {cpu_kernels.build_error()}"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits,table,offset", [(3.5, "gauss3.5", 0.5), (4.25, "gauss4.25", 0.5),
                                               (6.0, "gauss4.25", 0.5), (3.5, "gauss3.5", 0.35)])
def test_encoder_bytes_match_the_python_reference(bits, table, offset, backend):
    t, e = 6, 64
    x = rows(t, e)
    c = EcsqCodec(bits=bits, k=0, table=table, rounding=offset, backend=backend)
    payload = c.encode(x)
    rb = math.floor(bits * e / 8)
    assert payload.numel() == t * rb == c.payload_nbytes((t, e))
    z = c.rotated(x)
    lengths = TABLES[table]
    want = b""
    for r in range(t):
        d, q = ref_encode_row([float(v) for v in z[r]], lengths, 8 * (rb - 2), offset)
        want_step = struct.pack("<H", bf16_bits(d))
        assert bytes(payload[2 * r:2 * r + 2].tolist()) == want_step, r
        want += ref_bits(q, lengths, rb - 2)
    assert bytes(payload[2 * t:].tolist()) == want


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_matches_the_python_reference_reader(backend):
    t, e = 6, 64
    x = rows(t, e, seed=1)
    c = EcsqCodec(bits=3.5, k=0, table="gauss3.5", backend=backend)
    payload = c.encode(x)
    rb = c.payload_nbytes((t, e)) // t
    raw = bytes(payload.tolist())
    h = dense_hadamard(e)
    signs = c.params(None, 0, e).signs.double()
    got = c.decode(payload, (t, e))
    for r in range(t):
        d = bf16_val(struct.unpack("<H", raw[2 * r:2 * r + 2])[0])
        q = ref_read(raw[2 * t + r * (rb - 2):2 * t + (r + 1) * (rb - 2)], e, TABLES["gauss3.5"])
        want = (h @ (torch.tensor(q, dtype=torch.float64) * d)) * signs
        assert torch.allclose(got[r].double(), want, rtol=1e-6, atol=1e-6 * max(d, 1e-30) * 10), r
        # what the receiver gets is the rotation of codes within half a step of the sent values
        zr = c.rotated(x[r:r + 1])[0].double()
        assert (zr - torch.tensor(q, dtype=torch.float64) * d).abs().max() <= d / 2 * (1 + 1e-6)


def test_registered_codec_with_kept_channels_round_trips(cal_factory):
    cal = cal_factory(2, 576)
    x = torch.randn(64, 576) * 0.5
    x[:, 7] = 30.0
    # bounds: about a uniform step's error d**2 / 12 at the designed step / sigma (0.419,
    # 0.316, 0.248, 0.188, 0.146: 0.0146, 0.0083, 0.0051, 0.0029, 0.0018), with room for the
    # clipped tails and the rate control's coarser steps on some rows; the error falls with
    # every added rate
    bounds = {3.5: 0.02, 3.875: 0.011, 4.25: 0.006, 4.625: 0.004, 5.0: 0.0024}
    errs = []
    for name, bits in (("rot-ecsq3.5-k4", 3.5), ("rot-ecsq3.875-k4", 3.875), ("rot-ecsq4.25-k4", 4.25),
                       ("rot-ecsq4.625-k4", 4.625), ("rot-ecsq5-k4", 5.0)):
        c = make_codec(name, calibration=cal)
        p = c.encode(x, layer="layers.0.o_proj", source=1)
        assert 8 * p.numel() / x.numel() == pytest.approx(bits, abs=8 / 576)
        y = c.decode(p, tuple(x.shape), layer="layers.0.o_proj", source=1)
        kept = c.params("layers.0.o_proj", 1, 576).outliers
        assert torch.equal(y[:, kept], x[:, kept].bfloat16().float())
        rel = float((y - x).pow(2).sum() / x.pow(2).sum())
        assert rel < bounds[bits], (name, rel)
        errs.append(rel)
    assert errs == sorted(errs, reverse=True), errs


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_is_refused(backend):
    c = EcsqCodec(bits=3.5, k=0, table="gauss3.5", backend=backend)
    x = torch.randn(4, 64)
    p = c.encode(x)
    with pytest.raises(ValueError, match="uint8 bytes"):
        c.decode(p[:-1], (4, 64))
    bad = p.clone()
    bad[8:] = 0xFF  # every codeword a longest one: a row's 64 codes cannot fit its slot
    with pytest.raises(ValueError, match="corrupt ECSQ payload"):
        c.decode(bad, (4, 64))
    with pytest.raises(ValueError, match="all-zero row"):
        EcsqCodec(bits=1.5, k=0, table="gauss3.5").encode(x)
    with pytest.raises(ValueError, match="unknown ECSQ table"):
        EcsqCodec(bits=3.5, k=0, table="nope")
    with pytest.raises(ValueError, match="Kraft"):
        EcsqCodec(bits=3.5, k=0, table=[2] * (2 * HALF + 1))
    with pytest.raises(ValueError, match="must not shrink"):
        EcsqCodec(bits=3.5, k=0, table=TABLES["gauss3.5"][:HALF] + [3, 2] + TABLES["gauss3.5"][HALF + 2:])
    with pytest.raises(ValueError, match="bits"):
        EcsqCodec(bits=0.5, k=0)
    x[2, 5] = float("nan")
    with pytest.raises(NonFiniteError):
        c.encode(x)
    y = EcsqCodec(bits=3.5, k=0, table="gauss3.5", nonfinite="propagate", backend=backend).roundtrip(x)
    assert torch.isnan(y[2]).all() and torch.isfinite(y[[0, 1, 3]]).all()


@pytest.mark.skipif(not cpu_kernels.available(), reason="CPU kernels unavailable")
def test_cpu_bit_packing_is_the_reference_on_full_and_odd_rows():
    """The C++ pack/unpack against the torch reference (itself checked against the bit-string
    reader above): every table, rows filled to the last bit, a row one bit over, codes at
    +-HALF, widths that are not a multiple of 8, and a corrupt slot."""
    g = torch.Generator().manual_seed(3)
    for name, lengths in TABLES.items():
        ln = torch.tensor(lengths)
        codes = torch.tensor(canonical_codes(lengths))
        table = decode_table(lengths, codes.tolist(), 16)
        t, e = 37, 77
        q = (torch.randn(t, e, generator=g) * 3).round().clamp(-HALF, HALF).long()
        q[0, :3] = torch.tensor([-HALF, HALF, 0])
        need = int(ln[q + HALF].sum(1).max())
        nbytes = (need + 7) // 8
        ref = pack_rows(q, ln, codes, HALF, nbytes)
        got = cpu_kernels.ecsq_pack(q, lengths=ln, codes=codes, half=HALF, nbytes=nbytes)
        assert torch.equal(got, ref), name
        back = cpu_kernels.ecsq_unpack(got, e, symbols=table[0], lengths=table[1], half=HALF)
        assert back.dtype == torch.int32 and torch.equal(back.long(), q), name
        assert torch.equal(back.long(), unpack_rows(ref, e, table, HALF)), name
        # a row filled to its last bit (8 copies of each code: whole bytes) fits; a byte fewer
        # does not, in both
        exact = torch.tensor([[HALF] * 8 + [-HALF] * 8 + [0] * 8 + [3] * 8])
        bits = int(ln[exact + HALF].sum())
        assert bits % 8 == 0
        got = cpu_kernels.ecsq_pack(exact, lengths=ln, codes=codes, half=HALF, nbytes=bits // 8)
        assert torch.equal(got, pack_rows(exact, ln, codes, HALF, bits // 8)), name
        assert torch.equal(cpu_kernels.ecsq_unpack(got, 32, symbols=table[0], lengths=table[1], half=HALF).long(),
                           exact), name
        short = bits // 8 - 1
        for fn in (lambda: pack_rows(exact, ln, codes, HALF, short),
                   lambda: cpu_kernels.ecsq_pack(exact, lengths=ln, codes=codes, half=HALF, nbytes=short)):
            with pytest.raises(ValueError, match="more than its"):
                fn()
        # a slot of all ones: longest codewords, which run past the slot
        bad = torch.full((2, nbytes), 0xFF, dtype=torch.uint8)
        for fn in (lambda: unpack_rows(bad, e, table, HALF),
                   lambda: cpu_kernels.ecsq_unpack(bad, e, symbols=table[0], lengths=table[1], half=HALF)):
            with pytest.raises(ValueError, match="corrupt ECSQ payload"):
                fn()
    with pytest.raises(ValueError, match="outside"):
        cpu_kernels.ecsq_pack(torch.tensor([[HALF + 1]]), lengths=ln, codes=codes, half=HALF, nbytes=8)


@pytest.mark.skipif(not cpu_kernels.available(), reason="CPU kernels unavailable")
@pytest.mark.parametrize("e", [576, 640, 40, 77, 12])
def test_cpu_rotation_and_rate_control_are_the_reference(e):
    """The C++ rotation and rate control bitwise against the torch reference (whose steps the
    exhaustive Python search above checks): blocks of 64, 128, 8, 1 and 4, zero rows, spikes,
    tiny and large scales, and both rounding offsets."""
    from lowbit_tp.codecs import functional as F
    from lowbit_tp.codecs.ecsq import _STEP_TABLE, choose_steps
    x = rows(23, e, seed=e)
    x[5] *= 1e-30
    x[6] *= 1e4
    x[7] *= 1e-38  # subnormal values: steps at the 2**-126 floor
    x[8, :] = 0.0
    x[8, 0] = 1e-45  # the smallest subnormal alone
    signs = (torch.randint(0, 2, (e,), generator=torch.Generator().manual_seed(e)) * 2 - 1).float()
    block = F.hadamard_block(e)
    z = cpu_kernels.ecsq_rotate(x, signs=signs, block=block, encode=True)
    assert torch.equal(z, F.fwht(x * signs, block))
    assert torch.equal(cpu_kernels.ecsq_rotate(x, signs=signs, block=block, encode=False), F.fwht(x, block) * signs)
    for name, offset in (("gauss3.5", 0.5), ("gauss4.25", 0.5), ("gauss5", 0.5), ("gauss3.5", 0.35)):
        ln = torch.tensor(TABLES[name])
        budget = 8 * math.floor(float(name[5:]) * e / 8) - 16
        budget = max(budget, e * int(ln[HALF]))
        d, q = cpu_kernels.ecsq_steps(z, table=_STEP_TABLE, lengths=ln, budget_bits=budget, half=HALF, offset=offset)
        d_ref, q_ref = choose_steps(z, ln, budget, HALF, offset=offset)
        assert torch.equal(d, d_ref) and torch.equal(q, q_ref), (name, offset)
        assert d[1] == 0 and (q[1] == 0).all()


@pytest.mark.skipif(not cpu_kernels.available(), reason="CPU kernels unavailable")
@pytest.mark.parametrize("name", ["rot-ecsq3.5-k4", "rot-ecsq3.875-k4", "rot-ecsq4.25-k4", "rot-ecsq4.625-k4",
                                  "rot-ecsq5-k4"])
def test_registered_codecs_on_the_cpu_kernels_are_the_reference(name, cal_factory):
    """The whole codec at a real width (E = 576, 4 calibrated kept channels): payloads, decodes
    and decoded sums of the C++ pieces bitwise those of backend="reference", also for bf16
    input and with a NaN row under nonfinite="propagate"; and the empty message."""
    cal = cal_factory(2, 576)
    ref = make_codec(name, calibration=cal, backend="reference")
    cpu = make_codec(name, calibration=cal, backend="cpu")
    prop = [make_codec(name, calibration=cal, backend=b, nonfinite="propagate") for b in ("reference", "cpu")]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(19, 576, generator=g) * torch.logspace(-4, 1, 19).unsqueeze(1)
    x[3] = 0.0
    x[:, 7] = 30.0
    layer = "layers.0.o_proj"
    for inp in (x, x.bfloat16()):
        pr, pc = ref.encode(inp, layer=layer, source=1), cpu.encode(inp, layer=layer, source=1)
        assert torch.equal(pr, pc)
        assert torch.equal(ref.decode(pr, (19, 576), layer=layer, source=1), cpu.decode(pc, (19, 576), layer=layer,
                                                                                        source=1))
        p0 = ref.encode(inp.flip(0), layer=layer, source=0)
        assert torch.equal(ref.decode_sum([p0, pr], (19, 576), layer=layer, sources=[0, 1]),
                           cpu.decode_sum([p0, pc], (19, 576), layer=layer, sources=[0, 1]))
    xn = x.clone()
    xn[5, 100] = float("nan")
    pr, pc = (c.encode(xn, layer=layer, source=1) for c in prop)
    assert torch.equal(pr, pc)
    yr, yc = (c.decode(pr, (19, 576), layer=layer, source=1) for c in prop)
    kept = cpu.params(layer, 1, 576).outliers
    assert torch.equal(yr.isnan(), yc.isnan()) and int(yc.isnan().sum()) == 576 - kept.numel()
    assert torch.isnan(yc[5]).sum() == 576 - kept.numel()  # the row, but for its kept bf16 channels
    assert torch.equal(yr.nan_to_num(0.0), yc.nan_to_num(0.0))
    empty = torch.zeros(0, 576)
    assert cpu.encode(empty, layer=layer).numel() == 0 == ref.encode(empty, layer=layer).numel()
