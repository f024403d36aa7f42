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

import re
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "ArchitectureAdapter",
    "ColumnShard",
    "RowParallelLayer",
    "TPGeometry",
    "check_tp",
    "get_adapter",
    "partial_outputs",
    "reduce_partials",
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

LayerKind = Literal["attn_out", "mlp_down"]

_ROW_PARALLEL_RE = re.compile(
    r"^(?P<prefix>(?:.*\.)?)layers\.(?P<index>\d+)\.(?P<leaf>self_attn\.o_proj|mlp\.down_proj)$"
)
_KIND_BY_LEAF: dict[str, LayerKind] = {
    "self_attn.o_proj": "attn_out",
    "mlp.down_proj": "mlp_down",
}
_KIND_ORDER = {"attn_out": 0, "mlp_down": 1}


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
        num_heads = int(config.num_attention_heads)
        hidden = int(config.hidden_size)
        # Gemma 2/3 (and some Llama variants) set head_dim independently of hidden/heads.
        head_dim = getattr(config, "head_dim", None) or hidden // num_heads
        num_kv = getattr(config, "num_key_value_heads", None) or num_heads
        return cls(
            model_type=str(config.model_type),
            hidden_size=hidden,
            num_heads=num_heads,
            num_kv_heads=int(num_kv),
            head_dim=int(head_dim),
            intermediate_size=int(config.intermediate_size),
            num_layers=int(config.num_hidden_layers),
            name=name or _config_name(config),
        )


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

    def row_parallel_layers(self, model: torch.nn.Module) -> list[RowParallelLayer]:
        """Every decoder layer's ``o_proj`` then ``down_proj``, in forward order."""
        found: list[tuple[str, RowParallelLayer]] = []
        for name, module in model.named_modules():
            match = _ROW_PARALLEL_RE.match(name)
            if match is None:
                continue
            if not isinstance(module, torch.nn.Linear):
                raise TypeError(f"{name} is {type(module).__name__}, expected nn.Linear")
            kind = _KIND_BY_LEAF[match["leaf"]]
            layer = RowParallelLayer(
                name=name,
                kind=kind,
                layer_index=int(match["index"]),
                in_features=module.in_features,
                out_features=module.out_features,
            )
            found.append((match["prefix"], layer))
        prefixes = {prefix for prefix, _ in found}
        if len(prefixes) > 1:
            # e.g. a multimodal model whose vision tower reuses the names: refuse to guess.
            raise ValueError(f"row-parallel layers found under several stacks: {sorted(prefixes)}")
        layers = [layer for _, layer in found]
        if len(layers) != 2 * self.geometry.num_layers:
            raise ValueError(
                f"expected {2 * self.geometry.num_layers} row-parallel layers "
                f"({self.geometry.num_layers} decoder layers), found {len(layers)}"
            )
        return sorted(layers, key=lambda l: (l.layer_index, _KIND_ORDER[l.kind]))

    def input_shards(self, layer: RowParallelLayer, tp: int) -> list[slice]:
        """Per rank, the slice of ``layer``'s input features it owns (length ``tp``).

        ``attn_out``: whole heads, ``num_heads // tp`` heads of ``head_dim`` each.
        ``mlp_down``: contiguous blocks of ``in_features // tp``. The slices are disjoint
        and cover ``range(layer.in_features)`` in rank order.
        """
        check_tp(self.geometry, tp)
        if layer.kind == "attn_out":
            expected = self.geometry.num_heads * self.geometry.head_dim
            if layer.in_features != expected:
                raise ValueError(
                    f"{layer.name} has {layer.in_features} input features, expected "
                    f"num_heads * head_dim = {self.geometry.num_heads} * "
                    f"{self.geometry.head_dim} = {expected}"
                )
            width = self.geometry.num_heads // tp * self.geometry.head_dim
        elif layer.kind == "mlp_down":
            if layer.in_features % tp:
                raise ValueError(
                    f"{layer.name}: TP degree {tp} does not divide {layer.in_features} inputs"
                )
            width = layer.in_features // tp
        else:
            raise ValueError(f"unknown row-parallel layer kind {layer.kind!r}")
        return [slice(r * width, (r + 1) * width) for r in range(tp)]

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
    return ArchitectureAdapter(family=SUPPORTED_MODEL_TYPES[model_type], geometry=geo)


def partial_outputs(
    x: torch.Tensor, weight: torch.Tensor, shards: list[slice]
) -> list[torch.Tensor]:
    """Each rank's partial output ``x[..., s_r] @ weight[:, s_r].T`` (no bias).

    ``x``: ``[..., D]``; ``weight``: ``[E, D]`` (nn.Linear layout); ``shards``: the
    input slices from :meth:`ArchitectureAdapter.input_shards`. Each partial is
    ``[..., E]``; their sum is ``x @ weight.T``. A Linear's bias is *not* part of any
    partial: it is added once, after the reduce (see :func:`reduce_partials`), never
    per rank.
    """
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x has {x.shape[-1]} features but weight is {tuple(weight.shape)} (expected [E, D])"
        )
    return [x[..., s] @ weight[:, s].T for s in shards]


def reduce_partials(
    partials: list[torch.Tensor], *, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The exact all-reduce: sum of the partials, plus ``bias`` once if given."""
    if not partials:
        raise ValueError("no partial outputs to reduce")
    total = torch.stack(partials).sum(dim=0)
    return total if bias is None else total + bias
