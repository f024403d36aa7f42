"""Device check of the fused codec kernels: bytes equal to the CPU reference, speed against a copy.

One run (< 5 min on one H100/H200) does, per codec:

* **identity**: payloads encoded on the device (``backend="triton"``) equal the CPU
  reference's byte for byte, clean and with NaN/Inf planted (``nonfinite="propagate"``), and
  ``decode_sum`` of the CPU payloads on the device equals the CPU reference's fp32 bits
  (NaN compared by position);
* **speed** at each shape (default ``[32, 8192]``, ``[2048, 8192]``, ``[8192, 8192]``):
  encode and decode-and-sum (``--world`` payloads) of the fused kernels and of the unfused
  PyTorch reference on the same device, and a same-size fp32 copy measured in the same run.
  ``*_gbps`` counts the bytes each one reads and writes (encode: fp32 in + payload out;
  decode-and-sum: N payloads in + fp32 out; copy: fp32 in + out); ``*_of_copy`` divides it by
  the copy's; two-shot's fused reduce-and-re-encode (N payloads in, one out) is timed too; ``*_fp32_gbps`` is fp32 input (or output) bytes per second, as issue 8 quotes;
  The fused timings write preallocated ``out=`` buffers;
* **kernel time alone** (GPU only): 5 calls of encode, of decode-and-sum and of the copy, each
  captured in one CUDA graph and replayed (``graph_*``): per-call eager timings of a
  prefill-sized message include the host's launch cost (50-100 µs a call in run 2), which a
  graph, or a host running ahead of the GPU, hides;
* **two-shot's batched launches** (at ``--two-shot-tokens``, default 2048; the first shape in a
  dry run): ``Codec.encode_chunks`` of the message's ``--world`` row chunks in one launch
  against the ``world`` per-chunk encodes two-shot made before, and ``decode_chunks`` against
  the per-chunk decodes (``two_shot_*_us``, eager), with the batched bytes and decodes checked
  against the CPU reference (``two_shot_bytes_equal``, ``two_shot_decode_equal``);
* **CUDA graph**: encode + decode-and-sum into preallocated buffers in ``nonfinite="flag"``
  mode, captured once and replayed, write the eager payload bytes and sum bits, and a replay
  with a NaN planted in the captured input sets the device flag (``--device cpu`` runs the
  eager half and skips the capture).

Writes ``gpu_check.json`` and ``gpu_check.md`` to ``--out``.

    PYTHONPATH=. python3 scripts/gpu_check.py --out docs/bench
    # dry run of the same code on CPU tensors (Triton interpreter, tiny shapes, minutes):
    PYTHONPATH=. python3 scripts/gpu_check.py --device cpu --out /tmp/gpu_check_dry
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from lowbit_tp.bench.device_script import command_line, open_device, parse_shapes, same_bits
from lowbit_tp.results import json_text

# The default run: the seed, the group codecs, what `default` (alloc) uses, the static baselines.
PRIORITY_CODECS = ["int4-outlier", "int4-g32", "int4-g128", "rot-lm4-g64-lg8-k4", "rot-int6-g64-lg8-k4", "int4",
                   "int8", "int4-random-k", "mxfp4"]
# --codecs all: every codec with a kernel (each rot-* variant compiles its own kernels, ~10 s
# apiece at E=8192, which is what keeps it out of the default 5-minute run).
KERNEL_CODECS = PRIORITY_CODECS + [
    "rot-int4-g64", "rot-lm4-g64", "rot-int4-g32", "rot-lm4-g32-e8", "rot-lm3-g64",
    "rot-lm3-g32-e8", "rot-lm2-g32-e8", "rot-lm4-g64-e8", "rot-lm4-g64-lg8", "rot-lm4-g32-lg8-k4",
    "rot-lm3-g32-lg8-k4", "rot-int8-g64-e8",
]
LAYER = "L"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for gpu_check.json / gpu_check.md")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu = dry run under TRITON_INTERPRET=1 on tiny shapes (checks the script, not speed)")
    ap.add_argument("--shapes", default=None, help="comma-separated TxE (default: 32x8192,2048x8192,8192x8192; "
                                                   "cpu: 3x64,5x96)")
    ap.add_argument("--check-tokens", type=int, default=None, help="tokens of the identity check (default 257; cpu 5)")
    ap.add_argument("--world", type=int, default=2, help="payloads per decode-and-sum")
    ap.add_argument("--codecs", default=",".join(PRIORITY_CODECS), help="comma-separated names, or 'all'")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 20; cpu 1)")
    ap.add_argument("--two-shot-tokens", type=int, default=None,
                    help="token count whose row also times two-shot's batched launches (default 2048; cpu: the "
                         "first shape's; 0: none)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting new rows after this many seconds; the rows left out are listed (default none)")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    dry = args.device == "cpu"
    dev = open_device("gpu_check", args.device)  # TRITON_INTERPRET before any kernel import
    import torch

    from lowbit_tp.calibration.synthetic import planted_partials, synthetic_calibration
    from lowbit_tp.codecs import make_codec

    shapes = parse_shapes(args.shapes or ("3x64,5x96" if dry else "32x8192,2048x8192,8192x8192"))
    hidden = {e for _, e in shapes}
    check_tokens = args.check_tokens or (5 if dry else 257)
    repeats = args.repeats or (1 if dry else 20)
    world = args.world
    two_shot_at = args.two_shot_tokens if args.two_shot_tokens is not None else (shapes[0][0] if dry else 2048)
    cals = {e: synthetic_calibration([LAYER], world=world, hidden=e, tokens=64, batches=1) for e in hidden}

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def seconds(fn) -> float:
        fn()
        sync()
        times = []
        for _ in range(repeats):
            if dev.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    rows, t_start = [], time.time()
    names = KERNEL_CODECS if args.codecs == "all" else [c for c in args.codecs.split(",") if c]
    def measure(name: str, t: int, e: int) -> dict:
        cal = cals[e]
        ref_cpu = make_codec(name, calibration=cal, nonfinite="propagate", backend="reference")
        fused = make_codec(name, calibration=cal, nonfinite="propagate", backend="triton")
        unfused = make_codec(name, calibration=cal, nonfinite="propagate", backend="reference")
        row = {"codec": name, "tokens": t, "hidden": e}
        # identity (once per codec and hidden size, on an odd token count)
        if (t, e) == next(s for s in shapes if s[1] == e):
            xs = planted_partials(world, check_tokens, e, seed=0, noise_seed=3)
            xs[0][1, 5], xs[-1][check_tokens - 1, e - 2] = float("nan"), float("-inf")
            clean = planted_partials(world, check_tokens, e, seed=0, noise_seed=5)
            for label, batch in (("finite", clean), ("nan_inf", xs)):
                try:
                    want = [ref_cpu.encode(x, layer=LAYER, source=r) for r, x in enumerate(batch)]
                except Exception as exc:  # a reference bug is reported, not hidden
                    row[f"bytes_equal_{label}"] = row[f"sum_equal_{label}"] = f"reference failed: {exc}"[:60]
                    continue
                got = [fused.encode(x.to(dev), layer=LAYER, source=r).cpu() for r, x in enumerate(batch)]
                row[f"bytes_equal_{label}"] = all(torch.equal(a, b) for a, b in zip(want, got))
                s_ref = ref_cpu.decode_sum(want, (check_tokens, e), layer=LAYER)
                s_dev = fused.decode_sum([p.to(dev) for p in want], (check_tokens, e), layer=LAYER)
                row[f"sum_equal_{label}"] = same_bits(s_ref, s_dev)
                # the sum rounded into a bf16 out by the kernel (as_stored) == the fp32 sum cast once
                s16 = fused.decode_sum([p.to(dev) for p in want], (check_tokens, e), layer=LAYER,
                                       out=torch.empty(check_tokens, e, dtype=torch.bfloat16, device=dev))
                row[f"sum_bf16_equal_{label}"] = same_bits(s_ref.to(torch.bfloat16).float(), s16.float())
        # speed
        x = planted_partials(world, t, e, seed=0, noise_seed=4)
        xd = [v.to(dev) for v in x]
        payloads = [fused.encode(v, layer=LAYER, source=r) for r, v in enumerate(xd)]
        pbytes, fbytes = payloads[0].numel(), 4 * t * e
        dst = torch.empty_like(xd[0])
        pbuf, sbuf = torch.empty_like(payloads[0]), torch.empty(t, e, dtype=torch.float32, device=dev)
        t_copy = seconds(lambda: dst.copy_(xd[0]))
        # the fused path writes preallocated buffers (out=), as all_reduce's buffer cache does
        t_enc = seconds(lambda: fused.encode(xd[0], layer=LAYER, source=0, out=pbuf))
        t_dec = seconds(lambda: fused.decode_sum(payloads, (t, e), layer=LAYER, out=sbuf))
        rbuf = torch.empty(fused.payload_nbytes((t, e), LAYER), dtype=torch.uint8, device=dev)
        t_red = seconds(lambda: fused.reduce_encode(payloads, (t, e), layer=LAYER, out=rbuf))
        t_enc_ref = seconds(lambda: unfused.encode(xd[0], layer=LAYER, source=0))
        t_dec_ref = seconds(lambda: unfused.decode_sum(payloads, (t, e), layer=LAYER))
        copy_gbps = 2 * fbytes / t_copy / 1e9
        if dev.type == "cuda":  # the kernels' own time: K calls replayed as one graph, no host launch cost
            try:
                fg = make_codec(name, calibration=cal, nonfinite="flag", backend="triton")
                gt_copy = graph_seconds(torch, lambda: dst.copy_(xd[0]), seconds)
                gt_enc = graph_seconds(torch, lambda: fg.encode(xd[0], layer=LAYER, source=0, out=pbuf), seconds)
                gt_dec = graph_seconds(torch, lambda: fg.decode_sum(payloads, (t, e), layer=LAYER, out=sbuf),
                                       seconds)
                sbuf16 = torch.empty(t, e, dtype=torch.bfloat16, device=dev)
                gt_dec16 = graph_seconds(torch, lambda: fg.decode_sum(payloads, (t, e), layer=LAYER, out=sbuf16),
                                         seconds)
                gcopy = 2 * fbytes / gt_copy / 1e9
                row.update({"graph_decode_sum_bf16_us": gt_dec16 * 1e6,
                            "graph_decode_sum_bf16_of_copy": (world * pbytes + fbytes // 2) / gt_dec16 / 1e9 / gcopy})
                row.update({"graph_copy_gbps": gcopy,
                            "graph_encode_of_copy": (fbytes + pbytes) / gt_enc / 1e9 / gcopy,
                            "graph_decode_sum_of_copy": (world * pbytes + fbytes) / gt_dec / 1e9 / gcopy,
                            "graph_encode_us": gt_enc * 1e6, "graph_decode_sum_us": gt_dec * 1e6})
            except Exception as exc:  # the eager numbers stand; say why the graph ones are missing
                row["graph_error"] = f"{type(exc).__name__}: {str(exc)[:100]}"
        row.update({
            "bits_per_value": 8 * pbytes / (t * e),
            "copy_gbps": copy_gbps,
            "encode_gbps": (fbytes + pbytes) / t_enc / 1e9,
            "encode_of_copy": (fbytes + pbytes) / t_enc / 1e9 / copy_gbps,
            "decode_sum_gbps": (world * pbytes + fbytes) / t_dec / 1e9,
            "decode_sum_of_copy": (world * pbytes + fbytes) / t_dec / 1e9 / copy_gbps,
            "reduce_encode_gbps": (world + 1) * pbytes / t_red / 1e9,
            "reduce_encode_us": t_red * 1e6,
            "encode_fp32_gbps": fbytes / t_enc / 1e9,
            "decode_sum_fp32_gbps": fbytes / t_dec / 1e9,
            "unfused_encode_fp32_gbps": fbytes / t_enc_ref / 1e9,
            "unfused_decode_sum_fp32_gbps": fbytes / t_dec_ref / 1e9,
        })
        if t == two_shot_at:
            try:
                row.update(two_shot_times(torch, fused, ref_cpu, xd[0], world, seconds, same_bits))
            except Exception as exc:  # the other numbers stand
                row["two_shot_error"] = f"{type(exc).__name__}: {str(exc)[:100]}"
        row["cuda_graph"] = graph_check(
            torch, lambda mode: make_codec(name, calibration=cal, nonfinite=mode, backend="triton"), xd, (t, e),
            capture=dev.type == "cuda", timer=seconds, times=row)
        return row

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write = _writer(args, argv, dev, dry, world, check_tokens, repeats, t_start)
    skipped: list[str] = []
    for name in names:
        for t, e in shapes:
            if args.budget_s is not None and time.time() - t_start > args.budget_s:
                skipped.append(f"{name}@{t}x{e}")
                continue
            try:
                row = measure(name, t, e)
            except Exception as exc:  # one codec's failure is reported, the others still run
                row = {"codec": name, "tokens": t, "hidden": e, "error": f"{type(exc).__name__}: {str(exc)[:160]}"}
            rows.append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            write(out, rows, skipped, final=False)  # a run cut short still leaves what it measured
    write(out, rows, skipped, final=True)


def _writer(args, argv, dev, dry, world, check_tokens, repeats, t_start):
    import json

    from lowbit_tp.bench.common import environment
    from lowbit_tp.results import markdown_table

    env = environment()

    def write(out: Path, rows: list, skipped: list, *, final: bool) -> None:
        meta = {"environment": env, "device": str(dev), "dry_run_interpreter": dry, "world": world,
                "check_tokens": check_tokens, "repeats": repeats, "seconds": time.time() - t_start,
                "complete": final, "skipped_for_budget": skipped, "reduce_variants": _reduce_variants(),
                "command": command_line("gpu_check", argv)}
        (out / "gpu_check.json").write_text(json_text({**meta, "rows": rows}, indent=2))
        cols = ["codec", "tokens", "hidden", "bits_per_value", "bytes_equal_finite", "bytes_equal_nan_inf",
                "sum_equal_finite", "sum_equal_nan_inf", "sum_bf16_equal_finite", "sum_bf16_equal_nan_inf", "copy_gbps", "encode_gbps", "encode_of_copy",
                "decode_sum_gbps", "decode_sum_of_copy", "graph_encode_of_copy", "graph_decode_sum_of_copy",
                "graph_decode_sum_bf16_of_copy", "reduce_encode_us", "unfused_encode_fp32_gbps",
                "unfused_decode_sum_fp32_gbps", "cuda_graph", "eager_step_us", "graph_step_us",
                "two_shot_encode_chunks_us", "two_shot_encode_loop_us", "two_shot_decode_chunks_us",
                "two_shot_decode_loop_us", "two_shot_bytes_equal", "two_shot_decode_equal", "two_shot_error",
                "graph_error", "error"]
        head = (f"Device: {env.get('cuda') or 'cpu'}; world {world}; "
                f"{'DRY RUN under the Triton interpreter: speeds are meaningless' if dry else 'median of %d runs' % repeats}."
                f"\nCommand: `{meta['command']}`\n"
                + ("" if final else "\n**Incomplete: the run stopped before its last row.**\n")
                + (f"\nLeft out for the time budget: {', '.join(skipped)}\n" if skipped else "") + "\n")
        (out / "gpu_check.md").write_text(head + markdown_table(rows, cols) + "\n")
        if final:
            print(f"gpu_check: {len(rows)} rows in {meta['seconds']:.0f} s -> {out}/gpu_check.json", flush=True)

    return write


def two_shot_times(torch, fused, ref_cpu, x, n: int, seconds, same_bits) -> dict:
    """Two-shot's chunk stages at ``n`` chunks of ``x [T, E]`` (rows padded as two-shot pads them):
    the batched calls (one launch each) against the per-chunk calls two-shot made before them
    (``n`` encodes, ``n`` decodes on the codec's decode path), eager, and the batched results
    against the CPU reference run chunk by chunk."""
    from lowbit_tp.collectives.algorithms import chunk_rows

    t, e = x.shape
    rows = chunk_rows(t, n)
    xp = torch.nn.functional.pad(x, (0, 0, 0, rows * n - t)) if rows * n != t else x
    nb = fused.payload_nbytes((rows, e), LAYER)
    flat = torch.empty(n * nb, dtype=torch.uint8, device=x.device)
    loop = torch.empty_like(flat)
    t_enc = seconds(lambda: fused.encode_chunks(xp, n, layer=LAYER, source=0, out=flat))
    t_enc_loop = seconds(lambda: [fused.encode(c, layer=LAYER, source=0, out=o)
                                  for c, o in zip(xp.split(rows), loop.split(nb))])
    t_dec = seconds(lambda: fused.decode_chunks(flat, (rows, e), n, layer=LAYER, source=0))
    t_dec_loop = seconds(lambda: torch.cat([fused.decode(p, (rows, e), layer=LAYER, source=0)
                                            for p in flat.split(nb)]))
    want = torch.cat([ref_cpu.encode(c, layer=LAYER, source=0) for c in xp.cpu().split(rows)])
    ref_dec = torch.cat([ref_cpu.decode(p, (rows, e), layer=LAYER, source=0) for p in want.split(nb)])
    got = fused.encode_chunks(xp, n, layer=LAYER, source=0)
    return {"two_shot_world": n, "two_shot_chunk_rows": rows,
            "two_shot_encode_chunks_us": t_enc * 1e6, "two_shot_encode_loop_us": t_enc_loop * 1e6,
            "two_shot_decode_chunks_us": t_dec * 1e6, "two_shot_decode_loop_us": t_dec_loop * 1e6,
            "two_shot_bytes_equal": bool(torch.equal(got.cpu(), want) and torch.equal(loop.cpu(), want)),
            "two_shot_decode_equal": same_bits(fused.decode_chunks(want.to(x.device), (rows, e), n, layer=LAYER,
                                                                   source=0), ref_dec)}


def _reduce_variants() -> dict:
    """Which owner stage ``reduce_encode`` runs for the static and ``rot-*`` codecs (what
    ``reduce_encode_us`` timed): ``REDUCE_VARIANT`` of their Triton kernel modules."""
    from lowbit_tp.kernels import triton_rotation, triton_static

    return {"static": triton_static.REDUCE_VARIANT, "rot": triton_rotation.REDUCE_VARIANT}


def graph_seconds(torch, fn, seconds, calls: int = 5) -> float:
    """Seconds per call of ``fn`` when ``calls`` calls are captured in one CUDA graph and
    replayed: the GPU's time alone (the host's launch cost is what the eager timings add)."""
    return seconds(capture_graph(torch, fn, calls).replay) / calls


def capture_graph(torch, fn, calls: int = 1):
    """``calls`` calls of ``fn`` captured in one CUDA graph (:func:`lowbit_tp.bench.common.capture_graph`)."""
    from lowbit_tp.bench.common import capture_graph as capture

    return capture(fn, calls)


def graph_check(torch, make, xd, shape, *, capture: bool, timer=None, times: dict | None = None) -> str:
    """Encode + decode-and-sum into preallocated buffers, eager and (on a GPU) captured once in
    a CUDA graph and replayed: the replay must write the eager payload bytes and sum bits.

    ``make(mode)`` builds the codec; the graph uses ``nonfinite="flag"`` (the per-step check
    mode: the kernels record NaN/Inf in a device flag, no host read inside the graph). A
    second replay with a NaN planted in the captured input must set that flag.

    With ``timer`` the step (``world`` encodes and one decode-and-sum) is timed eager and as a
    graph replay into ``times`` (``eager_step_us``, ``graph_step_us``): the difference is the
    host's launch cost, which a serving engine's CUDA graphs remove.
    """
    try:
        codec = make("flag")
        n = codec.payload_nbytes(shape, LAYER)
        bufs = [torch.empty(n, dtype=torch.uint8, device=xd[0].device) for _ in xd]
        total = torch.empty(shape, dtype=torch.float32, device=xd[0].device)

        def step():
            ps = [codec.encode(x, layer=LAYER, source=r, out=b) for r, (x, b) in enumerate(zip(xd, bufs))]
            codec.decode_sum(ps, shape, layer=LAYER, out=total)

        fresh = [make("propagate").encode(x, layer=LAYER, source=r) for r, x in enumerate(xd)]
        eager_sum = make("propagate").decode_sum(fresh, shape, layer=LAYER)
        step()  # eager into the buffers; also builds the tables and flags the graph will use
        codec.check_nonfinite()
        if not all(torch.equal(a, b) for a, b in zip(fresh, bufs)) or not same_bits(total, eager_sum):
            return "out= buffers differ from fresh outputs"
        if not capture:
            return "eager ok; capture n/a (cpu)"
        for b in bufs:
            b.zero_()
        total.zero_()
        g = capture_graph(torch, step)
        for b in bufs:
            b.fill_(0xA5)
        total.fill_(7.0)
        g.replay()
        torch.cuda.synchronize()
        if not all(torch.equal(a, b) for a, b in zip(fresh, bufs)):
            return "replay payload bytes differ"
        if not same_bits(total, eager_sum):
            return "replay sum differs"
        if timer is not None and times is not None:
            times["eager_step_us"] = timer(step) * 1e6
            times["graph_step_us"] = timer(g.replay) * 1e6
        codec.check_nonfinite()  # clean so far
        keep = xd[0][0, 0].clone()
        xd[0][0, 0] = float("nan")
        g.replay()
        xd[0][0, 0] = keep
        try:
            codec.check_nonfinite()
            return "replay did not flag a planted NaN"
        except Exception:
            pass
        return "ok"
    except Exception as exc:  # report, don't stop the whole check
        return f"failed: {type(exc).__name__}: {str(exc)[:80]}"


if __name__ == "__main__":
    main()
