"""The multi-process tensor-parallel runtime: each rank holds one shard of an HF model and
reduces its row-parallel outputs with the compressed all-reduce.

* :func:`shard_model` (``shard.py``): one rank's slice of a model, following its TP plan;
  its row-parallel layers are :class:`~lowbit_tp.tp.RowParallelLinear` with a
  :class:`~lowbit_tp.tp.DistReducer`.
* :func:`generate` (``generate.py``): KV-cached greedy or sampled decoding on one rank.
* :func:`run_tp` / :func:`run_from_env` (``engine.py``): spawned local ranks or torchrun.
"""
from lowbit_tp.runtime.engine import RunConfig, rank_main, run_config, run_from_env, run_tp, under_torchrun
from lowbit_tp.runtime.generate import GenerationResult, PhaseComm, SamplingConfig, generate, select_token
from lowbit_tp.runtime.records import RankSummary, RunResult
from lowbit_tp.runtime.shard import ShardInfo, param_bytes, shard_model

__all__ = [
    "GenerationResult",
    "PhaseComm",
    "RankSummary",
    "RunConfig",
    "RunResult",
    "SamplingConfig",
    "ShardInfo",
    "generate",
    "param_bytes",
    "rank_main",
    "run_config",
    "run_from_env",
    "run_tp",
    "select_token",
    "shard_model",
    "under_torchrun",
]
