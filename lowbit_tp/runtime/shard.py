"""Turn a full HF model into one rank's tensor-parallel shard, in place, following its TP plan.

Rank r of ``tp`` keeps (the Megatron-style row/column split; the plan is the adapter's
:class:`~lowbit_tp.tp.TPPlan`, the slice sizes its geometry):

* ``colwise`` modules: the output rows of its q heads (``q_proj``), of the KV heads those
  q heads read (``k_proj``/``v_proj``, replicated when ``tp > num_kv_heads``), of its block
  of ``gate_proj``/``up_proj`` (biases sliced alike). No communication.
* ``rowwise`` modules: the matching input columns of ``o_proj``/``down_proj``, as a
  :class:`~lowbit_tp.tp.RowParallelLinear` whose reducer (a
  :class:`~lowbit_tp.tp.DistReducer`, shared by all of them) runs one
  :func:`~lowbit_tp.collectives.all_reduce` of a ``[tokens, E]`` partial per call.
* everything else (embeddings, norms, ``lm_head``) replicated.

Loading: each rank loads the *full* checkpoint once and slices it here; the dropped
weights are freed afterwards. A production runtime would read only its shard from disk
(safetensors slices) so that peak memory is the shard's, not the model's;
:func:`shard_model` reports both parameter byte counts so the saving is visible.

The per-rank arithmetic is the simulator's (:func:`~lowbit_tp.tp.local_partial` on
:func:`~lowbit_tp.tp.shard_weight` inside the same :class:`~lowbit_tp.tp.RowParallelLinear`),
so a rank's partial is bitwise the simulator's whenever its ``o_proj``/``down_proj`` input is.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass

from torch import nn

from lowbit_tp.models.adapters import ArchitectureAdapter, check_tp, get_adapter
from lowbit_tp.tp.plan import swap_module
from lowbit_tp.tp.row_parallel import Reducer, RowParallelLinear, shard_weight

__all__ = ["ShardInfo", "param_bytes", "shard_model"]


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


def shard_model(model: nn.Module, *, rank: int, tp: int, reducer: Reducer,
                adapter: ArchitectureAdapter | None = None) -> ShardInfo:
    """Keep only rank ``rank``'s shard of ``model`` (in place) and return what was kept.

    ``reducer`` (typically one :class:`~lowbit_tp.tp.DistReducer` for this rank's group) is
    shared by every :class:`~lowbit_tp.tp.RowParallelLinear` installed. Sets each attention
    module's ``num_key_value_groups`` to the local q-heads-per-KV-head ratio (the HF
    attention kernels read it; head counts themselves follow from ``view(..., -1,
    head_dim)``). The model's config is left as it was (it describes the full model).
    """
    adapter = adapter or get_adapter(model)
    check_tp(model.config, tp, name=adapter.geometry.name)
    if not 0 <= rank < tp:
        raise ValueError(f"rank {rank} is outside 0..{tp - 1}")
    col = adapter.column_shards(tp)[rank]
    full_bytes = param_bytes(model)
    adapter.row_parallel_layers(model)  # checks the plan finds every decoder layer
    for planned in adapter.plan.modules(model):
        linear = planned.module
        if planned.rule.style == "replicated":
            continue
        dim = linear.out_features if planned.rule.style == "colwise" else linear.in_features
        part = adapter.split_slices(planned.rule, dim, tp)[rank]
        if planned.rule.style == "colwise":
            _keep_rows(linear, part)
            continue
        bias = None if linear.bias is None else linear.bias.detach().clone()
        swap_module(model, planned.name, RowParallelLinear(
            [shard_weight(linear.weight.detach(), part)], bias, shards=[slice(None)], name=planned.name,
            reducer=reducer))
        if planned.rule.split == "q_heads":
            _set_local_heads(model.get_submodule(planned.name.rpartition(".")[0]), q=len(col.q_heads),
                             kv=len(col.kv_heads))
        del linear
    gc.collect()
    return ShardInfo(rank=rank, tp=tp, q_heads=col.q_heads, kv_heads=col.kv_heads,
                     mlp_features=(col.mlp_features.start, col.mlp_features.stop),
                     full_param_bytes=full_bytes, shard_param_bytes=param_bytes(model))


def _set_local_heads(attention: nn.Module, *, q: int, kv: int) -> None:
    """The HF attention module around a head-split ``o_proj``: local head counts."""
    attention.num_key_value_groups = q // kv
    for attr_name, value in (("num_heads", q), ("num_key_value_heads", kv)):
        if hasattr(attention, attr_name):  # older transformers releases keep head counts on the module
            setattr(attention, attr_name, value)
