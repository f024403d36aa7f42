"""The codec and collective tour that ``lowbit-tp demo`` prints."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from lowbit_tp.calibration import Calibration, CalibrationError
from lowbit_tp.calibration.pipeline import calibrate
from lowbit_tp.calibration.synthetic import planted_partials, synthetic_calibration
from lowbit_tp.codecs import CODEC_ALIASES, make_codec
from lowbit_tp.collectives import CommStats, all_reduce, simulate_all_reduce, spawn_ranks
from lowbit_tp.configs import CalibrationConfig, DemoConfig, EvalConfig
from lowbit_tp.evaluation import evaluate_codecs
from lowbit_tp.models import load_model
from lowbit_tp.results import markdown_table
from lowbit_tp.runtime import run_tp

# the paper's codecs, then the two the default codec allocates to layers (without a model, no plan to show)
CODECS = ("bf16", "int8", "int4", "int4-random-k", "int4-outlier", "int4-g32", "int4-g128", "mxfp4",
          CalibrationConfig.alloc_low, CalibrationConfig.alloc_high)
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


def cached_calibration(bundle, *, tp: int, samples: int, cache_dir: str | None = None):
    """A calibration for (model, TP, samples), read from the cache or made and stored there."""
    model, _, info = bundle
    root = Path(cache_dir or os.environ.get("LOWBIT_TP_CACHE", Path.home() / ".cache" / "lowbit_tp"))
    path = root / f"{Path(info.name).name}-tp{tp}-s{samples}-{info.weights_sha256[:12]}.safetensors"
    if path.exists():
        try:
            cal = Calibration.load_for(path, tp=tp, model=info)
            print(f"reusing calibration {path}")
            return cal, path
        except CalibrationError as exc:  # a stale or damaged cache entry is rebuilt, never trusted
            print(f"recalibrating: {exc}")
    cal = calibrate(CalibrationConfig(model=info.name, tp=tp, samples=samples), bundle=bundle)
    cal.save(path)
    print(f"wrote calibration {path}")
    return cal, path


def model_demo(*, model: str = DemoConfig.model, tp: int = DemoConfig.tp, codecs=DemoConfig.codecs,
               prompts=DemoConfig.prompts, max_new_tokens: int = DemoConfig.max_new_tokens,
               cal_samples: int = DemoConfig.cal_samples, eval_samples: int = DemoConfig.eval_samples
               ) -> tuple[list[dict], str]:
    """The main job: calibrate (or reuse), measure quality, then generate on ``tp`` real ranks.

    Each codec generates greedily on ``tp`` spawned gloo ranks through the ``gather``
    collective (bf16 = 16 bits on the wire: the uncompressed baseline). Quality figures
    come from the TP simulator on held-out text; bytes and tokens/s from the runtime.
    """
    bundle = load_model(model)
    cal, cal_path = cached_calibration(bundle, tp=tp, samples=cal_samples)
    # One run per codec (``default`` and ``alloc`` are the same one), shown under the name asked for.
    first: dict[str, str] = {}
    for c in codecs:
        first.setdefault(CODEC_ALIASES.get(c, c), c)
    names = list(first.values())
    quality = evaluate_codecs(EvalConfig(model=model, tp=tp, codecs=tuple(names), samples=eval_samples, lambada=0),
                              bundle=bundle, calibration=cal)
    qrows = {r.codec: r for r in quality.rows}
    del bundle
    rows = []
    for name in names:
        print(f"\n=== {name}: generating on {tp} ranks ===", flush=True)
        res = run_tp(model, tp=tp, prompts=prompts, codec=name, calibration_path=str(cal_path), algorithm="gather",
                     max_new_tokens=max_new_tokens, ignore_eos=True, stream=True, timeout_s=120)
        gen = res.results
        dec_bytes = sum(g.comm.decode.bytes_sent for g in gen)
        dec_tokens = sum(max(len(g.decode_s), 1) for g in gen)
        q = qrows[name]
        rows.append({"codec": name, "bits_per_value": q.bits_per_value,
                     "decode_bytes_sent_per_token": dec_bytes / dec_tokens,
                     "prefill_s": sum(g.prefill_s for g in gen) / len(gen),
                     "decode_tokens_per_s": sum(g.decode_tokens_per_s for g in gen) / len(gen),
                     "ppl_increase_pct": q.ppl_increase_pct, "kl": q.kl, "top1": q.top1,
                     "text": gen[0].text.replace("\n", " ")[:70]})
    cols = ["codec", "bits_per_value", "decode_bytes_sent_per_token", "prefill_s", "decode_tokens_per_s",
            "ppl_increase_pct", "kl", "top1", "text"]
    title = (f"{model} at TP {tp}: generation on {tp} gloo ranks (gather collective), quality from the TP "
             f"simulator on {quality.rows[0].tokens} held-out tokens; prompt 0: {prompts[0]!r}\n\n")
    return rows, title + markdown_table(rows, cols)
