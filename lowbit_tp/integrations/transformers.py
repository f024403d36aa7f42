"""lowbit-tp inside Hugging Face transformers' own tensor parallelism (imports transformers).

transformers shards a model at load time from a TP plan (``DistributedConfig(tp_size=N,
tp_plan=...)``) whose values name styles registered in ``ALL_PARALLEL_STYLES``. This
module registers one more style, ``lowbit_rowwise``: transformers' ``RowwiseParallel``
(same weight sharding, bias hidden from the local matmul) whose output boundary reduces
the ``[batch, seq, E]`` partial through a :class:`~lowbit_tp.tp.Reducer` (by default a
:class:`~lowbit_tp.tp.DistReducer` over the TP mesh's process group, i.e. one compressed
:func:`~lowbit_tp.collectives.all_reduce`) instead of ``dist.all_reduce``::

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig
    from lowbit_tp.codecs import make_codec
    from lowbit_tp.integrations.transformers import register_lowbit_rowwise, tp_plan

    # under torchrun --nproc-per-node 3
    register_lowbit_rowwise(codec=make_codec("int4-g32"), algorithm="auto")
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, distributed_config=DistributedConfig(tp_size=3, tp_plan=tp_plan()))
    with torch.no_grad():
        model(ids)          # o_proj / down_proj outputs travel compressed

One style instance serves every layer, so the style learns each module's name when
transformers hands it the module's weight to validate (``validate_param`` gets the full
parameter name) and tags the module with it; static codecs look up their calibrated
scales by that name (``model.layers.3.mlp.down_proj``, the simulator's names too).

``error_feedback=True`` gives each reducer the style builds an error-feedback chain
(:mod:`~lowbit_tp.collectives.feedback`) over the layers it tagged, in the plan's forward
order: the same :class:`~lowbit_tp.tp.DistReducer` path as the native engine, so the same
bits; ``error_feedback="first-stage"`` leaves out two-shot's owner errors, so a row's output
does not depend on its batch (:data:`~lowbit_tp.configs.FEEDBACK_MODES`). It needs the model's ``config`` (the style never sees the model): a plain chain is
right only for pre-norm families. On Gemma 2/3 (post-norms) the carry is mapped through the
norm after each row-parallel layer (:class:`~lowbit_tp.collectives.feedback.PostNormFeedback`,
built by the adapter as on the native engine), and the style reaches those norms through the
plan: ``tp_plan(config=config)`` names them with a second, weight-keeping style
(``lowbit_rowwise_postnorm``, registered with the first) that only records each norm module;
their weights are read at the first forward, after loading. A post-norm model loaded without
those entries fails at its first forward, never silently. A reducer passed in carries its
own chain (``DistReducer(feedback=...)``)::

    style = register_lowbit_rowwise(codec=codec, error_feedback=True, config=config)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, distributed_config=DistributedConfig(tp_size=2, tp_plan=tp_plan(config=config)))

Only inference is compressed (``torch.no_grad()``, local tensors); a forward that needs
gradients raises, since the compressed collective has no backward.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES
from transformers.distributed.tensor_parallel import RowwiseParallel, TensorParallelLayer

from lowbit_tp.codecs.base import Codec
from lowbit_tp.collectives import DEFAULT_ALGORITHM, AutoPolicy, CommStats
from lowbit_tp.configs import feedback_mode
from lowbit_tp.models import even_heads_refusal, get_adapter, head_counts_or_none
from lowbit_tp.models.adapters import post_norm_of
from lowbit_tp.tp.plan import DECODER_PLAN, TPPlan
from lowbit_tp.tp.row_parallel import CommHooks, DistReducer, Reducer, check_reduce_config

__all__ = ["STYLE_NAME", "HeadsCheck", "LowbitRowwiseParallel", "PostNormRecorder", "register_lowbit_rowwise",
           "tp_plan"]

STYLE_NAME = "lowbit_rowwise"
POSTNORM_SUFFIX = "_postnorm"  # the norm recorder is registered as STYLE_NAME + this
HEADS_SUFFIX = "_heads"  # the attention modules' heads check is registered as STYLE_NAME + this
_NAME_ATTR = "_lowbit_tp_layer"


class PostNormRecorder(TensorParallelLayer):
    """The style of a norm that follows a row-parallel layer (Gemma 2/3's post-norms): every
    rank keeps the whole weight and the module's forward is left as it is (transformers'
    ``replicate``); it only records each norm module by name in ``modules``, which the
    ``lowbit_rowwise`` style reads at its first forward to map the error-feedback carry."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.modules = modules

    def validate_param(self, module, param, mesh, parameter_name=None):
        if parameter_name is not None:
            self.modules[parameter_name.rpartition(".")[0]] = module

    def install_forward(self, module, mesh):
        return module


class HeadsCheck(TensorParallelLayer):
    """The style :func:`tp_plan` gives each attention module: it leaves the module as it is and,
    when transformers shards the model (before the weights load), refuses a TP degree that does
    not divide its query and KV heads. transformers splits both evenly and cannot replicate KV
    heads; the forward used to fail inside attention with a shape error. Reads the module's
    ``config`` (transformers' attention modules keep the model's); without one it checks nothing."""

    def install_forward(self, module, mesh):
        heads = head_counts_or_none(getattr(module, "config", None))
        refusal = None if heads is None else even_heads_refusal(heads, mesh.size(),
                                                                splitter="transformers' tensor parallelism")
        if refusal:
            raise ValueError(refusal)
        return module


class LowbitRowwiseParallel(RowwiseParallel):
    """transformers' ``RowwiseParallel`` whose output all-reduce is lowbit-tp's.

    Keyword-only: ``codec`` and ``algorithm``/``policy``/``hooks`` configure the
    :class:`~lowbit_tp.tp.DistReducer` built (once per process group) over the TP mesh;
    ``reducer`` replaces it with any :class:`~lowbit_tp.tp.Reducer` (e.g. a test's
    recording one). Triggers one :func:`~lowbit_tp.collectives.all_reduce` per forward.
    ``error_feedback``: the built reducers feed each rank's quantization error forward along
    the layers this style tagged (``plan``'s forward order); ``"first-stage"``: without
    two-shot's owner errors (:data:`~lowbit_tp.configs.FEEDBACK_MODES`); not with ``reducer``,
    and only with ``config`` (the model's config). For a post-norm family (Gemma 2/3) the model must be
    loaded with ``tp_plan(config=config)``, whose norm entries (:attr:`postnorm_style`) give
    the chain its norms.
    """

    def __init__(self, *, codec: Codec | None = None, algorithm: str = DEFAULT_ALGORITHM, policy: AutoPolicy | None = None,
                 hooks: CommHooks = CommHooks(), reducer: Reducer | None = None, error_feedback: bool | str = False,
                 config: Any = None, plan: TPPlan = DECODER_PLAN):
        super().__init__()
        if codec is None and reducer is None:
            raise ValueError("give a codec (or a reducer) for the lowbit_rowwise style")
        if reducer is None:  # now, not when the first forward builds the reducer
            check_reduce_config(codec, algorithm)
        on, self.owner_errors = feedback_mode(error_feedback)  # a one-line error for anything else
        if on and reducer is not None:
            raise ValueError("error_feedback builds the style's own reducers; give the reducer its own "
                             "FeedbackChain instead (DistReducer(feedback=...))")
        if on:
            if config is None:
                raise ValueError("error_feedback needs the model's config (config=AutoConfig.from_pretrained(...)): "
                                 "plain feedback is wrong for post-norm models")
        self.adapter = None if config is None else get_adapter(config)
        self.norms: dict[str, torch.nn.Module] = {}  # the post-norm modules the plan named, by full name
        self.postnorm_style = PostNormRecorder(self.norms)
        self.codec, self.algorithm, self.policy, self.hooks = codec, algorithm, policy, hooks
        self.reducer = reducer
        self.error_feedback, self.plan = error_feedback, plan
        self._by_group: dict[int, DistReducer] = {}
        self._layers: dict[str, None] = {}  # the names tagged so far (an ordered set)

    def validate_param(self, module, param, mesh, parameter_name=None):
        if parameter_name is not None:
            name = parameter_name.rpartition(".")[0]
            setattr(module, _NAME_ATTR, name)
            self._layers[name] = None
        return super().validate_param(module, param, mesh, parameter_name=parameter_name)

    def reducer_for(self, group) -> Reducer:
        """The reducer of ``group`` (the TP mesh's process group)."""
        if self.reducer is not None:
            return self.reducer
        key = id(group)
        if key not in self._by_group:
            # Built at the first forward, after from_pretrained tagged every layer and loaded the norms.
            chain = None
            if self.error_feedback:
                chain = self.adapter.feedback_chain_for(self._layers, tp=dist.get_world_size(group),
                                                        ranks=1, norm_of=self._norm_of, owner_errors=self.owner_errors)
            self._by_group[key] = DistReducer(codec=self.codec, group=group, algorithm=self.algorithm,
                                              policy=self.policy, hooks=self.hooks, feedback=chain)
        return self._by_group[key]

    def _norm_of(self, name: str):
        if name not in self.norms:
            raise RuntimeError(f"lowbit_rowwise: error feedback on {self.adapter.family} maps the carry through "
                               f"the post-norms, but the plan named no {name!r}: load the model with "
                               f"tp_plan(config=config)")
        return post_norm_of(self.norms[name])

    def transform_output_post_forward(self, module, output, mesh):
        local = isinstance(module, torch.nn.Linear) and isinstance(output, torch.Tensor) and not (
            output.requires_grad or type(output).__name__ == "DTensor")
        if not local:
            raise RuntimeError("lowbit_rowwise compresses inference only: run the model under torch.no_grad()")
        name = getattr(module, _NAME_ATTR, None)
        if name is None:
            raise RuntimeError("lowbit_rowwise: module has no layer name; was it sharded by from_pretrained?")
        group = mesh.get_group() if mesh.ndim == 1 else mesh.get_group("tp")
        e = output.shape[-1]
        y = self.reducer_for(group).reduce([output.reshape(-1, e)], layer=name).reshape(output.shape)
        bias = module._parameters.get("bias")
        if bias is not None:
            y = y + (bias.to_local() if hasattr(bias, "to_local") else bias)
        return y

    def stats(self) -> CommStats:
        """This process's traffic over every group it built a reducer for."""
        return CommStats.total(r.stats for r in self._by_group.values())


def register_lowbit_rowwise(*, codec: Codec | None = None, algorithm: str = DEFAULT_ALGORITHM, policy: AutoPolicy | None = None,
                            hooks: CommHooks = CommHooks(), reducer: Reducer | None = None,
                            error_feedback: bool | str = False, config: Any = None,
                            name: str = STYLE_NAME) -> LowbitRowwiseParallel:
    """Register a :class:`LowbitRowwiseParallel` as style ``name``, its
    :class:`PostNormRecorder` as ``name + "_postnorm"`` and a :class:`HeadsCheck` as
    ``name + "_heads"`` (replacing earlier ones of those names) and return it; call before
    ``from_pretrained``."""
    style = LowbitRowwiseParallel(codec=codec, algorithm=algorithm, policy=policy, hooks=hooks, reducer=reducer,
                                  error_feedback=error_feedback, config=config)
    ALL_PARALLEL_STYLES.register(name, style)
    ALL_PARALLEL_STYLES.register(name + POSTNORM_SUFFIX, style.postnorm_style)
    ALL_PARALLEL_STYLES.register(name + HEADS_SUFFIX, HeadsCheck())
    return style


def tp_plan(plan: TPPlan = DECODER_PLAN, *, style: str = STYLE_NAME, prefix: str = "model.",
            config: Any = None) -> dict[str, Any]:
    """The ``DistributedConfig(tp_plan=...)`` for a causal LM of the supported families:
    q/k/v and gate/up ``colwise``, o_proj and down_proj ``style``; keys carry ``prefix``.
    The attention modules (the parents of the head-split layers) get ``style + "_heads"``, a
    :class:`HeadsCheck` that refuses a TP degree not dividing the heads while the model is sharded.
    With the ``config`` of a post-norm family (Gemma 2/3) the norms after o_proj and down_proj
    get ``style + "_postnorm"`` (kept whole, recorded for error feedback)."""
    out = plan.transformers_plan(prefix=prefix, rowwise=style)
    for attention in dict.fromkeys(p.rsplit(".", 1)[0] for p, r in plan.rules if r.split in ("q_heads", "kv_heads")):
        out[prefix + attention] = style + HEADS_SUFFIX
    adapter = None if config is None else get_adapter(config)
    if adapter is not None and adapter.post_norm:
        for pattern, rule in plan.rules:
            if rule.style == "rowwise":
                out[prefix + adapter.post_norm_name(pattern)] = style + POSTNORM_SUFFIX
    return out
