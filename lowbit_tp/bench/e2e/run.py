"""The sweep: per network, TP degree and codec variant, launch the ranks and collect rows."""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from lowbit_tp.bench.common import environment
from lowbit_tp.bench.e2e.launch import launch_ranks
from lowbit_tp.bench.e2e.model import make_prompt, save_random_llama
from lowbit_tp.bench.e2e.report import NOTES, add_ratios, columns_for, render_markdown, rows_of_run
from lowbit_tp.bench.netns import emulated_link
from lowbit_tp.calibration.pipeline import calibrate
from lowbit_tp.codecs import codec_spec
from lowbit_tp.configs import CalibrationConfig, E2EConfig
from lowbit_tp.fileio import run_tempdir
from lowbit_tp.models import load_tokenizer
from lowbit_tp.preflight import check_codecs, check_model_tp
from lowbit_tp.results import markdown_table, write_results


def calibrate_for(model: str, tp: int, samples: int, out: Path, *, allocate: bool) -> str:
    """Calibrate ``model`` at TP ``tp``; with ``allocate`` also plan the per-layer bits
    (codec ``default``/``alloc`` needs that plan)."""
    cfg = CalibrationConfig(model=model, tp=tp, samples=samples, seq_len=128, batch_size=4)
    if not allocate:
        cfg = replace(cfg, allocate=None)
    cal = calibrate(cfg, progress=False)
    return str(cal.save(out))


def run_e2e_bench(cfg: E2EConfig, *, json_path: str | None = None, log=print,
                  command: str | None = None) -> dict[str, Any]:
    """Run the sweep; returns ``{"config", "environment", "rows", "markdown", ...}`` and
    writes JSON + markdown to ``json_path`` when given (headed by ``command``, when given)."""
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    rows, runs = [], []
    with run_tempdir("lowbit_tp_e2e_model_") as tmp:  # a SIGKILLed run's is removed by the next
        model = cfg.model
        if model == "random-llama":
            model = save_random_llama(Path(tmp, "random-llama"), hidden=cfg.hidden, intermediate=cfg.intermediate,
                                      layers=cfg.layers, heads=cfg.heads, kv_heads=cfg.kv_heads,
                                      max_positions=max(cfg.prompt_lens) + cfg.new_tokens + 64)
        for tp in cfg.tps:  # in the parent, one line: each rank failed with a traceback (76 lines at TP 3)
            check_model_tp(model, tp)
        tok = load_tokenizer(model)
        lens = list(cfg.prompt_lens)
        prompts = [make_prompt(tok, 64, seed=99)] + [make_prompt(tok, n, seed=k) for k in range(cfg.repeats)
                                                      for n in lens]
        prompt_lengths = [len(tok(p).input_ids) for p in prompts]
        cals = {}
        for tp in cfg.tps:
            if any(codec_spec(c).needs_calibration for c in cfg.codecs):
                t0 = time.perf_counter()
                cals[tp] = calibrate_for(model, tp, cfg.calibration_samples, Path(tmp, f"cal_tp{tp}.safetensors"),
                                      allocate=any(codec_spec(c).needs_allocation for c in cfg.codecs))
                log(f"calibrated TP {tp} in {time.perf_counter() - t0:.1f} s")
                # a codec the calibration cannot feed (e.g. 'default' where the budget was out of reach
                # for this hidden size) failed inside every rank, with a traceback
                check_codecs([c for c in cfg.codecs if codec_spec(c).needs_calibration], calibration=cals[tp], tp=tp)
        for net in cfg.networks:
            for tp in cfg.tps:
                def one(codec, algorithm, feedback, hosts, port) -> dict:
                    run_cfg = {"model": model, "tp": tp, "prompts": prompts, "codec": codec,
                               "calibration": cals.get(tp) if codec_spec(codec).needs_calibration else None,
                               "algorithm": algorithm, "max_new_tokens": cfg.new_tokens, "ignore_eos": True,
                               "timeout_s": 300.0, "threads_per_rank": cfg.threads_per_rank,
                               "sync_wire": cfg.sync_wire, "chunk_bytes": cfg.chunk_bytes,
                               "error_feedback": feedback}
                    t0 = time.perf_counter()
                    outs = launch_ranks(run_cfg, world=tp, hosts=hosts, port=port, timeout_s=cfg.run_timeout_s)
                    out = outs[0]
                    out["prompt_lengths"] = prompt_lengths
                    wall = time.perf_counter() - t0
                    runs.append({"network": net, "tp": tp, "codec": codec, "algorithm": algorithm, "error_feedback": feedback,
                                 "wall_s": wall, "load_s": out["load_s"], "loadavg_1min": os.getloadavg()[0],
                                 "per_rank_comm_total": [o["comm_total"] for o in outs]})
                    for r in rows_of_run([out], network=net, codec=codec, algorithm=algorithm, lens=lens,
                                          repeats=cfg.repeats, error_feedback=feedback):
                        log(f"  {net} tp{tp} {r.label} {r.prompt_tokens} tok: prefill "
                            f"{r.prefill_ms:.0f} ms (all-reduce {r.prefill_allreduce_ms:.0f}, wire "
                            f"{r.prefill_wire_ms:.0f}), decode {r.decode_ms_per_token:.1f} ms/token")
                    log(f"  ({wall:.0f} s)")
                    return out

                log(f"network {net}, TP {tp}")
                # rounds interleave the variants, so a slow spell of the machine hits all of them
                got: dict[tuple[str, str, bool], list[dict]] = {v: [] for v in cfg.variants()}
                with (contextlib.nullcontext(None) if net == "loopback"
                      else emulated_link(world=tp, rate=net, delay=cfg.delay)) as hosts:
                    for rnd in range(cfg.rounds):
                        for i, (codec, algorithm, feedback) in enumerate(cfg.variants()):
                            port = None if hosts is None else 29600 + rnd * len(got) + i  # None: a free one
                            got[(codec, algorithm, feedback)].append(one(codec, algorithm, feedback, hosts, port))
                for (codec, algorithm, feedback), outs in got.items():
                    rows.extend(rows_of_run(outs, network=net, codec=codec, algorithm=algorithm, lens=lens,
                                             repeats=cfg.repeats, error_feedback=feedback))
    rows = [r.to_json() for r in add_ratios(rows)]
    payload = {"config": asdict(cfg), "environment": {**environment(), "loadavg_start": load_start,
                                                      "loadavg_end": os.getloadavg()},
               "rows": rows, "runs": runs, "prompt_lengths": prompt_lengths,
               "seconds": round(time.perf_counter() - t_start, 1), "notes": NOTES}
    if command:
        payload["command"] = command
    write_results(json_path, payload, render_markdown(payload))
    payload["markdown"] = markdown_table(rows, columns_for(rows))
    return payload
