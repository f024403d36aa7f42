"""Turn an HF model into an exact single-process simulation of TP = N.

Inside ``with TPSimulator(model, tp=N, codec=..., algorithm=...):`` every row-parallel
Linear of the model's TP plan (``o_proj``, ``down_proj``) becomes a
:class:`~lowbit_tp.tp.RowParallelLinear` holding all N ranks' column blocks, whose
reducer is a :class:`~lowbit_tp.tp.SimulatedReducer`: the N true per-rank partials are
combined by :func:`~lowbit_tp.collectives.simulate_all_reduce`, the same codec and
reduction code the multi-process collective runs. Everything else in the model is
untouched, and the original Linears come back on exit.

An ``observer(layer, partials, total)`` callback sees every layer's partials and their
exact sum; calibration uses it to collect channel statistics.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from lowbit_tp.codecs import Codec, make_codec
from lowbit_tp.collectives import AutoPolicy, CommStats
from lowbit_tp.collectives.algorithms import ALGORITHMS, DEFAULT_ALGORITHM, check_codec
from lowbit_tp.collectives.feedback import feedback_mode
from lowbit_tp.models.adapters import check_tp, get_adapter
from lowbit_tp.tp.plan import swap_module
from lowbit_tp.tp.row_parallel import Observer, RowParallelLinear, SimulatedReducer, shard_weight

__all__ = ["TPSimulator"]


def simulated_row_parallel(linear: nn.Linear, shards: list[slice], *, name: str,
                           reducer: SimulatedReducer) -> RowParallelLinear:
    """All ranks' column blocks of ``linear`` in one :class:`RowParallelLinear`."""
    w = linear.weight.detach()
    bias = None if linear.bias is None else linear.bias.detach()
    return RowParallelLinear([shard_weight(w, s) for s in shards], bias, shards=shards, name=name, reducer=reducer)


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
        error_feedback: each simulated rank adds its previous all-reduce's quantization error
            back into its next partial within a forward pass
            (:mod:`~lowbit_tp.collectives.feedback`); needs a codec. Same bytes.
            ``"first-stage"``: two-shot's owners keep their second-stage errors out of it, so a
            row's output does not depend on its batch (:attr:`FeedbackChain.owner_errors`).
    """

    def __init__(self, model: nn.Module, *, tp: int, codec: Codec | str | None = None,
                 algorithm: str = DEFAULT_ALGORITHM,
                 policy: AutoPolicy | None = None, observer: Optional[Observer] = None, calibration=None,
                 name: str | None = None, error_feedback: bool | str = False):
        self.model = model
        self.tp = tp
        self.adapter = get_adapter(model, name=name)
        check_tp(model.config, tp, name=name)
        self.layers = self.adapter.row_parallel_layers(model)
        if isinstance(codec, str):
            codec = make_codec(codec, calibration=calibration)
        elif calibration is not None:  # it would be ignored: the codec holds its own (or none)
            raise ValueError("calibration= is read only with a codec name; give a codec object its calibration "
                             "when you build it (make_codec(name, calibration=cal))")
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
        if codec is not None and algorithm == "exact":
            raise ValueError(f"algorithm 'exact' would ignore codec {codec.name!r}; use gather, two-shot or auto, "
                             f"or codec=None for the exact sum")
        self.codec = codec
        self.algorithm = algorithm if codec is not None else "exact"
        check_codec(codec, self.algorithm, tp)  # what every reduce would refuse (calibration of another TP), now
        on, owner_errors = feedback_mode(error_feedback)
        if on and codec is None:
            raise ValueError("error feedback needs a codec: the exact sum has no error to feed back")
        self.error_feedback = error_feedback
        chain = self.adapter.feedback_chain(model, tp=tp, ranks=tp, owner_errors=owner_errors) if on else None
        self.reducer = SimulatedReducer(codec=codec, algorithm=self.algorithm, policy=policy, observer=observer,
                                        feedback=chain)
        self._swapped: list[tuple[str, nn.Module]] = []

    @property
    def layer_names(self) -> list[str]:
        return [l.name for l in self.layers]

    @property
    def per_layer(self) -> dict[str, CommStats]:
        """One rank's traffic per layer (compressed algorithms only)."""
        return self.reducer.per_layer

    def comm_stats(self) -> CommStats:
        """All layers' traffic added up (what one rank sent)."""
        return self.reducer.stats()

    def __enter__(self) -> "TPSimulator":
        # entered twice, or inside another simulator of the same model: the layers are already
        # simulated (this ended in an AttributeError on RowParallelLinear.weight)
        busy = [l.name for l in self.layers if isinstance(self.model.get_submodule(l.name), RowParallelLinear)]
        if busy:
            raise RuntimeError(f"the model's row-parallel layers are already simulated ({busy[0]}"
                               f"{f' and {len(busy) - 1} more' if len(busy) > 1 else ''}): a TPSimulator is active "
                               f"on this model; leave its `with` block before entering another")
        try:
            for layer in self.layers:
                linear = self.model.get_submodule(layer.name)
                shards = self.adapter.input_shards(layer, self.tp)
                new = simulated_row_parallel(linear, shards, name=layer.name, reducer=self.reducer)
                self._swapped.append((layer.name, swap_module(self.model, layer.name, new)))
        except BaseException:  # no half-simulated model left behind (__exit__ does not run)
            self._restore()
            raise
        return self

    def check_nonfinite(self) -> None:
        """Raise what the codec's device flags recorded (``"flag"`` mode, or ``"error"`` mode
        deferred on the fused GPU path): call it once per step; leaving the block calls it too."""
        self.reducer.check_nonfinite()

    def _restore(self) -> None:
        for name, linear in reversed(self._swapped):
            swap_module(self.model, name, linear)
        self._swapped.clear()

    def __exit__(self, *exc) -> None:
        self._restore()
        if exc[0] is None:  # a deferred NaN/Inf error surfaces at the latest here
            self.check_nonfinite()
