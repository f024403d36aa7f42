"""GPU check (run on a CUDA machine): the wire format is device-independent, and codec speed.

For every codec, payloads encoded on the GPU must equal those encoded on the CPU byte for
byte, and decoding must agree bitwise; then encode/decode throughput is timed with CUDA
events. Writes JSON + markdown to --out (a directory).

    PYTHONPATH=. python3 scripts/gpu_check.py --out results/
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lowbit_tp.bench.common import environment, markdown_table
from lowbit_tp.calibration.synthetic import planted_partials, synthetic_calibration
from lowbit_tp.codecs import list_codecs, make_codec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=8192)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    dev = torch.device("cuda")
    cal = synthetic_calibration(["L"], world=1, hidden=args.hidden, tokens=256, batches=1)
    rows = []
    for name in list_codecs():
        codec = make_codec(name, calibration=cal, nonfinite="propagate")
        # Agreement on a modest tensor with NaN/Inf planted (propagate mode).
        x = planted_partials(1, 257, args.hidden, seed=0, noise_seed=3)[0]
        x[3, 5], x[100, 77] = float("nan"), float("-inf")
        p_cpu = codec.encode(x, layer="L", source=0)
        p_gpu = codec.encode(x.to(dev), layer="L", source=0)
        same_bytes = torch.equal(p_cpu, p_gpu.cpu())
        diff = (p_cpu != p_gpu.cpu()).nonzero().reshape(-1)[:4].tolist()
        clean = planted_partials(1, 257, args.hidden, seed=0, noise_seed=5)[0]
        same_finite = torch.equal(codec.encode(clean, layer="L", source=0),
                                  codec.encode(clean.to(dev), layer="L", source=0).cpu())
        y_cpu = codec.decode(p_cpu, tuple(x.shape), layer="L", source=0)
        y_gpu = codec.decode(p_cpu.to(dev), tuple(x.shape), layer="L", source=0).cpu()
        same_values = torch.equal(torch.nan_to_num(y_cpu, nan=1234.5), torch.nan_to_num(y_gpu, nan=1234.5))
        # Throughput on a big tensor.
        big = planted_partials(1, args.tokens, args.hidden, seed=0, noise_seed=4)[0].to(dev)
        payload = codec.encode(big, layer="L", source=0)

        def timeit(fn, reps=20):
            for _ in range(3):
                fn()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times = []
            for _ in range(reps):
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            return sorted(times)[len(times) // 2]

        te = timeit(lambda: codec.encode(big, layer="L", source=0))
        td = timeit(lambda: codec.decode(payload, tuple(big.shape), layer="L", source=0))
        gb = big.numel() * 4 / 1e9
        rows.append({"codec": name, "payload_equal_finite": same_finite, "payload_equal_with_nan_inf": same_bytes,
                     "first_differing_bytes": diff, "decoded_equal_cpu_gpu": same_values,
                     "bits_per_value": 8 * payload.numel() / big.numel(), "encode_gbps": gb / te,
                     "decode_gbps": gb / td})
        print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps({"environment": environment(), "shape": [args.tokens, args.hidden],
                                                    "rows": rows}, indent=2))
    (out / "gpu_check.md").write_text(markdown_table(rows, list(rows[0])) + "\n")


if __name__ == "__main__":
    main()
