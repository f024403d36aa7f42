"""The multi-process tensor-parallel runtime: each rank holds one shard of an HF model and
reduces its row-parallel outputs with the compressed all-reduce.

* :func:`shard_model` / :class:`RowParallelLinear` (``shard.py``): slicing and the layer.
* :func:`generate` (``generate.py``): KV-cached greedy or sampled decoding on one rank.
* :func:`run_tp` / :func:`run_from_env` (``engine.py``): spawned local ranks or torchrun.
* :func:`evaluate_codecs_tp` (``evaluate.py``): perplexity, KL and top-1 of codecs on spawned
  ranks (``lowbit-tp eval --runtime tp``).
"""
from lowbit_tp.runtime.engine import RunConfig, rank_main, run_config, run_from_env, run_tp, under_torchrun
from lowbit_tp.runtime.evaluate import eval_rank_main, evaluate_codecs_tp
from lowbit_tp.runtime.generate import GenerationResult, SamplingConfig, generate, select_token
from lowbit_tp.runtime.shard import RowParallelLinear, ShardInfo, TPComm, param_bytes, shard_model

__all__ = [
    "GenerationResult",
    "RowParallelLinear",
    "RunConfig",
    "SamplingConfig",
    "ShardInfo",
    "TPComm",
    "eval_rank_main",
    "evaluate_codecs_tp",
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
