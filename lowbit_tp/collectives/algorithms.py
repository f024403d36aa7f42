"""The arithmetic of each compressed all-reduce, split into per-rank stages.

Both the multi-process collective (``collectives.dist``) and the single-process
reference (``collectives.simulate``) run exactly these functions and differ only in how
payloads move between stages. That is what makes their results bitwise equal.

Every algorithm ends with all ranks decoding the same payloads in the same order and
summing in fp32 in rank order, so all ranks hold bitwise-identical results.

``gather`` (the seed paper's collective)::

    payload_r = encode(Y_r, source=r)            # on rank r
    all-gather payloads                          # (N-1) * |payload| bytes sent per rank
    Y = sum_{r=0..N-1} decode(payload_r, source=r)

``two-shot`` (reduce-scatter by all-to-all, then all-gather)::

    split Y_r by rows into N chunks (rows padded with zeros to a multiple of N)
    send chunk j, encoded with source=r, to rank j         # all-to-all
    rank j: S_j = sum_r decode(chunk_j from r)             # fp32, rank order
    rank j: encode(S_j, source="sum")                      # second quantization
    all-gather the N encoded sums; every rank decodes all of them

The second quantization uses ``source="sum"``: static codecs take scales calibrated on the
*reduced* output (its range is not any single partial's), dynamic codecs compute them
from the sum itself. Either way no extra metadata is needed beyond the codec's own.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from lowbit_tp.codecs.base import Codec
from lowbit_tp.collectives.feedback import Feedback, compensate, feedback_of
from lowbit_tp.configs import ALGORITHMS, DEFAULT_ALGORITHM  # noqa: F401 (re-exported)


def check_codec(codec: Codec | None, algorithm: str, world: int) -> None:
    """What both collectives refuse before any stage runs: a ``codec`` that is not a
    :class:`Codec` (None only with ``exact``), and, on a compressed algorithm over several
    ranks, a codec whose calibration was made for another TP degree: its rank-``r``
    statistics describe rank r's partial of another split, so with fewer ranks the scales
    would be silently wrong (with more, rank N has none)."""
    if not isinstance(codec, Codec):
        if codec is None and algorithm == "exact":
            return
        raise TypeError(f"codec must be a lowbit_tp Codec (lowbit_tp.codecs.make_codec(name, calibration=...)), "
                        f"got {type(codec).__name__}" + (f" {codec!r}" if isinstance(codec, str) else ""))
    if codec.calibration is not None and world > 1 and algorithm != "exact":
        codec.calibration.check_compatible(tp=world)  # the same refusal as a run's artifact check


def sum_in_rank_order(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``parts[0] + parts[1] + ...`` in fp32, left to right: the one summation order."""
    acc = parts[0].float().clone()
    for p in parts[1:]:
        acc.add_(p.float())
    return acc


# ---------------------------------------------------------------- gather
def gather_encode(codec: Codec, partial: torch.Tensor, *, layer, rank: int, out=None) -> torch.Tensor:
    return codec.encode(partial, layer=layer, source=rank, out=out)


def gather_encode_feedback(codec: Codec, partial: torch.Tensor, feedback: Feedback, *, layer, rank: int,
                           out=None, next_out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`gather_encode` of ``partial + feedback.carry``; sets ``feedback.next`` to what the
    payload lost (this rank decodes its own payload; see :mod:`~lowbit_tp.collectives.feedback`),
    written into ``next_out`` when given (a contiguous fp32 buffer of the partial's shape: a
    pipelined message's rows of one next carry), else into ``feedback.spare`` where it fits."""
    into = feedback.next_buffer(partial) if next_out is None else next_out
    fused = codec.encode_feedback(partial, feedback.carry, layer=layer, source=rank, out=out, next_out=into)
    if fused is not None:  # one kernel pass (Codec.encode_feedback): the same bytes and bits
        payload, feedback.next = fused
        return payload
    sent = compensate(partial, feedback.carry)
    payload = codec.encode(sent, layer=layer, source=rank, out=out)
    nxt = feedback_of(sent, codec.decode(payload, tuple(sent.shape), layer=layer, source=rank))
    feedback.next = nxt if next_out is None else next_out.copy_(nxt)  # (a spare need not hold it)
    return payload


def gather_decode_sum(codec: Codec, payloads: Sequence[torch.Tensor], shape, *, layer, out=None) -> torch.Tensor:
    return codec.decode_sum(payloads, shape, layer=layer, out=out)


# ---------------------------------------------------------------- two-shot
def chunk_rows(tokens: int, world: int) -> int:
    """Rows per two-shot chunk: the token dim is padded to ``world * chunk_rows``."""
    return max(1, math.ceil(tokens / world))


def _pad_rows(partial: torch.Tensor, world: int) -> torch.Tensor:
    """``partial`` with zero rows appended up to ``world * chunk_rows`` (two-shot's padding)."""
    t = partial.shape[0]
    rows = chunk_rows(t, world)
    return partial if rows * world == t else torch.nn.functional.pad(partial, (0, 0, 0, rows * world - t))


def _encode_flat(codec: Codec, partial: torch.Tensor, *, layer, rank: int, world: int,
                 out: torch.Tensor | None) -> torch.Tensor:
    """The N chunk payloads one after another (one batched launch where the codec has one)."""
    return codec.encode_chunks(_pad_rows(partial, world), world, layer=layer, source=rank, out=out)


def two_shot_encode(codec: Codec, partial: torch.Tensor, *, layer, rank: int, world: int,
                    out: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Rank ``rank``'s N encoded row chunks; chunk ``j`` is for rank ``j``. They are the N
    consecutive parts of one flat buffer (``out`` when given): :meth:`Codec.encode_chunks`,
    which encodes all chunks in one launch on the Triton path."""
    return list(_encode_flat(codec, partial, layer=layer, rank=rank, world=world, out=out).chunk(world))


def two_shot_encode_feedback(codec: Codec, partial: torch.Tensor, feedback: Feedback, *, layer, rank: int,
                             world: int, out: torch.Tensor | None = None) -> list[torch.Tensor]:
    """:func:`two_shot_encode` of ``partial + feedback.carry``; sets ``feedback.next`` to what
    this rank's N chunks lost (the owners' second-stage errors are added by
    :func:`add_owner_feedback`)."""
    fused = _encode_chunks_feedback(codec, partial, feedback.carry, layer=layer, rank=rank, world=world, out=out,
                                    next_out=feedback.next_buffer(partial))
    if fused is not None:  # one Codec.encode_feedback per chunk: the same bytes and bits
        flat, feedback.next = fused
        return list(flat.chunk(world))
    sent = compensate(partial, feedback.carry)
    flat = _encode_flat(codec, sent, layer=layer, rank=rank, world=world, out=out)
    shape = (chunk_rows(sent.shape[0], world), sent.shape[1])
    decoded = codec.decode_chunks(flat, shape, world, layer=layer, source=rank)
    feedback.next = feedback_of(sent, decoded[:sent.shape[0]])
    return list(flat.chunk(world))


def _encode_chunks_feedback(codec: Codec, partial: torch.Tensor, carry: torch.Tensor | None, *, layer, rank: int,
                            world: int, out: torch.Tensor | None, next_out: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Two-shot's first stage with error feedback from one :meth:`Codec.encode_feedback` per row
    chunk, each writing its chunk's bytes of the flat payload and its rows of the next carry
    (``next_out``, a checked fp32 buffer of the partial's shape, or a new one): ``(flat,
    next)``, or None where the codec has no such pass for these tensors (the caller's general
    path then encodes everything again; nothing written here is used)."""
    if partial.dim() != 2 or (carry is not None and carry.shape != partial.shape):
        return None  # (the general path casts or refuses)
    t, e = int(partial.shape[0]), int(partial.shape[1])
    rows = chunk_rows(t, world)
    nb = codec.payload_nbytes((rows, e), layer)
    if out is not None and (out.dtype != torch.uint8 or out.dim() != 1 or out.numel() != world * nb):
        return None  # (encode_chunks refuses it in one line)
    flat = torch.empty(world * nb, dtype=torch.uint8, device=partial.device) if out is None else out
    nxt = torch.empty(t, e, dtype=torch.float32, device=partial.device) if next_out is None else next_out
    for j in range(world):
        lo, hi = min(j * rows, t), min((j + 1) * rows, t)
        x, c, into = partial[lo:hi], None if carry is None else carry[lo:hi], nxt[lo:hi]
        if hi - lo < rows:  # two-shot's zero padding rows, which carry nothing (+0.0 + +0.0 = +0.0, as padded)
            pad = (0, 0, 0, rows - (hi - lo))
            x = torch.nn.functional.pad(x, pad)
            c = None if c is None else torch.nn.functional.pad(c, pad)
            into = None
        got = codec.encode_feedback(x, c, layer=layer, source=rank, out=flat[j * nb:(j + 1) * nb], next_out=into)
        if got is None:
            return None
        if into is None:
            nxt[lo:hi] = got[1][:hi - lo]
    return flat, nxt


def two_shot_reduce_feedback(codec: Codec, chunks: Sequence[torch.Tensor], chunk_shape, *, layer,
                             out=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The owner's stage with error feedback: ``(payload, error)``, the payload of
    :func:`two_shot_reduce` (decode_sum, then encode, the same bytes by the codec contract) and
    what re-encoding the chunk's sum lost (fp32, ``chunk_shape``): the encode and the error in
    one :meth:`Codec.encode_feedback` where the codec has it."""
    total = codec.decode_sum(chunks, chunk_shape, layer=layer)
    fused = codec.encode_feedback(total, None, layer=layer, source="sum", out=out)
    if fused is not None:
        return fused
    payload = codec.encode(total, layer=layer, source="sum", out=out)
    return payload, feedback_of(total, codec.decode(payload, chunk_shape, layer=layer, source="sum"))


def add_owner_feedback(feedback: Feedback, error: torch.Tensor, *, owner: int, world: int) -> None:
    """Add owner ``owner``'s second-stage ``error`` to the rows of its chunk in its own
    ``feedback.next`` (padding rows beyond the tokens are dropped)."""
    tokens = feedback.next.shape[0]
    rows = chunk_rows(tokens, world)
    lo, hi = owner * rows, min((owner + 1) * rows, tokens)
    if hi > lo:
        feedback.next[lo:hi] += error[:hi - lo]


def two_shot_reduce(codec: Codec, chunks: Sequence[torch.Tensor], chunk_shape, *, layer, out=None) -> torch.Tensor:
    """Owner's stage: decode the N ranks' copies of its chunk, sum, re-encode the sum
    (one fused pass where the codec has a kernel for it)."""
    return codec.reduce_encode(chunks, chunk_shape, layer=layer, out_source="sum", out=out)


def two_shot_decode(codec: Codec, sums: Sequence[torch.Tensor], chunk_shape, tokens: int, *, layer,
                    flat: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Every rank: decode the N encoded chunk sums and stitch the rows back together
    (:meth:`Codec.decode_chunks`: one launch on the Triton path).

    ``flat``: the one buffer the N ``sums`` are consecutive parts of (the multi-process
    all-gather receives into one); without it the sums are joined first. ``out``: the
    ``[tokens, E]`` result (fp32 or the partials' dtype) to decode straight into, returned;
    the padding rows are not written (bitwise the fp32 rows cast once)."""
    if flat is None:
        flat = torch.cat(list(sums))
    if out is not None:
        return codec.decode_chunks(flat, chunk_shape, len(sums), layer=layer, source="sum", out=out)
    return codec.decode_chunks(flat, chunk_shape, len(sums), layer=layer, source="sum")[:tokens]


def two_shot_into_result(dtype: torch.dtype, *, out_given: bool, pieces: int = 1) -> bool:
    """Whether two-shot decodes straight into the all-reduce's result (:func:`two_shot_decode`'s
    ``out``): that saves the copy into a caller's ``out``, the cast to a bf16/fp16 result and the
    join of pipelined pieces. A fresh fp32 result of one piece has none of them (the decode is
    returned as it is), so there the decode keeps its own buffer."""
    return out_given or pieces > 1 or dtype != torch.float32
