"""Compressed all-reduce over ``torch.distributed`` (gloo on CPU, NCCL on GPU, same code).

:func:`all_reduce` is the one entry point. It resolves the algorithm (``auto`` by message
size and world size, see :class:`~lowbit_tp.collectives.policy.AutoPolicy`), runs the
stages of :mod:`lowbit_tp.collectives.algorithms`, and moves only encoded uint8 payloads,
with ``all_gather`` and ``all_to_all_single``. The first compressed call per (group, codec,
algorithm, chunking) checks that all ranks use the same codec configuration and calibration,
the same requested algorithm and the same :class:`AutoPolicy` fields that act on the wire.

A dead or stalled peer surfaces as :class:`CollectiveError` once the process group's
timeout expires (``init_process_group(timeout=...)``); it never hangs forever.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import torch
import torch.distributed as dist

from lowbit_tp.codecs.base import Codec
from lowbit_tp.collectives import algorithms as A
from lowbit_tp.collectives.feedback import Feedback, compensate
from lowbit_tp.collectives.policy import AutoPolicy, CommStats, resolve_algorithm

_CHECKED: set[tuple] = set()  # configurations this process's groups agreed on (check_group_config, all_reduce)
_DEFAULT_POLICY = AutoPolicy()


class CollectiveError(RuntimeError):
    """A collective failed: a peer died, timed out, or disagrees on the configuration."""


class BufferCache:
    """Message buffers reused across :func:`all_reduce` calls: a small LRU keyed by
    (role, pipeline slot, device, dtype, size).

    A buffer is only ever in use inside one call (every transfer started there is waited for
    there), and a pipelined call gives each chunk in flight its own slot, so reusing them
    across calls is safe; the returned sum is a fresh tensor unless the caller passes ``out=``
    (never one of these buffers). Decode-step messages
    (one token, same width) hit the same few entries every step, so the codec kernels write
    into the same memory and nothing is allocated per message. Not thread-safe: one
    all-reduce at a time per process, as the collectives themselves require.
    """

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self._buffers: OrderedDict = OrderedDict()

    def get(self, role: str, slot: int, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (role, slot, torch.device(device), dtype, int(numel))
        buf = self._buffers.pop(key, None)
        if buf is None:
            buf = torch.empty(int(numel), dtype=dtype, device=device)
        self._buffers[key] = buf
        while len(self._buffers) > self.capacity:
            self._buffers.popitem(last=False)
        return buf

    def clear(self) -> None:
        self._buffers.clear()


BUFFERS = BufferCache()


def _rank_world(group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def _member_rank_world(what: str, group) -> tuple[int, int]:
    """This process's (rank, world) in ``group``, or a one-line :class:`CollectiveError` if it
    is not a member: torch makes every collective a no-op there (``exact`` returned the partial
    unsummed, the configuration check passed without comparing anything)."""
    rank, world = _rank_world(group)
    if rank < 0:
        raise CollectiveError(f"{what}: this process (global rank {dist.get_rank()}) is not a member of the "
                              f"group; call it on the group's ranks only")
    return rank, world


# A wire hook wraps every backend collective of :func:`all_reduce`: it is called as
# ``hook(what, group, send)`` and must call ``send()`` once and return its result. Benchmarks
# time the transfer with it (and may synchronise the ranks first); nothing else changes.
# In a pipelined message the hook wraps the start of the first chunk's transfer (``send()``
# starts it and returns at once) and then every wait for a chunk's transfer; the waits'
# ``what`` begins with :data:`WAIT`. A hook that lines the ranks up must do so only where
# ``what`` does not begin with it (before anything moves): a barrier between a start and its
# wait would wait for every transfer in flight (gloo's does) and undo the pipelining.
WireHook = Callable[[str, Any, Callable[[], Any]], Any]
WAIT = "wait for "


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
    (group, config), so :func:`all_reduce` pays for it once. A process that is not a member of
    ``group`` gets a :class:`CollectiveError` (there torch would compare nothing).
    """
    key = (id(group), codec.fingerprint(), repr(sorted((extra or {}).items())) if extra else "[]")
    if key in _CHECKED:  # the common case, on every call: no config dict built
        return
    _compare_configs(codec, group, key, extra, layer)


def _check_call(codec: Codec, group, algorithm: str, policy: AutoPolicy, layer) -> None:
    """:func:`all_reduce`'s check: the codec's config plus what else decides the wire traffic, the
    requested algorithm and the policy's fields that act on it (``chunk_bytes`` always, the
    thresholds under ``auto``). Ranks that differ there sent messages of different sizes or kinds:
    gloo aborted or the call ran into the timeout. It runs before every compressed message and,
    under ``auto``, before an exact one too, so a message that one rank's thresholds send exact
    (a larger ``min_bytes``) while a peer compresses it is refused on both. The key holds
    exactly those values, so a hit builds one tuple and no dict. A rank on ``auto`` and a peer on
    an explicit ``exact`` still make different calls (the exact peer checks nothing)."""
    auto = algorithm == "auto"
    key = (id(group), codec.fingerprint(), algorithm, policy.chunk_bytes,
           policy.min_bytes if auto else None, policy.two_shot_min_world if auto else None)
    if key in _CHECKED:
        return
    extra = {"algorithm": algorithm, "chunk_bytes": policy.chunk_bytes}
    if auto:
        extra.update(min_bytes=policy.min_bytes, two_shot_min_world=policy.two_shot_min_world)
    _compare_configs(codec, group, key, extra, layer)


_MISSING = "<not set>"


def _compare_configs(codec: Codec, group, key: tuple, extra: dict | None, layer) -> None:
    """The collective part of the checks above, on a cache miss; caches ``key`` when all agree.
    The error lists, per rank, only the entries that differ."""
    rank, world = _member_rank_world("check_group_config", group)
    mine = {**codec.config(), **(extra or {})}
    gathered: list = [None] * world
    _guard("configuration check", layer, group, lambda: dist.all_gather_object(gathered, mine, group=group))
    if any(cfg != gathered[0] for cfg in gathered):
        names = list(dict.fromkeys(k for cfg in gathered for k in cfg))
        differ = [k for k in names if len({repr(cfg.get(k, _MISSING)) for cfg in gathered}) > 1]
        lines = "\n".join(f"  rank {r}: {({k: cfg.get(k, _MISSING) for k in differ})}"
                          for r, cfg in enumerate(gathered))
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
    feedback: Feedback | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum ``partial [tokens, E]`` over the ranks of ``group``; returns a new tensor, or ``out``.

    Triggers: ``exact`` -> one backend ``all_reduce`` in the input dtype; ``gather`` -> one
    ``all_gather`` of payloads per chunk; ``two-shot`` -> one ``all_to_all_single`` plus one
    ``all_gather`` per chunk. Messages above ``policy.chunk_bytes`` go as pipelined row
    chunks (async transfers overlapping the codec). Every rank gets bitwise the same
    result, equal to :func:`~lowbit_tp.collectives.simulate.simulate_all_reduce` on the
    same partials, chunked or not. ``stats`` counts one call per message.
    ``wire_hook`` (see :data:`WireHook`) wraps each of those backend calls; in a pipelined
    message it wraps the first start and each wait for a chunk's transfer (the transfer time
    the codec did not hide), the waits named ``WAIT + what``.
    ``feedback`` (optional): error feedback, this rank encodes ``partial + feedback.carry`` and
    ``feedback.next`` is set to its compensation for its next all-reduce
    (:mod:`~lowbit_tp.collectives.feedback`), bitwise as in ``simulate_all_reduce``.
    ``out`` (optional): where the sum goes, returned; it may be ``partial`` itself (in place, as
    ``torch.distributed.all_reduce`` does), or a tensor sharing no memory with it, contiguous, of
    ``partial``'s shape, dtype and device. In place saves allocating (and, on CPU, first touching)
    a fresh ``[tokens, E]`` result on every call; the bits are the same. Both algorithms decode
    chunk i into its rows once chunk i has been encoded, so ``partial`` must not be read
    by anyone else meanwhile; if the call raises (a dead peer, a non-finite value in a later
    chunk), ``out`` may hold some rows of the sum.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("all_reduce needs an initialised torch.distributed process group")
    rank, world = _member_rank_world("all_reduce", group)
    if partial.dim() != 2:
        raise ValueError(f"all_reduce expects a [tokens, E] partial, got shape {tuple(partial.shape)}")
    if out is not None:
        _check_out(out, partial)
    if feedback is not None and feedback.carry is not None and feedback.carry.shape != partial.shape:
        # before anything is sent: split by row chunks below, a longer carry was cut to the partial's
        # rows and the call failed only after the transfer, in a TypeError or IndexError
        compensate(partial, feedback.carry)  # raises, naming both shapes
    algo = resolve_algorithm(algorithm, numel=partial.numel(), world_size=world, policy=policy)
    A.check_codec(codec, algo, world)
    policy = policy or _DEFAULT_POLICY
    if world > 1 and (algo != "exact" or algorithm == "auto"):
        # under auto also before an exact message: a rank whose thresholds send this message
        # exact while a peer compresses it would make another collective call than the peer
        _check_call(codec, group, algorithm, policy, layer)
    if world == 1 or algo == "exact":  # lossless: a carry is summed exactly and nothing is left over
        sent = partial
        if feedback is not None:
            sent = compensate(partial, feedback.carry)
            spare = feedback.next_buffer(partial)
            feedback.next = (torch.zeros(partial.shape, dtype=torch.float32, device=partial.device) if spare is None
                             else spare.zero_())
        if world == 1:
            return sent.to(partial.dtype, copy=True) if out is None else out.copy_(sent)
        # into ``out`` where it holds the sent dtype (copy_ of a tensor onto itself does nothing)
        buf = out.copy_(sent) if out is not None and sent.dtype == out.dtype else sent.clone()
        _guard("exact all_reduce", layer, group, lambda: dist.all_reduce(buf, group=group), wire_hook)
        if stats is not None:
            stats.record_exact(partial, world=world)
        return buf.to(partial.dtype) if out is None else out.copy_(buf)
    rows = policy.chunk_rows(tokens=partial.shape[0], hidden=partial.shape[1])
    pieces = list(partial.split(rows, dim=0))
    fbs = None
    if feedback is not None and algo == "two-shot" and len(pieces) > 1:
        # which owner re-encodes a row depends on the chunking, and so would the carries
        raise ValueError(f"error feedback with two-shot needs whole messages, but {layer!r} goes in "
                         f"{len(pieces)} pipelined chunks; set AutoPolicy.chunk_bytes=0 or use gather")
    kw = {}
    nxt = None
    if feedback is not None:  # one Feedback per row chunk: gather's codecs work row by row
        if len(pieces) == 1:
            fbs = [feedback]
        else:  # each chunk's next carry written into its rows of one (no joining pass)
            carries = [None] * len(pieces) if feedback.carry is None else list(feedback.carry.split(rows, dim=0))
            fbs = [Feedback(carry=c) for c in carries]
            nxt = feedback.next_buffer(partial)
            if nxt is None:
                nxt = torch.empty(partial.shape, dtype=torch.float32, device=partial.device)
            kw["next_rows"] = list(nxt.split(rows, dim=0))
    tally = CommStats()  # per chunk; reported to ``stats`` as one call
    stages = _gather_pipelined if algo == "gather" else _two_shot_pipelined
    outs = stages(codec, pieces, group, layer=layer, rank=rank, world=world, tally=tally, hook=wire_hook,
                  feedback=fbs, out=out, **kw)
    if feedback is not None:
        feedback.next = fbs[0].next if nxt is None else nxt
    if stats is not None:
        stats.record(algorithm=algo, sent=tally.bytes_sent, payload=tally.payload_bytes, values=tally.values,
                     wire_values=tally.wire_values, world=world)
    if isinstance(outs, torch.Tensor):  # decoded into its rows of the result, chunk by chunk
        return outs
    res = outs[0] if len(outs) == 1 else torch.cat(outs)
    return res.to(partial.dtype) if out is None else out.copy_(res)


def _check_out(out: torch.Tensor, partial: torch.Tensor) -> None:
    """``out`` of :func:`all_reduce`: ``partial`` itself or disjoint from it, contiguous, same
    shape, dtype and device (a partly overlapping one would be overwritten before it is encoded)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"all_reduce: out must be a tensor, got {type(out).__name__}")
    if out.shape != partial.shape or out.dtype != partial.dtype or out.device != partial.device:
        raise ValueError(f"all_reduce: out must match the partial's shape, dtype and device "
                         f"({tuple(partial.shape)}, {partial.dtype}, {partial.device}), got "
                         f"({tuple(out.shape)}, {out.dtype}, {out.device})")
    if not out.is_contiguous():
        raise ValueError("all_reduce: out must be contiguous")
    if out is not partial and out.numel() and partial.numel():
        a0, a1 = out.data_ptr(), out.data_ptr() + out.numel() * out.element_size()
        b0 = partial.data_ptr()
        b1 = b0 + ((partial.shape[0] - 1) * partial.stride(0) + (partial.shape[1] - 1) * partial.stride(1) + 1) \
            * partial.element_size()
        if a0 < b1 and b0 < a1:
            raise ValueError("all_reduce: out overlaps the partial without being it; pass the partial itself "
                             "for an in-place reduction, or a separate tensor")


# Pipelining: a message goes as row chunks (AutoPolicy.chunk_rows). Step i encodes chunk i
# and starts its transfer (async_op=True), then waits for chunk i-1's transfer and decodes
# it, so the codec works while the transport moves the neighbouring chunk. Every codec
# encodes each token row independently and every sum is elementwise in rank order, so the
# chunked result is bitwise the unchunked one (and simulate_all_reduce's). A message of one
# chunk makes plain synchronous calls.
def _start(what: str, layer, group, call, hook: WireHook | None, pipelined: bool, first: bool = False):
    """``call(async_op)``: synchronous through ``hook`` (returns None), or started (returns its
    Work); the first start of a pipelined message goes through ``hook`` too (see :data:`WireHook`)."""
    if not pipelined:
        _guard(what, layer, group, lambda: call(False), hook)
        return None
    return _guard(what, layer, group, lambda: call(True), hook if first else None)


def _finish(what: str, layer, group, work, hook: WireHook | None) -> None:
    if work is not None:
        _guard(WAIT + what, layer, group, work.wait, hook)


def _gather_pipelined(codec: Codec, pieces, group, *, layer, rank: int, world: int, tally: CommStats,
                      hook: WireHook | None, feedback: list[Feedback] | None = None, out: torch.Tensor | None = None,
                      next_rows: list[torch.Tensor] | None = None):
    what = "all_gather of payloads"
    pipelined = len(pieces) > 1
    dev = pieces[0].device
    total = sum(p.shape[0] for p in pieces)
    # The returned sum in the partials' dtype (fresh, or the caller's ``out``, which may be the
    # partial: chunk j's rows are written only after chunk j was encoded): decode_sum rounds the
    # fp32 sum into it (the CPU kernels row by row as they finish it, instead of a cast pass).
    if out is None:
        out = torch.empty(total, pieces[0].shape[1], dtype=pieces[0].dtype, device=dev)
    rows = out.split([p.shape[0] for p in pieces], dim=0)  # contiguous row blocks, one per chunk
    inflight = None
    for i in range(len(pieces) + 1):
        launched = None
        if i < len(pieces):  # slot i % 2: chunk i-1 may still be in flight while chunk i is encoded
            n = codec.payload_nbytes(tuple(pieces[i].shape), layer)
            buf = BUFFERS.get("gather-send", i % 2, n, torch.uint8, dev)
            if feedback is None:
                payload = A.gather_encode(codec, pieces[i], layer=layer, rank=rank, out=buf)
            else:
                payload = A.gather_encode_feedback(codec, pieces[i], feedback[i], layer=layer, rank=rank, out=buf,
                                                   next_out=None if next_rows is None else next_rows[i])
            got = [BUFFERS.get(f"gather-recv{r}", i % 2, n, torch.uint8, dev) for r in range(world)]
            work = _start(what, layer, group,
                          lambda a: dist.all_gather(got, payload, group=group, async_op=a), hook, pipelined,
                          first=i == 0)
            tally.record_gather(payload, world=world, values=pieces[i].numel())
            launched = (i, got, work)
        if inflight is not None:
            j, got_j, work_j = inflight
            _finish(what, layer, group, work_j, hook)
            A.gather_decode_sum(codec, got_j, tuple(pieces[j].shape), layer=layer, out=rows[j])
        inflight = launched
    return out


def _two_shot_pipelined(codec: Codec, pieces, group, *, layer, rank: int, world: int, tally: CommStats,
                        hook: WireHook | None, feedback: list[Feedback] | None = None, out: torch.Tensor | None = None):
    # all payload chunks have one size, so all_to_all_single needs no split sizes
    n = len(pieces)
    pipelined = n > 1
    outs: list = [None] * n
    moving, gathering = {}, {}
    dev = pieces[0].device
    # Piece k is decoded straight into its rows of the result (fresh, or the caller's ``out``,
    # which may be the partial: piece k's rows are decoded two steps after piece k was encoded,
    # and its feedback was taken at its encode), where that saves a copy (A.two_shot_into_result);
    # else the fp32 decode of the one piece is returned and all_reduce casts it.
    rows = None
    if A.two_shot_into_result(pieces[0].dtype, out_given=out is not None, pieces=n):
        if out is None:
            out = torch.empty(sum(p.shape[0] for p in pieces), pieces[0].shape[1], dtype=pieces[0].dtype, device=dev)
        rows = out.split([p.shape[0] for p in pieces], dim=0)
    for step in range(n + 2):  # piece i uses buffer slot i % 3 (three pieces are in flight at most)
        if step < n:  # encode the N row chunks of piece `step` into one send buffer, start the all-to-all
            chunk_shape = (A.chunk_rows(pieces[step].shape[0], world), pieces[step].shape[1])
            nb = codec.payload_nbytes(chunk_shape, layer)
            send = BUFFERS.get("two-shot-send", step % 3, world * nb, torch.uint8, dev)
            if feedback is None:
                chunks = A.two_shot_encode(codec, pieces[step], layer=layer, rank=rank, world=world, out=send)
            else:
                chunks = A.two_shot_encode_feedback(codec, pieces[step], feedback[step], layer=layer, rank=rank,
                                                    world=world, out=send)
            recv = BUFFERS.get("two-shot-recv", step % 3, world * nb, torch.uint8, dev)
            work = _start("all_to_all of chunks", layer, group,
                          lambda a: dist.all_to_all_single(recv, send, group=group, async_op=a), hook, pipelined,
                          first=step == 0)
            moving[step] = (chunks, send, recv, work)
        j = step - 1
        if 0 <= j < n:  # reduce this rank's chunk of piece j, re-encode, start the all-gather
            chunks, _send, recv, work = moving.pop(j)
            _finish("all_to_all of chunks", layer, group, work, hook)
            chunk_shape = (A.chunk_rows(pieces[j].shape[0], world), pieces[j].shape[1])
            # the sum's payload may differ in size from a partial's (a two-stage codec), so the
            # codec allocates it; the N received copies reuse buffers of that size
            if feedback is None or not feedback[j].owner_error:  # (first-stage feedback: no owner error)
                mine = A.two_shot_reduce(codec, list(recv.chunk(world)), chunk_shape, layer=layer)
            else:  # the second-stage error of this rank's chunk joins its own compensation
                mine, err = A.two_shot_reduce_feedback(codec, list(recv.chunk(world)), chunk_shape, layer=layer)
                A.add_owner_feedback(feedback[j], err, owner=rank, world=world)
            # the N sums land one after another in one buffer, decoded in one launch
            flat = BUFFERS.get("two-shot-sums", j % 3, world * mine.numel(), torch.uint8, dev)
            sums = list(flat.chunk(world))
            work = _start("all_gather of reduced chunks", layer, group,
                          lambda a: dist.all_gather(sums, mine, group=group, async_op=a), hook, pipelined)
            gathering[j] = (sums, flat, work, chunk_shape)
            tally.record_two_shot(chunks, mine, rank=rank, values=pieces[j].numel())
        k = step - 2
        if 0 <= k < n:  # decode the N reduced chunks of piece k
            sums, flat, work, chunk_shape = gathering.pop(k)
            _finish("all_gather of reduced chunks", layer, group, work, hook)
            outs[k] = A.two_shot_decode(codec, sums, chunk_shape, pieces[k].shape[0], layer=layer, flat=flat,
                                        out=None if rows is None else rows[k])
    return outs if rows is None else out
