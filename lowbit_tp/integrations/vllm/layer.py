"""vLLM's ``RowParallelLinear`` with the partial sum reduced by lowbit-tp (imports vLLM).

Registered by :func:`lowbit_tp.integrations.vllm.register` with
``RowParallelLinear.register_oot``, so every row-parallel layer vLLM builds (``o_proj``,
``down_proj``) is this class. When the plugin is disabled (no codec) the forward is
vLLM's own. Otherwise: the local matmul without bias, one
``torch.ops.lowbit_tp.all_reduce`` of the ``[tokens, E]`` partial, then the bias, added
once after the reduce.

Start-up (first layer built in each worker): read the config, load the calibration and
check it against the checkpoint and TP degree, build the codec, register the
:class:`~lowbit_tp.integrations.vllm.op.GatedReducer` (a size gate in front of
:class:`~lowbit_tp.tp.DistReducer`) over vLLM's TP group. Each layer maps
its vLLM prefix to the calibration's layer name, so a calibration for another model
fails here, naming the file, before any weight is loaded. With ``error_feedback`` each layer
also hands its name to the reducer, which orders them into the feedback chain; on Gemma 2/3
the chain maps the carry through the post-norms, whose weights each worker reads from the
checkpoint at start-up (:func:`~lowbit_tp.integrations.vllm.checkpoint.read_post_norms`).
"""
from __future__ import annotations

import torch
from vllm.config import get_current_vllm_config_or_none
from vllm.distributed import get_tp_group
from vllm.model_executor.layers.linear import RowParallelLinear

from lowbit_tp.collectives import AutoPolicy
from lowbit_tp.configs import feedback_mode
from lowbit_tp.integrations.vllm import op  # noqa: F401  (registers torch.ops.lowbit_tp.all_reduce)
from lowbit_tp.tp import DistReducer
from lowbit_tp.integrations.vllm.config import PluginConfig, resolve_config

_STATE: dict[str, object] = {}
REDUCER_KEY = "vllm-tp"


def _setup(cfg: PluginConfig, tp_size: int) -> list[str] | None:
    """Once per process: calibration check, codec, reducer. Returns the calibration's layers."""
    if "layers" in _STATE:
        return _STATE["layers"]  # type: ignore[return-value]
    from lowbit_tp.calibration import Calibration
    from lowbit_tp.codecs import make_codec
    from lowbit_tp.integrations.vllm.checkpoint import check_calibration, feedback_chain_maker, identity

    vcfg = get_current_vllm_config_or_none()
    make_chain = None
    if cfg.error_feedback:
        if vcfg is None:  # no model to check, and a plain carry on a post-norm model is garbage
            raise ValueError("lowbit-tp plugin: error feedback needs vLLM's model config to check the "
                             "architecture, and there is none here")
        # Gemma 2/3: the carry is mapped through the post-norms, read from the checkpoint (vLLM's
        # layers never see their model, and its weights are loaded only after they are built).
        make_chain = feedback_chain_maker(vcfg.model_config.hf_config, vcfg.model_config.model, tp=tp_size,
                                          owner_errors=feedback_mode(cfg.error_feedback)[1])
    cal = None
    if cfg.calibration:
        cal = Calibration.load(cfg.calibration)
        if vcfg is not None:
            check_calibration(cal, identity(vcfg.model_config.model), tp=tp_size, path=cfg.calibration)
    codec = make_codec(cfg.codec, calibration=cal, nonfinite=cfg.nonfinite)
    group = get_tp_group()
    inner = DistReducer(codec=codec, group=group.device_group, algorithm=cfg.algorithm,
                        policy=AutoPolicy(min_bytes=cfg.min_bytes))
    reducer = op.GatedReducer(inner=inner, rank=group.rank_in_group, min_bytes=cfg.min_bytes,
                              fallback=group._all_reduce_out_place if cfg.min_bytes > 0 else None,
                              capture_dir=cfg.capture_dir, capture_layer=cfg.capture_layer,
                              report_dir=cfg.report_dir, feedback_layers=[] if cfg.error_feedback else None,
                              make_chain=make_chain)
    op.register_reducer(REDUCER_KEY, reducer)
    _STATE["layers"] = cal.layers if cal is not None else None
    return _STATE["layers"]  # type: ignore[return-value]


class LowbitRowParallelLinear(RowParallelLinear):
    """vLLM's row-parallel layer whose all-reduce goes through lowbit-tp's compressed op."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        vcfg = get_current_vllm_config_or_none()
        cfg = resolve_config(vcfg.additional_config if vcfg is not None else None)
        self.lowbit = cfg.enabled and self.reduce_results and self.tp_size > 1
        self.lowbit_layer = self.prefix
        if self.lowbit:
            from lowbit_tp.integrations.vllm.checkpoint import calibration_layer_name

            layers = _setup(cfg, self.tp_size)
            self.lowbit_layer = calibration_layer_name(self.prefix, layers)
            reducer = op.get_reducer(REDUCER_KEY)
            if reducer.feedback_layers is not None:
                reducer.feedback_layers.append(self.lowbit_layer)

    def forward(self, input_):
        if not self.lowbit:
            return super().forward(input_)
        if not self.input_is_parallel:
            input_ = input_.chunk(self.tp_size, dim=-1)[self.tp_rank].contiguous()
        partial = self.quant_method.apply(self, input_, None)
        out = torch.ops.lowbit_tp.all_reduce(partial, self.lowbit_layer, REDUCER_KEY)
        if self.bias is not None and not self.skip_bias_add:
            out = out + self.bias
        if not self.return_bias:
            return out
        return out, (self.bias if self.skip_bias_add else None)
