"""Tiny models and tokenizers shared by the tests (nothing to download).

``tiny_config(family)`` gives a 2-layer config of each supported family, ``byte_tokenizer()``
a byte-level tokenizer with no merges, ``save_tiny(root, family)`` a checkpoint directory
of both, and ``reference_greedy`` the unsharded model's greedy tokens (full recompute per
step, no KV cache: an independent reference for every engine). ``sweep(cases, keep)`` splits
a parametrized sweep between the default suite and the slow one.
"""
from __future__ import annotations

import pytest
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
    if family == "gemma2":  # attention and final-logit soft-capping on, as in the real model
        return tf.Gemma2Config(**common, head_dim=16, sliding_window=8)
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


def tiny_gemma_model(family: str = "gemma3"):
    """:func:`tiny_model` of Gemma 2 or 3 with the post-norm gains spread as in the real model
    (``1 + weight`` from about -0.5 to 8.5, some below the feedback's gain floor)."""
    model = tiny_model(family)
    with torch.no_grad():
        for n, m in model.named_modules():
            if n.endswith(("post_attention_layernorm", "post_feedforward_layernorm")):
                m.weight.copy_(torch.rand(m.weight.shape, generator=torch.Generator().manual_seed(len(n))) * 8 - 0.5)
    return model


def save_tiny_gemma(root, family: str = "gemma3") -> str:
    """:func:`save_tiny` of :func:`tiny_gemma_model`."""
    model = tiny_gemma_model(family)
    path = root / family
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return str(path)


def gemma_post_norms(model) -> dict:
    """Row-parallel layer name -> (gain ``1 + weight`` of the norm after it, eps), read off the
    transformers model by Gemma's module names."""
    out = {}
    for name, _ in model.named_modules():
        if name.endswith(("o_proj", "down_proj")):
            block = name.rsplit(".", 2)[0]
            norm = model.get_submodule(block + (".post_attention_layernorm" if name.endswith("o_proj")
                                                else ".post_feedforward_layernorm"))
            out[name] = (1.0 + norm.weight.detach().float(), norm.eps)
    return out


def postnorm_step(parts, shares, norm, codec, algo, layer, *, floor=0.3, cap=2.0):
    """One all-reduce of Gemma's error-feedback chain written from its definition
    (collectives/feedback.py's module doc): rank r, holding its residual-space share d_r
    (None: none yet), sends ``p_r + c_r``, ``c_r = -sqrt(N) rms(p_r) d_r / g`` (0 where
    |g| < floor * median|g|, clipped to +-cap rms(p_r)), g the gain of the norm after the layer;
    after the sum y it adds ``J(y)(c_r + q_r)`` to d_r (q_r: its quantization error,
    ``-Feedback.next``), J the norm's Jacobian ``g / rho (v - y mean(y v) / rho^2)``,
    rho^2 = mean(y^2) + eps. ``norm`` is ``(g, eps)``. Returns (y, the new shares)."""
    from lowbit_tp.collectives import simulate_all_reduce
    from lowbit_tp.collectives.feedback import Feedback

    g, eps = norm
    world = len(parts)
    comps = [None] * world
    if shares is not None and shares[0] is not None:
        inv = torch.where(g.abs() >= floor * g.abs().median(), 1.0 / g, torch.zeros(()))
        for r, p in enumerate(parts):
            rms_p = (p.float() * p.float()).mean(-1, keepdim=True).sqrt()
            c = -(world ** 0.5) * rms_p * shares[r] * inv
            comps[r] = torch.maximum(torch.minimum(c, cap * rms_p), -cap * rms_p)
    fbs = [Feedback(carry=c) for c in comps]
    y = simulate_all_reduce(parts, codec, algo, layer=layer, feedback=fbs)
    yf = y.float()
    ms = (yf * yf).mean(-1, keepdim=True) + eps
    new = []
    for r in range(world):
        v = -fbs[r].next if comps[r] is None else comps[r] - fbs[r].next
        jv = g * (v - yf * ((yf * v).mean(-1, keepdim=True) / ms)) / ms.sqrt()
        new.append(jv if comps[r] is None else shares[r] + jv)
    return y, new


def postnorm_replay(calls, norms, codec, algo, world):
    """:func:`postnorm_step` over recorded calls (``calls[rank][j] = (layer, partial, output)``);
    every forward pass (a call of the first layer) starts with no shares. Returns the outputs
    the definition predicts."""
    first, shares, want = calls[0][0][0], None, []
    for j, (layer, _, _) in enumerate(calls[0]):
        if layer == first:
            shares = None
        y, shares = postnorm_step([calls[r][j][1] for r in range(world)], shares, norms[layer], codec, algo, layer)
        want.append(y)
    return want


def raised(codec, run) -> str:
    """What ``run()`` raised, at once or (deferred error mode) at the step's check_nonfinite()."""
    from lowbit_tp.codecs.base import NonFiniteError, OutOfRangeError

    try:
        run()
        codec.check_nonfinite()
    except OutOfRangeError:
        return "out of range"
    except NonFiniteError:
        return "non-finite"
    return "ok"


def sweep(cases, keep):
    """Parametrize values for a sweep: the cases with ``keep(case)`` run in the default suite,
    the others carry the ``slow`` mark, so ``make test-slow`` (which CI runs) keeps the whole
    sweep. A case already made by ``pytest.param`` passes through unchanged. A tuple case
    fills several argument names (``"tokens,hidden"``)."""
    param_type = type(pytest.param(0))
    return [case if isinstance(case, param_type) or keep(case)
            else pytest.param(*(case if isinstance(case, tuple) else (case,)), marks=pytest.mark.slow)
            for case in cases]
