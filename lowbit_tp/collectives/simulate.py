"""Single-process reference for the compressed all-reduce.

:func:`simulate_all_reduce` takes all N ranks' partials and returns what every rank holds
after :func:`lowbit_tp.collectives.all_reduce`, bitwise: both run the stage functions of
``collectives.algorithms``; only the movement of payloads differs.
"""
from __future__ import annotations

from typing import Sequence

import torch

from lowbit_tp.codecs.base import Codec
from lowbit_tp.collectives import algorithms as A
from lowbit_tp.collectives.feedback import Feedback, compensate
from lowbit_tp.collectives.policy import AutoPolicy, CommStats, resolve_algorithm


def simulate_all_reduce(
    partials: Sequence[torch.Tensor],
    codec: Codec,
    algorithm: str = A.DEFAULT_ALGORITHM,
    *,
    layer: str | None = None,
    policy: AutoPolicy | None = None,
    stats: CommStats | None = None,
    feedback: Sequence[Feedback] | None = None,
) -> torch.Tensor:
    """Reduce ``partials`` (rank r's ``[tokens, E]`` partial at index r) as N ranks would.

    Returns the common result in the partials' dtype. ``stats`` (optional) records what
    one rank sends. ``feedback`` (optional, one :class:`~lowbit_tp.collectives.feedback.Feedback`
    per rank): error feedback, each rank encodes its partial plus its ``carry`` and gets its
    ``next`` compensation, as :func:`~lowbit_tp.collectives.all_reduce` does. ``exact`` sums in fp32 in rank order (the multi-process ``exact`` uses
    the backend's own all-reduce and agrees to floating-point tolerance, not bitwise).
    """
    world = len(partials)
    if world == 0:
        raise ValueError("simulate_all_reduce needs at least one partial")
    x0 = partials[0]
    for r, p in enumerate(partials):
        if p.shape != x0.shape or p.dtype != x0.dtype:
            raise ValueError(
                f"partial of rank {r} is {p.dtype} {tuple(p.shape)}, rank 0's is {x0.dtype} {tuple(x0.shape)}"
            )
    if x0.dim() != 2:
        raise ValueError(f"partials must be [tokens, E], got shape {tuple(x0.shape)}")
    if feedback is not None and len(feedback) != world:
        raise ValueError(f"error feedback for {len(feedback)} ranks, but {world} partials")
    algo = resolve_algorithm(algorithm, numel=x0.numel(), world_size=world, policy=policy)
    A.check_codec(codec, algo, world)
    if world == 1 or algo == "exact":  # lossless: a carry is summed exactly and nothing is left over
        if feedback is not None:
            partials = [compensate(p, f.carry) for p, f in zip(partials, feedback)]
            for f in feedback:
                spare = f.next_buffer(x0)
                f.next = torch.zeros(x0.shape, dtype=torch.float32, device=x0.device) if spare is None else spare.zero_()
        if world == 1:
            return partials[0].to(x0.dtype, copy=True)
        if stats is not None:
            stats.record_exact(x0, world=world)
        return A.sum_in_rank_order(partials).to(x0.dtype)
    shape = tuple(x0.shape)
    if algo == "gather":
        if feedback is None:
            payloads = [A.gather_encode(codec, p, layer=layer, rank=r) for r, p in enumerate(partials)]
        else:
            payloads = [A.gather_encode_feedback(codec, p, f, layer=layer, rank=r)
                        for r, (p, f) in enumerate(zip(partials, feedback))]
        out = A.gather_decode_sum(codec, payloads, shape, layer=layer)
        if stats is not None:
            stats.record_gather(payloads[0], world=world, values=x0.numel())
        return out.to(x0.dtype)
    # two-shot
    chunk_shape = (A.chunk_rows(shape[0], world), shape[1])
    if feedback is None:
        chunks = [A.two_shot_encode(codec, p, layer=layer, rank=r, world=world) for r, p in enumerate(partials)]
        sums = [A.two_shot_reduce(codec, [chunks[r][j] for r in range(world)], chunk_shape, layer=layer)
                for j in range(world)]
    else:
        chunks = [A.two_shot_encode_feedback(codec, p, f, layer=layer, rank=r, world=world)
                  for r, (p, f) in enumerate(zip(partials, feedback))]
        sums = []
        for j in range(world):
            mine = [chunks[r][j] for r in range(world)]
            if not feedback[j].owner_error:  # first-stage feedback only: the owner keeps no error
                sums.append(A.two_shot_reduce(codec, mine, chunk_shape, layer=layer))
                continue
            payload, err = A.two_shot_reduce_feedback(codec, mine, chunk_shape, layer=layer)
            A.add_owner_feedback(feedback[j], err, owner=j, world=world)
            sums.append(payload)
    into = (torch.empty(shape, dtype=x0.dtype, device=x0.device)
            if A.two_shot_into_result(x0.dtype, out_given=False) else None)
    out = A.two_shot_decode(codec, sums, chunk_shape, shape[0], layer=layer, out=into)
    if stats is not None:  # what rank 0 sends
        stats.record_two_shot(chunks[0], sums[0], rank=0, values=x0.numel())
    return out.to(x0.dtype)
