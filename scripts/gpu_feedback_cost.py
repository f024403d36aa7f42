"""Error feedback's cost on one GPU (or one CPU thread): a rank's codec work per all-reduce, with and without it.

Feedback (``lowbit_tp.collectives.feedback``) adds to each rank's encode: the carry added to
the partial (fp32), a decode of the rank's own payload, and ``sent - decoded`` with non-finite
values zeroed (``gather_encode_feedback``). The decode-and-sum of the N payloads does not
change. Per codec, world N and shape, on the device:

* **identity**: the payload and the next carry of ``gather_encode_feedback`` on the device
  (``backend="triton"``) equal the CPU reference's (``backend="reference"``) bit for bit, with
  a carry from a previous call and NaN/Inf planted (``nonfinite="propagate"``), for fp32 and
  bf16 partials, at each ``--check-tokens`` row count (default 257, where every tile is
  ragged, and 2048, where the timed full-tile path runs); the row's fields hold if all do;
* **time** (GPU time alone: 5 calls captured in one CUDA graph, median of ``--repeats``
  replays, as scripts/gpu_check.py's ``graph_*`` columns; eager per-call times too):
  ``encode_us`` (``gather_encode`` into a preallocated payload), ``encode_feedback_us``
  (``gather_encode_feedback`` with a carry: the codec's ``Codec.encode_feedback`` where ``fused``:
  one kernel for the static codecs and, since stop 26, for ``int4-g32``/``int4-g128``/``mxfp4`` at an
  even E; the encode, then the decode kernel writing the difference, for ``rot-*``),
  ``encode_feedback_two_kernel_us`` (that encode-then-difference-decode pass, with the carry
  added first: three launches with a carry; the base ``Codec.encode_feedback``, where the codec has it on this backend: the group codecs'
  path before stop 26, timed in the same run; empty for the static codecs),
  ``encode_feedback_unfused_us`` (the general path: carry added,
  encode, decode, difference), ``decode_sum_us`` (N payloads into a
  preallocated sum) and a same-size fp32 ``copy_us``. ``feedback_extra_us`` is the
  difference of the two encodes; ``feedback_of_codec`` divides it by encode + decode-and-sum,
  the rank's codec time per all-reduce without feedback.

**Two-shot** (the same codec and world): ``two_shot_encode_us`` / ``two_shot_encode_feedback_us``
(the rank's N row chunks, plain and with the carry: one ``Codec.encode_feedback`` per chunk
since stop 25), ``two_shot_reduce_us`` / ``two_shot_reduce_feedback_us`` (the owner's chunk:
the N copies decoded, summed and re-encoded; with feedback also the re-encode's error) and
``two_shot_decode_us`` (the N reduced chunks, into a preallocated result). ``two_shot_equal``: the first stage's payloads
and next carry on clean and on planted partials, and an owner's payload and error, bitwise the
reference's. ``two_shot_feedback_of_codec`` divides what
feedback adds to the first two by the three plain times' sum. ``*_feedback_unfused_us``: the
general path of the same step (before stop 25: the carry added, encode, decode, difference).

Every call with feedback gets a ``Feedback.spare`` (as a :class:`FeedbackChain` gives from a
pass's third all-reduce on), so the next carry is written into an existing buffer.

The partials are fp32 (as gpu_check's); the wire time is not part of this: on a link, the
all-reduce's time also holds the transfer, which feedback does not change.

    PYTHONPATH=. python3 scripts/gpu_feedback_cost.py --out DIR                        # GPU
    PYTHONPATH=. python3 scripts/gpu_feedback_cost.py --device cpu --out /tmp/fb_dry   # dry run, interpreter
    PYTHONPATH=. python3 scripts/gpu_feedback_cost.py --device cpu --backend cpu --out DIR \
        --shapes 2048x2048 --worlds 2,4                                                # the CPU kernels, timed

Writes ``DIR/gpu_feedback_cost.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from lowbit_tp.bench.device_script import command_line, device_name, open_device, parse_shapes, same_bits, write_json

CODECS = ["int4-outlier", "rot-lm4-g64-lg8-k4", "rot-int6-g64-lg8-k4"]
LAYER = "L"
COLUMNS = ["codec", "world", "tokens", "hidden", "payload_equal", "next_equal", "fused", "copy_us", "encode_us",
           "encode_feedback_us", "encode_feedback_two_kernel_us", "encode_feedback_unfused_us", "decode_sum_us", "feedback_extra_us", "feedback_of_codec", "eager_encode_us",
           "eager_encode_feedback_us", "eager_decode_sum_us", "eager_feedback_of_codec", "two_shot_equal",
           "two_shot_encode_us", "two_shot_encode_feedback_us", "two_shot_reduce_us", "two_shot_reduce_feedback_us",
           "two_shot_decode_us", "two_shot_feedback_of_codec", "two_shot_encode_feedback_unfused_us",
           "two_shot_reduce_feedback_unfused_us", "error"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu = dry run under TRITON_INTERPRET=1 on tiny shapes (checks the script, not speed), "
                         "unless --backend cpu")
    ap.add_argument("--backend", choices=("triton", "cpu"), default="triton",
                    help="cpu (with --device cpu): time the C++ CPU kernels on one thread, no interpreter")
    ap.add_argument("--shapes", default=None, help="TxE list (default 2048x8192,8192x8192; cpu 3x96)")
    ap.add_argument("--worlds", default="2,8")
    ap.add_argument("--codecs", default=",".join(CODECS))
    ap.add_argument("--check-tokens", default=None,
                    help="identity check row counts, comma-separated (default 257,2048; cpu 5)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 10; cpu 1)")
    ap.add_argument("--budget-s", type=float, default=None, help="start no new row after this many seconds")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.backend == "cpu" and args.device != "cpu":
        sys.exit("gpu_feedback_cost: --backend cpu needs --device cpu")
    dry = args.device == "cpu" and args.backend == "triton"
    dev = open_device("gpu_feedback_cost", args.device, interpret=dry)  # TRITON_INTERPRET before any kernel import
    import torch

    if args.backend == "cpu":
        torch.set_num_threads(1)  # one rank's thread, as the CPU kernels run in bench-e2e

    from lowbit_tp.bench.common import device_seconds, eager_seconds
    from lowbit_tp.calibration.synthetic import planted_partials, synthetic_calibration
    from lowbit_tp.codecs import make_codec
    from lowbit_tp.collectives.algorithms import gather_encode, gather_encode_feedback
    from lowbit_tp.collectives.feedback import Feedback

    shapes = parse_shapes(args.shapes or ("3x96" if dry else "2048x8192,8192x8192"))
    worlds = [int(w) for w in args.worlds.split(",")]
    check_tokens = [int(v) for v in (args.check_tokens or ("5" if dry else "257,2048")).split(",")]
    repeats = args.repeats or (1 if dry else 10)

    def seconds(fn) -> float:  # eager, per call: the host's launch cost included
        return eager_seconds(fn, dev, repeats=repeats)

    def gpu_seconds(fn) -> float:  # the GPU's time alone (on CPU, the eager time)
        return device_seconds(fn, dev, repeats=repeats)

    rows, t_start = [], time.time()
    for world in worlds:
        for name in [c for c in args.codecs.split(",") if c]:
            for t, e in shapes:
                row = {"codec": name, "world": world, "tokens": t, "hidden": e}
                rows.append(row)
                if args.budget_s is not None and time.time() - t_start > args.budget_s:
                    row["error"] = "skipped: budget"
                    continue
                try:
                    row.update(measure(torch, make_codec, planted_partials, synthetic_calibration, gather_encode,
                                       gather_encode_feedback, Feedback, name, world, t, e, dev, check_tokens,
                                       seconds, gpu_seconds, same_bits, identity=(t, e) == shapes[0],
                                       backend=args.backend))
                except Exception as exc:  # the other rows stand
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
                print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    device = device_name(dev, "cpu (interpreter)" if dry else
                         f"cpu, C++ kernels, one thread ({platform.processor() or platform.machine()})")
    write(rows, Path(args.out), device=device, command=command_line("gpu_feedback_cost", argv), repeats=repeats)


def measure(torch, make_codec, planted_partials, synthetic_calibration, gather_encode, gather_encode_feedback,
            Feedback, name, world, t, e, dev, check_tokens, seconds, graph_seconds, same_bits, *, identity,
            backend: str = "triton") -> dict:
    from lowbit_tp.collectives import algorithms as A
    from lowbit_tp.collectives.feedback import compensate, feedback_of

    cal = synthetic_calibration([LAYER], world=world, hidden=e, tokens=64, batches=1)
    fused = make_codec(name, calibration=cal, nonfinite="propagate", backend=backend)
    row: dict = {}
    if identity:  # a carry from a previous call, then NaN/Inf planted in the partial
        ref = make_codec(name, calibration=cal, nonfinite="propagate", backend="reference")
        row.update(payload_equal=True, next_equal=True, two_shot_equal=True, identity_tokens=list(check_tokens),
                   identity_dtypes=["float32", "bfloat16"])
        for n in check_tokens:
            prev, x = planted_partials(2, n, e, seed=0, noise_seed=11)
            x[1, 5], x[n - 1, e - 2] = float("nan"), float("-inf")
            fr0 = Feedback()
            gather_encode_feedback(ref, prev, fr0, layer=LAYER, rank=0)
            for dtype in (torch.float32, torch.bfloat16):  # the partial's dtype; the carry stays fp32
                xd = x.to(dtype)
                fr, fd = Feedback(carry=fr0.next), Feedback(carry=fr0.next.to(dev))
                want = gather_encode_feedback(ref, xd, fr, layer=LAYER, rank=0)
                got = gather_encode_feedback(fused, xd.to(dev), fd, layer=LAYER, rank=0)
                row["payload_equal"] = row["payload_equal"] and bool(torch.equal(want, got.cpu()))
                row["next_equal"] = row["next_equal"] and same_bits(fr.next, fd.next)
            ok = True  # two-shot's first stage on clean and on planted partials, then an owner's stage
            for xx in (prev, x):  # (NaN/Inf hand the static codecs' CPU kernel to the general path)
                fr, fd = Feedback(carry=fr0.next), Feedback(carry=fr0.next.to(dev))
                want = A.two_shot_encode_feedback(ref, xx, fr, layer=LAYER, rank=0, world=world)
                got = A.two_shot_encode_feedback(fused, xx.to(dev), fd, layer=LAYER, rank=0, world=world)
                ok = ok and all(torch.equal(w, g.cpu()) for w, g in zip(want, got)) and same_bits(fr.next, fd.next)
            chunk = (A.chunk_rows(n, world), e)
            want = A.two_shot_reduce_feedback(ref, want, chunk, layer=LAYER)
            got = A.two_shot_reduce_feedback(fused, [g for g in got], chunk, layer=LAYER)
            row["two_shot_equal"] = row["two_shot_equal"] and bool(
                ok and torch.equal(want[0], got[0].cpu()) and same_bits(want[1], got[1]))
    xs = [v.to(dev) for v in planted_partials(world, t, e, seed=0, noise_seed=4)]
    payloads = [fused.encode(v, layer=LAYER, source=r) for r, v in enumerate(xs)]
    first = Feedback()
    gather_encode_feedback(fused, xs[-1], first, layer=LAYER, rank=0)  # a realistic carry: a real error
    spare = torch.empty(t, e, device=dev)  # a chain's steady state: next into a dead buffer
    fb = Feedback(carry=first.next, spare=spare)
    pbuf, sbuf, dst = torch.empty_like(payloads[0]), torch.empty(t, e, device=dev), torch.empty_like(xs[0])

    def enc():
        gather_encode(fused, xs[0], layer=LAYER, rank=0, out=pbuf)

    def enc_fb():
        gather_encode_feedback(fused, xs[0], fb, layer=LAYER, rank=0, out=pbuf)

    from lowbit_tp.codecs.base import Codec

    def enc_fb_two_kernel():  # the encode, then the decode kernel writing the difference (Codec's own)
        Codec.encode_feedback(fused, xs[0], fb.carry, layer=LAYER, source=0, out=pbuf, next_out=spare)

    two_kernel = Codec.encode_feedback(fused, xs[0], fb.carry, layer=LAYER, source=0) is not None

    def enc_fb_unfused():  # the general path: the carry added, encode, decode, the difference
        sent = compensate(xs[0], fb.carry)
        feedback_of(sent, fused.decode(fused.encode(sent, layer=LAYER, source=0, out=pbuf), (t, e), layer=LAYER,
                                       source=0))

    def dec():
        fused.decode_sum(payloads, (t, e), layer=LAYER, out=sbuf)

    rows = A.chunk_rows(t, world)
    chunk = (rows, e)
    flat = torch.empty(world * fused.payload_nbytes(chunk, LAYER), dtype=torch.uint8, device=dev)
    owner = [A.two_shot_encode(fused, v, layer=LAYER, rank=r, world=world)[0] for r, v in enumerate(xs)]
    rbuf = torch.empty_like(owner[0])
    sums = torch.cat([fused.reduce_encode(owner, chunk, layer=LAYER)] * world)

    def ts_enc():
        A.two_shot_encode(fused, xs[0], layer=LAYER, rank=0, world=world, out=flat)

    def ts_enc_fb():
        A.two_shot_encode_feedback(fused, xs[0], fb, layer=LAYER, rank=0, world=world, out=flat)

    def ts_enc_fb_unfused():  # the general path: the carry added, the chunks encoded, decoded, the difference
        sent = compensate(xs[0], fb.carry)
        got = fused.encode_chunks(A._pad_rows(sent, world), world, layer=LAYER, source=0, out=flat)
        feedback_of(sent, fused.decode_chunks(got, chunk, world, layer=LAYER, source=0)[:t])

    def ts_red_fb_unfused():  # decode-and-sum, encode, decode, the difference
        total = fused.decode_sum(owner, chunk, layer=LAYER)
        feedback_of(total, fused.decode(fused.encode(total, layer=LAYER, source="sum", out=rbuf), chunk, layer=LAYER,
                                        source="sum"))

    def ts_red():
        A.two_shot_reduce(fused, owner, chunk, layer=LAYER, out=rbuf)

    def ts_red_fb():
        A.two_shot_reduce_feedback(fused, owner, chunk, layer=LAYER, out=rbuf)

    res = torch.empty(t, e, device=dev)

    def ts_dec():  # into the result, as the in-place runtime decodes (a fresh [T, E] each call would time
        A.two_shot_decode(fused, list(sums.chunk(world)), chunk, t, layer=LAYER, flat=sums, out=res)  # malloc)

    g = {k: graph_seconds(f) for k, f in (("copy", lambda: dst.copy_(xs[0])), ("enc", enc), ("enc_fb", enc_fb),
                                            ("enc_fb_unfused", enc_fb_unfused), ("dec", dec), ("ts_enc", ts_enc),
                                            ("ts_enc_fb", ts_enc_fb), ("ts_red", ts_red), ("ts_red_fb", ts_red_fb),
                                            ("ts_dec", ts_dec), ("ts_enc_fb_unfused", ts_enc_fb_unfused),
                                            ("ts_red_fb_unfused", ts_red_fb_unfused))
         + ((("enc_fb_two", enc_fb_two_kernel),) if two_kernel else ())}
    ts_plain = g["ts_enc"] + g["ts_red"] + g["ts_dec"]
    eager = {k: seconds(f) for k, f in (("enc", enc), ("enc_fb", enc_fb), ("dec", dec))}
    row.update({
        "copy_us": g["copy"] * 1e6, "encode_us": g["enc"] * 1e6, "encode_feedback_us": g["enc_fb"] * 1e6,
        "encode_feedback_unfused_us": g["enc_fb_unfused"] * 1e6,
        "encode_feedback_two_kernel_us": g["enc_fb_two"] * 1e6 if two_kernel else None,
        "fused": codec_fused(fused, xs[0], fb.carry),
        "decode_sum_us": g["dec"] * 1e6, "feedback_extra_us": (g["enc_fb"] - g["enc"]) * 1e6,
        "feedback_of_codec": (g["enc_fb"] - g["enc"]) / (g["enc"] + g["dec"]),
        "eager_encode_us": eager["enc"] * 1e6, "eager_encode_feedback_us": eager["enc_fb"] * 1e6,
        "eager_decode_sum_us": eager["dec"] * 1e6,
        "eager_feedback_of_codec": (eager["enc_fb"] - eager["enc"]) / (eager["enc"] + eager["dec"]),
        "two_shot_encode_us": g["ts_enc"] * 1e6, "two_shot_encode_feedback_us": g["ts_enc_fb"] * 1e6,
        "two_shot_reduce_us": g["ts_red"] * 1e6, "two_shot_reduce_feedback_us": g["ts_red_fb"] * 1e6,
        "two_shot_decode_us": g["ts_dec"] * 1e6,
        "two_shot_encode_feedback_unfused_us": g["ts_enc_fb_unfused"] * 1e6,
        "two_shot_reduce_feedback_unfused_us": g["ts_red_fb_unfused"] * 1e6,
        "two_shot_feedback_of_codec": (g["ts_enc_fb"] - g["ts_enc"] + g["ts_red_fb"] - g["ts_red"]) / ts_plain,
    })
    return row


def codec_fused(codec, x, carry) -> bool:
    """Whether ``gather_encode_feedback`` takes the codec's one-pass path here (``Codec.encode_feedback``):
    one fused kernel for the static codecs and, since stop 26, for the group codecs and ``mxfp4``
    at an even E (before: from stop 25, the encode, then a decode written as the difference, two
    kernels; an odd E still takes those two); for ``rot-*`` (since after run 3) those two kernels.
    So the ``fused`` rows of later runs differ from stop 24's; ``encode_feedback_two_kernel_us``
    times the two-kernel pass where the codec has it."""
    return codec.encode_feedback(x, carry, layer=LAYER, source=0) is not None


def _reduce_variants() -> dict:
    """The static and ``rot-*`` codecs' owner stage (what ``two_shot_reduce_us`` timed)."""
    from lowbit_tp.kernels import triton_rotation, triton_static

    return {"static": triton_static.REDUCE_VARIANT, "rot": triton_rotation.REDUCE_VARIANT}


def write(rows, out: Path, *, device: str, command: str, repeats: int) -> None:
    write_json(out / "gpu_feedback_cost.json", {"device": device, "command": command, "repeats": repeats, "rows": rows,
                                                "reduce_variants": _reduce_variants()})

    def cell(v):
        if v is None:
            return ""
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    timing = ("DRY RUN under the Triton interpreter: times are meaningless" if device == "cpu (interpreter)" else
              f"per call, median of {repeats}, one thread (graph columns = eager on a CPU)" if device.startswith("cpu")
              else f"GPU time alone (CUDA graph, 5 calls a replay, median of {repeats}); eager_* per call, host launch "
              "cost included")
    lines = [f"Device: {device}; {timing}.", f"Command: `{command}`", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    (out / "gpu_feedback_cost.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
