"""Run a model under real tensor parallelism: N processes, one shard each, compressed all-reduce.

Two ways in, one per-rank function (:func:`rank_main`):

* :func:`run_tp` starts ``tp`` local ranks with :func:`~lowbit_tp.collectives.spawn_ranks`
  (gloo, CPU) and returns rank 0's result.
* :func:`run_from_env` is for ``torchrun``: it initialises the process group from
  ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` and runs the same function.

Start-up on every rank is :func:`~lowbit_tp.runtime.startup.start_rank` (shared with the
evaluation on real ranks): load, check the TP degree and calibration, build the codec, one
group-wide config check (codec, model hash, prompts, run settings), then shard.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import asdict, replace
from typing import Callable

import torch
import torch.distributed as dist

from lowbit_tp.collectives import AutoPolicy, spawn_ranks
from lowbit_tp.collectives.launch import init_from_env
from lowbit_tp.configs import RunConfig, SamplingConfig
from lowbit_tp.preflight import check_codecs, check_engine_tp, check_model_tp
from lowbit_tp.runtime.generate import generate
from lowbit_tp.runtime.records import RunResult
from lowbit_tp.runtime.startup import rss_mib, start_rank
from lowbit_tp.tp.row_parallel import CommHooks

__all__ = ["RunConfig", "RunResult", "preflight_run", "rank_main", "run_from_env", "run_tp"]


def rank_main(rank: int, world: int, cfg: RunConfig, *, group=None, stream: bool = False,
              on_step: Callable[[int, int], None] | None = None, hooks: CommHooks = CommHooks()) -> RunResult:
    """One rank's whole run; every rank of ``group`` must call it with its own rank.

    Returns this rank's :class:`RunResult`: config, model info, shard and memory report, and
    one :class:`GenerationResult` per prompt (``prefill_logits`` kept when the config asks
    for them). ``stream`` prints rank 0's text as it is generated. ``on_step(step,
    token)`` runs on every rank after every token (fault-injection hook for tests); ``hooks``
    wrap every row-parallel reduce and its backend collectives (benchmark timers).
    """
    prompt_ids: list = []

    def agree_on(tokenizer) -> dict:  # the prompts, as this rank's tokenizer reads them
        prompt_ids.extend(tokenizer(p).input_ids for p in cfg.prompts)
        return {"prompt_ids_sha256": hashlib.sha256(json.dumps(prompt_ids).encode()).hexdigest()[:16],
                "max_new_tokens": cfg.max_new_tokens, "sampling": repr(cfg.sampling)}

    started = start_rank(rank, world, model=cfg.model, tp=cfg.tp, codecs=[cfg.codec], calibration=cfg.calibration,
                         algorithm=cfg.algorithm, policy=cfg.policy, engine=cfg.engine, agree_on=agree_on,
                         hooks=hooks, group=group, error_feedback=cfg.error_feedback)
    model, tokenizer, comm, memory = started.model, started.tokenizer, started.reducer, started.memory
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
        results.append(replace(res, prompt=cfg.prompts[i]))
    if show:
        print(flush=True)
    memory["end"] = rss_mib()
    return RunResult(rank=rank, config=cfg.as_dict(), model=asdict(started.info),
                     codec=started.codecs[cfg.codec].config(), shard=started.shard, memory=memory,
                     load_s=started.load_s, threads=torch.get_num_threads(), results=tuple(results),
                     comm_total=copy.deepcopy(comm.stats))


def run_tp(model: str, *, tp: int, prompts, codec: str = RunConfig.codec, calibration_path: str | None = None,
           max_new_tokens: int = RunConfig.max_new_tokens, algorithm: str = RunConfig.algorithm,
           policy: AutoPolicy = RunConfig.policy, sampling: SamplingConfig = RunConfig.sampling,
           ignore_eos: bool = False, timeout_s: float = RunConfig.timeout_s, deadline_s: float | None = None,
           threads_per_rank: int = RunConfig.threads_per_rank, stream: bool = False,
           keep_prefill_logits: bool = False) -> RunResult:
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
    calibration, which fits the TP degree and hidden size and covers every block. Raises :class:`UserError`."""
    config = check_model_tp(cfg.model, cfg.tp)
    check_engine_tp(config, cfg.tp, cfg.engine, name=cfg.model)
    check_codecs([cfg.codec], calibration=cfg.calibration, tp=cfg.tp, hidden_size=config.hidden_size,
                 num_layers=getattr(config, "num_hidden_layers", None), model=cfg.model)


def run_config(cfg: RunConfig, *, deadline_s: float | None = None, stream: bool = False) -> RunResult:
    """:func:`run_tp` for a ready :class:`RunConfig`; :func:`preflight_run` first."""
    preflight_run(cfg)
    deadline = cfg.timeout_s + 600.0 if deadline_s is None else deadline_s
    per_rank = spawn_ranks(rank_main, cfg.tp, cfg, timeout_s=cfg.timeout_s, deadline_s=deadline,
                           threads=cfg.threads_per_rank, stream=stream)
    return per_rank[0].merged(per_rank)


def under_torchrun() -> bool:
    """True when ``torchrun`` (or any launcher setting ``RANK`` and ``WORLD_SIZE``) started us."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def run_from_env(cfg: RunConfig, *, stream: bool = True) -> RunResult | None:
    """The ``torchrun`` path: this process is one rank. Returns the merged results on rank 0,
    None on the others. ``cfg.tp`` must equal ``WORLD_SIZE``."""
    torch.set_num_threads(cfg.threads_per_rank)
    preflight_run(cfg)
    rank, world = init_from_env(timeout_s=cfg.timeout_s)
    try:
        mine = rank_main(rank, world, cfg, stream=stream)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, mine.without_logits())
        return mine.merged(gathered) if rank == 0 else None
    finally:
        dist.destroy_process_group()
