"""``lowbit-tp bench-comm``: bytes and latency of the compressed all-reduce on real ranks.

For each world size, message size, codec and algorithm, N spawned ranks run the
collective on bf16 partials ``[numel / hidden, hidden]`` (the dtype real communicated
features have) and report, from rank 0 after a barrier per repeat:
bytes sent per rank and bits/value (counted from payloads), median latency, and the
latency ratio to a bf16 ``exact`` all-reduce of the same message measured in the same run.
``chunk_bytes`` lists pipelining chunk sizes to compare (``AutoPolicy.chunk_bytes``; 0 =
unchunked). The codec-speed table (``codec_speed``) puts each codec's single-thread encode
and decode-and-sum next to a same-size memcpy, for the reference and the fast backend.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import torch
import torch.distributed as dist

from lowbit_tp.bench.codec_speed import codec_throughput
from lowbit_tp.bench.common import environment
from lowbit_tp.results import markdown_table, record_kwargs, write_results
from lowbit_tp.calibration.artifact import CalibrationError
from lowbit_tp.calibration.synthetic import planted_partials, synthetic_calibration
from lowbit_tp.codecs import make_codec
from lowbit_tp.collectives import CommStats, all_reduce, spawn_ranks
from lowbit_tp.configs import AutoPolicy, CommBenchConfig
from lowbit_tp.errors import UserError
from lowbit_tp.preflight import check_codecs


@dataclass(frozen=True)
class CommBenchRow:
    """One (world size, message, codec, algorithm, chunk size) of ``bench-comm``, from rank 0.

    ``numel`` values of a ``message_bytes``-byte bf16 message; ``bytes_sent_per_rank`` and
    ``bits_per_value`` counted from the payloads (:class:`CommStats`); ``latency_ms`` the
    median over repeats; ratios against the bf16 ``exact`` all-reduce of the same message in
    the same run. ``chunk_bytes`` and ``backend`` (the codec's kernel backend) are None on
    that baseline row and then left out of the JSON."""

    world_size: int
    codec: str
    algorithm: str
    numel: int
    message_bytes: int
    bytes_sent_per_rank: int
    bits_per_value: float
    latency_ms: float
    ratio_vs_bf16: float
    bytes_ratio_vs_bf16_ring: float
    chunk_bytes: int | None = None
    backend: str | None = None

    def to_json(self) -> dict[str, Any]:
        """Field order as ``bench-comm`` has always written it (``chunk_bytes`` after ``algorithm``)."""
        out = {"world_size": self.world_size, "codec": self.codec, "algorithm": self.algorithm}
        if self.chunk_bytes is not None:
            out["chunk_bytes"] = self.chunk_bytes
        out.update({f.name: getattr(self, f.name) for f in fields(self)[3:10]})
        if self.backend is not None:
            out["backend"] = self.backend
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "CommBenchRow":
        return cls(**record_kwargs(cls, d))


def _bench_rank(rank: int, world: int, cfg: CommBenchConfig) -> list[CommBenchRow]:
    layer = "bench"
    cal = synthetic_calibration([layer], world=world, hidden=cfg.hidden, tokens=256, batches=2)
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cfg.backend == "nccl" else torch.device("cpu")
    rows = []
    for numel in cfg.numels:
        tokens = max(1, numel // cfg.hidden)
        x = planted_partials(world, tokens, cfg.hidden, seed=0, noise_seed=5, dtype=torch.bfloat16)[rank].to(device)

        def timed(fn):
            times = []
            for i in range(cfg.repeats + 1):
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i:  # the first run warms up
                    times.append(time.perf_counter() - t0)
            return statistics.median(times)

        base_stats = CommStats()
        base = timed(lambda: all_reduce(x, make_codec("bf16"), algorithm="exact", stats=base_stats))
        rows.append(CommBenchRow(world_size=world, codec="bf16", algorithm="exact", numel=x.numel(),
                                 message_bytes=2 * x.numel(),
                                 bytes_sent_per_rank=base_stats.bytes_sent // base_stats.calls,
                                 bits_per_value=16.0, latency_ms=1e3 * base, ratio_vs_bf16=1.0,
                                 bytes_ratio_vs_bf16_ring=1.0))
        ring_bytes = base_stats.bytes_sent // base_stats.calls
        for name in cfg.codecs:
            codec = make_codec(name, calibration=cal)
            for algo in cfg.algorithms:
                for chunk in cfg.chunk_bytes:
                    policy = AutoPolicy(chunk_bytes=chunk)
                    st = CommStats()
                    lat = timed(lambda: all_reduce(x, codec, algorithm=algo, layer=layer, policy=policy, stats=st))
                    sent = st.bytes_sent // st.calls
                    rows.append(CommBenchRow(world_size=world, codec=name, algorithm=algo, chunk_bytes=chunk,
                                             numel=x.numel(), message_bytes=2 * x.numel(), bytes_sent_per_rank=sent,
                                             bits_per_value=st.bits_per_value, latency_ms=1e3 * lat,
                                             ratio_vs_bf16=lat / base, bytes_ratio_vs_bf16_ring=sent / ring_bytes,
                                             backend=codec.kernel_backend(device)))
    return rows


def run_comm_bench(cfg: CommBenchConfig, *, json_path=None, throughput: bool = True,
                   command: str | None = None) -> dict:
    """Run the benchmark; returns (and writes) ``{"config", "environment", "rows", "codec_speed"}``
    (and ``"command"``, the command line that ran it, when given)."""
    check_codecs(cfg.codecs, build=False)  # before any rank is spawned
    probe = synthetic_calibration(["bench"], world=2, hidden=cfg.hidden, tokens=8, batches=1)
    for name in cfg.codecs:  # what the ranks will build, so that a refusal is one line here, not a rank failure
        try:
            make_codec(name, calibration=probe)
        except CalibrationError as exc:
            raise UserError(f"bench-comm measures codecs on a synthetic calibration, which codec {name!r} cannot "
                            f"use: {exc}") from None
        except ValueError as exc:  # a name no calibration can serve (e.g. channel weights on a non-rot codec)
            raise UserError(f"bench-comm: {exc}") from None
    rows: list[dict] = []
    for world in cfg.world_sizes:
        res = spawn_ranks(_bench_rank, world, cfg, backend=cfg.backend, timeout_s=cfg.timeout_s,
                          deadline_s=cfg.timeout_s * 4 + 60, threads=cfg.threads_per_rank)
        rows += [r.to_json() for r in res[0]]
    speed = codec_throughput(list(cfg.codecs), backends=cfg.speed_backends) if throughput else []
    out = {"config": asdict(cfg), "environment": environment(), "rows": rows, "codec_speed": speed}
    if command:
        out["command"] = command
    cols = ["world_size", "codec", "algorithm", "chunk_bytes", "message_bytes", "bytes_sent_per_rank",
            "bits_per_value", "bytes_ratio_vs_bf16_ring", "latency_ms", "ratio_vs_bf16"]
    table = markdown_table(rows, cols)
    if speed:
        table += ("\n\nSingle-thread codec speed, GB/s of the fp32 message, next to a same-size copy "
                  "(`memcpy`, x.clone()) timed in the same interleaved loop; `decode_sum` decodes and sums "
                  f"{speed[0]['world']} payloads:\n\n") + markdown_table(
            speed, ["codec", "backend", "bits_per_value", "memcpy_gbps", "encode_gbps", "decode_sum_gbps",
                    "encode_vs_memcpy", "decode_sum_vs_memcpy", "decode_gbps"])
    write_results(json_path, out, table)
    out["markdown"] = table
    return out
