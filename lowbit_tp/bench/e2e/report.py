"""Rows of a run (medians over repeats), ratios against the bf16 baseline, and the markdown report."""
from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

from lowbit_tp.collectives import CommStats
from lowbit_tp.configs import E2EConfig
from lowbit_tp.results import markdown_table, record_kwargs


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


@dataclass(frozen=True)
class E2ERow:
    """One prompt length of one variant (network, TP, codec, algorithm): medians over the
    repeats, in ms. ``bits_per_value``: rank 0's first-stage payload bits per value
    (:attr:`CommStats.payload_bits_per_value`); ``*_bytes_per_token``: bytes rank 0 sent;
    ``*_skew_ms``: time in the barrier before each collective; ``prefill_allreduce_net_ms``: the
    median of each prefill's all-reduce time less its skew (less the barrier waits before each
    message's first transfer; None in rows from before it was measured). The ratio fields (None until
    :func:`add_ratios` finds the bf16/gather row of the same network, TP and length) are
    speed-ups (>1 = faster), the byte ratio, the Amdahl bound and the share of it reached."""

    network: str
    tp: int
    codec: str
    algorithm: str
    bits_per_value: float
    prompt_tokens: int
    prefill_ms: float
    prefill_allreduce_ms: float
    prefill_wire_ms: float
    prefill_skew_ms: float
    prefill_bytes_per_token: float
    decode_ms_per_token: float
    decode_allreduce_ms_per_token: float
    decode_wire_ms_per_token: float
    decode_skew_ms_per_token: float
    decode_bytes_per_token: float
    allreduce_calls_per_token: int
    prefill_ms_all: list[float]
    error_feedback: bool = False
    prefill_allreduce_net_ms: float | None = None
    prefill_speedup: float | None = None
    prefill_allreduce_speedup: float | None = None
    prefill_allreduce_net_speedup: float | None = None
    prefill_wire_speedup: float | None = None
    decode_speedup: float | None = None
    prefill_byte_ratio: float | None = None
    prefill_amdahl_bound: float | None = None
    prefill_vs_amdahl: float | None = None

    @property
    def label(self) -> str:
        """``codec/algorithm``, with ``+EF`` when it ran with error feedback."""
        return f"{self.codec}/{self.algorithm}" + ("+EF" if self.error_feedback else "")

    @property
    def decode_tokens_per_s(self) -> float:
        return 1e3 / self.decode_ms_per_token

    def to_json(self) -> dict[str, Any]:
        """The row as ``bench-e2e`` writes it: measured fields, ``decode_tokens_per_s``, then
        the ratios where set."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in _RATIOS:
                break
            if f.name in _WRITTEN_WHEN_SET and getattr(self, f.name) is f.default:
                continue  # so rows from before the field read back byte for byte
            out[f.name] = getattr(self, f.name)
        out["decode_tokens_per_s"] = self.decode_tokens_per_s
        out.update({k: getattr(self, k) for k in _RATIOS if getattr(self, k) is not None})
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "E2ERow":
        return cls(**record_kwargs(cls, d, derived=("decode_tokens_per_s",), what="an E2ERow"))


# measured fields newer than the first saved rows: written (and shown as columns) only when set
_WRITTEN_WHEN_SET = ("error_feedback", "prefill_allreduce_net_ms")
_RATIOS = ("prefill_speedup", "prefill_allreduce_speedup", "prefill_allreduce_net_speedup", "prefill_wire_speedup",
           "decode_speedup",
           "prefill_byte_ratio", "prefill_amdahl_bound", "prefill_vs_amdahl")


def rows_of_run(outs: list[dict], *, network: str, codec: str, algorithm: str, lens: list[int],
                 repeats: int, error_feedback: bool = False) -> list[E2ERow]:
    """Medians over the repeats of each prompt length, pooled over the rounds ``outs`` (rank 0's
    output of each launch; its prompt 0 is the warm-up, skipped)."""
    rows = []
    out = outs[0]
    ran = {bool(o["config"].get("error_feedback", False)) for o in outs}
    if ran != {error_feedback}:  # the label must say what the ranks ran
        raise ValueError(f"{codec}/{algorithm}: the ranks ran with error_feedback={sorted(ran)}, "
                         f"the row would say {error_feedback}")
    results = [r for o in outs for r in o["results"][1:]]
    timers = [t for o in outs for t in o["timers"][1:]]
    repeats = repeats * len(outs)
    for j, n in enumerate(lens):
        idx = [k * len(lens) + j for k in range(repeats)]
        res = [results[i] for i in idx]
        tim = [timers[i] for i in idx]
        pre, dec = (CommStats.from_dict(res[0]["comm"][k]) for k in ("prefill", "decode"))
        n_dec = len(res[0]["decode_s"])
        dec_steps = [s for t in tim for s in t[1:]]
        rows.append(E2ERow(
            network=network, tp=out["config"]["tp"], codec=codec, algorithm=algorithm,
            error_feedback=error_feedback, bits_per_value=pre.payload_bits_per_value,
            prompt_tokens=out["prompt_lengths"][1 + j],
            prefill_ms=1e3 * _median([r["prefill_s"] for r in res]),
            prefill_allreduce_ms=1e3 * _median([t[0]["all_reduce_s"] for t in tim]),
            prefill_wire_ms=1e3 * _median([t[0]["wire_s"] for t in tim]),
            prefill_skew_ms=1e3 * _median([t[0].get("skew_s", 0.0) for t in tim]),
            prefill_allreduce_net_ms=1e3 * _median([t[0]["all_reduce_s"] - t[0].get("skew_s", 0.0) for t in tim]),
            prefill_bytes_per_token=pre.bytes_sent / out["prompt_lengths"][1 + j],
            decode_ms_per_token=1e3 * _median([d for r in res for d in r["decode_s"]]),
            decode_allreduce_ms_per_token=1e3 * _median([s["all_reduce_s"] for s in dec_steps]),
            decode_wire_ms_per_token=1e3 * _median([s["wire_s"] for s in dec_steps]),
            decode_skew_ms_per_token=1e3 * _median([s.get("skew_s", 0.0) for s in dec_steps]),
            decode_bytes_per_token=dec.bytes_sent / n_dec if n_dec else float("nan"),
            allreduce_calls_per_token=tim[0][1]["calls"] if len(tim[0]) > 1 else tim[0][0]["calls"],
            prefill_ms_all=[1e3 * r["prefill_s"] for r in res],
        ))
    return rows


def add_ratios(rows: list[E2ERow]) -> list[E2ERow]:
    """The rows with speed-ups against bf16/gather of the same network, TP and prompt length
    (>1 = faster); rows without such a baseline are returned as they are."""
    base = {(r.network, r.tp, r.prompt_tokens): r for r in rows if r.codec == "bf16" and r.algorithm == "gather"}
    out = []
    for r in rows:
        b = base.get((r.network, r.tp, r.prompt_tokens))
        if b is None:
            out.append(r)
            continue
        ratios = {col: getattr(b, key) / getattr(r, key) if getattr(r, key) else float("nan")
                  for key, col in (("prefill_ms", "prefill_speedup"),
                                   ("prefill_allreduce_ms", "prefill_allreduce_speedup"),
                                   ("prefill_wire_ms", "prefill_wire_speedup"),
                                   ("decode_ms_per_token", "decode_speedup"),
                                   ("prefill_bytes_per_token", "prefill_byte_ratio"))}
        # Amdahl: with bf16 spending a share s of prefill in the all-reduce, cutting that
        # time by the byte ratio r bounds the prefill speed-up at 1 / (1 - s + s / r).
        s = b.prefill_allreduce_ms / b.prefill_ms if b.prefill_ms else float("nan")
        ratios["prefill_amdahl_bound"] = 1.0 / (1.0 - s + s / ratios["prefill_byte_ratio"])
        ratios["prefill_vs_amdahl"] = ratios["prefill_speedup"] / ratios["prefill_amdahl_bound"]
        if b.prefill_allreduce_net_ms is not None and r.prefill_allreduce_net_ms:
            ratios["prefill_allreduce_net_speedup"] = b.prefill_allreduce_net_ms / r.prefill_allreduce_net_ms
        out.append(replace(r, **ratios))
    return out


NOTES = [
    "Every row is a real TP run: separate rank processes over gloo (CPU), torchrun-style env vars.",
    "Baseline: codec bf16 with algorithm gather (16 bits/value on the wire). 'exact' is the backend "
    "all-reduce in the model dtype (fp32 on CPU, 32 bits/value), shown for reference.",
    "*_allreduce_ms: wall time inside the row-parallel all-reduces (encode + wire + decode + sum + skew); "
    "*_wire_ms: inside the backend collectives only (all_gather etc.), started right after a barrier; "
    "*_skew_ms: time in that barrier, i.e. waiting for the slower rank to arrive (compute imbalance, "
    "uneven CPU share), which would otherwise be counted as wire time. The barrier adds one tiny "
    "message per collective to every row alike. prefill_allreduce_net_ms: each prefill's all-reduce time "
    "less its skew (median), i.e. less the waits in the barriers before each message's first transfer "
    "(a wait for the slower peer later in a pipelined message stays in); prefill_allreduce_net_speedup "
    "compares those.",
    "Speed-ups (>1 = faster) and byte ratios are against bf16/gather of the same network, TP and prompt.",
    "Emulated networks: one network namespace per rank, each rank's egress shaped with tbf to the rate "
    "(a TCP transfer reaches ~0.95 of 1 Gbit/s and ~0.86 of 10 Gbit/s); no per-packet delay unless "
    "config.delay is set, which needs sch_netem (absent from this machine's kernel, so delay = 0 here).",
    "Compute dominates on CPU: one thread per rank runs the shard's matmuls at tens of GFLOP/s, so even on "
    "1 Gbit/s the all-reduce is a small share of prefill; compare the *_allreduce_* and *_wire_* columns "
    "for the communication itself. docs/projection.md carries the numbers to GPU interconnects.",
]


COLUMNS = ["network", "tp", "codec", "algorithm", "error_feedback", "bits_per_value", "prompt_tokens", "prefill_ms",
           "prefill_speedup", "prefill_allreduce_ms", "prefill_allreduce_speedup", "prefill_allreduce_net_ms",
           "prefill_allreduce_net_speedup", "prefill_wire_ms",
           "prefill_wire_speedup", "prefill_skew_ms", "prefill_byte_ratio", "prefill_amdahl_bound",
           "prefill_vs_amdahl", "prefill_bytes_per_token", "decode_ms_per_token",
           "decode_tokens_per_s", "decode_allreduce_ms_per_token", "decode_wire_ms_per_token",
           "decode_bytes_per_token"]


def columns_for(rows: list[dict]) -> list[str]:
    """:data:`COLUMNS`, without ``error_feedback`` unless a row ran with it, and without the net
    all-reduce columns unless a row has them (rows from before they were measured)."""
    optional = (*_WRITTEN_WHEN_SET, "prefill_allreduce_net_speedup")
    return [c for c in COLUMNS if c not in optional or any(r.get(c) for r in rows)]


def _headline(rows: list[dict]) -> list[str]:
    """One sentence per int4-outlier row on an emulated link: its prefill speed-ups over
    bf16/gather (end to end, all-reduce, wire), byte ratio, and the all-reduce share of prefill."""
    lines = []
    for r in rows:
        if r["codec"] == "int4-outlier" and r["network"] != "loopback" and "prefill_speedup" in r:
            name = "int4-outlier" + (" with error feedback" if r.get("error_feedback") else "")
            lines.append(f"- {r['network']}, TP {r['tp']}, {r['prompt_tokens']}-token prefill, {name} vs bf16: "
                         f"end-to-end {r['prefill_speedup']:.2f}x, all-reduce time {r['prefill_allreduce_speedup']:.2f}x"
                         + (f" ({r['prefill_allreduce_net_speedup']:.2f}x less the ranks' arrival skew)"
                            if r.get("prefill_allreduce_net_speedup") else "") + ", "
                         f"wire time {r['prefill_wire_speedup']:.2f}x, bytes {r['prefill_byte_ratio']:.2f}x fewer; "
                         f"all-reduce share of prefill: bf16 "
                         f"{_share(rows, r, 'bf16')}, {name} {r['prefill_allreduce_ms'] / r['prefill_ms']:.0%}"
                         + (f"; Amdahl bound 1/(1-s+s/r) {r['prefill_amdahl_bound']:.3f}x, "
                            f"reached {r['prefill_vs_amdahl']:.0%} of it." if "prefill_amdahl_bound" in r
                            else " (a run from before the Amdahl bound was reported)."))
    for r in rows:  # feedback's cost: the same codec without it, same network, TP and length
        if not r.get("error_feedback") or r["network"] == "loopback":
            continue
        for b in rows:
            if not b.get("error_feedback") and all(b[k] == r[k] for k in ("network", "tp", "prompt_tokens", "codec",
                                                                          "algorithm")):
                lines.append(f"- {r['network']}, TP {r['tp']}, {r['prompt_tokens']}-token prefill, {r['codec']}: "
                             f"error feedback takes the prefill all-reduce from {b['prefill_allreduce_ms']:.1f} to "
                             f"{r['prefill_allreduce_ms']:.1f} ms "
                             f"({r['prefill_allreduce_ms'] / b['prefill_allreduce_ms'] - 1:+.0%}), prefill from "
                             f"{b['prefill_ms']:.0f} to {r['prefill_ms']:.0f} ms "
                             f"({r['prefill_ms'] / b['prefill_ms'] - 1:+.1%}).")
    return lines


def _share(rows, like, codec):
    for b in rows:
        if (b["network"], b["tp"], b["prompt_tokens"], b["codec"], b["algorithm"]) == (
                like["network"], like["tp"], like["prompt_tokens"], codec, "gather"):
            return f"{b['prefill_allreduce_ms'] / b['prefill_ms']:.0%}"
    return "n/a"


def render_markdown(payload: dict) -> str:
    """The markdown report of a results payload (also usable on a saved JSON)."""
    cfg = E2EConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in payload["config"].items()})
    rows = payload["rows"]
    env = payload["environment"]
    load = env.get("loadavg_start")
    head = [
        "# End-to-end TP latency (`lowbit-tp bench-e2e`)",
        "",
        f"Model: `{cfg.model}`" + (f" (random weights; hidden {cfg.hidden}, intermediate {cfg.intermediate}, "
                                   f"{cfg.layers} layers, {cfg.heads} heads / {cfg.kv_heads} KV heads)"
                                   if cfg.model == "random-llama" else "")
        + f"; {cfg.repeats} prompts per length in each of {cfg.rounds} interleaved launch(es) per variant "
          f"(medians over all), {cfg.new_tokens} new tokens; "
          f"{cfg.threads_per_rank} thread(s) per rank; "
          + (f"every variant pipelined in chunks of {cfg.chunk_bytes} bf16 bytes (`--chunk-bytes`); "
             if cfg.chunk_bytes else "whole messages (no pipelining); ")
          + f"torch {env['torch']} on {env['processor']}; "
          f"sweep took {payload['seconds']:.0f} s"
        + (f"; 1-minute load average {load[0]:.1f} at the start and {env['loadavg_end'][0]:.1f} at the end "
           f"on {os.cpu_count()} CPUs (other processes share the machine)." if load else "."),
        "",
        *[f"- {n}" for n in NOTES],
        "",
        "Headline (prefill, compressed vs bf16/gather; >1 = faster):",
        "",
        *_headline(rows),
        "",
        markdown_table(rows, columns_for(rows)),
    ]
    return "\n".join(head)
