"""Choosing an algorithm (``auto``) and counting what each call sends."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Iterable

from lowbit_tp.collectives.algorithms import ALGORITHMS


@dataclass(frozen=True)
class AutoPolicy:
    """How ``algorithm="auto"`` picks, in this order (all thresholds configurable):

    1. ``world_size == 1`` -> nothing to reduce.
    2. the message, counted as bf16 bytes (``2 * numel``), is below ``min_bytes`` ->
       ``exact``: small (decode-time) messages are latency-bound, so encoding them only
       adds time.
    3. ``world_size >= two_shot_min_world`` -> ``two-shot``: at N >= 3 it sends fewer
       bytes than ``gather`` (2(N-1)/N vs N-1 payloads; METHOD.md §3).
    4. otherwise ``gather`` (one quantization instead of two, same bytes at N = 2).

    Defaults come from ``lowbit-tp bench-comm`` on loopback gloo (see README); retune
    them with that command for a given link.

    ``chunk_bytes`` (counted as bf16 bytes, like ``min_bytes``) pipelines compressed
    messages larger than it: they go as row chunks of about that size, so that encoding
    chunk i+1, moving chunk i and decoding chunk i-1 overlap (see
    :func:`~lowbit_tp.collectives.dist.all_reduce`). ``0`` sends every message whole. The
    result is bitwise the same either way: every codec encodes each token row on its own.
    """

    min_bytes: int = 64 * 1024
    two_shot_min_world: int = 3
    chunk_bytes: int = 1024 * 1024

    def chunk_rows(self, *, tokens: int, hidden: int) -> int:
        """Rows per pipelined chunk of a ``[tokens, hidden]`` message (``tokens``: no chunking)."""
        if self.chunk_bytes <= 0 or 2 * tokens * hidden <= self.chunk_bytes:
            return tokens
        return max(1, self.chunk_bytes // (2 * hidden))

    def choose(self, *, numel: int, world_size: int) -> str:
        if world_size <= 1:
            return "exact"
        if 2 * numel < self.min_bytes:
            return "exact"
        return "two-shot" if world_size >= self.two_shot_min_world else "gather"


def resolve_algorithm(algorithm: str, *, numel: int, world_size: int, policy: AutoPolicy | None) -> str:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    if algorithm == "auto":
        return (policy or AutoPolicy()).choose(numel=numel, world_size=world_size)
    return algorithm


@dataclass
class CommStats:
    """Running totals of one rank's traffic, from the payloads actually handed to the transport.

    ``bytes_sent``: bytes this rank put on the wire (each peer-bound copy counted);
    ``payload_bytes`` / ``values``: size of this rank's encoded partials and how many values
    they hold, so ``bits_per_value = 8 * payload_bytes / values`` is measured, not computed.
    ``by_algorithm`` counts calls per resolved algorithm.
    """

    bytes_sent: int = 0
    payload_bytes: int = 0
    values: int = 0
    calls: int = 0
    by_algorithm: dict[str, int] = field(default_factory=dict)

    def record(self, *, algorithm: str, sent: int, payload: int, values: int) -> None:
        self.bytes_sent += int(sent)
        self.payload_bytes += int(payload)
        self.values += int(values)
        self.calls += 1
        self.by_algorithm[algorithm] = self.by_algorithm.get(algorithm, 0) + 1

    # One place for what each algorithm puts on the wire, from the payload tensors it sent
    # (the multi-process and single-process paths both call these).
    def record_exact(self, partial, *, world: int) -> None:
        """Backend all-reduce, counted as a ring: 2(N-1)/N of the message leaves each rank."""
        nbytes = partial.numel() * partial.element_size()
        self.record(algorithm="exact", sent=2 * (world - 1) * nbytes // world, payload=nbytes, values=partial.numel())

    def record_gather(self, payload, *, world: int, values: int) -> None:
        """This rank's payload goes to each of the N-1 peers."""
        self.record(algorithm="gather", sent=(world - 1) * payload.numel(), payload=payload.numel(), values=values)

    def record_two_shot(self, chunks, reduced, *, rank: int, values: int) -> None:
        """All-to-all of the chunks meant for peers, then the reduced chunk to each of the N-1 peers."""
        world = len(chunks)
        sent = sum(c.numel() for j, c in enumerate(chunks) if j != rank) + (world - 1) * reduced.numel()
        self.record(algorithm="two-shot", sent=sent, payload=sum(c.numel() for c in chunks), values=values)

    def add(self, other: "CommStats") -> None:
        """Add ``other``'s totals to these (e.g. per-layer stats into a run total)."""
        self.bytes_sent += other.bytes_sent
        self.payload_bytes += other.payload_bytes
        self.values += other.values
        self.calls += other.calls
        for k, v in other.by_algorithm.items():
            self.by_algorithm[k] = self.by_algorithm.get(k, 0) + v

    @classmethod
    def total(cls, parts: Iterable["CommStats"]) -> "CommStats":
        """A new :class:`CommStats` holding the sum of ``parts``."""
        out = cls()
        for p in parts:
            out.add(p)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "CommStats":
        """Inverse of :meth:`as_dict` (derived keys such as ``bits_per_value`` are ignored)."""
        keep = {f.name for f in fields(cls)}
        return cls(**{k: (dict(v) if k == "by_algorithm" else v) for k, v in d.items() if k in keep})

    @property
    def bits_per_value(self) -> float:
        return 8.0 * self.payload_bytes / self.values if self.values else float("nan")

    def as_dict(self) -> dict:
        return {
            "bytes_sent": self.bytes_sent,
            "payload_bytes": self.payload_bytes,
            "values": self.values,
            "calls": self.calls,
            "bits_per_value": self.bits_per_value,
            "by_algorithm": dict(self.by_algorithm),
        }
