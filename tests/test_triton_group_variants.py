"""The group encoders' variants (triton_group.ENCODE_VARIANTS) against the eager reference, bitwise,
under TRITON_INTERPRET=1 on CPU tensors.

"fast"/"fast4k" take a fast path on tiles they can prove (all finite, no clamped code, no
quotient near a rounding tie) and the old code on the others; these tests send data down
both paths (and check that they are taken), through every launcher: encode, reduce_encode,
encode_chunks, and the codec with its NaN and range flags.
"""
import importlib.util
import os
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before lowbit_tp imports any kernel module

import pytest  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (optional: the Triton kernels are skipped)")

from lowbit_tp.codecs import make_codec  # noqa: E402
from lowbit_tp.kernels import triton_group as K  # noqa: E402

LAYER = "L"
CODECS = ["int4-g32", "int4-g128", "mxfp4"]
VARIANTS = list(K.ENCODE_VARIANTS)
ROOT = Path(__file__).resolve().parents[1]


def sweep_module():
    spec = importlib.util.spec_from_file_location("sweep_group", ROOT / "scripts" / "sweep_group.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def reference(name):
    return make_codec(name, nonfinite="propagate", backend="reference")


def encode(name, x, variant):
    ref = reference(name)
    out = torch.empty(ref.payload_nbytes(tuple(x.shape)), dtype=torch.uint8)
    if name == "mxfp4":
        return K.mx_encode(x, out, variant=variant)
    return K.encode(x, out, group=ref.group, max_input=ref.max_input, variant=variant)


def diff(a, b):
    return (a != b).nonzero().reshape(-1)[:6].tolist()


@pytest.fixture
def slow_calls(monkeypatch):
    """Counts of the old code path per kernel family (the interpreter looks helpers up at call time)."""
    calls = {"int4": 0, "mx": 0}
    for attr, key in (("_group_codes", "int4"), ("_mx_codes", "mx")):
        orig = getattr(K, attr)
        monkeypatch.setattr(K, attr, lambda *a, _o=orig, _k=key, **kw: calls.__setitem__(_k, calls[_k] + 1) or
                            _o(*a, **kw))
    return calls


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_hard_values_bitwise_on_both_paths(name, variant, slow_calls):
    """Rounding ties and their fp32 neighbours, fp16-subnormal scales, values past max_in,
    -0.0, NaN/Inf (scripts/sweep_group.py's hard tensor, in bands of whole tiles): the bytes
    of the reference, and the fast variants take both paths on it."""
    x = sweep_module().hard_values(torch, name, 128, 256)
    want = reference(name).encode(x, layer=LAYER, source=0)
    got = encode(name, x, variant)
    assert torch.equal(got, want), diff(got, want)
    fam = "mx" if name == "mxfp4" else "int4"
    values, fast = K.ENCODE_VARIANTS[variant]
    tiles = 128 * 256 // values
    if not fast:
        assert slow_calls[fam] == tiles  # "ref": the one path for every tile
    else:  # int4: the tie, subnormal and NaN bands refuse the fast path; mxfp4: the NaN band
        assert 0 < slow_calls[fam] < tiles, slow_calls


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("variant", ["fast", "fast4k"])
@pytest.mark.parametrize("tokens,hidden", [(16, 256), (5, 100), (3, 40), (33, 96)])  # full tiles, ragged ones
def test_normal_data_takes_the_fast_path(name, variant, tokens, hidden, slow_calls):
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(tokens * hidden)) * 3
    want = reference(name).encode(x, layer=LAYER, source=0)
    got = encode(name, x, variant)
    assert torch.equal(got, want), diff(got, want)
    # a random fp32 quotient lies within 2**-20 of a tie with probability ~2e-6: none here
    assert slow_calls == {"int4": 0, "mx": 0}


def test_e2m1_rounding_of_every_boundary_neighbourhood():
    """mxfp4's fast E2M1 rounding (min of three magic-add roundings) against the reference at
    every rounding boundary and 64 fp32 steps either side, past 6, and across [0, 8): groups
    led by 6.0 have shared exponent 0, so each value is rounded as it is."""
    bounds = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 0.5, 1.0, 2.0, 3.0, 4.0])
    bits = bounds.view(torch.int32)[:, None] + torch.arange(-64, 65, dtype=torch.int32)[None, :]
    vals = torch.cat([bits.view(torch.float32).reshape(-1), torch.linspace(0, 8, 4001)[:-1],
                      torch.tensor([0.0, 1e-45, 6.0, 7.99, 2.0 ** -126])])
    vals = torch.cat([vals, -vals])
    n = -(-vals.numel() // (31 * 8)) * 8  # whole rows of 8 groups
    body = torch.cat([vals, torch.zeros(n * 31 - vals.numel())]).reshape(n, 31)
    x = torch.cat([torch.full((n, 1), 6.0), body], dim=1).reshape(-1, 256)
    want = reference("mxfp4").encode(x, layer=LAYER, source=0)
    for variant in VARIANTS:
        got = encode("mxfp4", x, variant)
        assert torch.equal(got, want), (variant, diff(got, want))


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_reduce_encode_and_encode_chunks(name, variant, monkeypatch):
    """Two-shot's launchers with each variant: the fused reduce-and-re-encode equals the
    reference's decode_sum + encode, the batched chunk encode the reference's per-chunk
    encodes (clean partials and a sum with NaN/Inf and a tie-rich chunk)."""
    ref = reference(name)
    sweep = sweep_module()
    g = torch.Generator().manual_seed(3)
    t, e = 8, 256
    for xs in ([torch.randn(t, e, generator=g) * 3 for _ in range(2)],
               [sweep.hard_values(torch, name, 64, e)[48:56], torch.randn(t, e, generator=g)]):  # band 3: NaN/Inf
        payloads = [ref.encode(x, layer=LAYER, source=r) for r, x in enumerate(xs)]
        want = ref.encode(ref.decode_sum(payloads, (t, e), layer=LAYER), layer=LAYER, source="sum")
        out = torch.empty_like(want)
        if name == "mxfp4":
            got = K.mx_reduce_encode(payloads, out, t=t, e=e, variant=variant)
        else:
            got = K.reduce_encode(payloads, out, t=t, e=e, group=ref.group, max_input=ref.max_input, variant=variant)
        assert torch.equal(got, want), diff(got, want)
    x = sweep.hard_values(torch, name, 64, e)  # 4 chunks of 16 rows: one per band
    want = torch.cat([ref.encode(x[16 * j:16 * (j + 1)], layer=LAYER, source=0) for j in range(4)])
    out = torch.empty_like(want)
    if name == "mxfp4":
        got = K.mx_encode_chunks(x, out, chunks=4, variant=variant)
    else:
        got = K.encode_chunks(x, out, chunks=4, group=ref.group, max_input=ref.max_input, variant=variant)
    assert torch.equal(got, want), diff(got, want)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ["int4-g32", "mxfp4"])
def test_codec_flags_with_each_variant(name, variant, monkeypatch):
    """The device flags through the codec (deferred "error" mode): a clean message reports
    nothing; a value past max_in on an otherwise fast tile raises out of range (int4: the fast
    path's per-group range flag); a NaN raises non-finite (the old path's flag)."""
    from lowbit_tp.codecs.base import NonFiniteError, OutOfRangeError

    monkeypatch.setattr(K, "ENCODE_VARIANT", variant)
    monkeypatch.setattr(K, "MX_ENCODE_VARIANT", variant)
    codec = make_codec(name, backend="triton")  # deferred error mode on the fused path
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(5))
    codec.encode(x, layer=LAYER, source=0)
    codec.check_nonfinite()
    if name != "mxfp4":
        y = x.clone()
        y[2, 9] = 4.6e5  # past 7 * 65504; |x / 65504| <= 7.25, so the tile stays fast
        codec.encode(y, layer=LAYER, source=0)
        with pytest.raises(OutOfRangeError):
            codec.check_nonfinite()
    y = x.clone()
    y[5, 17] = float("nan")
    codec.encode(y, layer=LAYER, source=0)
    with pytest.raises(NonFiniteError):
        codec.check_nonfinite()


def same_bits(a, b):
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def hard_carry(x):
    """A carry for sweep_group.hard_values ``x``: +0.0 on bands 0 and 2 (the ties and the subnormal
    scales stay what they are), small random values on band 1, NaN, Inf and a value that takes
    1e6 past the int4 range on band 3 (-1e6 on a 1e6 too: an exact zero)."""
    t, e = x.shape
    band = (torch.arange(t) // 16 % 4)[:, None]
    c = torch.where(band == 1, torch.randn(t, e, generator=torch.Generator().manual_seed(7)) * 0.1, 0.0)
    b3 = torch.arange(t)[(torch.arange(t) // 16) % 4 == 3]
    c[b3, 9] = float("nan")
    c[b3, 11] = float("-inf")
    c[b3, 13] = 4.6e5
    c[b3, e - 1] = -1.0e6
    return c


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("with_carry", [False, True])
def test_encode_feedback_bitwise_on_both_paths(name, variant, with_carry, slow_calls, monkeypatch):
    """Error feedback in one kernel (the encoder's FEEDBACK path) with each variant, on
    sweep_group's hard values (ties, fp16-subnormal scales, values past max_in, -0.0, NaN/Inf),
    with and without a carry (itself holding NaN/Inf): the payload and the next carry are
    bitwise the reference's general path (compensate, encode, decode, feedback_of), the fused
    kernel runs once, and the fast variants take both the fast path and the other."""
    from lowbit_tp.collectives.algorithms import gather_encode_feedback
    from lowbit_tp.collectives.feedback import Feedback

    monkeypatch.setattr(K, "ENCODE_VARIANT", variant)
    monkeypatch.setattr(K, "MX_ENCODE_VARIANT", variant)
    runs = []
    kernel = "mx_encode_feedback" if name == "mxfp4" else "encode_feedback"
    orig = getattr(K, kernel)
    monkeypatch.setattr(K, kernel, lambda *a, **k: runs.append(1) or orig(*a, **k))
    x = sweep_module().hard_values(torch, name, 64, 256)
    carry = hard_carry(x) if with_carry else None
    want = Feedback(carry=carry)
    w = gather_encode_feedback(reference(name), x, want, layer=LAYER, rank=0)
    tri = make_codec(name, nonfinite="propagate", backend="triton")
    got = Feedback(carry=carry)
    g = gather_encode_feedback(tri, x, got, layer=LAYER, rank=0)
    assert torch.equal(g, w), diff(g, w)
    assert same_bits(got.next, want.next), (got.next.view(torch.int32) != want.next.view(torch.int32)).nonzero()[:6]
    assert runs == [1]
    fam = "mx" if name == "mxfp4" else "int4"
    tiles = 64 * 256 // K.ENCODE_VARIANTS[variant][0]
    assert 0 < slow_calls[fam] <= tiles and (slow_calls[fam] < tiles or not K.ENCODE_VARIANTS[variant][1])


@pytest.mark.parametrize("name", ["int4-g32", "mxfp4"])
@pytest.mark.parametrize("tokens,hidden", [(16, 256), (5, 100)])  # full tiles (EVEN), ragged ones
def test_encode_feedback_flags(name, tokens, hidden):
    """The one-kernel feedback path records what the encode would: deferred "error" mode raises
    nothing for a clean message, out of range for a value past max_in (int4) and non-finite for a
    NaN in the carry; "flag" mode raises non-finite for an Inf in the partial and nothing for a value
    past max_in (saturated). The bytes and the next carry are the propagate-mode reference's."""
    from lowbit_tp.codecs.base import NonFiniteError, OutOfRangeError
    from lowbit_tp.collectives.algorithms import gather_encode_feedback
    from lowbit_tp.collectives.feedback import Feedback

    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=g)
    carry = torch.randn(tokens, hidden, generator=g) * 0.1
    ref = reference(name)
    for mode in ("error", "flag"):
        tri = make_codec(name, nonfinite=mode, backend="triton")
        cases = [("clean", x, carry, None)]
        if name != "mxfp4":
            big = x.clone()
            big[tokens - 1, hidden - 3] = 4.7e5
            cases.append(("range", big, carry, OutOfRangeError if mode == "error" else None))
        bad_carry = carry.clone()
        bad_carry[1, 2] = float("nan")
        cases.append(("nan carry", x, bad_carry, NonFiniteError))
        inf = x.clone()
        inf[0, hidden - 1] = float("inf")
        cases.append(("inf", inf, None, NonFiniteError))
        for what, xx, cc, raises in cases:
            want = Feedback(carry=cc)
            w = gather_encode_feedback(ref, xx, want, layer=LAYER, rank=1)
            got = tri.encode_feedback(xx, cc, layer=LAYER, source=1)
            assert got is not None and torch.equal(got[0], w) and same_bits(got[1], want.next), (mode, what)
            if raises is None:
                tri.check_nonfinite()
            else:
                with pytest.raises(raises) as info:
                    tri.check_nonfinite()
                assert type(info.value) is raises, (mode, what)
            tri.check_nonfinite()  # reset: nothing left


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_payload_at_an_odd_address(name, variant):
    """``out`` a view at an odd byte offset (a payload inside a larger buffer): the fast variants
    fall back to byte stores (their 16-bit stores need an even address), same bytes."""
    x = torch.randn(16, 256, generator=torch.Generator().manual_seed(11))
    ref = reference(name)
    want = ref.encode(x, layer=LAYER, source=0)
    buf = torch.zeros(want.numel() + 1, dtype=torch.uint8)
    out = buf[1:]
    assert out.data_ptr() % 2 == 1
    if name == "mxfp4":
        K.mx_encode(x, out, variant=variant)
    else:
        K.encode(x, out, group=ref.group, max_input=ref.max_input, variant=variant)
    assert torch.equal(out, want), diff(out, want)
    assert K._even_out(out, 1) is False and K._even_out(buf[2:], 1) is True


def test_defaults_are_fast_variants():
    """The launchers' defaults (picked from GPU run 2) are variants with the fast path."""
    assert K.ENCODE_VARIANTS[K.ENCODE_VARIANT][1] and K.ENCODE_VARIANTS[K.MX_ENCODE_VARIANT][1]


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="unknown encoder variant"):
        encode("int4-g32", torch.randn(2, 64), "fastest")


@pytest.mark.slow  # 13 s under the interpreter: the slow suite
def test_sweep_script_dry_run(tmp_path):
    """scripts/sweep_group.py end to end on CPU tensors: every variant's bytes equal the
    reference's on normal and hard data, for encode and reduce_encode."""
    import json

    sweep_module().main(["--device", "cpu", "--out", str(tmp_path), "--shapes", "4x64", "--codecs",
                         "int4-g32,mxfp4"])
    data = json.loads((tmp_path / "sweep_group.json").read_text())
    rows = data["rows"]
    assert {(r["codec"], r["variant"], r["op"]) for r in rows} == {
        (c, v, op) for c in ("int4-g32", "mxfp4") for v in VARIANTS for op in ("encode", "reduce_encode_w2")}
    assert all(r["bytes_equal"] is True and r.get("hard_bytes_equal", True) is True for r in rows), rows
    assert all(r["us"] > 0 for r in rows) and not data["info"]["skipped"]


@pytest.mark.parametrize("group", [2, 4, 8])
@pytest.mark.parametrize("variant", ["fast", "fast4k"])
def test_small_groups_bitwise(group, variant):
    """Groups of 2, 4 and 8 values (a group of 2 is one payload byte, nothing for the 16-bit
    stores to pair: the fast path once failed to compile there), bitwise the reference."""
    from lowbit_tp.codecs.dynamic import GroupInt4Codec

    ref = GroupInt4Codec(group=group, nonfinite="propagate", backend="reference")
    tri = GroupInt4Codec(group=group, nonfinite="propagate", backend="triton")
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(group)) * 3
    x[1, 5] = float("nan")
    prev = K.ENCODE_VARIANT
    K.ENCODE_VARIANT = variant
    try:
        got = tri.encode(x, layer="L", source=0)
    finally:
        K.ENCODE_VARIANT = prev
    assert torch.equal(got, ref.encode(x, layer="L", source=0))


@pytest.mark.parametrize("name", ["int4-g32", "mxfp4"])
@pytest.mark.parametrize("case, match", [
    ("reduce", r"encode \(N == 0\), not the reduce"),
    ("chunked", "the carry has no chunk offset"),
    ("carry_only", "CARRY needs FEEDBACK"),
])
def test_feedback_constexprs_that_would_drop_the_carry_do_not_compile(name, case, match, monkeypatch):
    """The encoders' CARRY/FEEDBACK only work for one message's encode: the reduce (N > 0) never
    reads the carry, a chunked launch has no offset for it, and a carry without FEEDBACK never
    writes next. Each is a tl.static_assert (a compile error, here the interpreter's), not a
    silently wrong next carry; the host launchers never ask for them (_feedback_consts)."""
    t, e = 4, 64
    x, c, nxt = torch.randn(t, e), torch.randn(t, e), torch.empty(t, e)
    consts = {"carry_ptr": c, "next_ptr": nxt, "CARRY": True, "FEEDBACK": case != "carry_only"}
    monkeypatch.setattr(K, "_feedback_consts", lambda feedback, chunks: consts)
    ref = reference(name)
    one = ref.encode(x, layer=LAYER, source=0)
    n_src, src, chunks = (2, [one, one], 1) if case == "reduce" else (0, [x], 2 if case == "chunked" else 1)
    rows = t // chunks
    out = torch.empty(one.numel(), dtype=torch.uint8)
    with pytest.raises(Exception, match=match):
        if name == "mxfp4":
            K._mx_launch(src, n_src, out, rows, e, None, chunks)
        else:
            K._launch_encode(src, n_src, out, rows, e, group=ref.group, max_input=ref.max_input, flag=None,
                             range_flag=None, chunks=chunks)


@pytest.mark.parametrize("name", ["int4-g32", "mxfp4"])
@pytest.mark.parametrize("hook", ["_decode", "_encode", None])
def test_encode_feedback_in_one_kernel_only_for_the_codec_it_was_written_for(name, hook, monkeypatch):
    """A subclass that changes encode or decode through the hooks they run through (``_encode``,
    ``_decode``: Codec.encode/decode stay the base's) must not get the fused kernels, which write
    the parent's bytes and decode them in registers (nor the MINUS decode, which bypasses
    ``_decode``): encode_feedback is None and the general path honours the subclass. A subclass
    that changes neither keeps the one-kernel path."""
    from lowbit_tp.collectives.algorithms import gather_encode_feedback
    from lowbit_tp.collectives.feedback import Feedback

    tri = make_codec(name, nonfinite="propagate", backend="triton")
    base = type(tri)
    body = {}
    if hook == "_decode":  # decodes to twice the values
        body["_decode"] = lambda self, payload, shape, params: base._decode(self, payload, shape, params) * 2
    elif hook == "_encode":  # encodes half the values
        body["_encode"] = lambda self, x, params, nonfinite, **kw: base._encode(self, x.float() * 0.5, params,
                                                                                 nonfinite, **kw)
    tri.__class__ = type("Sub", (base,), body)
    runs = []
    kernel = "mx_encode_feedback" if name == "mxfp4" else "encode_feedback"
    orig = getattr(K, kernel)
    monkeypatch.setattr(K, kernel, lambda *a, **k: runs.append(1) or orig(*a, **k))
    g = torch.Generator().manual_seed(5)
    x, carry = torch.randn(6, 64, generator=g), torch.randn(6, 64, generator=g) * 0.1
    got = tri.encode_feedback(x, carry, layer=LAYER, source=0)
    assert (got is None) == (hook is not None) and runs == ([] if hook else [1])
    fb = Feedback(carry=carry)
    payload = gather_encode_feedback(tri, x, fb, layer=LAYER, rank=0)
    sent = x + carry
    ref = reference(name)  # the eager codec, changed the same way by hand
    if hook == "_encode":
        want_payload = ref.encode(sent * 0.5, layer=LAYER, source=0)
        want_next = sent - ref.decode(want_payload, tuple(x.shape), layer=LAYER, source=0)
    else:
        want_payload = ref.encode(sent, layer=LAYER, source=0)
        dec = ref.decode(want_payload, tuple(x.shape), layer=LAYER, source=0)
        want_next = sent - (dec * 2 if hook == "_decode" else dec)
    assert torch.equal(payload, want_payload), diff(payload, want_payload)
    assert same_bits(fb.next, want_next)
