"""Architecture adapters: which Linear layers are row-parallel, and how TP shards them.

Megatron-style tensor parallelism over ``tp`` ranks splits

- column-parallel layers (q, k, v, gate, up) by *output* features: no communication;
- row-parallel layers (``self_attn.o_proj``, ``mlp.down_proj``) by *input* features:
  rank r computes ``Y_r = X[:, s_r] @ W[:, s_r].T`` of full width E (hidden size) and
  the layer output is ``sum_r Y_r`` (+ bias once), which is the all-reduce this project
  compresses.

``o_proj`` is split by whole attention heads (rank r owns the heads its column-parallel
q projection produced), ``down_proj`` by equal contiguous blocks of the intermediate
dimension (matching the gate/up column split). KV heads are replicated when ``tp``
exceeds their count, as in vLLM / Megatron.

The supported families (Llama, Mistral, Qwen2, Gemma 2, Gemma 3 text) share the HF
module layout ``<prefix>.layers.<i>.self_attn.{q,k,v,o}_proj`` and
``<prefix>.layers.<i>.mlp.{gate,up,down}_proj``. In Gemma 2/3 a post-attention and a
post-feedforward RMSNorm follow ``o_proj`` / ``down_proj``; they act on the *reduced*
output, so a runtime must intercept the Linear's output, never the residual stream.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Literal

import torch

from lowbit_tp.collectives.feedback import FeedbackChain, PostNorm, PostNormFeedback
from lowbit_tp.tp.plan import DECODER_PLAN, Rule, TPPlan

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "ArchitectureAdapter",
    "ColumnShard",
    "RowParallelLayer",
    "TPGeometry",
    "check_tp",
    "get_adapter",
    "post_norm_from_weight",
    "post_norm_of",
    "valid_tp_degrees",
]

# model_type -> family name used in messages.
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "gemma2": "Gemma 2",
    "gemma3": "Gemma 3",
    "gemma3_text": "Gemma 3 (text)",
}

# Families whose o_proj / down_proj output goes through an RMSNorm before the residual add
# (Gemma 2/3's post-attention and post-feedforward norms): plain error feedback does not telescope
# there; the chain maps its carries through those norms (PostNormFeedback).
POST_NORM_MODEL_TYPES = frozenset({"gemma2", "gemma3", "gemma3_text"})

LayerKind = Literal["attn_out", "mlp_down"]

_KIND_BY_SPLIT: dict[str, LayerKind] = {"q_heads": "attn_out", "features": "mlp_down"}
_POST_NORM_BY_KIND: dict[str, str] = {"attn_out": "post_attention_layernorm", "mlp_down": "post_feedforward_layernorm"}


def post_norm_from_weight(weight: torch.Tensor, *, eps: float) -> PostNorm:
    """A Gemma RMSNorm as :class:`PostNorm`: gain ``1 + weight`` (fp32, a copy), ``eps``."""
    return PostNorm(gain=1.0 + weight.detach().float().clone(), eps=float(eps))


def post_norm_of(norm: torch.nn.Module) -> PostNorm:
    """:func:`post_norm_from_weight` of a loaded Gemma RMSNorm module (its ``weight``, and
    ``eps`` or ``variance_epsilon``)."""
    return post_norm_from_weight(norm.weight, eps=getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))


@dataclass(frozen=True)
class RowParallelLayer:
    """One row-parallel Linear: ``out_features`` is the hidden size E (the width of
    every rank's partial output), ``in_features`` the dimension TP splits."""

    name: str
    kind: LayerKind
    layer_index: int
    in_features: int
    out_features: int


@dataclass(frozen=True)
class ColumnShard:
    """What rank ``rank`` computes on the column-parallel side.

    ``q_heads``: the query heads it owns (contiguous). ``kv_heads``: the KV heads those
    queries read under GQA (q head h uses kv head ``h // (num_heads // num_kv_heads)``);
    when ``tp > num_kv_heads`` each KV head is replicated on ``tp // num_kv_heads`` ranks.
    ``mlp_features``: the gate/up output features it owns, equal to its ``down_proj``
    input shard.
    """

    rank: int
    q_heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    mlp_features: slice


@dataclass(frozen=True)
class TPGeometry:
    """The sizes that decide how a model can be sharded (all counts, not bytes)."""

    model_type: str
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    num_layers: int
    name: str

    @classmethod
    def from_config(cls, config: Any, *, name: str | None = None) -> "TPGeometry":
        config = _text_config(config)
        num_heads, num_kv = head_counts(config)
        hidden = int(config.hidden_size)
        # Gemma 2/3 (and some Llama variants) set head_dim independently of hidden/heads.
        head_dim = getattr(config, "head_dim", None) or hidden // num_heads
        return cls(
            model_type=str(config.model_type),
            hidden_size=hidden,
            num_heads=num_heads,
            num_kv_heads=num_kv,
            head_dim=int(head_dim),
            intermediate_size=int(config.intermediate_size),
            num_layers=int(config.num_hidden_layers),
            name=name or _config_name(config),
        )


def head_counts(config: Any) -> tuple[int, int]:
    """``(query heads, KV heads)`` of a decoder config or a model (its ``.config``), reading only
    ``num_attention_heads`` and ``num_key_value_heads`` (absent or None: as many as the query
    heads). Checks that are about heads only use this, not :class:`TPGeometry`, which needs
    every size and so failed on configs that lack an unrelated one."""
    config = _text_config(_as_config(config))
    num_heads = int(config.num_attention_heads)
    return num_heads, int(getattr(config, "num_key_value_heads", None) or num_heads)


def head_counts_or_none(config: Any) -> tuple[int, int] | None:
    """:func:`head_counts` of ``config``, or None without a config or without head counts to read
    (the heads checks of the DTensor and transformers styles then check nothing)."""
    if config is None:
        return None
    try:
        return head_counts(config)
    except (AttributeError, TypeError, ValueError):
        return None


def even_heads_refusal(heads: tuple[int, int], tp: int, *, splitter: str) -> str | None:
    """Why ``splitter`` (a TP that splits the attention heads evenly and cannot replicate KV
    heads: DTensor's ``parallelize_module``, transformers' own TP) cannot run ``heads``
    (``(query heads, KV heads)``, :func:`head_counts`) at TP ``tp``, or None when it can. The
    native runtime and vLLM replicate KV heads instead (:func:`check_tp`)."""
    q, kv = heads
    if q % tp == 0 and kv % tp == 0:
        return None
    return (f"{splitter} splits the attention heads evenly and cannot replicate KV heads: TP {tp} must divide the "
            f"{q} query and {kv} KV head(s); use the native runtime (lowbit_tp.runtime) or vLLM, which replicate "
            f"KV heads")


def _text_config(config: Any) -> Any:
    # Multimodal wrappers (Gemma3Config) keep the decoder's fields in text_config.
    return getattr(config, "text_config", None) or config


def _config_name(config: Any) -> str:
    path = str(getattr(config, "_name_or_path", "") or "")
    return path.rstrip("/").rsplit("/", 1)[-1] or str(config.model_type)


def _as_config(model_or_config: Any) -> Any:
    return getattr(model_or_config, "config", model_or_config)


def _tp_failures(geo: TPGeometry, tp: int) -> list[str]:
    failures = []
    if geo.num_heads % tp:
        failures.append(f"does not divide the {geo.num_heads} attention heads")
    if geo.num_kv_heads % tp and tp % geo.num_kv_heads:
        failures.append(
            f"neither divides nor is a multiple of the {geo.num_kv_heads} KV heads"
        )
    if geo.intermediate_size % tp:
        failures.append(f"does not divide the intermediate size {geo.intermediate_size}")
    return failures


def valid_tp_degrees(config: Any) -> list[int]:
    """TP degrees N >= 1 with ``num_heads % N == 0``, ``intermediate_size % N == 0`` and
    ``num_kv_heads % N == 0 or N % num_kv_heads == 0`` (KV heads split or replicated).

    Accepts a config, a model (uses ``.config``) or a :class:`TPGeometry`.
    """
    geo = _geometry(config)
    return [n for n in range(1, geo.num_heads + 1) if not _tp_failures(geo, n)]


def check_tp(config: Any, tp: int, *, name: str | None = None) -> None:
    """Raise ``ValueError`` naming every failed constraint and the valid degrees.

    ``name`` labels the model in the message (default: from the config's path).
    """
    geo = _geometry(config, name=name)
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ValueError(f"TP degree must be a positive integer, got {tp!r}")
    failures = _tp_failures(geo, tp)
    if failures:
        valid = ", ".join(str(n) for n in valid_tp_degrees(geo))
        # The model's name follows the first failure so the common case reads
        # "TP degree 2 does not divide the 9 attention heads of smollm2-135m; ...".
        reasons = " and ".join([f"{failures[0]} of {geo.name}", *failures[1:]])
        raise ValueError(f"TP degree {tp} {reasons}; valid degrees: {valid}")


def _geometry(config: Any, *, name: str | None = None) -> TPGeometry:
    if isinstance(config, TPGeometry):
        return config if name is None else replace(config, name=name)
    return TPGeometry.from_config(_as_config(config), name=name)


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Sharding rules for one model (bound to its geometry). Build with :func:`get_adapter`."""

    family: str
    geometry: TPGeometry
    plan: TPPlan = DECODER_PLAN
    post_norm: bool = False  # row-parallel outputs are normalised before the residual add (Gemma 2/3)

    def post_norm_name(self, layer: str) -> str:
        """Gemma 2/3: the full name of the norm between row-parallel ``layer`` and the residual
        (``...self_attn.o_proj`` -> ``...post_attention_layernorm``, ``...mlp.down_proj`` ->
        ``...post_feedforward_layernorm`` of the same decoder layer). Also for the plan's patterns
        (``layers.*.mlp.down_proj``), which is how the transformers style names them in its plan."""
        rule = dict(self.plan.rules).get(layer)
        if rule is None:
            hit = self.plan.rule_for(layer)
            rule = None if hit is None else hit[1]
        if not self.post_norm or rule is None or rule.style != "rowwise":
            raise ValueError(f"{self.family}: {layer!r} is not a row-parallel layer followed by a post-norm")
        return f"{layer.rsplit('.', 2)[0]}.{_POST_NORM_BY_KIND[_KIND_BY_SPLIT[rule.split]]}"

    def post_norms(self, model: torch.nn.Module) -> dict[str, PostNorm]:
        """Gemma 2/3: each row-parallel layer's norm before the residual add
        (:meth:`post_norm_name`, :func:`post_norm_of`). Empty for pre-norm families."""
        if not self.post_norm:
            return {}
        return {l.name: post_norm_of(model.get_submodule(self.post_norm_name(l.name)))
                for l in self.row_parallel_layers(model)}

    def feedback_chain(self, model: torch.nn.Module, *, tp: int, ranks: int,
                       owner_errors: bool = True) -> FeedbackChain:
        """The error-feedback state for ``ranks`` ranks of a TP-``tp`` run of ``model`` (all N
        in a simulation, 1 on a real rank): plain for pre-norm families, mapped through the
        post-norms for Gemma 2/3 (:class:`~lowbit_tp.collectives.feedback.PostNormFeedback`).
        ``owner_errors``: :attr:`FeedbackChain.owner_errors`."""
        return self.feedback_chain_for([l.name for l in self.row_parallel_layers(model)], tp=tp, ranks=ranks,
                                       norm_of=lambda name: post_norm_of(model.get_submodule(name)),
                                       owner_errors=owner_errors)

    def feedback_chain_for(self, layers: Iterable[str], *, tp: int, ranks: int,
                           norm_of: Callable[[str], PostNorm] | None = None,
                           owner_errors: bool = True) -> FeedbackChain:
        """:meth:`feedback_chain` for an engine that holds no whole model but learns its
        row-parallel ``layers`` by name (any order; the plan's forward order is taken) and can
        give the :class:`PostNorm` of a norm by its full name (``norm_of``, Gemma 2/3 only:
        transformers' style from the norm modules in its plan, the vLLM plugin from the
        checkpoint). A post-norm family without ``norm_of`` is refused: a plain carry there
        makes the output garbage."""
        order = self.plan.forward_order(layers)
        if not self.post_norm:
            return FeedbackChain(order, ranks=ranks, owner_errors=owner_errors)
        if norm_of is None:
            raise ValueError(f"error feedback on {self.family} needs its post-norms (the carry is mapped "
                             f"through them), and none were given")
        norms = {name: norm_of(self.post_norm_name(name)) for name in order}
        return FeedbackChain(order, ranks=ranks, post_norm=PostNormFeedback(norms=norms, tp=tp),
                             owner_errors=owner_errors)

    def row_parallel_layers(self, model: torch.nn.Module) -> list[RowParallelLayer]:
        """Every decoder layer's ``o_proj`` then ``down_proj`` (the plan's ``rowwise``
        modules), in forward order."""
        layers = []
        for planned in self.plan.modules(model, style="rowwise"):
            module = planned.module
            if not isinstance(module, torch.nn.Linear):
                raise TypeError(f"{planned.name} is {type(module).__name__}, expected nn.Linear")
            layers.append(RowParallelLayer(
                name=planned.name,
                kind=_KIND_BY_SPLIT[planned.rule.split],
                layer_index=planned.layer_index,
                in_features=module.in_features,
                out_features=module.out_features,
            ))
        if len(layers) != 2 * self.geometry.num_layers:
            raise ValueError(
                f"expected {2 * self.geometry.num_layers} row-parallel layers "
                f"({self.geometry.num_layers} decoder layers), found {len(layers)}"
            )
        return layers

    def split_slices(self, rule: Rule, size: int, tp: int) -> list[slice]:
        """Per rank, the slice of a dimension of ``size`` that ``rule`` splits: the
        contiguous query heads of that rank (``q_heads``), the KV heads they read
        (``kv_heads``, replicated when ``tp > num_kv_heads``), or equal contiguous blocks
        (``features``). The ``q_heads`` and ``features`` slices partition ``range(size)``."""
        check_tp(self.geometry, tp)
        geo = self.geometry
        if rule.split == "features":
            if size % tp:
                raise ValueError(f"TP degree {tp} does not divide {size} features")
            width = size // tp
            return [slice(r * width, (r + 1) * width) for r in range(tp)]
        heads = geo.num_heads if rule.split == "q_heads" else geo.num_kv_heads
        if size != heads * geo.head_dim:
            raise ValueError(f"{size} features, expected {rule.split} * head_dim = {heads} * {geo.head_dim} "
                             f"= {heads * geo.head_dim}")
        key = "q_heads" if rule.split == "q_heads" else "kv_heads"
        out = []
        for shard in self.column_shards(tp):
            units = getattr(shard, key)
            out.append(slice(units[0] * geo.head_dim, (units[-1] + 1) * geo.head_dim))
        return out

    def input_shards(self, layer: RowParallelLayer, tp: int) -> list[slice]:
        """Per rank, the slice of ``layer``'s input features it owns (length ``tp``).

        ``attn_out``: whole heads, ``num_heads // tp`` heads of ``head_dim`` each.
        ``mlp_down``: contiguous blocks of ``in_features // tp``. The slices are disjoint
        and cover ``range(layer.in_features)`` in rank order.
        """
        rule = Rule("rowwise", "q_heads" if layer.kind == "attn_out" else "features")
        try:
            return self.split_slices(rule, layer.in_features, tp)
        except ValueError as exc:
            raise ValueError(f"{layer.name}: {exc}") from None

    def column_shards(self, tp: int) -> list[ColumnShard]:
        """Per rank, the q heads, KV heads and gate/up features it computes."""
        check_tp(self.geometry, tp)
        geo = self.geometry
        q_per_rank = geo.num_heads // tp
        group = geo.num_heads // geo.num_kv_heads  # q heads sharing one KV head
        mlp_width = geo.intermediate_size // tp
        shards = []
        for rank in range(tp):
            q_heads = tuple(range(rank * q_per_rank, (rank + 1) * q_per_rank))
            kv_heads = tuple(sorted({h // group for h in q_heads}))
            shards.append(
                ColumnShard(
                    rank=rank,
                    q_heads=q_heads,
                    kv_heads=kv_heads,
                    mlp_features=slice(rank * mlp_width, (rank + 1) * mlp_width),
                )
            )
        return shards


def get_adapter(model_or_config: Any, *, name: str | None = None) -> ArchitectureAdapter:
    """Adapter for a model or config, chosen by ``config.model_type``.

    Raises ``ValueError`` naming the supported families for any other architecture.
    """
    config = _as_config(model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(f"{v} ({k})" for k, v in SUPPORTED_MODEL_TYPES.items())
        raise ValueError(
            f"no tensor-parallel adapter for model_type {model_type!r}; supported: {supported}"
        )
    geo = TPGeometry.from_config(config, name=name)
    if geo.num_heads % geo.num_kv_heads:
        raise ValueError(
            f"{geo.name}: {geo.num_heads} attention heads are not a multiple of "
            f"{geo.num_kv_heads} KV heads"
        )
    return ArchitectureAdapter(family=SUPPORTED_MODEL_TYPES[model_type], geometry=geo,
                               post_norm=model_type in POST_NORM_MODEL_TYPES)
