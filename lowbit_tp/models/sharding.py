"""The per-rank arithmetic of a row-parallel layer, shared by the simulator and the runtime.

Rank r holds ``W[:, s_r]`` (a contiguous copy) and receives ``x[..., s_r]`` (contiguous);
its partial output is ``x_r @ W_r.T``. Computing it through this one function, on
tensors of the same layout, is what lets simulator and runtime agree bit for bit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def shard_weight(weight: torch.Tensor, shard: slice) -> torch.Tensor:
    """Rank's columns of a row-parallel weight ``[E, D]`` as a contiguous ``[E, D_r]``."""
    return weight[:, shard].contiguous()


def local_partial(x_local: torch.Tensor, w_local: torch.Tensor) -> torch.Tensor:
    """``[tokens, D_r] @ [E, D_r].T -> [tokens, E]``: one rank's partial (no bias)."""
    return F.linear(x_local.contiguous(), w_local)
