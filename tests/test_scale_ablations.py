"""The seed codec's scale ablations and the calibration statistics they read."""
import math

import numpy as np
import pytest
import torch

from lowbit_tp.calibration import Calibration, CalibrationError, StatsAccumulator
from lowbit_tp.calibration.artifact import ChannelStats
from lowbit_tp.codecs import make_codec

LAYER = "layers.0.o_proj"


def _batches(seed=0, n=4, tokens=1000, hidden=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(tokens, hidden, generator=g) * (1 + torch.arange(hidden)) + 0.5 * b for b in range(n)]


def _cal(batches, decay=0.9):
    acc = StatsAccumulator(ema_decay=decay)
    for y in batches:
        acc.update(LAYER, 0, y)
    return acc.build({"tp": 1, "hidden_size": batches[0].shape[1]}, layers=[LAYER])


def test_mean_and_percentile_statistics_match_numpy():
    batches = _batches()
    st = _cal(batches).get(LAYER, 0)
    arr = [b.numpy().astype(np.float64) for b in batches]
    np.testing.assert_allclose(st.mean_min.numpy(), np.mean([a.min(0) for a in arr], axis=0), rtol=1e-5)
    np.testing.assert_allclose(st.mean_max.numpy(), np.mean([a.max(0) for a in arr], axis=0), rtol=1e-5)
    # 99.9th percentile as the ceil(0.999 n)-th smallest |y| (n = 1000: the 999th), batch mean
    kth = [np.sort(np.abs(a), axis=0)[math.ceil(0.999 * len(a)) - 1] for a in arr]
    np.testing.assert_allclose(st.p999.numpy(), np.mean(kth, axis=0), rtol=1e-5)
    # the paper's EMA weighs the first of 4 batches 0.9**3 = 73%; the mean 25%
    ema = arr[0].max(0)
    for a in arr[1:]:
        ema = 0.9 * ema + 0.1 * a.max(0)
    np.testing.assert_allclose(st.ema_max.numpy(), ema, rtol=1e-5)


def _reference_roundtrip(x, low, high, keep):
    """Zero-point int4 written out: 15 levels centre + q * s, s = (high - low) / 14."""
    centre, s = (low + high) / 2, (high - low) / 14
    q = torch.clamp(torch.round((x - centre) / s), -7, 7)
    return torch.where(keep, x.to(torch.bfloat16).float(), centre + q * s)


def test_zero_point_codec_against_a_written_out_reference(tmp_path):
    batches = _batches(n=3)
    cal = _cal(batches)
    st = cal.get(LAYER, 0)
    x = batches[1][:40]
    keep = torch.zeros(16, dtype=torch.bool)
    keep[torch.argsort(st.ema_max - st.ema_min, descending=True, stable=True)[:2]] = True
    for name, (low, high) in (("int4-outlier-asym", (st.ema_min, st.ema_max)),
                              ("int4-outlier-mean-asym", (st.mean_min, st.mean_max))):
        codec = make_codec(name, calibration=cal, k=2)
        if name.startswith("int4-outlier-mean"):
            keep = torch.zeros(16, dtype=torch.bool)
            keep[torch.argsort(st.mean_max - st.mean_min, descending=True, stable=True)[:2]] = True
        got = codec.roundtrip(x, layer=LAYER, source=0)
        ref = _reference_roundtrip(x, low, high, keep)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * float(high.abs().max()))
        assert codec.bits_per_value((40, 16)) == make_codec("int4-outlier", calibration=cal, k=2).bits_per_value((40, 16))
    # channels are shifted by 0.5 per batch: the zero point beats the symmetric scale
    sym = make_codec("int4-outlier", calibration=cal, k=2).roundtrip(x, layer=LAYER, source=0)
    asym = make_codec("int4-outlier-asym", calibration=cal, k=2).roundtrip(x, layer=LAYER, source=0)
    assert (asym - x).norm() < (sym - x).norm()


def test_percentile_scale_clips_and_absmax_scale_does_not():
    cal = _cal(_batches())
    st = cal.get(LAYER, 0)
    x = torch.full((1, 16), 1e3)
    p = make_codec("int4-outlier-p999", calibration=cal, k=0).roundtrip(x, layer=LAYER, source=0)
    a = make_codec("int4-outlier-absmax", calibration=cal, k=0).roundtrip(x, layer=LAYER, source=0)
    torch.testing.assert_close(p[0], st.p999, rtol=1e-6, atol=0)
    torch.testing.assert_close(a[0], st.absmax, rtol=1e-6, atol=0)
    assert (st.p999 < st.absmax).all()


def test_old_artifacts_load_and_ablations_refuse_them_clearly(tmp_path):
    cal = _cal(_batches())
    old = Calibration(meta=dict(cal.meta), stats={k: ChannelStats(v.ema_min, v.ema_max, v.absmax)
                                                   for k, v in cal.stats.items()})
    path = old.save(tmp_path / "old.safetensors")
    back = Calibration.load(path)
    assert back.get(LAYER, 0).p999 is None
    make_codec("int4-outlier", calibration=back).roundtrip(torch.randn(3, 16), layer=LAYER, source=0)
    for name in ("int4-outlier-p999", "int4-outlier-mean"):
        with pytest.raises(CalibrationError, match="no '(p999|mean_max|mean_min)' statistics .* recalibrate"):
            make_codec(name, calibration=back).roundtrip(torch.randn(3, 16), layer=LAYER, source=0)
    new = Calibration.load(cal.save(tmp_path / "new.safetensors"))
    assert torch.equal(new.get(LAYER, 0).p999, cal.get(LAYER, 0).p999)
    with pytest.raises(ValueError, match="zero_point needs per-channel min and max"):
        make_codec("int4-outlier", calibration=cal, scale_stat="absmax", zero_point=True)


@pytest.mark.parametrize("name", ["int4-outlier-asym", "int4-outlier-mean-asym"])
def test_zero_point_codec_refuses_statistics_whose_span_overflows_fp32(name):
    """Per-channel min/max near fp32's limit (+-2e38, finite): the centre (low + high) / 2 or
    the span (high - low) / 2 overflowed, and finite input decoded to NaN (252 of 256 values);
    now the codec refuses the layer in one line. Symmetric scales of the same statistics, and
    the zero-point codec on statistics of +-1e38, still work."""
    def cal_at(big):
        cal = _cal(_batches(n=2, hidden=64))
        st = cal.get(LAYER, 0)
        for stat in ("ema_min", "mean_min"):
            getattr(st, stat).fill_(-big)
        for stat in ("ema_max", "mean_max"):
            getattr(st, stat).fill_(big)
        return cal

    x = torch.randn(4, 64)
    with pytest.raises(CalibrationError, match=rf"{name}: calibration statistics of '{LAYER}'\|0 span more than fp32"):
        make_codec(name, calibration=cal_at(2e38), backend="reference").roundtrip(x, layer=LAYER, source=0)
    ok = make_codec(name, calibration=cal_at(1e38), backend="reference").roundtrip(x, layer=LAYER, source=0)
    assert torch.isfinite(ok).all()
    sym = make_codec("int4-outlier", calibration=cal_at(2e38), backend="reference").roundtrip(x, layer=LAYER, source=0)
    assert torch.isfinite(sym).all()
