"""Run a model under real tensor parallelism: N processes, one shard each, compressed all-reduce.

Two ways in, one per-rank function (:func:`rank_main`):

* :func:`run_tp` starts ``tp`` local ranks with :func:`~lowbit_tp.collectives.spawn_ranks`
  (gloo, CPU) and returns rank 0's result.
* :func:`run_from_env` is for ``torchrun``: it initialises the process group from
  ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` and runs the same function.

Start-up on every rank: load the full checkpoint, check the TP degree, load and check the
calibration against the model (``check_compatible``), build the codec, then one
:func:`~lowbit_tp.collectives.check_group_config` over codec config + model hash + run
settings, so a rank with another codec, calibration, model or prompt fails at once with a
:class:`~lowbit_tp.collectives.CollectiveError` listing every rank's view. Only then is the
model sharded and generation started.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict
from typing import Any, Callable

import torch
import torch.distributed as dist

from lowbit_tp.calibration import Calibration
from lowbit_tp.codecs import make_codec
from lowbit_tp.collectives import AutoPolicy, check_group_config, spawn_ranks
from lowbit_tp.collectives.launch import init_from_env
from lowbit_tp.configs import RunConfig, SamplingConfig
from lowbit_tp.models import check_tp, load_model, load_tokenizer
from lowbit_tp.models.export import export_hf
from lowbit_tp.models.registry import model_info
from lowbit_tp.preflight import check_codecs, check_model_tp
from lowbit_tp.runtime.generate import generate
from lowbit_tp.runtime.shard import shard_model
from lowbit_tp.tp.row_parallel import CommHooks, DistReducer

__all__ = ["RunConfig", "preflight_run", "rank_main", "run_from_env", "run_tp"]


def _rss_mib() -> dict[str, float]:
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


def _load_calibration(cfg: RunConfig, *, tp: int, info):
    if cfg.calibration is None:
        return None
    cal = Calibration.load(cfg.calibration)
    cal.check_compatible(tp=tp, hidden_size=info.hidden_size, weights_sha256=info.weights_sha256,
                         model_name=cfg.model)
    return cal


def rank_main(rank: int, world: int, cfg: RunConfig, *, group=None, stream: bool = False,
              on_step: Callable[[int, int], None] | None = None, hooks: CommHooks = CommHooks()) -> dict[str, Any]:
    """One rank's whole run; every rank of ``group`` must call it with its own rank.

    Returns this rank's results: config, model info, shard and memory report, and one
    :meth:`GenerationResult.summary` per prompt (``prefill_logits`` added when the config
    asks for them). ``stream`` prints rank 0's text as it is generated. ``on_step(step,
    token)`` runs on every rank after every token (fault-injection hook for tests); ``hooks``
    wrap every row-parallel reduce and its backend collectives (benchmark timers).
    """
    if world != cfg.tp:
        raise ValueError(f"the run asks for TP {cfg.tp} but {world} ranks were started")
    t0 = time.perf_counter()
    if cfg.engine == "native":
        model, tokenizer, info = load_model(cfg.model, progress=False)
        config = model.config
    else:
        config, tokenizer, info = _transformers_source(cfg.model)
    load_s = time.perf_counter() - t0
    check_tp(config, world, name=cfg.model)
    cal = _load_calibration(cfg, tp=world, info=info)
    codec = make_codec(cfg.codec, calibration=cal)
    prompt_ids = [tokenizer(p).input_ids for p in cfg.prompts]
    digest = hashlib.sha256(json.dumps(prompt_ids).encode()).hexdigest()[:16]
    check_group_config(codec, group, extra={
        "model_sha256": info.weights_sha256, "tp": world, "algorithm": cfg.algorithm,
        "policy": repr(cfg.policy), "prompt_ids_sha256": digest, "max_new_tokens": cfg.max_new_tokens,
        "sampling": repr(cfg.sampling), "calibration_file": None if cal is None else cal.fingerprint(),
    })
    memory = {"after_load": _rss_mib()}
    comm = DistReducer(codec=codec, group=group, algorithm=cfg.algorithm, policy=cfg.policy, hooks=hooks)
    if cfg.engine == "native":
        shard = asdict(shard_model(model, rank=rank, tp=world, reducer=comm))
    else:
        t1 = time.perf_counter()
        model = _transformers_tp_model(cfg.model, tp=world, reducer=comm)
        load_s += time.perf_counter() - t1
        shard = {"rank": rank, "tp": world, "engine": "transformers", "shard_param_bytes": _local_param_bytes(model)}
    memory["after_shard"] = _rss_mib()

    eos = []
    if not cfg.ignore_eos and tokenizer.eos_token_id is not None:
        eos = [tokenizer.eos_token_id]
    show = stream and rank == 0
    results = []
    for i, ids in enumerate(prompt_ids):
        if show:
            print(f"\n[prompt {i}] {cfg.prompts[i]}", end="", flush=True)
        res = generate(model, tokenizer, ids, max_new_tokens=cfg.max_new_tokens, rank=rank, world=world,
                       group=group, stats=comm.stats, sampling=cfg.sampling, eos_token_ids=eos,
                       on_text=(lambda s: print(s, end="", flush=True)) if show else None,
                       on_step=on_step, keep_prefill_logits=cfg.keep_prefill_logits,
                       check_nonfinite=comm.check_nonfinite)
        row = res.summary()
        row["prompt"] = cfg.prompts[i]
        if cfg.keep_prefill_logits:
            row["prefill_logits"] = res.prefill_logits
        results.append(row)
    if show:
        print(flush=True)
    memory["end"] = _rss_mib()
    return {
        "rank": rank,
        "config": cfg.as_dict(),
        "model": asdict(info),
        "codec": codec.config(),
        "shard": shard,
        "memory": memory,
        "load_s": load_s,
        "threads": torch.get_num_threads(),
        "results": results,
        "comm_total": comm.stats.as_dict(),
    }


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


def _merge(per_rank: list[dict]) -> dict[str, Any]:
    out = dict(per_rank[0])
    out["per_rank"] = [{k: r[k] for k in ("rank", "shard", "memory", "comm_total", "load_s")} for r in per_rank]
    return out


def run_tp(model: str, *, tp: int, prompts, codec: str = RunConfig.codec, calibration_path: str | None = None,
           max_new_tokens: int = RunConfig.max_new_tokens, algorithm: str = RunConfig.algorithm,
           policy: AutoPolicy = RunConfig.policy, sampling: SamplingConfig = RunConfig.sampling,
           ignore_eos: bool = False, timeout_s: float = RunConfig.timeout_s, deadline_s: float | None = None,
           threads_per_rank: int = RunConfig.threads_per_rank, stream: bool = False,
           keep_prefill_logits: bool = False) -> dict[str, Any]:
    """Generate on ``tp`` local ranks (spawned processes, gloo) and return rank 0's results.

    Each rank holds one shard; every ``o_proj``/``down_proj`` output goes through
    :func:`~lowbit_tp.collectives.all_reduce` with ``codec``. ``timeout_s`` bounds each
    collective; ``deadline_s`` (default ``timeout_s + 600``) the whole run, after which
    stragglers are killed. Raises :class:`~lowbit_tp.collectives.RankFailure` (with each
    failed rank's error, e.g. a ``CollectiveError``) if any rank fails.
    """
    if isinstance(prompts, str):
        prompts = (prompts,)
    cfg = RunConfig(model=model, tp=tp, prompts=tuple(prompts), codec=codec, calibration=calibration_path,
                    algorithm=algorithm, policy=policy, max_new_tokens=max_new_tokens, sampling=sampling,
                    ignore_eos=ignore_eos, timeout_s=timeout_s, threads_per_rank=threads_per_rank,
                    keep_prefill_logits=keep_prefill_logits)
    return run_config(cfg, deadline_s=deadline_s, stream=stream)


def preflight_run(cfg: RunConfig) -> None:
    """The checks of a run that need no model load, done before any rank starts: the model
    exists and ``cfg.tp`` fits its heads and MLP, every codec can be built with the
    calibration, which fits the TP degree and hidden size. Raises :class:`UserError`."""
    config = check_model_tp(cfg.model, cfg.tp)
    check_codecs([cfg.codec], calibration=cfg.calibration, tp=cfg.tp, hidden_size=config.hidden_size)


def run_config(cfg: RunConfig, *, deadline_s: float | None = None, stream: bool = False) -> dict[str, Any]:
    """:func:`run_tp` for a ready :class:`RunConfig`; :func:`preflight_run` first."""
    preflight_run(cfg)
    deadline = cfg.timeout_s + 600.0 if deadline_s is None else deadline_s
    per_rank = spawn_ranks(rank_main, cfg.tp, cfg, timeout_s=cfg.timeout_s, deadline_s=deadline,
                           threads=cfg.threads_per_rank, stream=stream)
    return _merge(per_rank)


def under_torchrun() -> bool:
    """True when ``torchrun`` (or any launcher setting ``RANK`` and ``WORLD_SIZE``) started us."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def run_from_env(cfg: RunConfig, *, stream: bool = True) -> dict[str, Any] | None:
    """The ``torchrun`` path: this process is one rank. Returns the merged results on rank 0,
    None on the others. ``cfg.tp`` must equal ``WORLD_SIZE``."""
    torch.set_num_threads(cfg.threads_per_rank)
    preflight_run(cfg)
    rank, world = init_from_env(timeout_s=cfg.timeout_s)
    try:
        mine = rank_main(rank, world, cfg, stream=stream)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, {k: v for k, v in mine.items() if k != "results"} | {
            "results": [{k: v for k, v in r.items() if k != "prefill_logits"} for r in mine["results"]]})
        gathered[0] = mine
        return _merge(gathered) if rank == 0 else None
    finally:
        dist.destroy_process_group()
