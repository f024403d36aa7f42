"""Caller-provided output buffers (``out=``) give the same bits as fresh outputs, on every backend."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before lowbit_tp imports any kernel module

import pytest  # noqa: E402
import torch  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")

from lowbit_tp.calibration.synthetic import synthetic_calibration  # noqa: E402
from lowbit_tp.codecs import make_codec  # noqa: E402
from lowbit_tp.kernels import cpu_kernels_available, triton_available  # noqa: E402

LAYER = "L"
CAL = synthetic_calibration([LAYER], world=2, hidden=64, tokens=64, batches=1)
BACKENDS = ["reference"] + (["triton"] if triton_available() else []) + (["cpu"] if cpu_kernels_available() else [])


def same_bits(a, b):
    na, nb = torch.isnan(a), torch.isnan(b)
    return torch.equal(na, nb) and torch.equal(a[~na].view(torch.int32), b[~nb].view(torch.int32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["int4-outlier", "int8", "int4-g32", "rot-lm4-g64-lg8-k4", "bf16", "mxfp4"])
def test_out_buffers_give_the_same_bits(name, backend):
    if backend != "reference" and name in ("bf16", "mxfp4") and backend == "cpu":
        pytest.skip("no CPU kernel")
    codec = make_codec(name, calibration=CAL, nonfinite="propagate", backend=backend)
    xs = [torch.randn(3, 64) * 4 for _ in range(2)]
    xs[1][0, 3] = float("nan")
    n = codec.payload_nbytes((3, 64), LAYER)
    fresh = [codec.encode(x, layer=LAYER, source=r) for r, x in enumerate(xs)]
    bufs = [torch.full((n,), 0xA5, dtype=torch.uint8) for _ in xs]  # stale bytes must all be overwritten
    got = [codec.encode(x, layer=LAYER, source=r, out=b) for r, (x, b) in enumerate(zip(xs, bufs))]
    for f, g, b in zip(fresh, got, bufs):
        assert g.data_ptr() == b.data_ptr() and torch.equal(f, g)
    out = torch.full((3, 64), 7.0)
    s = codec.decode_sum(got, (3, 64), layer=LAYER, out=out)
    assert s.data_ptr() == out.data_ptr() and same_bits(s, codec.decode_sum(fresh, (3, 64), layer=LAYER))
    for dtype in (torch.bfloat16, torch.float16):  # the sum rounded once into a half-precision buffer
        half = torch.full((3, 64), 7.0, dtype=dtype)
        h = codec.decode_sum(got, (3, 64), layer=LAYER, out=half)
        want = codec.decode_sum(fresh, (3, 64), layer=LAYER).to(dtype)
        assert h.data_ptr() == half.data_ptr() and same_bits(h.float(), want.float()), dtype
    m = torch.full((n,), 0x5A, dtype=torch.uint8)
    r = codec.reduce_encode(got, (3, 64), layer=LAYER, out=m)
    assert r.data_ptr() == m.data_ptr() and torch.equal(r, codec.reduce_encode(fresh, (3, 64), layer=LAYER))


def test_a_wrong_buffer_is_refused_with_a_clear_error():
    codec = make_codec("int4-g32")
    x = torch.randn(2, 64)
    n = codec.payload_nbytes((2, 64))
    for bad in (torch.empty(n + 1, dtype=torch.uint8), torch.empty(n, dtype=torch.int8),
                torch.empty(2 * n, dtype=torch.uint8)[::2]):
        with pytest.raises(ValueError, match="encode out= must be a contiguous torch.uint8 tensor"):
            codec.encode(x, out=bad)
    p = codec.encode(x)
    with pytest.raises(ValueError, match="decode_sum out="):
        codec.decode_sum([p, p], (2, 64), out=torch.empty(2, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="decode_sum out="):
        codec.decode_sum([p, p], (2, 64), out=torch.empty(2, 65, dtype=torch.bfloat16))


def test_buffer_cache_reuses_and_bounds():
    from lowbit_tp.collectives.dist import BufferCache

    cache = BufferCache(capacity=3)
    a = cache.get("send", 0, 10, torch.uint8, torch.device("cpu"))
    assert cache.get("send", 0, 10, torch.uint8, "cpu") is a  # same key: the same memory
    assert cache.get("send", 1, 10, torch.uint8, "cpu") is not a  # another pipeline slot
    for k in range(5):
        cache.get("recv", 0, 20 + k, torch.uint8, "cpu")
    assert len(cache._buffers) == 3 and cache.get("send", 0, 10, torch.uint8, "cpu") is not a  # evicted (LRU)
