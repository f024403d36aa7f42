"""The compiled CPU kernels against the eager PyTorch reference, bit for bit.

The reference (``backend="reference"``) is the independent implementation: plain tensor
ops in lowbit_tp/codecs. Every payload byte and every bit of every decoded sum must agree,
on odd shapes, all three input dtypes, zeros, extremes and NaN/Inf in propagate mode.
"""
import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowbit_tp.calibration.synthetic import synthetic_calibration
from lowbit_tp.codecs import NonFiniteError, OutOfRangeError, make_codec
from lowbit_tp.codecs import functional as F
from lowbit_tp.kernels import cpu as cpu_kernels
from lowbit_tp.kernels import resolve_backend

if not cpu_kernels.available():
    if shutil.which("g++") or shutil.which("c++"):
        pytest.fail(f"a C++ compiler exists but the CPU kernels did not build: {cpu_kernels.build_error()}",
                    pytrace=False)
    pytest.skip("no C++ compiler: the CPU kernels cannot be built here", allow_module_level=True)

LAYER = "model.layers.0.mlp.down_proj"
CODECS = ["int4-outlier", "int4", "int8", "int4-random-k", "int4-g32", "int4-g128",
          # rotated: lg8 + 4-bit nibbles (default's), lg8 + 6-bit planes, E8M0 + 3-bit planes, fp16 scales
          "rot-lm4-g64-lg8-k4", "rot-int6-g64-lg8-k4", "rot-lm3-g32-e8", "rot-int4-g64", "rot-int8-g64-e8",
          # the allocation ladder: lg8 with 2-, 3-, 5-bit planes and 8-bit bytes
          "rot-lm2-g64-lg8-k4", "rot-lm3-g64-lg8-k4", "rot-int5-g64-lg8-k4", "rot-int8-g64-lg8-k4"]
# Odd widths, E below a group, and one wide row (long runs between kept channels: the 32-wide
# vector loops, their 8-wide and scalar tails).
SHAPES = [(1, 64), (5, 64), (3, 67), (7, 130), (2, 200), (4, 576), (3, 640), (3, 1000)]
KINDS = ["randn", "zeros", "extremes", "nonfinite"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@functools.lru_cache(maxsize=None)
def _cal(world: int, hidden: int):
    """The synthetic calibration of ``LAYER`` for one (world, hidden), built once for the
    module: every codec of a test reads the same one (a build costs more than a case)."""
    return synthetic_calibration([LAYER], world=world, hidden=hidden)


def make_input(t, e, dtype, kind, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, e, generator=g) * 3
    flat = x.view(-1)
    if kind == "zeros":
        x.zero_()
    elif kind == "extremes":  # overflow to Inf in fp16/bf16 casts, subnormals, exact halves
        flat[::7] = 3e38
        flat[1::11] = -1e-40
        flat[2::13] = 70000.0
        flat[3::5] = 0.5
        flat[4::9] = -0.0
    elif kind == "nonfinite":
        flat[::5] = float("nan")
        flat[1::9] = float("inf")
        flat[3::17] = -float("inf")
    return x.to(dtype)


def bits(t):
    return t.view(torch.int32)


def same_sum(a, b):
    """Equal bits, except that any NaN matches any NaN: PyTorch's own fp16 -> fp32 cast writes
    NaN as 0x7FC00000 in its vector loop and 0x7FFFFFFF in its scalar tail, so NaN payload bits
    of a decoded sum are not part of the contract (payload bytes are compared exactly)."""
    return bool(((bits(a) == bits(b)) | (a.isnan() & b.isnan())).all())


def test_native_build_has_this_cpus_vector_paths():
    """The default build is -march=native; if it fails to compile, cpu.build falls back to a
    portable build without a word, and every test above would pass on the scalar twins. So:
    a CPU with AVX2/AVX-512/GFNI+VBMI must get the matching hand-written paths."""
    if os.environ.get("LOWBIT_TP_CPU_PORTABLE") == "1" or os.environ.get("LOWBIT_TP_CPU_NO_AVX512") == "1":
        pytest.skip("a reduced build was asked for")
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    want = set()
    if {"avx2", "f16c"} <= flags:
        want.add("avx2")
    if {"avx2", "f16c", "avx512f", "avx512vl", "avx512dq"} <= flags:
        want.add("avx512")
        if {"gfni", "avx512vbmi"} <= flags:
            want.add("gfni")
    assert want <= cpu_kernels.features(), (want, cpu_kernels.features())


@pytest.mark.parametrize("march", ["x86-64-v3", *(pytest.param(m, marks=pytest.mark.slow) for m in (
    "x86-64-v3 -mavx512f -mavx512vl -mavx512dq", "skylake-avx512", "icelake-server"))])  # 3-4 s a build
def test_the_source_compiles_for_each_vector_level(march):
    """-march=native is the default build, so the source must compile on every x86 level it
    may meet: AVX2 only, the AVX-512 subset the kernels' AVX-512 paths require (F, VL, DQ: no
    BW), AVX-512 without VBMI/GFNI (Skylake-SP, Cascade Lake), and all of them. An intrinsic outside its guard (a VBMI multishift under the AVX-512F guard did)
    fails only on such a CPU, where the build falls back to scalar code without a word."""
    import platform

    cxx = shutil.which("g++")
    if platform.machine() != "x86_64" or cxx is None:
        pytest.skip("x86-64 with g++ only")
    flags = [f for f in cpu_kernels.FLAGS if f not in ("-O3", "-shared")]
    proc = subprocess.run([cxx, "-O1", *flags, *f"-march={march}".split(), "-c", str(cpu_kernels.SOURCE), "-o", os.devnull],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_auto_picks_the_cpu_kernels():
    assert resolve_backend("auto", torch.device("cpu")) == "cpu"


@pytest.mark.parametrize("name", CODECS)
def test_cpu_kernels_match_reference_bitwise(name):
    world = 3
    for t, e in SHAPES:
        cal = _cal(world, e)
        ref = make_codec(name, calibration=cal, backend="reference", nonfinite="propagate")
        fast = make_codec(name, calibration=cal, backend="cpu", nonfinite="propagate")
        for dtype in DTYPES:
            for kind in KINDS:
                xs = [make_input(t, e, dtype, kind, seed=10 * r + t) for r in range(world)]
                want = [ref.encode(x, layer=LAYER, source=r) for r, x in enumerate(xs)]
                got = [fast.encode(x, layer=LAYER, source=r) for r, x in enumerate(xs)]
                for r in range(world):
                    assert torch.equal(got[r], want[r]), (name, t, e, dtype, kind, r)
                s_ref = ref.decode_sum(want, (t, e), layer=LAYER)
                s_fast = fast.decode_sum(want, (t, e), layer=LAYER)
                assert same_sum(s_fast, s_ref), (name, t, e, dtype, kind)
                d_ref = ref.decode(want[1], (t, e), layer=LAYER, source=1)
                d_fast = fast.decode(want[1], (t, e), layer=LAYER, source=1)
                assert same_sum(d_fast, d_ref), (name, t, e, dtype, kind)


@pytest.mark.parametrize("name", ["int4-outlier", "int8", "int4-g32", "rot-lm4-g64-lg8-k4", "rot-lm3-g32-e8"])
def test_cpu_sums_rounded_into_half_buffers_match_torch_casts(name):
    """decode_sum(out=bf16/fp16 buffer): the kernels round each finished fp32 row themselves;
    that must be bitwise the reference sum's ``.to(dtype)`` (bf16 NaN bits too: torch writes
    0xffff; fp16 NaN-ness only), on widths that hit the 16-wide vector loop and its tail."""
    world = 3
    for t, e in [(5, 64), (3, 67), (4, 576)]:
        cal = _cal(world, e)
        ref = make_codec(name, calibration=cal, backend="reference", nonfinite="propagate")
        fast = make_codec(name, calibration=cal, backend="cpu", nonfinite="propagate")
        for kind in KINDS:
            xs = [make_input(t, e, torch.float32, kind, seed=7 * r + e) for r in range(world)]
            if kind == "randn":  # sums beyond the fp16 range and exact bf16 rounding ties
                xs[0][0, :4] = torch.tensor([70000.0, -1e6, 1.00390625, 1.01171875])
            payloads = [ref.encode(x, layer=LAYER, source=r) for r, x in enumerate(xs)]
            want = ref.decode_sum(payloads, (t, e), layer=LAYER)
            for dtype in (torch.bfloat16, torch.float16):
                out = torch.full((t, e), 3.0, dtype=dtype)
                got = fast.decode_sum(payloads, (t, e), layer=LAYER, out=out)
                assert got.data_ptr() == out.data_ptr()
                w = want.to(dtype)
                nan = w.isnan()
                assert torch.equal(got.isnan(), nan), (name, t, e, kind, dtype)
                if dtype == torch.bfloat16:
                    assert torch.equal(got.view(torch.int16), w.view(torch.int16)), (name, t, e, kind)
                else:
                    assert torch.equal(got[~nan].view(torch.int16), w[~nan].view(torch.int16)), (name, t, e, kind)


@pytest.mark.parametrize("name", ["int4-outlier", "int4-g32", "rot-lm4-g64-lg8-k4", "rot-int6-g64-lg8-k4"])
def test_large_sums_written_with_streaming_stores_match_reference(name):
    """Outputs of >= 4 MiB take the non-temporal store path (also from a misaligned start):
    same bits as the reference, in fp32 and rounded to bf16."""
    t, e = 520, 2048  # 4.06 MiB of fp32; the bf16 buffer is made 4 MiB+ by a second row block
    cal = _cal(2, e)
    ref = make_codec(name, calibration=cal, backend="reference", nonfinite="propagate")
    fast = make_codec(name, calibration=cal, backend="cpu", nonfinite="propagate")
    xs = [make_input(t, e, torch.float32, "randn", seed=r) for r in range(2)]
    xs[1][7, 5] = float("nan")
    payloads = [fast.encode(x, layer=LAYER, source=r) for r, x in enumerate(xs)]
    want = ref.decode_sum(payloads, (t, e), layer=LAYER)
    for offset in (0, 1):
        out = torch.empty(t * e + offset)[offset:].view(t, e)
        assert same_sum(fast.decode_sum(payloads, (t, e), layer=LAYER, out=out), want), (name, offset)
    t2 = 2 * t
    payloads2 = [fast.encode(torch.cat([x, x]), layer=LAYER, source=r) for r, x in enumerate(xs)]
    for offset in (0, 3):
        out = torch.empty(t2 * e + offset, dtype=torch.bfloat16)[offset:].view(t2, e)
        got = fast.decode_sum(payloads2, (t2, e), layer=LAYER, out=out)
        assert torch.equal(got.view(torch.int16), torch.cat([want, want]).to(torch.bfloat16).view(torch.int16)), name


def test_nan_free_sums_are_bit_exact():
    """Where no NaN is involved the comparison above is plain bit equality; check that it bites."""
    a = torch.tensor([1.0, -0.0, float("nan")])
    assert same_sum(a, a.clone()) and not same_sum(a, torch.tensor([1.0, 0.0, float("nan")]))


@pytest.mark.parametrize("name", ["int4-outlier", "int4-g32", "rot-lm4-g64-lg8-k4", "rot-int6-g64-lg8-k4"])
def test_cpu_kernels_on_a_strided_row_slice(name):
    cal = _cal(2, 96)
    x = torch.randn(9, 200)[1:8:2, 3:99]  # rows with a stride, not contiguous
    ref = make_codec(name, calibration=cal, backend="reference")
    fast = make_codec(name, calibration=cal, backend="cpu")
    assert torch.equal(fast.encode(x, layer=LAYER), ref.encode(x, layer=LAYER))


def test_cpu_kernels_keep_the_nonfinite_error():
    cal = _cal(1, 64)
    x = torch.randn(3, 64)
    x[1, 5] = float("nan")
    for name in ("int4-outlier", "int4-g32", "rot-lm4-g64-lg8-k4"):
        with pytest.raises(NonFiniteError):
            make_codec(name, calibration=cal, backend="cpu").encode(x, layer=LAYER)


@pytest.mark.parametrize("name", ["rot-lm4-g64-lg8-k4", "rot-int6-g64-lg8-k4"])
def test_nonfinite_in_a_kept_channel_is_refused(name):
    """The rot encoders zero the kept (bf16) channels by multiplying them with 0 in their first
    Hadamard pass, which turns a NaN/Inf there into NaN inside the rotation: the input scan must
    still see it, so error mode raises as the reference does (rows of blocks 64 and 256)."""
    for e in (576, 2048):
        cal = _cal(1, e)
        ref = make_codec(name, calibration=cal, backend="reference")
        fast = make_codec(name, calibration=cal, backend="cpu")
        kept = ref.params(LAYER, 0, e).outliers
        assert kept.numel() > 0
        for bad in (float("nan"), float("inf"), -float("inf")):
            x = make_input(3, e, torch.float32, "randn", seed=6)
            x[1, kept[-1]] = bad
            with pytest.raises(NonFiniteError):
                ref.encode(x, layer=LAYER)
            with pytest.raises(NonFiniteError):
                fast.encode(x, layer=LAYER)
            x[1, kept[-1]] = 1e4  # a large finite value in the kept channel: the reference's bytes
            assert torch.equal(fast.encode(x, layer=LAYER), ref.encode(x, layer=LAYER)), (name, e)


@pytest.mark.parametrize("name", CODECS)
def test_error_mode_encodes_in_one_pass(name, monkeypatch):
    """In the default "error" mode the kernels scan their own input while encoding: finite,
    in-range input gives the reference's bytes without the separate range pass, and what the
    reference refuses (NaN/Inf, beyond ``max_input``) is still refused with its error. Widths
    of Hadamard blocks 8, 64, 128 and 256 (the rot encoders read the row inside their first
    Hadamard pass there)."""
    for t, e in [(5, 200), (3, 576), (2, 640), (2, 2048)]:
        cal = _cal(1, e)
        ref = make_codec(name, calibration=cal, backend="reference")
        fast = make_codec(name, calibration=cal, backend="cpu")
        for dtype in DTYPES:
            for kind in ("randn", "zeros", "extremes"):
                x = make_input(t, e, dtype, kind, seed=3)
                try:
                    want = ref.encode(x, layer=LAYER)
                except (NonFiniteError, OutOfRangeError) as exc:  # extremes: Inf in fp16, overflow
                    with pytest.raises(type(exc)):
                        fast.encode(x, layer=LAYER)
                    continue
                calls = []
                monkeypatch.setattr(F, "value_range", lambda v: calls.append(1) or (0.0, 0.0))
                got = fast.encode(x, layer=LAYER)
                monkeypatch.undo()
                assert torch.equal(got, want), (name, t, e, dtype, kind)
                if kind != "extremes":
                    assert not calls, "the CPU path ran a separate range pass"
    t, e = 5, 200
    cal = _cal(1, e)
    ref = make_codec(name, calibration=cal, backend="reference")
    fast = make_codec(name, calibration=cal, backend="cpu")
    bad = make_input(t, e, torch.float32, "randn", seed=4)
    bad[2, 7] = float("inf")
    with pytest.raises(NonFiniteError):
        fast.encode(bad, layer=LAYER)
    if fast.max_input < 3e38:
        big = make_input(t, e, torch.float32, "randn", seed=5)
        big[1, 3] = -2 * fast.max_input
        with pytest.raises(OutOfRangeError):
            ref.encode(big, layer=LAYER)
        with pytest.raises(OutOfRangeError):
            fast.encode(big, layer=LAYER)


@pytest.mark.slow  # two more builds of the kernels (12 s); the default build is tested above; `make test-slow`
@pytest.mark.parametrize("variant,flag", [("LOWBIT_TP_CPU_PORTABLE", "-DLBT_PORTABLE"),
                                          ("LOWBIT_TP_CPU_NO_AVX512", "-mno-avx512f")])
def test_portable_build_matches_reference(tmp_path, variant, flag):
    """The scalar twins of the vector paths (what a CPU without AVX2 runs), and the AVX2 paths
    without AVX-512, build and give the reference's bytes and sums: a fresh process with
    LOWBIT_TP_CPU_PORTABLE=1 or LOWBIT_TP_CPU_NO_AVX512=1 (on a CPU with AVX-512 the default
    build takes the AVX-512 paths, so only this variant tests their AVX2 fallbacks)."""
    script = f"""
import torch
from lowbit_tp.calibration.synthetic import synthetic_calibration
from lowbit_tp.codecs import make_codec
from lowbit_tp.kernels import cpu
assert cpu.available(), cpu.build_error()
assert {flag!r} in cpu._arch_variants()[0]
for name in {CODECS!r}:
    for t, e in [(3, 67), (2, 1000), (2, 640)]:
        cal = synthetic_calibration(["l"], world=2, hidden=e)
        ref = make_codec(name, calibration=cal, backend="reference", nonfinite="propagate")
        fast = make_codec(name, calibration=cal, backend="cpu", nonfinite="propagate")
        g = torch.Generator().manual_seed(t)
        xs = [torch.randn(t, e, generator=g) * 3 for _ in range(2)]
        xs[1].view(-1)[::7] = float("nan")
        for dtype in (torch.float32, torch.bfloat16):
            want = [ref.encode(x.to(dtype), layer="l", source=r) for r, x in enumerate(xs)]
            got = [fast.encode(x.to(dtype), layer="l", source=r) for r, x in enumerate(xs)]
            assert all(torch.equal(a, b) for a, b in zip(got, want)), (name, t, e, dtype)
            a, b = fast.decode_sum(want, (t, e), layer="l"), ref.decode_sum(want, (t, e), layer="l")
            same = (a.view(torch.int32) == b.view(torch.int32)) | (a.isnan() & b.isnan())
            assert bool(same.all()), (name, t, e, dtype)
            for half in (torch.bfloat16, torch.float16):  # the sum rounded into a half buffer
                h = fast.decode_sum(want, (t, e), layer="l", out=torch.empty(t, e, dtype=half))
                w = b.to(half)
                assert torch.equal(h.isnan(), w.isnan()), (name, t, e, half)
                assert torch.equal(h[~w.isnan()].view(torch.int16), w[~w.isnan()].view(torch.int16)), (name, half)
print("portable ok")
"""
    env = {**os.environ, variant: "1", "LOWBIT_TP_KERNEL_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "portable ok" in proc.stdout, proc.stderr[-3000:]


def _near(v: torch.Tensor, ulps: int = 2) -> torch.Tensor:
    """Every fp32 within ``ulps`` steps of each value of ``v`` (fp32), both ways."""
    v = v.float().reshape(-1)
    out = [v]
    up, down = v.clone(), v.clone()
    for _ in range(ulps):
        up = torch.nextafter(up, torch.full_like(up, float("inf")))
        down = torch.nextafter(down, torch.full_like(down, -float("inf")))
        out += [up, down]
    return torch.cat(out)


def _level_cases(bounds: torch.Tensor, s: float) -> torch.Tensor:
    """Rotated values that probe the level search of one group with scale ``s``: the exact
    quotient's rounding boundaries ``s * (b + next(b)) / 2`` (computed in fp64, where they are
    exact) and ``s * b``, each with its fp32 neighbours, the clamp edges, zeros and subnormals."""
    b = bounds.double()
    nxt = torch.nextafter(bounds, torch.full_like(bounds, float("inf"))).double()
    mids = s * (b + nxt) / 2
    pts = torch.cat([mids, s * b, torch.tensor([s, -s, 0.0, 2.0 ** -149, 1e-40, 3e38], dtype=torch.float64)])
    pts = torch.cat([pts, -pts])
    return _near(pts.float(), ulps=3)


SCALES = [1.0, 2.0, 0.3, 1.2345678e-3, 7.5e4, 3.3e38, 2.0 ** -126, 1.1754944e-38 * 3, 6.1e-5, 255.9375]


@pytest.mark.parametrize("name", ["rot-lm4-g64-lg8-k4", "rot-lm4-g32-lg8-k4", "rot-lm3-g64", "rot-lm2-g32-e8",
                                  "rot-int6-g64-lg8-k4", "rot-int5-g64-lg8-k4",
                                  "rot-int4-g64", "rot-int4-g32"])
def test_level_search_matches_bucketize_at_every_threshold(name):
    """The encoders' level search (division-free where the CPU has AVX-512: thresholds per group;
    on the 5- and 6-bit integer grids an estimate moved by at most one step) against the reference's rule torch.bucketize(clamp(z / s, -1, 1), bounds), exactly at and
    one to three fp32 steps around every rounding boundary of every bound, for scales from
    the smallest normal float to near fp32's max; also random values and, in a group that
    holds NaN/Inf, the division path."""
    codec = make_codec(name, calibration=_cal(1, 64), backend="cpu")
    bounds, bits = codec._bounds.float(), codec.bits
    g = torch.Generator().manual_seed(bits)
    for s in SCALES:
        s = float(torch.tensor(s, dtype=torch.float32))
        z = torch.cat([_level_cases(bounds, s), torch.randn(1000, generator=g) * s])
        z = z[z.isfinite()]  # near fp32's max, s * b can overflow
        want = torch.bucketize(torch.clamp(z / s, -1.0, 1.0), bounds).to(torch.uint8)
        got = cpu_kernels.rot_codes(z, s, bounds=bounds, bits=bits)
        bad = (got != want).nonzero()
        assert not bad.numel(), (name, s, z[bad[:5, 0]].tolist(), got[bad[:5, 0]].tolist(), want[bad[:5, 0]].tolist())
        zn = z.clone()
        zn[::97] = float("nan")
        zn[1::89] = float("inf")
        zn[2::83] = -float("inf")
        want = torch.bucketize(torch.clamp(zn / s, -1.0, 1.0), bounds).to(torch.uint8)
        assert torch.equal(cpu_kernels.rot_codes(zn, s, bounds=bounds, bits=bits, finite=False), want), (name, s)


@pytest.mark.parametrize("name", ["rot-lm4-g64-lg8-k4", "rot-lm3-g64", "rot-lm2-g32-e8", "rot-int4-g64"])
def test_level_search_at_the_cell_edges(name):
    """Up to 4 bits the AVX-512 search picks one of 32 cells of width 1/16 of z / s from an
    estimate and makes one threshold comparison: values at and one to three fp32 steps around
    every cell edge s * (-1 + c/16), beyond +-s (clamped), and at every bound's boundary, in
    the 16-wide loop (the length is a multiple of 16), against torch.bucketize(clamp(z / s, -1,
    1), bounds); then whole rows whose rotated values sit near cell edges, against the reference
    encoder (4 bits: the codes written straight into the nibble stream)."""
    codec = make_codec(name, calibration=_cal(1, 64), backend="cpu")
    bounds, bits = codec._bounds.float(), codec.bits
    for s in SCALES:
        s = float(torch.tensor(s, dtype=torch.float32))
        edges = torch.arange(-16, 17, dtype=torch.float64) / 16
        far = torch.tensor([1 + 2.0 ** -10, 1.01, 1.5, 2.0, 1e3], dtype=torch.float64)
        z = _near(torch.cat([s * edges, s * far, -s * far]).float(), ulps=3)
        z = torch.cat([z, _level_cases(bounds, s)])
        z = z[z.isfinite()]
        z = z[: z.numel() // 16 * 16]
        want = torch.bucketize(torch.clamp(z / s, -1.0, 1.0), bounds).to(torch.uint8)
        got = cpu_kernels.rot_codes(z, s, bounds=bounds, bits=bits)
        bad = (got != want).nonzero()
        assert not bad.numel(), (name, s, z[bad[:5, 0]].tolist(), got[bad[:5, 0]].tolist(), want[bad[:5, 0]].tolist())
    e = 256
    cal = _cal(1, e)
    ref, fast = (make_codec(name, calibration=cal, backend=b) for b in ("reference", "cpu"))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, e, generator=g)
    p = ref.params(LAYER, 0, e)
    z = F.fwht(x * p.signs, F.hadamard_block(e))  # rotated rows; put cell edges in, rotate back
    amax = z.abs().amax(dim=1, keepdim=True)
    z = torch.where(torch.rand(z.shape, generator=g) < 0.5, amax * torch.round(z / amax * 16) / 16, z)
    x = F.fwht(z, F.hadamard_block(e)) * p.signs
    x[:, p.outliers] = 0.0
    assert torch.equal(fast.encode(x, layer=LAYER), ref.encode(x, layer=LAYER)), name


def test_level_search_rounding_ties():
    """Exact ties of the quotient (possible where it is subnormal): a tie rounds to the even
    neighbour, so a bound may or may not count. Bounds built so that both kinds occur."""
    tiny = 2.0 ** -149
    bounds = torch.tensor([-0.5, -3 * tiny, -tiny, 0.0, tiny, 2 * tiny, 5 * tiny, 0.25, 0.75], dtype=torch.float32)
    bounds = torch.cat([bounds, torch.full((6,), 0.875)])  # 15 ascending bounds (4 bits)
    for s in (2.0, 4.0, 6.0, 1.5, 3.0):
        z = _near(torch.arange(-40, 41, dtype=torch.float64) * tiny, ulps=1)
        z = torch.cat([z, _level_cases(bounds, s)])
        want = torch.bucketize(torch.clamp(z / s, -1.0, 1.0), bounds).to(torch.uint8)
        got = cpu_kernels.rot_codes(z, s, bounds=bounds, bits=4)
        bad = (got != want).nonzero()
        assert not bad.numel(), (s, z[bad[:5, 0]].tolist(), got[bad[:5, 0]].tolist(), want[bad[:5, 0]].tolist())


@pytest.mark.parametrize("top", [1.0, 3.7, 1e-30, 2.5e38, 6.5e-39, 1.00390625])
def test_lg8_codes_match_the_reference_searchsorted(top):
    """The lg8 scale search of the rot encoders (16 groups at a time from the table's power-of-two
    structure with AVX-512, else 8 at a time by gathers; a scalar tail)
    against the reference's ``_lg8_encode``: group absmaxes exactly at every table value times
    the base, one to three fp32 steps around each, zeros, subnormals and random ratios."""
    from lowbit_tp.codecs.rotation import _LG8_TABLE, _lg8_encode

    g = torch.Generator().manual_seed(int(top * 1e3) % 1000)
    top32 = torch.tensor([top], dtype=torch.float32)
    _, sb = _lg8_encode(top32.reshape(1, 1))
    base = float(F.bytes_to_float(sb[1:], torch.bfloat16))
    exact = (torch.tensor(base, dtype=torch.float64) * _LG8_TABLE.double()).float()
    amax = torch.cat([top32, _near(exact, ulps=3), torch.tensor([0.0, 2.0 ** -149, 1e-40, 1.17e-38]),
                      top32 * torch.rand(203, generator=g) ** 8])
    amax = amax[(amax <= top32) & (amax >= 0)]
    ref_scale, ref_bytes = _lg8_encode(amax.reshape(1, -1))
    n = amax.numel()
    assert float(F.bytes_to_float(ref_bytes[n:], torch.bfloat16)) == base
    for m in (n, n - 5):  # vector lanes and the scalar tail
        q, scale = cpu_kernels.lg8_codes(amax[:m], base, table=_LG8_TABLE)
        assert torch.equal(q, ref_bytes[:m]), (top, (q != ref_bytes[:m]).nonzero()[:5].tolist())
        assert torch.equal(scale.view(torch.int32), ref_scale.reshape(-1)[:m].view(torch.int32)), top


# the static codecs (one fused pass), a group codec and rot-* (encode, then decode into the difference)
FEEDBACK_CODECS = ["int4-outlier", "int4", "int8", "int4-random-k", "int4-g32", "rot-lm4-g64-lg8-k4",
                   "rot-int6-g64-lg8-k4", "rot-lm3-g32-e8"]


@pytest.mark.parametrize("name", FEEDBACK_CODECS)
def test_encode_feedback_fused_matches_the_reference_path(name):
    """Error feedback on the CPU kernels (Codec.encode_feedback): the payload of
    encode(x + carry) and next = sent - decode(payload), 0 where not finite, bitwise equal to the
    reference's gather_encode_feedback (compensate, encode, decode, feedback_of), with and without
    a carry, every input dtype, odd shapes, zeros and extremes (3e38 is finite in bf16; fp16
    turns it into Inf). A NaN/Inf or out-of-range sent value leaves it to the general path
    (None), which then gives the reference's bytes too: test_encode_feedback_beyond_the_range."""
    from lowbit_tp.collectives.algorithms import gather_encode_feedback
    from lowbit_tp.collectives.feedback import Feedback

    fused_runs = 0
    for t, e in SHAPES:
        cal = _cal(2, e)
        ref = make_codec(name, calibration=cal, backend="reference", nonfinite="propagate")
        fast = make_codec(name, calibration=cal, backend="cpu", nonfinite="propagate")
        for dtype in DTYPES:
            for kind in KINDS:
                x = make_input(t, e, dtype, kind, seed=t * 7 + e)
                g = torch.Generator().manual_seed(e)
                for carry in (None, torch.randn(t, e, generator=g) * 0.3):
                    want = Feedback(carry=carry)
                    w = gather_encode_feedback(ref, x, want, layer=LAYER, rank=1)
                    got = fast.encode_feedback(x, carry, layer=LAYER, source=1)
                    if kind in ("randn", "zeros"):
                        assert got is not None, (name, t, e, dtype, kind)
                    if got is not None:
                        fused_runs += 1
                        assert torch.equal(got[0], w), (name, t, e, dtype, kind, carry is None)
                        assert bits(got[1]).equal(bits(want.next)), (name, t, e, dtype, kind, carry is None)
                        nxt = torch.full((t, e), 7.0)  # into a caller's buffer (two-shot's rows of the carry)
                        again = fast.encode_feedback(x, carry, layer=LAYER, source=1, next_out=nxt)
                        assert again[1] is nxt and bits(nxt).equal(bits(want.next)) and torch.equal(again[0], w)
                    fb = Feedback(carry=carry)  # the collective's function, whichever path it takes
                    assert torch.equal(gather_encode_feedback(fast, x, fb, layer=LAYER, rank=1), w)
                    assert bits(fb.next).equal(bits(want.next)), (name, t, e, dtype, kind)
    assert fused_runs > len(SHAPES) * len(DTYPES) * 2


@pytest.mark.parametrize("name", FEEDBACK_CODECS)
def test_two_shot_feedback_fused_matches_the_reference_path(name):
    """Two-shot with error feedback on the CPU kernels takes Codec.encode_feedback in both
    stages (one call per row chunk, writing the chunk's bytes of the flat payload and its rows
    of the next carry; the owner's re-encode of its chunk's sum with its error): the payloads,
    the all-reduce and every rank's next carry are bitwise the reference codec's general path
    (compensate, encode, decode, feedback_of; decode_sum, encode, decode), over two steps of a
    chain, with padding rows (tokens not a multiple of the world), fp32 and bf16 partials."""
    from lowbit_tp.collectives import algorithms as A
    from lowbit_tp.collectives import simulate_all_reduce
    from lowbit_tp.collectives.feedback import Feedback

    for world in (2, 3, 4):
        for t, e in ((1, 64), (5, 64), (8, 128), (7, 576)):
            cal = _cal(world, e)
            ref = make_codec(name, calibration=cal, backend="reference", nonfinite="propagate")
            fast = make_codec(name, calibration=cal, backend="cpu", nonfinite="propagate")
            for dtype in (torch.float32, torch.bfloat16):
                parts = [make_input(t, e, dtype, "randn", seed=100 * world + r + t).mul_(r + 1) for r in range(world)]
                carry = torch.randn(t, e, generator=torch.Generator().manual_seed(e)) * 0.3
                # the fused paths are taken (None would mean the general path)
                flat, nxt = A._encode_chunks_feedback(fast, parts[0], carry, layer=LAYER, rank=0, world=world,
                                                      out=None)
                want = Feedback(carry=carry)
                w = A.two_shot_encode_feedback(ref, parts[0], want, layer=LAYER, rank=0, world=world)
                assert torch.equal(flat, torch.cat(w)) and bits(nxt).equal(bits(want.next)), (name, world, t, dtype)
                rows = A.chunk_rows(t, world)
                total = ref.decode_sum(w, (rows, e), layer=LAYER, sources=[0] * world)
                assert fast.encode_feedback(total, None, layer=LAYER, source="sum") is not None
                # the chain, both stages, every rank
                fb_ref, fb_fast = [Feedback() for _ in range(world)], [Feedback() for _ in range(world)]
                for step in range(2):
                    fb_ref = [Feedback(carry=f.next) for f in fb_ref]
                    fb_fast = [Feedback(carry=f.next) for f in fb_fast]
                    want_y = simulate_all_reduce(parts, ref, "two-shot", layer=LAYER, feedback=fb_ref)
                    got_y = simulate_all_reduce(parts, fast, "two-shot", layer=LAYER, feedback=fb_fast)
                    case = (name, world, t, e, dtype, step)
                    assert torch.equal(got_y, want_y), case
                    for a, b in zip(fb_fast, fb_ref):
                        assert bits(a.next).equal(bits(b.next)), case


def test_feedback_cost_script_times_the_cpu_kernels(tmp_path):
    """scripts/gpu_feedback_cost.py --device cpu --backend cpu times the C++ kernels (no
    interpreter) and its identity checks (gather and two-shot with feedback against the
    reference's payloads and next carries) hold; --backend cpu off a CPU is refused."""
    import importlib.util
    import json

    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu_feedback_cost.py"
    spec = importlib.util.spec_from_file_location("gpu_feedback_cost", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--device", "cpu", "--backend", "cpu", "--out", str(tmp_path), "--shapes", "5x128", "--check-tokens",
              "5", "--codecs", "int4-outlier,int4-g32,rot-lm4-g64-lg8-k4", "--worlds", "3", "--repeats", "1"])
    doc = json.loads((tmp_path / "gpu_feedback_cost.json").read_text())
    assert doc["device"].startswith("cpu, C++ kernels")
    for r in doc["rows"]:
        assert "error" not in r, r
        assert r["payload_equal"] is r["next_equal"] is r["two_shot_equal"] is r["fused"] is True, r
        assert r["two_shot_encode_feedback_us"] > 0 and r["encode_feedback_us"] > 0
    assert "DRY RUN" not in (tmp_path / "gpu_feedback_cost.md").read_text()
    with pytest.raises(SystemExit, match="needs --device cpu"):
        mod.main(["--backend", "cpu", "--out", str(tmp_path)])


def test_encode_feedback_refuses_a_wrong_carry_in_one_line():
    from lowbit_tp.collectives.algorithms import gather_encode_feedback
    from lowbit_tp.collectives.feedback import Feedback

    fast = make_codec("int4-outlier", calibration=_cal(2, 130), backend="cpu")
    x = torch.randn(3, 130)
    assert fast.encode_feedback(x, torch.zeros(2, 130), layer=LAYER, source=0) is None
    with pytest.raises(ValueError, match="next_out= must be a contiguous torch.float32 tensor of shape"):
        fast.encode_feedback(x, None, layer=LAYER, source=0, next_out=torch.zeros(3, 130, dtype=torch.bfloat16))
    assert fast.encode_feedback(x, torch.zeros(3, 130, dtype=torch.bfloat16), layer=LAYER, source=0) is None
    with pytest.raises(ValueError, match="carry of shape"):
        gather_encode_feedback(fast, x, Feedback(carry=torch.zeros(2, 130)), layer=LAYER, rank=0)


@pytest.mark.parametrize("name", ["int4-outlier", "int8", "rot-lm4-g64-lg8-k4"])
def test_encode_feedback_beyond_the_range_strided_and_into_a_buffer(name):
    """Values beyond max_input (the largest bf16) in a quantized and in a kept channel, or a
    finite value the carry pushes past it: the static one-pass path declines (None) and the
    collective's function saturates exactly as the reference does; error mode raises as the
    reference does. A column-sliced partial (row stride > E) and an out= buffer take the
    one-pass path and give the reference's bytes and carry."""
    from lowbit_tp.collectives.algorithms import gather_encode_feedback
    from lowbit_tp.collectives.feedback import Feedback

    t, e = 5, 130
    cal = _cal(2, e)
    ref = make_codec(name, calibration=cal, backend="reference", nonfinite="propagate")
    fast = make_codec(name, calibration=cal, backend="cpu", nonfinite="propagate")
    kept = ref.params(LAYER, 1, e).outliers
    g = torch.Generator().manual_seed(5)
    wide = torch.randn(t, e + 8, generator=g) * 3
    x = wide[:, :e]  # row stride e + 8
    carry = torch.randn(t, e, generator=g) * 0.1
    for case in ("in range", "body", "kept", "pushed"):
        xs, cs = x.clone() if case != "in range" else x, carry.clone()
        if case == "body":
            xs[1, 2] = 3.4e38
        elif case == "kept":
            xs[2, int(kept[0]) if kept.numel() else 3] = -3.4e38
        elif case == "pushed":
            xs[3, 4], cs[3, 4] = 3.3e38, 1e37
        want = Feedback(carry=cs)
        w = gather_encode_feedback(ref, xs, want, layer=LAYER, rank=1)
        got = fast.encode_feedback(xs, cs, layer=LAYER, source=1)
        if name != "rot-lm4-g64-lg8-k4":  # rot-*: encode (which saturates) then decode, never declines
            assert (got is None) == (case != "in range"), case
        buf = torch.empty_like(w)
        fb = Feedback(carry=cs)
        assert gather_encode_feedback(fast, xs, fb, layer=LAYER, rank=1, out=buf) is buf and torch.equal(buf, w), case
        assert bits(fb.next).equal(bits(want.next)), case
        if case != "in range":
            strict_ref = make_codec(name, calibration=cal, backend="reference")
            strict = make_codec(name, calibration=cal, backend="cpu")
            with pytest.raises(OutOfRangeError):
                gather_encode_feedback(strict_ref, xs, Feedback(carry=cs), layer=LAYER, rank=1)
            with pytest.raises(OutOfRangeError):
                gather_encode_feedback(strict, xs, Feedback(carry=cs), layer=LAYER, rank=1)
