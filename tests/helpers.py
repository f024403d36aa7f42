"""Tiny models and tokenizers shared by the tests (nothing to download).

``tiny_config(family)`` gives a 2-layer config of each supported family, ``byte_tokenizer()``
a byte-level tokenizer with no merges, ``save_tiny(root, family)`` a checkpoint directory
of both, and ``reference_greedy`` the unsharded model's greedy tokens (full recompute per
step, no KV cache: an independent reference for every engine).
"""
from __future__ import annotations

import torch

from lowbit_tp.bench.e2e.model import byte_tokenizer  # noqa: F401  (the benchmark's, one token per byte)


def tiny_config(family: str, *, vocab_size: int = 260):
    import transformers as tf

    common = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                  num_hidden_layers=2, vocab_size=vocab_size, max_position_embeddings=64, bos_token_id=0,
                  eos_token_id=1, pad_token_id=None)
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "qwen2":
        return tf.Qwen2Config(**common)  # q/k/v carry biases: they must be sliced with the rows
    if family == "mistral":
        return tf.MistralConfig(**common)
    if family == "gemma3":
        return tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=8)
    raise ValueError(family)


def tiny_model(family: str, *, vocab_size: int = 260):
    import transformers as tf

    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(tiny_config(family, vocab_size=vocab_size)).eval()


def save_tiny(root, family: str) -> str:
    path = root / family
    tiny_model(family).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return str(path)


def reference_greedy(path: str, prompt: str, n: int) -> list[int]:
    """Greedy tokens of the unsharded model, full recompute each step (no KV cache)."""
    from lowbit_tp.models import load_model

    model, tok, _ = load_model(path)
    ids = torch.tensor([tok(prompt).input_ids])
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(ids).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


class RecordingReducer:
    """A reducer that runs another and keeps (layer, own partial, result) of every call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def reduce(self, partials, *, layer):
        out = self.inner.reduce(partials, layer=layer)
        self.calls.append((layer, partials[0].clone(), out.clone()))
        return out
