"""The single-process TP simulator on small random HF models of each supported family."""
import pytest
import torch

from lowbit_tp.calibration import StatsAccumulator
from lowbit_tp.codecs import make_codec
from lowbit_tp.collectives import simulate_all_reduce
from lowbit_tp.simulator import TPSimulator


def tiny_model(family: str):
    import transformers as tf

    common = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                  num_hidden_layers=2, vocab_size=101, max_position_embeddings=64)
    if family == "llama":
        cfg = tf.LlamaConfig(**common)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**common)
    elif family == "mistral":
        cfg = tf.MistralConfig(**common)
    elif family == "gemma3":
        cfg = tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=8)
    else:
        raise ValueError(family)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    return model


def _ids(n=2, s=12):
    return torch.randint(0, 101, (n, s), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma3"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_exact_simulation_equals_unmodified_model(family, tp):
    model = tiny_model(family)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        with TPSimulator(model, tp=tp, codec=make_codec("bf16"), algorithm="exact") as sim:
            got = model(ids).logits
        again = model(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(again, ref)  # the model is restored on exit
    assert len(sim.layer_names) == 4


def test_tp_that_does_not_divide_heads_is_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="valid degrees"):
        TPSimulator(model, tp=3)


@pytest.mark.parametrize("algorithm", ["gather", "two-shot"])
def test_quantized_layers_equal_the_reference_collective(algorithm):
    model = tiny_model("llama")
    ids = _ids()
    acc = StatsAccumulator()

    def observe(layer, partials, total):
        for r, p in enumerate(partials):
            acc.update(layer, r, p)
        acc.update(layer, "sum", total)

    with torch.no_grad(), TPSimulator(model, tp=2, observer=observe) as sim:
        model(ids)
    cal = acc.build({"tp": 2, "hidden_size": 64}, layers=sim.layer_names)
    codec = make_codec("int4-outlier", calibration=cal, k=2)

    seen = {}

    def capture(layer, partials, total):
        seen[layer] = [p.clone() for p in partials]

    with torch.no_grad(), TPSimulator(model, tp=2, codec=codec, algorithm=algorithm, observer=capture) as sim:
        outs = {}
        hooks = [model.get_submodule(n).register_forward_hook(
            lambda m, i, o, n=n: outs.__setitem__(n, o.reshape(-1, o.shape[-1]).clone())) for n in sim.layer_names]
        model(ids)
        for h in hooks:
            h.remove()
    for name in sim.layer_names:
        ref = simulate_all_reduce(seen[name], codec, algorithm, layer=name)
        assert torch.equal(outs[name], ref), name
    st = sim.comm_stats()
    assert st.calls == 4 and 4.0 < st.bits_per_value < 5.0
