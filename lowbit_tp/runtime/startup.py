"""Start-up of one TP rank, shared by generation (:func:`~lowbit_tp.runtime.engine.rank_main`)
and evaluation on real ranks (:func:`~lowbit_tp.evaluation.on_ranks.eval_rank_main`).

In this order, on every rank: check the number of ranks, load the model (or, for the
``transformers`` engine, its config and tokenizer only), check the weights against the
parent's hash when one is given, check the TP degree, load and check the calibration
against the model (``check_compatible``), build the codecs, then one
:func:`~lowbit_tp.collectives.check_group_config` per codec over codec config + model hash +
run settings, so a rank with another codec, calibration, model or input fails at once with a
:class:`~lowbit_tp.collectives.CollectiveError` listing every rank's view. Only then is the
model sharded, with one :class:`~lowbit_tp.tp.DistReducer` for every row-parallel layer.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from lowbit_tp.calibration import Calibration
from lowbit_tp.codecs import Codec, make_codec
from lowbit_tp.collectives import AutoPolicy, check_group_config
from lowbit_tp.configs import feedback_mode
from lowbit_tp.models import check_tp, get_adapter, load_model, load_tokenizer
from lowbit_tp.models.export import export_hf
from lowbit_tp.models.registry import model_info
from lowbit_tp.runtime.shard import shard_model
from lowbit_tp.tp.row_parallel import CommHooks, DistReducer

__all__ = ["StartedRank", "rss_mib", "start_rank"]


@dataclass
class StartedRank:
    """A rank ready to run: its sharded ``model``, the ``codecs`` by name (all checked across
    the group), the ``reducer`` every row-parallel layer calls (built with the first codec),
    the ``shard``
    report, ``load_s`` (seconds loading weights) and ``memory`` (MiB after load and shard)."""

    model: torch.nn.Module
    tokenizer: Any
    info: Any
    calibration: Calibration | None
    codecs: dict[str, Codec]
    reducer: DistReducer
    shard: dict[str, Any]
    load_s: float
    memory: dict[str, dict[str, float]] = field(default_factory=dict)


def rss_mib() -> dict[str, float]:
    """Current and peak resident memory of this process (Linux ``/proc``), MiB."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, val = line.split(":")
                    out[{"VmRSS": "rss_mib", "VmHWM": "peak_rss_mib"}[key]] = int(val.split()[0]) / 1024
    except OSError:
        pass
    return out


def start_rank(rank: int, world: int, *, model: str, tp: int, codecs: Sequence[str], calibration: str | None,
               algorithm: str, policy: AutoPolicy | None = None, codec_options: Mapping[str, dict] | None = None,
               engine: str = "native", weights_sha256: str | None = None,
               agree_on: Callable[[Any], dict[str, Any]] = lambda tokenizer: {},
               hooks: CommHooks = CommHooks(), group=None, job: str = "run",
               error_feedback: bool | str = False) -> StartedRank:
    """Load, check and shard this rank's model; every rank of ``group`` calls it together.

    ``agree_on(tokenizer)`` returns more settings every rank must share (prompt or input
    digests, batch size ...); they join the group check. ``weights_sha256``: the parent's
    model hash, which the loaded weights must match. ``engine``: ``native`` (lowbit-tp's own
    sharding) or ``transformers`` (transformers' TP with the ``lowbit_rowwise`` style, loaded
    after the group check). ``job`` names the caller in the rank-count error.
    ``error_feedback``: the reducer feeds this rank's quantization error forward along the
    plan's layer order (:mod:`~lowbit_tp.collectives.feedback`), on either engine: both
    reduce through the one :class:`~lowbit_tp.tp.DistReducer` built here; ``"first-stage"``:
    without two-shot's owner errors (:data:`~lowbit_tp.configs.FEEDBACK_MODES`).
    """
    if world != tp:
        raise ValueError(f"the {job} asks for TP {tp} but {world} ranks were started")
    _, owner_errors = feedback_mode(error_feedback)
    t0 = time.perf_counter()
    if engine == "native":
        net, tokenizer, info = load_model(model, progress=False)
        config = net.config
    else:
        config, tokenizer, info = _transformers_source(model)
    load_s = time.perf_counter() - t0
    if weights_sha256 is not None and info.weights_sha256 != weights_sha256:
        raise ValueError(f"rank {rank} loaded weights {info.weights_sha256[:12]}..., the parent used "
                         f"{weights_sha256[:12]}...")
    check_tp(config, world, name=model)
    cal = Calibration.load_for(calibration, tp=world, model=info)
    options = codec_options or {}
    built = {name: make_codec(name, calibration=cal, **options.get(name, {})) for name in codecs}
    extra = {"model_sha256": info.weights_sha256, "tp": world, "algorithm": algorithm,
             "error_feedback": error_feedback,
             "policy": repr(policy), "calibration_file": None if cal is None else cal.fingerprint(),
             **agree_on(tokenizer)}
    for codec in built.values():
        check_group_config(codec, group, extra=extra)
    memory = {"after_load": rss_mib()}
    # native: RowParallelLinear's partials are its own temporaries, so the sum goes over them
    reducer = DistReducer(codec=next(iter(built.values())), group=group, algorithm=algorithm, policy=policy,
                          hooks=hooks, in_place=engine == "native")
    adapter = get_adapter(net if engine == "native" else config, name=model)
    if engine == "native":
        if error_feedback:
            reducer.feedback = adapter.feedback_chain(net, tp=world, ranks=1, owner_errors=owner_errors)
        shard = asdict(shard_model(net, rank=rank, tp=world, reducer=reducer, adapter=adapter))
    else:
        t1 = time.perf_counter()
        net = _transformers_tp_model(model, tp=world, reducer=reducer)
        load_s += time.perf_counter() - t1
        if error_feedback:  # after loading (the post-norms weights are read here), before any forward
            reducer.feedback = adapter.feedback_chain(net, tp=world, ranks=1, owner_errors=owner_errors)
        shard = {"rank": rank, "tp": world, "engine": "transformers", "shard_param_bytes": _local_param_bytes(net)}
    memory["after_shard"] = rss_mib()
    return StartedRank(model=net, tokenizer=tokenizer, info=info, calibration=cal, codecs=built, reducer=reducer,
                       shard=shard, load_s=load_s, memory=memory)


def _transformers_source(name: str):
    """Config, tokenizer and :class:`ModelInfo` of ``name`` without loading its weights
    (the info hashes the registry's own weight files, as the native engine does)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(export_hf(name)))
    return config, load_tokenizer(name), model_info(name, config)


def _transformers_tp_model(name: str, *, tp: int, reducer: DistReducer):
    """``name`` loaded by transformers' TP over the default process group, its row-parallel
    layers styled ``lowbit_rowwise`` and reducing through ``reducer``."""
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig
    from transformers.utils import logging as hf_logging

    from lowbit_tp.integrations.transformers import register_lowbit_rowwise, tp_plan  # imports transformers

    hf_logging.disable_progress_bar()
    register_lowbit_rowwise(reducer=reducer)
    model = AutoModelForCausalLM.from_pretrained(str(export_hf(name)), dtype=torch.float32,
                                                 distributed_config=DistributedConfig(tp_size=tp, tp_plan=tp_plan()))
    model.eval()
    model.requires_grad_(False)
    return model


def _local_param_bytes(model) -> int:
    """Bytes of this rank's parameters (the local shards of DTensors)."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total
