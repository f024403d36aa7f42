"""Project the all-reduce time of a 70B-class model under TP onto real interconnects.

    python scripts/projection.py            # writes docs/projection.md (and docs/projection.json)

An alpha-beta model (per-step latency alpha, link bandwidth beta) per interconnect and TP
degree, for the bf16 all-reduce all-reduce against the compressed collectives. Bytes come from the
codecs' own ``payload_nbytes`` (the library's wire format), codec speed from the measured
throughputs in ``docs/bench/gpu_check.json`` (H200) and ``docs/bench/comm.json`` (one CPU
thread). Every assumption is a constant below and is printed into the document.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------- assumptions
MODEL = {"name": "Llama-2-70B-like", "hidden": 8192, "layers": 80, "allreduces_per_layer": 2,
         "params": 70e9}
TPS = (2, 4, 8, 16, 32, 64)
PREFILL_TOKENS = 2048  # one sequence
DECODE_BATCH = 32  # sequences, one new token each per step
ACT_BYTES = 2  # the partials are bf16 on a GPU

# name -> (bandwidth per GPU per direction in bytes/s, latency per communication step in s)
LINKS = {
    "NVLink (H100/H200, 450 GB/s)": (450e9, 3e-6),
    "400 Gb InfiniBand (45 GB/s)": (45e9, 5e-6),
    "PCIe Gen5 x16 (50 GB/s)": (50e9, 8e-6),
    "100 GbE (11 GB/s)": (11e9, 15e-6),
}

# Compute per forward pass, to put communication in proportion (no overlap assumed).
GPU = {"name": "H100-class", "bf16_flops": 989e12, "mfu_prefill": 0.5, "hbm_bytes_per_s": 3.35e12,
       "mbu_decode": 0.7}

# A hypothetical fused encode/decode kernel bound by HBM bandwidth: ~3 bytes touched per value
# (2 B bf16 in or out, ~0.5 B payload, plus scale/outlier traffic) at 4.8 TB/s (H200 HBM3e).
FUSED_VALUES_PER_S = 4.8e12 / 3

# (label, codec, algorithm); the first is the baseline.
SCHEMES = (
    ("bf16 all-reduce", "bf16", "allreduce"),
    ("int4-outlier gather", "int4-outlier", "gather"),
    ("int4-outlier two-shot", "int4-outlier", "two-shot"),
    ("int4-g32 two-shot", "int4-g32", "two-shot"),
)

ASSUMPTIONS = [
    f"Model: {MODEL['name']}, hidden {MODEL['hidden']}, {MODEL['layers']} layers, "
    f"{MODEL['allreduces_per_layer']} all-reduces per layer (after o_proj and down_proj); "
    f"partials are bf16 ({ACT_BYTES} bytes/value) on the GPU.",
    f"Prefill: one sequence of {PREFILL_TOKENS} tokens, so each all-reduce moves [{PREFILL_TOKENS}, "
    f"{MODEL['hidden']}]. Decode: a batch of {DECODE_BATCH} sequences, one token each, [{DECODE_BATCH}, "
    f"{MODEL['hidden']}] per all-reduce.",
    "Network: every GPU has one link of the stated bandwidth per direction (full duplex) and the "
    "fabric is non-blocking (no contention except at the GPU's own link). This flatters PCIe beyond a "
    "single switch and 100 GbE / InfiniBand beyond one rail; NVLink at TP > 8 assumes an NVL72-style "
    "NVLink domain.",
    "Latency alpha is paid once per communication step, and every collective phase takes "
    "L = ceil(log2 N) steps (recursive halving/doubling, what NCCL-like libraries approach with trees for "
    "small messages), while bytes are those of the ring (bandwidth-optimal). Alpha: " + "; ".join(
        f"{k}: {v[1] * 1e6:.0f} us" for k, v in LINKS.items()) + ". These are typical small-message "
    "per-hop costs of NCCL-like libraries, not measurements.",
    "bf16 all-reduce (baseline): the faster of reduce-scatter + all-gather, 2L*alpha + 2(N-1)/N * M * 2 B "
    "/ bw, and recursive doubling on the whole vector, L*alpha + L * M * 2 B / bw (wins for tiny messages). "
    "No codec work.",
    "gather (the seed collective): all-gather of every rank's payload P: L*alpha + (N-1)*P / bw; "
    "codec work: encode M values, decode N*M values (every partial) and sum.",
    "two-shot: all-to-all of the N payload chunks + all-gather of the re-quantized reduced chunk, each "
    "rank sending (N-1) chunk payloads P_c per phase: 2L*alpha + 2(N-1) * P_c / bw; codec work: encode "
    "M + M/N values, decode M(N-1)/N + M values.",
    "Payload bytes P come from each codec's payload_nbytes (the actual wire format, metadata included); "
    "two-shot chunk payloads are payload_nbytes of [ceil(tokens/N), hidden].",
    "Codec time = values / throughput, with throughput in values/s from the measured encode/decode GB/s "
    "of fp32 input (GB/s * 1e9 / 4): the GPU table uses docs/bench/gpu_check.json (H200, unfused "
    "PyTorch ops, one stream, measured in an earlier session: no GPU was lent in the session that added the "
    "Triton and CPU kernels, so the GPU tables keep these unfused numbers), the CPU contrast uses "
    "docs/bench/comm.json codec_speed (one CPU thread, eager reference and compiled CPU kernels). "
    "Codec work is not overlapped with the transfer (pessimistic for a fused/pipelined kernel).",
    f"Compute (for the end-to-end column): prefill = 2 * params * tokens / (N * {GPU['bf16_flops'] / 1e12:.0f} "
    f"TFLOP/s * MFU {GPU['mfu_prefill']}); decode = weights (2 B/param) / (N * {GPU['hbm_bytes_per_s'] / 1e12:.2f} "
    f"TB/s * {GPU['mbu_decode']}) per step ({GPU['name']}); attention and KV-cache traffic ignored; no "
    f"overlap of compute and communication.",
    f"Fused-kernel scenario (last tables): encode and decode at {FUSED_VALUES_PER_S / 1e12:.1f}e12 values/s, "
    "an HBM-bandwidth bound (4.8 TB/s H200 HBM3e / ~3 bytes touched per value); an assumption, not a "
    "measurement: the Triton kernels (docs/kernels.md) have not been timed on a GPU yet.",
    "Not modelled: the two-shot re-quantization error (needs sum scales), message-size fallback to exact, "
    "kernel launch overheads beyond alpha, PCIe/NIC protocol overheads beyond the effective bandwidths given.",
]


# ----------------------------------------------------------------- the model
@functools.lru_cache(maxsize=None)
def _codec(name: str):
    from lowbit_tp.calibration.synthetic import synthetic_calibration
    from lowbit_tp.codecs import make_codec

    # payload_nbytes depends only on the shape; static codecs still want a calibration object
    cal = synthetic_calibration(["L"], world=1, hidden=MODEL["hidden"], tokens=8, batches=1)
    return make_codec(name, calibration=cal)


def _cpu_speed(r: dict) -> dict[str, float]:
    """values/s of one CPU codec-speed row; decoding from its decode-and-sum time when measured
    (``world`` payloads decoded and summed per ``numel`` values of output)."""
    dec = r["decode_sum_gbps"] * r["world"] if "decode_sum_gbps" in r else r["decode_gbps"]
    return {"encode": r["encode_gbps"] * 1e9 / 4, "decode": dec * 1e9 / 4}


def load_speeds() -> dict[str, dict[str, dict[str, float]]]:
    """{"gpu"|"cpu"|"cpu-kernels"|"fused": {codec: {"encode": values/s, "decode": values/s}}}.

    ``gpu``: docs/bench/gpu_check.json (H200, unfused PyTorch); ``cpu``: the eager reference
    on one CPU thread and ``cpu-kernels``: the compiled CPU kernels, both from
    docs/bench/comm.json codec_speed; ``fused``: the assumed HBM-bound GPU kernel.
    """
    gpu = json.loads((ROOT / "docs/bench/gpu_check.json").read_text())["rows"]
    cpu = json.loads((ROOT / "docs/bench/comm.json").read_text())["codec_speed"]
    conv = lambda rows: {r["codec"]: {"encode": r["encode_gbps"] * 1e9 / 4, "decode": r["decode_gbps"] * 1e9 / 4}
                         for r in rows}
    fused = {r["codec"]: {"encode": FUSED_VALUES_PER_S, "decode": FUSED_VALUES_PER_S} for r in gpu}
    ref = {r["codec"]: _cpu_speed(r) for r in cpu if r.get("backend", "reference") == "reference"}
    fast = {r["codec"]: _cpu_speed(r) for r in cpu if r.get("backend") == "cpu"}
    return {"gpu": conv(gpu), "cpu": ref, "cpu-kernels": fast, "fused": fused}


def allreduce_time(codec_name: str, algorithm: str, *, tokens: int, tp: int, link: tuple[float, float],
                   speed: dict[str, float] | None) -> dict[str, float]:
    """Seconds of one all-reduce of [tokens, hidden] over ``tp`` ranks: wire, codec, total."""
    bw, alpha = link
    e = MODEL["hidden"]
    m = tokens * e
    n = tp
    steps = math.ceil(math.log2(n))
    if algorithm == "allreduce":
        options = [(2 * steps * alpha + 2 * (n - 1) / n * m * ACT_BYTES / bw, 2 * (n - 1) / n * m * ACT_BYTES),
                   (steps * alpha + steps * m * ACT_BYTES / bw, steps * m * ACT_BYTES)]
        wire, sent = min(options)
        return {"wire_s": wire, "codec_s": 0.0, "total_s": wire, "bytes_sent": sent}
    codec = _codec(codec_name)
    if algorithm == "gather":
        p = codec.payload_nbytes((tokens, e))
        sent = (n - 1) * p
        wire = steps * alpha + sent / bw
        enc, dec = m, n * m
    elif algorithm == "two-shot":
        rows = -(-tokens // n)
        p_chunk = codec.payload_nbytes((rows, e))
        sent = 2 * (n - 1) * p_chunk
        wire = 2 * steps * alpha + sent / bw
        enc, dec = m + rows * e, (n - 1) * rows * e + m
    else:
        raise ValueError(algorithm)
    codec_s = enc / speed["encode"] + dec / speed["decode"]
    return {"wire_s": wire, "codec_s": codec_s, "total_s": wire + codec_s, "bytes_sent": sent}


def compute_time(phase: str, tp: int) -> float:
    if phase == "prefill":
        return 2 * MODEL["params"] * PREFILL_TOKENS / (tp * GPU["bf16_flops"] * GPU["mfu_prefill"])
    return 2 * MODEL["params"] / (tp * GPU["hbm_bytes_per_s"] * GPU["mbu_decode"])


def project(device: str = "gpu") -> list[dict]:
    speeds = load_speeds()[device]
    per_pass = MODEL["layers"] * MODEL["allreduces_per_layer"]
    rows = []
    for phase, tokens in (("prefill", PREFILL_TOKENS), ("decode", DECODE_BATCH)):
        for link_name, link in LINKS.items():
            for tp in TPS:
                base = None
                for label, codec, algo in SCHEMES:
                    t = allreduce_time(codec, algo, tokens=tokens, tp=tp, link=link,
                                       speed=None if algo == "allreduce" else speeds[codec])
                    comm = per_pass * t["total_s"]
                    comp = compute_time(phase, tp)
                    row = {"phase": phase, "link": link_name, "tp": tp, "scheme": label,
                           "bytes_per_allreduce": t["bytes_sent"], "allreduce_us": 1e6 * t["total_s"],
                           "wire_us": 1e6 * t["wire_s"], "codec_us": 1e6 * t["codec_s"],
                           "comm_ms_per_pass": 1e3 * comm, "compute_ms_per_pass": 1e3 * comp,
                           "pass_ms": 1e3 * (comm + comp)}
                    if base is None:
                        base = row
                    row["byte_ratio"] = base["bytes_per_allreduce"] / row["bytes_per_allreduce"]
                    row["comm_speedup"] = base["comm_ms_per_pass"] / row["comm_ms_per_pass"]
                    row["pass_speedup"] = base["pass_ms"] / row["pass_ms"]
                    rows.append(row)
    return rows


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


def write_doc(path: Path) -> None:
    gpu, cpu, fused = project("gpu"), project("cpu"), project("fused")
    have_fast = all(c in load_speeds()["cpu-kernels"] for _, c, a in SCHEMES if a != "allreduce")
    cpu_fast = project("cpu-kernels") if have_fast else []
    byte_rows = []
    for label, codec, algo in SCHEMES:
        r = next(x for x in gpu if x["phase"] == "prefill" and x["scheme"] == label and x["tp"] == 8)
        byte_rows.append(f"| {label} | {_fmt(8 * r['bytes_per_allreduce'] / (PREFILL_TOKENS * MODEL['hidden']))} | "
                         f"{_fmt(r['byte_ratio'])} |")
    lines = [
        "# Projection: compressed all-reduce for a 70B-class model on real interconnects",
        "",
        "Generated by `python scripts/projection.py` (do not edit by hand). An alpha-beta model, not a "
        "measurement: it says where compression can pay off and where it cannot. The measured numbers "
        "on this repository's CPU machine are in `docs/bench/e2e.md` and `docs/bench/comm.md`.",
        "",
        "## Assumptions",
        "",
        *[f"- {a}" for a in ASSUMPTIONS],
        "",
        "## Bytes each rank sends per all-reduce, TP 8, prefill",
        "",
        "bits/value = bytes sent per rank * 8 / values in the partial (so the gather row includes the "
        "(N-1) copies); ratio = bf16 all-reduce bytes / scheme bytes (gather sends N-1 payloads against a ring's 2(N-1)/N, so it only saves bytes "
        "below TP 8).",
        "",
        "| scheme | bits sent per value | byte ratio vs bf16 all-reduce |",
        "|---|---|---|",
        *byte_rows,
        "",
    ]
    for phase, desc in (("prefill", f"{PREFILL_TOKENS} tokens, batch 1"), ("decode", f"batch {DECODE_BATCH}, 1 token")):
        lines += [
            f"## {phase.capitalize()} ({desc})",
            "",
            "All-reduce time per call, microseconds (H200 codec throughput):",
            "",
            _grid(gpu, phase, "allreduce_us", SCHEMES),
            "",
            "Communication speed-up over bf16 all-reduce, whole forward pass (>1 = compression wins):",
            "",
            _grid(gpu, phase, "comm_speedup", SCHEMES[1:]),
            "",
            "End-to-end speed-up of one forward pass (compute + communication, no overlap):",
            "",
            _grid(gpu, phase, "pass_speedup", SCHEMES[1:]),
            "",
        ]
    lines += [
        "## Contrast: the same projection with the codecs running on one CPU thread",
        "",
        "Communication speed-up over bf16 all-reduce, prefill, with `docs/bench/comm.json` codec throughput "
        "of the eager PyTorch reference (`backend=\"reference\"`): the codec, not the wire, becomes the "
        "bottleneck on every link.",
        "",
        _grid(cpu, "prefill", "comm_speedup", SCHEMES[1:]),
        "",
        *(["The same with the compiled CPU kernels (`lowbit_tp/kernels/cpu_kernels.cpp`, `backend=\"cpu\"`, "
            "measured in the same `bench-comm` run; decode speed from their decode-and-sum):",
            "",
            _grid(cpu_fast, "prefill", "comm_speedup", SCHEMES[1:]),
            ""] if cpu_fast else []),
        "## Scenario: a fused, HBM-bound codec kernel",
        "",
        "Communication speed-up over bf16 all-reduce with codec work at the assumed fused-kernel rate, prefill:",
        "",
        _grid(fused, "prefill", "comm_speedup", SCHEMES[1:]),
        "",
        "Decode:",
        "",
        _grid(fused, "decode", "comm_speedup", SCHEMES[1:]),
        "",
        "## Reading it (measured H200 codec throughput)",
        "",
        *_summary(gpu),
        "",
        "With the fused-kernel assumption instead:",
        "",
        *_summary(fused),
        "",
    ]
    path.write_text("\n".join(lines))
    path.with_suffix(".json").write_text(json.dumps({"assumptions": ASSUMPTIONS, "model": MODEL, "links": LINKS,
                                                     "gpu": GPU, "rows_gpu_codec": gpu, "rows_cpu_codec": cpu,
                                                     "rows_cpu_kernels": cpu_fast, "rows_fused_codec": fused},
                                                    indent=1))


def _summary(rows: list[dict]) -> list[str]:
    """Sentences computed from the rows, so the prose cannot drift from the tables."""
    out = []
    for phase in ("prefill", "decode"):
        for link in LINKS:
            best = {}
            for tp in TPS:
                cand = [r for r in rows if r["phase"] == phase and r["link"] == link and r["tp"] == tp
                        and r["scheme"] != SCHEMES[0][0]]
                top = max(cand, key=lambda r: r["comm_speedup"])
                best[tp] = top
            wins = [tp for tp in TPS if best[tp]["comm_speedup"] > 1.0]
            desc = ", ".join(f"TP {tp}: {best[tp]['scheme']} {best[tp]['comm_speedup']:.2f}x comm / "
                             f"{best[tp]['pass_speedup']:.2f}x pass" for tp in TPS)
            verdict = (f"compression wins at TP {', '.join(map(str, wins))}" if wins
                       else "compression never beats bf16 all-reduce")
            out.append(f"- {phase}, {link}: {verdict}. Best scheme per TP: {desc}.")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(ROOT / "docs" / "projection.md"))
    args = ap.parse_args()
    write_doc(Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
