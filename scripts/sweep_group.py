"""Sweep of the group codecs' encoder variants (int4-g32, int4-g128, mxfp4) on one GPU.

Every variant in ``triton_group.ENCODE_VARIANTS`` (or ``--variants``), old kernel against new in
one process, per codec:

* **bytes**: the payload of each variant equals the reference codec's (``backend="reference"``,
  the eager PyTorch path) byte for byte: on the timed normal data (reference on the same
  device: finite data, where the device's reference bytes equal the CPU's, scripts/gpu_check.py),
  and on a hard tensor (exact rounding ties and their fp32 neighbours, fp16-subnormal scales,
  values beyond max_in, -0.0, NaN/Inf) that sends tiles down every path (reference on the CPU,
  whose NaN codes are the contract); ``reduce_encode`` (``--world`` payloads summed and
  re-encoded) too;
* **speed**: encode at each shape (default [2048, 8192] and [8192, 8192]) and reduce_encode at
  ``--reduce-shape`` (``--reduce-codecs``), each as 5 calls captured in one CUDA graph and replayed (the kernel time
  alone, as scripts/gpu_check.py's ``graph_seconds``), median of ``--repeats`` replays, next to
  a same-size fp32 copy timed the same way in the same run. ``encode_of_copy`` = (fp32 in +
  payload out) bytes per second over the copy's (in + out), gpu_check.py's ``graph_encode_of_copy``.

Writes ``sweep_group.json`` to ``--out`` and prints a table.

    PYTHONPATH=. python3 scripts/sweep_group.py --out /tmp/sweep            # one GPU, < 45 s
    PYTHONPATH=. python3 scripts/sweep_group.py --device cpu --out /tmp/sw  # dry run (interpreter, tiny shapes)
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from lowbit_tp.bench.device_script import command_line, device_name, open_device, parse_shapes, write_json

CODECS = ("int4-g32", "int4-g128", "mxfp4")
LAYER = "L"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu = dry run under TRITON_INTERPRET=1 on tiny shapes (checks the script, not speed)")
    ap.add_argument("--shapes", default=None, help="comma-separated TxE (default 2048x8192,8192x8192; cpu 4x64,5x100)")
    ap.add_argument("--reduce-shape", default=None, help="TxE of reduce_encode (default 2048x8192; cpu 4x64)")
    ap.add_argument("--hard-shape", default=None, help="TxE of the hard-values check (default 256x1024; cpu 128x256)")
    ap.add_argument("--codecs", default=",".join(CODECS))
    ap.add_argument("--variants", default=None, help="comma-separated (default: all of ENCODE_VARIANTS)")
    ap.add_argument("--world", type=int, default=2, help="payloads per reduce_encode")
    ap.add_argument("--repeats", type=int, default=None, help="graph replays per timing (default 20; cpu 1)")
    ap.add_argument("--reduce-codecs", default="int4-g32,mxfp4",
                    help="codecs whose reduce_encode is checked and timed (int4-g128 runs int4-g32's code)")
    ap.add_argument("--budget-s", type=float, default=35.0,
                    help="start no new timing (and no reduce_encode compile) after this many seconds")
    return ap.parse_args(argv)


def hard_values(torch, name: str, t: int, e: int, seed: int = 0):
    """``[t, e]`` fp32 on the encoders' edges, in bands of 16 rows (a tile of 2048 or 4096 values
    holds 16 rows or fewer where ``e >= 256``, so the bands reach both the fast path and the one
    for the tiles it refuses); ``e % 32 == 0``.

    int4: each 32-group's first value is ``7 * s0`` (``s0`` an fp16 number, so that the group's
    scale is exactly ``s0``). Band 0: rounding ties ``(k + 0.5) * s0`` and their fp32 neighbours;
    1: random, with -0.0 and values just past max_in (4.6e5, still a fast tile); 2: scales in
    the fp16-subnormal range (rounded down by up to 33%: clamped codes); 3: NaN, Inf, 1e6.
    mxfp4: each group's first value is ``6 * 2**k`` (values scaled by exactly ``2**-k``); band 0:
    the E2M1 rounding boundaries, their neighbours and values past 6; 1: random, with -0.0 and
    negative values that underflow to -0.0 when scaled; 2: random; 3: NaN and Inf."""
    g = torch.Generator().manual_seed(seed)
    n = t * e // 32
    band = (torch.arange(t) // 16 % 4).repeat_interleave(e // 32)[:, None]  # [n, 1]
    sign = torch.where(torch.rand(n, 31, generator=g) < 0.5, -1.0, 1.0)
    if name == "mxfp4":
        k = torch.randint(-20, 20, (n, 1), generator=g).float()
        unit = torch.exp2(k)
        lead = 6.0 * unit
        base = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0, 0.5, 3.0, 4.0, 4.5, 5.5])
    else:
        k = torch.randint(-8, 8, (n, 1), generator=g).float()
        unit = (torch.rand(n, 1, generator=g) + 0.5).mul(torch.exp2(k)).half().float()  # s0
        lead = 7.0 * unit
        base = torch.arange(0, 7).float() + 0.5
    pick = base[torch.randint(0, len(base), (n, 31), generator=g)] * unit
    step = torch.randint(-1, 2, (n, 31), generator=g)  # the boundary itself or one fp32 step either side
    edge = torch.where(step > 0, torch.nextafter(pick, torch.full_like(pick, float("inf"))),
                       torch.where(step < 0, torch.nextafter(pick, torch.zeros_like(pick)), pick))
    rand = torch.rand(n, 31, generator=g) * lead
    v = torch.where(band == 0, edge, rand) * sign
    x = torch.cat([lead * torch.where(torch.rand(n, 1, generator=g) < 0.5, -1.0, 1.0), v], dim=1)
    if name != "mxfp4":  # band 2: absmax 7 * (j + 0.49) * 2**-24, j in 1..3: its fp16 scale j * 2**-24
        sub = (torch.randint(1, 4, (n, 1), generator=g) + 0.49) * 2.0 ** -24 / unit
        x = torch.where(band == 2, x * sub, x)
    x = x.reshape(t, e)
    rows = torch.arange(t)
    b1, b3 = rows[(rows // 16) % 4 == 1], rows[(rows // 16) % 4 == 3]
    x[b1, 3] = -0.0
    if name == "mxfp4":
        x[b1, 5] = -1e-45  # scaled by 2**-k (k up to 19): underflows to -0.0, code 0 (y < 0 is False)
    else:
        x[b1, 6] = 4.6e5  # past max_in = 458528, below 7.25 * 65504: a fast tile, code 7
    x[b3, 7] = float("nan")
    x[b3, e // 2 + 1] = float("inf")
    x[b3, e - 1] = 1.0e6
    return x


def main(argv=None) -> None:
    args = parse_args(argv)
    dry = args.device == "cpu"
    dev = open_device("sweep_group", args.device)  # TRITON_INTERPRET before any kernel import
    import torch

    from lowbit_tp.bench.common import device_seconds
    from lowbit_tp.codecs import make_codec
    from lowbit_tp.kernels import triton_group as K

    t0 = time.perf_counter()
    shapes = parse_shapes(args.shapes or ("4x64,5x100" if dry else "2048x8192,8192x8192"))
    red_shape = parse_shapes(args.reduce_shape or ("4x64" if dry else "2048x8192"))[0]
    hard_shape = parse_shapes(args.hard_shape or ("128x256" if dry else "256x1024"))[0]
    variants = (args.variants or ",".join(K.ENCODE_VARIANTS)).split(",")
    repeats = args.repeats or (1 if dry else 20)

    def seconds(fn):
        """Median seconds of one call of ``fn`` (5 calls in one CUDA graph on a GPU)."""
        return device_seconds(fn, dev, repeats=repeats)

    def launchers(name, codec):
        if name == "mxfp4":
            enc = lambda x, out, v: K.mx_encode(x, out, variant=v)  # noqa: E731
            red = lambda ps, out, t, e, v: K.mx_reduce_encode(ps, out, t=t, e=e, variant=v)  # noqa: E731
        else:
            kw = {"group": codec.group, "max_input": codec.max_input}
            enc = lambda x, out, v: K.encode(x, out, variant=v, **kw)  # noqa: E731
            red = lambda ps, out, t, e, v: K.reduce_encode(ps, out, t=t, e=e, variant=v, **kw)  # noqa: E731
        return enc, red

    rows, skipped = [], []
    gen = torch.Generator().manual_seed(1)
    copy_gbps = {}
    names = args.codecs.split(",")
    for name in names:  # encode first (the decision); reduce_encode after, as the budget allows
        ref = make_codec(name, nonfinite="propagate", backend="reference")
        enc, _ = launchers(name, ref)
        # hard values: every variant against the reference, bytes only
        xh = hard_values(torch, name, *hard_shape)
        want_h = ref.encode(xh, layer=LAYER, source=0).to(dev)  # on the CPU: NaN's E2M1 code is the CPU cast's
        xh = xh.to(dev)
        hard_ok = {}
        for v in variants:
            if time.perf_counter() - t0 > args.budget_s:  # no new compile either
                skipped.append(f"{name} {v} encode (all)")
                continue
            out = torch.empty_like(want_h)
            hard_ok[v] = bool(torch.equal(enc(xh, out, v), want_h))
        for t, e in shapes:
            x = (torch.randn(t, e, generator=gen) * 3).to(dev)
            want = ref.encode(x, layer=LAYER, source=0)
            if (t, e) not in copy_gbps:
                dst = torch.empty_like(x)
                copy_gbps[(t, e)] = 2 * x.numel() * 4 / seconds(lambda: dst.copy_(x)) / 1e9
            for v in [v for v in variants if v in hard_ok]:
                row = {"codec": name, "tokens": t, "hidden": e, "variant": v, "op": "encode",
                       "hard_bytes_equal": hard_ok[v]}
                out = torch.empty_like(want)
                row["bytes_equal"] = bool(torch.equal(enc(x, out, v), want))
                if time.perf_counter() - t0 > args.budget_s:
                    skipped.append(f"{name} {t}x{e} {v} encode (timing)")
                    rows.append(row)
                    continue
                s = seconds(lambda: enc(x, out, v))
                row.update({"us": s * 1e6, "copy_gbps": copy_gbps[(t, e)],
                            "of_copy": (x.numel() * 4 + want.numel()) / s / 1e9 / copy_gbps[(t, e)]})
                rows.append(row)
    t, e = red_shape
    for name in [n for n in names if n in args.reduce_codecs.split(",")]:
        ref = make_codec(name, nonfinite="propagate", backend="reference")
        _, red = launchers(name, ref)
        parts = [ref.encode((torch.randn(t, e, generator=gen) * 3).to(dev), layer=LAYER, source=r)
                 for r in range(args.world)]
        want = ref.reduce_encode(parts, (t, e), layer=LAYER)
        for v in variants:
            if time.perf_counter() - t0 > args.budget_s:  # each variant compiles its own kernel: skip both
                skipped.append(f"{name} {t}x{e} {v} reduce_encode")
                continue
            row = {"codec": name, "tokens": t, "hidden": e, "variant": v, "op": f"reduce_encode_w{args.world}"}
            out = torch.empty_like(want)
            row["bytes_equal"] = bool(torch.equal(red(parts, out, t, e, v), want))
            s = seconds(lambda: red(parts, out, t, e, v))
            row.update({"us": s * 1e6, "gbps": (args.world + 1) * want.numel() / s / 1e9})
            rows.append(row)
    info = {"device": device_name(dev, "cpu (Triton interpreter; times meaningless)"),
            "variants": variants, "default_variant": K.ENCODE_VARIANT, "mx_default_variant": K.MX_ENCODE_VARIANT,
            "repeats": repeats, "skipped": skipped,
            "seconds": time.perf_counter() - t0, "hard_shape": list(hard_shape),
            "command": command_line("sweep_group", argv, prefix="PYTHONPATH=. python3")}
    write_json(Path(args.out) / "sweep_group.json", {"info": info, "rows": rows}, newline=False)
    print(f"{info['device']}; {info['seconds']:.1f} s; skipped: {skipped or 'none'}")
    print("| codec | op | shape | variant | bytes equal | hard bytes equal | us | of copy / GB/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        speed = f"{r['of_copy']:.3f}" if "of_copy" in r else (f"{r['gbps']:.0f} GB/s" if "gbps" in r else "-")
        print(f"| {r['codec']} | {r['op']} | {r['tokens']}x{r['hidden']} | {r['variant']} | {r['bytes_equal']} | "
              f"{r.get('hard_bytes_equal', '-')} | {r.get('us', float('nan')):.1f} | {speed} |")
    if not all(r["bytes_equal"] and r.get("hard_bytes_equal", True) for r in rows):
        print("BYTES DIFFER for some variant (see bytes_equal / hard_bytes_equal)")
    for name in names:  # the fastest variant with equal bytes, per codec and op, summed over the shapes
        for op in sorted({r["op"] for r in rows if r["codec"] == name}):
            tot = {}
            for r in rows:
                if r["codec"] == name and r["op"] == op and "us" in r:
                    ok = r["bytes_equal"] and r.get("hard_bytes_equal", True)
                    tot[r["variant"]] = tot.get(r["variant"], 0.0) + (r["us"] if ok else float("inf"))
            if tot:
                ranked = sorted(tot.items(), key=lambda i: i[1])
                print(f"{name} {op}: " + ", ".join(f"{v} {u:.1f} us" for v, u in ranked))


if __name__ == "__main__":
    main()
