"""Each codec against an error bound derived from its own quantization grid."""
import math
import re

import pytest
import torch

from lowbit_tp.calibration import CalibrationError
from lowbit_tp.calibration.synthetic import planted_outliers, planted_partials
from lowbit_tp.codecs import NonFiniteError, list_codecs, make_codec

from conftest import LAYERS

E = 256
L = LAYERS[0]


def _x(tokens=48, hidden=E, seed=3):
    # Values from a *different* draw than the calibration, with the same planted channels.
    return planted_partials(2, tokens, hidden, seed=0, noise_seed=seed)[1]


def test_registry_has_the_contract_names():
    for name in ["bf16", "int8", "int4", "int4-outlier", "int4-random-k", "int4-g32", "int4-g128", "mxfp4"]:
        assert name in list_codecs()
    with pytest.raises(KeyError, match="known codecs"):
        make_codec("int3-magic")


def test_static_codec_without_calibration_is_a_clear_error():
    with pytest.raises(CalibrationError, match="needs a calibration"):
        make_codec("int4-outlier")


def test_bf16_is_exact_to_bf16():
    c = make_codec("bf16")
    x = _x()
    assert torch.equal(c.roundtrip(x), x.to(torch.bfloat16).float())
    assert c.bits_per_value(tuple(x.shape)) == 16


@pytest.mark.parametrize("name,bits", [("int8", 8), ("int4", 4), ("int4-outlier", 4), ("int4-random-k", 4)])
def test_static_codecs_within_grid_bound(cal_factory, name, bits):
    """Bound from the calibration statistics and the format's description, not from the
    codec's own params(): every channel is either bf16-exact, or on the grid of its scale
    max(|ema_min|, |ema_max|) / qmax within half a step (or the clipping distance)."""
    cal = cal_factory(2, E)
    c = make_codec(name, calibration=cal)
    x = _x()
    y = c.roundtrip(x, layer=L, source=1)
    st = cal.get(L, 1)
    qmax = 2 ** (bits - 1) - 1
    s = torch.maximum(st.ema_min.abs(), st.ema_max.abs()) / qmax
    bf16_exact = (y == x.to(torch.bfloat16).float()).all(0)
    k = 0 if name in ("int8", "int4") else E // 64
    assert int((~bf16_exact).sum()) >= E - k  # at most k channels can be bf16 (a grid value may equal bf16 too)
    on_grid = ~bf16_exact
    if name == "int4-outlier":  # the kept ones are the top-k by EMA range
        top = torch.sort(torch.argsort(st.ema_max - st.ema_min, descending=True, stable=True)[:k]).values
        assert bool(bf16_exact[top].all())
        on_grid = torch.ones(E, dtype=torch.bool)
        on_grid[top] = False
    xi, yi, si = x[:, on_grid], y[:, on_grid], s[on_grid]
    bound = torch.maximum(si / 2, xi.abs() - qmax * si) * (1 + 1e-5) + 1e-6
    assert bool(((yi - xi).abs() <= bound).all())
    codes = yi / si  # the grid is used: values decode to integer multiples of the scale
    assert torch.allclose(codes, codes.round(), atol=1e-3) and float(codes.abs().max()) <= qmax + 1e-3


def test_outlier_codec_keeps_the_planted_channels(cal_factory):
    cal = cal_factory(2, E)
    c = make_codec("int4-outlier", calibration=cal)
    assert torch.equal(c.params(L, 0, E).outliers, planted_outliers(E, seed=0))
    r = make_codec("int4-random-k", calibration=cal, seed=5)
    chosen = r.params(L, 0, E).outliers
    assert chosen.numel() == E // 64
    assert torch.equal(chosen, make_codec("int4-random-k", calibration=cal, seed=5).params(L, 0, E).outliers)
    assert not torch.equal(chosen, make_codec("int4-random-k", calibration=cal, seed=6).params(L, 0, E).outliers)
    # The seed method beats both the plain int4 baseline and the random-k ablation here.
    x = _x()
    err = {n: (make_codec(n, calibration=cal).roundtrip(x, layer=L, source=0) - x).pow(2).mean().item()
           for n in ["int4", "int4-random-k", "int4-outlier"]}
    assert err["int4-outlier"] < err["int4-random-k"] / 4
    assert err["int4-outlier"] < err["int4"] / 4


@pytest.mark.parametrize("group", [32, 128])
def test_group_int4_within_bound(group):
    c = make_codec(f"int4-g{group}")
    x = _x(hidden=200)  # 200 % 128 != 0: a ragged last group
    y = c.roundtrip(x)
    g = math.ceil(200 / group)
    xp = torch.nn.functional.pad(x, (0, g * group - 200)).reshape(x.shape[0], g, group)
    s = (xp.abs().amax(-1) / 7).half().float().repeat_interleave(group, 1)[:, :200]
    bound = torch.maximum(s / 2, x.abs() - 7 * s) * (1 + 1e-5) + 1e-6
    assert bool(((y - x).abs() <= bound).all())


def test_mxfp4_within_bound():
    c = make_codec("mxfp4")
    x = _x(hidden=96)
    y = c.roundtrip(x)
    xg = x.reshape(x.shape[0], -1, 32)
    amax = xg.abs().amax(-1, keepdim=True)
    X = torch.exp2(torch.floor(torch.log2(amax)) - 2)  # OCP shared scale
    v = (xg / X).abs()
    half_gap = torch.where(v < 2, 0.25, torch.where(v < 4, 0.5, 1.0))
    bound = torch.maximum(half_gap, v - 6) * X
    err = (y.reshape_as(xg) - xg).abs()
    assert bool((err <= bound * (1 + 1e-6)).all())
    # Scales are powers of two and values sit on the E2M1 grid.
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    q = (y.reshape_as(xg) / X).abs().reshape(-1, 1)
    assert bool(((q - grid).abs().amin(1) < 1e-6).all())


@pytest.mark.parametrize("name,bits", [("bf16", 16), ("int8", 8), ("int4", 4), ("int4-outlier", 4.1875),
                                       ("int4-random-k", 4.1875), ("int4-g32", 4.5), ("int4-g128", 4.125),
                                       ("mxfp4", 4.25)])
def test_bits_per_value_measured_from_payload(name, bits):
    from lowbit_tp.calibration.synthetic import synthetic_calibration

    hidden = 4096
    cal = synthetic_calibration([L], world=1, hidden=hidden, tokens=16, batches=1)
    c = make_codec(name, calibration=cal)
    x = planted_partials(1, 8, hidden)[0]
    payload = c.encode(x, layer=L, source=0)
    assert payload.dtype == torch.uint8 and payload.dim() == 1
    assert 8 * payload.numel() / x.numel() == pytest.approx(bits)
    assert payload.numel() == c.payload_nbytes(tuple(x.shape))


@pytest.mark.parametrize("name", ["bf16", "int8", "int4", "int4-outlier", "int4-g32", "mxfp4"])
def test_nonfinite_is_an_error_naming_layer_and_source(cal_factory, name):
    c = make_codec(name, calibration=cal_factory(2, E))
    x = _x()
    x[3, 7] = float("nan")
    with pytest.raises(NonFiniteError, match=r"layers\.0\.o_proj.*source 1"):
        c.encode(x, layer=L, source=1)
    x[3, 7] = float("inf")
    with pytest.raises(NonFiniteError):
        c.encode(x, layer=L, source=1)


@pytest.mark.parametrize("name", ["bf16", "int8", "int4", "int4-outlier", "int4-g32", "int4-g128", "mxfp4"])
def test_nonfinite_propagates_when_asked(cal_factory, name):
    c = make_codec(name, calibration=cal_factory(2, E), nonfinite="propagate")
    x = _x()
    x[3, 7] = float("nan")
    x[5, 100] = float("-inf")
    y = c.roundtrip(x, layer=L, source=0)
    assert not bool(torch.isfinite(y[3, 7])) and not bool(torch.isfinite(y[5, 100]))
    # Everything outside the affected values (or, for mxfp4, the affected 32-blocks) stays finite.
    bad = torch.zeros_like(x, dtype=torch.bool)
    if name == "mxfp4":
        bad[3, 0:32] = True
        bad[5, 96:128] = True
    else:
        bad[3, 7] = bad[5, 100] = True
    assert bool(torch.isfinite(y[~bad]).all())


def test_wrong_shape_dtype_and_width(cal_factory):
    cal = cal_factory(2, E)
    c = make_codec("int4-outlier", calibration=cal)
    with pytest.raises(ValueError, match=r"\[tokens, E\]"):
        c.encode(torch.zeros(2, 3, E), layer=L, source=0)
    with pytest.raises(TypeError, match="int64"):
        c.encode(torch.zeros(4, E, dtype=torch.int64), layer=L, source=0)
    with pytest.raises(ValueError, match="hidden size 256"):
        c.encode(torch.zeros(4, E + 64), layer=L, source=0)
    with pytest.raises(CalibrationError, match="no layer 'nope'"):
        c.encode(torch.zeros(4, E), layer="nope", source=0)
    payload = c.encode(torch.zeros(4, E), layer=L, source=0)
    with pytest.raises(ValueError, match="uint8 bytes"):
        c.decode(payload[:-1], (4, E), layer=L, source=0)


@pytest.mark.parametrize("name", ["bf16", "int4-outlier", "int4-g32", "int4-g128", "mxfp4", "rot-lm4-g64-lg8-k4"])
@pytest.mark.parametrize("shape", [(4.5, E), (4, E, 1), (-4, -E), 4 * E, (4,)], ids=str)
def test_a_decode_shape_is_two_nonnegative_integers(cal_factory, name, shape):
    # before: (4.5, E) decoded 4 rows, (4, E, 1) dropped the 1, (-4, -E) failed inside torch (or, for
    # int4-g128, as a payload size for the negative shape), an int failed as "not subscriptable"
    c = make_codec(name, calibration=cal_factory(2, E))
    payload = c.encode(torch.randn(4, E), layer=L, source=0)
    msg = f"{name}: shape must be \\(tokens, E\\)"
    for decode in (lambda: c.decode(payload, shape, layer=L, source=0),
                   lambda: c.decode_sum([payload, payload], shape, layer=L),
                   lambda: c.decode_chunks(payload, shape, 1, layer=L, source=0)):
        with pytest.raises(ValueError, match=msg):
            decode()


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("name", ["int4-outlier", "int4-random-k", "int8", "rot-lm4-g64-lg8-k4", "rot-lm4-g64+sum8"])
def test_a_decode_width_other_than_the_calibrations_is_refused(cal_factory, name, backend):
    # before: the parameters were cached per (layer, source) whatever the width, so after one
    # encode at E a decode of a (4, E/2) payload used E's outlier channels: the reference failed
    # inside torch, the CPU kernel wrote past the output ("free(): corrupted unsorted chunks")
    c = make_codec(name, calibration=cal_factory(2, E), backend=backend)
    c.encode(torch.randn(4, E), layer=L, source=0)  # caches source 0's parameters
    for width in (E // 2, 2 * E):
        shape = (4, width)
        p = torch.zeros(c.payload_nbytes(shape, L), dtype=torch.uint8)
        for call in (lambda: c.decode(p, shape, layer=L, source=0),
                     lambda: c.decode_sum([p, p], shape, layer=L),
                     lambda: c.decode_chunks(torch.cat([p, p]), shape, 2, layer=L, source=0),
                     lambda: c.reduce_encode([p, p], shape, layer=L)):
            with pytest.raises(ValueError, match=f"shape has {width} channels but the calibration has hidden size {E}"):
                call()


@pytest.mark.parametrize("name", ["bf16", "int4-outlier", "int4-g32", "mxfp4", "rot-lm4-g64-lg8-k4", "rot-lm4-g64+sum8"])
def test_decode_sum_takes_strided_payloads_and_refuses_none(cal_factory, name):
    # before: bf16's decode_sum of a strided payload view failed inside torch ("self.stride(-1) must
    # be 1 to view Byte as BFloat16") although decode took it; the two-stage codec said "sources []
    # ... use different codecs" for no payload at all
    c = make_codec(name, calibration=cal_factory(2, E))
    x = _x(tokens=4)
    payloads = [c.encode(x, layer=L, source=r) for r in range(2)]
    strided = []
    for p in payloads:
        wide = torch.zeros(2 * p.numel(), dtype=torch.uint8)
        wide[::2] = p
        strided.append(wide[::2])
    want = c.decode(payloads[0], (4, E), layer=L, source=0) + c.decode(payloads[1], (4, E), layer=L, source=1)
    assert torch.equal(c.decode_sum(strided, (4, E), layer=L), want)
    with pytest.raises(ValueError, match=re.escape(f"{name}: decode_sum needs at least one payload")):
        c.decode_sum([], (4, E), layer=L)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("name", ["bf16", "int4-outlier", "int4-g32", "mxfp4", "rot-lm4-g64-lg8-k4"])
def test_payloads_on_two_devices_are_refused(cal_factory, name, backend):
    # before: the kernel was picked by payload 0's device, so the CPU kernels were handed another
    # device's pointer: a segmentation fault for [cpu, meta] (as [cpu, cuda] would be); the reference
    # failed inside torch
    c = make_codec(name, calibration=cal_factory(2, E), backend=backend)
    p = c.encode(_x(tokens=4), layer=L, source=0)
    for call in (lambda: c.decode_sum([p, p.to("meta")], (4, E), layer=L),
                 lambda: c.reduce_encode([p, p.to("meta")], (4, E), layer=L)):
        with pytest.raises(ValueError, match=re.escape(f"{name}: payload 1 is on meta but payload 0 on cpu")):
            call()


def test_an_uncalibrated_rotation_codec_takes_any_width_on_every_backend():
    # before: its rotation signs were cached per (layer, source) at the first width, so the
    # reference refused a second width (a size mismatch inside torch) that the CPU kernels took
    from lowbit_tp.codecs.rotation import RotatedGroupCodec

    def fresh():
        return RotatedGroupCodec(k=0, bits=4, group=64, levels="lm", scale_format="lg8", backend="reference")

    c = fresh()
    for width in (E, 2 * E, E):
        x = torch.randn(4, width)
        payload = fresh().encode(x)
        assert torch.equal(c.encode(x), payload)
        assert torch.equal(c.decode(payload, (4, width)), fresh().decode(payload, (4, width)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(cal_factory, dtype):
    cal = cal_factory(2, E)
    x = _x().to(dtype)
    for name in ["int4-outlier", "int4-g32", "mxfp4", "bf16"]:
        y = make_codec(name, calibration=cal).roundtrip(x, layer=L, source=0)
        assert y.dtype == torch.float32 and y.shape == x.shape


def test_scale_stat_choice(cal_factory):
    cal = cal_factory(2, E)
    st = cal.get(L, 0)
    # The scales show in a decode of x far beyond every range: code 7 times the channel scale.
    x = torch.full((1, E), 1e9)
    ema = make_codec("int4", calibration=cal, scale_stat="ema").roundtrip(x, layer=L, source=0)[0] / 7
    amx = make_codec("int4", calibration=cal, scale_stat="absmax").roundtrip(x, layer=L, source=0)[0] / 7
    torch.testing.assert_close(ema, torch.maximum(st.ema_min.abs(), st.ema_max.abs()) / 7, rtol=1e-6, atol=0)
    torch.testing.assert_close(amx, st.absmax / 7, rtol=1e-6, atol=0)
    assert bool((amx >= ema).all())


def test_fingerprint_copies_nothing_and_follows_the_calibration():
    """Every compressed all-reduce asks the codec's fingerprint for its configuration check's cache
    key; it went through config(), which returns a copy of the config dict, so each call built one."""
    import tracemalloc

    from lowbit_tp.calibration.synthetic import synthetic_calibration

    def peak_bytes(fn):
        fn()
        tracemalloc.start()
        try:
            fn()
            tracemalloc.reset_peak()
            before, _ = tracemalloc.get_traced_memory()
            fn()
            return tracemalloc.get_traced_memory()[1] - before
        finally:
            tracemalloc.stop()

    cal = synthetic_calibration(["L"], world=2, hidden=64, tokens=8, batches=1)
    codec = make_codec("int4-outlier", calibration=cal)
    fp = codec.fingerprint()
    assert peak_bytes(codec.fingerprint) < peak_bytes(codec.config)  # config() copies, fingerprint() must not
    assert codec.config()["codec"] == "int4-outlier" and codec.config() is not codec.config()  # callers may edit theirs
    codec.calibration = synthetic_calibration(["L"], world=2, hidden=64, tokens=8, batches=1, seed=1)
    assert codec.fingerprint() != fp  # another calibration object: recomputed
