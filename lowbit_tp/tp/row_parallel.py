"""The one row-parallel step every engine runs: local partial products, then a reducer.

A row-parallel Linear ``y = x @ W.T + b`` over ``tp`` ranks: rank r holds the columns
``W[:, s_r]`` and its input slice ``x[..., s_r]``; its partial ``Y_r = x_r @ W_r.T`` has
the full width E, and ``y = sum_r Y_r + b`` (the bias once, after the sum).

:class:`RowParallelLinear` computes the partials this process owns and hands them to a
:class:`Reducer`; that is the only thing that differs between engines:

=======================  =====================================  ==========================
reducer                  partials it receives                   what it runs
=======================  =====================================  ==========================
:class:`SimulatedReducer`  all N ranks' (one process simulates TP)  :func:`~lowbit_tp.collectives.simulate_all_reduce`
:class:`DistReducer`     this rank's one partial                :func:`~lowbit_tp.collectives.all_reduce` over ``torch.distributed``
(vLLM plugin)            this rank's one partial                its own op, same contract
=======================  =====================================  ==========================

The Reducer contract (implement it to plug in another transport)::

    class Reducer(Protocol):
        def reduce(self, partials: Sequence[Tensor], *, layer: str) -> Tensor: ...

* ``partials``: the ``[tokens, E]`` partial outputs this process computed for layer
  ``layer``, in rank order: all N in a single-process simulation, exactly one (this
  rank's) in a process of a TP group. No bias in them.
* returns ``sum_r partials_r`` over *all* ranks of the group, ``[tokens, E]``, in the
  partials' dtype, bitwise the same on every rank. A compressed reducer returns the
  codec's reconstruction of that sum, bitwise equal to ``simulate_all_reduce`` of all
  ranks' partials with the same codec and algorithm.
* ``layer`` is the module's full name (``model.layers.3.mlp.down_proj``): static codecs
  look up their calibrated scales with it.
* rank and world size belong to the reducer (its process group), never to the layer.
* a reducer may write the sum over the partial it was given only when told the partials
  are scratch (``DistReducer(in_place=True)``, which the native runtime sets: a
  :class:`RowParallelLinear`'s partials are its own temporaries).

The per-rank arithmetic is :func:`local_partial` on :func:`shard_weight`, one call on
tensors of one layout in every engine, which is why a runtime rank's partial is bitwise
the simulator's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence, runtime_checkable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lowbit_tp.codecs.base import Codec, NonFiniteError
from lowbit_tp.collectives import AutoPolicy, CommStats, all_reduce, simulate_all_reduce
from lowbit_tp.collectives.algorithms import ALGORITHMS, DEFAULT_ALGORITHM, sum_in_rank_order
from lowbit_tp.collectives.policy import resolve_algorithm
from lowbit_tp.collectives.dist import WireHook
from lowbit_tp.collectives.feedback import FeedbackChain

__all__ = ["CommHooks", "DistReducer", "Observer", "Reducer", "RowParallelLinear", "SimulatedReducer",
           "check_reduce_config", "local_partial", "shard_weight"]

Observer = Callable[[str, list, torch.Tensor], None]


def shard_weight(weight: torch.Tensor, shard: slice) -> torch.Tensor:
    """Rank's columns of a row-parallel weight ``[E, D]`` as a contiguous ``[E, D_r]``."""
    return weight[:, shard].contiguous()


def local_partial(x_local: torch.Tensor, w_local: torch.Tensor) -> torch.Tensor:
    """``[tokens, D_r] @ [E, D_r].T -> [tokens, E]``: one rank's partial (no bias)."""
    return F.linear(x_local.contiguous(), w_local)


@runtime_checkable
class Reducer(Protocol):
    """Sums a row-parallel layer's partials over the TP ranks (contract in the module doc)."""

    def reduce(self, partials: Sequence[torch.Tensor], *, layer: str) -> torch.Tensor: ...


def check_reduce_config(codec: Codec, algorithm: str) -> None:
    """What a rank's reducer refuses when it is built, not at its first forward: an unknown
    ``algorithm``, a ``codec`` that is not a :class:`Codec` (a name), and ``exact`` with a
    codec other than ``bf16``, which would send uncompressed values and ignore the codec (as
    ``TPSimulator`` and ``RunConfig`` refuse it)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    if not isinstance(codec, Codec):
        raise TypeError(f"codec must be a lowbit_tp Codec (lowbit_tp.codecs.make_codec(name, calibration=...)), "
                        f"got {type(codec).__name__}" + (f" {codec!r}" if isinstance(codec, str) else ""))
    if algorithm == "exact" and codec.name != "bf16":
        raise ValueError(f"algorithm 'exact' (the backend all-reduce, uncompressed) would ignore codec {codec.name!r}; "
                         f"use gather, two-shot or auto, or codec bf16 for the exact baseline")


@dataclass
class SimulatedReducer:
    """All N partials live in this process: reduce them as N ranks would.

    ``codec=None`` or ``algorithm="exact"``: the exact fp32 sum in rank order (no traffic
    counted). Otherwise :func:`~lowbit_tp.collectives.simulate_all_reduce`, with one rank's
    traffic counted per layer in ``per_layer``. ``observer(layer, partials, exact_sum)``
    sees every call (calibration collects its statistics through it). ``feedback``: error
    feedback along depth for all N simulated ranks (a
    :class:`~lowbit_tp.collectives.feedback.FeedbackChain` with ``ranks=N`` over the plan's
    layer order), or None (off).
    """

    codec: Codec | None = None
    algorithm: str = DEFAULT_ALGORITHM
    policy: AutoPolicy | None = None
    observer: Optional[Observer] = None
    per_layer: dict[str, CommStats] = field(default_factory=dict)
    feedback: FeedbackChain | None = None

    def reduce(self, partials: Sequence[torch.Tensor], *, layer: str) -> torch.Tensor:
        partials = list(partials)
        total = None
        if self.observer is not None:
            total = sum_in_rank_order(partials)
            self.observer(layer, partials, total)
        if self.codec is None or self.algorithm == "exact":
            return (total if total is not None else sum_in_rank_order(partials)).to(partials[0].dtype)
        st = self.per_layer.setdefault(layer, CommStats())
        fb = None if self.feedback is None else self.feedback.start(layer, partials)
        out = simulate_all_reduce(partials, self.codec, self.algorithm, layer=layer, policy=self.policy, stats=st,
                                  feedback=fb)
        if fb is not None:
            self.feedback.finish(layer, fb, out)
        return out

    def stats(self) -> CommStats:
        """All layers' traffic added up (what one rank sent)."""
        return CommStats.total(self.per_layer.values())

    def check_nonfinite(self) -> None:
        """Once per step: raise what the codec's device flags recorded (``"flag"`` mode, or
        ``"error"`` mode deferred on the fused GPU path); see :meth:`Codec.check_nonfinite`."""
        if self.codec is not None:
            self.codec.check_nonfinite()


@dataclass(frozen=True)
class CommHooks:
    """Explicit timing/tracing hooks of a :class:`DistReducer` (nothing is patched).

    ``around_reduce(layer, reduce)``: wraps each whole reduce (encode + wire + decode + sum);
    must call ``reduce()`` once and return its result. ``around_wire(what, group, send)``:
    wraps each backend collective inside it (see :data:`~lowbit_tp.collectives.dist.WireHook`).
    """

    around_reduce: Optional[Callable[[str, Callable[[], torch.Tensor]], torch.Tensor]] = None
    around_wire: Optional[WireHook] = None


@dataclass
class DistReducer:
    """This process is one rank of ``group``: one :func:`~lowbit_tp.collectives.all_reduce`
    per call (``algorithm``, ``policy``), its traffic added to ``stats``; ``hooks`` time it.
    ``feedback``: this rank's error feedback along depth (a
    :class:`~lowbit_tp.collectives.feedback.FeedbackChain` with ``ranks=1`` over the plan's
    layer order), or None (off); every rank of the group must agree on it.
    ``in_place``: the partial handed to :meth:`reduce` is scratch (a :class:`RowParallelLinear`'s
    own ``local_partial`` output, as in the native runtime), so gather and exact write the sum
    over it, like ``torch.distributed.all_reduce``; same bits, one ``[tokens, E]`` allocation
    fewer per call (two-shot still returns a fresh sum).
    Off by default: the engine integrations hand over module outputs others may hold."""

    codec: Codec
    group: Any = None
    algorithm: str = DEFAULT_ALGORITHM
    policy: AutoPolicy | None = None
    stats: CommStats = field(default_factory=CommStats)
    hooks: CommHooks = CommHooks()
    feedback: FeedbackChain | None = None
    in_place: bool = False

    def __post_init__(self):
        check_reduce_config(self.codec, self.algorithm)

    def reduce(self, partials: Sequence[torch.Tensor], *, layer: str) -> torch.Tensor:
        if len(partials) != 1:
            raise ValueError(f"a rank reduces its own partial only, got {len(partials)} partials for {layer!r}")

        def run() -> torch.Tensor:
            fb = None if self.feedback is None else self.feedback.start(layer, partials)
            out = all_reduce(partials[0], self.codec, self.group, algorithm=self.algorithm, layer=layer,
                             policy=self.policy, stats=self.stats, wire_hook=self.hooks.around_wire,
                             feedback=None if fb is None else fb[0], out=self._out_for(partials[0]))
            if fb is not None:
                self.feedback.finish(layer, fb, out)
            return out

        return run() if self.hooks.around_reduce is None else self.hooks.around_reduce(layer, run)

    def _out_for(self, partial: torch.Tensor) -> torch.Tensor | None:
        """The partial itself where ``in_place`` saves work: gather and exact write the sum
        straight into it; two-shot decodes into chunk tensors, so a copy into the partial would
        cost more than the allocation it saves (and a strided partial cannot take the sum)."""
        if not self.in_place or not partial.is_contiguous():
            return None
        algo = resolve_algorithm(self.algorithm, numel=partial.numel(), world_size=dist.get_world_size(self.group),
                                 policy=self.policy)
        return None if algo == "two-shot" else partial

    def check_nonfinite(self) -> None:
        """Once per step (``generate`` calls it after each forward): raise what the codec's
        device flags recorded since the last step, naming this rank, the layers and sources.

        One device->host read per step, never one per message. In ``"error"`` mode on the
        fused GPU path this is where a NaN/Inf or an out-of-range value raises; the other
        paths raised at the message already.
        """
        try:
            self.codec.check_nonfinite()
        except NonFiniteError as exc:
            rank, world = dist.get_rank(self.group), dist.get_world_size(self.group)
            raise type(exc)(f"rank {rank}/{world}: {exc}") from None


class RowParallelLinear(nn.Module):
    """The column blocks ``W[:, s]`` of the ranks this process computes, plus one reduce.

    ``weights[i]`` is ``W[:, shards[i]]`` (contiguous, see :func:`shard_weight`), and
    ``shards[i]`` selects that rank's input features from this module's input ``x``: in a
    simulation ``x`` is the full input and there are N shards; in a rank's shard ``x`` is
    already the rank's slice and ``shards = [slice(None)]``.

    ``forward(x [..., D]) -> [..., E]``: the partials ``local_partial(x[:, s_i], W_i)``, then
    ``reducer.reduce(partials, layer=name)``, then the full bias once. All ranks of a
    distributed reducer's group must call it together.
    """

    def __init__(self, weights: Sequence[torch.Tensor], bias: torch.Tensor | None, *, shards: Sequence[slice],
                 name: str, reducer: Reducer):
        super().__init__()
        if len(weights) != len(shards) or not weights:
            raise ValueError(f"{name}: {len(weights)} weight blocks for {len(shards)} input shards")
        self.weights = nn.ParameterList([nn.Parameter(w, requires_grad=False) for w in weights])
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.shards = list(shards)
        self.name = name
        self.reducer = reducer

    @property
    def out_features(self) -> int:
        return self.weights[0].shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            # its weights are frozen copies and a codec's payload cuts the graph: a backward pass
            # ran and left these layers' weights, and with a codec everything before them, no gradient
            raise RuntimeError(f"{self.name}: the row-parallel layers of lowbit-tp (TPSimulator, the TP runtime) "
                               f"run inference only: run the model under torch.no_grad()")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        partials = [local_partial(x2[:, s], w) for s, w in zip(self.shards, self.weights)]
        y = self.reducer.reduce(partials, layer=self.name)
        if self.bias is not None:
            y = y + self.bias  # once, after the reduce
        return y.reshape(*lead, y.shape[-1])

    def extra_repr(self) -> str:
        return f"name={self.name!r}, blocks={len(self.shards)}, out_features={self.out_features}"
