"""Sweep of the rot-* Triton kernel variants (``triton_rotation.CONFIG``) on one GPU, < 60 s.

Per variant (a set of CONFIG overrides: launch shape and level-search algorithm; the first
one, ``base``, is the configuration before this sweep) and codec (rot-lm4-g64-lg8-k4,
rot-int6-g64-lg8-k4):

* **bitwise**: ``world`` partials of ``--check-tokens`` tokens (NaN/Inf planted, propagate
  mode) encoded by the variant equal the CPU reference's payload bytes (``backend="reference"``),
  and the variant's decode-and-sum of the reference payloads (2 and 8 sources) equals the
  reference's fp32 bits (NaN by position); on a GPU the check runs at ``E = 8192`` and a token
  count that compiles the same kernels as the timed shapes;
* **time** (GPU): encode, decode-and-sum of 2 payloads at ``[2048, 8192]`` and
  ``[8192, 8192]`` and of 8 payloads at ``[8192, 8192]``: ``calls`` calls captured in one CUDA
  graph and replayed (as scripts/gpu_check.py's graph_seconds), median of ``--repeats``, next to
  a same-size fp32 copy timed the same way in the same run; ``*_of_copy`` = bytes moved
  (encode: fp32 in + payload out; decode-and-sum: N payloads in + fp32 out) per second over
  the copy's (fp32 in + out).

Writes ``DIR/sweep_rot.json`` and prints a table.

    PYTHONPATH=. python3 scripts/sweep_rot.py --out /tmp/sweep           # GPU
    PYTHONPATH=. python3 scripts/sweep_rot.py --device cpu --out /tmp/s  # dry run, interpreter, tiny shapes

Stop 22's world-8 question (the source loop, CONFIG["dec_loop"], against the defaults; add
``--device cpu`` for the dry run):

    PYTHONPATH=. python3 scripts/sweep_rot.py --out DIR --variants new,new_loop --reduce-variants none \
        --budget-s 120
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lowbit_tp.bench.device_script import command_line, device_name, open_device, write_json

CODECS = ["rot-lm4-g64-lg8-k4", "rot-int6-g64-lg8-k4"]
LAYER = "L"
# name -> CONFIG overrides. "base": the kernels as measured in GPU run 1 (binary level search,
# per-plane bit packing, 1 warp, 16 values a thread per payload, 8 with > 4 payloads).
_BASE = {"cell": False, "xpose": False, "asm_enc": False, "asm_dec": False, "lg8_cell": False, "row_tile": 0,
         "row_vpt": 16, "enc_values": 512, "dec_values": 512, "dec_values_wide": 256, "warps": 1, "dec_loop": False}
_NEW = {**_BASE, "cell": True, "xpose": True, "asm_enc": True, "asm_dec": (4,), "lg8_cell": True}
VARIANTS = {
    "base": _BASE,
    # cell level and lg8 searches, bit-transpose packing, inline-PTX table reads (encoders; 4-bit decode)
    "new": _NEW,
    "new_row": {**_NEW, "row_tile": 16384},  # + encoders take whole rows (16 warps): lg8 rotates once
    "new_big": {**_NEW, "enc_values": 1024, "dec_values": 1024, "dec_values_wide": 512},  # 32/16 values a thread
    "new_v256": {**_NEW, "enc_values": 256, "dec_values": 256, "dec_values_wide": 128},  # 8 values a thread
    "new_noasmdec": {**_NEW, "asm_dec": False},  # new with tl.load level reads in decode-and-sum
    "new_noasm": {**_NEW, "asm_enc": False, "asm_dec": False},  # new without inline PTX
    # stop 22: decode-and-sum's sources in a run-time loop, 16 values a thread at any world
    "new_loop": {**_NEW, "dec_loop": True, "dec_values_loop": 512},
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    # GPU run 2 (H200): compiles dominate (the int6 kernels ~20-40 s a variant there), so the
    # default compares the run-1 kernels with the defaults; name the others to time them
    ap.add_argument("--variants", default="base,new",
                    help=f"comma-separated names of VARIANTS ({', '.join(VARIANTS)})")
    ap.add_argument("--codecs", default=",".join(CODECS))
    ap.add_argument("--repeats", type=int, default=None, help="graph replays timed (default 15; cpu 1)")
    ap.add_argument("--calls", type=int, default=5, help="calls per captured graph")
    ap.add_argument("--check-tokens", type=int, default=None, help="default 48 (GPU), 5 (cpu)")
    ap.add_argument("--reduce-variants", default="new,new_row",
                    help="variants whose two-shot reduce-encode (2 payloads, [2048, 8192]) is timed too")
    ap.add_argument("--budget-s", type=float, default=35.0, help="start no new variant after this many seconds")
    ap.add_argument("--dec-worlds", default="2,8", help="payload counts of the [8192, 8192] decode-and-sum (2-8)")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    dry = args.device == "cpu"
    dev = open_device("sweep_rot", args.device)  # TRITON_INTERPRET before any kernel import
    import torch

    from lowbit_tp.bench.common import graph_call_seconds
    from lowbit_tp.calibration.synthetic import planted_partials, synthetic_calibration
    from lowbit_tp.codecs import make_codec
    from lowbit_tp.kernels import triton_rotation as K

    t0 = time.time()
    hidden = 64 if dry else 8192
    shapes = [(3, 64)] if dry else [(2048, 8192), (8192, 8192)]
    dec_worlds = tuple(int(n) for n in args.dec_worlds.split(","))
    if not all(2 <= n <= 8 for n in dec_worlds):
        sys.exit(f"sweep_rot: --dec-worlds takes payload counts 2-8, got {args.dec_worlds}")
    worlds = {(3, 64): dec_worlds} if dry else {(2048, 8192): (2,), (8192, 8192): dec_worlds}
    check_tokens = args.check_tokens or (5 if dry else 48)  # 48: divisible by 16 like the timed T
    repeats = args.repeats or (1 if dry else 15)
    cal = synthetic_calibration([LAYER], world=8, hidden=hidden, tokens=64, batches=1)
    default_config = dict(K.CONFIG)
    eager_fallbacks: list[str] = []  # timings that could not be captured in a CUDA graph

    def timed(fn) -> float:
        """Seconds per call: on a GPU ``calls`` calls in one CUDA graph, median of replays."""
        if dry:
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t
        return graph_call_seconds(fn, repeats=repeats, calls=args.calls,
                                  on_capture_error=lambda exc: eager_fallbacks.append(
                                      f"{type(exc).__name__}: {str(exc)[:80]}"))

    def same_bits(a, b) -> bool:
        a, b = a.reshape(-1).cpu(), b.reshape(-1).cpu()
        na, nb = torch.isnan(a), torch.isnan(b)
        return bool(torch.equal(na, nb) and torch.equal(a[~na].view(torch.int32), b[~nb].view(torch.int32)))

    # the reference payloads and sums of the check, once per codec (CPU, eager)
    refs, reds = {}, {}
    for name in args.codecs.split(","):
        ref = make_codec(name, calibration=cal, nonfinite="propagate", backend="reference")
        xs = planted_partials(8, check_tokens, hidden, seed=0, noise_seed=3)
        xs[0][1, 5], xs[7][check_tokens - 1, hidden - 2], xs[3][2, 0] = float("nan"), float("-inf"), float("inf")
        want = [ref.encode(x, layer=LAYER, source=r) for r, x in enumerate(xs)]
        sums = {n: ref.decode_sum(want[:n], (check_tokens, hidden), layer=LAYER) for n in (2, 8)}
        refs[name] = (xs, want, sums)
        reds[name] = ref.encode(sums[2], layer=LAYER, source=0)

    # timed inputs (shared by every variant) and copies
    data, copies = {}, {}
    gen = torch.Generator(device=dev).manual_seed(4)
    for t, e in shapes:  # drawn on the device (the kernels' time does not depend on the values)
        xs = [torch.randn(t, e, device=dev, generator=gen) * 3 for _ in range(8)]
        dst = torch.empty_like(xs[0])
        copies[(t, e)] = timed(lambda: dst.copy_(xs[0]))
        data[(t, e)] = xs

    rows, skipped = [], []
    for vname in args.variants.split(","):
        if time.time() - t0 > args.budget_s:
            skipped.append(vname)
            continue
        K.CONFIG.clear()
        K.CONFIG.update({**default_config, **VARIANTS[vname]})
        tv = time.time()
        for name in args.codecs.split(","):
            row = {"variant": vname, "codec": name, "config": dict(K.CONFIG)}
            try:
                codec = make_codec(name, calibration=cal, nonfinite="propagate", backend="triton")
                xs, want, sums = refs[name]
                got = [codec.encode(x.to(dev), layer=LAYER, source=r).cpu() for r, x in enumerate(xs)]
                row["bytes_equal"] = all(torch.equal(a, b) for a, b in zip(want, got))
                for n in (2, 8):
                    s = codec.decode_sum([p.to(dev) for p in want[:n]], (check_tokens, hidden), layer=LAYER)
                    row[f"sum{n}_equal"] = same_bits(s, sums[n])
                if vname in args.reduce_variants.split(","):  # two-shot's owner stage: encode(sum) of 2
                    red = codec.reduce_encode([p.to(dev) for p in want[:2]], (check_tokens, hidden), layer=LAYER,
                                              out_source=0)
                    row["reduce_equal"] = red is not None and torch.equal(red.cpu(), reds[name])
                for t, e in shapes:
                    xd = data[(t, e)]
                    fbytes = 4 * t * e
                    pbuf = torch.empty(codec.payload_nbytes((t, e), LAYER), dtype=torch.uint8, device=dev)
                    payloads = [codec.encode(v, layer=LAYER, source=r) for r, v in enumerate(xd)]
                    pbytes = pbuf.numel()
                    sbuf = torch.empty(t, e, dtype=torch.float32, device=dev)
                    copy_bw = 2 * fbytes / copies[(t, e)]
                    te = timed(lambda: codec.encode(xd[0], layer=LAYER, source=0, out=pbuf))
                    row[f"enc_{t}_us"] = te * 1e6
                    row[f"enc_{t}_of_copy"] = (fbytes + pbytes) / te / copy_bw
                    for n in worlds[(t, e)]:
                        td = timed(lambda: codec.decode_sum(payloads[:n], (t, e), layer=LAYER, out=sbuf))
                        row[f"dec{n}_{t}_us"] = td * 1e6
                        row[f"dec{n}_{t}_of_copy"] = (n * pbytes + fbytes) / td / copy_bw
                    if (t, e) == shapes[0] and vname in args.reduce_variants.split(","):
                        rbuf = torch.empty_like(pbuf)
                        tr = timed(lambda: codec.reduce_encode(payloads[:2], (t, e), layer=LAYER, out=rbuf))
                        row[f"reduce2_{t}_us"] = tr * 1e6
            except Exception as exc:  # one variant's failure is reported, the others still run
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            row["elapsed_s"] = time.time() - t0
            row["variant_s"] = time.time() - tv
            rows.append(row)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                              if k != "config"}), flush=True)
    K.CONFIG.clear()
    K.CONFIG.update(default_config)

    out = Path(args.out)
    meta = {"device": device_name(dev, "cpu (interpreter dry run)"),
            "dry_run": dry, "shapes": shapes, "copy_us": {f"{t}x{e}": v * 1e6 for (t, e), v in copies.items()},
            "repeats": repeats, "calls_per_graph": args.calls, "seconds": time.time() - t0,
            "skipped_for_budget": skipped, "variants": VARIANTS, "graph_capture_failures": eager_fallbacks,
            "command": command_line("sweep_rot", argv)}
    write_json(out / "sweep_rot.json", {**meta, "rows": rows}, indent=2, newline=False)
    cols = sorted({k for r in rows for k in r if k.endswith("_of_copy") or k.startswith("reduce2_")},
                  key=lambda k: (k.startswith("reduce"), k))
    print("\n| variant | codec | bitwise | " + " | ".join(cols) + " |")
    print("|---|---|---|" + "---|" * len(cols))
    for r in rows:
        ok = r.get("error") or all(r.get(k, True) for k in ("bytes_equal", "sum2_equal", "sum8_equal", "reduce_equal"))
        print(f"| {r['variant']} | {r['codec']} | {ok} | " + " | ".join(
            f"{r[c]:.3f}" if isinstance(r.get(c), float) else "-" for c in cols) + " |")
    print(f"sweep_rot: {len(rows)} rows in {meta['seconds']:.1f} s -> {out}/sweep_rot.json", flush=True)


if __name__ == "__main__":
    main()
