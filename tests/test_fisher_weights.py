"""Fisher channel weights: the pure formula, the artifact field, the ``NAME+fisher`` codecs and
the Fisher pass. References are written here from the definitions (docs/design-dev.md), not
taken from the code under test."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit_tp.calibration import Calibration, CalibrationError
from lowbit_tp.calibration.synthetic import planted_partials, synthetic_calibration
from lowbit_tp.calibration.weights import fisher_channel_weights
from lowbit_tp.codecs import NonFiniteError, make_codec
from lowbit_tp.collectives import simulate_all_reduce

LAYERS = ["a.o_proj", "a.down_proj"]
E = 128


def _weights(seed=0, e=E, layers=LAYERS):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.exp(torch.randn(e, generator=g)) for n in layers}


@pytest.fixture
def cal():
    return synthetic_calibration(LAYERS, world=3, hidden=E, tokens=32, batches=2)


@pytest.fixture
def wcal(cal):
    return cal.with_channel_weights(_weights(), {"method": "test"})


# ------------------------------------------------------------------ the formula
def test_formula_by_hand():
    # F/m = 16, 1, 1, 4 -> w = (F/m)**(1/4) = 2, 1, 1, sqrt 2 -> w**2 = 4, 1, 1, 2 (mean 2) -> 2, .5, .5, 1
    w = fisher_channel_weights(torch.tensor([16.0, 1, 4, 4]), torch.tensor([1.0, 1, 4, 1]))
    assert w.dtype == torch.float32
    assert torch.allclose(w.double() ** 2, torch.tensor([2.0, 0.5, 0.5, 1.0], dtype=torch.float64), atol=1e-6)
    # rows are normalised on their own: row 0 (m = 1): w = 2, 1, sqrt 2, sqrt 2 -> w**2 = 4, 1, 2, 2 over 9/4
    two = fisher_channel_weights(torch.tensor([[16.0, 1, 4, 4], [5.0, 5, 5, 5]]), torch.ones(2, 4))
    assert torch.allclose(two[0].double() ** 2, torch.tensor([16, 4, 8, 8], dtype=torch.float64) / 9, atol=1e-6)
    assert torch.allclose(two[1], torch.ones(4))


def test_formula_minimises_the_predicted_error():
    """(sum w**2 m)(sum F / w**2), the predicted weighted error after the rotation: no random
    perturbation of the weights does better (Cauchy-Schwarz)."""
    g = torch.Generator().manual_seed(3)
    f = torch.rand(64, generator=g).double() ** 4
    m = torch.rand(64, generator=g).double() * 10
    obj = lambda w: float((w ** 2 * m).sum() * (f / w ** 2).sum())  # noqa: E731
    w = fisher_channel_weights(f.float(), m.float()).double()
    best = obj(w)
    assert best < obj(torch.ones(64, dtype=torch.float64))
    for _ in range(200):
        assert obj(w * torch.exp(0.1 * torch.randn(64, generator=g, dtype=torch.float64))) >= best * (1 - 1e-6)


@pytest.mark.parametrize("bad", ["nan", "negative", "shape"])
def test_formula_refuses_bad_input(bad):
    f, m = torch.ones(4), torch.ones(4)
    if bad == "nan":
        f[1] = float("nan")
    elif bad == "negative":
        m[2] = -1
    else:
        m = torch.ones(5)
    with pytest.raises(ValueError):
        fisher_channel_weights(f, m)


# ------------------------------------------------------------------ the artifact
def test_artifact_round_trip_and_old_artifacts(tmp_path, cal, wcal):
    back = Calibration.load(wcal.save(tmp_path / "w.safetensors"))
    assert set(back.channel_weights) == set(LAYERS)
    for n, w in _weights().items():
        assert torch.equal(back.channel_weights[n], w)
    assert back.meta["channel_weights"] == {"method": "test"}
    assert back.fingerprint() != Calibration.load(cal.save(tmp_path / "c.safetensors")).fingerprint()
    old = Calibration.load(tmp_path / "c.safetensors")  # an artifact without weights loads as before
    assert old.channel_weights == {} and "channel_weights" not in old.meta
    assert make_codec("rot-lm4-g64-lg8-k4", calibration=old).encode(torch.ones(2, E), layer=LAYERS[0]).numel() > 0


def _crafted(tmp_path, wcal, craft):
    from safetensors.torch import load_file

    from test_calibration_artifact import _rewrite

    path = wcal.save(tmp_path / "w.safetensors")
    tensors, meta = load_file(str(path)), json.loads(json.dumps(wcal.meta))
    key = f"{LAYERS[0]}|all|channel_weight"
    if craft == "nan":
        tensors[key][3] = float("nan")
    elif craft == "zero":
        tensors[key][0] = 0.0
    elif craft == "negative":
        tensors[key][5] = -1.0
    elif craft == "shape":
        tensors[key] = torch.ones(E - 1)
    elif craft == "dtype":
        tensors[key] = torch.ones(E, dtype=torch.float64)
    elif craft == "missing_layer":
        del tensors[key]
    elif craft == "unlisted_layer":
        tensors["zz|all|channel_weight"] = torch.ones(E)
    elif craft == "no_header":
        del meta["channel_weights"]
    elif craft == "header_only":
        for n in LAYERS:
            del tensors[f"{n}|all|channel_weight"]
    elif craft == "header_list":
        meta["channel_weights"] = ["fisher"]
    elif craft == "bad_source":
        tensors[f"{LAYERS[0]}|all|absmax"] = torch.ones(E)
    _rewrite(path, meta, tensors)
    return path


@pytest.mark.parametrize("craft", ["nan", "zero", "negative", "shape", "dtype", "missing_layer", "unlisted_layer",
                                   "no_header", "header_only", "header_list", "bad_source"])
def test_invalid_weights_are_calibration_errors(tmp_path, wcal, craft):
    path = _crafted(tmp_path, wcal, craft)
    with pytest.raises(CalibrationError) as err:
        Calibration.load(path)
    assert "\n" not in str(err.value)


def test_with_channel_weights_checks_like_load(cal):
    with pytest.raises(CalibrationError, match="positive and finite"):
        cal.with_channel_weights({n: torch.zeros(E) for n in LAYERS}, {"method": "test"})
    with pytest.raises(CalibrationError, match="exactly the listed layers"):
        cal.with_channel_weights({LAYERS[0]: torch.ones(E)}, {"method": "test"})


# ------------------------------------------------------------------ the codecs
def test_a_calibration_without_weights_is_one_clear_error(cal):
    with pytest.raises(CalibrationError) as err:
        make_codec("rot-lm4-g64-lg8-k4+fisher", calibration=cal)
    assert "\n" not in str(err.value) and "--fisher-weights" in str(err.value)


def test_only_rotated_codecs_take_weights(wcal):
    with pytest.raises(ValueError, match="rot-"):
        make_codec("int4-outlier+fisher", calibration=wcal)
    with pytest.raises(ValueError, match="rot-"):
        make_codec("rot-lm4-g64-lg8-k4+fisher+fisher", calibration=wcal)
    with pytest.raises(KeyError):
        make_codec("nope+fisher", calibration=wcal)


def test_default_and_alloc_take_weights(wcal):
    from lowbit_tp.codecs import codec_spec

    wcal.meta["bit_allocation"] = {"budget": 4.75, "layers": {LAYERS[0]: "rot-lm4-g64-lg8-k4",
                                                                LAYERS[1]: "rot-int6-g64-lg8-k4"}}
    parts = planted_partials(3, 5, E)
    for name in ("default+fisher", "alloc+fisher"):
        c = make_codec(name, calibration=wcal)
        assert codec_spec(name).needs_allocation and c.name == name
        inner = make_codec(name.removesuffix("+fisher"), calibration=wcal)
        for layer in LAYERS:
            assert c.payload_nbytes((5, E), layer) == inner.payload_nbytes((5, E), layer)
            w = wcal.channel_weights[layer]
            got = simulate_all_reduce(parts, c, "gather", layer=layer)
            want = simulate_all_reduce([p * w for p in parts], inner, "gather", layer=layer) / w
            assert torch.equal(got, want)


def _np_bf16(a):
    """fp32 -> bf16 -> fp32 with round-to-nearest-even, in numpy (independent of torch's cast)."""
    u = a.astype(np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16
    return u.astype(np.uint32).view(np.float32)


@pytest.mark.parametrize("backend", ["reference", "auto"])  # auto: the CPU kernels where they built
@pytest.mark.parametrize("tokens,dtype", [(1, torch.float32), (7, torch.bfloat16), (33, torch.float16)])
def test_payloads_and_sums_against_numpy(wcal, backend, tokens, dtype):
    """Payload = the unweighted codec's payload of ``x * w`` (product in numpy fp32); the
    decoded sum = the fp32 sum of the unweighted decodes in rank order, divided by ``w``
    (numpy), and its bf16 rounding."""
    inner = make_codec("rot-lm4-g64-lg8-k4", calibration=wcal, backend="reference")
    c = make_codec("rot-lm4-g64-lg8-k4+fisher", calibration=wcal, backend=backend)
    layer = LAYERS[1]
    w = wcal.channel_weights[layer].numpy()
    parts = [p.to(dtype) for p in planted_partials(3, tokens, E, seed=tokens)]
    payloads = []
    for r, x in enumerate(parts):
        xw = torch.from_numpy(x.float().numpy() * w)
        want = inner.encode(xw, layer=layer, source=r)
        got = c.encode(x, layer=layer, source=r)
        assert got.numpy().tobytes() == want.numpy().tobytes()
        payloads.append(got)
    decoded = [inner.decode(p, (tokens, E), layer=layer, source=r).numpy() for r, p in enumerate(payloads)]
    acc = decoded[0].copy()
    for d in decoded[1:]:
        acc = (acc + d).astype(np.float32)
    want_sum = (acc / w).astype(np.float32)
    got_sum = c.decode_sum(payloads, (tokens, E), layer=layer)
    assert np.array_equal(got_sum.numpy(), want_sum)
    out = torch.empty(tokens, E, dtype=torch.bfloat16)
    c.decode_sum(payloads, (tokens, E), layer=layer, out=out)
    assert np.array_equal(out.float().numpy(), _np_bf16(want_sum))
    out32 = torch.empty(tokens, E)
    assert c.decode_sum(payloads, (tokens, E), layer=layer, out=out32) is out32 and np.array_equal(out32.numpy(), want_sum)
    one = c.decode(payloads[2], (tokens, E), layer=layer, source=2)
    assert np.array_equal(one.numpy(), (decoded[2] / w).astype(np.float32))


def test_ecsq_takes_weights_against_numpy(wcal):
    """The research ECSQ codecs are rotated codecs too: the payload is the unweighted codec's
    payload of ``x * w`` (numpy product), the sum the fp32 sum of its decodes divided by ``w``."""
    inner = make_codec("rot-ecsq4.25-k4", calibration=wcal)
    c = make_codec("rot-ecsq4.25-k4+fisher", calibration=wcal)
    layer = LAYERS[0]
    w = wcal.channel_weights[layer].numpy()
    parts = planted_partials(3, 6, E, seed=3)
    payloads = [c.encode(x, layer=layer, source=r) for r, x in enumerate(parts)]
    for r, (x, got) in enumerate(zip(parts, payloads)):
        want = inner.encode(torch.from_numpy(x.float().numpy() * w), layer=layer, source=r)
        assert got.numpy().tobytes() == want.numpy().tobytes()
    acc = inner.decode(payloads[0], (6, E), layer=layer, source=0).numpy().copy()
    for r, p in enumerate(payloads[1:], 1):
        acc = (acc + inner.decode(p, (6, E), layer=layer, source=r).numpy()).astype(np.float32)
    assert np.array_equal(c.decode_sum(payloads, (6, E), layer=layer).numpy(), (acc / w).astype(np.float32))


def test_literal_bytes_through_the_weights():
    """The literal case of test_wire_format (rot-lm4-g64-lg8-k4, E = 64): sending ``x / w``
    with power-of-two weights must give exactly that test's bytes, and decode to its values / w."""
    from test_wire_format import lm4_literal_case

    cal, x, expected, want = lm4_literal_case()
    e = x.shape[1]
    w = 2.0 ** (torch.arange(e) % 5 - 2).float()
    cal = cal.with_channel_weights({"L": w}, {"method": "test"})
    c = make_codec("rot-lm4-g64-lg8-k4+fisher", calibration=cal)
    payload = c.encode(x / w, layer="L", source=0)
    assert payload.tolist() == expected
    got = c.decode_sum([payload], (1, e), layer="L")
    assert torch.allclose(got[0].double(), want / w.double(), rtol=0, atol=1e-5)


def test_unit_weights_are_the_plain_codec(cal):
    """F ∝ m gives w = 1: then the bytes and sums are the unweighted codec's exactly."""
    ones = cal.with_channel_weights({n: fisher_channel_weights(torch.full((E,), 3.0), torch.full((E,), 3.0))
                                     for n in LAYERS}, {"method": "test"})
    parts = planted_partials(3, 9, E)
    for algo in ("gather", "two-shot"):
        a = simulate_all_reduce(parts, make_codec("rot-lm3-g64-lg8-k4+fisher", calibration=ones), algo, layer=LAYERS[0])
        b = simulate_all_reduce(parts, make_codec("rot-lm3-g64-lg8-k4", calibration=ones), algo, layer=LAYERS[0])
        assert torch.equal(a, b)


def test_two_shot_stays_in_the_weighted_domain(wcal):
    """Two-shot of the weighted codec = two-shot of the plain codec on the weighted partials,
    divided by w once at the end."""
    parts = planted_partials(3, 12, E)
    w = wcal.channel_weights[LAYERS[0]]
    got = simulate_all_reduce(parts, make_codec("rot-lm4-g64-lg8-k4+fisher", calibration=wcal), "two-shot",
                              layer=LAYERS[0])
    want = simulate_all_reduce([p * w for p in parts], make_codec("rot-lm4-g64-lg8-k4", calibration=wcal),
                               "two-shot", layer=LAYERS[0]) / w
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_chunks_into_out_divides_like_decode(wcal, dtype):
    """decode_chunks(out=) of a weighted codec (two-shot's decode into the result): the first n
    rows of the per-chunk decodes (inner decode / w), cast once; padding rows not written."""
    codec = make_codec("rot-lm4-g64-lg8-k4+fisher", calibration=wcal)
    rows, world, n = 4, 3, 11  # the last chunk cut after 3 rows
    g = torch.Generator().manual_seed(3)
    x = torch.randn(rows * world, E, generator=g)
    flat = torch.cat([codec.encode(c, layer=LAYERS[0], source="sum") for c in x.split(rows)])
    want = torch.cat([codec.decode(p, (rows, E), layer=LAYERS[0], source="sum") for p in flat.chunk(world)])
    buf = torch.full((n + 1, E), 5.0, dtype=dtype)
    got = codec.decode_chunks(flat, (rows, E), world, layer=LAYERS[0], source="sum", out=buf[:n])
    assert got.data_ptr() == buf.data_ptr() and torch.equal(buf[:n], want[:n].to(dtype))
    assert torch.equal(buf[n], torch.full((E,), 5.0, dtype=dtype))
    parts = [p.to(torch.bfloat16) for p in planted_partials(3, 7, E)]  # two-shot into a bf16 result
    got = simulate_all_reduce(parts, codec, "two-shot", layer=LAYERS[0])
    assert got.dtype == torch.bfloat16 and torch.equal(
        got, simulate_all_reduce([p.float() for p in parts], codec, "two-shot", layer=LAYERS[0]).to(torch.bfloat16))


def test_weights_move_error_to_where_the_fisher_is_small(cal):
    """With F large on a quarter of the channels, the Fisher-weighted squared error of the
    all-reduce drops, and the error on those channels drops, at the same bytes."""
    g = torch.Generator().manual_seed(5)
    fisher = torch.full((E,), 0.01)
    fisher[torch.randperm(E, generator=g)[: E // 4]] = 1.0
    parts = planted_partials(3, 64, E, seed=1)
    ms = torch.stack([p.pow(2).mean(0) for p in parts]).sum(0)
    wc = cal.with_channel_weights({n: fisher_channel_weights(fisher, ms) for n in LAYERS}, {"method": "test"})
    total = torch.stack(parts).sum(0)
    plain = simulate_all_reduce(parts, make_codec("rot-lm4-g64-lg8-k4", calibration=wc), "gather", layer=LAYERS[0])
    fw = simulate_all_reduce(parts, make_codec("rot-lm4-g64-lg8-k4+fisher", calibration=wc), "gather",
                             layer=LAYERS[0])
    weighted = lambda y: float(((y - total) ** 2 * fisher).sum())  # noqa: E731
    assert weighted(fw) < 0.7 * weighted(plain)


def test_nonfinite_modes(wcal):
    x = planted_partials(1, 4, E)[0]
    x[2, 7] = float("nan")
    with pytest.raises(NonFiniteError, match="a.o_proj"):
        make_codec("rot-lm4-g64-lg8-k4+fisher", calibration=wcal).encode(x, layer=LAYERS[0], source=0)
    c = make_codec("rot-lm4-g64-lg8-k4+fisher", calibration=wcal, nonfinite="propagate")
    y = c.decode_sum([c.encode(x, layer=LAYERS[0], source=0)], (4, E), layer=LAYERS[0])
    assert bool(torch.isnan(y[2]).any()) and bool(torch.isfinite(y[[0, 1, 3]]).all())


# ------------------------------------------------------------------ the Fisher pass
@pytest.fixture(scope="module")
def tiny():
    from helpers import tiny_model

    from lowbit_tp.simulator import TPSimulator

    model = tiny_model("llama")
    model.requires_grad_(False)
    with TPSimulator(model, tp=2) as sim:
        layers = list(sim.layer_names)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # hundreds of tiny passes: threads only contend on a shared machine
    yield model, layers
    torch.set_num_threads(threads)


def test_diagonal_fisher_matches_the_exact_expectation(tiny):
    """One-token windows: F_j = sum_y p(y) (d log p(y) / d h_j)**2 exactly, by a full Jacobian of
    log p over the vocabulary with respect to a perturbation added at the layer's output
    (another mechanism than the pass's retained gradients); the pass's 400 sampled draws
    must agree within Monte Carlo error."""
    from lowbit_tp.calibration.fisher import diagonal_fisher

    model, layers = tiny
    ids = torch.tensor([[0], [65]])
    layer = layers[1]
    mod = dict(model.named_modules())[layer]

    def exact(row):
        def logp(delta):
            h = mod.register_forward_hook(lambda m, i, o: o + delta)
            try:
                return torch.log_softmax(model(ids[row:row + 1]).logits[0, -1].double(), -1)
            finally:
                h.remove()
        zero = torch.zeros(model.config.hidden_size)
        jac = torch.autograd.functional.jacobian(logp, zero)  # [V, E]
        return (logp(zero).exp()[:, None] * jac ** 2).sum(0)

    want = torch.stack([exact(0), exact(1)])
    got = diagonal_fisher(model, ids, layers=[layer], draws=400, seed=1, per_token=True)[layer].double()
    assert got.shape == want.shape
    for r in range(2):
        assert abs(float(got[r].sum() / want[r].sum()) - 1) < 0.15
        assert float(torch.corrcoef(torch.stack([got[r], want[r]]))[0, 1]) > 0.9
    mean = diagonal_fisher(model, ids, layers=[layer], draws=50, seed=1)[layer].double()
    few = diagonal_fisher(model, ids, layers=[layer], draws=50, seed=1, per_token=True)[layer].double()
    assert torch.allclose(mean, few.mean(0), rtol=1e-5, atol=0)
    assert not any(p.grad is not None for p in model.parameters())


def test_partial_mean_squares_at_tp1_are_the_layer_outputs(tiny):
    from lowbit_tp.calibration.fisher import partial_mean_squares

    model, layers = tiny
    ids = torch.randint(2, 200, (3, 9), generator=torch.Generator().manual_seed(0))
    seen = {}
    mods = dict(model.named_modules())
    hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o.detach().reshape(-1, o.shape[-1])))
             for n in layers]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    got = partial_mean_squares(model, ids, tp=1, batch_size=2)
    two = partial_mean_squares(model, ids, tp=2)
    for n in layers:
        assert got[n].shape == (1, 64) and two[n].shape == (2, 64)
        assert torch.allclose(got[n][0], seen[n].pow(2).mean(0), rtol=1e-4, atol=1e-7)


def test_calibrate_and_from_give_the_same_weights_and_the_codec_runs(tmp_path, tiny):
    """``calibrate`` with the Fisher pass and ``--from`` on the same calibration without it agree
    bitwise (same calibration windows, same draws); the weights survive save/load; the
    evaluation on the dev split runs the weighted default codec."""
    from helpers import save_tiny

    from lowbit_tp.calibration.pipeline import calibrate, fisher_from
    from lowbit_tp.configs import CalibrationConfig
    from lowbit_tp.evaluation import EvalConfig, evaluate_codecs
    from lowbit_tp.models import load_model

    path = save_tiny(tmp_path, "llama")
    bundle = load_model(path, progress=False)
    text = tmp_path / "text"  # a small corpus: tokenizing Shakespeare bytewise would take most of the time
    text.mkdir()
    g = torch.Generator().manual_seed(0)
    words = ["the", "king", "said", "and", "then", "went", "home", "to", "sleep", "while", "rain", "fell"]
    for i in range(6):
        (text / f"doc{i}.txt").write_text(" ".join(words[j] for j in torch.randint(0, 12, (600,), generator=g)))
    cfg = CalibrationConfig(model=path, tp=2, samples=4, seq_len=32, batch_size=4, allocate=6.0, fisher_draws=2,
                            fisher_windows=2, text=str(text))
    with_fw = calibrate(cfg, bundle=bundle, progress=False)
    plain = calibrate(CalibrationConfig(**{**cfg.__dict__, "fisher_draws": 0}), bundle=bundle, progress=False)
    assert plain.channel_weights == {}
    saved = plain.save(tmp_path / "plain.safetensors")
    added = fisher_from(cfg, str(saved), bundle=bundle)
    back = Calibration.load(added.save(tmp_path / "fw.safetensors"))
    assert set(back.channel_weights) == set(with_fw.layers)
    for n, w in with_fw.channel_weights.items():
        assert torch.equal(back.channel_weights[n], w)
        assert not torch.equal(w, torch.ones_like(w))
    fw = back.meta["channel_weights"]
    assert fw["draws"] == 2 and fw["windows"] == 2 and fw["samples"] == plain.meta["text"]["chunks"]["samples"][:2]
    assert back.meta["bit_allocation"] == plain.meta["bit_allocation"]
    res = evaluate_codecs(EvalConfig(model=path, tp=2, codecs=("default", "default+fisher"), samples=2, seq_len=32,
                                     lambada=0, split="dev", text=str(text)), bundle=bundle, calibration=back)
    rows = {r.codec: r for r in res.rows}
    assert rows["default"].bits_per_value == rows["default+fisher"].bits_per_value
    assert rows["default"].kl != rows["default+fisher"].kl


def test_cli_errors_for_from_are_one_line(tmp_path, wcal, capsys):
    from lowbit_tp.cli import main

    src = wcal.save(tmp_path / "w.safetensors")
    for argv, msg in ((["--from", str(src), "--out", str(tmp_path / "o.safetensors")], "--fisher-weights"),
                      (["--from", str(src), "--fisher-weights", "2", "--out", str(src)], "must differ")):
        assert main(["calibrate", "--model", "smollm2-135m", "--tp", "3", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_error_feedback_through_weights_matches_the_reference(wcal, backend):
    """gather_encode_feedback with a +fisher codec: the payload of the weighted sent values and
    next = sent - decode (decode unweights), bitwise the reference's; the inner codec's own
    one-pass feedback (on the CPU kernels) must not see the unweighted values."""
    from lowbit_tp.collectives.algorithms import gather_encode_feedback
    from lowbit_tp.collectives.feedback import Feedback

    ref = make_codec("rot-lm4-g64-lg8-k4+fisher", calibration=wcal, backend="reference")
    got = make_codec("rot-lm4-g64-lg8-k4+fisher", calibration=wcal, backend=backend)
    g = torch.Generator().manual_seed(3)
    x, carry = torch.randn(5, E, generator=g) * 2, torch.randn(5, E, generator=g) * 0.1
    want, fb = Feedback(carry=carry), Feedback(carry=carry)
    w = gather_encode_feedback(ref, x, want, layer=LAYERS[0], rank=1)
    assert torch.equal(gather_encode_feedback(got, x, fb, layer=LAYERS[0], rank=1), w)
    assert torch.equal(fb.next.view(torch.int32), want.next.view(torch.int32))


def test_weights_diff_script_against_numpy(wcal, tmp_path):
    """scripts/fisher_weights_diff.py: per-layer log correlation and median |log ratio| against
    numpy on weights with a known change (one layer scaled by 1.5 except one channel, one layer
    re-drawn), and a calibration without weights is one clear error."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fwd", Path(__file__).resolve().parents[1] / "scripts" /
                                                  "fisher_weights_diff.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    other = {LAYERS[0]: wcal.channel_weights[LAYERS[0]] * 1.5, LAYERS[1]: _weights(seed=7)[LAYERS[1]]}
    other[LAYERS[0]][3] = wcal.channel_weights[LAYERS[0]][3]
    b = wcal.with_channel_weights(other, {"method": "test"})
    a_path, b_path, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "d.json"
    wcal.save(a_path), b.save(b_path)
    assert mod.main([str(a_path), str(b_path), "--json", str(out)]) == 0
    got = json.loads(out.read_text())["layers"]
    for layer in LAYERS:
        x = np.log(wcal.channel_weights[layer].double().numpy())
        y = np.log(b.channel_weights[layer].double().numpy())
        assert got[layer]["log_corr"] == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-9)
        assert got[layer]["median_abs_log_ratio"] == pytest.approx(np.median(np.abs(x - y)), rel=1e-6)
    assert got[LAYERS[0]]["median_abs_log_ratio"] == pytest.approx(np.log(1.5), rel=1e-6)
    assert got[LAYERS[1]]["log_corr"] < 0.5
    bare = synthetic_calibration(LAYERS, world=2, hidden=E)
    bare.save(tmp_path / "bare.safetensors")
    with pytest.raises(SystemExit, match="need Fisher channel weights"):
        mod.main([str(a_path), str(tmp_path / "bare.safetensors")])
