"""The seed codec (`int4-outlier`) against a reference written here from its description.

The description (the seed paper as this project reads it, docs/wire-format.md): per
(layer, source), the k channels with the largest EMA range (ema_max - ema_min; ties to the
lower index) travel as bf16; every other channel c is static symmetric int4 with scale
max(|ema_min[c]|, |ema_max[c]|) / 7, code = round-half-even(x * fp32(1/scale)) clamped to
[-7, 7] (-8 is the NaN sentinel, unused for finite input); payload = [T*k bf16, kept
channels ascending][int4 codes of the other channels, ascending, two per byte, even flat
index in the low nibble]; decode = code * scale. Nothing is taken from the codec under test.
"""
import numpy as np
import pytest
import torch

from lowbit_tp.calibration import StatsAccumulator
from lowbit_tp.codecs import make_codec


def ref_int4_outlier(x, ema_min, ema_max, k):
    """Reference encoder and decoder, numpy only: returns (payload bytes, decoded fp32)."""
    x, lo, hi = (np.asarray(a, dtype=np.float32) for a in (x, ema_min, ema_max))
    t, e = x.shape
    kept = np.sort(np.argsort(-(hi - lo), kind="stable")[:k])
    rest = np.setdiff1d(np.arange(e), kept)
    scale = np.maximum(np.maximum(np.abs(lo), np.abs(hi))[rest] / np.float32(7), np.float32(1e-12))
    q = np.clip(np.rint(x[:, rest] * (np.float32(1) / scale)), -7, 7).astype(np.int8).reshape(-1)
    q = np.append(q, np.int8(0)) if q.size % 2 else q
    nib = (q.astype(np.uint8) & 0x0F)
    body = nib[0::2] | (nib[1::2] << 4)
    bf = torch.from_numpy(x[:, kept].copy()).to(torch.bfloat16)  # round to nearest even bf16
    head = bf.view(torch.int16).numpy().astype("<i2").tobytes()
    out = np.zeros((t, e), dtype=np.float32)
    out[:, rest] = q[: t * rest.size].reshape(t, rest.size).astype(np.float32) * scale
    out[:, kept] = bf.float().numpy()
    return head + body.astype(np.uint8).tobytes(), out


def _calibration(e, seed):
    g = torch.Generator().manual_seed(seed)
    gain = torch.ones(e)
    gain[torch.randperm(e, generator=g)[: max(1, e // 50)]] = 30.0
    acc = StatsAccumulator()
    for _ in range(4):
        acc.update("L", 0, torch.randn(64, e, generator=g) * gain + 0.3)
    return acc.build({"tp": 1, "hidden_size": e}), gain


@pytest.mark.parametrize("backend", ["reference", "auto"])  # auto: the CPU kernels where built
@pytest.mark.parametrize("e", [40, 576, 600, 4096])
def test_int4_outlier_matches_the_reference_bitwise(e, backend):
    cal, gain = _calibration(e, seed=e)
    g = torch.Generator().manual_seed(7 * e)
    x = torch.randn(5, e, generator=g) * gain * 1.3  # some values beyond the calibrated range: clamped
    st = cal.get("L", 0)
    k = max(1, e // 64)  # explicit: the reference must not borrow the codec's default
    payload, want = ref_int4_outlier(x.numpy(), st.ema_min.numpy(), st.ema_max.numpy(), k)
    codec = make_codec("int4-outlier", calibration=cal, k=k, backend=backend)
    got = codec.encode(x, layer="L", source=0)
    assert got.numpy().tobytes() == payload
    y = codec.decode(got, (5, e), layer="L", source=0)
    assert np.array_equal(y.numpy().view(np.int32), want.view(np.int32))
