"""Sweep of the static codecs' Triton kernel variants (issue 8): bytes/sums against the reference,
kernel time against a same-size copy.

For ``int4-outlier``, ``int4`` and ``int8``, and each variant of the decode-and-sum
(``triton_static.DECODE_VARIANTS``: the tile kernels, the fast kernels) and of the encoder
(``ENCODE_VARIANTS``):

* **identity**: at ``[1040, E]`` (NaN/Inf planted; rows that end inside the kernels' row tiles)
  each variant's payloads (``nonfinite="flag"``, what a CUDA-graph step runs) equal the CPU
  reference's (``"propagate"``) byte for byte, and each variant's decode-and-sum of the reference
  payloads (world 2 and 8) equals the reference's fp32 bits (NaN by position); at every timed
  shape each variant's sum/payload equals the tile kernel's on the device;
* **speed**: kernel time alone (5 calls captured in one CUDA graph and replayed, median of
  ``--repeats``, as scripts/gpu_check.py's ``graph_seconds``) of encode at each shape and of
  decode-and-sum at each shape and world, next to a same-size fp32 copy timed the same way in
  the same run; ``*_of_copy`` = bytes moved per second / the copy's (encode: fp32 in + payload
  out; decode-and-sum: N payloads in + fp32 out; copy: fp32 in + out), as gpu_check's.

Writes ``DIR/sweep_static.json`` and prints a table.

    PYTHONPATH=. python3 scripts/sweep_static.py --out /tmp/sweep              # GPU, < 60 s on an H200
    PYTHONPATH=. python3 scripts/sweep_static.py --device cpu --out /tmp/sweep  # interpreter dry run

Stop 22's world-8 question (old "fast" against the "src" variants, worlds 8 and 2):

    PYTHONPATH=. python3 scripts/sweep_static.py --out DIR --codecs int4-outlier,int8 --worlds 8,2 \
        --dec-variants fast,src,src-c,src-2 --enc-variants none --budget-s 150
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from lowbit_tp.bench.device_script import device_name, open_device, parse_shapes, write_json

LAYER = "L"
CODECS = ["int4-outlier", "int4", "int8"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--shapes", default=None, help="TxE list (default 2048x8192,8192x8192; cpu 3x128,4x320)")
    ap.add_argument("--worlds", default="2,8")
    ap.add_argument("--codecs", default=",".join(CODECS))
    ap.add_argument("--check-tokens", type=int, default=None, help="identity check rows (default 1040; cpu 5)")
    ap.add_argument("--repeats", type=int, default=None, help="graph replays timed (default 10; cpu 1)")
    ap.add_argument("--dec-variants", default=None,
                    help="decode-and-sum variants to run, comma-separated (default: every one in "
                         "triton_static.DECODE_VARIANTS; 'tile' always runs first, as the device baseline)")
    ap.add_argument("--enc-variants", default=None, help="encode variants (default: every one; 'tile' always runs)")
    ap.add_argument("--budget-s", type=float, default=55.0,
                    help="stop starting new rows after this many seconds (run 2 of stop 21: the first codec's "
                         "check, with the process's start-up and first compiles, took 41 s)")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    dry = args.device == "cpu"
    dev = open_device("sweep_static", args.device)  # TRITON_INTERPRET before any kernel import
    import torch

    from lowbit_tp.bench.common import graph_call_seconds
    from lowbit_tp.calibration.synthetic import planted_partials, synthetic_calibration
    from lowbit_tp.codecs import make_codec
    from lowbit_tp.kernels import triton_static as KS

    shapes = parse_shapes(args.shapes or ("3x128,4x320" if dry else "2048x8192,8192x8192"))
    worlds = [int(w) for w in args.worlds.split(",")]
    repeats = args.repeats or (1 if dry else 10)
    # GPU: a multiple of 16 (the timed shapes' integer specialization) and >= 1024 (the tile
    # kernels' row iterations), so the check compiles nothing the timing does not; ragged tiles
    check_tokens = args.check_tokens or (5 if dry else 1040)
    # "tile" (today's kernels) first: the other variants' device results are compared to it
    dec_all = ["tile"] + [v for v in KS.DECODE_VARIANTS if v not in ("auto", "tile")
                          and (args.dec_variants is None or v in args.dec_variants.split(","))]
    enc_all = ["tile"] + [v for v in KS.ENCODE_VARIANTS if v not in ("auto", "tile")
                          and (args.enc_variants is None or v in args.enc_variants.split(","))]
    for flag, asked, known in (("--dec-variants", args.dec_variants, KS.DECODE_VARIANTS),
                               ("--enc-variants", args.enc_variants, KS.ENCODE_VARIANTS)):
        unknown = sorted(set((asked or "").split(",")) - set(known) - {"", "none"})
        if unknown:  # a typo would silently time fewer variants, and GPU minutes are scarce
            raise SystemExit(f"sweep_static.py: {flag}: unknown variant(s) {', '.join(unknown)}; "
                             f"known: {', '.join(known)}")
    t0 = time.time()
    cals = {}

    def cal(world, e):
        if (world, e) not in cals:
            cals[world, e] = synthetic_calibration([LAYER], world=world, hidden=e, tokens=64, batches=1)
        return cals[world, e]

    def timed(fn) -> float:
        """Seconds per call: 5 calls in one CUDA graph, replayed (GPU); one call (CPU)."""
        if dev.type != "cuda":
            s = time.perf_counter()
            fn()
            return time.perf_counter() - s
        return graph_call_seconds(fn, repeats=repeats)

    def same_bits(a, b) -> bool:
        a, b = a.reshape(-1), b.reshape(-1)
        na, nb = torch.isnan(a), torch.isnan(b)
        return bool(torch.equal(na, nb) and torch.equal(a[~na].view(torch.int32), b[~nb].view(torch.int32)))

    def with_variants(dec=None, enc=None):
        KS.DECODE_VARIANT = dec or "auto"
        KS.ENCODE_VARIANT = enc or "auto"

    rows, skipped = [], []
    names = [c for c in args.codecs.split(",") if c]
    for name in names:
        # int8 runs int4's fast kernel shapes: its "fast-b" compiles would tell nothing new; without
        # bf16 channels (int4, int8) "src-c" and "src-2" run the same kernel as "src" (the window loop)
        dec_variants = [v for v in dec_all if not (name == "int8" and v == "fast-b")
                        and not (name in ("int4", "int8") and v in ("src-c", "src-2"))]
        enc_variants = [v for v in enc_all if not (name == "int8" and v == "fast-b")]
        # identity against the CPU reference, per variant: the payloads of max(worlds) sources
        # (one calibration for every world: world w decodes the first w), NaN/Inf planted
        e, wmax = shapes[0][1], max(worlds)
        c = cal(wmax, e)
        ref = make_codec(name, calibration=c, nonfinite="propagate", backend="reference")
        tri = make_codec(name, calibration=c, nonfinite="flag", backend="triton")  # what a graph step runs
        xs = planted_partials(wmax, check_tokens, e, seed=0, noise_seed=3)
        xs[0][1, 5], xs[-1][check_tokens - 1, e - 2] = float("nan"), float("-inf")
        want = [ref.encode(x, layer=LAYER, source=r) for r, x in enumerate(xs)]
        row = {"codec": name, "check": True, "tokens": check_tokens, "hidden": e}
        for v in enc_variants:
            with_variants(enc=v)
            got = [tri.encode(x.to(dev), layer=LAYER, source=r).cpu() for r, x in enumerate(xs)]
            row[f"bytes_equal_{v}"] = all(torch.equal(a, b) for a, b in zip(want, got))
        for world in worlds:
            s_ref = ref.decode_sum(want[:world], (check_tokens, e), layer=LAYER)
            for v in dec_variants:
                with_variants(dec=v)
                got = tri.decode_sum([p.to(dev) for p in want[:world]], (check_tokens, e), layer=LAYER).cpu()
                row[f"sum_equal_{v}_w{world}"] = same_bits(s_ref, got)
        with_variants()
        row["elapsed_s"] = time.time() - t0
        rows.append(row)
        print(row, flush=True)
        del xs, want
        # speed
        for t, e in shapes:
            for world in worlds:
                if time.time() - t0 > args.budget_s:
                    skipped.append(f"{name} {t}x{e} w{world}")
                    continue
                tri = make_codec(name, calibration=cal(wmax, e), nonfinite="flag", backend="triton")
                g = torch.Generator(device=dev).manual_seed(t + world)
                xs = [torch.randn(t, e, device=dev, generator=g) * 2 for _ in range(world)]
                payloads = [tri.encode(x, layer=LAYER, source=r) for r, x in enumerate(xs)]
                pbytes, fbytes = payloads[0].numel(), 4 * t * e
                dst = torch.empty_like(xs[0])
                row = {"codec": name, "tokens": t, "hidden": e, "world": world, "payload_bytes": pbytes}
                t_copy = timed(lambda: dst.copy_(xs[0]))
                copy_gbps = 2 * fbytes / t_copy / 1e9
                row.update(copy_us=t_copy * 1e6, copy_gbps=copy_gbps)
                base = None
                for v in dec_variants:
                    with_variants(dec=v)
                    sbuf = torch.empty(t, e, dtype=torch.float32, device=dev)
                    tt = timed(lambda: tri.decode_sum(payloads, (t, e), layer=LAYER, out=sbuf))
                    row[f"dec_{v}_us"] = tt * 1e6
                    row[f"dec_{v}_of_copy"] = (world * pbytes + fbytes) / tt / 1e9 / copy_gbps
                    if base is None:
                        base = sbuf
                    else:
                        row[f"dec_{v}_equal_tile"] = same_bits(base, sbuf)
                if world == worlds[0]:
                    pbase = None
                    for v in enc_variants:
                        with_variants(enc=v)
                        pbuf = torch.empty_like(payloads[0])
                        tt = timed(lambda: tri.encode(xs[0], layer=LAYER, source=0, out=pbuf))
                        row[f"enc_{v}_us"] = tt * 1e6
                        row[f"enc_{v}_of_copy"] = (fbytes + pbytes) / tt / 1e9 / copy_gbps
                        if pbase is None:
                            pbase = pbuf
                        else:
                            row[f"enc_{v}_equal_tile"] = bool(torch.equal(pbase, pbuf))
                with_variants()
                row["elapsed_s"] = time.time() - t0
                rows.append(row)
                print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
                del xs, payloads, dst
    info = {"device": device_name(dev, "cpu (interpreter)"),
            "torch": torch.__version__, "triton": __import__("triton").__version__, "seconds": time.time() - t0,
            "decode_variants": dec_all, "encode_variants": enc_all, "skipped": skipped}
    write_json(Path(args.out) / "sweep_static.json", {"info": info, "rows": rows}, newline=False)
    print(info)
    for r in rows:
        if r.get("check"):
            continue
        cells = [f"{r['codec']} {r['tokens']}x{r['hidden']} w{r['world']}"]
        cells += [f"dec {v} {r[f'dec_{v}_of_copy']:.3f}" for v in dec_all if f"dec_{v}_of_copy" in r]
        cells += [f"enc {v} {r[f'enc_{v}_of_copy']:.3f}" for v in enc_all if f"enc_{v}_of_copy" in r]
        print(" | ".join(cells))


if __name__ == "__main__":
    main()
