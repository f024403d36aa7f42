"""Two-shot's owner stage on one GPU: the fused reduce-encode kernel against decode-and-sum then encode.

For the static codecs (``lowbit_tp.kernels.triton_static``) and the ``rot-*`` codecs
(``triton_rotation``), ``Codec.reduce_encode`` runs either one fused kernel (``REDUCE_VARIANT =
"fused"``: the N payloads read once, the fp32 sum never in memory) or the codec's decode-and-sum
into an fp32 buffer followed by its encode (``"split"``). Per codec, world N and token count T
(the owner's chunk is ``chunk_rows(T, N)`` rows of the hidden size):

* ``equal``: the two variants' payloads are the same bytes, and equal to the reference backend's
  ``encode(decode_sum(...))`` on the CPU (a clean chunk);
* ``fused_us`` / ``split_us``: GPU time alone (5 calls captured in one CUDA graph, median of
  ``--repeats`` replays), and ``copy_us``, a same-size fp32 copy of the chunk in the same process;
  ``split_over_fused`` = split_us / fused_us (below 1: split is faster).

    PYTHONPATH=. python3 scripts/gpu_reduce_split.py --out DIR                       # GPU
    PYTHONPATH=. python3 scripts/gpu_reduce_split.py --device cpu --out /tmp/rs_dry  # dry run, interpreter

Writes ``DIR/gpu_reduce_split.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from lowbit_tp.bench.device_script import command_line, device_name, open_device, parse_shapes, write_json

CODECS = ["int4-outlier", "int8", "int4", "rot-lm4-g64-lg8-k4", "rot-int6-g64-lg8-k4"]
LAYER = "L"
COLUMNS = ["codec", "world", "tokens", "hidden", "chunk_rows", "equal", "copy_us", "fused_us", "split_us",
           "split_over_fused", "error"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu = dry run under TRITON_INTERPRET=1 on tiny shapes (checks the script, not speed)")
    ap.add_argument("--shapes", default=None, help="TxE list (default 2048x8192,8192x8192; cpu 7x96)")
    ap.add_argument("--worlds", default="2,3,4,8")
    ap.add_argument("--codecs", default=",".join(CODECS))
    ap.add_argument("--repeats", type=int, default=None, help="timed replays per measurement (default 10; cpu 1)")
    ap.add_argument("--budget-s", type=float, default=None, help="start no new row after this many seconds")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    dry = args.device == "cpu"
    dev = open_device("gpu_reduce_split", args.device)  # TRITON_INTERPRET before any kernel import
    import torch

    from lowbit_tp.bench.common import device_seconds
    from lowbit_tp.calibration.synthetic import planted_partials, synthetic_calibration
    from lowbit_tp.codecs import make_codec
    from lowbit_tp.collectives.algorithms import chunk_rows
    from lowbit_tp.kernels import triton_rotation, triton_static

    shapes = parse_shapes(args.shapes or ("7x96" if dry else "2048x8192,8192x8192"))
    repeats = args.repeats or (1 if dry else 10)

    def timed(fn) -> float:
        return device_seconds(fn, dev, repeats=repeats)

    rows, t0 = [], time.time()
    for world in (int(w) for w in args.worlds.split(",")):
        for name in [c for c in args.codecs.split(",") if c]:
            K = triton_rotation if name.startswith("rot-") else triton_static
            for t, e in shapes:
                r = chunk_rows(t, world)
                row = {"codec": name, "world": world, "tokens": t, "hidden": e, "chunk_rows": r}
                rows.append(row)
                if args.budget_s is not None and time.time() - t0 > args.budget_s:
                    row["error"] = "skipped: budget"
                    continue
                saved = K.REDUCE_VARIANT
                try:
                    cal = synthetic_calibration([LAYER], world=world, hidden=e, tokens=64, batches=1)
                    tri = make_codec(name, calibration=cal, nonfinite="propagate", backend="triton")
                    ref = make_codec(name, calibration=cal, nonfinite="propagate", backend="reference")
                    xs = planted_partials(world, r, e, seed=0, noise_seed=4)
                    cpu_payloads = [ref.encode(x, layer=LAYER, source=i) for i, x in enumerate(xs)]
                    want = ref.encode(ref.decode_sum(cpu_payloads, (r, e), layer=LAYER), layer=LAYER, source="sum")
                    payloads = [p.to(dev) for p in cpu_payloads]
                    out = torch.empty_like(payloads[0])
                    got = {}
                    for variant in ("fused", "split"):
                        K.REDUCE_VARIANT = variant
                        got[variant] = tri.reduce_encode(payloads, (r, e), layer=LAYER).cpu()
                        row[f"{variant}_us"] = 1e6 * timed(
                            lambda: tri.reduce_encode(payloads, (r, e), layer=LAYER, out=out))
                    row["equal"] = bool(torch.equal(got["fused"], want) and torch.equal(got["split"], want))
                    src, dst = torch.randn(r, e, device=dev), torch.empty(r, e, device=dev)
                    row["copy_us"] = 1e6 * timed(lambda: dst.copy_(src))
                    row["split_over_fused"] = row["split_us"] / row["fused_us"]
                except Exception as exc:  # the other rows stand
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
                finally:
                    K.REDUCE_VARIANT = saved
                print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
                write(rows, Path(args.out), dev=dev, dry=dry, repeats=repeats, argv=argv)
    write(rows, Path(args.out), dev=dev, dry=dry, repeats=repeats, argv=argv)


def write(rows, out: Path, *, dev, dry: bool, repeats: int, argv) -> None:
    from lowbit_tp.results import markdown_table

    device = device_name(dev, "cpu (interpreter: times are meaningless)")
    command = command_line("gpu_reduce_split", argv)
    write_json(out / "gpu_reduce_split.json",
               {"device": device, "command": command, "repeats": repeats, "dry_run_interpreter": dry, "rows": rows})
    head = (f"Device: {device}; GPU time alone (CUDA graphs), median of {repeats} replays.\n"
            f"Command: `{command}`\n\n")
    (out / "gpu_reduce_split.md").write_text(head + markdown_table(rows, COLUMNS) + "\n")


if __name__ == "__main__":
    main()
