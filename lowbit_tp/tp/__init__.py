"""Tensor parallelism as a plan plus one row-parallel step with a pluggable reducer.

* :mod:`~lowbit_tp.tp.plan`: :class:`TPPlan` (module-name patterns -> colwise / rowwise /
  replicated) and :func:`swap_module`, the one place modules are found and replaced.
* :mod:`~lowbit_tp.tp.row_parallel`: :class:`RowParallelLinear` and the :class:`Reducer`
  contract, with :class:`SimulatedReducer` (one process, N partials) and
  :class:`DistReducer` (one rank over ``torch.distributed``).

The simulator (``lowbit_tp.simulator``), the runtime (``lowbit_tp.runtime``) and the engine
integrations (``lowbit_tp.integrations``) are built from these pieces.
"""
from lowbit_tp.tp.plan import DECODER_PLAN, PlannedModule, Rule, TPPlan, swap_module
from lowbit_tp.tp.row_parallel import (
    CommHooks,
    DistReducer,
    Reducer,
    RowParallelLinear,
    SimulatedReducer,
    local_partial,
    shard_weight,
)

__all__ = [
    "CommHooks",
    "DECODER_PLAN",
    "DistReducer",
    "PlannedModule",
    "Reducer",
    "RowParallelLinear",
    "Rule",
    "SimulatedReducer",
    "TPPlan",
    "local_partial",
    "shard_weight",
    "swap_module",
]
