"""Compressed all-reduce over ``torch.distributed`` (gloo on CPU, NCCL on GPU, same code).

:func:`all_reduce` is the one entry point. It resolves the algorithm (``auto`` by message
size and world size, see :class:`~lowbit_tp.collectives.policy.AutoPolicy`), runs the
stages of :mod:`lowbit_tp.collectives.algorithms`, and moves only encoded uint8 payloads,
with ``all_gather`` and ``all_to_all_single``. The first call per (group, codec) checks
that all ranks use the same codec configuration and calibration.

A dead or stalled peer surfaces as :class:`CollectiveError` once the process group's
timeout expires (``init_process_group(timeout=...)``); it never hangs forever.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist

from lowbit_tp.codecs.base import Codec
from lowbit_tp.collectives import algorithms as A
from lowbit_tp.collectives.policy import AutoPolicy, CommStats, resolve_algorithm

_CHECKED: set[tuple[int, str, str]] = set()


class CollectiveError(RuntimeError):
    """A collective failed: a peer died, timed out, or disagrees on the configuration."""


def _rank_world(group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


# A wire hook wraps every backend collective of :func:`all_reduce`: it is called as
# ``hook(what, group, send)`` and must call ``send()`` once and return its result. Benchmarks
# time the transfer with it (and may synchronise the ranks first); nothing else changes.
WireHook = Callable[[str, Any, Callable[[], Any]], Any]


def _guard(what: str, layer, group, fn, hook: WireHook | None = None):
    try:
        return fn() if hook is None else hook(what, group, fn)
    except CollectiveError:
        raise
    except Exception as exc:  # gloo/NCCL raise RuntimeError or DistBackendError subclasses
        rank, world = _rank_world(group)
        where = f" for layer {layer!r}" if layer is not None else ""
        raise CollectiveError(
            f"rank {rank}/{world}: {what}{where} failed: {exc}. A peer rank probably died or "
            f"stalled past the process-group timeout."
        ) from exc


def check_group_config(codec: Codec, group=None, *, extra: dict | None = None, layer: str | None = None) -> None:
    """Raise :class:`CollectiveError` unless every rank of ``group`` has the same codec config.

    Runs one small ``all_gather_object``; all ranks must call it together. Cached per
    (group, config), so :func:`all_reduce` pays for it once.
    """
    mine = {**codec.config(), **(extra or {})}
    key = (id(group), codec.fingerprint(), repr(sorted((extra or {}).items())))
    if key in _CHECKED:
        return
    rank, world = _rank_world(group)
    gathered: list = [None] * world
    _guard("configuration check", layer, group, lambda: dist.all_gather_object(gathered, mine, group=group))
    diff = [r for r, cfg in enumerate(gathered) if cfg != gathered[0]]
    if diff:
        lines = "\n".join(f"  rank {r}: {cfg}" for r, cfg in enumerate(gathered))
        raise CollectiveError(f"ranks disagree on the compressed all-reduce configuration:\n{lines}")
    _CHECKED.add(key)


def all_reduce(
    partial: torch.Tensor,
    codec: Codec,
    group=None,
    *,
    algorithm: str = A.DEFAULT_ALGORITHM,
    layer: str | None = None,
    policy: AutoPolicy | None = None,
    stats: CommStats | None = None,
    wire_hook: WireHook | None = None,
) -> torch.Tensor:
    """Sum ``partial [tokens, E]`` over the ranks of ``group``; returns a new tensor.

    Triggers: ``exact`` -> one backend ``all_reduce`` in the input dtype; ``gather`` -> one
    ``all_gather`` of payloads; ``two-shot`` -> one ``all_to_all_single`` plus one
    ``all_gather``. Every rank gets bitwise the same result, equal to
    :func:`~lowbit_tp.collectives.simulate.simulate_all_reduce` on the same partials.
    ``wire_hook`` (see :data:`WireHook`) wraps each of those backend calls.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("all_reduce needs an initialised torch.distributed process group")
    rank, world = _rank_world(group)
    if partial.dim() != 2:
        raise ValueError(f"all_reduce expects a [tokens, E] partial, got shape {tuple(partial.shape)}")
    algo = resolve_algorithm(algorithm, numel=partial.numel(), world_size=world, policy=policy)
    if world == 1:
        return partial.clone()
    if algo == "exact":
        out = partial.clone()
        _guard("exact all_reduce", layer, group, lambda: dist.all_reduce(out, group=group), wire_hook)
        if stats is not None:
            stats.record_exact(partial, world=world)
        return out
    check_group_config(codec, group, layer=layer)
    shape = tuple(partial.shape)
    if algo == "gather":
        payload = A.gather_encode(codec, partial, layer=layer, rank=rank)
        got = [torch.empty_like(payload) for _ in range(world)]
        _guard("all_gather of payloads", layer, group, lambda: dist.all_gather(got, payload, group=group),
           wire_hook)
        out = A.gather_decode_sum(codec, got, shape, layer=layer)
        if stats is not None:
            stats.record_gather(payload, world=world, values=partial.numel())
        return out.to(partial.dtype)
    # two-shot: all payload chunks have one size, so all_to_all_single needs no split sizes
    chunks = A.two_shot_encode(codec, partial, layer=layer, rank=rank, world=world)
    send = torch.cat(chunks)
    recv = torch.empty_like(send)
    _guard("all_to_all of chunks", layer, group, lambda: dist.all_to_all_single(recv, send, group=group),
           wire_hook)
    chunk_shape = (A.chunk_rows(shape[0], world), shape[1])
    mine = A.two_shot_reduce(codec, list(recv.chunk(world)), chunk_shape, layer=layer)
    sums = [torch.empty_like(mine) for _ in range(world)]
    _guard("all_gather of reduced chunks", layer, group, lambda: dist.all_gather(sums, mine, group=group),
           wire_hook)
    out = A.two_shot_decode(codec, sums, chunk_shape, shape[0], layer=layer)
    if stats is not None:
        stats.record_two_shot(chunks, mine, rank=rank, values=partial.numel())
    return out.to(partial.dtype)
