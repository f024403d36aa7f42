"""The multi-codec bit allocation: budget kept, and the plan matches an exhaustive search."""
import functools
import itertools
import math

import pytest
import torch

from lowbit_tp.calibration.allocate import allocate_many
from lowbit_tp.calibration.synthetic import synthetic_calibration

CODECS = ("rot-lm3-g64-lg8-k4", "rot-lm4-g64-lg8-k4", "rot-int5-g64-lg8-k4", "rot-int6-g64-lg8-k4")


@functools.lru_cache(maxsize=None)
def _cal(layers: tuple[str, ...]):
    """A synthetic calibration at E = 576 (it only sets the codecs' payload sizes here), built
    once per layer list instead of once per budget."""
    return synthetic_calibration(list(layers), world=2, hidden=576)


def _bits(e):
    # independent: 4 bf16 channels, b-bit codes, one lg8 byte per 64 values + a bf16 base per token
    return {c: b + (4 * 16 + 8 * math.ceil(e / 64) + 16) / e for c, b in zip(CODECS, (3, 4, 5, 6))}


@pytest.mark.parametrize("budget", [3.3, 4.0, 4.25, 4.6, 5.5])
def test_allocate_many_matches_brute_force(budget):
    layers = [f"l{i}" for i in range(5)]
    cal = _cal(tuple(layers))
    g = torch.Generator().manual_seed(1)
    sens = {l: float(v) for l, v in zip(layers, torch.rand(5, generator=g) * torch.tensor([1, 10, 1, 0.1, 3]))}
    # error energy falls 4x per bit (6 dB), with a per-layer wobble
    errs = {l: {c: 4.0 ** -(i + float(torch.rand(1, generator=g)) * 0.3) for i, c in enumerate(CODECS)} for l in layers}
    plan = allocate_many(sens, errs, reference="rot-lm4-g64-lg8-k4", codecs=CODECS, budget=budget, calibration=cal)
    bits = _bits(576)
    assert plan["mean_bits"] == pytest.approx(sum(bits[plan["layers"][l]] for l in layers) / 5)
    assert plan["mean_bits"] <= budget + 1e-9

    def cost(choice):
        return sum(sens[l] * errs[l][c] / errs[l]["rot-lm4-g64-lg8-k4"] for l, c in zip(layers, choice))

    feasible = [ch for ch in itertools.product(CODECS, repeat=5) if sum(bits[c] for c in ch) / 5 <= budget + 1e-9]
    best = min(cost(ch) for ch in feasible)
    got = cost([plan["layers"][l] for l in layers])
    assert plan["predicted_kl"] == pytest.approx(got)
    # greedy on (near-)convex per-layer curves: within 5% of the exhaustive optimum here
    assert got <= best * 1.05 + 1e-12


def test_allocate_many_refuses_a_budget_below_the_cheapest_codec():
    cal = synthetic_calibration(["a"], world=2, hidden=576)
    with pytest.raises(ValueError, match="below the cheapest"):
        allocate_many({"a": 1.0}, {"a": {c: 1.0 for c in CODECS}}, reference=CODECS[1], codecs=CODECS, budget=3.0,
                      calibration=cal)


def test_calibrate_with_candidate_codecs_writes_a_plan_the_default_codec_follows():
    from lowbit_tp.calibration.pipeline import CalibrationConfig, calibrate
    from lowbit_tp.codecs import make_codec
    from lowbit_tp.evaluation import EvalConfig, evaluate_codecs
    from lowbit_tp.models.registry import ModelInfo
    from test_calibration_eval import ByteTokenizer
    from test_simulator import tiny_model

    info = ModelInfo(name="tiny-llama", source="memory", weights_sha256="ef" * 32, model_type="llama",
                     hidden_size=64, num_layers=2)
    bundle = (tiny_model("llama"), ByteTokenizer(), info)
    cands = ("rot-lm3-g64-lg8-k4", "rot-lm4-g64-lg8-k4", "rot-int6-g64-lg8-k4")
    cal = calibrate(CalibrationConfig(model="tiny-llama", tp=2, samples=4, seq_len=64, batch_size=4, allocate=5.0,
                                      alloc_codecs=cands, alloc_samples=2), bundle=bundle, progress=False)
    plan = cal.meta["bit_allocation"]
    assert set(plan["layers"]) == set(cal.layers) and set(plan["layers"].values()) <= set(cands)
    # E = 64: 4 bf16 channels are 1 bit/value, lg8 one byte per 64 values + a bf16 base: 0.375
    bits = {c: b + 1.375 for c, b in zip(cands, (3, 4, 6))}
    assert plan["mean_bits"] == pytest.approx(sum(bits[c] for c in plan["layers"].values()) / len(cal.layers))
    assert plan["mean_bits"] <= 5.0
    res = evaluate_codecs(EvalConfig(model="tiny-llama", tp=2, codecs=("default",), samples=2, seq_len=64, lambada=0),
                          bundle=bundle, calibration=cal, progress=False)
    assert res.rows[0].bits_per_value == pytest.approx(plan["mean_bits"], rel=1e-6)
    assert make_codec("default", calibration=cal).codec_for(cal.layers[0]).name == plan["layers"][cal.layers[0]]


def test_calibrate_measures_the_plan_with_error_feedback_when_asked():
    """`calibrate --alloc-error-feedback`: the stored per-layer KL is the one measured with
    feedback on the probe windows (the stop-29/30 plans came from scripts/alloc_study.py
    --error-feedback; calibrate measured it without, so its plans were the wrong ones for
    runs with --error-feedback), and the plan says so."""
    from lowbit_tp.calibration.allocate import layer_sensitivity
    from lowbit_tp.calibration.pipeline import CalibrationConfig, calibrate
    from lowbit_tp.data import chunk_tokens, load_split
    from lowbit_tp.models.registry import ModelInfo
    from test_calibration_eval import ByteTokenizer
    from test_simulator import tiny_model

    info = ModelInfo(name="tiny-llama", source="memory", weights_sha256="ef" * 32, model_type="llama",
                     hidden_size=64, num_layers=2)
    model, tok = tiny_model("llama"), ByteTokenizer()
    cands = ("rot-lm3-g64-lg8-k4", "rot-lm4-g64-lg8-k4", "rot-int6-g64-lg8-k4")
    plans = {}
    for ef in (False, True):
        cal = calibrate(CalibrationConfig(model="tiny-llama", tp=2, samples=4, seq_len=64, batch_size=4, allocate=5.0,
                                          alloc_codecs=cands, alloc_samples=2, alloc_error_feedback=ef),
                        bundle=(model, tok, info), progress=False)
        plans[ef] = cal.meta["bit_allocation"]
        assert plans[ef]["error_feedback"] is ef
    # the probe, drawn as calibrate documents it: the calibration side, seed + 1000, <= 128 tokens
    probe = chunk_tokens(tok, load_split(None).calibration, num_samples=2, seq_len=64, seed=1000)
    assert plans[True]["probe"] == probe.manifest()
    for ef in (False, True):
        want = layer_sensitivity(model, probe.input_ids, cal, tp=2, codec="rot-lm4-g64-lg8-k4", progress=False,
                                 error_feedback=ef)
        assert plans[ef]["sensitivity_kl"] == pytest.approx(want, rel=1e-9), ef
    first = cal.layers[0]
    assert plans[True]["sensitivity_kl"][first] < plans[False]["sensitivity_kl"][first] / 2
    # eval warns when a plan made for feedback runs without it (once per codec that follows the plan)
    from lowbit_tp.preflight import plan_feedback_warnings

    names = ("default", "alloc+fisher", "int4-g32", "rot-lm4-g64+sum8")
    got = plan_feedback_warnings(cal, names, False)
    assert [w.split(":")[0] for w in got] == ["codec 'default'", "codec 'alloc+fisher'"]
    assert all("add --error-feedback" in w for w in got)
    assert plan_feedback_warnings(cal, names, True) == plan_feedback_warnings(cal, names, "first-stage") == []
    cal.meta["bit_allocation"] = plans[False]
    assert plan_feedback_warnings(cal, names, False) == plan_feedback_warnings(None, names, False) == []


def test_sensitivity_with_error_feedback_differs_except_at_the_last_layer():
    """With feedback a layer's error is sent back by the next layer, so its KL changes;
    the last layer has no next layer, so its KL stays (up to the bf16 layers' own errors,
    which are fed back too)."""
    from lowbit_tp.calibration.allocate import layer_sensitivity
    from test_simulator import _ids, tiny_model, tiny_tp2_calibration

    model = tiny_model("llama")
    ids = _ids()
    cal, _ = tiny_tp2_calibration(model, ids)
    plain = layer_sensitivity(model, ids, cal, tp=2, codec="int4-g32", progress=False)
    fed = layer_sensitivity(model, ids, cal, tp=2, codec="int4-g32", progress=False, error_feedback=True)
    names = [n for n, _ in model.named_modules() if n.endswith(("o_proj", "down_proj"))]  # forward order
    last = names[-1]
    assert fed[last] == pytest.approx(plain[last], rel=0.01)
    assert all(fed[l] < plain[l] / 2 for l in names[:-1])  # measured: 5-50x less


@pytest.mark.parametrize("family, ef", [("llama", False), ("gemma3", True)])
def test_marginal_kl_is_the_kl_saved_by_one_exact_layer_in_a_quantized_model(family, ef):
    """layer_marginal_kl against KLs computed here from the definition: every layer on the
    codec, minus the same with layer L alone in bf16 (with feedback on Gemma's post-norms)."""
    from lowbit_tp.calibration.allocate import layer_marginal_kl, layer_sensitivity
    from lowbit_tp.codecs.mixed import AllocatedCodec
    from lowbit_tp.simulator import TPSimulator
    from test_simulator import _ids, tiny_model, tiny_tp2_calibration

    model = tiny_model(family)
    ids = _ids()
    cal, base = tiny_tp2_calibration(model, ids)
    codec = "int4-g32"

    def kl(layers):
        with torch.no_grad(), TPSimulator(model, tp=2, codec=AllocatedCodec(plan={"layers": layers}, calibration=cal),
                                          algorithm="gather", error_feedback=ef):
            q = model(ids).logits
        # in float64 from the logits, as the evaluator computes KL (a marginal KL is a difference of
        # two close KLs: float32 log-softmaxes moved it by 1e-3 relative)
        lp, lq = base[:, :-1].double().log_softmax(-1), q[:, :-1].double().log_softmax(-1)
        return float((lp.exp() * (lp - lq)).sum(-1).mean())

    full = kl(dict.fromkeys(cal.layers, codec))
    want = {l: max(0.0, full - kl({m: ("bf16" if m == l else codec) for m in cal.layers})) for l in cal.layers}
    got = layer_marginal_kl(model, ids, cal, tp=2, codec=codec, progress=False, error_feedback=ef)
    assert set(got) == set(cal.layers)
    for l in cal.layers:
        assert got[l] == pytest.approx(want[l], rel=1e-4, abs=1e-9), l
    assert sum(want.values()) > 0
    # not the isolated sensitivity (every other layer in bf16) under another name
    alone = layer_sensitivity(model, ids, cal, tp=2, codec=codec, progress=False, error_feedback=ef)
    assert any(abs(alone[l] - want[l]) > 0.05 * max(alone[l], want[l]) for l in cal.layers)


def test_the_feedback_warning_finds_plan_codecs_by_the_registry(monkeypatch):
    """Which codecs follow the plan comes from the registry, not from their names: a new alias of
    ``alloc`` warns (the name test knew only ``alloc`` and ``default``), a codec named like
    ``alloc+sum8`` (a two-stage name whose first part reads ``alloc``) that follows no plan does
    not, and an unknown name is left to the codec factory's own error."""
    from types import SimpleNamespace

    from lowbit_tp.codecs import CODEC_ALIASES, codec_spec
    from lowbit_tp.codecs.base import _REGISTRY
    from lowbit_tp.preflight import plan_feedback_warnings

    cal = SimpleNamespace(meta={"bit_allocation": {"error_feedback": True}})
    monkeypatch.setitem(CODEC_ALIASES, "my-plan", "alloc")
    monkeypatch.setitem(_REGISTRY, "alloc+sum8", codec_spec("int4-g32"))
    names = ("my-plan", "my-plan+fisher", "alloc+sum8", "alloc+sum8+fisher", "no-such-codec", "default")
    got = [w.split(":")[0] for w in plan_feedback_warnings(cal, names, False)]
    assert got == ["codec 'my-plan'", "codec 'my-plan+fisher'", "codec 'default'"]
