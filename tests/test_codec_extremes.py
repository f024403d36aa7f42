"""Finite extremes, NaN propagation and empty inputs through every registered codec.

Rules (issue 12, docs/wire-format.md "Representable range"):
* finite input never decodes to NaN/Inf; in ``nonfinite="error"`` mode a value beyond
  a codec's range is an :class:`OutOfRangeError` naming layer, source and the limit,
  otherwise the decode is within the codec's documented error bound (computed here
  from the format's description, not from the codec's own parameters);
* ``nonfinite="propagate"`` poisons only what the format must poison;
* ``[0, E]`` inputs work everywhere.
"""
import math
import warnings

import pytest
import torch
from conftest import LAYERS

from lowbit_tp.calibration.synthetic import planted_partials, synthetic_calibration
from lowbit_tp.codecs import OutOfRangeError, list_codecs, make_codec
from lowbit_tp.codecs.ecsq import EcsqCodec
from lowbit_tp.collectives import all_reduce, simulate_all_reduce, spawn_ranks

E = 576
L0, L1 = LAYERS
PLAN = {"budget": 4.5, "layers": {L0: "rot-lm4-g64-lg8-k4", L1: "rot-int6-g64-lg8-k4"}}
# Largest rounding error of the Lloyd-Max levels on [-1, 1] (half the widest gap, or 1 - the
# top level), from the level tables in docs/wire-format.md, as (bits, table group): error.
LM_MAXERR = {(4, 32): 0.0996, (4, 64): 0.1054, (3, 32): 0.1619, (3, 64): 0.1685, (2, 32): 0.3353, (2, 64): 0.3965}


@pytest.fixture(scope="module")
def cal(cal_factory):
    return cal_factory(3, E)


def _codec(name, cal, **kw):
    if name == "alloc":
        kw["plan"] = PLAN
    return make_codec(name, calibration=cal, **kw)


def _hadamard(b):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(b)


def _block(e):
    b = 1
    while b * 2 <= 256 and e % (b * 2) == 0:
        b *= 2
    return b


def _rotate(x, signs):
    """Independent dense rotation: block-diagonal Sylvester Hadamard after random signs."""
    b = _block(x.shape[1])
    return ((x.double() * signs.double()).reshape(x.shape[0], -1, b) @ _hadamard(b).T).reshape(x.shape)


def _group_amax(v, g):
    t, e = v.shape
    pad = torch.nn.functional.pad(v.abs(), (0, (-e) % g))
    return pad.reshape(t, -1, g).amax(-1).repeat_interleave(g, 1)[:, :e]


def _bound(codec, x, cal, layer, source):
    """Per-value error bound of ``codec`` for ``x``, from each format's documented rule."""
    name = codec.name
    xd = x.double()
    bf16 = xd.abs() * 2.0 ** -8  # round to nearest bf16: half an ulp, relative
    if name == "bf16":
        return bf16
    if name in ("int8", "int4", "int4-outlier", "int4-random-k"):
        qmax = 127 if name == "int8" else 7
        st = cal.get(layer, source)
        scale = (torch.maximum(st.ema_min.abs(), st.ema_max.abs()).double() / qmax).clamp_min(1e-12)
        clip = (xd.abs() - qmax * scale).clamp_min(0)  # static range: clipping by design
        return torch.maximum(bf16, scale / 2 + clip) * (1 + 1e-6)
    if name.startswith("int4-outlier-"):  # the seed codec's scale ablations (see codecs/static.py)
        st = cal.get(layer, source)
        stat = name[len("int4-outlier-"):].removesuffix("-asym")
        if name.endswith("asym"):  # 15 levels centred on (low + high) / 2, step (high - low) / 14
            low, high = (st.ema_min, st.ema_max) if stat == "asym" else (st.require("mean_min"), st.require("mean_max"))
            centre, scale = (low.double() + high.double()) / 2, ((high.double() - low.double()) / 14).clamp_min(1e-12)
            clip = ((xd - centre).abs() - 7 * scale).clamp_min(0)
        else:  # symmetric: absmax of the chosen statistic / 7
            amax = {"absmax": lambda: st.absmax, "p999": lambda: st.require("p999"),
                    "mean": lambda: torch.maximum(st.require("mean_min").abs(), st.require("mean_max").abs())}[stat]()
            scale = (amax.double() / 7).clamp_min(1e-12)
            clip = (xd.abs() - 7 * scale).clamp_min(0)
        return torch.maximum(bf16, scale / 2 + clip) * (1 + 1e-6)
    if name.startswith("int4-g"):
        g = int(name[6:])
        return _group_amax(xd, g) / 7 * (0.5 + 2 ** -10) + 1e-6
    if name == "mxfp4":
        return _group_amax(xd, 32) / 2  # step <= amax/2 at the top, clip < 2 * 2**exp <= amax/2
    raise AssertionError(name)


def _kept_channels_exact(codec, x, y, layer, source):
    """The kept channels travel as bf16: ``y`` holds them to bf16 rounding. Returns the
    codec's params, the kept channels, and ``x`` and the error ``y - x`` (fp64) with them zeroed."""
    p = codec.params(layer, source, x.shape[1])
    kept = p.outliers
    torch.testing.assert_close(y[:, kept].double(), x[:, kept].double(), rtol=2 ** -8, atol=0)
    xr, err = x.double().clone(), (y.double() - x.double())
    xr[:, kept] = 0
    err[:, kept] = 0
    return p, kept, xr, err


def _rot_check(codec, x, y, cal, layer, source):
    """Kept channels: bf16. The rest: each rotated value is off by at most ``step`` (the
    level grid's largest rounding error) times its group scale (<= ``widen`` x the group
    absmax), and the rotation is orthonormal per Hadamard block, so per token and block
    ``||y - x||_2 <= ||(step * widen * amax)_block||_2``."""
    e = x.shape[1]
    p, _, xr, err = _kept_channels_exact(codec, x, y, layer, source)
    amax = _group_amax(_rotate(xr, p.signs), codec.group)
    if codec.levels == "lm":
        step = LM_MAXERR[(codec.bits, 32 if codec.group <= 32 else 64)] + 1e-4
    else:
        step = 0.5 / (2 ** (codec.bits - 1) - 1)
    widen = {"fp16": 1 + 2 ** -10, "e8m0": 2.0, "lg8": 2 ** (1 / 16) * (1 + 2 ** -7)}[codec.scale_format]
    scale = widen * amax
    if codec.scale_format == "lg8":  # 255 log steps below the token's base: smaller groups share the floor
        floor = amax.amax(dim=1, keepdim=True) * (1 + 2 ** -7) * 2 ** (-254 / 16)
        scale = torch.maximum(scale, floor)
    b = _block(e)
    got = err.reshape(err.shape[0], -1, b).norm(dim=-1)
    bound = (step * scale).reshape(err.shape[0], -1, b).norm(dim=-1)
    assert bool((got <= bound * (1 + 1e-4) + 1e-5 * amax.max()).all()), float((got / bound).max())


def _ecsq_check(codec, x, y, layer, source):
    """Kept channels: bf16. The rest: each rotated value within half its row's step (the bf16
    after the kept channels, docs/wire-format.md), the step at most 4 x the rotated row's
    absmax rounded up to bf16; per token and Hadamard block ``||y - x||_2 <= sqrt(b) step / 2``."""
    t, e = x.shape
    p, kept, xr, err = _kept_channels_exact(codec, x, y, layer, source)
    payload = codec.encode(x, layer=layer, source=source)
    off = 2 * t * kept.numel()
    step = (payload[off:off + 2 * t].view(torch.bfloat16).double()).unsqueeze(1)
    amax = _rotate(xr, p.signs).abs().amax(1, keepdim=True)
    assert bool((step <= 4 * amax * (1 + 2 ** -7)).all())
    b = _block(e)
    got = err.reshape(t, -1, b).norm(dim=-1)
    assert bool((got <= math.sqrt(b) * step / 2 * (1 + 1e-4) + 1e-6 * amax).all()), float((got / step).max())


def _leaf(codec, layer, source):
    if codec.name == "alloc":
        return codec.codec_for(layer)
    if hasattr(codec, "first"):
        return codec.second if source == "sum" else codec.first
    return codec


EXTREMES = [(dt, v) for dt in (torch.float32, torch.bfloat16) for v in (1e4, 1e6, 1e30)] + [(torch.float16, 1e4)]


@pytest.mark.parametrize("dtype,value", EXTREMES, ids=lambda v: str(v))
@pytest.mark.parametrize("name", list_codecs())
def test_finite_extremes_roundtrip_error_mode(cal, name, dtype, value):
    codec = _codec(name, cal)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, E, generator=g)
    x[0, 100], x[1, 5], x[2, :70] = value, -value, value / 3
    x = x.to(dtype)
    try:
        y = codec.roundtrip(x, layer=L0, source=1)
    except OutOfRangeError as exc:  # a clear refusal: names where and the limit
        assert f"layer '{L0}', source 1" in str(exc) and "exceeds" in str(exc)
        leaf = _leaf(codec, L0, 1)
        assert name.startswith("int4-g") or getattr(leaf, "scale_format", None) == "fp16", name
        return
    assert bool(torch.isfinite(y).all()), name
    leaf = _leaf(codec, L0, 1)
    if isinstance(leaf, EcsqCodec):
        _ecsq_check(leaf, x, y, L0, 1)
    elif name.startswith("rot") or name == "alloc":
        _rot_check(leaf, x.float(), y, cal, L0, 1)
    else:
        assert bool(((y.double() - x.double()).abs() <= _bound(leaf, x.float(), cal, L0, 1)).all()), name


@pytest.mark.parametrize("algo", ["gather", "two-shot"])
@pytest.mark.parametrize("name", list_codecs())
def test_finite_extremes_collectives_never_nonfinite(cal, name, algo):
    codec = _codec(name, cal)
    for dtype, value in EXTREMES:
        parts = [p.to(dtype) for p in planted_partials(3, 5, E, seed=0)]
        parts[1][2, 7] = value
        parts[2][4, 300] = -value
        try:
            y = simulate_all_reduce(parts, codec, algo, layer=L0)
        except OutOfRangeError as exc:
            assert f"layer '{L0}'" in str(exc) and "exceeds" in str(exc)
            continue
        assert bool(torch.isfinite(y).all()), (name, algo, dtype, value)


def test_default_codec_carries_a_million_at_the_issue_repro(cal):
    """Issue 12's reproduction: 1e6 in a row made 572 of 576 outputs non-finite."""
    c = _codec("alloc", cal)
    x = torch.randn(2, E)
    x[0, 100] = 1e6
    y = c.roundtrip(x, layer=L0, source=0)
    assert bool(torch.isfinite(y).all())
    assert abs(float(y[0, 100]) - 1e6) < 0.1 * 1e6


def test_group_int4_refuses_instead_of_clipping_and_saturates_when_propagating():
    x = torch.zeros(1, 32)
    x[0, 0] = 1e6
    with pytest.raises(OutOfRangeError, match="458528"):
        make_codec("int4-g32").roundtrip(x, layer="L", source=2)
    y = make_codec("int4-g32", nonfinite="propagate").roundtrip(x)
    assert float(y[0, 0]) == 7 * 65504.0 and bool(torch.isfinite(y).all())


def _allowed_rot(e, group, cols):
    """Columns a NaN at ``cols`` may reach: Hadamard blocks of the groups that see it."""
    b = _block(e)
    cols = set(cols)
    while True:
        blocks = {c // b for c in cols}
        groups = {j // group for bl in blocks for j in range(bl * b, bl * b + b)}
        grown = {j for gr in groups for j in range(gr * group, min(e, gr * group + group))}
        grown = {j for bl in {c // b for c in grown} for j in range(bl * b, bl * b + b)}
        if grown <= cols:
            return cols
        cols |= grown


def _poison_allowed(leaf, e, col, algo):
    if leaf.name == "mxfp4":
        return set(range(col // 32 * 32, min(e, col // 32 * 32 + 32)))
    if isinstance(leaf, EcsqCodec):  # one step per row: the row decodes to NaN
        return set(range(e))
    if hasattr(leaf, "scale_format"):  # rotated: spreads over Hadamard blocks x groups
        cols = _allowed_rot(e, leaf.group, [col])
        return _allowed_rot(e, leaf.group, cols) if algo == "two-shot" else cols
    return {col}  # a sentinel per value (int) or NaN itself (bf16)


@pytest.mark.parametrize("e", [576, 600])
@pytest.mark.parametrize("algo", ["gather", "two-shot"])
@pytest.mark.parametrize("name", list_codecs())
def test_propagate_poisons_only_what_it_must(cal_factory, name, algo, e):
    cal = cal_factory(3, e)
    codec = _codec(name, cal, nonfinite="propagate")
    for tokens, row, col in [(1, 0, 3), (3, 1, 130), (5, 4, e - 1)]:
        parts = planted_partials(3, tokens, e, seed=0)
        parts[1][row, col] = float("nan")
        y = simulate_all_reduce(parts, codec, algo, layer=L0)
        bad = torch.nonzero(~torch.isfinite(y)).tolist()
        assert [row, col] in bad, (name, algo, tokens)
        leaf = _leaf(codec, L0, "sum" if algo == "two-shot" else 1)
        first = _leaf(codec, L0, 1)
        allowed = _poison_allowed(first, e, col, algo)
        if leaf is not first:
            allowed = set().union(*(_poison_allowed(leaf, e, c, "gather") for c in allowed))
        assert {r for r, _ in bad} == {row}, (name, algo)
        assert {c for _, c in bad} <= allowed, (name, algo, sorted({c for _, c in bad} - allowed)[:5])


def test_rotated_poison_is_one_hadamard_block_not_the_row(cal):
    """The default codec's family used to poison the whole token row (572 of 576 values)."""
    c = _codec("alloc", cal, nonfinite="propagate")
    x = torch.randn(2, E)
    x[0, 100] = float("inf")
    y = c.roundtrip(x, layer=L0, source=0)
    bad = torch.nonzero(~torch.isfinite(y[0])).reshape(-1)
    assert bool(torch.isfinite(y[1]).all()) and 100 in bad.tolist()
    assert set(bad.tolist()) <= set(range(64, 128))


@pytest.mark.parametrize("name", list_codecs())
def test_zero_tokens(cal, name):
    codec = _codec(name, cal)
    x = torch.zeros(0, E)
    payload = codec.encode(x, layer=L0, source=0)
    assert payload.numel() == codec.payload_nbytes((0, E), L0)
    assert codec.decode(payload, (0, E), layer=L0, source=0).shape == (0, E)
    for algo in ["gather", "two-shot"]:
        assert simulate_all_reduce([x, x, x], codec, algo, layer=L0).shape == (0, E)


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("name", ["int4-outlier", "int4-g32", "mxfp4", "rot-lm4-g64-lg8-k4"])
def test_a_tensor_that_requires_grad_encodes_without_a_warning(cal, name, backend):
    # a model run outside torch.no_grad (TPSimulator in a notebook) sends such partials; the range
    # scan's float(t) printed torch's "Converting a tensor with requires_grad=True to a scalar"
    codec = _codec(name, cal, backend=backend)
    x = planted_partials(3, 5, E, seed=0)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = codec.encode(x.clone().requires_grad_(), layer=L0, source=0)
    assert torch.equal(got, codec.encode(x, layer=L0, source=0))


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("e", [128, 576])  # Hadamard blocks of 128 and 64
@pytest.mark.parametrize("name", ["rot-lm4-g64-lg8-k4", "rot-int6-g64-lg8-k4", "rot-lm4-g64-e8"])
def test_rotated_error_mode_refuses_a_spike_its_decode_cannot_carry(name, e, backend):
    # One finite value of 1e38 on a rotated channel (below the lg8/e8 scale limits) was encoded
    # in "error" mode and decoded to Inf/NaN: the inverse transform's fp32 sums overflowed
    from helpers import raised

    cal = synthetic_calibration([L0], world=2, hidden=e, tokens=8, batches=1)
    codec = make_codec(name, calibration=cal, backend=backend)
    ch = next(c for c in range(e) if c not in set(codec.params(L0, 0, e).outliers.tolist()))
    for value, want in ((1e38, "out of range"), (-1e38, "out of range"), (1e37, "ok")):
        x = torch.randn(3, e)
        x[1, ch] = value
        got = []
        assert raised(codec, lambda: got.append(simulate_all_reduce([x, torch.zeros_like(x)], codec, layer=L0))) \
            == want, value
        assert all(torch.isfinite(y).all() for y in got), value
    # propagate mode clamps rotated channels first: still a finite decode, no refusal
    prop = make_codec(name, calibration=cal, backend=backend, nonfinite="propagate")
    x[1, ch] = 1e38
    assert torch.isfinite(simulate_all_reduce([x, torch.zeros_like(x)], prop, layer=L0)).all()


# ------------------------------------------------------------------ real gloo ranks
REAL = [("rot-lm4-g64+sum8", "error"), ("default", "propagate"), ("int4-g32", "propagate"),
        ("int4-outlier", "propagate"), ("mxfp4", "propagate")]


def _real_inputs(world, e, tokens):
    parts = planted_partials(world, tokens, e, seed=0, noise_seed=5)
    if tokens:
        parts[1][1, 3] = float("nan")
        parts[0][2, 200] = float("-inf")
    return parts


def _rank_real(rank, world):
    cal = synthetic_calibration([L0, L1], world=world, hidden=E, tokens=64, batches=2)
    out = {}
    for name, mode in REAL:
        codec = _codec("alloc" if name == "default" else name, cal, nonfinite=mode)
        for tokens in (0, 5):
            parts = _real_inputs(world, E, tokens) if mode == "propagate" else planted_partials(world, tokens, E, seed=0, noise_seed=5)
            for algo in ("gather", "two-shot"):
                out[(name, tokens, algo)] = all_reduce(parts[rank], codec, algorithm=algo, layer=L0)
    return out


def test_real_ranks_match_reference_bitwise_in_propagate_mode_and_two_stage():
    world = 3
    results = spawn_ranks(_rank_real, world, timeout_s=60)
    cal = synthetic_calibration([L0, L1], world=world, hidden=E, tokens=64, batches=2)
    for name, mode in REAL:
        codec = _codec("alloc" if name == "default" else name, cal, nonfinite=mode)
        for tokens in (0, 5):
            parts = _real_inputs(world, E, tokens) if mode == "propagate" else planted_partials(world, tokens, E, seed=0, noise_seed=5)
            for algo in ("gather", "two-shot"):
                ref = simulate_all_reduce(parts, codec, algo, layer=L0)
                if mode == "propagate" and tokens:
                    assert bool(torch.isnan(ref[1, 3])) and bool(torch.isfinite(ref[0]).all())
                for r in range(world):
                    y = results[r][(name, tokens, algo)]
                    # bitwise, NaN payloads included
                    assert y.shape == ref.shape and torch.equal(y.view(torch.int32), ref.view(torch.int32)), (name, algo, r)


@pytest.mark.parametrize("name", ["bf16", "mxfp4"])
def test_a_two_shot_sum_that_overflows_fp32_says_so(cal, name):
    # before: finite partials whose sum passed fp32's range were refused as "NaN/Inf value(s) in the
    # communicated tensor of ... source 'sum'", as if the input had held them
    from lowbit_tp.codecs import NonFiniteError

    parts = planted_partials(3, 6, E)
    for p in parts:
        p[2, 5] = 2e38
    with pytest.raises(NonFiniteError, match=r"source 'sum'; the ranks' partials summed beyond the fp32 range"):
        simulate_all_reduce(parts, make_codec(name, calibration=cal, backend="reference"), "two-shot", layer=L0)
    parts[0][2, 5] = float("nan")  # a NaN is not an overflow (rank 0's own encode refuses it first)
    with pytest.raises(NonFiniteError, match=r"source 0; pass nonfinite"):
        simulate_all_reduce(parts, make_codec(name, calibration=cal, backend="reference"), "two-shot", layer=L0)
