"""Collectives for row-parallel partial sums: compressed all-reduce and its reference.

* :func:`all_reduce` - multi-process, over ``torch.distributed`` (gloo or NCCL).
* :func:`simulate_all_reduce` - single-process, bitwise the same result.
* :func:`spawn_ranks` - start N local ranks with a timeout (tests, benchmarks, runtime).
"""
from lowbit_tp.collectives.algorithms import ALGORITHMS, DEFAULT_ALGORITHM
from lowbit_tp.collectives.dist import CollectiveError, all_reduce, check_group_config
from lowbit_tp.collectives.launch import RankFailure, spawn_ranks
from lowbit_tp.collectives.policy import AutoPolicy, CommStats, resolve_algorithm
from lowbit_tp.collectives.simulate import simulate_all_reduce

__all__ = [
    "ALGORITHMS",
    "DEFAULT_ALGORITHM",
    "AutoPolicy",
    "CollectiveError",
    "CommStats",
    "RankFailure",
    "all_reduce",
    "check_group_config",
    "resolve_algorithm",
    "simulate_all_reduce",
    "spawn_ranks",
]
