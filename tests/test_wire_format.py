"""The wire format, pinned on literal bytes, plus property tests of packing on odd shapes."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit_tp.calibration import Calibration, ChannelStats
from lowbit_tp.codecs import functional as F
from lowbit_tp.codecs import make_codec


def _bytes(t):
    return list(t.tolist())


def test_int4_pack_even_index_in_low_nibble():
    q = torch.tensor([1, -1, 7, -8, 3], dtype=torch.int8)
    packed = F.pack_int4(q)
    assert _bytes(packed) == [0xF1, 0x87, 0x03]
    assert torch.equal(F.unpack_int4(packed, 5), q)


def test_bf16_bytes_are_little_endian():
    payload = make_codec("bf16").encode(torch.tensor([[1.0, -2.0]]))
    assert _bytes(payload) == [0x80, 0x3F, 0x00, 0xC0]


def _hand_calibration(absmax_row, ranges):
    a = torch.tensor(absmax_row)
    r = torch.tensor(ranges)
    st_ = ChannelStats(ema_min=-r / 2, ema_max=r / 2, absmax=a)
    return Calibration(meta={"tp": 1, "hidden_size": len(absmax_row), "layers": ["L"]}, stats={("L", 0): st_})


def test_int4_outlier_layout_literal():
    # 4 channels; channel 2 has the largest range -> bf16. Others: scale = (range/2)/7 = 1.0.
    cal = _hand_calibration([7.0, 7.0, 100.0, 7.0], [14.0, 14.0, 200.0, 14.0])
    c = make_codec("int4-outlier", calibration=cal, k=1)
    x = torch.tensor([[1.0, -2.0, 3.5, 9.0],
                      [0.0, 6.6, -1.0, -3.4]])
    p = c.encode(x, layer="L", source=0)
    # bf16 block: token0 ch2 = 3.5 (0x4060), token1 ch2 = -1.0 (0xBF80)
    # int4 block: tokens' channels 0,1,3: [1, -2, 7(clipped 9)], [0, 7(6.6), -3]
    #   nibbles: 1,E | 7,0 | 7,D  -> 0xE1, 0x07, 0xD7
    assert _bytes(p) == [0x60, 0x40, 0x80, 0xBF, 0xE1, 0x07, 0xD7]
    y = c.decode(p, (2, 4), layer="L", source=0)
    assert y.tolist() == [[1.0, -2.0, 3.5, 7.0], [0.0, 7.0, -1.0, -3.0]]


def test_int4_group_layout_literal():
    c = make_codec("int4-g32")
    x = torch.zeros(1, 32)
    x[0, 0], x[0, 1], x[0, 31] = 14.0, -7.0, 3.0  # absmax 14 -> scale 2.0 (fp16 0x4000)
    p = c.encode(x)
    expected = [0x00] * 16
    expected[0] = 0xC7        # codes 7 (14/2) low, -4 (-7/2 -> -3.5 -> round half even -4) high
    expected[15] = 0x20       # code 2 (3/2 = 1.5 -> 2) in the high nibble of byte 15
    assert _bytes(p) == expected + [0x00, 0x40]


def test_mxfp4_layout_literal():
    c = make_codec("mxfp4")
    x = torch.zeros(1, 32)
    x[0, 0], x[0, 1], x[0, 2] = 6.0, -1.5, 0.5  # amax 6 -> exponent floor(log2 6) - 2 = 0
    p = c.encode(x)
    expected = [0x00] * 16
    expected[0] = 0xB7        # 6.0 -> code 7 (low), -1.5 -> 8|3 = 0xB (high)
    expected[1] = 0x01        # 0.5 -> code 1
    assert _bytes(p) == expected + [127]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=-8, max_value=7), min_size=0, max_size=257))
def test_pack_unpack_any_length(vals):
    q = torch.tensor(vals, dtype=torch.int8)
    packed = F.pack_int4(q)
    assert packed.numel() == (len(vals) + 1) // 2
    assert torch.equal(F.unpack_int4(packed, len(vals)), q)


@settings(max_examples=40, deadline=None)
@given(tokens=st.integers(1, 5), hidden=st.integers(1, 70), seed=st.integers(0, 1000),
       name=st.sampled_from(["bf16", "int4-g32", "int4-g128", "mxfp4"]))
def test_dynamic_codecs_roundtrip_odd_shapes(tokens, hidden, seed, name):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g) * 3
    c = make_codec(name)
    p = c.encode(x)
    assert p.numel() == c.payload_nbytes((tokens, hidden))
    y = c.decode(p, (tokens, hidden))
    assert y.shape == x.shape
    # No codec here moves a value by more than a quarter of its row's absmax (mxfp4's worst case).
    assert bool(((y - x).abs() <= 0.26 * x.abs().amax(1, keepdim=True) + 1e-6).all())


@settings(max_examples=30, deadline=None)
@given(tokens=st.integers(1, 4), hidden=st.integers(2, 40), k=st.integers(0, 5), seed=st.integers(0, 100))
def test_outlier_codec_odd_shapes(tokens, hidden, k, seed):
    from lowbit_tp.calibration import StatsAccumulator

    k = min(k, hidden)
    g = torch.Generator().manual_seed(seed)
    acc = StatsAccumulator()
    acc.update("L", 0, torch.randn(16, hidden, generator=g) * 2)
    cal = acc.build({"tp": 1, "hidden_size": hidden})
    c = make_codec("int4-outlier", calibration=cal, k=k)
    x = torch.randn(tokens, hidden, generator=g)
    p = c.encode(x, layer="L", source=0)
    assert p.numel() == 2 * tokens * k + (tokens * (hidden - k) + 1) // 2
    y = c.decode(p, (tokens, hidden), layer="L", source=0)
    # bitwise against the reference written from the description (tests/test_seed_reference.py)
    from test_seed_reference import ref_int4_outlier

    st_ = cal.get("L", 0)
    want_bytes, want = ref_int4_outlier(x.numpy(), st_.ema_min.numpy(), st_.ema_max.numpy(), k)
    assert p.numpy().tobytes() == want_bytes
    assert torch.equal(y, torch.from_numpy(want))


def _spec_signs(e, seed=0):
    """The rotation's ±1 signs as docs/wire-format.md specifies them."""
    import zlib

    g = torch.Generator().manual_seed(zlib.crc32(f"rotation|{seed}|{e}".encode()))
    return torch.randint(0, 2, (e,), generator=g) * 2 - 1


def test_lg8_rotated_payload_literal_bytes():
    """rot-int4, group 32, lg8 scales, k = 0, E = 64 (one Hadamard block of 64), two tokens.

    Token 0 is ``24 s_0 e_0 + 8 s_32 e_32``, so the rotated row is exactly 4 on channels
    0-31 (column 32 of H is +1 there) and 2 on 32-63: absmaxes 4 and 2, bf16 base 4.0
    (bytes 80 40), group codes 0 and 16 (2**(-16/16) = 1/2), every value code 15 (level
    7/7). Token 1 is zero: base 0, codes 254 (the largest finite code), value code 8
    (level 0/7).
    """
    from lowbit_tp.codecs.rotation import RotatedGroupCodec

    s = _spec_signs(64)
    x = torch.zeros(2, 64)
    x[0, 0], x[0, 32] = 24.0 * s[0], 8.0 * s[32]
    c = RotatedGroupCodec(bits=4, group=32, k=0, levels="int", scale_format="lg8")
    payload = c.encode(x)
    expected = [0xFF] * 32 + [0x88] * 32 + [0x00, 0x10, 0xFE, 0xFE] + [0x80, 0x40, 0x00, 0x00]
    assert _bytes(payload) == expected
    assert torch.equal(c.decode(payload, (2, 64)), x)  # exact: every value sits on a level


def test_lg8_nan_sentinel_marks_one_group():
    from lowbit_tp.codecs.rotation import RotatedGroupCodec

    s = _spec_signs(64)
    x = torch.zeros(1, 64)
    x[0, 0], x[0, 32] = 24.0 * s[0], 8.0 * s[32]
    c = RotatedGroupCodec(bits=4, group=64, k=0, levels="int", scale_format="lg8", nonfinite="propagate")
    x2 = torch.cat([x, x])
    x2[1, 7] = float("nan")
    payload = c.encode(x2)
    assert _bytes(payload[64:66]) == [0x00, 0xFF]  # token 1's only group: code 255
    # token 1's base: the absmax of its finite rotated values, none here (the NaN spread
    # over the whole block), so 0; it stays a finite number either way
    assert _bytes(payload[66:]) == [0x80, 0x40, 0x00, 0x00]
    y = c.decode(payload, (2, 64))
    assert bool(torch.isfinite(y[0]).all()) and bool(torch.isnan(y[1]).all())


# The default codec's 4-bit Lloyd-Max table for groups > 32, copied from docs/wire-format.md's
# description (symmetric, ascending; code i is the i-th level): pinned here because the
# table is part of the wire format and nothing else would notice a changed digit.
LM4_G64_HALF = [0.0448, 0.1355, 0.2301, 0.3325, 0.4458, 0.5765, 0.7345, 0.9453]


def _dense_hadamard(n):
    """Orthonormal Sylvester-Hadamard matrix: H[i, j] = (-1)**popcount(i & j) / sqrt(n)."""
    i = torch.arange(n)
    bits = torch.bitwise_and(i[:, None], i[None, :])
    parity = torch.zeros_like(bits)
    for b in range(n.bit_length()):
        parity ^= (bits >> b) & 1
    return (1.0 - 2.0 * parity.double()) / n ** 0.5


def lm4_literal_case():
    """The literal case of ``rot-lm4-g64-lg8-k4`` (the default codec's format) at E = 64,
    one token, k = 4: ``(cal, x, payload bytes, decoded values fp64)``.

    Channels 5, 21, 40, 63 have the largest calibrated ranges: they go out as bf16 (3.0,
    -1.5, 0.5, -4.0 -> 40 40, C0 BF, 00 3F, 80 C0) and are zeroed. The rest is four spikes
    (7.5, 4, -0.5, 5) times the spec's signs on channels 0, 16, 32, 48: the rotation (columns
    0, 16, 32, 48 of H_64 are constant on each quarter) gives exactly 2, -0.25, 0.875, 1.125
    on the four quarters of 16 channels. One group of 64: absmax 2 -> bf16 base 2.0 (00 40),
    group code 0; z / S = 1, -0.125, 0.4375, 0.5625 -> nearest Lloyd-Max levels 0.9453,
    -0.1355, 0.4458, 0.5765 = codes 15, 6, 12, 13 (nibbles FF, 66, CC, DD).
    """
    e = 64
    kept, kept_vals = [5, 21, 40, 63], [3.0, -1.5, 0.5, -4.0]
    ranges = torch.ones(e)
    ranges[kept] = torch.tensor([50.0, 60.0, 70.0, 80.0])
    cal = Calibration(meta={"tp": 1, "hidden_size": e, "layers": ["L"]},
                      stats={("L", 0): ChannelStats(ema_min=-ranges / 2, ema_max=ranges / 2, absmax=ranges / 2)})
    s = _spec_signs(e).float()
    x = torch.zeros(1, e)
    for ch, a in zip([0, 16, 32, 48], [7.5, 4.0, -0.5, 5.0]):
        x[0, ch] = a * s[ch]
    x[0, kept] = torch.tensor(kept_vals)
    expected = ([0x40, 0x40, 0xC0, 0xBF, 0x00, 0x3F, 0x80, 0xC0]
                + [0xFF] * 8 + [0x66] * 8 + [0xCC] * 8 + [0xDD] * 8
                + [0x00] + [0x00, 0x40])
    # decode: the levels times the scale, rotated back with a dense matrix, kept channels restored
    levels = [-v for v in reversed(LM4_G64_HALF)] + LM4_G64_HALF
    z = torch.tensor([2.0 * levels[code] for code in (15, 6, 12, 13) for _ in range(16)], dtype=torch.float64)
    want = (_dense_hadamard(e) @ z) * s.double()
    want[kept] = torch.tensor(kept_vals, dtype=torch.float64)
    return cal, x, expected, want


@pytest.mark.parametrize("backend", ["reference", "auto"])  # auto: the CPU kernels where built
def test_default_format_rot_lm4_g64_lg8_k4_literal_bytes(backend):
    """:func:`lm4_literal_case`, encoded and decoded."""
    cal, x, expected, want = lm4_literal_case()
    c = make_codec("rot-lm4-g64-lg8-k4", calibration=cal, backend=backend)
    payload = c.encode(x, layer="L", source=0)
    assert _bytes(payload) == expected
    got = c.decode(payload, (1, x.shape[1]), layer="L", source=0)
    assert torch.allclose(got[0].double(), want, rtol=0, atol=1e-6), (got[0] - want).abs().max()
