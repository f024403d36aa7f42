"""Adapters: row-parallel layer listing, shard geometry and the partial-sum contract,
on tiny random models of each supported family (no downloads)."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lowbit_tp.models import (  # noqa: E402
    ModelInfo,
    check_tp,
    get_adapter,
    list_models,
    load_model,
    valid_tp_degrees,
)
from lowbit_tp.collectives.feedback import PostNorm  # noqa: E402
from lowbit_tp.simulator import simulated_row_parallel  # noqa: E402
from lowbit_tp.tp import SimulatedReducer  # noqa: E402
from lowbit_tp.models.registry import resolve_source  # noqa: E402

_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    max_position_embeddings=64,
)


def _configs():
    return {
        "llama": transformers.LlamaConfig(
            **_COMMON, num_attention_heads=8, num_key_value_heads=2
        ),
        "mistral": transformers.MistralConfig(
            **_COMMON, num_attention_heads=4, num_key_value_heads=4
        ),
        "qwen2": transformers.Qwen2Config(
            **_COMMON, num_attention_heads=8, num_key_value_heads=4
        ),
        "gemma2": transformers.Gemma2Config(
            **_COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=32
        ),
        # head_dim * heads (4 * 24 = 96) != hidden (64), as in real Gemma 3.
        "gemma3_text": transformers.Gemma3TextConfig(
            **_COMMON, num_attention_heads=4, num_key_value_heads=1, head_dim=24
        ),
    }


@pytest.fixture(scope="module")
def tiny_models():
    torch.manual_seed(0)
    models = {}
    for family, config in _configs().items():
        model = transformers.AutoModelForCausalLM.from_config(config)
        models[family] = model.eval()
    return models


FAMILIES = list(_configs())


@pytest.mark.parametrize("family", FAMILIES)
def test_row_parallel_layers_in_forward_order(tiny_models, family):
    model = tiny_models[family]
    adapter = get_adapter(model)
    layers = adapter.row_parallel_layers(model)
    assert [(l.layer_index, l.kind) for l in layers] == [
        (0, "attn_out"), (0, "mlp_down"), (1, "attn_out"), (1, "mlp_down")
    ]
    assert layers[0].name == "model.layers.0.self_attn.o_proj"
    assert layers[1].name == "model.layers.0.mlp.down_proj"
    geo = adapter.geometry
    for layer in layers:
        assert layer.out_features == 64
        module = model.get_submodule(layer.name)
        assert (module.in_features, module.out_features) == (layer.in_features, layer.out_features)
    assert layers[0].in_features == geo.num_heads * geo.head_dim
    assert layers[1].in_features == 96


@pytest.mark.parametrize("family", FAMILIES)
def test_shards_partition_inputs_and_partials_sum_to_output(tiny_models, family):
    model = tiny_models[family]
    adapter = get_adapter(model)
    layers = adapter.row_parallel_layers(model)
    generator = torch.Generator().manual_seed(1)
    for tp in valid_tp_degrees(model.config):
        for layer in layers:
            shards = adapter.input_shards(layer, tp)
            assert len(shards) == tp
            covered = [i for s in shards for i in range(layer.in_features)[s]]
            assert covered == list(range(layer.in_features)), (layer.name, tp)
            if layer.kind == "attn_out":
                # Whole heads only.
                assert all((s.stop - s.start) % adapter.geometry.head_dim == 0 for s in shards)

            linear = model.get_submodule(layer.name)
            x = torch.randn(5, layer.in_features, generator=generator)
            seen = []
            reducer = SimulatedReducer(observer=lambda name, parts, total: seen.append(parts))
            row = simulated_row_parallel(linear, shards, name=layer.name, reducer=reducer)
            with torch.no_grad():
                got = row(x)
                expected = linear(x)
            assert len(seen[0]) == tp and all(p.shape == (5, layer.out_features) for p in seen[0])
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_valid_tp_degrees_nine_heads_three_kv_heads():
    # Like SmolLM2-135M but with an intermediate size divisible by 9 (SmolLM2's 1536
    # is not, which leaves it only 1 and 3; see the model-marked test).
    config = transformers.LlamaConfig(
        **{**_COMMON, "hidden_size": 576, "intermediate_size": 1728},
        num_attention_heads=9,
        num_key_value_heads=3,
    )
    assert valid_tp_degrees(config) == [1, 3, 9]
    check_tp(config, 3)
    with pytest.raises(ValueError) as err:
        check_tp(config, 2, name="smollm2-135m")
    message = str(err.value)
    assert message.startswith("TP degree 2 does not divide the 9 attention heads of smollm2-135m")
    assert "valid degrees: 1, 3, 9" in message


def test_check_tp_reports_every_failed_constraint():
    config = transformers.LlamaConfig(
        **{**_COMMON, "hidden_size": 96, "intermediate_size": 100},
        num_attention_heads=12,
        num_key_value_heads=4,
    )
    # 3 divides the 12 heads but neither relates to the 4 KV heads nor divides 100.
    with pytest.raises(ValueError) as err:
        check_tp(config, 3, name="toy")
    message = str(err.value)
    assert message == (
        "TP degree 3 neither divides nor is a multiple of the 4 KV heads of toy and "
        "does not divide the intermediate size 100; valid degrees: 1, 2, 4"
    )
    with pytest.raises(ValueError, match="positive integer"):
        check_tp(config, 0)
    assert valid_tp_degrees(config) == [1, 2, 4]


def test_gqa_column_shards_map_queries_to_their_kv_group():
    config = transformers.LlamaConfig(**_COMMON, num_attention_heads=8, num_key_value_heads=2)
    adapter = get_adapter(config)
    group = 8 // 2
    for tp in (1, 2, 4, 8):
        shards = adapter.column_shards(tp)
        assert [h for s in shards for h in s.q_heads] == list(range(8))
        for shard in shards:
            assert shard.kv_heads == tuple(sorted({h // group for h in shard.q_heads}))
    # tp <= kv heads: KV heads are split; tp > kv heads: each replicated tp // kv times.
    assert [s.kv_heads for s in adapter.column_shards(2)] == [(0,), (1,)]
    assert [s.kv_heads for s in adapter.column_shards(4)] == [(0,), (0,), (1,), (1,)]
    assert [s.q_heads for s in adapter.column_shards(4)] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    one = adapter.column_shards(1)[0]
    assert one.kv_heads == (0, 1) and one.mlp_features == slice(0, 96)
    # The gate/up column shard equals the down_proj input shard.
    layer = next(l for l in adapter.row_parallel_layers(
        transformers.AutoModelForCausalLM.from_config(config)) if l.kind == "mlp_down")
    assert [s.mlp_features for s in adapter.column_shards(4)] == adapter.input_shards(layer, 4)


def test_gqa_kv_split_when_tp_below_kv_heads():
    config = transformers.Qwen2Config(**_COMMON, num_attention_heads=8, num_key_value_heads=4)
    shards = get_adapter(config).column_shards(2)
    assert [s.kv_heads for s in shards] == [(0, 1), (2, 3)]


def test_unknown_architecture_is_rejected_with_supported_list():
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2)
    with pytest.raises(ValueError, match="supported: Llama \\(llama\\), Mistral"):
        get_adapter(config)


def test_registry_names_and_bad_paths(tmp_path):
    assert list_models()[0] == "smollm2-135m"
    assert set(list_models()) == {"smollm2-135m", "gemma3-270m"}
    with pytest.raises(ValueError, match="smollm2-135m, gemma3-270m"):
        resolve_source("no-such-model")
    with pytest.raises(ValueError, match="no config.json"):
        resolve_source(str(tmp_path))


def test_weight_hash_is_remembered_until_a_file_changes(tmp_path, monkeypatch):
    """The run and eval parents hashed the weights twice (preflight, model_info); the second is a
    lookup now, and a file written since (new mtime, ctime or size, or another file moved in) is read again."""
    from lowbit_tp.models import registry
    from lowbit_tp.models.registry import sha256_of_files

    def sha(*blobs):
        return hashlib.sha256(b"".join(blobs)).hexdigest()

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"first")
    b.write_bytes(b"second")
    assert sha256_of_files([a, b]) == sha(b"first", b"second")
    old, new = sha(b"first", b"second"), sha(b"FIRST", b"second")  # before counting the module's hashes
    reads = []
    monkeypatch.setattr(registry.hashlib, "sha256", lambda *x: reads.append(1) or hashlib.new("sha256", *x))
    assert sha256_of_files([a, b]) == old and not reads  # remembered, not read
    st = a.stat()
    with open(a, "r+b") as f:  # same size, same inode, the old mtime set back: the ctime moved
        f.write(b"FIRST")
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert sha256_of_files([a, b]) == new and reads == [1]  # read again
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a new mtime: read again
    assert sha256_of_files([a, b]) == new and reads == [1, 1]
    monkeypatch.undo()
    st = a.stat()
    with open(a, "ab") as f:  # a new size under the same mtime
        f.write(b"!")
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert sha256_of_files([a, b]) == sha(b"FIRST!", b"second")
    other = tmp_path / "other"
    other.write_bytes(b"FIRST?")  # another file moved in, same size and mtime
    os.utime(other, ns=(st.st_atime_ns, a.stat().st_mtime_ns))
    os.replace(other, a)
    assert sha256_of_files([a, b]) == sha(b"FIRST?", b"second")
    assert sha256_of_files([b, a]) == sha(b"second", b"FIRST?")  # the order of the files counts
    assert sha256_of_files([a]) == sha(b"FIRST?")


def _word_level_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "hello": 2, "world": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>"
    )


def test_load_model_from_local_checkpoint_dir(tmp_path):
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(_configs()["llama"]).save_pretrained(tmp_path)
    _word_level_tokenizer().save_pretrained(tmp_path)

    model, tokenizer, info = load_model(str(tmp_path))
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert tokenizer.encode("hello world", add_special_tokens=False) == [2, 3]
    assert (info.name, info.source) == (str(tmp_path), str(tmp_path))
    assert (info.model_type, info.hidden_size, info.num_layers) == ("llama", 64, 2)
    assert info.weights_sha256 == hashlib.sha256(
        (tmp_path / "model.safetensors").read_bytes()
    ).hexdigest()
    assert [p.name for p in resolve_source(str(tmp_path)).weight_files()] == ["model.safetensors"]


@pytest.mark.model
def test_smollm2_adapter_on_the_real_model():
    model, tokenizer, info = load_model("smollm2-135m")
    assert isinstance(info, ModelInfo)
    assert (info.model_type, info.hidden_size, info.num_layers) == ("llama", 576, 30)
    assert len(info.weights_sha256) == 64
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())

    adapter = get_adapter(model, name=info.name)
    layers = adapter.row_parallel_layers(model)
    assert len(layers) == 60
    assert valid_tp_degrees(model.config) == [1, 3]
    with pytest.raises(ValueError, match="valid degrees: 1, 3$"):
        check_tp(model.config, 2, name=info.name)

    x = torch.randn(3, layers[0].in_features)
    linear = model.get_submodule(layers[0].name)
    row = simulated_row_parallel(linear, adapter.input_shards(layers[0], 3), name=layers[0].name,
                                 reducer=SimulatedReducer())
    with torch.no_grad():
        torch.testing.assert_close(row(x), linear(x), rtol=1e-4, atol=1e-4)


def test_gemma3_270m_geometry_from_config_only():
    # The shapes of the gemma3-270m GGUF (checked against the loaded model): head_dim
    # 256 * 4 heads = 1024 o_proj inputs for a hidden size of 640, and one KV head.
    config = transformers.Gemma3TextConfig(
        vocab_size=128, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256,
    )
    adapter = get_adapter(config)
    assert adapter.family == "Gemma 3 (text)"
    assert valid_tp_degrees(config) == [1, 2, 4]
    assert [s.kv_heads for s in adapter.column_shards(4)] == [(0,), (0,), (0,), (0,)]
    with pytest.raises(ValueError, match="TP degree 8 does not divide the 4 attention heads"):
        check_tp(config, 8)


def test_post_norm_names_and_a_post_norm_chain_needs_its_norms():
    """Gemma's norm after o_proj is the layer's post_attention_layernorm, after down_proj its
    post_feedforward_layernorm (names, with or without a prefix, and the plan's patterns);
    a chain for a post-norm family without norms is refused, a pre-norm one needs none."""
    from transformers import Gemma3TextConfig, LlamaConfig

    gemma = get_adapter(Gemma3TextConfig())
    assert gemma.post_norm_name("model.layers.3.self_attn.o_proj") == "model.layers.3.post_attention_layernorm"
    assert gemma.post_norm_name("layers.0.mlp.down_proj") == "layers.0.post_feedforward_layernorm"
    assert gemma.post_norm_name("layers.*.mlp.down_proj") == "layers.*.post_feedforward_layernorm"
    with pytest.raises(ValueError, match="not a row-parallel layer"):
        gemma.post_norm_name("model.layers.0.mlp.up_proj")
    layers = ["model.layers.1.self_attn.o_proj", "model.layers.0.mlp.down_proj", "model.layers.0.self_attn.o_proj"]
    with pytest.raises(ValueError, match="needs its post-norms"):
        gemma.feedback_chain_for(layers, tp=2, ranks=1)
    asked = []
    chain = gemma.feedback_chain_for(layers, tp=2, ranks=1,
                                     norm_of=lambda n: asked.append(n) or PostNorm(gain=torch.ones(4)))
    assert chain.order == tuple(sorted(layers, key=lambda n: (n.split(".")[2], "down" in n)))
    assert asked == [gemma.post_norm_name(n) for n in chain.order] and chain.post_norm.tp == 2
    plain = get_adapter(LlamaConfig()).feedback_chain_for(layers, tp=2, ranks=1)
    assert plain.post_norm is None and plain.order == chain.order
