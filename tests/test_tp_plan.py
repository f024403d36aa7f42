"""The TP plan and the one row-parallel layer every engine uses (lowbit_tp.tp)."""
import pytest
import torch
from torch import nn

from lowbit_tp.codecs import make_codec
from lowbit_tp.collectives import simulate_all_reduce
from lowbit_tp.tp import DECODER_PLAN, DistReducer, Reducer, RowParallelLinear, Rule, SimulatedReducer, TPPlan
from lowbit_tp.tp import shard_weight, swap_module


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = nn.Module()
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self.self_attn, n, nn.Linear(8, 8))
        self.mlp = nn.Module()
        for n in ("gate_proj", "up_proj"):
            setattr(self.mlp, n, nn.Linear(8, 12))
        self.mlp.down_proj = nn.Linear(12, 8)


class _Causal(nn.Module):
    def __init__(self, layers=3):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(_Block() for _ in range(layers))
        self.lm_head = nn.Linear(8, 5)


def test_plan_finds_modules_in_forward_order_under_any_prefix():
    model = _Causal()
    rows = DECODER_PLAN.modules(model, style="rowwise")
    assert [p.name for p in rows] == [f"model.layers.{i}.{leaf}" for i in range(3)
                                      for leaf in ("self_attn.o_proj", "mlp.down_proj")]
    assert {p.prefix for p in rows} == {"model."}
    assert [p.layer_index for p in rows] == [0, 0, 1, 1, 2, 2]
    assert rows[0].rule == Rule("rowwise", "q_heads") and rows[1].rule == Rule("rowwise", "features")
    every = DECODER_PLAN.modules(model)
    assert len(every) == 21 and "model.lm_head" not in {p.name for p in every}  # unnamed -> replicated
    assert [p.name.rsplit(".", 1)[1] for p in every[:7]] == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_forward_order_of_names_learned_one_by_one():
    names = ["language_model.model.layers.10.mlp.down_proj", "language_model.model.layers.2.mlp.down_proj",
             "language_model.model.layers.10.self_attn.o_proj", "language_model.model.layers.2.self_attn.o_proj",
             "language_model.model.layers.2.mlp.down_proj"]
    assert DECODER_PLAN.forward_order(names) == (
        "language_model.model.layers.2.self_attn.o_proj", "language_model.model.layers.2.mlp.down_proj",
        "language_model.model.layers.10.self_attn.o_proj", "language_model.model.layers.10.mlp.down_proj")
    with pytest.raises(ValueError, match="names no module 'model.norm'"):
        DECODER_PLAN.forward_order(["model.norm"])
    with pytest.raises(ValueError, match="several stacks"):  # a draft model's layers would interleave
        DECODER_PLAN.forward_order(["model.layers.0.mlp.down_proj", "draft.model.layers.0.mlp.down_proj"])


def test_plan_refuses_two_stacks_and_bad_rules():
    model = nn.Module()
    model.text = _Causal(1)
    model.vision = _Causal(1)
    with pytest.raises(ValueError, match="several stacks"):
        DECODER_PLAN.modules(model)
    with pytest.raises(ValueError, match="unknown TP style"):
        Rule("diagonal")
    with pytest.raises(ValueError, match="more than one"):
        TPPlan.from_dict({"layers.*.x.*": "rowwise"})


def test_transformers_plan_keys_carry_the_prefix():
    plan = DECODER_PLAN.transformers_plan(rowwise="lowbit_rowwise")
    assert plan["model.layers.*.self_attn.o_proj"] == "lowbit_rowwise"
    assert plan["model.layers.*.mlp.down_proj"] == "lowbit_rowwise"
    assert plan["model.layers.*.self_attn.k_proj"] == "colwise"
    assert len(plan) == 7


def test_swap_module_returns_the_old_one():
    model = _Causal(1)
    old = model.model.layers[0].mlp.down_proj
    new = nn.Identity()
    assert swap_module(model, "model.layers.0.mlp.down_proj", new) is old
    assert model.get_submodule("model.layers.0.mlp.down_proj") is new


def _row(linear, tp, reducer):
    d = linear.in_features // tp
    shards = [slice(r * d, (r + 1) * d) for r in range(tp)]
    bias = None if linear.bias is None else linear.bias.detach()
    return RowParallelLinear([shard_weight(linear.weight.detach(), s) for s in shards], bias, shards=shards,
                             name="layers.0.down_proj", reducer=reducer)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_row_parallel_exact_equals_the_linear_and_adds_bias_once(tp):
    linear = nn.Linear(16, 8, bias=True)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        got = _row(linear, tp, SimulatedReducer())(x)
        ref = linear(x)
    assert got.shape == (2, 5, 8)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    if tp > 1:  # a bias added per rank would be counted tp times
        assert not torch.allclose(got + (tp - 1) * linear.bias, ref, atol=1e-3)


def test_row_parallel_hands_the_true_partials_to_the_reducer():
    linear = nn.Linear(12, 6, bias=False)
    x = torch.randn(4, 12)
    seen = {}

    class Capture:
        def reduce(self, partials, *, layer):
            seen[layer] = [p.clone() for p in partials]
            return partials[0] * 0

    assert isinstance(Capture(), Reducer)
    with torch.no_grad():
        _row(linear, 3, Capture())(x)
    w = linear.weight.detach()
    ref = [x[:, 4 * r:4 * (r + 1)] @ w[:, 4 * r:4 * (r + 1)].T for r in range(3)]
    assert list(seen) == ["layers.0.down_proj"]
    for got, want in zip(seen["layers.0.down_proj"], ref):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_simulated_reducer_with_a_codec_is_simulate_all_reduce_and_counts_traffic():
    codec = make_codec("int4-g32")
    parts = [torch.randn(6, 64) for _ in range(3)]
    red = SimulatedReducer(codec=codec, algorithm="gather")
    got = red.reduce(parts, layer="a")
    red.reduce(parts, layer="b")
    assert torch.equal(got, simulate_all_reduce(parts, codec, "gather", layer="a"))
    st = red.stats()
    assert st.calls == 2 and set(red.per_layer) == {"a", "b"}
    assert st.bytes_sent == red.per_layer["a"].bytes_sent + red.per_layer["b"].bytes_sent


def test_dist_reducer_takes_exactly_one_partial():
    red = DistReducer(codec=make_codec("bf16"))
    with pytest.raises(ValueError, match="own partial only"):
        red.reduce([torch.zeros(2, 4), torch.zeros(2, 4)], layer="x")


def test_rank_reducers_refuse_a_codec_that_exact_would_ignore():
    """`register_lowbit_rowwise(codec=make_codec("int4-g32"), algorithm="exact")` (and the DTensor
    style, and a DistReducer) sent uncompressed values without a word: the codec was never used.
    An unknown algorithm or a codec name failed only at the first forward. bf16/exact is the
    documented uncompressed baseline and still builds."""
    from lowbit_tp.codecs import make_codec
    from lowbit_tp.integrations.dtensor import LowbitRowwiseParallel
    from lowbit_tp.integrations.transformers import LowbitRowwiseParallel as Rowwise
    from lowbit_tp.tp import DistReducer

    builders = [lambda **kw: DistReducer(**kw), lambda **kw: Rowwise(**kw),
                lambda **kw: LowbitRowwiseParallel(layer="model.layers.0.mlp.down_proj", **kw)]
    for build in builders:
        with pytest.raises(ValueError, match=r"^algorithm 'exact' \(the backend all-reduce, uncompressed\) would "
                                             r"ignore codec 'int4-g32'; use gather"):
            build(codec=make_codec("int4-g32"), algorithm="exact")
        with pytest.raises(ValueError, match=r"^unknown algorithm 'ring'"):
            build(codec=make_codec("int4-g32"), algorithm="ring")
        with pytest.raises(TypeError, match=r"^codec must be a lowbit_tp Codec .*got str 'int4-g32'$"):
            build(codec="int4-g32", algorithm="gather")
        build(codec=make_codec("bf16"), algorithm="exact")
        build(codec=make_codec("int4-g32"), algorithm="auto")
