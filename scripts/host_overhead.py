"""Host (Python) cost per codec call on the Triton path, the kernels themselves left out.

Each GPU codec call is ``encode(x, out=buf)`` or ``decode_sum(payloads, shape, out=buf)``
with ``backend="triton"``. On a GPU its eager time is host work (the codec's Python, the
launcher's Python, Triton's launch) plus the kernel; GPU run 2 measured eager steps 2-18x
their CUDA-graph replay. This script measures the host part without a GPU: the kernels run
under ``TRITON_INTERPRET=1`` on tiny CPU tensors, and per call it records

* ``host_us``: wall time of the call with Triton's kernel run (``InterpretedFunction.run``,
  the stand-in for the launch) replaced by a no-op that only counts launches, median over
  ``--calls`` calls (GC off) after a warm-up call that runs the kernels (interpreting a
  kernel churns the CPU caches and the GC, which would otherwise be billed to the host);
* ``codec_us`` / ``launcher_us``: that host time split into the codec layer
  (``lowbit_tp/codecs``) and the Python launchers of ``lowbit_tp/kernels/triton_*.py``
  (the public functions the codecs call, minus the kernel runs inside them);
* ``torch_ops``: aten ops dispatched per call outside the kernels (one more call, kernels
  interpreted) that would launch a CUDA kernel or allocate GPU memory (views and metadata
  ops counted apart as ``view_ops``: no kernel, but a few us of host time each on CUDA);
* ``launches``: Triton kernel launches per call.

What it cannot see: Triton's own compiled-launcher cost on a GPU (``JITFunction.run``: the
argument specialisation and cache-key work, tens of us per launch), which the interpreter
replaces. The CPU host is slower per Python op than a GPU server's; compare before/after as
ratios from the same run (``--compare``).

With ``--two-shot 2,4,8`` it measures instead one rank's codec work in one two-shot
all-reduce step at each of those world sizes (``host_overhead_two_shot.{json,md}``), two ways
in the same run: **per chunk**, the calls two-shot made before the batched launches (pad, N
chunk encodes, the fused reduce-and-re-encode, N chunk decodes, cat), and **batched**, the
library's ``collectives.algorithms`` stages now (``Codec.encode_chunks`` / ``decode_chunks``:
one launch each). ``launches`` there counts Triton launches plus the aten ops that would
launch a CUDA kernel (allocations apart): the per-call host cost a GPU pays for each.

Usage::

    python scripts/host_overhead.py --out docs/bench/host_overhead [--compare before.json] [--label after]
    python scripts/host_overhead.py --out docs/bench --two-shot 2,4,8
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from lowbit_tp.results import json_text

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported

PRIORITY_CODECS = ["int4-outlier", "int4-g32", "int4-g128", "rot-lm4-g64-lg8-k4", "rot-int6-g64-lg8-k4", "int4",
                   "int8", "int4-random-k", "mxfp4"]  # scripts/gpu_check.py's list
LAUNCHERS = ("encode", "decode_sum", "reduce_encode", "mx_encode", "mx_decode_sum", "mx_reduce_encode",
             "encode_chunks", "decode_chunks", "mx_encode_chunks", "mx_decode_chunks")
ALLOC_OPS = {"empty", "empty_like", "empty_strided", "new_empty"}  # allocate, launch no kernel
VIEW_OPS = {"view", "_unsafe_view", "slice", "select", "as_strided", "alias", "detach", "t", "transpose", "unsqueeze",
            "squeeze", "expand", "permute", "split", "unbind", "lift_fresh", "_reshape_alias", "reshape", "flatten",
            "narrow", "view_as", "unflatten"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for host_overhead.json / host_overhead.md")
    ap.add_argument("--codecs", default=",".join(PRIORITY_CODECS))
    ap.add_argument("--shape", default="1x64", help="TxE of the message (tiny: the kernels are interpreted)")
    ap.add_argument("--world", type=int, default=2, help="payloads per decode_sum")
    ap.add_argument("--calls", type=int, default=30, help="timed calls per measurement (median)")
    ap.add_argument("--mode", default="flag", choices=("flag", "error", "propagate"), help="nonfinite mode")
    ap.add_argument("--label", default="", help="name of this tree in the report (e.g. before / after)")
    ap.add_argument("--compare", default=None, help="a JSON from an earlier run of this script: adds ratio columns")
    ap.add_argument("--two-shot", default=None, metavar="WORLDS",
                    help="comma-separated world sizes: measure one rank's two-shot step (per chunk vs batched) "
                         "instead of single calls; the message is --shape's")
    return ap.parse_args(argv)


class Probe:
    """Timing wrappers around Triton's interpreted kernel run and lowbit_tp's launchers, and a
    dispatch mode listing the aten ops made outside the interpreter. Installed only while the
    script measures (this is a measurement harness, not library code)."""

    def __init__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from triton.runtime.interpreter import InterpretedFunction

        import lowbit_tp.kernels.triton_group as G
        import lowbit_tp.kernels.triton_rotation as R
        import lowbit_tp.kernels.triton_static as S

        self.kernel_s = self.launcher_s = 0.0
        self.launches = 0
        self.ops: list[str] = []
        self._inside = 0
        self.stub = False  # timed calls skip the kernel run: its cache and GC churn would bill the host
        self._launcher_depth = 0
        probe = self
        self._saved = [(InterpretedFunction, "run", InterpretedFunction.run)]
        orig_run = InterpretedFunction.run

        def run(fn_self, *args, **kwargs):
            if probe._inside:
                return orig_run(fn_self, *args, **kwargs)
            probe._inside += 1
            probe.launches += 1
            t0 = time.perf_counter()
            try:
                return None if probe.stub else orig_run(fn_self, *args, **kwargs)
            finally:
                probe.kernel_s += time.perf_counter() - t0
                probe._inside -= 1

        InterpretedFunction.run = run
        for mod in (S, G, R):
            for name in LAUNCHERS:
                f = getattr(mod, name, None)
                if f is None:
                    continue
                self._saved.append((mod, name, f))
                setattr(mod, name, self._timed(f))

        class Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if not probe._inside:
                    probe.ops.append(func.overloadpacket.__name__)
                return func(*args, **(kwargs or {}))

        self.mode_cls = Ops
        self.torch = torch

    def _timed(self, f):
        probe = self

        def wrapper(*args, **kwargs):
            if probe._launcher_depth:
                return f(*args, **kwargs)
            probe._launcher_depth += 1
            t0 = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                probe.launcher_s += time.perf_counter() - t0
                probe._launcher_depth -= 1

        return wrapper

    def close(self):
        for obj, name, f in self._saved:
            setattr(obj, name, f)

    def measure(self, fn, calls: int) -> dict:
        fn()  # warm-up: tables, flags and the interpreter's rewritten kernels are built once
        host, codec, launcher, launches = [], [], [], []
        self.stub = True
        gc.disable()
        try:
            for _ in range(calls):
                self._one(fn, host, codec, launcher, launches)
        finally:
            self.stub = False
            gc.enable()
        self.ops = []
        with self.mode_cls():
            fn()  # the kernels run (interpreted): the aten ops outside them are listed
        real = [o for o in self.ops if o not in VIEW_OPS]
        return {"host_us": 1e6 * statistics.median(host), "codec_us": 1e6 * statistics.median(codec),
                "launcher_us": 1e6 * statistics.median(launcher), "launches": max(launches),
                "torch_ops": len(real), "view_ops": len(self.ops) - len(real), "ops": real}

    def _one(self, fn, host, codec, launcher, launches):
        self.kernel_s = self.launcher_s = 0.0
        self.launches = 0
        t0 = time.perf_counter()
        fn()
        total = time.perf_counter() - t0
        host.append(total - self.kernel_s)
        codec.append(total - self.launcher_s)
        launcher.append(self.launcher_s - self.kernel_s)
        launches.append(self.launches)


def _per_chunk_step(codec, x, world, rank, layer, send, recv, sums):
    """One rank's two-shot codec calls as two-shot made them before the batched launches."""
    import torch

    from lowbit_tp.collectives.algorithms import chunk_rows

    t, e = x.shape
    rows = chunk_rows(t, world)
    if rows * world != t:
        x = torch.nn.functional.pad(x, (0, 0, 0, rows * world - t))
    for c, o in zip(x.split(rows, dim=0), send.chunk(world)):
        codec.encode(c, layer=layer, source=rank, out=o)
    codec.reduce_encode(recv, (rows, e), layer=layer, out_source="sum")
    return torch.cat([codec.decode(p, (rows, e), layer=layer, source="sum") for p in sums], dim=0)[:t]


def _batched_step(codec, x, world, rank, layer, send, recv, sums, flat):
    """The same step through the library's stages (one launch for the N encodes, one for the N decodes)."""
    from lowbit_tp.collectives import algorithms as A

    t, e = x.shape
    rows = A.chunk_rows(t, world)
    A.two_shot_encode(codec, x, layer=layer, rank=rank, world=world, out=send)
    A.two_shot_reduce(codec, recv, (rows, e), layer=layer)
    return A.two_shot_decode(codec, sums, (rows, e), t, layer=layer, flat=flat)


def two_shot_main(args, probe, t, e, layer) -> list[dict]:
    import torch

    from lowbit_tp.calibration.synthetic import synthetic_calibration
    from lowbit_tp.codecs import make_codec
    from lowbit_tp.collectives.algorithms import chunk_rows

    rows_out = []
    for world in (int(w) for w in args.two_shot.split(",") if w):
        rows = chunk_rows(t, world)
        cal = synthetic_calibration([layer], world=world, hidden=e, tokens=64, batches=1)
        for name in [c for c in args.codecs.split(",") if c]:
            codec = make_codec(name, calibration=cal, nonfinite=args.mode, backend="triton")
            g = torch.Generator().manual_seed(world)
            xs = [torch.randn(rows, e, generator=g) for _ in range(world)]
            x = torch.randn(t, e, generator=g)
            nb = codec.payload_nbytes((rows, e), layer)
            send = torch.empty(world * nb, dtype=torch.uint8)
            recv = [codec.encode(xs[r], layer=layer, source=r) for r in range(world)]
            flat = torch.empty(world * codec.payload_nbytes((rows, e), layer), dtype=torch.uint8)
            sums = list(flat.chunk(world))
            for r, s in enumerate(sums):
                codec.encode(xs[r], layer=layer, source="sum", out=s)
            old = probe.measure(lambda: _per_chunk_step(codec, x, world, 0, layer, send, recv, sums), args.calls)
            new = probe.measure(lambda: _batched_step(codec, x, world, 0, layer, send, recv, sums, flat), args.calls)
            want = _per_chunk_step(codec, x, world, 0, layer, send, recv, sums)
            got = _batched_step(codec, x, world, 0, layer, send, recv, sums, flat)
            same = bool(torch.equal(torch.isnan(want), torch.isnan(got)) and torch.equal(
                want.nan_to_num(0.0).view(torch.int32), got.nan_to_num(0.0).view(torch.int32)))
            row = {"codec": name, "world": world, "tokens": t, "chunk_rows": rows, "same_result": same}
            for tag, m in (("per_chunk", old), ("batched", new)):
                kernel_ops = [o for o in m["ops"] if o not in ALLOC_OPS]
                row.update({f"{tag}_{k}": v for k, v in m.items()})
                row[f"{tag}_kernel_ops"] = len(kernel_ops)
                row[f"{tag}_gpu_launches"] = m["launches"] + len(kernel_ops)
            rows_out.append(row)
            print({k: row[k] for k in ("codec", "world", "per_chunk_gpu_launches", "batched_gpu_launches",
                                       "per_chunk_host_us", "batched_host_us", "same_result")}, flush=True)
    return rows_out


def _two_shot_markdown(meta, rows) -> str:
    lines = ["# Launches and host cost of one two-shot step on the Triton path", "",
             f"Command: `{meta['command']}`", "",
             f"One rank's codec work in one two-shot all-reduce of a [{meta['shape'][0]}, {meta['shape'][1]}] message "
             f"(rows padded to world x chunk rows), nonfinite={meta['mode']!r}, out= buffers where the library "
             f"passes them, median of {meta['calls']} steps after a warm-up; kernels interpreted (TRITON_INTERPRET=1, "
             "CPU) and their time subtracted. **per chunk**: the calls two-shot made before the batched launches "
             "(pad, N chunk encodes, the fused reduce-and-re-encode, N chunk decodes on the codec's decode path, "
             "cat); **batched**: `collectives.algorithms` now (`encode_chunks`, the fused reduce, `decode_chunks`). "
             "GPU launches = Triton launches + aten ops that launch a CUDA kernel (allocations apart): read them as a "
             "count (on the H100 of GPU run 3 a whole eager codec call cost the host 50-100 us; one aten launch "
             "costs less). Host us: the Python of the codec layer and the launchers (Triton's own launch cost is not "
             "in it); **per chunk** it also holds the eager decodes' compute on CPU tensors, so there it is an upper "
             "bound of the host cost. Same result = the two ways give the same fp32 bits.", "",
             "| codec | world | chunk rows | GPU launches per chunk | GPU launches batched | Triton launches per chunk "
             "| Triton launches batched | host us per chunk | host us batched | batched / per chunk | same result |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['codec']} | {r['world']} | {r['chunk_rows']} | {r['per_chunk_gpu_launches']} | "
                     f"{r['batched_gpu_launches']} | {r['per_chunk_launches']} | {r['batched_launches']} | "
                     f"{r['per_chunk_host_us']:.0f} | {r['batched_host_us']:.0f} | "
                     f"{r['batched_host_us'] / r['per_chunk_host_us']:.2f} | {r['same_result']} |")
    lines += ["", "aten ops per step outside the kernels (per chunk / batched):", ""]
    for r in rows:
        lines.append(f"- {r['codec']} world {r['world']}: {', '.join(r['per_chunk_ops']) or 'none'} / "
                     f"{', '.join(r['batched_ops']) or 'none'}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from lowbit_tp.calibration.synthetic import synthetic_calibration
    from lowbit_tp.codecs import make_codec

    torch.set_num_threads(1)
    t, e = (int(v) for v in args.shape.split("x"))
    layer = "L"
    cal = synthetic_calibration([layer], world=args.world, hidden=e, tokens=64, batches=1)
    probe = Probe()
    if args.two_shot:
        try:
            rows = two_shot_main(args, probe, t, e, layer)
        finally:
            probe.close()
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        cmd = "python scripts/host_overhead.py " + " ".join(sys.argv[1:] if argv is None else argv)
        meta = {"command": cmd, "shape": [t, e], "calls": args.calls, "mode": args.mode, "torch": torch.__version__}
        (out / "host_overhead_two_shot.json").write_text(json_text({"meta": meta, "rows": rows}, indent=1))
        (out / "host_overhead_two_shot.md").write_text(_two_shot_markdown(meta, rows))
        print(f"wrote {out}/host_overhead_two_shot.json and .md")
        return
    rows = []
    try:
        for name in [c for c in args.codecs.split(",") if c]:
            codec = make_codec(name, calibration=cal, nonfinite=args.mode, backend="triton")
            g = torch.Generator().manual_seed(0)
            xs = [torch.randn(t, e, generator=g) for _ in range(args.world)]
            n = codec.payload_nbytes((t, e), layer)
            pbufs = [torch.empty(n, dtype=torch.uint8) for _ in range(args.world)]
            payloads = [codec.encode(x, layer=layer, source=r, out=b) for r, (x, b) in enumerate(zip(xs, pbufs))]
            sbuf = torch.empty(t, e)
            enc = probe.measure(lambda: codec.encode(xs[0], layer=layer, source=0, out=pbufs[0]), args.calls)
            dec = probe.measure(lambda: codec.decode_sum(payloads, (t, e), layer=layer, out=sbuf), args.calls)
            row = {"codec": name}
            for op, m in (("encode", enc), ("decode_sum", dec)):
                row.update({f"{op}_{k}": v for k, v in m.items()})
            rows.append(row)
            print({k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items() if not k.endswith("_ops")
                   or isinstance(v, int)}, flush=True)
    finally:
        probe.close()
    before = None
    if args.compare:
        before = {r["codec"]: r for r in json.loads(Path(args.compare).read_text())["rows"]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python scripts/host_overhead.py " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {"command": cmd, "label": args.label, "shape": [t, e], "world": args.world, "calls": args.calls,
            "mode": args.mode, "torch": torch.__version__, "compare": args.compare}
    (out / "host_overhead.json").write_text(json_text({"meta": meta, "rows": rows}, indent=1))
    (out / "host_overhead.md").write_text(_markdown(meta, rows, before))
    print(f"wrote {out}/host_overhead.json and .md")


def _markdown(meta, rows, before) -> str:
    lines = [f"# Host cost per codec call on the Triton path{' (' + meta['label'] + ')' if meta['label'] else ''}", "",
             f"Command: `{meta['command']}`", "",
             f"Message [{meta['shape'][0]}, {meta['shape'][1]}], world {meta['world']}, nonfinite={meta['mode']!r}, "
             f"out= buffers, median of {meta['calls']} calls after a warm-up; kernels interpreted "
             f"(TRITON_INTERPRET=1, CPU) and their time subtracted. host = codec + launcher (lowbit_tp's Python); "
             f"torch ops = aten ops outside the kernels that would launch a CUDA kernel or allocate (views apart). "
             f"Triton's own launch cost on a GPU is not in these numbers.", ""]
    hdr = "| codec | call | host us | codec us | launcher us | torch ops | view ops | launches |"
    sep = "|---|---|---:|---:|---:|---:|---:|---:|"
    if before:
        hdr += " host us before | host after/before | codec us before | codec after/before | torch ops before |"
        sep += "---:|---:|---:|---:|---:|"
    lines += [hdr, sep]
    for r in rows:
        for op in ("encode", "decode_sum"):
            cells = [r["codec"], op, f"{r[f'{op}_host_us']:.1f}", f"{r[f'{op}_codec_us']:.1f}",
                     f"{r[f'{op}_launcher_us']:.1f}", str(r[f"{op}_torch_ops"]), str(r[f"{op}_view_ops"]),
                     str(r[f"{op}_launches"])]
            b = before.get(r["codec"]) if before else None
            if before:
                cells += ([f"{b[f'{op}_host_us']:.1f}", f"{r[f'{op}_host_us'] / b[f'{op}_host_us']:.2f}",
                           f"{b[f'{op}_codec_us']:.1f}", f"{r[f'{op}_codec_us'] / b[f'{op}_codec_us']:.2f}",
                           str(b[f"{op}_torch_ops"])] if b else [""] * 5)
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "torch ops per call (outside the kernels):", ""]
    for r in rows:
        for op in ("encode", "decode_sum"):
            lines.append(f"- {r['codec']} {op}: {', '.join(r[f'{op}_ops']) or 'none'}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
