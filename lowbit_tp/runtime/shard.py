"""Turn a full HF model into one rank's tensor-parallel shard, in place.

Rank r of ``tp`` keeps (METHOD.md §1, sharding rules from
:class:`~lowbit_tp.models.adapters.ArchitectureAdapter`):

* column-parallel: the rows of ``q_proj`` for its q heads, of ``k_proj``/``v_proj`` for
  the KV heads those q heads read (replicated when ``tp > num_kv_heads``), and its block
  of ``gate_proj``/``up_proj`` rows (biases sliced alike). No communication.
* row-parallel: the matching columns of ``o_proj``/``down_proj``, wrapped in
  :class:`RowParallelLinear`, whose forward triggers one
  :func:`~lowbit_tp.collectives.all_reduce` of a ``[tokens, E]`` partial.
* everything else (embeddings, norms, ``lm_head``) replicated.

Loading: each rank loads the *full* checkpoint once and slices it here; the dropped
weights are freed afterwards. A production runtime would read only its shard from disk
(safetensors slices) so that peak memory is the shard's, not the model's;
:func:`shard_model` reports both parameter byte counts so the saving is visible.

The per-rank arithmetic is :func:`~lowbit_tp.models.sharding.local_partial` on
:func:`~lowbit_tp.models.sharding.shard_weight`, the same calls the simulator makes, so a
rank's partial is bitwise the simulator's whenever its ``o_proj``/``down_proj`` input is.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit_tp.codecs.base import Codec
from lowbit_tp.collectives import AutoPolicy, CommStats, all_reduce
from lowbit_tp.models.adapters import ArchitectureAdapter, check_tp, get_adapter
from lowbit_tp.models.sharding import local_partial, shard_weight

__all__ = ["RowParallelLinear", "ShardInfo", "TPComm", "param_bytes", "shard_model"]


@dataclass
class TPComm:
    """How one rank's row-parallel layers reduce their partials; shared by all of them.

    ``stats`` accumulates what this rank sends (from the payloads, see
    :class:`~lowbit_tp.collectives.CommStats`); it is the only mutable field.
    """

    codec: Codec
    group: Any = None
    algorithm: str = "auto"
    policy: AutoPolicy | None = None
    stats: CommStats = field(default_factory=CommStats)


class RowParallelLinear(nn.Module):
    """Rank r's columns ``W[:, s_r]`` of a row-parallel Linear plus the all-reduce.

    ``forward(x [..., D_r]) -> [..., E]``: ``local_partial`` on this rank's input shard,
    then one :func:`~lowbit_tp.collectives.all_reduce` (``comm.algorithm``, ``layer=name``),
    then the full bias, added once after the reduce. All ranks must call it together.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, name: str, comm: TPComm):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.name = name
        self.comm = comm

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        partial = local_partial(x.reshape(-1, x.shape[-1]), self.weight)
        c = self.comm
        y = all_reduce(partial, c.codec, c.group, algorithm=c.algorithm, layer=self.name, policy=c.policy,
                       stats=c.stats)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, y.shape[-1])

    def extra_repr(self) -> str:
        return f"name={self.name!r}, in_features={self.in_features}, out_features={self.out_features}"


@dataclass(frozen=True)
class ShardInfo:
    """What :func:`shard_model` kept. Bytes are parameter bytes (``numel * element_size``)."""

    rank: int
    tp: int
    q_heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    mlp_features: tuple[int, int]
    full_param_bytes: int
    shard_param_bytes: int


def param_bytes(model: nn.Module) -> int:
    """Bytes of the distinct parameter tensors of ``model`` (tied weights counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def _keep_rows(linear: nn.Linear, rows: slice) -> None:
    """Shrink ``linear`` to output rows ``rows`` (weight and bias), dropping the rest."""
    linear.weight = nn.Parameter(linear.weight.detach()[rows].contiguous(), requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach()[rows].contiguous(), requires_grad=False)
    linear.out_features = linear.weight.shape[0]


def _span(items: tuple[int, ...], width: int) -> slice:
    """Rows of contiguous units ``items`` (heads), each ``width`` rows wide."""
    if list(items) != list(range(items[0], items[-1] + 1)):
        raise ValueError(f"expected contiguous heads, got {items}")
    return slice(items[0] * width, (items[-1] + 1) * width)


def shard_model(model: nn.Module, *, rank: int, tp: int, comm: TPComm,
                adapter: ArchitectureAdapter | None = None) -> ShardInfo:
    """Keep only rank ``rank``'s shard of ``model`` (in place) and return what was kept.

    ``comm`` is shared by every :class:`RowParallelLinear` installed. Sets each attention
    module's ``num_key_value_groups`` to the local q-heads-per-KV-head ratio (the HF
    attention kernels read it; head counts themselves follow from ``view(..., -1,
    head_dim)``). The model's config is left as it was (it describes the full model).
    """
    adapter = adapter or get_adapter(model)
    check_tp(model.config, tp, name=adapter.geometry.name)
    if not 0 <= rank < tp:
        raise ValueError(f"rank {rank} is outside 0..{tp - 1}")
    geo = adapter.geometry
    col = adapter.column_shards(tp)[rank]
    full_bytes = param_bytes(model)
    q_rows = _span(col.q_heads, geo.head_dim)
    kv_rows = _span(col.kv_heads, geo.head_dim)
    for layer in adapter.row_parallel_layers(model):
        parent_name, _, attr = layer.name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, attr)
        shard = adapter.input_shards(layer, tp)[rank]
        if layer.kind == "attn_out":
            if shard != q_rows:
                raise AssertionError(f"{layer.name}: o_proj shard {shard} != q rows {q_rows}")
            _keep_rows(parent.q_proj, q_rows)
            _keep_rows(parent.k_proj, kv_rows)
            _keep_rows(parent.v_proj, kv_rows)
            parent.num_key_value_groups = len(col.q_heads) // len(col.kv_heads)
            for attr_name, value in (("num_heads", len(col.q_heads)), ("num_key_value_heads", len(col.kv_heads))):
                if hasattr(parent, attr_name):  # older transformers releases keep head counts on the module
                    setattr(parent, attr_name, value)
        else:
            _keep_rows(parent.gate_proj, col.mlp_features)
            _keep_rows(parent.up_proj, col.mlp_features)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        setattr(parent, attr, RowParallelLinear(shard_weight(linear.weight.detach(), shard), bias,
                                                name=layer.name, comm=comm))
        del linear
    gc.collect()
    return ShardInfo(rank=rank, tp=tp, q_heads=col.q_heads, kv_heads=col.kv_heads,
                     mlp_features=(col.mlp_features.start, col.mlp_features.stop),
                     full_param_bytes=full_bytes, shard_param_bytes=param_bytes(model))
