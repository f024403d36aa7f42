"""lowbit-tp inside vLLM: a general plugin whose row-parallel layers use the compressed all-reduce.

Installing lowbit-tp in vLLM's environment registers the entry point
``vllm.general_plugins: lowbit_tp = lowbit_tp.integrations.vllm:register``; vLLM calls
:func:`register` in every process. Settings come from ``LOWBIT_TP_*`` environment
variables or ``--additional-config '{"lowbit_tp": {...}}'`` (see
:mod:`~lowbit_tp.integrations.vllm.config`); with no codec set, vLLM runs unchanged.

* :mod:`.op` - ``torch.ops.lowbit_tp.all_reduce``, the custom op (no vLLM import).
* :mod:`.layer` - the out-of-tree ``RowParallelLinear`` (imports vLLM).
* :mod:`.checkpoint` - GGUF -> HF export, layer-name mapping, calibration start-up check.
* :mod:`.engine` - ``lowbit-tp run --engine vllm`` and ``lowbit-tp serve``.
"""
from __future__ import annotations

from lowbit_tp.integrations.vllm.config import PluginConfig, resolve_config

__all__ = ["PluginConfig", "register", "resolve_config"]

_REGISTERED = False


def register() -> None:
    """vLLM's plugin hook: replace ``RowParallelLinear`` (idempotent; vLLM may call it twice)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from vllm.model_executor.layers.linear import RowParallelLinear

    from lowbit_tp.integrations.vllm.layer import LowbitRowParallelLinear

    RowParallelLinear.register_oot(LowbitRowParallelLinear)
    _REGISTERED = True


def worker_reports(worker=None) -> list[dict]:
    """For ``LLM.collective_rpc``: this worker's reducer reports (traffic, time per path)."""
    from lowbit_tp.integrations.vllm.op import reports

    return reports()


def reset_worker_reports(worker=None) -> None:
    """For ``LLM.collective_rpc``: zero this worker's reducer counters (time, calls, traffic)."""
    from lowbit_tp.integrations.vllm.op import reset_reports

    reset_reports()
