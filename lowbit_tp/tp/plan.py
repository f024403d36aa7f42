"""Tensor parallelism as a plan: module-name patterns mapped to parallel styles.

A :class:`TPPlan` is what DTensor's ``parallelize_module`` and transformers'
``base_model_tp_plan`` call a plan: a dict from module-name pattern (``*`` stands for one
layer number) to a style. The styles:

* ``colwise``: the Linear is split by *output* features; no communication.
* ``rowwise``: the Linear is split by *input* features; every rank's ``[tokens, E]``
  partial output is summed over the ranks (the all-reduce this project compresses, done by
  :class:`~lowbit_tp.tp.row_parallel.RowParallelLinear`).
* ``replicated``: every rank keeps the whole module (also the default for any module the
  plan does not name: embeddings, norms, ``lm_head``).

Each rule also says what its split dimension is made of (:data:`Split`): whole query
heads, whole KV heads (replicated when TP exceeds their count, as in vLLM and Megatron) or
plain features cut into equal contiguous blocks. The sizes of each rank's slice come from
the model's geometry (:mod:`lowbit_tp.models.adapters`), not from the plan.

Patterns are relative to the decoder stack, like transformers' ``base_model_tp_plan``;
:meth:`TPPlan.modules` finds them under any prefix (``model.`` for a causal LM) and
:meth:`TPPlan.transformers_plan` writes the prefixed keys transformers expects.

The simulator, the multi-process runtime and the engine integrations all find their
layers through :meth:`TPPlan.modules` and replace them with :func:`swap_module`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Literal, Mapping

from torch import nn

__all__ = ["DECODER_PLAN", "PlannedModule", "Rule", "Split", "Style", "TPPlan", "swap_module"]

Style = Literal["colwise", "rowwise", "replicated"]
Split = Literal["q_heads", "kv_heads", "features"]
STYLES: tuple[str, ...] = ("colwise", "rowwise", "replicated")
SPLITS: tuple[str, ...] = ("q_heads", "kv_heads", "features")


@dataclass(frozen=True)
class Rule:
    """How one module is parallelised: its ``style`` and what its split dimension holds."""

    style: Style
    split: Split = "features"

    def __post_init__(self):
        if self.style not in STYLES:
            raise ValueError(f"unknown TP style {self.style!r}; choose one of {', '.join(STYLES)}")
        if self.split not in SPLITS:
            raise ValueError(f"unknown split {self.split!r}; choose one of {', '.join(SPLITS)}")


@dataclass(frozen=True)
class PlannedModule:
    """One module the plan names: its full name, the matched pattern, its rule, and the
    decoder layer index (the number that ``*`` matched) and the prefix before the pattern."""

    name: str
    pattern: str
    rule: Rule
    layer_index: int
    prefix: str
    module: nn.Module


@lru_cache(maxsize=None)
def _pattern_regex(pattern: str) -> re.Pattern:
    parts = [r"(?P<index>\d+)" if p == "*" else re.escape(p) for p in pattern.split(".")]
    return re.compile(r"^(?P<prefix>(?:.*\.)?)" + r"\.".join(parts) + "$")


@dataclass(frozen=True)
class TPPlan:
    """Module-name patterns -> :class:`Rule`, in forward order within a decoder layer.

    ``rules`` is a tuple of ``(pattern, rule)`` pairs (build one from a dict with
    :meth:`from_dict`). A pattern has at most one ``*``, which matches a layer number.
    """

    rules: tuple[tuple[str, Rule], ...]

    @classmethod
    def from_dict(cls, rules: Mapping[str, Rule | str]) -> "TPPlan":
        """``{"layers.*.mlp.down_proj": Rule("rowwise"), "lm_head": "replicated", ...}``."""
        return cls(tuple((p, r if isinstance(r, Rule) else Rule(r)) for p, r in rules.items()))

    def __post_init__(self):
        for pattern, _ in self.rules:
            if pattern.split(".").count("*") > 1:
                raise ValueError(f"plan pattern {pattern!r} has more than one '*'")

    def rule_for(self, name: str) -> tuple[str, Rule, int, str] | None:
        """``(pattern, rule, layer_index, prefix)`` of the first pattern matching module
        ``name`` (``layer_index`` is -1 for patterns without ``*``), or None."""
        for pattern, rule in self.rules:
            m = _pattern_regex(pattern).match(name)
            if m is not None:
                index = int(m["index"]) if "index" in m.groupdict() and m["index"] is not None else -1
                return pattern, rule, index, m["prefix"]
        return None

    def modules(self, model: nn.Module, *, style: Style | None = None) -> list[PlannedModule]:
        """Every module of ``model`` the plan names (optionally only ``style``), ordered by
        layer index, then by the rule order. Refuses a match under several prefixes (e.g. a
        vision tower reusing the decoder's names): which one to shard would be a guess."""
        order = {pattern: i for i, (pattern, _) in enumerate(self.rules)}
        found = []
        for name, module in model.named_modules():
            hit = self.rule_for(name)
            if hit is None or (style is not None and hit[1].style != style):
                continue
            pattern, rule, index, prefix = hit
            found.append(PlannedModule(name=name, pattern=pattern, rule=rule, layer_index=index, prefix=prefix,
                                       module=module))
        prefixes = {p.prefix for p in found if p.layer_index >= 0}
        if len(prefixes) > 1:
            raise ValueError(f"the TP plan matches layers under several stacks: {sorted(prefixes)}")
        return sorted(found, key=lambda p: (p.layer_index, order[p.pattern]))

    def forward_order(self, names: Iterable[str]) -> tuple[str, ...]:
        """``names`` (full module names the plan names, under any prefix; repeats dropped) in
        the order a forward pass runs them: by layer index, then by the rule order. For an
        engine that learns its layers' names one by one (transformers' styles, vLLM's layers)."""
        order = {pattern: i for i, (pattern, _) in enumerate(self.rules)}
        keyed, prefixes = {}, set()
        for name in names:
            hit = self.rule_for(name)
            if hit is None:
                raise ValueError(f"the TP plan names no module {name!r}")
            keyed[name] = (hit[2], order[hit[0]])
            if hit[2] >= 0:
                prefixes.add(hit[3])
        if len(prefixes) > 1:  # two stacks (a draft model?) would interleave by layer index
            raise ValueError(f"the TP plan matches layers under several stacks: {sorted(prefixes)}")
        return tuple(sorted(keyed, key=keyed.__getitem__))

    def transformers_plan(self, *, prefix: str = "model.", rowwise: str = "rowwise", colwise: str = "colwise",
                          styles: Iterable[Style] = ("colwise", "rowwise")) -> dict[str, str]:
        """The plan as transformers' ``DistributedConfig(tp_plan=...)`` wants it: keys with
        ``prefix`` (a causal LM holds its decoder under ``model.``), values style names;
        ``rowwise``/``colwise`` name the registered styles to use (e.g. ``lowbit_rowwise``)."""
        names = {"rowwise": rowwise, "colwise": colwise, "replicated": "replicate"}
        keep = set(styles)
        return {prefix + p: names[r.style] for p, r in self.rules if r.style in keep}


# Llama, Mistral, Qwen2, Gemma 2 and Gemma 3 share this layout (Megatron-style TP: q/k/v and
# gate/up column-parallel, o_proj and down_proj row-parallel; o_proj's input is split by
# whole heads to match the q heads each rank computes).
DECODER_PLAN = TPPlan.from_dict({
    "layers.*.self_attn.q_proj": Rule("colwise", "q_heads"),
    "layers.*.self_attn.k_proj": Rule("colwise", "kv_heads"),
    "layers.*.self_attn.v_proj": Rule("colwise", "kv_heads"),
    "layers.*.self_attn.o_proj": Rule("rowwise", "q_heads"),
    "layers.*.mlp.gate_proj": Rule("colwise", "features"),
    "layers.*.mlp.up_proj": Rule("colwise", "features"),
    "layers.*.mlp.down_proj": Rule("rowwise", "features"),
})


def swap_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at dotted path ``name`` of ``model``; return the module it replaces."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    setattr(parent, attr, new)
    return old
