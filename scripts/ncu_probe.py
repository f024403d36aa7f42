"""Hardware counters of the codec kernels (Nsight Compute), for finding what bounds a kernel.

Builds each codec on a synthetic calibration (world 2, E = 8192), encodes the message and
decodes-and-sums two payloads once to compile and warm up, then runs encode and decode_sum
once more between ``cudaProfilerStart``/``Stop``, so that only those launches are profiled:

    ncu --profile-from-start off --set full --csv --page details \\
        python3 scripts/ncu_probe.py --tokens 8192 > ncu.csv

Without ncu it just runs (a smoke test of the driver: ``--device cpu`` under the interpreter).
``--summarize ncu.csv --out FILE.md`` turns that CSV into a table of the counters that say what
bounds each kernel (duration, DRAM and SM throughput, registers, occupancy, cache hit rates).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path


COUNTERS = ("Duration", "DRAM Throughput", "Compute (SM) Throughput", "Mem Busy", "Issue Slots Busy",
            "Registers Per Thread", "Theoretical Occupancy", "Achieved Occupancy", "L1/TEX Hit Rate", "L2 Hit Rate")


def summarize(csv_path: str, out: str) -> None:
    """Markdown table of :data:`COUNTERS` per profiled kernel, in launch order, from ncu's
    ``--csv --page details`` output (lines that are not CSV, the driver's own prints, are skipped)."""
    import csv
    import io

    lines = [ln for ln in open(csv_path) if ln.startswith('"')]
    kernels: dict[str, dict] = {}
    for r in csv.DictReader(io.StringIO("".join(lines))):
        k = kernels.setdefault(r["ID"], {"kernel": r["Kernel Name"].split("(")[0], "block": r["Block Size"],
                                         "grid": r["Grid Size"]})
        if r["Metric Name"] in COUNTERS:
            k[r["Metric Name"]] = f"{r['Metric Value']} {r['Metric Unit']}".strip()
    head = ["id", "kernel", "block", "grid", *COUNTERS]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows += ["| " + " | ".join([i] + [str(k.get(c, "")) for c in head[1:]]) + " |" for i, k in kernels.items()]
    order = [ln.strip()[len("profiled: "):] for ln in open(csv_path) if ln.startswith("profiled: ")]
    Path(out).write_text(f"Nsight Compute counters from `{csv_path}` (`scripts/ncu_probe.py --summarize`). "
                         "Launch order (two kernels each, encode then decode-and-sum): " + "; ".join(order)
                         + "\n\n" + "\n".join(rows) + "\n")
    print(f"wrote {out}: {len(kernels)} kernels")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--summarize", metavar="CSV", help="write --out (markdown) from an ncu CSV and exit")
    ap.add_argument("--out", help="markdown file for --summarize")
    ap.add_argument("--codecs", default="int4-outlier,int4,rot-lm4-g64-lg8-k4,rot-int6-g64-lg8-k4,int4-g32")
    ap.add_argument("--tokens", type=int, default=None, help="default 8192 (cpu: 3)")
    ap.add_argument("--hidden", type=int, default=None, help="default 8192 (cpu: 128)")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = ap.parse_args(argv)
    if args.summarize:
        if not args.out:
            ap.error("--summarize needs --out")
        return summarize(args.summarize, args.out)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from lowbit_tp.calibration.synthetic import planted_partials, synthetic_calibration
    from lowbit_tp.codecs import make_codec

    dev = torch.device(args.device)
    dry = dev.type == "cpu"
    t = args.tokens or (3 if dry else 8192)
    e = args.hidden or (128 if dry else 8192)
    cal = synthetic_calibration(["L"], world=args.world, hidden=e, tokens=64, batches=1)
    xs = [v.to(dev) for v in planted_partials(args.world, t, e, seed=0, noise_seed=4)]
    jobs = []
    for name in [c for c in args.codecs.split(",") if c]:
        codec = make_codec(name, calibration=cal, nonfinite="flag", backend="triton")
        payloads = [codec.encode(x, layer="L", source=r) for r, x in enumerate(xs)]
        pbuf, sbuf = torch.empty_like(payloads[0]), torch.empty(t, e, dtype=torch.float32, device=dev)
        jobs.append((name, lambda c=codec, p=pbuf: c.encode(xs[0], layer="L", source=0, out=p),
                     lambda c=codec, p=payloads, s=sbuf: c.decode_sum(p, (t, e), layer="L", out=s)))
    for _, enc, dec in jobs:  # compile and warm up outside the profiled range
        enc(), dec()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    for name, enc, dec in jobs:
        print(f"profiled: {name} encode, decode_sum [{t}, {e}] world {args.world}", flush=True)
        enc(), dec()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
