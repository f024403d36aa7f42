"""Error feedback along depth: a rank sends its last quantization error back at its next all-reduce.

In a pre-norm transformer (Llama, SmolLM2, Mistral, Qwen2) every row-parallel all-reduce
adds straight into the residual stream, ``h <- h + AR_l``. With a lossy codec
``AR_l = Delta_l + E_l``, where ``E_l = sum_r e_{l,r}`` and ``e_{l,r} = decode(payload) - sent``
is rank r's quantization error, which rank r knows exactly (it can decode its own payload).
Without feedback the residual after step l carries ``E_1 + ... + E_l``. With feedback, rank r
sends ``p_{l,r} + c_{l,r}`` with ``c_{l,r} = -e_{l-1,r}``, so ``AR_l = Delta_l - E_{l-1} + E_l``
and the residual telescopes: after any step it carries only that step's ``E_l`` (plus what
the earlier one-step errors changed in the later blocks' outputs, which nobody can send
back). Same payloads, same bytes: bits/value do not change. This is the error feedback of
compressed-gradient training (EF-SGD), applied along the depth of one forward pass.

Where the error of each algorithm lands:

* ``gather``: rank r's payload is all the wire carries of its partial, so its compensation
  is ``sent_r - decode(payload_r)``.
* ``two-shot``: rank r's row chunks carry the same first-stage error; the owner j of a
  chunk re-encodes the chunk's sum, and that second error ``S_j - decode(enc(S_j))`` joins
  rank j's compensation on the chunk's rows (any rank may compensate any row: partials are
  summed).

A compensation is kept in fp32 and is zero wherever the error is not finite (NaN/Inf in the
input in ``nonfinite="propagate"`` mode never travel to the next layer this way).

**Post-norm models (Gemma 3).** There each output is normalised before the residual add,
``h <- h + g_l * y_l / rms(y_l)``, so an error ``E`` in ``y_l`` reaches the residual as
``J_l E`` with ``J_l = diag(g_l)/rms(y_l) (I - y_l y_l^T / (E rms(y_l)^2))``, the norm's Jacobian,
and the error cannot simply be sent back. With a :class:`PostNormFeedback` the chain keeps
each rank's *share* ``d_r`` of the residual error instead (its "carry" in residual space):

* before layer l, rank r sends ``c_r = -rms_est * d_r / g_l`` (:func:`postnorm_compensation`),
  ``rms_est = sqrt(N) * rms(p_r)`` from its own partial (a partial of N is about 1/sqrt(N)
  of the sum when the ranks' parts are uncorrelated), nothing on channels whose gain is below
  ``gain_floor`` times the median |gain|, and each value clipped to ``cap * rms(p_r)``;
* after the all-reduce every rank knows the decoded sum ``yhat`` (the same on all ranks), so
  ``d_r <- d_r + J_l(yhat) (c_r + q_r)`` with ``q_r`` its own quantization error
  (:func:`postnorm_share_update`). What the estimate missed, or the floor and the cap held
  back, stays in ``d_r`` and is sent at the next layer: the carry corrects itself.

On Gemma 3 270M TP 2 this keeps the KL within ~5% of the same carry with the exact rms
(``scripts/ef_postnorm_study.py``, docs/design-dev.md).

This module is the per-rank arithmetic (:func:`compensate`, :func:`feedback_of`), the in/out
record of one all-reduce (:class:`Feedback`), and the state across one forward pass's
all-reduces (:class:`FeedbackChain`). The collectives (``dist.all_reduce``,
``simulate.simulate_all_reduce``) run the same functions, so they stay bitwise equal.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from lowbit_tp.configs import FEEDBACK_MODES, feedback_mode  # re-exported

__all__ = ["FEEDBACK_MODES", "Feedback", "FeedbackChain", "PostNorm", "PostNormFeedback", "compensate",
           "feedback_mode", "feedback_of", "postnorm_compensation", "postnorm_share_update"]


def compensate(partial: torch.Tensor, carry: torch.Tensor | None) -> torch.Tensor:
    """What a rank encodes: its partial unchanged without a carry, else ``partial + carry`` in fp32."""
    if carry is None:
        return partial
    if carry.shape != partial.shape:
        raise ValueError(f"error-feedback carry of shape {tuple(carry.shape)} for a partial of shape "
                         f"{tuple(partial.shape)}")
    return partial.float() + carry


def feedback_of(sent: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
    """The compensation for the next all-reduce: ``sent - decoded`` in fp32, 0 where not finite."""
    return _zero_nonfinite_(sent.float() - decoded.float())


def _zero_nonfinite_(t: torch.Tensor) -> torch.Tensor:
    """``t`` (a temporary of ours) with NaN and +-Inf set to +0.0, in place: one pass, where
    ``torch.where(torch.isfinite(t), t, 0)`` took four and two temporaries (on one CPU core the
    larger part of feedback's own work per all-reduce); the same bits."""
    return t.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


@dataclass(frozen=True)
class PostNorm:
    """The norm between one row-parallel output ``y`` and the residual: ``h <- h + gain * y / rms(y)``,
    ``rms(y) = sqrt(mean(y^2) + eps)`` over the last dim; ``gain`` ``[E]`` (Gemma: ``1 + weight``)."""

    gain: torch.Tensor
    eps: float = 1e-6
    _inverse: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def inverse_gain(self, gain_floor: float, device: torch.device) -> torch.Tensor:
        """``1 / gain`` in fp32, 0 where ``|gain| < gain_floor * median |gain|``: a property of the
        norm, so worked out once per floor and device, not at every layer call."""
        key = (gain_floor, str(device))
        if key not in self._inverse:
            g = self.gain.float().to(device)
            keep = g.abs() >= gain_floor * g.abs().median()
            one, zero = torch.ones((), device=device), torch.zeros((), device=device)
            self._inverse[key] = torch.where(keep, 1.0 / torch.where(keep, g, one), zero)
        return self._inverse[key]


@dataclass(frozen=True)
class PostNormFeedback:
    """Error feedback through post-norms (module doc): ``norms`` maps each row-parallel layer
    to its :class:`PostNorm`; ``tp`` is the TP degree (the rms estimate's sqrt(tp));
    ``gain_floor``: no compensation on channels with ``|gain| < gain_floor * median |gain|``;
    ``cap``: each compensation value is clipped to ``cap * rms(partial)``."""

    norms: dict
    tp: int
    gain_floor: float = 0.3
    cap: float = 2.0

    def __post_init__(self):
        if self.tp < 1:
            raise ValueError(f"post-norm error feedback: tp must be >= 1, got {self.tp}")
        if self.gain_floor < 0 or self.cap <= 0:
            raise ValueError(f"post-norm error feedback: need gain_floor >= 0 and cap > 0, got "
                             f"{self.gain_floor}, {self.cap}")


def _rms(x: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    x = x.float()
    return (x * x).mean(-1, keepdim=True).add(eps).sqrt()


def postnorm_compensation(share: torch.Tensor, partial: torch.Tensor, norm: PostNorm, *, tp: int,
                          gain_floor: float, cap: float) -> torch.Tensor:
    """Rank's compensation for a post-norm layer: ``-sqrt(tp) * rms(partial) * share / gain``
    (0 where ``|gain| < gain_floor * median |gain|``), each value clipped to ``+-cap * rms(partial)``;
    fp32, 0 where not finite."""
    inv = norm.inverse_gain(gain_floor, partial.device)
    r = _rms(partial)
    c = -(tp ** 0.5) * r * share * inv
    lim = cap * r
    return _zero_nonfinite_(torch.maximum(torch.minimum(c, lim), -lim))


def postnorm_share_update(share: torch.Tensor | None, carry: torch.Tensor | None, nxt: torch.Tensor,
                          decoded: torch.Tensor, norm: PostNorm) -> torch.Tensor:
    """Rank's new residual-space share ``share + J(decoded) (carry - nxt)`` (``carry - nxt`` is
    what this rank added to the sum beyond its partial: its compensation plus its quantization
    error; ``nxt`` is the collective's ``Feedback.next``), ``J`` the norm's Jacobian at the
    decoded sum: ``gain / rho * (v - y * mean(y * v) / rho^2)``, ``rho = rms(y)`` with eps."""
    y = decoded.float()
    v = -nxt if carry is None else carry - nxt
    m = (y * y).mean(-1, keepdim=True) + norm.eps
    jv = norm.gain.float().to(y.device) * (v - y * ((y * v).mean(-1, keepdim=True) / m)) / m.sqrt()
    return _zero_nonfinite_(jv if share is None else share + jv)


@dataclass
class Feedback:
    """One rank's error feedback through one all-reduce.

    In: ``carry``, the compensation to add to the partial before encoding (``[tokens, E]``
    fp32, or None for none). Out: the collective sets ``next``, this rank's compensation for
    its next all-reduce (fp32, the partial's shape).

    ``spare`` (optional, in): a buffer nobody else reads, which the collective may overwrite
    with ``next`` where it is a contiguous fp32 tensor of the partial's shape on its device
    (else it is ignored; it may be partly written even then, or when a fused path declines and
    the general path runs). :class:`FeedbackChain` hands each call the buffer its previous call
    consumed, within one forward pass, so a pass's carries take two buffers instead of one
    allocation per all-reduce (on a CPU, the page faults of a fresh ``[tokens, E]`` fp32 cost
    about a third of feedback's fused encode). Never across passes: a CUDA graph captured after
    an eager warm-up would keep writing a warm-up buffer the chain has since let go.
    """

    carry: torch.Tensor | None = None
    next: torch.Tensor | None = None
    spare: torch.Tensor | None = None
    # two-shot: whether the owner's second-stage error joins ``next`` on its chunk's rows
    # (:attr:`FeedbackChain.owner_errors`)
    owner_error: bool = True

    def next_buffer(self, like: torch.Tensor) -> torch.Tensor | None:
        """:attr:`spare` where ``next`` for a partial like ``like`` may be written into it, else
        None: it must be a contiguous fp32 tensor of ``like``'s shape and device whose memory
        overlaps neither the carry nor ``like``."""
        s = self.spare
        ok = (s is not None and s.dtype == torch.float32 and s.shape == like.shape and s.device == like.device
              and s.is_contiguous() and not _overlaps(s, self.carry) and not _overlaps(s, like))
        return s if ok else None


def _overlaps(a: torch.Tensor, b: torch.Tensor | None) -> bool:
    """Whether the memory ``a`` spans and the memory ``b`` spans (strided) intersect."""
    if b is None or a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False

    def span(t):
        lo = t.data_ptr()
        last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if n > 0)
        return lo, lo + (last + 1) * t.element_size()
    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


@dataclass
class FeedbackChain:
    """The carries of ``ranks`` ranks held by this process across one forward pass.

    ``order`` lists the row-parallel layers in the order a forward pass reduces them (the TP
    plan's order: ``layers.0.self_attn.o_proj``, ``layers.0.mlp.down_proj``, ...). A call
    for ``order[i]`` gets the carries left by ``order[i-1]``; any other call (the first layer,
    so each new forward pass, prefill or decode step, whatever its token count) starts
    without one. ``ranks``: all N in a simulation, 1 on a rank of a real TP group.

    The chain owns the carries: after :meth:`finish`, the buffers a call consumed are written
    over by the next call (:attr:`Feedback.spare`), so a carry (or what :meth:`pending`
    returns) is valid until the next all-reduce of the pass starts; copy it to keep it.
    ``post_norm``: the carries are residual-space shares mapped through each layer's norm
    (module doc); then :meth:`start` needs the partials and :meth:`finish` the decoded sum.

    ``owner_errors`` (two-shot only): feed back the owners' second-stage errors too (the
    default). Which rank owns a row's chunk depends on the pass's row count (and on the
    pipelined pieces), so with them a row's output depends on the rest of its batch. Without
    them (``error_feedback="first-stage"``) each rank feeds back only its own encode errors,
    which are row-local: the output of a row is the same in any batch, as with gather, and
    the second-stage error stays in the output as it does without feedback.
    """

    order: tuple[str, ...]
    ranks: int = 1
    post_norm: PostNormFeedback | None = None
    # hand each call the buffer its previous call consumed (Feedback.spare). It was off from the
    # end of stop 25 to stop 26 while a vLLM quality test failed; that failure repeated with it
    # off (+0.28316 nats both ways: the same bits); two-shot's owner of a row's second-stage
    # error depends on the pass's row count, so vLLM's batches are another draw than the
    # simulator's (tests/test_vllm_engine.py); the buffers were not the cause
    recycle: bool = True
    owner_errors: bool = True
    _index: dict[str, int] = field(init=False, repr=False)
    _last: str | None = field(default=None, init=False, repr=False)
    _carries: list = field(default_factory=list, init=False, repr=False)
    _shares: list = field(default_factory=list, init=False, repr=False)
    _spares: list = field(default_factory=list, init=False, repr=False)  # buffers the last call left dead

    def __post_init__(self):
        self.order = tuple(self.order)
        if not self.order:
            raise ValueError("error feedback needs the row-parallel layers in forward order, got none")
        if len(set(self.order)) != len(self.order):
            raise ValueError("error feedback: a layer appears twice in the forward order")
        if self.ranks < 1:
            raise ValueError(f"error feedback: ranks must be >= 1, got {self.ranks}")
        self._index = {name: i for i, name in enumerate(self.order)}
        if self.post_norm is not None:
            missing = [n for n in self.order if n not in self.post_norm.norms]
            if missing:
                raise ValueError(f"post-norm error feedback: no norm for layer {missing[0]!r}")

    def fresh(self) -> "FeedbackChain":
        """A chain of the same layers, ranks and mapping, without carries."""
        return FeedbackChain(self.order, ranks=self.ranks, post_norm=self.post_norm, recycle=self.recycle,
                             owner_errors=self.owner_errors)

    def start(self, layer: str, partials: Sequence[torch.Tensor] | None = None) -> list[Feedback]:
        """One :class:`Feedback` per rank for this call of ``layer``, carrying the previous
        layer's compensations when ``layer`` follows it in ``order``. With ``post_norm``,
        ``partials`` (this process's ranks' partials, in rank order) give the compensations."""
        carries = self.pending(layer)
        # a spare only within one forward pass, like the carries: a buffer of another pass (say
        # an eager warm-up's) written in a CUDA graph captured later could be freed while the
        # graph still writes it
        follows = self._follows(layer) and len(self._spares) == self.ranks and self.recycle
        spares = self._spares if follows else [None] * self.ranks
        self._last, self._carries, self._spares = None, [], []  # (a spare is handed out once)
        pn = self.post_norm
        if pn is None:
            return [Feedback(carry=c, spare=s, owner_error=self.owner_errors) for c, s in zip(carries, spares)]
        if partials is None or len(partials) != self.ranks:
            raise ValueError(f"post-norm error feedback for {layer!r} needs this process's {self.ranks} partial(s)")
        self._shares = carries
        return [Feedback(carry=None if d is None else
                         postnorm_compensation(d, p, pn.norms[layer], tp=pn.tp, gain_floor=pn.gain_floor, cap=pn.cap),
                         spare=s, owner_error=self.owner_errors)
                for d, p, s in zip(carries, partials, spares)]

    def pending(self, layer: str) -> list:
        """What (per rank, None for none) :meth:`start` would take over for ``layer`` now, without
        starting it (tracing reads it): the carries, or with ``post_norm`` the residual-space
        shares they are computed from."""
        if layer not in self._index:
            raise ValueError(f"error feedback: layer {layer!r} is not in the forward order of this model's plan")
        return list(self._carries) if self._follows(layer) else [None] * self.ranks

    def _follows(self, layer: str) -> bool:
        """``layer`` is the next in ``order`` after the last finished call (its carries hold)."""
        i = self._index[layer]
        return i > 0 and self._last == self.order[i - 1] and len(self._carries) == self.ranks

    def finish(self, layer: str, feedback: Sequence[Feedback], output: torch.Tensor | None = None) -> None:
        """Keep the compensations the collective produced for the next layer (with
        ``post_norm``: the residual-space shares updated with the decoded sum ``output``)."""
        if len(feedback) != self.ranks or any(f.next is None for f in feedback):
            raise ValueError(f"error feedback for {layer!r}: the collective left no compensation for every rank")
        if self.post_norm is None:  # this call's carries are read no more: the next call may overwrite them
            self._last, self._carries, self._spares = layer, [f.next for f in feedback], [f.carry for f in feedback]
            return
        if output is None:
            raise ValueError(f"post-norm error feedback for {layer!r} needs the decoded sum")
        norm = self.post_norm.norms[layer]
        self._last, self._carries = layer, [postnorm_share_update(d, f.carry, f.next, output, norm)
                                            for d, f in zip(self._shares, feedback)]
        self._shares, self._spares = [], [f.next for f in feedback]  # (the update made new tensors)

    def reset(self) -> None:
        """Forget the carries (the next call starts without one)."""
        self._last, self._carries, self._spares = None, [], []
