"""The codec and collective tour that ``lowbit-tp demo`` prints."""
from __future__ import annotations

import time

import torch

from lowbit_tp.bench.common import markdown_table
from lowbit_tp.calibration.synthetic import planted_partials, synthetic_calibration
from lowbit_tp.codecs import make_codec
from lowbit_tp.collectives import CommStats, all_reduce, simulate_all_reduce, spawn_ranks

CODECS = ("bf16", "int8", "int4", "int4-random-k", "int4-outlier", "int4-g32", "int4-g128", "mxfp4")
LAYER = "demo.o_proj"


def _rank(rank, world, tokens, hidden):
    cal = synthetic_calibration([LAYER], world=world, hidden=hidden, tokens=256, batches=2)
    x = planted_partials(world, tokens, hidden, seed=0, noise_seed=42)[rank]
    out = {}
    for name in CODECS:
        codec = make_codec(name, calibration=cal)
        for algo in ("gather", "two-shot"):
            st = CommStats()
            t0 = time.perf_counter()
            y = all_reduce(x, codec, algorithm=algo, layer=LAYER, stats=st)
            out[(name, algo)] = (y, st.as_dict(), time.perf_counter() - t0)
    return out


def codec_demo(*, world: int = 2, tokens: int = 512, hidden: int = 4096) -> tuple[list[dict], str]:
    """Run every codec through both collectives on ``world`` real gloo ranks.

    Partials are synthetic, with planted consistent outlier channels; the table shows the
    measured bits/value and bytes, the error against the exact sum, and whether the
    multi-process result equals the single-process reference bit for bit.
    """
    results = spawn_ranks(_rank, world, tokens, hidden, timeout_s=120)
    cal = synthetic_calibration([LAYER], world=world, hidden=hidden, tokens=256, batches=2)
    partials = planted_partials(world, tokens, hidden, seed=0, noise_seed=42)
    exact = torch.stack(partials).sum(0)
    rows = []
    for name in CODECS:
        codec = make_codec(name, calibration=cal)
        for algo in ("gather", "two-shot"):
            y, st, secs = results[0][(name, algo)]
            ref = simulate_all_reduce(partials, codec, algo, layer=LAYER)
            same = all(torch.equal(r[(name, algo)][0], ref) for r in results)
            rel = float((y - exact).norm() / exact.norm())
            rows.append({"codec": name, "algorithm": algo, "bits_per_value": st["bits_per_value"],
                         "bytes_sent_per_rank": st["bytes_sent"], "rel_error": rel,
                         "bitwise_equal_to_simulator": same})
    cols = ["codec", "algorithm", "bits_per_value", "bytes_sent_per_rank", "rel_error", "bitwise_equal_to_simulator"]
    title = (f"TP {world} over gloo, {tokens} x {hidden} partials with planted outlier channels "
             f"(bf16 ring all-reduce would send {2 * (world - 1) * tokens * hidden * 2 // world} bytes per rank)\n\n")
    return rows, title + markdown_table(rows, cols)
