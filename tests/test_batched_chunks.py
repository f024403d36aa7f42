"""Two-shot's batched chunk launches (``Codec.encode_chunks`` / ``decode_chunks``) against the
eager reference, bitwise, under TRITON_INTERPRET=1 on CPU tensors.

The reference is ``backend="reference"`` called once per row chunk, as two-shot did before:
the batched encode's N payloads must be byte-identical to N reference encodes, and the
batched decode bitwise ``torch.cat`` of N reference decodes (NaN compared by position). Each
case also counts the Triton launches: one per batched call.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before lowbit_tp imports any kernel module

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (optional: the Triton kernels are skipped)")
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")

from lowbit_tp.calibration.synthetic import synthetic_calibration  # noqa: E402
from lowbit_tp.codecs import make_codec  # noqa: E402
from lowbit_tp.collectives import algorithms as A  # noqa: E402

LAYER = "L"
MODULES = ("triton_static", "triton_group", "triton_rotation")
HIDDEN = 104  # not a multiple of 64, 32 or 128 (bit-plane rot codes need E % 8 == 0 to encode fused)
# codec -> E: one or two per kernel family (the other static codecs share int4-outlier's and
# int8's kernels, the other rot-* codecs the rot ones). int4-outlier keeps k = 2 channels at
# E = 138, so its int4 body rows are even (the batched encoder's condition; k = 1 at 104).
FAMILIES = {"int4-outlier": 138, "int8": HIDDEN, "int4-g32": HIDDEN, "int4-g128": HIDDEN, "mxfp4": HIDDEN,
            "rot-lm4-g64-lg8-k4": HIDDEN, "rot-int6-g64-lg8-k4": HIDDEN}
# int4-g128 runs int4-g32's kernels with another group: under the `slow` marker (suite time)
CASES = [pytest.param(n, marks=pytest.mark.slow) if n == "int4-g128" else n for n in FAMILIES]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal fp32 bit patterns (so -0.0 != 0.0), NaN compared by position only."""
    a, b = a.reshape(-1), b.reshape(-1)
    na, nb = torch.isnan(a), torch.isnan(b)
    return torch.equal(na, nb) and torch.equal(a[~na].view(torch.int32), b[~nb].view(torch.int32))


_CALS = {}


def calibration(world: int, hidden: int = HIDDEN):
    if (world, hidden) not in _CALS:
        _CALS[world, hidden] = synthetic_calibration([LAYER], world=world, hidden=hidden, tokens=64, batches=1)
    return _CALS[world, hidden]


class _Counted:
    """A kernel whose launches are recorded (``log``: name, grid, kwargs); ``mutate`` may
    change the launch's keyword arguments (the mutation checks)."""

    def __init__(self, name, kernel, log, mutate):
        self.name, self.kernel, self.log, self.mutate = name, kernel, log, mutate

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kw):
            self.log.append((self.name, grid, kw))
            return launch(*args, **(self.mutate(kw) if self.mutate else kw))
        return run


def count_launches(monkeypatch, mutate=None) -> list:
    log = []
    for mod in MODULES:
        m = importlib.import_module(f"lowbit_tp.kernels.{mod}")
        for name in dir(m):
            if name.endswith("_kernel"):
                monkeypatch.setattr(m, name, _Counted(name, getattr(m, name), log, mutate))
    return log


def padded_partial(tokens: int, hidden: int, world: int, *, seed: int, special: bool) -> torch.Tensor:
    """A rank's partial padded with zero rows to ``world * chunk_rows``, as two-shot pads it."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g) * 3
    x[0] = 0.0  # an all-zero token
    if special:
        x[1, 3] = float("nan")
        x[2 % tokens, 0] = float("inf")
        x[tokens - 1, hidden - 1] = float("-inf")
        x[1, 8:16] = torch.tensor([7.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.5, -7.0])
    rows = A.chunk_rows(tokens, world)
    return torch.nn.functional.pad(x, (0, 0, 0, rows * world - tokens))


def codecs(name: str, world: int, mode: str = "propagate", hidden: int = HIDDEN):
    cal = calibration(world, hidden)
    return (make_codec(name, calibration=cal, nonfinite=mode, backend="reference"),
            make_codec(name, calibration=cal, nonfinite=mode, backend="triton"))


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_encode_chunks_is_n_reference_encodes_in_one_launch(name, world, monkeypatch):
    tokens = 2 * world + 1  # padding rows at every world size
    hidden = FAMILIES[name]
    ref, tri = codecs(name, world, hidden=hidden)
    x = padded_partial(tokens, hidden, world, seed=world, special=True)
    rows = x.shape[0] // world
    rank = world - 1
    want = torch.cat([ref.encode(c, layer=LAYER, source=rank) for c in x.split(rows)])
    log = count_launches(monkeypatch)
    got = tri.encode_chunks(x, world, layer=LAYER, source=rank)
    assert [entry[0] for entry in log] == [log[0][0]] and len(log[0][1]) == 3 and log[0][1][2] == world, log
    assert got.shape == want.shape and torch.equal(got, want), (got != want).nonzero().reshape(-1)[:6].tolist()


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_decode_chunks_is_the_cat_of_reference_decodes_in_one_launch(name, world, monkeypatch):
    tokens = 2 * world + 1
    hidden = FAMILIES[name]
    ref, tri = codecs(name, world, hidden=hidden)
    rows = A.chunk_rows(tokens, world)
    x = padded_partial(tokens, hidden, world, seed=10 + world, special=True)
    sums = [ref.encode(c, layer=LAYER, source="sum") for c in x.split(rows)]  # what the all-gather brings
    want = torch.cat([ref.decode(s, (rows, hidden), layer=LAYER, source="sum") for s in sums])
    flat = torch.cat(sums)
    log = count_launches(monkeypatch)
    got = tri.decode_chunks(flat, (rows, hidden), world, layer=LAYER, source="sum")
    assert len(log) == 1 and log[0][1][2] == world, log
    assert got.dtype == torch.float32 and got.shape == want.shape and same_bits(got, want)
    assert torch.isnan(got).any()  # the NaN/Inf rows really travelled


def as_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float()  # bf16/fp16 -> fp32 is exact, so fp32 bits compare the narrow bits


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])  # fp16: via decode_sum
@pytest.mark.parametrize("backend", ["triton", "cpu", "reference"])
def test_decode_chunks_into_out_is_the_reference_rows(name, world, dtype, backend, monkeypatch):
    """decode_chunks(out=) on every backend: ``out [n, E]`` gets the first n rows of the cat of
    reference decodes, rounded once to its dtype (``decode_chunks(...)[:n].to(dtype)``), for
    n = tokens (odd, the padding rows cut off: chunks whole, cut, or wholly padding) and n = all
    rows; nothing is written past ``out`` (a guard row after it in the same buffer). On Triton
    the whole chunks go in one batched launch straight into ``out``, the cut chunk in one more."""
    tokens = 2 * world + 1  # rows 3: world 2 cuts chunk 1, world 3 cuts chunk 2, world 4 has none cut
    hidden = FAMILIES[name]
    cal = calibration(world, hidden)
    ref = make_codec(name, calibration=cal, nonfinite="propagate", backend="reference")
    got_codec = make_codec(name, calibration=cal, nonfinite="propagate", backend=backend)
    rows = A.chunk_rows(tokens, world)
    x = padded_partial(tokens, hidden, world, seed=20 + world, special=True)
    sums = [ref.encode(c, layer=LAYER, source="sum") for c in x.split(rows)]
    want = torch.cat([ref.decode(s, (rows, hidden), layer=LAYER, source="sum") for s in sums])
    flat = torch.cat(sums)
    for n in (tokens, world * rows):
        buf = torch.full((n + 1, hidden), 1234.5, dtype=dtype)
        out = buf[:n]
        log = count_launches(monkeypatch)
        got = got_codec.decode_chunks(flat, (rows, hidden), world, layer=LAYER, source="sum", out=out)
        monkeypatch.undo()
        assert got is out
        assert same_bits(as_fp32(out), as_fp32(want[:n].to(dtype))), (name, world, n)
        assert torch.equal(buf[n], torch.full((hidden,), 1234.5, dtype=dtype)), "written past out"
        assert torch.isnan(as_fp32(out)).any()  # the NaN/Inf rows really travelled
        if backend == "triton" and dtype != torch.float16:
            whole, cut = divmod(n, rows)
            batched = [g for _, g, _ in log if len(g) == 3]
            assert len(log) == 1 + (cut > 0) and log[0][0] != "group_decode_sum_kernel", log
            if whole > 1 and name != "int8":  # (int8's batched decode of whole chunks: no chunk axis at 1)
                assert batched and batched[0][2] == whole, log


@pytest.mark.parametrize("name", ["int4-g32", "int4-outlier", "rot-lm4-g64-lg8-k4"])
def test_decode_chunks_out_checks(name):
    ref, tri = codecs(name, 3, hidden=FAMILIES[name])
    e = FAMILIES[name]
    flat = torch.zeros(3 * ref.payload_nbytes((2, e)), dtype=torch.uint8)
    for bad in (torch.empty(7, e), torch.empty(5, e + 1), torch.empty(5, e, dtype=torch.int32),
                torch.empty(e, 5).t(), torch.empty(5 * e)):
        for codec in (ref, tri):
            with pytest.raises(ValueError, match="decode_chunks out="):
                codec.decode_chunks(flat, (2, e), 3, layer=LAYER, source="sum", out=bad)
    assert ref.decode_chunks(flat, (2, e), 3, layer=LAYER, source="sum", out=torch.empty(0, e)).shape == (0, e)


@pytest.mark.parametrize("name,kernel,arg", [("int4-g32", "group_encode_kernel", "PS"),
                                             ("int4-g32", "group_encode_kernel", "XS"),
                                             ("int4-outlier", "static_encode_rows_kernel", "HS"),
                                             ("int8", "static_encode_win_kernel", "PS"),
                                             ("rot-lm4-g64-lg8-k4", "rot_encode_kernel", "PS")])
def test_a_wrong_chunk_base_is_caught(name, kernel, arg, monkeypatch):
    """Mutation check: the comparison above fails when a chunk's base is off."""
    world = 3
    ref, tri = codecs(name, world, hidden=FAMILIES[name])
    x = padded_partial(7, FAMILIES[name], world, seed=5, special=False)
    rows = x.shape[0] // world
    want = torch.cat([ref.encode(c, layer=LAYER, source=0) for c in x.split(rows)])
    log = count_launches(monkeypatch, mutate=lambda kw: {**kw, arg: kw[arg] - 2} if arg in kw else kw)
    got = tri.encode_chunks(x, world, layer=LAYER, source=0)
    assert log and log[0][0] == kernel
    assert not torch.equal(got, want)


def test_a_wrong_decode_base_is_caught(monkeypatch):
    world = 4
    ref, tri = codecs("mxfp4", world)
    x = padded_partial(9, HIDDEN, world, seed=6, special=False)
    rows = x.shape[0] // world
    flat = torch.cat([ref.encode(c, layer=LAYER, source="sum") for c in x.split(rows)])
    want = torch.cat([ref.decode(s, (rows, HIDDEN)) for s in flat.chunk(world)])
    count_launches(monkeypatch, mutate=lambda kw: {**kw, "OS": kw["OS"] - HIDDEN} if "OS" in kw else kw)
    assert not same_bits(tri.decode_chunks(flat, (rows, HIDDEN), world), want)


@pytest.mark.parametrize("name,hidden", [("int4-g32", 37), ("int4", 37), ("rot-int6-g64-lg8-k4", 100),
                                         ("int4-outlier", 136), ("rot-lm4-g64-lg8-k4", 136)])
def test_shapes_without_a_batched_kernel_fall_back_bitwise(name, hidden, monkeypatch):
    """Odd E (group codecs, an odd int4 body row), bit-plane codes with E % 8 != 0 and odd-sized
    payloads with a bf16 head (chunk j at an odd address) go chunk by chunk, with the same bytes."""
    world = 3
    cal = calibration(world, hidden)
    ref = make_codec(name, calibration=cal, nonfinite="propagate", backend="reference")
    tri = make_codec(name, calibration=cal, nonfinite="propagate", backend="triton")
    x = padded_partial(7, hidden, world, seed=7, special=True)
    rows = x.shape[0] // world
    want = torch.cat([ref.encode(c, layer=LAYER, source=1) for c in x.split(rows)])
    log = count_launches(monkeypatch)
    got = tri.encode_chunks(x, world, layer=LAYER, source=1)
    assert torch.equal(got, want)
    assert not any(len(g) == 3 for _, g, _ in log)  # no batched launch
    dec = tri.decode_chunks(want, (rows, hidden), world, layer=LAYER, source=1)
    assert same_bits(dec, torch.cat([ref.decode(p, (rows, hidden), layer=LAYER, source=1) for p in want.chunk(world)]))


def test_encode_chunks_checks_its_arguments():
    ref, tri = codecs("int4-g32", 2)
    x = torch.zeros(5, HIDDEN)
    with pytest.raises(ValueError, match="divisible"):
        tri.encode_chunks(x, 2)
    with pytest.raises(ValueError, match="out="):
        tri.encode_chunks(x[:4], 2, out=torch.empty(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="decode_chunks"):
        tri.decode_chunks(torch.zeros(7, dtype=torch.uint8), (2, HIDDEN), 2)
    with pytest.raises(ValueError, match="divisible"):  # True was taken as one chunk
        tri.encode_chunks(x[:4], True)
    nb = tri.payload_nbytes((4, HIDDEN))
    with pytest.raises(ValueError, match="decode_chunks"):
        tri.decode_chunks(torch.zeros(nb, dtype=torch.uint8), (4, HIDDEN), True)


# ---------------------------------------------------------------- two-shot over real gloo ranks
GLOO_TOKENS = 7  # padding rows at world 3


def _gloo_partials(world: int, hidden: int, feedback: bool):
    g = torch.Generator().manual_seed(hidden + feedback)
    xs = [torch.randn(GLOO_TOKENS, hidden, generator=g) * 3 for _ in range(world)]
    carries = [torch.randn(GLOO_TOKENS, hidden, generator=g) * 0.1 for _ in range(world)] if feedback else None
    return xs, carries


def _rank_two_shot(rank, world, names):
    """On each rank: two-shot all-reduce with the Triton backend (plain and with error feedback),
    with every kernel launch recorded."""
    from lowbit_tp.collectives import all_reduce
    from lowbit_tp.collectives.feedback import Feedback

    log = []
    for mod in MODULES:
        m = importlib.import_module(f"lowbit_tp.kernels.{mod}")
        for name in dir(m):
            if name.endswith("_kernel"):
                setattr(m, name, _Counted(name, getattr(m, name), log, None))
    out = {}
    for name in names:
        hidden = FAMILIES[name]
        codec = make_codec(name, calibration=calibration(world, hidden), nonfinite="propagate", backend="triton")
        for fb in (False, True):
            xs, carries = _gloo_partials(world, hidden, fb)
            feedback = Feedback(carry=carries[rank]) if fb else None
            del log[:]
            y = all_reduce(xs[rank], codec, algorithm="two-shot", layer=LAYER, feedback=feedback)
            out[name, fb] = (y, None if feedback is None else feedback.next, [(n, len(g)) for n, g, _ in log])
        # decoded straight into the result: a bf16 one (rounded by the kernel), and the partial in place
        xs, _ = _gloo_partials(world, hidden, False)
        del log[:]
        y = all_reduce(xs[rank].to(torch.bfloat16), codec, algorithm="two-shot", layer=LAYER)
        out[name, "bf16"] = (y, [(n, len(g)) for n, g, _ in log])
        p = xs[rank].clone()
        out[name, "in place"] = (all_reduce(p, codec, algorithm="two-shot", layer=LAYER, out=p), p)
    return out


@pytest.mark.parametrize("names", [("int4-g32", "int4-outlier"),
                                   pytest.param(("mxfp4", "rot-lm4-g64-lg8-k4"), marks=pytest.mark.slow)])
def test_two_shot_over_gloo_with_batched_launches_is_bitwise_the_reference(names):
    """Real gloo ranks, Triton backend: the all-reduce (and error feedback's next carry) equal
    the single-process reference run chunk by chunk on the eager backend; plain two-shot makes
    3 launches per rank (one batched encode, the fused reduce-and-re-encode, one batched
    decode), where it used to make 2N + 1 and decode on the eager path; 4 where the codec's
    owner stage is split (decode-and-sum, then encode: the static and rot-* default since stop 26)."""
    from lowbit_tp.collectives import simulate_all_reduce, spawn_ranks
    from lowbit_tp.collectives.feedback import Feedback

    from lowbit_tp.kernels import triton_rotation, triton_static

    def owner(name):  # launches of the owner stage
        K = triton_rotation if name.startswith("rot-") else triton_static
        return 2 if name.startswith(("rot-", "int4-outlier", "int8")) and K.REDUCE_VARIANT == "split" else 1

    world = 3
    ranks = spawn_ranks(_rank_two_shot, world, names, timeout_s=120)
    for name in names:
        hidden = FAMILIES[name]
        ref = make_codec(name, calibration=calibration(world, hidden), nonfinite="propagate", backend="reference")
        for fb in (False, True):
            xs, carries = _gloo_partials(world, hidden, fb)
            fbs = [Feedback(carry=c) for c in carries] if fb else None
            want = simulate_all_reduce(xs, ref, "two-shot", layer=LAYER, feedback=fbs)
            for r in range(world):
                y, nxt, launches = ranks[r][name, fb]
                assert same_bits(y, want), (name, fb, r)
                if fb:
                    assert same_bits(nxt, fbs[r].next), (name, r)
                else:
                    assert [g for _, g in launches] == [3, *[2] * owner(name), 3], (name, launches)
        xs, _ = _gloo_partials(world, hidden, False)
        want = simulate_all_reduce(xs, ref, "two-shot", layer=LAYER)  # fp32: its own decode buffer, cast below
        # the bf16 partials' values in fp32 (they encode the same): the fp32 result cast once
        want16 = simulate_all_reduce([x.to(torch.bfloat16).float() for x in xs], ref, "two-shot", layer=LAYER)
        for r in range(world):
            y, launches = ranks[r][name, "bf16"]
            assert y.dtype == torch.bfloat16 and same_bits(y.float(), want16.to(torch.bfloat16).float()), (name, r)
            # the batched decode of the 2 whole chunks into the result, one decode of the cut chunk's row
            assert [g for _, g in launches] == [3, *[2] * owner(name), 3, 2], (name, launches)
            y, p = ranks[r][name, "in place"]
            assert y.data_ptr() == p.data_ptr() and same_bits(y, want), (name, r)
