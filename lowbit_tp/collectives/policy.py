"""Choosing an algorithm (``auto``) and counting what each call sends."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Iterable

from lowbit_tp.configs import ALGORITHMS, AutoPolicy  # noqa: F401 (AutoPolicy re-exported)



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
    ``payload_bytes`` / ``values``: size of this rank's first-stage encoded partials and how
    many values they hold; ``wire_values``: the values the sent bytes carry, each copy
    counted (gather: ``(N-1) * values``; two-shot: ``(N-1)/N * values`` in the all-to-all
    plus as many in the all-gather of reduced chunks); ``ring_values``: what a ring
    all-reduce of the same message sends, ``2(N-1)/N * values``.

    Measured from the payloads, not computed from a codec's nominal size:

    * ``bits_per_value = 8 * bytes_sent / wire_values``: all bytes sent per value sent, both
      stages of a two-shot counted (``rot-lm4-g64+sum8``: the mean of its 4.5- and
      8.375-bit stages); for gather it is the payload's bits per value;
    * ``ring_equiv_bits = 8 * bytes_sent / ring_values``: the bits per value a ring
      all-reduce would need to send as many bytes (gather at N ranks: ``N/2`` times its
      payload bits; two-shot: equal to ``bits_per_value`` up to row padding).

    ``by_algorithm`` counts calls per resolved algorithm.
    """

    bytes_sent: int = 0
    payload_bytes: int = 0
    values: int = 0
    calls: int = 0
    by_algorithm: dict[str, int] = field(default_factory=dict)
    wire_values: float = 0.0
    ring_values: float = 0.0

    def record(self, *, algorithm: str, sent: int, payload: int, values: int, wire_values: float,
               world: int) -> None:
        self.bytes_sent += int(sent)
        self.payload_bytes += int(payload)
        self.values += int(values)
        self.wire_values += float(wire_values)
        self.ring_values += 2.0 * (world - 1) * values / world
        self.calls += 1
        self.by_algorithm[algorithm] = self.by_algorithm.get(algorithm, 0) + 1

    def add(self, other: "CommStats") -> None:
        """Add ``other``'s totals to this one (e.g. all layers of a model)."""
        for name in ("bytes_sent", "payload_bytes", "values", "calls", "wire_values", "ring_values"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for k, v in other.by_algorithm.items():
            self.by_algorithm[k] = self.by_algorithm.get(k, 0) + v

    # One place for what each algorithm puts on the wire, from the payload tensors it sent
    # (the multi-process and single-process paths both call these).
    def record_exact(self, partial, *, world: int) -> None:
        """Backend all-reduce, counted as a ring: 2(N-1)/N of the message leaves each rank."""
        nbytes = partial.numel() * partial.element_size()
        values = partial.numel()
        self.record(algorithm="exact", sent=2 * (world - 1) * nbytes // world, payload=nbytes, values=values,
                    wire_values=2.0 * (world - 1) * values / world, world=world)

    def record_gather(self, payload, *, world: int, values: int) -> None:
        """This rank's payload goes to each of the N-1 peers."""
        self.record(algorithm="gather", sent=(world - 1) * payload.numel(), payload=payload.numel(), values=values,
                    wire_values=(world - 1) * values, world=world)

    def record_two_shot(self, chunks, reduced, *, rank: int, values: int) -> None:
        """All-to-all of the chunks meant for peers, then the reduced chunk to each of the N-1 peers.

        Each stage carries ``(N-1)/N`` of the values (row padding sent but not counted)."""
        world = len(chunks)
        sent = sum(c.numel() for j, c in enumerate(chunks) if j != rank) + (world - 1) * reduced.numel()
        self.record(algorithm="two-shot", sent=sent, payload=sum(c.numel() for c in chunks), values=values,
                    wire_values=2.0 * (world - 1) * values / world, world=world)

    def since(self, before: "CommStats") -> "CommStats":
        """The traffic recorded after the snapshot ``before`` of these totals (e.g. one
        prefill or one decode phase); algorithms with no new calls are left out."""
        algos = {k: v - before.by_algorithm.get(k, 0) for k, v in self.by_algorithm.items()}
        return CommStats(bytes_sent=self.bytes_sent - before.bytes_sent,
                         payload_bytes=self.payload_bytes - before.payload_bytes,
                         values=self.values - before.values, calls=self.calls - before.calls,
                         by_algorithm={k: v for k, v in algos.items() if v},
                         wire_values=self.wire_values - before.wire_values,
                         ring_values=self.ring_values - before.ring_values)

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
        """All bytes sent per value sent (see the class docstring)."""
        return 8.0 * self.bytes_sent / self.wire_values if self.wire_values else float("nan")

    @property
    def ring_equiv_bits(self) -> float:
        """Bits per value of a ring all-reduce sending as many bytes."""
        return 8.0 * self.bytes_sent / self.ring_values if self.ring_values else float("nan")

    @property
    def payload_bits_per_value(self) -> float:
        """First-stage payload bits per value (the codec's own size)."""
        return 8.0 * self.payload_bytes / self.values if self.values else float("nan")

    def as_dict(self) -> dict:
        return {
            "bytes_sent": self.bytes_sent,
            "payload_bytes": self.payload_bytes,
            "values": self.values,
            "calls": self.calls,
            "wire_values": self.wire_values,
            "ring_values": self.ring_values,
            "bits_per_value": self.bits_per_value,
            "ring_equiv_bits": self.ring_equiv_bits,
            "payload_bits_per_value": self.payload_bits_per_value,
            "by_algorithm": dict(self.by_algorithm),
        }
