"""The Fisher predictor of a codec's KL (dev work; shared by kl_anatomy.py and ecsq_screen.py).

On calibration windows: the diagonal Fisher of the model's own next-token distribution at
every all-reduce output, ``F[t, j] = E_y (d log p(y) / d h[t, j])**2`` (``y`` drawn from
the model, one backward pass per draw), and every layer's TP partials. Then
``0.5 * sum F * err**2 / T`` predicts the KL per token that an all-reduce error ``err``
at that layer causes (checked against measured single-layer KLs in docs/design-dev.md).
"""
from __future__ import annotations

import torch


def calibration_windows(cal, tokenizer, windows: int) -> torch.Tensor:
    """The first ``windows`` calibration windows of ``cal`` (the artifact lists them, so
    ``eval --split dev`` never reads them); ``[windows, seq_len]`` token ids."""
    from lowbit_tp.data import chunk_tokens, load_split

    cc = cal.meta["text"]["chunks"]
    ch = chunk_tokens(tokenizer, load_split(cal.meta.get("config", {}).get("text")).calibration,
                      num_samples=cc["num_samples"], seq_len=cal.meta["config"]["seq_len"], seed=cal.meta["config"]["seed"])
    if ch.manifest()["samples"] != cc["samples"]:
        raise SystemExit("calibration windows differ from the artifact's")
    return ch.input_ids[:windows]


def diagonal_fisher(model, ids: torch.Tensor, names: list[str], hidden: int, *, draws: int) -> dict:
    """``{layer: F [tokens, hidden]}`` at every all-reduce output (the residual just after the add)."""
    mods = dict(model.named_modules())
    outs: dict = {}

    def keep(n):
        def hook(m, i, o):
            o.retain_grad()
            outs[n] = o
        return hook

    hooks = [mods[n].register_forward_hook(keep(n)) for n in names]
    hooks.append(model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True)))
    fisher = dict.fromkeys(names, 0.0)
    try:
        with torch.enable_grad():
            for _ in range(draws):
                lp = torch.log_softmax(model(ids).logits.float(), -1)
                y = torch.distributions.Categorical(logits=lp.detach()).sample()
                lp.gather(-1, y.unsqueeze(-1)).sum().backward()
                for n in names:
                    fisher[n] = fisher[n] + outs[n].grad.reshape(-1, hidden).pow(2) / draws
                outs.clear()
    finally:
        for h in hooks:
            h.remove()
    return fisher


def tp_partials(model, ids: torch.Tensor, *, tp: int, name: str) -> dict:
    """``{layer: (partials [tp, tokens, E] fp32, exact sum [tokens, E] fp32)}``."""
    from lowbit_tp.simulator import TPSimulator

    parts: dict = {}

    def observe(layer, partials, total):
        parts[layer] = (torch.stack([p.float() for p in partials]).clone(), total.float().clone())

    with torch.no_grad(), TPSimulator(model, tp=tp, observer=observe, name=name):
        model(ids)
    return parts


def predicted_kl(fisher_layer: torch.Tensor, err: torch.Tensor, rows=slice(None)) -> float:
    """Predicted KL per token of the all-reduce error ``err [tokens, E]`` (the ``rows`` of
    the Fisher it was measured on)."""
    return 0.5 * float((fisher_layer[rows] * err.pow(2)).sum()) / err.shape[0]
