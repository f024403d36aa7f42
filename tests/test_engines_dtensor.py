"""lowbit-tp as a ParallelStyle for torch's parallelize_module, on a tiny Llama, real gloo ranks.

Each row-parallel output must equal ``simulate_all_reduce`` of all ranks' partials of that
call (bitwise), plus the bias once; with bf16/exact the logits match the unsharded model.
"""
import pytest
import torch

from helpers import RecordingReducer, tiny_model
from lowbit_tp.collectives import simulate_all_reduce, spawn_ranks


def _rank(rank, world, families, runs):
    """Every family x run in one spawn (a spawn's imports cost more than the forwards)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from lowbit_tp.codecs import make_codec
    from lowbit_tp.integrations.dtensor import parallelize_plan
    from lowbit_tp.tp import DistReducer

    mesh = init_device_mesh("cpu", (world,))
    ids = torch.randint(0, 260, (2, 7), generator=torch.Generator().manual_seed(5))
    out = {}
    for family in families:
        out[family] = []
        for codec_name, algorithm in runs:
            model = tiny_model(family)
            rec = RecordingReducer(DistReducer(codec=make_codec(codec_name), algorithm=algorithm))
            parallelize_module(model, mesh, parallelize_plan(model, reducer=rec))
            with torch.no_grad():
                logits = model(ids).logits
            out[family].append({"calls": rec.calls, "logits": logits})
    return out


FAMILIES = ["llama", "qwen2"]  # qwen2: q/k/v carry biases, sliced with the rows


def test_parallelize_module_with_the_lowbit_style():
    from lowbit_tp.codecs import make_codec

    runs = [("bf16", "exact"), ("int4-g32", "gather"), ("mxfp4", "two-shot")]
    per_rank = spawn_ranks(_rank, 2, FAMILIES, runs, timeout_s=60, deadline_s=240)
    for family in FAMILIES:
        model = tiny_model(family)
        ids = torch.randint(0, 260, (2, 7), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            ref_logits = model(ids).logits
        names = [n for n, _ in model.named_modules() if n.endswith(("o_proj", "down_proj"))]
        for i, (codec_name, algorithm) in enumerate(runs):
            calls = [per_rank[r][family][i]["calls"] for r in range(2)]
            assert [c[0] for c in calls[0]] == names
            if algorithm == "exact":
                torch.testing.assert_close(per_rank[0][family][i]["logits"], ref_logits, rtol=1e-4, atol=1e-4,
                                           msg=lambda m: f"{family}: {m}")
                continue
            codec = make_codec(codec_name)
            for j, name in enumerate(names):
                partials = [calls[r][j][1] for r in range(2)]
                ref = simulate_all_reduce(partials, codec, algorithm, layer=name)
                assert not torch.equal(ref, partials[0] + partials[1])
                for r in range(2):
                    assert torch.equal(calls[r][j][2], ref), (family, codec_name, name, r)
            assert torch.equal(per_rank[0][family][i]["logits"], per_rank[1][family][i]["logits"])  # ranks agree bitwise


def test_a_model_the_plan_does_not_fit_is_refused_not_left_unsharded():
    """GPT-2 names its layers c_attn/c_proj: the plan matched nothing and parallelize_plan gave
    {}, so parallelize_module left the model whole, running unsharded and uncompressed."""
    import transformers as tf

    from lowbit_tp.codecs import make_codec
    from lowbit_tp.integrations.dtensor import parallelize_plan

    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=260))
    with pytest.raises(ValueError, match="names no row-parallel module of GPT2LMHeadModel"):
        parallelize_plan(gpt2, codec=make_codec("int4-g32"))
    plan = parallelize_plan(tiny_model("llama"), codec=make_codec("int4-g32"))
    assert [n for n, s in plan.items() if type(s).__name__ == "LowbitRowwiseParallel"] == [
        f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.o_proj", "mlp.down_proj")]
    assert plan["model.layers.0.self_attn.o_proj"].heads == (4, 2)
    assert plan["model.layers.0.mlp.down_proj"].heads is None


def test_the_heads_check_reads_only_the_head_counts():
    """The heads came from a full TPGeometry, so a config without an unrelated size (here the MLP's,
    the layer count, the model type) silently skipped the check that refuses a mesh splitting KV heads."""
    from types import SimpleNamespace

    from lowbit_tp.codecs import make_codec
    from lowbit_tp.integrations.dtensor import parallelize_plan

    model = tiny_model("llama")
    o_proj = "model.layers.0.self_attn.o_proj"
    for config, heads in [(SimpleNamespace(num_attention_heads=4, num_key_value_heads=1), (4, 1)),
                          (SimpleNamespace(num_attention_heads=4), (4, 4)),  # no KV count: one per query head
                          (SimpleNamespace(text_config=SimpleNamespace(num_attention_heads=8, num_key_value_heads=2)),
                           (8, 2)),  # a multimodal wrapper's decoder
                          (SimpleNamespace(hidden_size=64), None)]:  # no head counts: nothing to check
        model.config = config
        assert parallelize_plan(model, codec=make_codec("bf16"))[o_proj].heads == heads, config


def _rank_kv1(rank, world):
    """A tiny Llama with one KV head at TP 2: the o_proj style refuses the mesh in one line."""
    import transformers as tf
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from helpers import tiny_config
    from lowbit_tp.codecs import make_codec
    from lowbit_tp.integrations.dtensor import parallelize_plan

    config = tiny_config("llama")
    config.num_key_value_heads = 1
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    try:
        parallelize_module(model, init_device_mesh("cpu", (world,)), parallelize_plan(model, codec=make_codec("bf16")))
        with torch.no_grad():
            model(torch.tensor([[5, 6, 7, 8, 9]]))
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "ran"


@pytest.mark.slow  # an error path on spawned ranks (~23 s)
def test_tp_that_does_not_divide_the_kv_heads_is_one_clear_error():
    """It failed inside attention: "shape '[1, 5, -1, 16]' is invalid for input of size 40"."""
    for got in spawn_ranks(_rank_kv1, 2, timeout_s=30, deadline_s=120):
        assert got.startswith("ValueError: model.layers.0.self_attn.o_proj: parallelize_module splits the attention "
                              "heads evenly and cannot replicate KV heads: TP 2 must divide the 4 query and 1 KV "
                              "head(s)"), got
