"""Single-thread codec speed next to a same-size copy, in GB/s of the fp32 message.

Each row times, on one thread and in one interleaved loop (so that load from other
processes hits all of them alike): ``encode`` of a ``[tokens, hidden]`` fp32 message,
``decode`` of one payload, ``decode_sum`` of ``world`` payloads (the receiving side of a
gather all-reduce), and ``memcpy``: ``x.clone()``, a same-size copy that allocates its
output as the codecs do. All four are GB/s of the fp32 message (``4 * numel`` bytes), so
``encode_vs_memcpy`` and ``decode_sum_vs_memcpy`` say how close a codec runs to the
memory limit of one core. Medians over ``repeats``.

The clock is the calling thread's CPU time (``time.thread_time``), not wall time: on a
shared machine a wall clock also counts the time the process sat descheduled, which swamps
millisecond operations. With one torch thread all the work runs on the calling thread.
"""
from __future__ import annotations

import statistics
import time

import torch

from lowbit_tp.calibration.synthetic import planted_partials, synthetic_calibration
from lowbit_tp.codecs import make_codec


def _interleaved_medians(fns: dict, *, repeats: int) -> dict[str, float]:
    for fn in fns.values():  # warm-up (first-call allocations, kernel build)
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.thread_time()
            fn()
            times[k].append(time.thread_time() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def codec_throughput(codecs: list[str], *, tokens: int = 1024, hidden: int = 4096, repeats: int = 11,
                     device: str = "cpu", world: int = 2, backends: tuple[str, ...] = ("auto",)) -> list[dict]:
    """One row per (codec, backend): median GB/s of encode, decode, decode_sum and memcpy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        layer = "bench"
        cal = synthetic_calibration([layer], world=world, hidden=hidden, tokens=256, batches=1)
        xs = [p.to(device) for p in planted_partials(world, tokens, hidden, seed=0, noise_seed=1)]
        x = xs[0]
        gb = x.numel() * 4 / 1e9
        sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
        rows = []
        for name in codecs:
            for backend in backends:
                codec = make_codec(name, calibration=cal, backend=backend)
                payloads = [codec.encode(p, layer=layer, source=r) for r, p in enumerate(xs)]
                shape = tuple(x.shape)

                def run(fn):
                    def timed():
                        fn()
                        sync()
                    return timed

                t = _interleaved_medians({
                    "memcpy": run(lambda: x.clone()),
                    "encode": run(lambda: codec.encode(x, layer=layer, source=0)),
                    "decode": run(lambda: codec.decode(payloads[0], shape, layer=layer, source=0)),
                    "decode_sum": run(lambda: codec.decode_sum(payloads, shape, layer=layer)),
                }, repeats=repeats)
                g = {k: gb / v for k, v in t.items()}
                rows.append({"codec": name, "backend": codec.kernel_backend(x.device), "device": device,
                             "numel": x.numel(), "world": world,
                             "bits_per_value": 8 * payloads[0].numel() / x.numel(),
                             "memcpy_gbps": g["memcpy"], "encode_gbps": g["encode"], "decode_gbps": g["decode"],
                             "decode_sum_gbps": g["decode_sum"],
                             "encode_vs_memcpy": g["encode"] / g["memcpy"],
                             "decode_sum_vs_memcpy": g["decode_sum"] / g["memcpy"],
                             "encode_decode_gbps": gb / (t["encode"] + t["decode"])})
        return rows
    finally:
        torch.set_num_threads(threads)
