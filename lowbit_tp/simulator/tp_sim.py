"""Turn an HF model into an exact single-process simulation of TP = N.

Inside ``with TPSimulator(model, tp=N, codec=..., algorithm=...):`` every row-parallel
Linear (``o_proj``, ``down_proj``) computes the N true per-rank partials (its input split
by whole heads or by intermediate blocks, as the adapter says) and combines them with
:func:`~lowbit_tp.collectives.simulate_all_reduce` - the same codec and reduction code
the multi-process collective runs. Everything else in the model is untouched.

An ``observer(layer, partials, total)`` callback sees every layer's partials and their
exact sum; calibration uses it to collect channel statistics.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from lowbit_tp.codecs import Codec, make_codec
from lowbit_tp.collectives import AutoPolicy, CommStats, simulate_all_reduce
from lowbit_tp.collectives.algorithms import ALGORITHMS, DEFAULT_ALGORITHM, sum_in_rank_order
from lowbit_tp.models.adapters import check_tp, get_adapter
from lowbit_tp.models.sharding import local_partial, shard_weight

Observer = Callable[[str, list, torch.Tensor], None]


class SimulatedRowParallel(nn.Module):
    """A row-parallel Linear computed as N rank partials plus a (compressed) all-reduce."""

    def __init__(self, linear: nn.Linear, shards: list[slice], *, name: str, simulator: "TPSimulator"):
        super().__init__()
        self.name = name
        self.shards = shards
        self.weights = [shard_weight(linear.weight.detach(), s) for s in shards]
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.simulator = simulator
        self.original = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        partials = [local_partial(x2[:, s], w) for s, w in zip(self.shards, self.weights)]
        y = self.simulator.combine(self.name, partials)
        if self.bias is not None:
            y = y + self.bias  # once, after the reduce
        return y.reshape(*lead, y.shape[-1])


class TPSimulator:
    """Context manager that swaps a model's row-parallel layers for simulated TP ones.

    Args (keyword-only):
        tp: the simulated TP degree (checked against heads and sizes).
        codec: a :class:`Codec`, a codec name, or None for the exact fp32 sum.
        algorithm: ``gather`` (default, :data:`~lowbit_tp.collectives.algorithms.DEFAULT_ALGORITHM`),
            ``two-shot``, ``auto``, or ``exact`` (only without a codec: a codec with
            ``exact`` would be ignored, so that is refused).
        policy: thresholds for ``auto``.
        observer: ``f(layer, partials, exact_sum)`` called for every layer call.
        calibration: passed to ``make_codec`` when ``codec`` is a name.
    """

    def __init__(self, model: nn.Module, *, tp: int, codec: Codec | str | None = None,
                 algorithm: str = DEFAULT_ALGORITHM,
                 policy: AutoPolicy | None = None, observer: Optional[Observer] = None, calibration=None,
                 name: str | None = None):
        self.model = model
        self.tp = tp
        self.adapter = get_adapter(model, name=name)
        check_tp(model.config, tp, name=name)
        self.layers = self.adapter.row_parallel_layers(model)
        if isinstance(codec, str):
            codec = make_codec(codec, calibration=calibration)
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
        if codec is not None and algorithm == "exact":
            raise ValueError(f"algorithm 'exact' would ignore codec {codec.name!r}; use gather, two-shot or auto, "
                             f"or codec=None for the exact sum")
        self.codec = codec
        self.algorithm = algorithm if codec is not None else "exact"
        self.policy = policy
        self.observer = observer
        self.per_layer: dict[str, CommStats] = {}
        self._swapped: list[tuple[nn.Module, str, nn.Module]] = []

    @property
    def layer_names(self) -> list[str]:
        return [l.name for l in self.layers]

    def combine(self, layer: str, partials: list[torch.Tensor]) -> torch.Tensor:
        """The all-reduce every simulated row-parallel layer calls."""
        total = None
        if self.observer is not None:
            total = sum_in_rank_order(partials)
            self.observer(layer, partials, total)
        if self.codec is None or self.algorithm == "exact":
            return (total if total is not None else sum_in_rank_order(partials)).to(partials[0].dtype)
        st = self.per_layer.setdefault(layer, CommStats())
        return simulate_all_reduce(partials, self.codec, self.algorithm, layer=layer, policy=self.policy, stats=st)

    def comm_stats(self) -> CommStats:
        """All layers' traffic added up (what one rank sent)."""
        total = CommStats()
        for st in self.per_layer.values():
            total.add(st)
        return total

    def __enter__(self) -> "TPSimulator":
        for layer in self.layers:
            parent_name, _, attr = layer.name.rpartition(".")
            parent = self.model.get_submodule(parent_name)
            linear = getattr(parent, attr)
            shards = self.adapter.input_shards(layer, self.tp)
            setattr(parent, attr, SimulatedRowParallel(linear, shards, name=layer.name, simulator=self))
            self._swapped.append((parent, attr, linear))
        return self

    def __exit__(self, *exc) -> None:
        for parent, attr, linear in reversed(self._swapped):
            setattr(parent, attr, linear)
        self._swapped.clear()
