"""The fast static-codec Triton kernels (issue 8: triton_static's window and row-walking kernels)
against the eager reference, bitwise, under TRITON_INTERPRET=1 on CPU tensors.

The shipped tiles are hundreds of columns and up to 32 rows a program, and a short message takes
one row a program (``SHORT_ROWS``); here tiny tiles and ``SHORT_ROWS = 1`` put several column
blocks, several rows a program, a last program that would end past T (it starts at T - BT
instead and rewrites rows of its neighbour with the same values) and a column block that ends inside E (and inside the bf16 head) in messages
of a few rows. Every case checks which kernels ran, so that a silent fall-back to the tile
kernels fails it.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before lowbit_tp imports any kernel module

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (optional: the Triton kernels are skipped)")
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")]

from helpers import raised, sweep  # noqa: E402
from lowbit_tp.calibration.synthetic import synthetic_calibration  # noqa: E402
from lowbit_tp.codecs import make_codec  # noqa: E402
from lowbit_tp.kernels import triton_static as KS  # noqa: E402

LAYER = "L"
WORLD = 3
STATIC = ["int4-outlier", "int4", "int8", "int4-random-k"]
FAST = {"static_decode_sum_win_kernel", "static_decode_sum_rows_kernel", "static_encode_win_kernel",
        "static_encode_rows_kernel", "static_decode_sum_rows_src_kernel", "static_decode_sum_win_loop_kernel"}
# tiny tiles per variant: "fast" and "fast-b" differ, as the shipped ones do (rows need not be
# powers of two: the row-walking kernels unroll them)
TINY = {"fast": {"dec_win": ((2, 32), (4, 64), (1, 32)), "dec_rows": ((3, 32), (2, 64), (2, 32)),
                 "enc_win": (2, 64), "enc_rows": (3, 32)},
        "fast-b": {"dec_win": ((4, 64), (2, 32), (2, 64)), "dec_rows": ((2, 64), (4, 32), (1, 32)),
                   "enc_win": (1, 32), "enc_rows": (2, 64)}}
TINY.update({"src": {**TINY["fast"], "dec_rows": ((3, 32), (2, 64), (2, 32)), "dec_win": ((2, 32), (4, 64), (2, 64))},
             "src-c": {**TINY["fast"], "dec_rows": ((2, 64), (4, 32), (3, 32)), "dec_win": ((4, 64), (1, 32), (2, 32))},
             "src-2": {**TINY["fast"], "dec_rows": ((4, 32), (3, 32), (2, 64))}})
_CALS = {}


def calibration(hidden: int):
    if hidden not in _CALS:
        _CALS[hidden] = synthetic_calibration([LAYER], world=WORLD, hidden=hidden, tokens=64, batches=1)
    return _CALS[hidden]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal fp32 bit patterns (so -0.0 != 0.0), NaN compared by position only."""
    a, b = a.reshape(-1), b.reshape(-1)
    na, nb = torch.isnan(a), torch.isnan(b)
    return torch.equal(na, nb) and torch.equal(a[~na].view(torch.int32), b[~nb].view(torch.int32))


def partials(tokens: int, hidden: int, *, seed: int, kept=None) -> list[torch.Tensor]:
    """WORLD partials with an all-zero token, rounding ties, a huge value, NaN/Inf (also in a
    channel that travels as bf16, ``kept``) where the rows allow."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(tokens, hidden, generator=g) * 3 for _ in range(WORLD)]
    xs[1][0] = 0.0
    xs[0][tokens - 1, :8] = torch.tensor([7.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.5, -7.0])
    xs[1][tokens - 1, hidden - 1] = 1e30
    if tokens >= 3:
        xs[2][1, 3] = float("nan")
        xs[2][2, 0] = float("inf")
        xs[0][tokens - 1, hidden - 2] = float("-inf")
        if kept is not None and kept.numel():
            xs[1][tokens - 2, int(kept[-1])] = float("nan")
    return xs


@pytest.fixture
def launches(monkeypatch):
    """Tiny tiles, several rows a program; the names of the triton_static kernels launched."""
    monkeypatch.setattr(KS, "FAST_TILES", TINY)
    monkeypatch.setattr(KS, "SHORT_ROWS", 1)
    log = []

    class Counted:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            log.append(self.name)
            return self.kernel[grid]

    for name in dir(KS):
        if name.endswith("_kernel"):
            monkeypatch.setattr(KS, name, Counted(name, getattr(KS, name)))
    return log


# (tokens, hidden): int4-outlier/-random-k keep k = E // 64 channels in bf16 (4, 4, 2, 1), so
# E - k is even but for 101 (odd int4 body row: the tile/flat kernels, asserted below)
SHAPES = [(7, 258), (13, 300), (1, 130), (4, 101)]
SMALL = lambda case: case[0] * case[1] < 900  # noqa: E731  (larger shapes: 2-8 s a case, the slow suite)


@pytest.mark.parametrize("variant", ["fast", pytest.param("fast-b", marks=pytest.mark.slow)])  # "auto" runs "fast"
@pytest.mark.parametrize("name", STATIC)
@pytest.mark.parametrize("tokens,hidden", sweep(SHAPES, keep=SMALL))
def test_fast_kernels_bitwise(name, variant, tokens, hidden, launches, monkeypatch):
    monkeypatch.setattr(KS, "DECODE_VARIANT", variant)
    monkeypatch.setattr(KS, "ENCODE_VARIANT", variant)
    cal = calibration(hidden)
    ref = make_codec(name, calibration=cal, nonfinite="propagate", backend="reference")
    tri = make_codec(name, calibration=cal, nonfinite="propagate", backend="triton")
    kept = getattr(ref.params(LAYER, 1, hidden), "outliers", None)
    xs = partials(tokens, hidden, seed=tokens * 1000 + hidden, kept=kept)
    want = [ref.encode(x, layer=LAYER, source=r) for r, x in enumerate(xs)]
    got = [tri.encode(x, layer=LAYER, source=r) for r, x in enumerate(xs)]
    for r, (w, g) in enumerate(zip(want, got)):
        assert torch.equal(w, g), f"rank {r}: bytes differ at {(w != g).nonzero().reshape(-1)[:6].tolist()}"
    for n in (1, 2, WORLD):  # one source (a two-shot chunk's decode), two, three
        assert same_bits(ref.decode_sum(want[:n], (tokens, hidden), layer=LAYER),
                         tri.decode_sum(want[:n], (tokens, hidden), layer=LAYER)), f"{n} sources"
    nk = 0 if kept is None else kept.numel()
    odd_int4 = name != "int8" and (hidden - nk) % 2 == 1
    kernels = set(launches)
    assert kernels.isdisjoint(FAST) if odd_int4 else kernels <= FAST and len(kernels) == 2, kernels
    if not odd_int4:
        assert any("rows" in k for k in kernels) == (nk > 0), kernels


@pytest.mark.parametrize("name", ["int4-outlier", "int8"])
def test_fast_chunk_launches_bitwise(name, launches):
    """Two-shot's batched chunk encode/decode on the fast kernels: N reference encodes, the cat
    of N reference decodes."""
    hidden, chunks, rows = 258, 3, 5
    cal = calibration(hidden)
    ref = make_codec(name, calibration=cal, nonfinite="propagate", backend="reference")
    tri = make_codec(name, calibration=cal, nonfinite="propagate", backend="triton")
    x = torch.cat(partials(rows, hidden, seed=4, kept=getattr(ref.params(LAYER, 0, hidden), "outliers", None)))
    want = torch.cat([ref.encode(c, layer=LAYER, source=0) for c in x.split(rows)])
    got = tri.encode_chunks(x, chunks, layer=LAYER, source=0)
    assert torch.equal(got, want), (got != want).nonzero().reshape(-1)[:6].tolist()
    dec = tri.decode_chunks(want, (rows, hidden), chunks, layer=LAYER, source=0)
    assert same_bits(dec, torch.cat([ref.decode(p, (rows, hidden), layer=LAYER, source=0)
                                     for p in want.chunk(chunks)]))
    assert set(launches) <= FAST and len(set(launches)) == 2, launches


@pytest.mark.parametrize("name", ["int4-outlier", "int4", "int8"])
@pytest.mark.parametrize("where", ["inlier", "bf16"])
def test_fast_encoders_flag_and_range_like_the_reference(name, where, launches):
    """flag mode records NaN/Inf once per step; error mode refuses what the reference refuses
    (NaN/Inf, finite values beyond bf16's max), in a quantized and in a bf16 channel."""
    hidden = 130
    cal = calibration(hidden)
    ref = make_codec(name, calibration=cal, nonfinite="propagate", backend="reference")
    kept = getattr(ref.params(LAYER, 0, hidden), "outliers", None)
    if where == "bf16" and (kept is None or not kept.numel()):
        pytest.skip("no bf16 channels")
    col = int(kept[0]) if where == "bf16" else 1 if kept is None or 1 not in kept.tolist() else 3
    from lowbit_tp.codecs.base import NonFiniteError

    def outcome(codec, x):
        return raised(codec, lambda: codec.encode(x, layer=LAYER, source=0))

    flag = make_codec(name, calibration=cal, nonfinite="flag", backend="triton")
    x = torch.randn(5, hidden)
    flag.encode(x, layer=LAYER, source=0)
    flag.check_nonfinite()  # clean: nothing to report
    for value in (float("nan"), float("-inf"), 3.4e38, 1e30):
        y = x.clone()
        y[3, col] = value
        assert torch.equal(flag.encode(y, layer=LAYER, source=0), ref.encode(y, layer=LAYER, source=0))
        if value != value or abs(value) == float("inf"):
            with pytest.raises(NonFiniteError, match="since the last check"):
                flag.check_nonfinite()
        outcomes = [outcome(make_codec(name, calibration=cal, backend=b), y) for b in ("reference", "triton")]
        assert outcomes[0] == outcomes[1], (value, outcomes)
    assert outcomes == ["ok", "ok"]  # 1e30: saturates, refused by neither
    assert set(launches) <= FAST and launches, launches


def test_tile_variant_still_runs_and_unknown_variants_are_refused(launches, monkeypatch):
    """DECODE_VARIANT / ENCODE_VARIANT "tile" run the tile kernels (the sweep's baseline), same bits."""
    cal = calibration(258)
    ref = make_codec("int4-outlier", calibration=cal, nonfinite="propagate", backend="reference")
    tri = make_codec("int4-outlier", calibration=cal, nonfinite="propagate", backend="triton")
    xs = partials(5, 258, seed=1)
    want = [ref.encode(x, layer=LAYER, source=r) for r, x in enumerate(xs)]
    monkeypatch.setattr(KS, "DECODE_VARIANT", "tile")
    monkeypatch.setattr(KS, "ENCODE_VARIANT", "tile")
    assert all(torch.equal(w, tri.encode(x, layer=LAYER, source=r)) for r, (w, x) in enumerate(zip(want, xs)))
    assert same_bits(ref.decode_sum(want, (5, 258), layer=LAYER), tri.decode_sum(want, (5, 258), layer=LAYER))
    assert set(launches) == {"static_encode_tile_kernel", "static_decode_sum_tile_kernel"}, launches
    monkeypatch.setattr(KS, "DECODE_VARIANT", "fastest")
    with pytest.raises(ValueError, match="variant"):
        tri.decode_sum(want, (5, 258), layer=LAYER)


@pytest.mark.slow  # 18 s under the interpreter: the slow suite
def test_sweep_script_dry_run(tmp_path):
    """scripts/sweep_static.py runs end to end under the interpreter and finds every variant
    bitwise equal to the reference (the GPU run uses the same code)."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "sweep_static.py"
    spec = importlib.util.spec_from_file_location("sweep_static", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--device", "cpu", "--out", str(tmp_path), "--shapes", "3x128", "--codecs", "int4-outlier,int8"])
    rows = json.loads((tmp_path / "sweep_static.json").read_text())["rows"]
    checks = [r for r in rows if r.get("check")]
    assert [r["codec"] for r in checks] == ["int4-outlier", "int8"]
    # encode variants tile, fast, fast-b; decode also src, src-c, src-2 (int8: tile, fast; decode also src), at
    # worlds 2 and 8
    for r, n_enc, n_dec in zip(checks, (3, 2), (6, 3)):
        flags = {k: v for k, v in r.items() if k.startswith(("bytes_equal", "sum_equal"))}
        assert len(flags) == n_enc + n_dec * 2 and all(v is True for v in flags.values()), r
    timed = [r for r in rows if not r.get("check")]
    assert len(timed) == 4 and all(r["dec_fast_equal_tile"] is True for r in timed)
    assert all(r[f"dec_{v}_equal_tile"] is True for r in timed[:2] for v in ("src", "src-c", "src-2")), timed[:2]
    assert all(r["dec_src_equal_tile"] is True and "dec_src-c_us" not in r for r in timed[2:]), timed[2:]
    # the world-8 command of the docstring: only the asked variants (and the tile baseline)
    mod.main(["--device", "cpu", "--out", str(tmp_path), "--shapes", "3x128", "--codecs", "int4-outlier",
              "--worlds", "8,2", "--dec-variants", "fast,src", "--enc-variants", "none"])
    rows = json.loads((tmp_path / "sweep_static.json").read_text())["rows"]
    assert sorted(k for k in rows[0] if k.startswith("sum_equal")) == [
        f"sum_equal_{v}_w{w}" for v in ("fast", "src", "tile") for w in (2, 8)]
    assert [r["world"] for r in rows[1:]] == [8, 2] and all(r["dec_src_equal_tile"] is True for r in rows[1:])
    # a typo in a variant name is refused before anything runs (it would time fewer variants)
    with pytest.raises(SystemExit, match="unknown variant.*srcc"):
        mod.main(["--device", "cpu", "--out", str(tmp_path), "--dec-variants", "fast,srcc"])


import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _codes_kernel(x_ptr, inv_ptr, out_ptr, n, max_in, QMAX: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < n, other=0.0)
    q = KS._codes(x, tl.load(inv_ptr + i, mask=i < n, other=1.0), tl.abs(x) < float("inf"), max_in, QMAX)
    tl.store(out_ptr + i, q, mask=i < n)


@pytest.mark.parametrize("bits", [4, 8])
def test_fast_encoders_codes_are_the_references_on_ties_and_edges(bits):
    """The fast encoders' code (saturate, scale, clamp, round half to even by the mantissa of
    y + 1.5 * 2**23, NaN/Inf -> sentinel) against functional.quantize_symmetric: every half tie
    in [-128, 128] at scale 1, values next to them, scaled random values, huge, tiny, -0.0, NaN, Inf."""
    from lowbit_tp.codecs import functional as F

    ties = torch.arange(-257, 258, dtype=torch.float32) / 2
    near = torch.cat([torch.nextafter(ties, ties + 1), torch.nextafter(ties, ties - 1)])
    special = torch.tensor([3.4e38, -3.4e38, 1e30, -1e30, 1e-30, -0.0, 0.0, float("nan"), float("inf"),
                            float("-inf")])
    x = torch.cat([ties, near, special, torch.randn(500) * 40])
    inv = torch.cat([torch.ones(ties.numel() * 3 + special.numel()), torch.rand(500) * 4 + 1e-3])
    inv[-1], inv[-2] = 1e30, 1e-30  # a huge and a tiny reciprocal scale
    out = torch.empty(x.numel(), dtype=torch.int32)
    _codes_kernel[(1,)](x, inv, out, x.numel(), F.BF16_MAX, QMAX=2 ** (bits - 1) - 1,
                        BLOCK=triton.next_power_of_2(x.numel()))
    want = F.quantize_symmetric(x, inv_scale=inv, bits=bits, nonfinite=True).to(torch.int32)
    assert torch.equal(out, want), (x[out != want][:6], out[out != want][:6], want[out != want][:6])


@pytest.mark.parametrize("name,k,sources", [("int4-outlier", 64, 2), ("int4-outlier", 2, 8), ("int8", 3, 2),
                                            ("int8", 0, 8)])
def test_fast_kernels_at_the_edges_of_k_and_world(name, k, sources, launches):
    """Every channel kept in bf16 (k = E: no code or scale to read; the fast decode-and-sum
    once read past the payload there, so it hands that shape to the tile kernel), int8 with bf16
    channels (the row-walking kernels with 8-bit codes) and 8 sources (the widest tile bucket),
    bitwise the reference."""
    tokens, hidden = 5, 64
    cal = synthetic_calibration([LAYER], world=sources, hidden=hidden, tokens=64, batches=1)
    ref = make_codec(name, calibration=cal, nonfinite="propagate", backend="reference", k=k)
    tri = make_codec(name, calibration=cal, nonfinite="propagate", backend="triton", k=k)
    g = torch.Generator().manual_seed(k * 10 + sources)
    xs = [torch.randn(tokens, hidden, generator=g) * 3 for _ in range(sources)]
    xs[0][1, 3] = float("nan")
    want = [ref.encode(x, layer=LAYER, source=r) for r, x in enumerate(xs)]
    got = [tri.encode(x, layer=LAYER, source=r) for r, x in enumerate(xs)]
    assert all(torch.equal(w, v) for w, v in zip(want, got))
    assert same_bits(ref.decode_sum(want, (tokens, hidden), layer=LAYER),
                     tri.decode_sum(want, (tokens, hidden), layer=LAYER))
    decoders = {n for n in launches if "decode" in n}
    if k == hidden:
        assert decoders == {"static_decode_sum_tile_kernel"}, launches
    else:
        assert decoders <= FAST and decoders, launches


# The "src" decode-and-sum variants (sources outside, rows inside: static_decode_sum_rows_src_kernel;
# "src-c" with the column blocks on grid axis 0): tiny row tiles as for "fast"
# (in TINY, as "auto" runs "src" above 4 sources)
SRC_TINY = TINY


def _misaligned(p: torch.Tensor) -> torch.Tensor:
    """``p``'s bytes at an odd address (the bf16 head then loads as two bytes, ``H16`` off)."""
    buf = torch.zeros(p.numel() + 1, dtype=torch.uint8)
    buf[1:] = p
    return buf[1:]


@pytest.mark.parametrize("name,k,kernels", [
    ("int4-outlier", None, ("static_decode_sum_rows_kernel", "static_decode_sum_rows_src_kernel")),
    ("int8", 0, ("static_decode_sum_win_kernel", "static_decode_sum_win_loop_kernel"))])
def test_auto_decode_sum_picks_by_source_count(name, k, kernels, launches, monkeypatch):
    """"auto" (the default) decodes up to 4 sources with "fast" and more with "src" (the H100
    sweeps of stop 24), bitwise equal to the reference either way."""
    monkeypatch.setattr(KS, "FAST_TILES", SRC_TINY)
    assert KS.DECODE_VARIANT == "auto"
    tokens, hidden = 9, 258
    cal = synthetic_calibration([LAYER], world=5, hidden=hidden, tokens=64, batches=1)
    kw = {} if k is None else {"k": k}
    ref = make_codec(name, calibration=cal, nonfinite="propagate", backend="reference", **kw)
    tri = make_codec(name, calibration=cal, nonfinite="propagate", backend="triton", **kw)
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(tokens, hidden, generator=g) * 3 for _ in range(5)]
    xs[2][3, 5] = float("nan")
    want = [ref.encode(x, layer=LAYER, source=r) for r, x in enumerate(xs)]
    for n, kernel in ((2, kernels[0]), (4, kernels[0]), (5, kernels[1])):
        launches.clear()
        assert same_bits(ref.decode_sum(want[:n], (tokens, hidden), layer=LAYER),
                         tri.decode_sum(want[:n], (tokens, hidden), layer=LAYER)), f"{n} sources"
        assert [x for x in launches if "decode" in x] == [kernel], (n, launches)


@pytest.mark.parametrize("variant", ["src", pytest.param("src-c", marks=pytest.mark.slow),
                                     pytest.param("src-2", marks=pytest.mark.slow)])  # "auto" runs "src"
@pytest.mark.parametrize("name,k", [("int4-outlier", None), ("int4-random-k", None), ("int8", 3)])
@pytest.mark.parametrize("tokens,hidden,sources,odd", sweep([(7, 258, 2, False), (13, 300, 3, True), (1, 130, 8, False),
                                                             (5, 195, 8, False), (4, 195, 3, False)],
                                                            keep=lambda case: case[3] or SMALL(case)))
def test_src_decode_sum_variants_bitwise(variant, name, k, tokens, hidden, sources, odd, launches, monkeypatch):
    """The "src" decode-and-sum against the reference, bitwise: odd T, E not a multiple of 64,
    2/3/8 sources, NaN/Inf (also in a bf16 channel), a bf16 head at an odd address, and the
    chunked form (N = 1); one 16-bit load a value (ONE16) where the body rows are an even number
    of bytes and the payloads 2-byte aligned ("src", "src-c"), else two loads."""
    monkeypatch.setattr(KS, "FAST_TILES", SRC_TINY)
    monkeypatch.setattr(KS, "DECODE_VARIANT", variant)
    one16 = []
    counted = KS.static_decode_sum_rows_src_kernel

    class Recorded:
        def __getitem__(self, grid):
            run = counted[grid]
            return lambda *a, **kw: (one16.append(kw["ONE16"]), run(*a, **kw))[1]

    monkeypatch.setattr(KS, "static_decode_sum_rows_src_kernel", Recorded())
    cal = synthetic_calibration([LAYER], world=sources, hidden=hidden, tokens=64, batches=1)
    kw = {} if k is None else {"k": k}
    ref = make_codec(name, calibration=cal, nonfinite="propagate", backend="reference", **kw)
    tri = make_codec(name, calibration=cal, nonfinite="propagate", backend="triton", **kw)
    g = torch.Generator().manual_seed(tokens * 100 + hidden + sources)
    xs = [torch.randn(tokens, hidden, generator=g) * 3 for _ in range(sources)]
    kept = [ref.params(LAYER, r, hidden).outliers for r in range(sources)]
    xs[0][tokens - 1, 1] = float("nan")
    xs[-1][0, hidden - 1] = float("-inf")
    xs[sources // 2][tokens // 2, int(kept[sources // 2][-1])] = float("nan")  # a NaN in a bf16 channel
    xs[1][0, int(kept[1][0])] = float("inf")
    xs[0][0, :4] = torch.tensor([-0.0, 0.5, 1.5, -2.5])
    want = [ref.encode(x, layer=LAYER, source=r) for r, x in enumerate(xs)]
    got_in = [_misaligned(p) for p in want] if odd else want
    assert KS._aligned2(got_in) != odd
    for n in sorted({1, 2, sources}):
        assert same_bits(ref.decode_sum(want[:n], (tokens, hidden), layer=LAYER),
                         tri.decode_sum(got_in[:n], (tokens, hidden), layer=LAYER)), f"{n} sources"
    assert {x for x in launches if "decode" in x} == {"static_decode_sum_rows_src_kernel"}, launches
    nk = kept[0].numel()
    rb = (hidden - nk) // 2 if name != "int8" else hidden - nk
    assert set(one16) == {not odd and rb % 2 == 0 and variant != "src-2"}, one16
    # two-shot's chunk decode (one source, grid axis 2)
    rows, chunks = 3, 2
    x = torch.cat([xs[0][:1].repeat(rows, 1), xs[-1][:1].repeat(rows, 1)])
    flat = torch.cat([ref.encode(c, layer=LAYER, source=0) for c in x.split(rows)])
    dec = tri.decode_chunks(flat, (rows, hidden), chunks, layer=LAYER, source=0)
    assert same_bits(dec, torch.cat([ref.decode(p, (rows, hidden), layer=LAYER, source=0)
                                     for p in flat.chunk(chunks)]))


@pytest.mark.parametrize("variant", ["src", "src-c"])
@pytest.mark.parametrize("name", ["int4", "int8"])
@pytest.mark.parametrize("tokens,hidden,sources", sweep([(7, 258, 2), (13, 300, 3), (1, 130, 8), (5, 96, 8), (3, 195, 8),
                                                         (3, 100, 2), (5, 130, 3)],  # 2 and 3 sources by default
                                                        keep=SMALL))
def test_src_window_decode_sum_bitwise(variant, name, tokens, hidden, sources, launches, monkeypatch):
    """Without bf16 channels the "src" variants run the window decode with a run-time loop over
    sources (static_decode_sum_win_loop_kernel): bitwise the reference at 1, 2, 3 and 8 sources,
    odd T, E not a multiple of 64 (int8 also odd), -0.0, NaN/Inf, and the chunked form."""
    if name == "int4" and hidden % 2:
        pytest.skip("int4 with an odd E: the tile kernel")
    monkeypatch.setattr(KS, "FAST_TILES", SRC_TINY)
    monkeypatch.setattr(KS, "DECODE_VARIANT", variant)
    cal = synthetic_calibration([LAYER], world=sources, hidden=hidden, tokens=64, batches=1)
    ref = make_codec(name, calibration=cal, nonfinite="propagate", backend="reference")
    tri = make_codec(name, calibration=cal, nonfinite="propagate", backend="triton")
    g = torch.Generator().manual_seed(tokens * 100 + hidden + sources + 7)
    xs = [torch.randn(tokens, hidden, generator=g) * 3 for _ in range(sources)]
    xs[0][tokens - 1, 1] = float("nan")
    xs[-1][0, hidden - 1] = float("-inf")
    xs[sources // 2][tokens // 2, 2] = float("inf")
    xs[0][0, :4] = torch.tensor([-0.0, 0.5, 1.5, -2.5])
    xs[-1][0, :4] = -0.0
    want = [ref.encode(x, layer=LAYER, source=r) for r, x in enumerate(xs)]
    for n in sorted({1, 2, sources}):
        assert same_bits(ref.decode_sum(want[:n], (tokens, hidden), layer=LAYER),
                         tri.decode_sum(want[:n], (tokens, hidden), layer=LAYER)), f"{n} sources"
    assert {x for x in launches if "decode" in x} == {"static_decode_sum_win_loop_kernel"}, launches
    rows, chunks = 2, 3
    x = torch.cat([xs[0][:1].repeat(rows, 1), xs[-1][:1].repeat(rows, 1), xs[0][-1:].repeat(rows, 1)])
    flat = torch.cat([ref.encode(c, layer=LAYER, source=0) for c in x.split(rows)])
    dec = tri.decode_chunks(flat, (rows, hidden), chunks, layer=LAYER, source=0)
    assert same_bits(dec, torch.cat([ref.decode(p, (rows, hidden), layer=LAYER, source=0)
                                     for p in flat.chunk(chunks)]))


# Error feedback fused into the fast encoders (triton_static.encode_feedback, Codec.encode_feedback):
# the payload of encode(x + carry) and next = sent - decode(payload), 0 where not finite, against
# the reference's gather_encode_feedback (encode, decode, difference), bitwise.
@pytest.mark.parametrize("name,k,tokens,hidden", sweep([("int4-outlier", None, 7, 258), ("int4-outlier", None, 1, 130),
                                                        ("int8", 3, 5, 130), ("int8", 0, 6, 96), ("int8", 0, 5, 96),
                                                        ("int4", None, 5, 96), ("int4-random-k", None, 9, 256)],
                                                       keep=lambda case: SMALL(case[2:])))
@pytest.mark.parametrize("with_carry", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, pytest.param(torch.float16, marks=pytest.mark.slow)])
def test_encode_feedback_fused_bitwise(name, k, tokens, hidden, with_carry, dtype, launches):
    from lowbit_tp.collectives.algorithms import gather_encode_feedback
    from lowbit_tp.collectives.feedback import Feedback

    cal = synthetic_calibration([LAYER], world=2, hidden=hidden, tokens=64, batches=1)
    kw = {} if k is None else {"k": k}
    ref = make_codec(name, calibration=cal, nonfinite="propagate", backend="reference", **kw)
    tri = make_codec(name, calibration=cal, nonfinite="propagate", backend="triton", **kw)
    g = torch.Generator().manual_seed(tokens * 1000 + hidden)
    x = torch.randn(tokens, hidden, generator=g) * 3
    kept = ref.params(LAYER, 1, hidden).outliers
    x[0, 1], x[tokens - 1, hidden - 1], x[tokens // 2, 2] = float("nan"), float("-inf"), 1e30  # 1e30 saturates
    x[0, 3] = -0.0
    x[tokens - 1, 5] = 3.4e38  # beyond the largest bf16 (max_input): saturated in a body channel
    if kept.numel():
        x[tokens - 1, int(kept[0])] = float("nan")  # in a bf16 channel
        x[0, int(kept[-1])] = 3.4e38  # saturated to the largest bf16 in a kept channel: decoded from that
    x = x.to(dtype)  # (bf16/fp16 turn 3.4e38 and 1e30 into Inf)
    carry = torch.randn(tokens, hidden, generator=g) * 0.1 if with_carry else None
    if with_carry:
        carry[tokens - 1, 0] = float("inf")
        carry[0, 3] = -0.0  # -0.0 + -0.0 keeps the sign
    want = Feedback(carry=carry)
    w = gather_encode_feedback(ref, x, want, layer=LAYER, rank=1)
    got = tri.encode_feedback(x, carry, layer=LAYER, source=1)
    assert got is not None, "the fused path did not run"
    assert torch.equal(w, got[0])
    assert same_bits(want.next, got[1]) and not torch.isnan(got[1]).any()
    assert {n for n in launches if "encode" in n} <= FAST and launches, launches
    # and through the collective's function, into a caller's buffer
    fb, buf = Feedback(carry=carry), torch.empty_like(w)
    assert gather_encode_feedback(tri, x, fb, layer=LAYER, rank=1, out=buf) is buf and torch.equal(buf, w)
    assert same_bits(fb.next, want.next)
    nxt = torch.full((tokens, hidden), 7.0)  # and the next carry into a caller's buffer (two-shot's rows)
    again = tri.encode_feedback(x, carry, layer=LAYER, source=1, next_out=nxt)
    assert again[1] is nxt and same_bits(nxt, want.next) and torch.equal(again[0], w)


def test_encode_feedback_without_a_fused_kernel_falls_back():
    """An odd int4 body row (the flat encoder) and a carry of another shape: no fused path
    (None), and gather_encode_feedback still matches the reference or refuses."""
    from lowbit_tp.collectives.algorithms import gather_encode_feedback
    from lowbit_tp.collectives.feedback import Feedback

    cal = synthetic_calibration([LAYER], world=2, hidden=101, tokens=64, batches=1)
    tri = make_codec("int4", calibration=cal, nonfinite="propagate", backend="triton")  # no bf16 channel: odd row
    ref = make_codec("int4", calibration=cal, nonfinite="propagate", backend="reference")
    x = torch.randn(3, 101)
    assert tri.encode_feedback(x, None, layer=LAYER, source=0) is None
    want, got = Feedback(carry=torch.randn(3, 101)), None
    w = gather_encode_feedback(ref, x, want, layer=LAYER, rank=0)
    got = Feedback(carry=want.carry)
    assert torch.equal(gather_encode_feedback(tri, x, got, layer=LAYER, rank=0), w)
    assert same_bits(got.next, want.next)
    bad = Feedback(carry=torch.zeros(2, 101))
    assert tri.encode_feedback(x, bad.carry, layer=LAYER, source=0) is None
    with pytest.raises(ValueError, match="carry of shape"):
        gather_encode_feedback(tri, x, bad, layer=LAYER, rank=0)


def test_encode_feedback_flags_nonfinite_in_flag_mode():
    """nonfinite="flag": the fused feedback encode records a NaN made by the carry in the step's
    device flag, as the encode does (no host sync per message)."""
    cal = synthetic_calibration([LAYER], world=2, hidden=130, tokens=64, batches=1)
    tri = make_codec("int4-outlier", calibration=cal, nonfinite="flag", backend="triton")
    x, carry = torch.randn(3, 130), torch.zeros(3, 130)
    assert tri.encode_feedback(x, carry, layer=LAYER, source=0) is not None
    tri.check_nonfinite()  # clean
    carry[1, 7] = float("nan")
    assert tri.encode_feedback(x, carry, layer=LAYER, source=0) is not None
    with pytest.raises(Exception, match="NaN"):
        tri.check_nonfinite()
