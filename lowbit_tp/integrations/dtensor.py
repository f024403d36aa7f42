"""lowbit-tp as a ``ParallelStyle`` for ``torch.distributed.tensor.parallel.parallelize_module``.

For gpt-fast- and torchtitan-style code that shards its own model with DTensor. Like
torchao's ``Float8RowwiseParallel``, :class:`LowbitRowwiseParallel` is PyTorch's
``RowwiseParallel`` with the weight sharded exactly the same way (``Shard(1)``); only the
output boundary changes: instead of redistributing the ``Partial`` output to
``Replicate`` (a ``dist.all_reduce``), the local partial goes through a
:class:`~lowbit_tp.tp.Reducer` (by default one compressed
:func:`~lowbit_tp.collectives.all_reduce` over the mesh's process group). The bias is kept
off the local matmul and added once, after the reduce::

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module
    from lowbit_tp.codecs import make_codec
    from lowbit_tp.integrations.dtensor import parallelize_plan

    mesh = init_device_mesh("cpu", (world,))          # or "cuda"
    plan = parallelize_plan(model, codec=make_codec("int4-g32"), algorithm="auto")
    parallelize_module(model, mesh, plan)             # o_proj / down_proj now reduce compressed

:func:`parallelize_plan` writes one entry per module from the model's
:class:`~lowbit_tp.tp.TPPlan` (``ColwiseParallel`` for q/k/v and gate/up, a
:class:`LowbitRowwiseParallel` carrying the layer's name for o_proj and down_proj), so
static codecs find their calibrated scales by name. Inference only: the output is a plain
local tensor with no backward through the compressed collective.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from lowbit_tp.codecs.base import Codec
from lowbit_tp.collectives import DEFAULT_ALGORITHM, AutoPolicy
from lowbit_tp.models import even_heads_refusal, head_counts_or_none
from lowbit_tp.tp.plan import DECODER_PLAN, TPPlan
from lowbit_tp.tp.row_parallel import CommHooks, DistReducer, Reducer, check_reduce_config

__all__ = ["LowbitRowwiseParallel", "parallelize_plan"]


class LowbitRowwiseParallel(RowwiseParallel):
    """``RowwiseParallel`` for an ``nn.Linear`` whose output all-reduce is lowbit-tp's.

    Keyword-only: ``layer`` is the module's name given to the reducer (static codecs need
    it); ``reducer`` is any :class:`~lowbit_tp.tp.Reducer`, or else one
    :class:`~lowbit_tp.tp.DistReducer` over the mesh's group is built from ``codec``,
    ``algorithm``, ``policy`` and ``hooks``. Triggers one
    :func:`~lowbit_tp.collectives.all_reduce` per forward; returns a local tensor.
    ``heads`` (an attention output projection's ``(query heads, KV heads)``, which
    :func:`parallelize_plan` reads from the model's config): the mesh size must divide both,
    since ``ColwiseParallel`` cuts q/k/v into equal row blocks, and a block holding part of a
    head failed deep inside attention (``shape '[1, 5, -1, 16]' is invalid ...``).
    """

    def __init__(self, *, layer: str, codec: Codec | None = None, algorithm: str = DEFAULT_ALGORITHM,
                 policy: AutoPolicy | None = None, hooks: CommHooks = CommHooks(), reducer: Reducer | None = None,
                 heads: tuple[int, int] | None = None):
        super().__init__(input_layouts=Shard(-1), output_layouts=Replicate(), use_local_output=True)
        if codec is None and reducer is None:
            raise ValueError("give a codec (or a reducer) for LowbitRowwiseParallel")
        if reducer is None:  # now, not when parallelize_module builds the reducer
            check_reduce_config(codec, algorithm)
        self.layer, self.heads = layer, heads
        self.codec, self.algorithm, self.policy, self.hooks, self.reducer = codec, algorithm, policy, hooks, reducer

    def _partition_linear_fn(self, name, module, device_mesh):
        bias = module.bias
        module.register_parameter("bias", None)  # the local matmul yields the bare partial
        super()._partition_linear_fn(name, module, device_mesh)
        if bias is not None:
            module.register_buffer("lowbit_bias", bias.detach().clone(), persistent=False)

    def _output_fn(self, reducer: Reducer, mod: nn.Module, outputs: Any, device_mesh) -> torch.Tensor:
        partial = outputs.to_local() if isinstance(outputs, DTensor) else outputs
        if partial.requires_grad:
            raise RuntimeError("LowbitRowwiseParallel compresses inference only: run under torch.no_grad()")
        e = partial.shape[-1]
        y = reducer.reduce([partial.reshape(-1, e)], layer=self.layer).reshape(partial.shape)
        bias = getattr(mod, "lowbit_bias", None)
        return y if bias is None else y + bias

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        if not isinstance(module, nn.Linear):
            raise NotImplementedError(f"LowbitRowwiseParallel shards nn.Linear only, got {type(module).__name__}")
        tp = device_mesh.size()
        refusal = None if self.heads is None else even_heads_refusal(self.heads, tp, splitter="parallelize_module")
        if refusal:
            raise ValueError(f"{self.layer}: {refusal}")
        self.desired_input_layouts = (Shard(-1),)
        reducer = self.reducer or DistReducer(codec=self.codec, group=device_mesh.get_group(),
                                              algorithm=self.algorithm, policy=self.policy, hooks=self.hooks)
        return distribute_module(
            module, device_mesh, self._partition_linear_fn,
            lambda mod, inputs, mesh: self._prepare_input_fn(self.input_layouts, self.desired_input_layouts, mod,
                                                             inputs, mesh),
            lambda mod, outputs, mesh: self._output_fn(reducer, mod, outputs, mesh),
        )


def parallelize_plan(model: nn.Module, *, codec: Codec | None = None, algorithm: str = DEFAULT_ALGORITHM,
                     policy: AutoPolicy | None = None, hooks: CommHooks = CommHooks(),
                     reducer: Reducer | None = None, plan: TPPlan = DECODER_PLAN) -> dict[str, ParallelStyle]:
    """A ``parallelize_module`` plan for ``model``: one entry per module ``plan`` names.

    ``colwise`` -> ``ColwiseParallel()``; ``rowwise`` -> :class:`LowbitRowwiseParallel`
    with that module's name; ``replicated`` modules are left out (DTensor leaves them whole).
    Column splits are even, so KV heads must divide by the TP degree here (the native
    runtime also replicates them when they do not). Pass one ``reducer`` to have every
    layer share it (and its traffic counters); otherwise each layer builds its own
    :class:`~lowbit_tp.tp.DistReducer` over the mesh's group.
    """
    out: dict[str, ParallelStyle] = {}
    planned_modules = plan.modules(model)
    if not any(p.rule.style == "rowwise" for p in planned_modules):
        # an empty plan leaves the model whole: it would run unsharded and uncompressed, silently
        rowwise = [pattern for pattern, rule in plan.rules if rule.style == "rowwise"]
        raise ValueError(f"the TP plan names no row-parallel module of {type(model).__name__} (patterns "
                         f"{', '.join(rowwise) or 'none'}): lowbit-tp's plan covers the Llama, Mistral, Qwen2 and "
                         f"Gemma 2/3 layouts; pass plan= (a TPPlan) for another")
    heads = _heads(model)
    for planned in planned_modules:
        if planned.rule.style == "colwise":
            out[planned.name] = ColwiseParallel()
        elif planned.rule.style == "rowwise":
            out[planned.name] = LowbitRowwiseParallel(
                layer=planned.name, codec=codec, algorithm=algorithm, policy=policy, hooks=hooks, reducer=reducer,
                heads=heads if planned.rule.split == "q_heads" else None)
    return out


def _heads(model: nn.Module) -> tuple[int, int] | None:
    """``(query heads, KV heads)`` from ``model.config`` (an HF model's), or None without one.
    Only the head counts: a config lacking an unrelated size (the MLP's, the layer count) still
    gets the heads check."""
    return head_counts_or_none(getattr(model, "config", None))

