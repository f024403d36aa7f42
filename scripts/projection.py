"""Project the all-reduce time of a 70B-class model under TP onto real interconnects.

    PYTHONPATH=. python3 scripts/projection.py     # writes docs/projection.md and docs/projection.json
    PYTHONPATH=. python3 scripts/projection.py --timing graph --out docs/projection-graph.md  # GPU time alone
    PYTHONPATH=. python3 scripts/projection.py --gpu-check A.json B.json   # other device-check files
    PYTHONPATH=. python3 scripts/projection.py --inputs h100-stop26 --out docs/projection-h100.md
        # one H100, GPU time alone: gpu_check (encode, decode-and-sum), gpu_reduce_split (the owner
        # stage, split) and gpu_feedback_cost (the group codecs' fused owner stage and two-shot's
        # batched launches) files; the document's header spells out the equivalent full command

An alpha-beta model (per-step latency alpha, link bandwidth beta) per interconnect and TP
degree, for the bf16 all-reduce against the compressed collectives. Bytes come from the
codecs' own ``payload_nbytes`` (the library's wire format). Codec time on a GPU comes from the
MEASURED fused Triton kernels of ``scripts/gpu_check.py`` (one GPU, per call: encode,
decode-and-sum of N payloads, two-shot's reduce-and-re-encode); codec time on a CPU from
``docs/bench/comm.json`` (one CPU thread). Every assumption is a constant or a sentence below,
printed into the document.

Which device-check files (``--gpu-check`` not given): ``docs/bench/gpu_check.json`` if it is in
the fused-kernel schema (``world`` and ``dry_run_interpreter`` at its top), together with
``docs/bench/gpu_check_world8.json`` if present; otherwise the highest-numbered
``docs/bench/gpu_check_<gpu>_run<K>.json`` together with its ``_world8`` sibling if present.
A file in the old (unfused, H200) schema, a dry run under the Triton interpreter, a run on a
CPU or one whose rows all failed is refused in one line; rows with an ``error``, and codecs
whose device payloads or sums were not bitwise the CPU reference, are left out (listed in the
document), never read as numbers.
"""
from __future__ import annotations

import argparse
import bisect
import functools
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from lowbit_tp.results import json_text

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "docs" / "bench"
COMMAND = "PYTHONPATH=. python3 scripts/projection.py"

# ----------------------------------------------------------------- assumptions
MODEL = {"name": "Llama-2-70B-like", "hidden": 8192, "layers": 80, "allreduces_per_layer": 2,
         "params": 70e9}
TPS = (2, 4, 8, 16, 32, 64)
PREFILL_TOKENS = 2048  # one sequence
DECODE_BATCH = 32  # sequences, one new token each per step
ACT_BYTES = 2  # the bf16 baseline's bytes per value on the wire
BASE_WORLD = 2  # the device check's default world; encode and the bytes model come from its rows

# name -> (bandwidth per GPU per direction in bytes/s, latency per communication step in s)
LINKS = {
    "NVLink (H100/H200, 450 GB/s)": (450e9, 3e-6),
    "400 Gb InfiniBand (45 GB/s)": (45e9, 5e-6),
    "PCIe Gen5 x16 (50 GB/s)": (50e9, 8e-6),
    "100 GbE (11 GB/s)": (11e9, 15e-6),
}
NVLINK, IB, PCIE = list(LINKS)[:3]

# Compute per forward pass, to put communication in proportion (no overlap assumed).
GPU = {"name": "H100-class", "bf16_flops": 989e12, "mfu_prefill": 0.5, "hbm_bytes_per_s": 3.35e12,
       "mbu_decode": 0.7}

# (label, codec, algorithm); the first is the baseline. A scheme whose codec has no measured
# (error-free) GPU row is left out of the GPU tables and listed as not measured.
SCHEMES = (
    ("bf16 all-reduce", "bf16", "allreduce"),
    ("int4-outlier gather", "int4-outlier", "gather"),
    ("int4-outlier two-shot", "int4-outlier", "two-shot"),
    ("int4-g32 gather", "int4-g32", "gather"),
    ("int4-g32 two-shot", "int4-g32", "two-shot"),
    ("int4-g128 two-shot", "int4-g128", "two-shot"),
    ("mxfp4 two-shot", "mxfp4", "two-shot"),
    ("rot-lm4-g64-lg8-k4 two-shot", "rot-lm4-g64-lg8-k4", "two-shot"),
    ("int8 two-shot", "int8", "two-shot"),
)
# Two-shot with its batched launches (Codec.encode_chunks / decode_chunks: one launch encodes
# the N chunks, one decodes the N gathered sums). gpu_check times the batched calls at its
# two-shot message size and worlds (2 and 8); elsewhere they are modelled as one eager call at
# the whole message's size in place of N eager calls at the chunk size.
BATCHED = " (batched launches)"
BATCHED_NOTE = "batched launches: measured where the device check ran that TP and size, else modelled"
PER_CHUNK = "per-chunk calls"  # two-shot priced as N chunk calls each (gather: its two calls)
SCHEMES = SCHEMES + tuple((label + BATCHED, codec, "two-shot-batched") for label, codec, algo in SCHEMES
                          if algo == "two-shot")

# The CPU contrast keeps the schemes it always had.
CPU_SCHEMES = tuple(s for s in SCHEMES if s[0] in ("bf16 all-reduce", "int4-outlier gather", "int4-outlier two-shot",
                                                   "int4-g32 two-shot"))

# Goals of issue 8 for the projection with measured kernels (prefill, TP 8, communication time).
GOAL_TP = 8
GOAL_SPEEDUP = 1.5  # PCIe Gen5 and 400G InfiniBand
TIE = 0.95  # NVLink "ties or wins": at least this speed-up (within 5% of bf16)

# Named input sets (``--inputs NAME``): one GPU's files each. h100-stop26: the kernels as of
# stop 26 on one H100. World 2: stop 26's gpu_check (six codecs); int4-g128 was not in it, so its
# world-2 rows come from stop 24's run 1 (the group kernels without feedback did not change
# between them: int4-g32 there and in stop 26 agree, docs/speed.md). World 8: stop 24's runs 2 and 3
# (run 2 is the first with today's world-8 decode defaults; run 1 predates them and is not used;
# run 3's rows are kept from its log). The owner stage: stop 26's gpu_reduce_split runs (split,
# worlds 2-4 and 8) for the static and rot-* codecs, and the stop 26 feedback-cost runs' plain
# two-shot stages (the group codecs' fused owner stage; every codec's batched chunk launches).
PRESETS = {
    "h100-stop26": {
        "gpu_check": ["docs/bench/gpu_check_h100_stop26_run1.json",
                      "docs/bench/gpu_check_h100_stop24_run1.json:int4-g128",
                      "docs/bench/gpu_check_h100_stop24_run2_world8.json",
                      "docs/bench/gpu_check_h100_stop24_run3_world8.json"],
        "reduce_split": ["docs/bench/gpu_reduce_split_h100_stop26_run2.json",
                         "docs/bench/gpu_reduce_split_h100_stop26_run3_world8.json"],
        "feedback_cost": ["docs/bench/gpu_feedback_cost_h100_stop26_run2.json",
                          "docs/bench/gpu_feedback_cost_h100_stop26_run1.json:int4-outlier,rot-lm4-g64-lg8-k4"],
    },
}

ASSUMPTIONS = [
    f"Model: {MODEL['name']}, hidden {MODEL['hidden']}, {MODEL['layers']} layers, "
    f"{MODEL['allreduces_per_layer']} all-reduces per layer (after o_proj and down_proj); the bf16 baseline "
    f"moves {ACT_BYTES} bytes/value.",
    f"Prefill: one sequence of {PREFILL_TOKENS} tokens, so each all-reduce moves [{PREFILL_TOKENS}, "
    f"{MODEL['hidden']}]. Decode: a batch of {DECODE_BATCH} sequences, one token each, [{DECODE_BATCH}, "
    f"{MODEL['hidden']}] per all-reduce.",
    "Network: every GPU has one link of the stated bandwidth per direction (full duplex) and the "
    "fabric is non-blocking (no contention except at the GPU's own link). This flatters PCIe beyond a "
    "single switch and 100 GbE / InfiniBand beyond one rail; NVLink at TP > 8 assumes an NVL72-style "
    "NVLink domain. The link times are MODELLED: no multi-GPU machine was lent, nothing here ran over "
    "NVLink, PCIe or InfiniBand.",
    "Latency alpha is paid once per communication step, and every collective phase takes "
    "L = ceil(log2 N) steps (recursive halving/doubling, what NCCL-like libraries approach with trees for "
    "small messages), while bytes are those of the ring (bandwidth-optimal). Alpha: " + "; ".join(
        f"{k}: {v[1] * 1e6:.0f} us" for k, v in LINKS.items()) + ". These are typical small-message "
    "per-hop costs of NCCL-like libraries, not measurements.",
    "bf16 all-reduce (baseline): the faster of reduce-scatter + all-gather, 2L*alpha + 2(N-1)/N * M * 2 B "
    "/ bw, and recursive doubling on the whole vector, L*alpha + L * M * 2 B / bw (wins for tiny messages). "
    "No codec work.",
    "gather (the seed collective): all-gather of every rank's payload P: L*alpha + (N-1)*P / bw; codec "
    "work, as `lowbit_tp.collectives.dist` calls it: one encode of [T, E] and one decode-and-sum of N "
    "payloads of [T, E].",
    "two-shot: all-to-all of the N payload chunks + all-gather of the re-quantized reduced chunk, each "
    "rank sending (N-1) chunk payloads P_c per phase: 2L*alpha + 2(N-1) * P_c / bw; codec work with "
    f"{PER_CHUNK} (chunk rows r = ceil(T/N)): N encodes of [r, E], one reduce-and-re-encode of N "
    "payloads of [r, E], N decodes of one payload of [r, E], each priced as the measured Triton "
    "decode-and-sum of 1 payload. This is a model too: before the batched launches the library ran those "
    "N decodes as eager torch decodes (slower), and now it runs the batched path below.",
    f"two-shot{BATCHED} ({BATCHED_NOTE}): the same wire and the same reduce-and-re-encode; the N chunk "
    "encodes are one call (`Codec.encode_chunks`, one kernel launch over the N row chunks) and the N chunk "
    "decodes one call (`Codec.decode_chunks`), each the MEASURED eager time of the batched call where "
    "scripts/gpu_check.py timed it (its two-shot message size, default 2048 tokens, at the worlds it ran, "
    "with the batched bytes and decodes bitwise the CPU reference; `--timing graph` does not use them, "
    "they are eager), else modelled as the measured time of ONE eager call at the whole message's size, "
    "N*r rows (the interpolation below), instead of N eager calls of r rows. The basis of every call is "
    "listed per row in the JSON (`codec_calls`).",
    "Payload bytes P come from each codec's payload_nbytes (the actual wire format, metadata included); "
    "the measured rows' bits_per_value must agree with it, or the run is refused.",
    "GPU codec time = the measured time per call of the fused Triton kernels (scripts/gpu_check.py, one "
    "GPU, median of its repeats, CUDA events around each eager call, so host launch overhead is included; "
    "fp32 partials in, fp32 sums out, preallocated outputs). Message size: the time is interpolated "
    "linearly in the token count between the measured shapes of the same codec and world; above the "
    "largest measured shape it grows in proportion to the tokens; below the smallest it is the smallest's "
    "time (calls of a few rows are launch-bound).",
    "Decode-and-sum of N payloads and reduce-and-re-encode of N payloads: the measured rows of world N "
    "when the device check ran that world at a token count at or below the message's; otherwise a "
    "bytes-proportional model from the largest such measured world w <= N (world 2 if none): decode-and-sum "
    "time x (N*p + 4)/(w*p + 4), p = bytes/value of a payload (the kernel reads N payloads and writes the "
    "fp32 sum); reduce-and-re-encode x (N + 1)/(w + 1) (it reads N payloads and writes one); where world N "
    "ran the same call only on more rows, the price is capped by the cheapest measured call among them "
    "(a call on fewer bytes is never priced above a measured one on more; the text says where). Encode: the "
    f"world-{BASE_WORLD} rows. How well the bytes model predicts the measured world-8 rows is shown below.",
    "The CPU contrast uses docs/bench/comm.json codec_speed (one CPU thread): time = values / throughput "
    "for every call above (decode from the decode-and-sum throughput).",
    "Codec work is not overlapped with the transfer (the pipelined collective would hide some of it; "
    "not modelled).",
    f"Compute (for the end-to-end tables): prefill = 2 * params * tokens / (N * {GPU['bf16_flops'] / 1e12:.0f} "
    f"TFLOP/s * MFU {GPU['mfu_prefill']}); decode = weights (2 B/param) / (N * {GPU['hbm_bytes_per_s'] / 1e12:.2f} "
    f"TB/s * {GPU['mbu_decode']}) per step ({GPU['name']}); attention and KV-cache traffic ignored; no "
    f"overlap of compute and communication.",
    "Not modelled: the two-shot re-quantization error (needs sum scales), message-size fallback to exact, "
    "PCIe/NIC protocol overheads beyond the effective bandwidths given, bf16 partials into the kernels "
    "(they would read half the input bytes; not credited).",
]


# the owner stage's bytes per value of the chunk, p = payload bytes/value: split reads N payloads,
# writes the fp32 sum, reads it again and writes one payload; fused reads N payloads, writes one
OWNER_MODEL = {"split": "(N*p + 8 + p)/(w*p + 8 + p)", "fused": "(N + 1)/(w + 1)"}

# Printed only where --reduce-split / --feedback-cost are given (the documents without them keep their text).
OWNER_ASSUMPTIONS = [
    "Two-shot's owner stage (reduce-and-re-encode of N payloads of the owner's chunk of r = ceil(T/N) rows) is "
    "priced as the library runs it today (`owner_stage`): split (decode-and-sum into an fp32 buffer, then "
    "encode) for the static and rot-* codecs, one fused kernel for the group codecs and mxfp4. Its time is the "
    "MEASURED GPU time alone of scripts/gpu_reduce_split.py (`split_us`, whose T is the whole message and "
    "`chunk_rows` the chunk: the row is keyed by the chunk) or of scripts/gpu_feedback_cost.py "
    "(`two_shot_reduce_us` at chunk ceil(T/N)), at world N, linear in the chunk rows between measured chunks, "
    "in proportion above the largest, the smallest's time below it. At a world not run it is MODELLED from the "
    "largest world w <= N that ran: x " + "; ".join(f"{k}: {v}" for k, v in OWNER_MODEL.items()) + " "
    "(p = payload bytes/value; split reads N payloads, writes and reads the fp32 sum, writes one payload). "
    "Each call's basis and file are listed in the text and the JSON (`codec_calls`).",
    "Two-shot's batched launches with --timing graph: `two_shot_encode_us` / `two_shot_decode_us` of "
    "scripts/gpu_feedback_cost.py (GPU time alone; one `encode_chunks` launch for the N chunks, one "
    "`decode_chunks` launch for the N sums into an fp32 [T, E] result) where that run has the codec, world and "
    "message size, else the model above (one call at the whole message's size).",
]


# With --reduce-split / --feedback-cost, these assumptions replace the ones above that start the same way
# (those describe gpu_check's eager rows, which such a document does not use for these calls).
EXTENDED_REPLACES = {
    "GPU codec time =": "GPU codec time = the measured GPU time alone of the fused Triton kernels (CUDA graphs: "
    "scripts/gpu_check.py's graph columns for encode and decode-and-sum, the reduce-split and feedback-cost "
    "files for two-shot's owner stage and batched launches; one GPU, median of its repeats, no host launch "
    "cost; fp32 partials in, fp32 sums out, preallocated outputs). Message size: the time is interpolated "
    "linearly in the token count between the measured shapes of the same codec and world; above the largest "
    "measured shape it grows in proportion to the tokens; below the smallest it is the smallest's time (an "
    "upper bound). The owner stage's timed calls read the same few MB of payloads in every replay, which fit "
    "in the GPU's L2 cache, so its times are warm-cache times.",
    f"two-shot{BATCHED} (": f"two-shot{BATCHED}: the same wire; the N chunk encodes are one call "
    "(`Codec.encode_chunks`) and the N chunk decodes one call (`Codec.decode_chunks`), each priced as in the "
    "owner-stage bullets below.",
    "Decode-and-sum of N payloads and reduce-and-re-encode": "Decode-and-sum of N payloads: the measured rows "
    "of world N when the device check ran that world at a token count at or below the message's; otherwise a "
    "bytes-proportional model from the largest such measured world w <= N (world 2 if none): decode-and-sum "
    "time x (N*p + 4)/(w*p + 4), p = bytes/value of a payload, capped by the cheapest of world N's measured calls on more "
    "rows than the message's where it ran only larger ones. Reduce-and-re-encode: the owner-stage bullets "
    f"below. Encode: the world-{BASE_WORLD} rows.",
}
FEEDBACK_NOTE = ("Error feedback (off by default) is not in these tables: with it, two-shot's first stage and "
                 "owner stage are the feedback-cost files' `two_shot_encode_feedback_us` and "
                 "`two_shot_reduce_feedback_us` (the decode is unchanged); the goal rows' schemes with them are "
                 "in the section \"With error feedback\" below where a file has them.")


def _assumptions(extended: bool) -> list[str]:
    if not extended:
        return list(ASSUMPTIONS)
    out = []
    for a in ASSUMPTIONS:
        new = next((v for k, v in EXTENDED_REPLACES.items() if a.startswith(k)), a)
        out.append(new)
    return out + OWNER_ASSUMPTIONS + [FEEDBACK_NOTE]


def _with_feedback(judged: list, fbs: list) -> list[str]:
    """Markdown: each goal row's scheme (two-shot, batched) re-priced with error feedback from
    the feedback-cost rows of its codec at TP GOAL_TP and PREFILL_TOKENS tokens: the first stage
    and the owner stage with feedback, the decode as without."""
    out = []
    for g in judged:
        r = g["row"]
        if not r["scheme"].endswith(BATCHED) or "two-shot" not in r["scheme"]:
            continue
        codec = r["scheme"].split()[0]
        row = next((x for d in fbs for x in d["rows"] if x.get("codec") == codec and x.get("world") == GOAL_TP
                    and x.get("tokens") == PREFILL_TOKENS and x.get("hidden") == MODEL["hidden"]
                    and (codec, GOAL_TP) in d["owner_ok"] and x.get("two_shot_encode_feedback_us")
                    and x.get("two_shot_reduce_feedback_us")), None)
        if row is None:
            continue
        decode = r["codec_calls"][-1]["each_us"] * r["codec_calls"][-1]["calls"]
        codec_us = row["two_shot_encode_feedback_us"] + row["two_shot_reduce_feedback_us"] + decode
        base_us = r["allreduce_us"] * g["comm_speedup"]
        speed = base_us / (r["wire_us"] + codec_us)
        out.append(f"| {g['link']} | {r['scheme']} | {_fmt(row['two_shot_encode_feedback_us'])} + "
                   f"{_fmt(row['two_shot_reduce_feedback_us'])} + {_fmt(decode)} = {_fmt(codec_us)} | "
                   f"{_fmt(r['codec_us'])} | {speed:.2f}x | {g['need']}x: {'met' if speed >= g['need'] else 'not met'} |")
    if not out:
        return []
    return ["### With error feedback", "",
            f"The goal rows' schemes with error feedback (prefill, TP {GOAL_TP}, {PREFILL_TOKENS} tokens): first "
            "stage + owner stage with feedback (`two_shot_encode_feedback_us`, `two_shot_reduce_feedback_us` of "
            "the feedback-cost file) + the decode as without; the wire is the same.", "",
            "| link | scheme | codec us with feedback (encode + owner + decode) | without | speed-up vs bf16 | goal |",
            "|---|---|---|---|---|---|", *out, ""]


class ProjectionInputError(ValueError):
    """A device-check or benchmark file the projection must not use; the message is one line."""


# ----------------------------------------------------------------- codec times
@functools.lru_cache(maxsize=None)
def _codec(name: str):
    from lowbit_tp.calibration.synthetic import synthetic_calibration
    from lowbit_tp.codecs import make_codec

    # payload_nbytes depends only on the shape; static codecs still want a calibration object
    cal = synthetic_calibration(["L"], world=1, hidden=MODEL["hidden"], tokens=8, batches=1)
    return make_codec(name, calibration=cal)


def bytes_per_value(codec: str, tokens: int = PREFILL_TOKENS) -> float:
    return _codec(codec).payload_nbytes((tokens, MODEL["hidden"])) / (tokens * MODEL["hidden"])


@dataclass(frozen=True)
class KernelPoint:
    """One measured device-check row: seconds per call at ``tokens`` x hidden."""
    tokens: int
    encode_s: float
    decode_sum_s: float
    reduce_encode_s: float
    copy_gbps: float


@dataclass(frozen=True)
class OwnerPoint:
    """One measured owner stage (two-shot's reduce-and-re-encode), GPU time alone: seconds per
    call for N payloads of a chunk of ``tokens`` rows x hidden, and the file it came from."""
    tokens: int
    reduce_encode_s: float
    source: str


def owner_stage(codec: str) -> str:
    """How the library runs ``codec``'s two-shot owner stage on Triton today: ``"fused"`` (one
    kernel reads the N payloads and writes the re-encoded sum: the group codecs and ``mxfp4``)
    or ``"split"`` (decode-and-sum into an fp32 buffer, then the encoder: the static and
    ``rot-*`` codecs, the default since stop 26): the kernel module's ``REDUCE_VARIANT``."""
    from lowbit_tp.codecs.dynamic import GroupInt4Codec, MXFP4Codec

    if isinstance(_codec(codec), (GroupInt4Codec, MXFP4Codec)):
        return "fused"
    from lowbit_tp.kernels import triton_rotation, triton_static

    return (triton_rotation if codec.startswith("rot-") else triton_static).REDUCE_VARIANT


def owner_scale(kind: str, n: int, w: int, p: float) -> float:
    """The owner stage of N payloads from the measured one of w (:data:`OWNER_MODEL`)."""
    if kind == "split":
        return (n * p + 8 + p) / (w * p + 8 + p)
    return (n + 1) / (w + 1)


def interpolate(points: list[KernelPoint], tokens: int, field: str) -> float:
    """Seconds of ``field`` at ``tokens``: linear between measured token counts, proportional to
    the tokens above the largest, the smallest's time below the smallest."""
    ts = [p.tokens for p in points]
    ys = [getattr(p, field) for p in points]
    if tokens <= ts[0]:
        return ys[0]
    if tokens >= ts[-1]:
        return ys[-1] * tokens / ts[-1]
    i = bisect.bisect_left(ts, tokens)
    if ts[i] == tokens:
        return ys[i]
    f = (tokens - ts[i - 1]) / (ts[i] - ts[i - 1])
    return ys[i - 1] + f * (ys[i] - ys[i - 1])


def how_read(points: list, tokens: int) -> str:
    """How :func:`interpolate` read ``tokens`` off the measured ``points`` (the basis text)."""
    ts = [p.tokens for p in points]
    if tokens in ts:
        return "measured"
    if tokens < ts[0]:
        return f"below its smallest shape: the {ts[0]}-row time"
    if tokens > ts[-1]:
        return f"the {ts[-1]}-row time x {tokens}/{ts[-1]}"
    i = bisect.bisect_left(ts, tokens)
    return f"interpolated between its {ts[i - 1]}- and {ts[i]}-row shapes"


class MeasuredKernels:
    """Per-call times of the fused GPU kernels from one or more ``gpu_check`` JSON documents
    (already checked by :func:`load_gpu_check`), one document per world."""

    def __init__(self, docs: list[dict], timing: str = "eager", reduce_split: list[dict] = (),
                 feedback_cost: list[dict] = ()):
        """``timing``: ``eager`` = each call timed alone, the host's launch cost included;
        ``graph`` = the GPU's time alone (gpu_check's ``graph_encode_us``/``graph_decode_sum_us``,
        5 calls replayed as one CUDA graph); gpu_check's reduce-and-re-encode has no graph timing
        and stays eager.

        ``reduce_split`` (documents of ``scripts/gpu_reduce_split.py``, :func:`load_reduce_split`)
        and ``feedback_cost`` (``scripts/gpu_feedback_cost.py``, :func:`load_feedback_cost`) are
        GPU time alone too, so they need ``timing="graph"``: they price two-shot's owner stage as
        the library runs it today (:func:`owner_stage`) and, from ``feedback_cost``, two-shot's
        batched chunk launches (see :meth:`reduce_encode_s`, :meth:`encode_chunks_s`)."""
        if timing not in TIMINGS:
            raise ProjectionInputError(f"timing {timing!r}: use one of {', '.join(TIMINGS)}")
        if (reduce_split or feedback_cost) and timing != "graph":
            raise ProjectionInputError("--reduce-split / --feedback-cost hold GPU time alone (CUDA graphs): "
                                       "use them with --timing graph")
        self.timing = timing
        # every input must come from one device kind: a table never mixes two GPUs
        devices = {_device_of(d) for d in [*docs, *reduce_split, *feedback_cost]}
        if len(devices) > 1:
            raise ProjectionInputError("inputs from more than one device (" + ", ".join(sorted(map(str, devices)))
                                       + "): one projection takes one GPU's files")
        # name each number's file where a world's rows may come from more than one file
        self.cite = bool(reduce_split or feedback_cost) or len(docs) != len({d["world"] for d in docs})
        self.source: dict[tuple[str, int], str] = {}
        self.points: dict[tuple[str, int], list[KernelPoint]] = {}
        self.failed: dict[tuple[str, int], str] = {}
        self.bits: dict[str, float] = {}
        e = MODEL["hidden"]
        # A codec whose device payloads or sums differ from the CPU reference in ANY run has no
        # speed worth using at any world; a (codec, world) without one row that shows all four
        # identity checks True has no evidence that its kernels are right, so it is left out too.
        seen: list[tuple[str, float, bool]] = []  # (codec, bits/value, from a log that printed 3 decimals)
        wrong = {r["codec"]: f"{k}={r[k]} at world {d['world']}" for d in docs for r in d["rows"]
                 for k in IDENTITY if k in r and r[k] is not True}
        verified = {(r["codec"], d["world"]) for d in docs for r in d["rows"]
                    if all(r.get(k) is True for k in IDENTITY)}
        for doc in docs:
            w = doc["world"]
            for r in doc["rows"]:
                key = (r["codec"], w)
                if "error" in r or r["codec"] in wrong or key not in verified:
                    why = (r.get("error") or (f"not bitwise the CPU reference ({wrong[r['codec']]})"
                                              if r["codec"] in wrong else "no row with the identity checks"))
                    self.failed.setdefault(key, why)
                    continue
                if r["hidden"] != e:
                    continue
                f = 4 * r["tokens"] * e  # fp32 bytes of the partial (or of the sum)
                if timing == "graph":
                    if "graph_encode_us" not in r or "graph_decode_sum_us" not in r:
                        self.failed.setdefault(key, r.get("graph_error") or "no CUDA-graph timing in the run")
                        continue
                    enc_s, dec_s = r["graph_encode_us"] * 1e-6, r["graph_decode_sum_us"] * 1e-6
                else:
                    enc_s, dec_s = f / (r["encode_fp32_gbps"] * 1e9), f / (r["decode_sum_fp32_gbps"] * 1e9)
                # the fractions compare like with like: a graph-timed kernel against the graph-timed copy
                copy = r.get("graph_copy_gbps", r["copy_gbps"]) if timing == "graph" else r["copy_gbps"]
                p = KernelPoint(tokens=r["tokens"], encode_s=enc_s, decode_sum_s=dec_s,
                                reduce_encode_s=r["reduce_encode_us"] * 1e-6, copy_gbps=copy)
                pts = self.points.setdefault(key, [])
                if any(q.tokens == p.tokens for q in pts):
                    raise ProjectionInputError(f"two device-check rows for {r['codec']} at world {w}, "
                                               f"{r['tokens']} tokens: give one file per world")
                pts.append(p)
                self.source[key] = Path(doc["path"]).name
                seen.append((r["codec"], r["bits_per_value"], bool(doc.get("from_log"))))
        for pts in self.points.values():
            pts.sort(key=lambda q: q.tokens)
        # two-shot's batched launches as gpu_check timed them (eager calls, one message of
        # ``tokens`` rows cut into ``world`` chunks), where the batched bytes and decodes were
        # bitwise the CPU reference: (codec, world, tokens) -> (encode_chunks_s, decode_chunks_s)
        self.batched: dict[tuple[str, int, int], tuple[float, float]] = {}
        for doc in docs:
            for r in doc["rows"]:
                if ((r["codec"], doc["world"]) in self.points and r.get("two_shot_world") == doc["world"]
                        and r.get("two_shot_bytes_equal") is True and r.get("two_shot_decode_equal") is True):
                    # keyed by the rows the chunks cover (gpu_check pads the message to a multiple of the world)
                    rows = r.get("two_shot_chunk_rows", -(-r["tokens"] // doc["world"])) * doc["world"]
                    self.batched[(r["codec"], doc["world"], rows)] = (
                        r["two_shot_encode_chunks_us"] * 1e-6, r["two_shot_decode_chunks_us"] * 1e-6)
        self.owner, self.batched_graph = _owner_points(reduce_split), {}
        for key, pts in _owner_points(feedback_cost, owner=True).items():
            if key in self.owner:
                raise ProjectionInputError(f"owner-stage times for {key[0]} at world {key[1]} in both a "
                                           "reduce-split and a feedback-cost file: give each once")
            self.owner[key] = pts
        for doc in feedback_cost:
            for r in doc["rows"]:
                if (r["codec"], r["world"]) not in doc["verified"]:
                    continue
                rows = -(-r["tokens"] // r["world"]) * r["world"]
                k = (r["codec"], r["world"], rows)
                if k in self.batched_graph:
                    raise ProjectionInputError(f"two feedback-cost rows for {r['codec']} at world {r['world']}, "
                                               f"{r['tokens']} tokens: give one (FILE:codec,... picks codecs)")
                self.batched_graph[k] = (r["two_shot_encode_us"] * 1e-6, r["two_shot_decode_us"] * 1e-6,
                                         Path(doc["path"]).name)
        if not any(w == BASE_WORLD for _, w in self.points):
            raise ProjectionInputError(f"no error-free world-{BASE_WORLD} device-check rows at hidden {e}: "
                                       "encode times come from them")
        for codec, bits, rounded in seen:  # every file's rows, not just the last one's
            want = 8 * bytes_per_value(codec)
            self.bits[codec] = want
            if not math.isclose(bits, want, rel_tol=1e-9, abs_tol=5e-4 if rounded else 0.0):
                raise ProjectionInputError(f"{codec}: the device check measured {bits} bits/value but "
                                           f"payload_nbytes gives {want}: the wire format changed since the run")

    def has(self, codec: str) -> bool:
        return (codec, BASE_WORLD) in self.points

    def worlds(self, codec: str) -> list[int]:
        return sorted(w for c, w in self.points if c == codec)

    def _anchor(self, codec: str, n: int, tokens: int) -> int:
        ok = [w for w in self.worlds(codec) if w <= n and self.points[(codec, w)][0].tokens <= tokens]
        return max(ok) if ok else BASE_WORLD

    def _file(self, codec: str, w: int) -> str:
        return f", {self.source[(codec, w)]}" if self.cite else ""

    def encode_s(self, codec: str, tokens: int) -> tuple[float, str]:
        return (interpolate(self.points[(codec, BASE_WORLD)], tokens, "encode_s"),
                f"world {BASE_WORLD} rows{self._file(codec, BASE_WORLD)}")

    def decode_sum_s(self, codec: str, tokens: int, n: int) -> tuple[float, str]:
        w = self._anchor(codec, n, tokens)
        t = interpolate(self.points[(codec, w)], tokens, "decode_sum_s")
        if w == n:
            return t, f"world {w} rows{self._file(codec, w)}"
        p = self.bits[codec] / 8
        return self._bytes_model(codec, w, n, tokens, "decode_sum_s", t, t * (n * p + 4) / (w * p + 4),
                                 (n * p + 4) / (w * p + 4),
                                 f"(N*p + 4)/(w*p + 4) = ({n}*{p:.4g} + 4)/({w}*{p:.4g} + 4)")

    def encode_chunks_s(self, codec: str, rows: int, n: int) -> tuple[float, str]:
        """``Codec.encode_chunks`` of ``n`` chunks of ``rows``: measured (eager) where the device
        check timed that world and message size, else one encode call of ``n * rows`` rows."""
        hit = self.batched.get((codec, n, n * rows)) if self.timing == "eager" else None
        if hit:
            return hit[0], f"measured batched, world {n}"
        hit = self.batched_graph.get((codec, n, n * rows))
        if hit:
            return hit[0], f"measured batched, GPU time alone, world {n}, {hit[2]}"
        t, basis = self.encode_s(codec, n * rows)
        return t, "model: one encode of the whole message" + (f" ({basis})" if self.cite else "")

    def decode_chunks_s(self, codec: str, rows: int, n: int) -> tuple[float, str]:
        """``Codec.decode_chunks`` of ``n`` one-payload chunks of ``rows``, as :meth:`encode_chunks_s`."""
        hit = self.batched.get((codec, n, n * rows)) if self.timing == "eager" else None
        if hit:
            return hit[1], f"measured batched, world {n}"
        hit = self.batched_graph.get((codec, n, n * rows))
        if hit:
            return hit[1], f"measured batched, GPU time alone, world {n}, {hit[2]}"
        t, basis = self.decode_sum_s(codec, n * rows, 1)
        return t, "model: one decode of 1 payload of the whole message" + (f" ({basis})" if self.cite else "")

    def reduce_encode_s(self, codec: str, tokens: int, n: int) -> tuple[float, str]:
        """Two-shot's owner stage: N payloads of a chunk of ``tokens`` rows decoded, summed and
        re-encoded. From the owner-stage files where they have the codec (GPU time alone, keyed
        by the CHUNK's rows, ``chunk_rows`` of gpu_reduce_split / ``chunk_rows(T, N)`` of
        gpu_feedback_cost): world N's rows interpolated in the chunk rows as :func:`interpolate`
        does; at a world not run, the bytes model of :func:`owner_scale` from the largest run
        world w <= N. Else gpu_check's ``reduce_encode_us`` (eager, and the variant of that run)."""
        if any(c == codec for c, _ in self.owner):
            return self.owner_s(codec, tokens, n)
        w = self._anchor(codec, n, tokens)
        t = interpolate(self.points[(codec, w)], tokens, "reduce_encode_s")
        if w == n:
            return t, f"world {w} rows{self._file(codec, w)}"
        return self._bytes_model(codec, w, n, tokens, "reduce_encode_s", t, t * (n + 1) / (w + 1), (n + 1) / (w + 1),
                                 f"(N + 1)/(w + 1) = ({n} + 1)/({w} + 1)")

    def _bytes_model(self, codec: str, w: int, n: int, tokens: int, field: str, t: float, model: float,
                     scale: float, formula: str) -> tuple[float, str]:
        """A call priced by the bytes model from world ``w``: world w's time ``t`` at ``tokens`` x
        ``scale`` (= ``model``), capped by world ``n``'s own measured call of the same kind (same
        codec, kernel and timing mode: the same ``field`` of the same :class:`MeasuredKernels`) on
        more rows than ``tokens`` (the cheapest of them), where world n ran one: a call on fewer bytes is never
        priced above a measured call on more (the model scales a launch-bound time by a bytes
        ratio). Returns
        (seconds, basis): the basis gives the inputs and arithmetic (world w's time and how it was
        read off the measured shapes, the formula with its numbers, the factor) and, where the cap
        applied, the model's price and the measured call that capped it."""
        text = (f"bytes model from world {w}{self._file(codec, w)}: {_fmt(1e6 * t)} us at {tokens} rows "
                f"({how_read(self.points[(codec, w)], tokens)}) x {formula} = {scale:.3g}")
        larger = [q for q in self.points.get((codec, n), []) if q.tokens > tokens]
        cheapest = min(larger, key=lambda q: getattr(q, field), default=None)  # the nearest, unless a larger is faster
        if cheapest is not None and getattr(cheapest, field) < model:
            cap = getattr(cheapest, field)
            text += (f" gives {_fmt(1e6 * model)} us; capped at world {n}'s measured call of {cheapest.tokens} rows "
                     f"({_fmt(1e6 * cap)} us{self._file(codec, n)}), a larger call")
            return cap, text
        return model, text

    def owner_s(self, codec: str, rows: int, n: int) -> tuple[float, str]:
        worlds = sorted(w for c, w in self.owner if c == codec)
        below = [w for w in worlds if w <= n]
        w = max(below) if below else worlds[0]
        pts = self.owner[(codec, w)]
        t = interpolate(pts, rows, "reduce_encode_s")
        kind = owner_stage(codec)
        what = "split: decode-and-sum, then encode" if kind == "split" else "fused kernel"
        at = [q for q in pts if q.tokens == rows]
        files = ", ".join(dict.fromkeys(q.source for q in (at or pts)))
        how = ("measured" if at else
               "interpolated in the chunk rows" if pts[0].tokens < rows < pts[-1].tokens else
               "scaled by the rows from the largest chunk" if rows > pts[-1].tokens else
               "the smallest measured chunk's time")
        if w == n:
            return t, f"{how}, owner stage {what}, world {w}, {files}"
        p = self.bits[codec] / 8
        scale = owner_scale(kind, n, w, p)
        return t * scale, (f"modelled: owner stage {what} of world {w} ({_fmt(1e6 * t)} us, {how}, {files}) "
                           f"x {scale:.3g}, the bytes model {OWNER_MODEL[kind]}")


class ThroughputKernels:
    """Codec time = values / throughput (values/s), from ``bench-comm``'s CPU codec-speed rows."""

    def __init__(self, speeds: dict[str, dict[str, float]]):
        self.speeds = speeds

    def has(self, codec: str) -> bool:
        return codec in self.speeds

    def encode_s(self, codec: str, tokens: int) -> tuple[float, str]:
        return tokens * MODEL["hidden"] / self.speeds[codec]["encode"], "throughput"

    def decode_sum_s(self, codec: str, tokens: int, n: int) -> tuple[float, str]:
        return n * tokens * MODEL["hidden"] / self.speeds[codec]["decode"], "throughput"

    def reduce_encode_s(self, codec: str, tokens: int, n: int) -> tuple[float, str]:
        return self.decode_sum_s(codec, tokens, n)[0] + self.encode_s(codec, tokens)[0], "throughput"


# ----------------------------------------------------------------- input files
def is_fused_schema(doc: dict) -> bool:
    return "world" in doc and "dry_run_interpreter" in doc and isinstance(doc.get("rows"), list)


TIMINGS = ("eager", "graph")
IDENTITY = ("bytes_equal_finite", "bytes_equal_nan_inf", "sum_equal_finite", "sum_equal_nan_inf")
REQUIRED = ("codec", "tokens", "hidden", "bits_per_value", "copy_gbps", "encode_fp32_gbps", "decode_sum_fp32_gbps",
            "reduce_encode_us")


def from_log(doc) -> bool:
    """A world's rows kept from a cut run's log (stop 24's ``gpu_check_h100_stop24_run3_world8.json``):
    ``world``, ``rows``, a ``note`` saying so and the GPU's name as ``device``; no top-level
    ``dry_run_interpreter`` or ``environment``, which gpu_check writes at its end."""
    return (isinstance(doc, dict) and "world" in doc and isinstance(doc.get("rows"), list) and "note" in doc
            and "dry_run_interpreter" not in doc and str(doc.get("device", "")).startswith("NVIDIA"))


def load_gpu_check(spec) -> dict:
    """The device-check document at ``spec`` (``FILE`` or ``FILE:codec,...``, :func:`parse_spec`),
    or :class:`ProjectionInputError` (one line)."""
    path, codecs = parse_spec(spec)
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ProjectionInputError(f"{path}: cannot read a device-check JSON ({exc})") from None
    if from_log(doc):
        doc = dict(doc, environment={"cuda": doc["device"]}, device="cuda", dry_run_interpreter=False,
                   from_log=doc["note"])
    if not isinstance(doc, dict) or not is_fused_schema(doc):
        raise ProjectionInputError(f"{path}: old device-check schema (unfused encode/decode rows, no 'world'); "
                                   "the projection needs a fused-kernel run of scripts/gpu_check.py")
    if doc["dry_run_interpreter"]:
        raise ProjectionInputError(f"{path}: a dry run under the Triton interpreter; its speeds are meaningless")
    if not str(doc.get("device", "")).startswith("cuda"):
        raise ProjectionInputError(f"{path}: ran on {doc.get('device')!r}, not a GPU")
    good = [r for r in doc["rows"] if "error" not in r]
    if not good:
        raise ProjectionInputError(f"{path}: every row failed (first error: "
                                   f"{doc['rows'][0]['error'] if doc['rows'] else 'no rows'})")
    for r in good:
        missing = [k for k in REQUIRED if k not in r]
        if missing:
            raise ProjectionInputError(f"{path}: row {r.get('codec')}@{r.get('tokens')} lacks {', '.join(missing)}")
    return _pick(doc, spec, path, codecs)


def parse_spec(spec) -> tuple[Path, tuple[str, ...] | None]:
    """``FILE`` or ``FILE:codec,codec`` (only those codecs' rows are read from FILE)."""
    text = str(spec)
    path, sep, codecs = text.rpartition(":")
    if sep and path.endswith(".json") and "/" not in codecs:
        return Path(path), tuple(c for c in codecs.split(",") if c)
    return Path(text), None


def _pick(doc: dict, spec, path: Path, codecs) -> dict:
    if codecs:
        unknown = sorted(set(codecs) - {r.get("codec") for r in doc["rows"]})
        if unknown:
            raise ProjectionInputError(f"{path}: no rows for {', '.join(unknown)}")
        doc["rows"] = [r for r in doc["rows"] if r.get("codec") in codecs]
        doc["codecs_used"] = list(codecs)
    doc["path"], doc["spec"] = str(path), str(spec)
    return doc


def _device_of(doc: dict) -> str:
    return str(doc.get("environment", {}).get("cuda") if "environment" in doc else doc.get("device"))


def _read_gpu_doc(path: Path, what: str) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ProjectionInputError(f"{path}: cannot read a {what} JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        raise ProjectionInputError(f"{path}: not a {what} JSON (no rows)")
    if doc.get("dry_run_interpreter"):
        raise ProjectionInputError(f"{path}: a dry run under the Triton interpreter; its speeds are meaningless")
    if not str(doc.get("device", "")).startswith("NVIDIA"):
        raise ProjectionInputError(f"{path}: ran on {doc.get('device')!r}, not a GPU")
    return doc


def load_reduce_split(spec) -> dict:
    """A ``scripts/gpu_reduce_split.py`` document (the owner stage, split against fused, GPU time
    alone), or :class:`ProjectionInputError`. Only rows whose two variants' payloads were the
    reference's bytes (``equal``) and that have a ``split_us`` are kept."""
    path, codecs = parse_spec(spec)
    doc = _pick(_read_gpu_doc(path, "gpu_reduce_split"), spec, path, codecs)
    doc["kind"] = "reduce-split"
    doc["left_out"] = [f"{r.get('codec')}@w{r.get('world')}/T{r.get('tokens')}: {r.get('error') or 'not equal'}"
                       for r in doc["rows"] if "error" in r or r.get("equal") is not True or "split_us" not in r]
    doc["rows"] = [r for r in doc["rows"] if "error" not in r and r.get("equal") is True and "split_us" in r
                   and r["hidden"] == MODEL["hidden"]]
    if not doc["rows"]:
        raise ProjectionInputError(f"{path}: no usable row (each failed, was skipped or was not bitwise)")
    return doc


def load_feedback_cost(spec) -> dict:
    """A ``scripts/gpu_feedback_cost.py`` document (GPU time alone), or :class:`ProjectionInputError`:
    its plain two-shot rows (``two_shot_encode_us``: the N chunks in one launch; ``two_shot_reduce_us``:
    the owner stage; ``two_shot_decode_us``: the N sums in one launch), for a (codec, world) whose
    two-shot stages were bitwise the reference in the run (``two_shot_equal``, written on a codec's
    first shape) and whose owner stage ran as the library runs it today (:func:`owner_stage`:
    for a split codec the file must record ``reduce_variants`` = split)."""
    path, codecs = parse_spec(spec)
    doc = _pick(_read_gpu_doc(path, "gpu_feedback_cost"), spec, path, codecs)
    doc["kind"] = "feedback-cost"
    wrong = {(r["codec"], r["world"]) for r in doc["rows"] if "two_shot_equal" in r and r["two_shot_equal"] is not True}
    doc["verified"] = {(r["codec"], r["world"]) for r in doc["rows"] if r.get("two_shot_equal") is True} - wrong
    variants = doc.get("reduce_variants", {})
    doc["owner_not_used"] = []
    for r in doc["rows"]:
        if "error" in r or r.get("hidden") != MODEL["hidden"]:
            doc["verified"].discard((r.get("codec"), r.get("world")))
    doc["owner_ok"] = set(doc["verified"])
    for c, w in sorted(doc["verified"]):
        if owner_stage(c) != "fused" and variants.get("rot" if c.startswith("rot-") else "static") != owner_stage(c):
            doc["owner_ok"].discard((c, w))  # its owner stage ran fused then; the library runs it split now
            if c not in doc["owner_not_used"]:
                doc["owner_not_used"].append(c)
    if not doc["verified"]:
        raise ProjectionInputError(f"{path}: no (codec, world) with two_shot_equal true")
    return doc


def _owner_points(docs, owner: bool = False) -> dict[tuple[str, int], list[OwnerPoint]]:
    """(codec, world) -> the owner stage's measured points, keyed by the chunk's rows."""
    out: dict[tuple[str, int], list[OwnerPoint]] = {}
    for doc in docs:
        for r in doc["rows"]:
            if owner and (r["codec"], r["world"]) not in doc["owner_ok"]:
                continue
            if not owner and owner_stage(r["codec"]) != "split":
                continue  # the library runs this codec's owner stage as one fused kernel, not split
            rows = r["chunk_rows"] if not owner else -(-r["tokens"] // r["world"])
            us = r["split_us"] if not owner else r["two_shot_reduce_us"]
            pts = out.setdefault((r["codec"], r["world"]), [])
            if any(q.tokens == rows for q in pts):
                raise ProjectionInputError(f"two owner-stage rows for {r['codec']} at world {r['world']}, "
                                           f"chunk {rows} rows: give each once")
            pts.append(OwnerPoint(tokens=rows, reduce_encode_s=us * 1e-6, source=Path(doc["path"]).name))
    for pts in out.values():
        pts.sort(key=lambda q: q.tokens)
    return out


def default_gpu_checks(bench: Path = BENCH) -> list[Path]:
    """The rule of the module docstring: gpu_check.json (+ _world8) when in the fused schema,
    else the highest-numbered gpu_check_<gpu>_run<K>.json (+ its _world8 sibling)."""
    main = bench / "gpu_check.json"
    try:
        fused = main.exists() and is_fused_schema(json.loads(main.read_text()))
    except ValueError:
        fused = False
    if fused:
        first = main
    else:
        runs = [(int(m.group(1)), p) for p in bench.glob("gpu_check_*_run*.json")
                if (m := re.fullmatch(r"gpu_check_.+_run(\d+)\.json", p.name))]
        if not runs:
            raise ProjectionInputError(f"no fused-kernel device check in {bench} (gpu_check.json is absent or in "
                                       "the old schema, and there is no gpu_check_<gpu>_run<K>.json)")
        first = max(runs)[1]
    w8 = first.with_name(first.stem + "_world8.json")
    return [first] + ([w8] if w8.exists() else [])


def load_cpu_speeds(path: Path = BENCH / "comm.json") -> dict[str, dict[str, dict[str, float]]]:
    """{"cpu": eager reference, "cpu-kernels": compiled CPU kernels}: {codec: values/s}."""
    rows = json.loads(path.read_text())["codec_speed"]

    def speed(r):  # decode from the decode-and-sum time (``world`` payloads per ``numel`` outputs)
        dec = r["decode_sum_gbps"] * r["world"] if "decode_sum_gbps" in r else r["decode_gbps"]
        return {"encode": r["encode_gbps"] * 1e9 / 4, "decode": dec * 1e9 / 4}

    return {"cpu": {r["codec"]: speed(r) for r in rows if r.get("backend", "reference") == "reference"},
            "cpu-kernels": {r["codec"]: speed(r) for r in rows if r.get("backend") == "cpu"}}


# ----------------------------------------------------------------- the model
def allreduce_time(codec_name: str, algorithm: str, *, tokens: int, tp: int, link: tuple[float, float],
                   kernels=None) -> dict:
    """Seconds of one all-reduce of [tokens, hidden] over ``tp`` ranks: wire, codec, total, and
    the codec calls (op, calls, seconds each, where the time came from)."""
    bw, alpha = link
    e = MODEL["hidden"]
    m = tokens * e
    n = tp
    steps = math.ceil(math.log2(n))
    if algorithm == "allreduce":
        options = [(2 * steps * alpha + 2 * (n - 1) / n * m * ACT_BYTES / bw, 2 * (n - 1) / n * m * ACT_BYTES),
                   (steps * alpha + steps * m * ACT_BYTES / bw, steps * m * ACT_BYTES)]
        wire, sent = min(options)
        return {"wire_s": wire, "codec_s": 0.0, "total_s": wire, "bytes_sent": sent, "calls": []}
    codec = _codec(codec_name)
    if algorithm == "gather":
        sent = (n - 1) * codec.payload_nbytes((tokens, e))
        wire = steps * alpha + sent / bw
        calls = [("encode", 1, *kernels.encode_s(codec_name, tokens), tokens),
                 (f"decode-and-sum of {n}", 1, *kernels.decode_sum_s(codec_name, tokens, n), tokens)]
    elif algorithm == "two-shot":
        rows = -(-tokens // n)
        sent = 2 * (n - 1) * codec.payload_nbytes((rows, e))
        wire = 2 * steps * alpha + sent / bw
        calls = [("encode", n, *kernels.encode_s(codec_name, rows), rows),
                 (f"reduce-and-re-encode of {n}", 1, *kernels.reduce_encode_s(codec_name, rows, n), rows),
                 ("decode of 1", n, *kernels.decode_sum_s(codec_name, rows, 1), rows)]
    elif algorithm == "two-shot-batched":  # the same wire; N chunk encodes / decodes are one call each
        rows = -(-tokens // n)
        sent = 2 * (n - 1) * codec.payload_nbytes((rows, e))
        wire = 2 * steps * alpha + sent / bw
        calls = [(f"encode of {n} chunks, one launch", 1, *kernels.encode_chunks_s(codec_name, rows, n), n * rows),
                 (f"reduce-and-re-encode of {n}", 1, *kernels.reduce_encode_s(codec_name, rows, n), rows),
                 (f"decode of {n} chunks of 1 payload, one launch", 1, *kernels.decode_chunks_s(codec_name, rows, n),
                  n * rows)]
    else:
        raise ValueError(algorithm)
    codec_s = sum(k * s for _, k, s, _, _ in calls)
    return {"wire_s": wire, "codec_s": codec_s, "total_s": wire + codec_s, "bytes_sent": sent,
            "calls": [{"op": op, "calls": k, "each_us": 1e6 * s, "basis": b, "tokens": t}
                      for op, k, s, b, t in calls]}


def compute_time(phase: str, tp: int) -> float:
    if phase == "prefill":
        return 2 * MODEL["params"] * PREFILL_TOKENS / (tp * GPU["bf16_flops"] * GPU["mfu_prefill"])
    return 2 * MODEL["params"] / (tp * GPU["hbm_bytes_per_s"] * GPU["mbu_decode"])


def schemes_for(kernels, schemes=SCHEMES) -> tuple:
    return tuple(s for s in schemes if s[2] == "allreduce" or kernels.has(s[1]))


def project(kernels, schemes=SCHEMES) -> list[dict]:
    per_pass = MODEL["layers"] * MODEL["allreduces_per_layer"]
    rows = []
    for phase, tokens in (("prefill", PREFILL_TOKENS), ("decode", DECODE_BATCH)):
        for link_name, link in LINKS.items():
            for tp in TPS:
                base = None
                for label, codec, algo in schemes_for(kernels, schemes):
                    t = allreduce_time(codec, algo, tokens=tokens, tp=tp, link=link, kernels=kernels)
                    comm = per_pass * t["total_s"]
                    comp = compute_time(phase, tp)
                    row = {"phase": phase, "link": link_name, "tp": tp, "scheme": label,
                           "bytes_per_allreduce": t["bytes_sent"], "allreduce_us": 1e6 * t["total_s"],
                           "wire_us": 1e6 * t["wire_s"], "codec_us": 1e6 * t["codec_s"], "codec_calls": t["calls"],
                           "comm_ms_per_pass": 1e3 * comm, "compute_ms_per_pass": 1e3 * comp,
                           "pass_ms": 1e3 * (comm + comp)}
                    if base is None:
                        base = row
                    row["byte_ratio"] = base["bytes_per_allreduce"] / row["bytes_per_allreduce"]
                    row["comm_speedup"] = base["comm_ms_per_pass"] / row["comm_ms_per_pass"]
                    row["pass_speedup"] = base["pass_ms"] / row["pass_ms"]
                    rows.append(row)
    return rows


def best(rows: list[dict], phase: str, link: str, tp: int, batched: bool = False) -> dict:
    """The fastest compressed scheme: among the paths as they ran (default), or among the
    batched-launch rows (``batched``, a model: :data:`BATCHED_NOTE`)."""
    cand = [r for r in rows if r["phase"] == phase and r["link"] == link and r["tp"] == tp
            and r["scheme"] != SCHEMES[0][0] and r["scheme"].endswith(BATCHED) == batched]
    return max(cand, key=lambda r: r["comm_speedup"])


def goals(rows: list[dict]) -> list[dict]:
    """Issue 8's projection goals, judged on the rows (prefill, TP 8, communication time): for
    the paths as they ran, then for two-shot's batched launches (modelled) where rows exist."""
    out = []
    has_batched = any(r["scheme"].endswith(BATCHED) for r in rows)
    for batched in (False, True) if has_batched else (False,):
        for link, need, what in ((PCIE, GOAL_SPEEDUP, f">= {GOAL_SPEEDUP}x"),
                                 (IB, GOAL_SPEEDUP, f">= {GOAL_SPEEDUP}x"),
                                 (NVLINK, TIE, f"ties or wins (>= {TIE}x)")):
            b = best(rows, "prefill", link, GOAL_TP, batched)
            out.append({"link": link, "goal": what, "need": need, "scheme": b["scheme"],
                        "comm_speedup": b["comm_speedup"], "met": b["comm_speedup"] >= need, "row": b,
                        "path": BATCHED_NOTE if batched else PER_CHUNK})
    return out


def honesty_check(k: MeasuredKernels) -> list[dict]:
    """The bytes model from the world-2 rows against every measured row of another world."""
    out = []
    for (codec, w), pts in sorted(k.points.items()):
        if w == BASE_WORLD or (codec, BASE_WORLD) not in k.points:
            continue
        base = k.points[(codec, BASE_WORLD)]
        p = k.bits[codec] / 8
        for q in pts:
            for op, field, scale in (("decode-and-sum", "decode_sum_s", (w * p + 4) / (BASE_WORLD * p + 4)),
                                     ("reduce-and-re-encode", "reduce_encode_s", (w + 1) / (BASE_WORLD + 1))):
                model = interpolate(base, q.tokens, field) * scale
                meas = getattr(q, field)
                out.append({"codec": codec, "world": w, "tokens": q.tokens, "op": op, "measured_us": 1e6 * meas,
                            "model_us": 1e6 * model, "measured_over_model": meas / model})
            enc = interpolate(base, q.tokens, "encode_s")
            out.append({"codec": codec, "world": w, "tokens": q.tokens, "op": "encode (same kernel, other run)",
                        "measured_us": 1e6 * q.encode_s, "model_us": 1e6 * enc,
                        "measured_over_model": q.encode_s / enc})
    return out


# ----------------------------------------------------------------- the document
def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"


def _grid(rows: list[dict], phase: str, value: str, schemes) -> str:
    """One table per phase: rows = link x scheme, columns = TP degree."""
    out = ["| link | scheme | " + " | ".join(f"TP {t}" for t in TPS) + " |", "|---|---|" + "---|" * len(TPS)]
    for link in LINKS:
        for label, _, _ in schemes:
            vals = {r["tp"]: r[value] for r in rows if r["phase"] == phase and r["link"] == link and r["scheme"] == label}
            out.append(f"| {link} | {label} | " + " | ".join(_fmt(vals[t]) for t in TPS) + " |")
    return "\n".join(out)


def _codec_grid(rows: list[dict], phase: str, schemes) -> str:
    link = next(iter(LINKS))
    out = ["| scheme | " + " | ".join(f"TP {t}" for t in TPS) + " |", "|---|" + "---|" * len(TPS)]
    for label, _, _ in schemes:
        vals = {r["tp"]: r["codec_us"] for r in rows if r["phase"] == phase and r["link"] == link and r["scheme"] == label}
        out.append(f"| {label} | " + " | ".join(_fmt(vals[t]) for t in TPS) + " |")
    return "\n".join(out)


def _kernel_table(k: MeasuredKernels) -> list[str]:
    if k.cite:  # the owner stage is priced from its own files where they have the codec; name each row's file
        out = ["| codec | world | tokens | encode us | decode-and-sum us | gpu_check's reduce-and-re-encode us "
               "(eager; used only for a codec without owner-stage rows below) | encode / copy | "
               "decode-and-sum / copy | file |", "|---|---|---|---|---|---|---|---|---|"]
    else:
        out = ["| codec | world | tokens | encode us | decode-and-sum us | reduce-and-re-encode us | encode / copy | "
               "decode-and-sum / copy |", "|---|---|---|---|---|---|---|---|"]
    e = MODEL["hidden"]
    for (codec, w), pts in sorted(k.points.items()):
        for q in pts:
            f, p = 4 * q.tokens * e, k.bits[codec] / 8 * q.tokens * e
            enc_frac = (f + p) / q.encode_s / 1e9 / q.copy_gbps
            dec_frac = (w * p + f) / q.decode_sum_s / 1e9 / q.copy_gbps
            out.append(f"| {codec} | {w} | {q.tokens} | {_fmt(1e6 * q.encode_s)} | {_fmt(1e6 * q.decode_sum_s)} | "
                       f"{_fmt(1e6 * q.reduce_encode_s)} | {enc_frac:.0%} | {dec_frac:.0%} |"
                       + (f" `{k.source[(codec, w)]}` |" if k.cite else ""))
    return out


def _rel(p) -> str:
    """``p`` relative to the repository when inside it (the document names no machine's paths)."""
    p = Path(p).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def _sources(docs: list[dict]) -> list[str]:
    out = []
    for d in docs:
        env = d.get("environment", {})
        extra = []
        if not d.get("complete", True):
            extra.append("INCOMPLETE run")
        if d.get("skipped_for_budget"):
            extra.append("left out for its time budget: " + ", ".join(d["skipped_for_budget"]))
        if d.get("codecs_used"):
            extra.append("only the rows of " + ", ".join(f"`{c}`" for c in d["codecs_used"]) + " are read")
        if d.get("from_log"):
            extra.append(f"rows kept from the run's log ({d['from_log']})")
        if d.get("kind") == "reduce-split":
            extra.append("the owner stage, `split_us` (decode-and-sum into fp32, then encode; the library's "
                         "default for the static and rot-* codecs), keyed by `chunk_rows` = ceil(T / world)")
            if d.get("left_out"):
                extra.append("rows without a time: " + ", ".join(d["left_out"]))
        if d.get("kind") == "feedback-cost":
            extra.append("the plain two-shot stages (`two_shot_encode_us`: N chunks in one launch; "
                         "`two_shot_reduce_us`: the owner stage; `two_shot_decode_us`: N sums in one launch), "
                         "for the (codec, world)s with `two_shot_equal`; owner stage variants "
                         f"{d.get('reduce_variants', 'not recorded')}")
            if d.get("owner_not_used"):
                extra.append("its owner-stage times of " + ", ".join(f"`{c}`" for c in d["owner_not_used"])
                             + " are not used (the run did not record the variant the library runs now, "
                             f"{', '.join(sorted({owner_stage(c) for c in d['owner_not_used']}))}; before the "
                             "split default they timed the fused kernel)")
        torch_v, repeats = env.get("torch") or "not recorded", d.get("repeats") or "repeats not recorded"
        head = (f"{env.get('cuda')}, torch {torch_v}, world {d['world']}, median of {repeats}"
                if "world" in d else f"{d.get('device')}, GPU time alone, median of {repeats}")
        out.append(f"- `{_rel(d['path'])}`: {head}, command `{d.get('command')}`"
                   + ("; " + "; ".join(extra) if extra else "") + ".")
    return out


def _spec_text(spec) -> str:
    path, codecs = parse_spec(spec)
    return _rel(path) + (":" + ",".join(codecs) if codecs else "")


def _owner_rows(k: MeasuredKernels) -> list[dict]:
    return [{"codec": c, "world": w, "owner_stage": owner_stage(c), "chunk_rows": q.tokens,
             "us": 1e6 * q.reduce_encode_s, "source": q.source}
            for (c, w), pts in sorted(k.owner.items()) for q in pts]


def _owner_table(k: MeasuredKernels) -> list[str]:
    out = ["### Two-shot's owner stage, measured (GPU time alone)", "",
           "N payloads of the owner's chunk of `chunk rows` x " + str(MODEL["hidden"]) + " decoded, summed and "
           "re-encoded, as the library runs it today: `split` = decode-and-sum into fp32, then encode (static and "
           "rot-* codecs); `fused` = one kernel (group codecs, mxfp4). Worlds and chunk sizes not in this table "
           "are priced from it by the stated rule (interpolation in the chunk rows; the bytes model "
           + "; ".join(f"{kind}: {m}" for kind, m in OWNER_MODEL.items())
           + ", from the largest world run at or below N); each priced call names its basis in the text and JSON.",
           "", "| codec | owner stage | world | chunk rows | us | file |", "|---|---|---|---|---|---|"]
    out += [f"| {r['codec']} | {r['owner_stage']} | {r['world']} | {r['chunk_rows']} | {_fmt(r['us'])} | "
            f"`{r['source']}` |" for r in _owner_rows(k)]
    out += ["", "How well that rule predicts a measured row from the next smaller world run (as TP 16-64 are "
            "priced from world 8; measured / model > 1: the model is optimistic):", "",
            "| codec | world | chunk rows | from world | measured us | model us | measured / model |",
            "|---|---|---|---|---|---|---|"]
    out += [f"| {c['codec']} | {c['world']} | {c['chunk_rows']} | {c['from_world']} | {_fmt(c['measured_us'])} | "
            f"{_fmt(c['model_us'])} | {c['measured_over_model']:.2f} |" for c in owner_check(k)]
    return out + [""]


def owner_check(k: MeasuredKernels) -> list[dict]:
    """Each measured owner-stage row against the rule's price from the next smaller world run."""
    out = []
    for (codec, w), pts in sorted(k.owner.items()):
        below = [x for c, x in k.owner if c == codec and x < w]
        if not below:
            continue
        w0 = max(below)
        scale = owner_scale(owner_stage(codec), w, w0, bytes_per_value(codec))
        for q in pts:
            model = interpolate(k.owner[(codec, w0)], q.tokens, "reduce_encode_s") * scale
            out.append({"codec": codec, "world": w, "chunk_rows": q.tokens, "from_world": w0,
                        "measured_us": 1e6 * q.reduce_encode_s, "model_us": 1e6 * model,
                        "measured_over_model": q.reduce_encode_s / model})
    return out


def _call_text(row: dict) -> str:
    return "; ".join(f"{c['calls']} x {c['op']} [{c['tokens']}, {MODEL['hidden']}] {_fmt(c['each_us'])} us "
                     f"({c['basis']})" for c in row["codec_calls"])


def write_doc(path: Path, gpu_checks: list[Path] | None = None, comm_json: Path = BENCH / "comm.json",
              timing: str = "eager", reduce_split: list | None = None, feedback_cost: list | None = None) -> dict:
    files = gpu_checks or default_gpu_checks()
    docs = [load_gpu_check(p) for p in files]
    splits = [load_reduce_split(p) for p in reduce_split or ()]
    fbs = [load_feedback_cost(p) for p in feedback_cost or ()]
    kernels = MeasuredKernels(docs, timing, splits, fbs)
    extended = bool(splits or fbs)
    gpu = project(kernels)
    cpu_speeds = load_cpu_speeds(comm_json)
    cpu = project(ThroughputKernels(cpu_speeds["cpu"]), CPU_SCHEMES)
    cpu_fast = project(ThroughputKernels(cpu_speeds["cpu-kernels"]), CPU_SCHEMES) if cpu_speeds["cpu-kernels"] else []
    schemes = schemes_for(kernels)
    missing = [s for s in SCHEMES if s not in schemes]
    failed = sorted({(c, e) for (c, w), e in kernels.failed.items() if not kernels.has(c)})
    judged = goals(gpu)
    check = honesty_check(kernels)
    gpu_name = sorted({d.get("environment", {}).get("cuda") for d in docs})
    byte_rows = []
    for label, _, _ in schemes:
        r = next(x for x in gpu if x["phase"] == "prefill" and x["scheme"] == label and x["tp"] == GOAL_TP)
        byte_rows.append(f"| {label} | {_fmt(8 * r['bytes_per_allreduce'] / (PREFILL_TOKENS * MODEL['hidden']))} | "
                         f"{_fmt(r['byte_ratio'])} |")
    lines = [
        "# Projection: compressed all-reduce for a 70B-class model on real interconnects",
        "",
        f"Generated by `{COMMAND}{'' if timing == 'eager' else ' --timing graph'}"
        f"{'' if not gpu_checks else ' --gpu-check ' + ' '.join(_spec_text(f) for f in gpu_checks)}"
        f"{'' if not splits else ' --reduce-split ' + ' '.join(_spec_text(d['spec']) for d in splits)}"
        f"{'' if not fbs else ' --feedback-cost ' + ' '.join(_spec_text(d['spec']) for d in fbs)}"
        f"{'' if timing == 'eager' and not gpu_checks else ' --out ' + _rel(path)}` (do not edit by hand; "
        "`--gpu-check FILE ...` picks other device-check "
        "files). An alpha-beta model of the links with the codec kernels' **measured** per-call times on "
        + (f"**one GPU** ({', '.join(map(str, gpu_name))}, one run of `scripts/gpu_check.py`). " if not extended else
           f"**one GPU** ({', '.join(map(str, gpu_name))}; every file below ran on it, each number's file is named "
           "beside it). ")
        + "No multi-GPU machine "
        "was lent: the link times are modelled, not measured. The measured numbers on this repository's CPU "
        "machine are in `docs/bench/e2e.md` and `docs/bench/comm.md`.",
        "",
        "Sources:",
        "",
        *_sources(docs + splits + fbs),
        f"- `{_rel(comm_json)}`: the CPU "
        "contrast (one CPU thread).",
        "",
    ]
    if missing:
        lines += ["Left out of the GPU tables (no error-free GPU row in these files, so not guessed): "
                  + ", ".join(f"{label}" for label, _, _ in missing) + "."
                  + (" Failed in the run: " + "; ".join(
                      ", ".join(f"`{c}`" for c, e2 in failed if e2 == e) + f": {e}"
                      for e in dict.fromkeys(e for _, e in failed)) + "." if failed else ""),
                  ""]
    lines += [("Kernel times: **eager**, each call timed alone, so the host's launch cost (50-100 us a call on "
               "the H100 host) is in them; `--timing graph` gives the GPU's time alone." if timing == "eager" else
               "Kernel times: **the GPU's time alone** (`--timing graph`: encode and decode-and-sum from 5 calls "
               "replayed as one CUDA graph, what a serving engine's graphs or a host running ahead would see; "
               "reduce-and-re-encode has no graph timing in gpu_check and stays eager, host cost included)."
               if not extended else
               "Kernel times: **the GPU's time alone** (`--timing graph`: gpu_check's encode and decode-and-sum "
               "from 5 calls replayed as one CUDA graph; two-shot's owner stage and, where listed, its batched "
               "chunk launches from the reduce-split and feedback-cost files, GPU time alone as well: no number "
               "in the tables below carries the host's launch cost). A call below the smallest measured shape "
               "(the decode tables' calls, two-shot's per-chunk calls) is priced at that shape's time, an upper "
               "bound of the GPU time alone."), ""]
    lines += ["## Goals of issue 8 (prefill, TP 8, communication time per forward pass)", ""]
    lines += ["| link | goal | codec path | best scheme | speed-up vs bf16 all-reduce | met |",
              "|---|---|---|---|---|---|"]
    for g in judged:
        met = "met in the model" if g["met"] else "not met"
        path_text = g["path"] if not (extended and g["path"] == BATCHED_NOTE) else (
            "batched launches: measured (feedback-cost file) where it has that codec, TP and size, else modelled")
        lines.append(f"| {g['link']} | {g['goal']} | {path_text} | {g['scheme']} | {g['comm_speedup']:.2f}x | "
                     f"{met} |")
    lines += [""]
    for g in judged:
        r = g["row"]
        base = next(x for x in gpu if x["phase"] == "prefill" and x["link"] == g["link"] and x["tp"] == GOAL_TP
                    and x["scheme"] == SCHEMES[0][0])
        batched = g["path"] != PER_CHUNK
        lean = min((x for x in gpu if x["phase"] == "prefill" and x["link"] == g["link"] and x["tp"] == GOAL_TP
                    and x["scheme"] != SCHEMES[0][0] and x["scheme"].endswith(BATCHED) == batched),
                   key=lambda x: x["wire_us"])
        budget = [f"{x['scheme']} " + (f"{_fmt(b)} us" if (b := base['allreduce_us'] / g['need'] - x['wire_us']) > 0
                                        else "none (its wire time alone misses the goal)")
                  + f" (modelled {_fmt(x['codec_us'])})"
                  for x in ([r] if lean is r else [r, lean])]
        lines.append(f"- {g['link']}: bf16 all-reduce {_fmt(base['allreduce_us'])} us per call; {r['scheme']} "
                     f"{_fmt(r['allreduce_us'])} us = wire {_fmt(r['wire_us'])} + codec {_fmt(r['codec_us'])} "
                     f"({_call_text(r)}). Codec time per call that would meet the goal (bf16 time / "
                     f"{g['need']} - wire): " + "; ".join(budget) + ".")
    lines += [
        "",
        "Anchor: vLLM's QuickReduce (ROCm) reports up to 2.25x over RCCL for its Q4 (int4 with an absmax scale "
        "per 32 values, 4.5 bits, two-shot with re-quantization) on MI300X; `int4-g32 two-shot` is the same wire "
        "format class here (4.5 bits/value), so its rows below are the ones to hold against that figure. With "
        "codec work not overlapped, a compressed all-reduce wins only where its codec time is below the wire "
        "time it saves.",
        "",
        *(_with_feedback(judged, fbs) if extended else []),
        "## Measured kernel times (the input)",
        "",
        "Per call at [tokens, " + str(MODEL["hidden"]) + "], microseconds; decode-and-sum and reduce-and-re-encode "
        "take `world` payloads; the fractions count the bytes each kernel reads and writes against a same-size "
        "fp32 copy in the same run (as `gpu_check.md` does" + ("; with `--timing graph`, the copy's graph time"
                                                               if timing == "graph" else "") + ").",
        "",
        *_kernel_table(kernels),
        "",
        *(_owner_table(kernels) if extended else []),
        f"### How well the bytes model predicts the measured rows of another world (from the world-{BASE_WORLD} rows)",
        "",
        "measured / model > 1: the model is optimistic. Rows of worlds other than 2 are used as measured where "
        "the table above has them; the model fills the other degrees. The encode rows compare the same kernel "
        "measured in the two runs (run-to-run spread).",
        "",
        "| codec | world | tokens | call | measured us | model us | measured / model |",
        "|---|---|---|---|---|---|---|",
        *[f"| {c['codec']} | {c['world']} | {c['tokens']} | {c['op']} | {_fmt(c['measured_us'])} | "
          f"{_fmt(c['model_us'])} | {c['measured_over_model']:.2f} |" for c in check],
        "",
        "## Assumptions",
        "",
        *[f"- {a}" for a in _assumptions(extended)],
        "",
        f"## Bytes each rank sends per all-reduce, TP {GOAL_TP}, prefill",
        "",
        "bits/value = bytes sent per rank * 8 / values in the partial (so the gather row includes the "
        "(N-1) copies); ratio = bf16 all-reduce bytes / scheme bytes (gather sends N-1 payloads against a "
        "ring's 2(N-1)/N, so it only saves bytes below TP 8).",
        "",
        "| scheme | bits sent per value | byte ratio vs bf16 all-reduce |",
        "|---|---|---|",
        *byte_rows,
        "",
    ]
    for phase, desc in (("prefill", f"{PREFILL_TOKENS} tokens, batch 1"), ("decode", f"batch {DECODE_BATCH}, 1 token")):
        lines += [
            f"## {phase.capitalize()} ({desc}), measured GPU kernels",
            "",
            "All-reduce time per call, microseconds:",
            "",
            _grid(gpu, phase, "allreduce_us", schemes),
            "",
            "Codec work in it, microseconds per call (the same on every link; the rest is wire):",
            "",
            _codec_grid(gpu, phase, schemes[1:]),
            "",
            "Communication speed-up over bf16 all-reduce, whole forward pass (>1 = compression wins):",
            "",
            _grid(gpu, phase, "comm_speedup", schemes[1:]),
            "",
            "End-to-end speed-up of one forward pass (compute + communication, no overlap):",
            "",
            _grid(gpu, phase, "pass_speedup", schemes[1:]),
            "",
        ]
    cpu_schemes = tuple(s for s in CPU_SCHEMES if s[2] == "allreduce" or s[1] in cpu_speeds["cpu"])
    fast_schemes = tuple(s for s in CPU_SCHEMES if s[2] == "allreduce" or s[1] in cpu_speeds["cpu-kernels"])
    lines += [
        "## Contrast: the same projection with the codecs running on one CPU thread",
        "",
        "Communication speed-up over bf16 all-reduce, prefill, with `docs/bench/comm.json` codec throughput "
        "of the eager PyTorch reference (`backend=\"reference\"`): the codec, not the wire, becomes the "
        "bottleneck on every link.",
        "",
        _grid(cpu, "prefill", "comm_speedup", cpu_schemes[1:]),
        "",
        *(["The same with the compiled CPU kernels (`lowbit_tp/kernels/cpu_kernels.cpp`, `backend=\"cpu\"`, "
           "measured in the same `bench-comm` run; decode speed from their decode-and-sum):",
           "",
           _grid(cpu_fast, "prefill", "comm_speedup", fast_schemes[1:]),
           ""] if cpu_fast else []),
        "## Reading it (measured GPU kernels)",
        "",
        *_summary(gpu),
        "",
    ]
    path.write_text("\n".join(lines))
    result = {"command": COMMAND, "sources": [_rel(d["path"]) for d in docs + splits + fbs] + [_rel(comm_json)],
              "assumptions": _assumptions(extended), "model": MODEL, "links": LINKS,
              "gpu": GPU,
              "goals": [{k: v for k, v in g.items() if k != "row"} for g in judged],
              "bytes_model_check": check, "rows_gpu_codec": gpu, "rows_cpu_codec": cpu, "rows_cpu_kernels": cpu_fast}
    if extended:
        result["command_line"] = lines[2].split("`")[1]
        result["owner_stage"] = _owner_rows(kernels)
        result["owner_stage_model_check"] = owner_check(kernels)
    path.with_suffix(".json").write_text(json_text(result, indent=1))
    return result


def _summary(rows: list[dict]) -> list[str]:
    """Sentences computed from the rows, so the prose cannot drift from the tables."""
    out = []
    for phase in ("prefill", "decode"):
        for link in LINKS:
            top = {tp: best(rows, phase, link, tp) for tp in TPS}  # the per-chunk rows
            wins = [tp for tp in TPS if top[tp]["comm_speedup"] > 1.0]
            desc = ", ".join(f"TP {tp}: {top[tp]['scheme']} {top[tp]['comm_speedup']:.2f}x comm / "
                             f"{top[tp]['pass_speedup']:.2f}x pass" for tp in TPS)
            verdict = (f"compression wins at TP {', '.join(map(str, wins))}" if wins
                       else "compression never beats bf16 all-reduce")
            out.append(f"- {phase}, {link}: {verdict}. Best scheme per TP: {desc}.")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "projection.md"))
    ap.add_argument("--gpu-check", nargs="+", default=None,
                    help="device-check JSONs of scripts/gpu_check.py, one per world (default: the rule of the "
                         "module docstring)")
    ap.add_argument("--comm-json", type=Path, default=BENCH / "comm.json", help="bench-comm JSON for the CPU contrast")
    ap.add_argument("--timing", choices=TIMINGS, default="eager",
                    help="eager: per-call times with the host's launch cost; graph: the GPU's time alone")
    ap.add_argument("--reduce-split", nargs="+", default=None,
                    help="scripts/gpu_reduce_split.py JSONs: two-shot's owner stage (split), GPU time alone "
                         "(needs --timing graph); FILE:codec,... reads only those codecs")
    ap.add_argument("--feedback-cost", nargs="+", default=None,
                    help="scripts/gpu_feedback_cost.py JSONs: the plain two-shot stages (owner stage of the fused "
                         "codecs, batched chunk launches), GPU time alone (needs --timing graph)")
    ap.add_argument("--inputs", choices=sorted(PRESETS), default=None,
                    help="a named set of input files (sets --timing graph and the file lists; see PRESETS)")
    args = ap.parse_args(argv)
    if args.inputs:
        preset = PRESETS[args.inputs]
        args.timing, args.gpu_check = "graph", [f"{ROOT}/{f}" for f in preset["gpu_check"]]
        args.reduce_split = [f"{ROOT}/{f}" for f in preset["reduce_split"]]
        args.feedback_cost = [f"{ROOT}/{f}" for f in preset["feedback_cost"]]
    try:
        res = write_doc(Path(args.out), args.gpu_check, args.comm_json, args.timing, args.reduce_split,
                        args.feedback_cost)
    except ProjectionInputError as exc:
        sys.exit(f"projection: {exc}")
    print(f"wrote {args.out} from {', '.join(res['sources'])}")


if __name__ == "__main__":
    main()
