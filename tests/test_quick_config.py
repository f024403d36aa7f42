"""quick_config: a model's sizes from its header, checked against independent readers."""
import json

import numpy as np
import pytest

from lowbit_tp.models.quick_config import quick_config, read_gguf_metadata


def _write_gguf(path, arch="llama"):
    """A GGUF written by the gguf package (the reference writer), with the arrays a real
    file carries before and after the sizes (a string vocabulary, float scores)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_string("general.name", "tiny")
    w.add_token_list([f"tok{i}" for i in range(3000)])
    w.add_token_scores([0.5] * 3000)
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(96)
    w.add_feed_forward_length(256)
    w.add_head_count(6)
    w.add_head_count_kv(2)
    w.add_key_length(16)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_tensor("dummy", np.zeros((2, 2), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_header_against_the_gguf_writer(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write_gguf(path)
    meta = read_gguf_metadata(path)
    assert meta["general.architecture"] == "llama" and meta["general.name"] == "tiny"
    assert meta["tokenizer.ggml.tokens"] is None  # arrays are skipped, not decoded
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    cfg = quick_config(str(path))
    assert (cfg.model_type, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
            cfg.intermediate_size, cfg.num_hidden_layers, cfg.max_position_embeddings) == \
        ("llama", 96, 6, 2, 16, 256, 2, 128)


def test_bad_gguf_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ValueError, match="bad magic"):
        quick_config(str(path))
    good = tmp_path / "good.gguf"
    _write_gguf(good)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="GGUF"):
        read_gguf_metadata(cut)


def test_checkpoint_directory_reads_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "gemma3", "text_config": {"model_type": "gemma3_text", "hidden_size": 64,
                                                "num_attention_heads": 4, "num_key_value_heads": 1,
                                                "head_dim": 32, "intermediate_size": 128,
                                                "num_hidden_layers": 3, "max_position_embeddings": 512}}))
    cfg = quick_config(str(tmp_path))
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
            cfg.max_position_embeddings) == (64, 4, 1, 32, 512)


@pytest.mark.model
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_real_models_match_transformers_config(name):
    from transformers import AutoConfig

    from lowbit_tp.models import valid_tp_degrees
    from lowbit_tp.models.registry import resolve_source

    src = resolve_source(name)
    ref = AutoConfig.from_pretrained(str(src.directory), gguf_file=src.gguf_file)
    ref = getattr(ref, "text_config", None) or ref
    cfg = quick_config(name)
    for field in ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                  "num_hidden_layers", "max_position_embeddings"):
        assert getattr(cfg, field) == getattr(ref, field), field
    assert valid_tp_degrees(cfg) == valid_tp_degrees(ref)
