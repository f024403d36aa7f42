"""The single-process TP simulator on small random HF models of each supported family."""
import pytest
import torch

from lowbit_tp.calibration import StatsAccumulator
from lowbit_tp.codecs import make_codec
from lowbit_tp.simulator import TPSimulator

from helpers import tiny_gemma_model, tiny_model


def _ids(n=2, s=12):
    return torch.randint(0, 101, (n, s), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma3"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_exact_simulation_equals_unmodified_model(family, tp):
    model = tiny_model(family)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        with TPSimulator(model, tp=tp) as sim:  # no codec: the exact fp32 sum
            got = model(ids).logits
        again = model(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(again, ref)  # the model is restored on exit
    assert len(sim.layer_names) == 4


def test_tp_that_does_not_divide_heads_is_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="valid degrees"):
        TPSimulator(model, tp=3)


def test_a_simulator_inside_another_is_refused_and_a_failed_entry_leaves_the_model_intact(monkeypatch):
    """`with sim: with sim:` (or a second simulator of the same model inside the first) ended in
    an AttributeError on RowParallelLinear.weight; an entry that failed half-way left the layers
    swapped so far in place, since __exit__ does not run then."""
    model = tiny_model("llama")
    ids = _ids()
    with torch.no_grad():
        base = model(ids).logits
    sim, other = TPSimulator(model, tp=2, codec="int4-g32"), TPSimulator(model, tp=2)
    for inner in (sim, other):
        with pytest.raises(RuntimeError, match=r"^the model's row-parallel layers are already simulated "
                                               r"\(model\.layers\.0\.self_attn\.o_proj and 3 more\): a TPSimulator"):
            with sim, inner:
                pass
        assert all(type(model.get_submodule(n)) is torch.nn.Linear for n in sim.layer_names)
    calls, shards = [], type(sim.adapter).input_shards

    def fail_on_the_third(adapter, layer, tp):
        calls.append(layer.name)
        if len(calls) == 3:
            raise RuntimeError("planted")
        return shards(adapter, layer, tp)

    monkeypatch.setattr(type(sim.adapter), "input_shards", fail_on_the_third)
    with pytest.raises(RuntimeError, match="planted"):
        with sim:
            pass
    assert all(type(model.get_submodule(n)) is torch.nn.Linear for n in sim.layer_names)
    monkeypatch.undo()
    with torch.no_grad(), TPSimulator(model, tp=2):  # and it still simulates
        assert torch.allclose(model(ids).logits, base, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)


@pytest.mark.parametrize("codec", [None, "int4-g32"])
def test_a_forward_that_would_backpropagate_is_refused(codec):
    """Outside torch.no_grad the simulated model ran and `loss.backward()` passed, but the
    row-parallel layers' weights (frozen shard copies) got no gradient, and with a codec nothing
    before the first compressed all-reduce did either (its payload cuts the graph): wrong
    gradients without a word. Inference under no_grad still runs."""
    model = tiny_model("llama")
    ids = _ids()
    model(ids).logits.sum().backward()  # the unmodified model: every weight gets a gradient
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad(set_to_none=True)
    with TPSimulator(model, tp=2, codec=codec, algorithm="exact" if codec is None else "gather"):
        with pytest.raises(RuntimeError, match=r"^model\.layers\.0\.self_attn\.o_proj: the row-parallel layers "
                                               r"of lowbit-tp .* run inference only: run the model under "
                                               r"torch\.no_grad\(\)$"):
            model(ids)
        with torch.no_grad():
            model(ids)


def test_a_codec_is_never_silently_ignored():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="'exact' would ignore codec 'int4-g32'"):
        TPSimulator(model, tp=2, codec=make_codec("int4-g32"), algorithm="exact")
    sim = TPSimulator(model, tp=2, codec=make_codec("int4-g32"))  # the default algorithm applies it
    assert sim.algorithm == "gather"
    with torch.no_grad(), sim:
        model(_ids())
    assert sim.comm_stats().calls == 4 and sim.comm_stats().by_algorithm == {"gather": 4}


def test_a_calibration_is_never_silently_ignored_or_misapplied():
    from lowbit_tp.calibration import CalibrationError
    from lowbit_tp.calibration.synthetic import synthetic_calibration

    model = tiny_model("llama")
    names = [f"model.layers.{i}.{k}" for i in range(2) for k in ("self_attn.o_proj", "mlp.down_proj")]
    cal4 = synthetic_calibration(names, world=4, hidden=64, tokens=16, batches=1)
    # a TP-4 calibration at TP 2: ran with ranks 0-1 of the 4-way split's scales, without a word
    with pytest.raises(CalibrationError, match="made for TP degree 4, but this run uses TP 2; recalibrate"):
        TPSimulator(model, tp=2, codec=make_codec("int4-outlier", calibration=cal4))
    with pytest.raises(CalibrationError, match="made for TP degree 4"):
        TPSimulator(model, tp=2, codec="int4-outlier", calibration=cal4)
    with pytest.raises(ValueError, match="calibration= is read only with a codec name"):  # it was dropped
        TPSimulator(model, tp=2, codec=make_codec("int4-g32"), calibration=cal4)
    TPSimulator(model, tp=4, codec="int4-outlier", calibration=cal4)  # its own degree


# ---------------------------------------------------------------- independent reference
# A plain forward of the unsharded model in which o_proj / down_proj are replaced by a
# hand-written TP-2 emulation: contiguous halves of the input features per rank (whole
# heads for o_proj, intermediate halves for down_proj), the seed codec written out from
# its definition (top-k channels by EMA range kept in bf16, the rest symmetric int4 with
# scale max(|ema_min|, |ema_max|) / 7 and codes in [-7, 7]), fp32 sum in rank order, and for
# two-shot a second quantization of the sum with the statistics of the sum.

def _seed_quantize(y, stats, k):
    rng = stats.ema_max - stats.ema_min
    keep = torch.zeros(y.shape[1], dtype=torch.bool)
    keep[sorted(torch.argsort(rng, descending=True, stable=True)[:k].tolist())] = True
    scale = torch.maximum(stats.ema_min.abs(), stats.ema_max.abs()) / 7
    q = torch.clamp(torch.round(y / scale), -7, 7) * scale
    return torch.where(keep, y.to(torch.bfloat16).float(), q)


def _logits_with(model, ids, emulate, names=None):
    """The model's logits with each row-parallel layer's forward replaced by
    ``emulate(name, module)`` (restored afterwards): the tests' independent TP emulations."""
    names = names or [n for n, _ in model.named_modules() if n.endswith(("o_proj", "down_proj"))]
    originals = {}
    for name in names:
        mod = model.get_submodule(name)
        originals[name] = mod.forward
        mod.forward = emulate(name, mod)
    try:
        return model(ids).logits
    finally:
        for name, fwd in originals.items():
            model.get_submodule(name).forward = fwd


def _reference_forward(model, ids, cal, *, k, algorithm):

    def emulate(name, linear):
        def fwd(x):
            x2 = x.reshape(-1, x.shape[-1]).float()
            half = x2.shape[1] // 2
            parts = [x2[:, :half] @ linear.weight[:, :half].T, x2[:, half:] @ linear.weight[:, half:].T]
            deq = [_seed_quantize(p, cal.get(name, r), k) for r, p in enumerate(parts)]
            total = deq[0] + deq[1]
            if algorithm == "two-shot":
                total = _seed_quantize(total, cal.get(name, "sum"), k)
            return total.reshape(*x.shape[:-1], -1)
        return fwd

    return _logits_with(model, ids, emulate)


def tiny_tp2_calibration(model, ids):
    """A TP-2 calibration of ``model`` from one unquantized pass over ``ids`` (each rank's
    partials and their sum observed), and that pass's logits."""
    acc = StatsAccumulator()

    def observe(layer, partials, total):
        for r, p in enumerate(partials):
            acc.update(layer, r, p)
        acc.update(layer, "sum", total)

    with torch.no_grad(), TPSimulator(model, tp=2, observer=observe) as sim:
        logits = model(ids).logits
    return acc.build({"tp": 2, "hidden_size": 64}, layers=sim.layer_names), logits


@pytest.mark.parametrize("algorithm", ["gather", "two-shot"])
def test_quantized_simulation_equals_an_independent_tp_emulation(algorithm):
    model = tiny_model("llama")
    ids = _ids()
    cal, _ = tiny_tp2_calibration(model, ids)
    codec = make_codec("int4-outlier", calibration=cal, k=2)

    with torch.no_grad():
        ref = _reference_forward(model, ids, cal, k=2, algorithm=algorithm)
        with TPSimulator(model, tp=2, codec=codec, algorithm=algorithm) as sim:
            got = model(ids).logits
        plain = model(ids).logits
    # Division by the scale vs multiplication by its inverse may round a value at a tie the
    # other way; everything else is the same arithmetic.
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert (got - plain).abs().max() > 100 * (got - ref).abs().max()  # quantization really happened
    st = sim.comm_stats()
    # 24 tokens x 64 channels per call; per token 2 bf16 channels (32 bits) + 62 int4 (248 bits)
    assert st.calls == 4 and st.bits_per_value == pytest.approx((2 * 16 + 62 * 4) / 64)


def _reference_forward_ef(model, ids, cal, *, k, algorithm):
    """:func:`_reference_forward` with error feedback written from its definition: each
    rank adds what its previous all-reduce lost (``sent - dequantized``) to its next
    partial; in two-shot the owner of a half of the rows (rank 0 the first 12 of the 24
    tokens, rank 1 the rest) also keeps what re-quantizing the sum lost on them."""
    names = [n for n, _ in model.named_modules() if n.endswith(("o_proj", "down_proj"))]
    state = {"carry": None}

    def emulate(name, linear):
        def fwd(x):
            x2 = x.reshape(-1, x.shape[-1]).float()
            half = x2.shape[1] // 2
            parts = [x2[:, :half] @ linear.weight[:, :half].T, x2[:, half:] @ linear.weight[:, half:].T]
            if name != names[0]:
                parts = [p + c for p, c in zip(parts, state["carry"])]
            deq = [_seed_quantize(p, cal.get(name, r), k) for r, p in enumerate(parts)]
            carry = [p - d for p, d in zip(parts, deq)]
            total = deq[0] + deq[1]
            if algorithm == "two-shot":
                again = _seed_quantize(total, cal.get(name, "sum"), k)
                rows = total.shape[0] // 2
                carry[0][:rows] += (total - again)[:rows]
                carry[1][rows:] += (total - again)[rows:]
                total = again
            state["carry"] = carry
            return total.reshape(*x.shape[:-1], -1)
        return fwd

    return _logits_with(model, ids, emulate, names)


@pytest.mark.parametrize("algorithm", ["gather", "two-shot"])
def test_error_feedback_simulation_equals_an_independent_tp_emulation(algorithm):
    model = tiny_model("llama")
    ids = _ids()
    cal, exact = tiny_tp2_calibration(model, ids)
    codec = make_codec("int4-outlier", calibration=cal, k=2)

    with torch.no_grad():
        ref = _reference_forward_ef(model, ids, cal, k=2, algorithm=algorithm)
        with TPSimulator(model, tp=2, codec=codec, algorithm=algorithm, error_feedback=True) as sim:
            got = model(ids).logits
            again = model(ids).logits  # a second forward pass starts without a carry
        with TPSimulator(model, tp=2, codec=codec, algorithm=algorithm) as plain_sim:
            plain = model(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(again, got)
    assert (got - plain).abs().max() > 100 * (got - ref).abs().max()  # the feedback really acted
    assert (got - exact).norm() < (plain - exact).norm()
    # same bytes on the wire (the EF simulator ran two forward passes)
    assert sim.comm_stats().bytes_sent == 2 * plain_sim.comm_stats().bytes_sent
    assert sim.comm_stats().bits_per_value == plain_sim.comm_stats().bits_per_value
    with pytest.raises(ValueError, match="needs a codec"):
        TPSimulator(model, tp=2, error_feedback=True)


def _reference_forward_postnorm_ef(model, ids, cal, *, k, floor=0.3, cap=2.0):
    """Gemma's error feedback written from its definition (gather, TP 2). Each rank r keeps
    its share d_r of the residual error. At a layer with post-norm gain g (``1 + weight``) it
    sends ``p_r + c_r``, ``c_r = -sqrt(2) rms(p_r) d_r / g`` (0 where |g| < floor * median|g|,
    clipped to +-cap * rms(p_r)); after the sum ``y`` it adds ``J(y)(c_r + q_r)`` to d_r,
    ``q_r`` = dequantized - sent, ``J(y) v = d/dt [g * (y + t v) / rms(y + t v)]`` at t = 0."""
    names = [n for n, _ in model.named_modules() if n.endswith(("o_proj", "down_proj"))]
    state = {"d": None}

    def norm_of(name):
        block = name.rsplit(".", 2)[0]
        return model.get_submodule(block + (".post_attention_layernorm" if name.endswith("o_proj")
                                            else ".post_feedforward_layernorm"))

    def emulate(name, linear):
        norm = norm_of(name)
        g = 1.0 + norm.weight.float()

        def fwd(x):
            x2 = x.reshape(-1, x.shape[-1]).float()
            half = x2.shape[1] // 2
            parts = [x2[:, :half] @ linear.weight[:, :half].T, x2[:, half:] @ linear.weight[:, half:].T]
            comps = [torch.zeros_like(p) for p in parts]
            if state["d"] is not None:
                for r, p in enumerate(parts):
                    rms_p = p.pow(2).mean(-1, keepdim=True).sqrt()
                    c = -(2 ** 0.5) * rms_p * state["d"][r] / g
                    c[:, g.abs() < floor * g.abs().median()] = 0.0
                    comps[r] = torch.clamp(c, -cap * rms_p, cap * rms_p)
            sent = [p + c for p, c in zip(parts, comps)]
            deq = [_seed_quantize(s_, cal.get(name, r), k) for r, s_ in enumerate(sent)]
            y = deq[0] + deq[1]
            ms = y.pow(2).mean(-1, keepdim=True) + norm.eps
            new = []
            for r in range(2):
                v = comps[r] + (deq[r] - sent[r])
                jv = g / ms.sqrt() * v - g * y * (y * v).mean(-1, keepdim=True) / ms.pow(1.5)
                new.append(jv if state["d"] is None else state["d"][r] + jv)
            state["d"] = new
            return y.reshape(*x.shape[:-1], -1)
        return fwd

    return _logits_with(model, ids, emulate, names)


@pytest.mark.parametrize("family", ["gemma3", "gemma2"])
def test_gemma_error_feedback_maps_the_carry_through_the_post_norms(family):
    model = tiny_gemma_model(family)  # post-norm gains spread as in the real model
    ids = _ids()
    cal, exact = tiny_tp2_calibration(model, ids)
    codec = make_codec("int4-outlier", calibration=cal, k=2)
    with torch.no_grad():
        ref = _reference_forward_postnorm_ef(model, ids, cal, k=2)
        with TPSimulator(model, tp=2, codec=codec, algorithm="gather", error_feedback=True):
            got = model(ids).logits
            again = model(ids).logits
        with TPSimulator(model, tp=2, codec=codec, algorithm="gather") as plain_sim:
            plain = model(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(again, got)
    assert (got - plain).abs().max() > 100 * (got - ref).abs().max()  # the feedback really acted
    assert (got - exact).norm() < (plain - exact).norm()
    assert plain_sim.comm_stats().bytes_sent > 0
