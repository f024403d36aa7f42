"""``lowbit-tp bench-e2e``: end-to-end TP generation latency per network, TP degree and codec.

Every measurement is a real TP run: ``tp`` separate processes started torchrun-style
(``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``), over gloo, each running
:func:`~lowbit_tp.runtime.engine.rank_main` on its shard. Networks:

* ``loopback``: all ranks in the root namespace, on 127.0.0.1.
* a tc rate such as ``10gbit`` or ``1gbit``: one network namespace per rank
  (:func:`~lowbit_tp.bench.netns.emulated_link`), each rank's egress shaped to that rate;
  the ranks run under ``ip netns exec``.

The ranks run :func:`_worker` (``python -m lowbit_tp.bench.e2e --worker``), which is
``lowbit-tp run``'s torchrun path plus two timers passed in as
:class:`~lowbit_tp.tp.CommHooks`: one around every row-parallel all-reduce (encode + wire +
decode + sum), one around the backend collectives inside it (``all_gather``,
``all_to_all_single``, ``all_reduce``: the wire), each preceded by a barrier timed apart as
skew (waiting for the slower rank), so the wire timer measures transfer, not imbalance.
Per prompt, rank 0 reports prefill time, per-token decode time, both timers, and the bytes
it sent (:class:`~lowbit_tp.collectives.CommStats`, counted from the payloads).

Each run generates after one warm-up prompt and then ``repeats`` times each prompt length;
the table shows medians, and ratios against the ``bf16`` ``gather`` baseline (16 bits on
the wire) of the same network, TP degree and prompt length. ``exact`` (the backend's own
all-reduce in the model dtype, fp32 on CPU: 32 bits on the wire) is reported alongside.

The default model is a Llama-shaped checkpoint with random weights, written to a temporary
directory: hidden size, head counts and the prompt length decide the communicated volume,
not the weights, so latencies are those of a real model of that shape (its outputs are
meaningless). ``--model`` takes a registry name or checkpoint directory instead.

The per-packet delay of an emulated link needs the kernel's netem qdisc; where it is missing
the links are rate-limited only (see ``scripts/netns.sh``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from lowbit_tp.argtypes import positive_int

__all__ = ["E2EConfig", "run_e2e_bench", "register", "save_random_llama"]

@dataclass(frozen=True)
class E2EConfig:
    """One benchmark sweep; recorded in the results.

    ``networks``: ``loopback`` and/or tc rates (``10gbit``); ``delay``: one-way delay per
    packet on emulated links (``0``: none; needs netem otherwise). ``codecs`` run with
    ``algorithm``; ``bf16`` always runs with ``gather`` as the baseline, and with ``exact``
    too when ``exact_baseline``. ``model``: ``random-llama`` (shape from ``hidden``,
    ``intermediate``, ``layers``, ``heads``, ``kv_heads``) or a registry name / checkpoint
    directory. ``repeats`` prompts of each length run per launch; ``rounds`` launches per
    variant, interleaved (medians pool all ``repeats * rounds``). ``sync_wire``: a barrier before each backend collective inside an all-reduce,
    so that the wire timer excludes the ranks' arrival skew (reported as ``*_skew_ms``).
    """

    networks: tuple[str, ...] = ("loopback", "10gbit", "1gbit")
    tps: tuple[int, ...] = (2,)
    codecs: tuple[str, ...] = ("int4-outlier", "int4-g32")
    algorithm: str = "gather"
    exact_baseline: bool = True
    prompt_lens: tuple[int, ...] = (2048, 512)
    new_tokens: int = 16
    repeats: int = 3
    rounds: int = 1
    model: str = "random-llama"
    hidden: int = 2048
    intermediate: int = 5632
    layers: int = 2
    heads: int = 16
    kv_heads: int = 4
    calibration_samples: int = 8
    delay: str = "0"
    threads_per_rank: int = 1
    sync_wire: bool = True
    run_timeout_s: float = 900.0

    def variants(self) -> list[tuple[str, str]]:
        """(codec, algorithm) pairs of one network and TP degree, baseline first."""
        out = [("bf16", "gather")] + ([("bf16", "exact")] if self.exact_baseline else [])
        return out + [(c, self.algorithm) for c in self.codecs if c != "bf16"]


# ----------------------------------------------------------------- model and prompts
def _byte_tokenizer():
    """Byte-level BPE without merges: ids 0/1 are <s>/</s>, then the 256 bytes; one token per byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1}
    for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet())):
        vocab[ch] = i + 2
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def save_random_llama(path: str | Path, *, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                      max_positions: int = 8192, seed: int = 0) -> str:
    """Write a Llama-shaped checkpoint with random weights (seeded) and a byte tokenizer.

    The vocabulary is the tokenizer's 258 ids, so the LM head costs almost nothing and the
    run's time is the transformer blocks' compute plus their all-reduces.
    """
    import torch
    import transformers as tf

    tok = _byte_tokenizer()
    cfg = tf.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=len(tok),
                         max_position_embeddings=max_positions, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    path = Path(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def make_prompt(tokenizer, n_tokens: int, *, seed: int = 0) -> str:
    """A text of (about) ``n_tokens`` tokens under ``tokenizer``, special tokens included.

    Exact for the byte tokenizer; for BPE tokenizers the encode/decode round trip can move
    the count by a token or two, so the results record the actual prompt length.
    """
    rng = random.Random(seed)
    words = ["tensor", "parallel", "inference", "reduces", "partial", "sums", "across", "ranks", "while",
             "the", "network", "carries", "compressed", "features", "of", "every", "layer", "and", "token"]
    text = " ".join(rng.choice(words) for _ in range(n_tokens + 16))
    ids = tokenizer(text).input_ids
    special = len(tokenizer("").input_ids)
    body = [i for i in ids if i not in set(tokenizer.all_special_ids)][: max(1, n_tokens - special)]
    return tokenizer.decode(body, skip_special_tokens=True)


# ----------------------------------------------------------------- the rank process
class _Timers:
    """Wall time inside the row-parallel all-reduces, bucketed per generated token.

    With ``sync_wire`` every backend collective inside an all-reduce is preceded by a
    barrier, timed apart as ``skew_s``: the ranks reach a collective at different times
    (uneven CPU share), and without the barrier that wait would be counted as wire time.
    """

    def __init__(self, *, sync_wire: bool = True):
        self.steps: list[dict[str, float]] = []
        self._cur = self._new()
        self.sync_wire = sync_wire

    @staticmethod
    def _new() -> dict[str, float]:
        return {"calls": 0, "all_reduce_s": 0.0, "wire_s": 0.0, "skew_s": 0.0}

    def on_step(self, step: int, token: int) -> None:
        self.steps.append(self._cur)
        self._cur = self._new()

    def around_reduce(self, layer: str, reduce):
        t0 = time.perf_counter()
        try:
            return reduce()
        finally:
            self._cur["all_reduce_s"] += time.perf_counter() - t0
            self._cur["calls"] += 1

    def around_wire(self, what: str, group, send):
        import torch.distributed as dist

        if self.sync_wire:
            t0 = time.perf_counter()
            dist.barrier(group=group)
            self._cur["skew_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        try:
            return send()
        finally:
            self._cur["wire_s"] += time.perf_counter() - t0

    def hooks(self):
        from lowbit_tp.tp.row_parallel import CommHooks

        return CommHooks(around_reduce=self.around_reduce, around_wire=self.around_wire)


def _worker(cfg_path: str, out_dir: str) -> None:
    """One rank, torchrun-style: run the config at ``cfg_path``, write ``rank{R}.json``."""
    import torch
    import torch.distributed as dist

    from lowbit_tp.collectives.launch import init_from_env
    from lowbit_tp.runtime.engine import RunConfig, rank_main

    spec = json.loads(Path(cfg_path).read_text())
    sync_wire = spec.pop("sync_wire", True)
    cfg = RunConfig(**spec)
    torch.set_num_threads(cfg.threads_per_rank)
    timers = _Timers(sync_wire=sync_wire)
    rank, world = init_from_env(backend="gloo", timeout_s=cfg.timeout_s)
    try:
        res = rank_main(rank, world, cfg, on_step=timers.on_step, hooks=timers.hooks())
        dist.barrier()
    finally:
        dist.destroy_process_group()
    n = cfg.max_new_tokens
    steps = timers.steps
    res["timers"] = [steps[i * n:(i + 1) * n] for i in range(len(cfg.prompts))]
    for r in res["results"]:
        r.pop("prompt", None)
        r.pop("text", None)
        r.pop("prompt_ids", None)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res, default=str))


# ----------------------------------------------------------------- launching a run
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(run_cfg: dict, *, world: int, hosts: list[str] | None, port: int, timeout_s: float) -> list[dict]:
    """Start ``world`` rank processes (in namespaces when ``hosts``), wait, return their JSON."""
    from lowbit_tp.bench.netns import netns_command

    with tempfile.TemporaryDirectory(prefix="lowbit_tp_e2e_") as tmp:
        cfg_path = Path(tmp, "config.json")
        cfg_path.write_text(json.dumps(run_cfg))
        procs, logs = [], []
        for r in range(world):
            env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r),
                   "MASTER_ADDR": "127.0.0.1" if hosts is None else hosts[0], "MASTER_PORT": str(port),
                   "GLOO_SOCKET_IFNAME": "lo" if hosts is None else "eth0",
                   "OMP_NUM_THREADS": str(run_cfg["threads_per_rank"]), "TOKENIZERS_PARALLELISM": "false"}
            argv = [sys.executable, "-m", "lowbit_tp.bench.e2e", "--worker", str(cfg_path), tmp]
            if hosts is not None:
                argv = netns_command(r, argv)
            log = open(Path(tmp, f"rank{r}.log"), "w")
            logs.append(log)
            procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT))
        end = time.monotonic() + timeout_s
        try:
            for p in procs:
                p.wait(max(1.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            for log in logs:
                log.close()
        outs, errors = [], []
        for r, p in enumerate(procs):
            f = Path(tmp, f"rank{r}.json")
            if p.returncode == 0 and f.exists():
                outs.append(json.loads(f.read_text()))
            else:
                tail = Path(tmp, f"rank{r}.log").read_text()[-3000:]
                errors.append(f"rank {r} (exit {p.returncode}):\n{tail}")
        if errors:
            raise RuntimeError("bench-e2e run failed:\n" + "\n".join(errors))
        return outs


# ----------------------------------------------------------------- one run -> rows
def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def _rows_of_run(outs: list[dict], *, network: str, codec: str, algorithm: str, lens: list[int],
                 repeats: int) -> list[dict]:
    """Medians over the repeats of each prompt length, pooled over the rounds ``outs`` (rank 0's
    output of each launch; its prompt 0 is the warm-up, skipped)."""
    rows = []
    out = outs[0]
    results = [r for o in outs for r in o["results"][1:]]
    timers = [t for o in outs for t in o["timers"][1:]]
    repeats = repeats * len(outs)
    for j, n in enumerate(lens):
        idx = [k * len(lens) + j for k in range(repeats)]
        res = [results[i] for i in idx]
        tim = [timers[i] for i in idx]
        pre, dec = res[0]["comm"]["prefill"], res[0]["comm"]["decode"]
        n_dec = len(res[0]["decode_s"])
        dec_steps = [s for t in tim for s in t[1:]]
        rows.append({
            "network": network, "tp": out["config"]["tp"], "codec": codec, "algorithm": algorithm,
            "bits_per_value": 8 * pre["payload_bytes"] / pre["values"] if pre["values"] else float("nan"),
            "prompt_tokens": out["prompt_lengths"][1 + j],
            "prefill_ms": 1e3 * _median([r["prefill_s"] for r in res]),
            "prefill_allreduce_ms": 1e3 * _median([t[0]["all_reduce_s"] for t in tim]),
            "prefill_wire_ms": 1e3 * _median([t[0]["wire_s"] for t in tim]),
            "prefill_skew_ms": 1e3 * _median([t[0].get("skew_s", 0.0) for t in tim]),
            "prefill_bytes_per_token": pre["bytes_sent"] / out["prompt_lengths"][1 + j],
            "decode_ms_per_token": 1e3 * _median([d for r in res for d in r["decode_s"]]),
            "decode_allreduce_ms_per_token": 1e3 * _median([s["all_reduce_s"] for s in dec_steps]),
            "decode_wire_ms_per_token": 1e3 * _median([s["wire_s"] for s in dec_steps]),
            "decode_skew_ms_per_token": 1e3 * _median([s.get("skew_s", 0.0) for s in dec_steps]),
            "decode_bytes_per_token": dec["bytes_sent"] / n_dec if n_dec else float("nan"),
            "allreduce_calls_per_token": tim[0][1]["calls"] if len(tim[0]) > 1 else tim[0][0]["calls"],
            "prefill_ms_all": [1e3 * r["prefill_s"] for r in res],
        })
        rows[-1]["decode_tokens_per_s"] = 1e3 / rows[-1]["decode_ms_per_token"]
    return rows


def _add_ratios(rows: list[dict]) -> None:
    """Speed-ups against bf16/gather of the same network, TP and prompt length (>1 = faster)."""
    base = {(r["network"], r["tp"], r["prompt_tokens"]): r for r in rows
            if r["codec"] == "bf16" and r["algorithm"] == "gather"}
    for r in rows:
        b = base.get((r["network"], r["tp"], r["prompt_tokens"]))
        if b is None:
            continue
        for key, col in (("prefill_ms", "prefill_speedup"), ("prefill_allreduce_ms", "prefill_allreduce_speedup"),
                         ("prefill_wire_ms", "prefill_wire_speedup"), ("decode_ms_per_token", "decode_speedup"),
                         ("prefill_bytes_per_token", "prefill_byte_ratio")):
            r[col] = b[key] / r[key] if r[key] else float("nan")


def _calibrate(model: str, tp: int, samples: int, out: Path, *, allocate: bool) -> str:
    """Calibrate ``model`` at TP ``tp``; with ``allocate`` also plan the per-layer bits
    (codec ``default``/``alloc`` needs that plan)."""
    from lowbit_tp.calibration.pipeline import CalibrationConfig, calibrate

    cfg = CalibrationConfig(model=model, tp=tp, samples=samples, seq_len=128, batch_size=4)
    if not allocate:
        cfg = replace(cfg, allocate=None)
    cal = calibrate(cfg, progress=False)
    return str(cal.save(out))


def run_e2e_bench(cfg: E2EConfig, *, json_path: str | None = None, log=print) -> dict[str, Any]:
    """Run the sweep; returns ``{"config", "environment", "rows", "markdown", ...}`` and
    writes JSON + markdown to ``json_path`` when given."""
    from lowbit_tp.bench.common import environment, markdown_table, write_results
    from lowbit_tp.bench.netns import emulated_link
    from lowbit_tp.codecs import codec_spec
    from lowbit_tp.models import load_tokenizer

    t_start = time.perf_counter()
    load_start = os.getloadavg()
    rows, runs = [], []
    with tempfile.TemporaryDirectory(prefix="lowbit_tp_e2e_model_") as tmp:
        model = cfg.model
        if model == "random-llama":
            model = save_random_llama(Path(tmp, "random-llama"), hidden=cfg.hidden, intermediate=cfg.intermediate,
                                      layers=cfg.layers, heads=cfg.heads, kv_heads=cfg.kv_heads,
                                      max_positions=max(cfg.prompt_lens) + cfg.new_tokens + 64)
        tok = load_tokenizer(model)
        lens = list(cfg.prompt_lens)
        prompts = [make_prompt(tok, 64, seed=99)] + [make_prompt(tok, n, seed=k) for k in range(cfg.repeats)
                                                      for n in lens]
        prompt_lengths = [len(tok(p).input_ids) for p in prompts]
        cals = {}
        for tp in cfg.tps:
            if any(codec_spec(c).needs_calibration for c in cfg.codecs):
                t0 = time.perf_counter()
                cals[tp] = _calibrate(model, tp, cfg.calibration_samples, Path(tmp, f"cal_tp{tp}.safetensors"),
                                      allocate=any(codec_spec(c).needs_allocation for c in cfg.codecs))
                log(f"calibrated TP {tp} in {time.perf_counter() - t0:.1f} s")
        for net in cfg.networks:
            for tp in cfg.tps:
                def one(codec, algorithm, hosts, port) -> dict:
                    run_cfg = {"model": model, "tp": tp, "prompts": prompts, "codec": codec,
                               "calibration": cals.get(tp) if codec_spec(codec).needs_calibration else None,
                               "algorithm": algorithm, "max_new_tokens": cfg.new_tokens, "ignore_eos": True,
                               "timeout_s": 300.0, "threads_per_rank": cfg.threads_per_rank,
                               "sync_wire": cfg.sync_wire}
                    t0 = time.perf_counter()
                    outs = _launch(run_cfg, world=tp, hosts=hosts, port=port, timeout_s=cfg.run_timeout_s)
                    out = outs[0]
                    out["prompt_lengths"] = prompt_lengths
                    wall = time.perf_counter() - t0
                    runs.append({"network": net, "tp": tp, "codec": codec, "algorithm": algorithm,
                                 "wall_s": wall, "load_s": out["load_s"], "loadavg_1min": os.getloadavg()[0],
                                 "per_rank_comm_total": [o["comm_total"] for o in outs]})
                    for r in _rows_of_run([out], network=net, codec=codec, algorithm=algorithm, lens=lens,
                                          repeats=cfg.repeats):
                        log(f"  {net} tp{tp} {codec}/{algorithm} {r['prompt_tokens']} tok: prefill "
                            f"{r['prefill_ms']:.0f} ms (all-reduce {r['prefill_allreduce_ms']:.0f}, wire "
                            f"{r['prefill_wire_ms']:.0f}), decode {r['decode_ms_per_token']:.1f} ms/token")
                    log(f"  ({wall:.0f} s)")
                    return out

                log(f"network {net}, TP {tp}")
                # rounds interleave the variants, so a slow spell of the machine hits all of them
                got: dict[tuple[str, str], list[dict]] = {v: [] for v in cfg.variants()}
                with (contextlib.nullcontext(None) if net == "loopback"
                      else emulated_link(world=tp, rate=net, delay=cfg.delay)) as hosts:
                    for rnd in range(cfg.rounds):
                        for i, (codec, algorithm) in enumerate(cfg.variants()):
                            port = _free_port() if hosts is None else 29600 + rnd * len(got) + i
                            got[(codec, algorithm)].append(one(codec, algorithm, hosts, port))
                for (codec, algorithm), outs in got.items():
                    rows.extend(_rows_of_run(outs, network=net, codec=codec, algorithm=algorithm, lens=lens,
                                             repeats=cfg.repeats))
    _add_ratios(rows)
    payload = {"config": asdict(cfg), "environment": {**environment(), "loadavg_start": load_start,
                                                      "loadavg_end": os.getloadavg()},
               "rows": rows, "runs": runs, "prompt_lengths": prompt_lengths,
               "seconds": round(time.perf_counter() - t_start, 1), "notes": NOTES}
    write_results(json_path, payload, render_markdown(payload))
    payload["markdown"] = markdown_table(rows, COLUMNS)
    return payload


NOTES = [
    "Every row is a real TP run: separate rank processes over gloo (CPU), torchrun-style env vars.",
    "Baseline: codec bf16 with algorithm gather (16 bits/value on the wire). 'exact' is the backend "
    "all-reduce in the model dtype (fp32 on CPU, 32 bits/value), shown for reference.",
    "*_allreduce_ms: wall time inside the row-parallel all-reduces (encode + wire + decode + sum + skew); "
    "*_wire_ms: inside the backend collectives only (all_gather etc.), started right after a barrier; "
    "*_skew_ms: time in that barrier, i.e. waiting for the slower rank to arrive (compute imbalance, "
    "uneven CPU share), which would otherwise be counted as wire time. The barrier adds one tiny "
    "message per collective to every row alike.",
    "Speed-ups (>1 = faster) and byte ratios are against bf16/gather of the same network, TP and prompt.",
    "Emulated networks: one network namespace per rank, each rank's egress shaped with tbf to the rate "
    "(a TCP transfer reaches ~0.95 of 1 Gbit/s and ~0.86 of 10 Gbit/s); no per-packet delay unless "
    "config.delay is set, which needs sch_netem (absent from this machine's kernel, so delay = 0 here).",
    "Compute dominates on CPU: one thread per rank runs the shard's matmuls at tens of GFLOP/s, so even on "
    "1 Gbit/s the all-reduce is a small share of prefill; compare the *_allreduce_* and *_wire_* columns "
    "for the communication itself. docs/projection.md carries the numbers to GPU interconnects.",
]


COLUMNS = ["network", "tp", "codec", "algorithm", "bits_per_value", "prompt_tokens", "prefill_ms",
           "prefill_speedup", "prefill_allreduce_ms", "prefill_allreduce_speedup", "prefill_wire_ms",
           "prefill_wire_speedup", "prefill_skew_ms", "prefill_byte_ratio", "prefill_bytes_per_token", "decode_ms_per_token",
           "decode_tokens_per_s", "decode_allreduce_ms_per_token", "decode_wire_ms_per_token",
           "decode_bytes_per_token"]


def _headline(rows: list[dict]) -> list[str]:
    """One sentence per int4-outlier row on an emulated link: its prefill speed-ups over
    bf16/gather (end to end, all-reduce, wire), byte ratio, and the all-reduce share of prefill."""
    lines = []
    for r in rows:
        if r["codec"] == "int4-outlier" and r["network"] != "loopback" and "prefill_speedup" in r:
            lines.append(f"- {r['network']}, TP {r['tp']}, {r['prompt_tokens']}-token prefill, int4-outlier vs bf16: "
                         f"end-to-end {r['prefill_speedup']:.2f}x, all-reduce time {r['prefill_allreduce_speedup']:.2f}x, "
                         f"wire time {r['prefill_wire_speedup']:.2f}x, bytes {r['prefill_byte_ratio']:.2f}x fewer; "
                         f"all-reduce share of prefill: bf16 "
                         f"{_share(rows, r, 'bf16')}, int4-outlier {r['prefill_allreduce_ms'] / r['prefill_ms']:.0%}.")
    return lines


def _share(rows, like, codec):
    for b in rows:
        if (b["network"], b["tp"], b["prompt_tokens"], b["codec"], b["algorithm"]) == (
                like["network"], like["tp"], like["prompt_tokens"], codec, "gather"):
            return f"{b['prefill_allreduce_ms'] / b['prefill_ms']:.0%}"
    return "n/a"


def render_markdown(payload: dict) -> str:
    """The markdown report of a results payload (also usable on a saved JSON)."""
    from lowbit_tp.bench.common import markdown_table

    cfg = E2EConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in payload["config"].items()})
    rows = payload["rows"]
    env = payload["environment"]
    load = env.get("loadavg_start")
    head = [
        "# End-to-end TP latency (`lowbit-tp bench-e2e`)",
        "",
        f"Model: `{cfg.model}`" + (f" (random weights; hidden {cfg.hidden}, intermediate {cfg.intermediate}, "
                                   f"{cfg.layers} layers, {cfg.heads} heads / {cfg.kv_heads} KV heads)"
                                   if cfg.model == "random-llama" else "")
        + f"; {cfg.repeats} prompts per length in each of {cfg.rounds} interleaved launch(es) per variant "
          f"(medians over all), {cfg.new_tokens} new tokens; "
          f"{cfg.threads_per_rank} thread(s) per rank; torch {env['torch']} on {env['processor']}; "
          f"sweep took {payload['seconds']:.0f} s"
        + (f"; 1-minute load average {load[0]:.1f} at the start and {env['loadavg_end'][0]:.1f} at the end "
           f"on {os.cpu_count()} CPUs (other processes share the machine)." if load else "."),
        "",
        *[f"- {n}" for n in NOTES],
        "",
        "Headline (prefill, compressed vs bf16/gather; >1 = faster):",
        "",
        *_headline(rows),
        "",
        markdown_table(rows, COLUMNS),
    ]
    return "\n".join(head)


# ----------------------------------------------------------------- command line
def register(sub) -> None:
    """Add ``bench-e2e`` to the ``lowbit-tp`` subcommands."""
    d = E2EConfig()
    p = sub.add_parser("bench-e2e", help="end-to-end TP generation latency on loopback and emulated links")
    p.add_argument("--network", action="append", help=f"loopback or a tc rate (10gbit); repeatable; default {d.networks}")
    p.add_argument("--tp", type=positive_int, action="append", help=f"repeatable; default {d.tps}")
    p.add_argument("--codec", action="append", help=f"compressed codecs, repeatable; default {d.codecs}")
    p.add_argument("--algorithm", default=d.algorithm, choices=["gather", "two-shot"])
    p.add_argument("--no-exact", action="store_true", help="skip the bf16 exact (fp32 on CPU) reference run")
    p.add_argument("--prompt-len", type=positive_int, action="append", help=f"tokens, repeatable; default {d.prompt_lens}")
    p.add_argument("--new-tokens", type=positive_int, default=d.new_tokens)
    p.add_argument("--repeats", type=positive_int, default=d.repeats, help="prompts of each length per launch")
    p.add_argument("--rounds", type=positive_int, default=d.rounds, help="launches per variant, interleaved across variants")
    p.add_argument("--model", default=d.model, help="random-llama, a registry name or a checkpoint directory")
    p.add_argument("--hidden", type=positive_int, default=d.hidden)
    p.add_argument("--intermediate", type=positive_int, default=d.intermediate)
    p.add_argument("--layers", type=positive_int, default=d.layers)
    p.add_argument("--heads", type=positive_int, default=d.heads)
    p.add_argument("--kv-heads", type=positive_int, default=d.kv_heads)
    p.add_argument("--delay", default=d.delay, help="one-way delay on emulated links, e.g. 0.5ms (needs netem)")
    p.add_argument("--threads-per-rank", type=positive_int, default=d.threads_per_rank)
    p.add_argument("--no-sync-wire", action="store_true",
                   help="no barrier before each collective (wire time then includes the ranks' skew)")
    p.add_argument("--json", help="write results here (and a .md next to it)")
    p.set_defaults(func=_cmd)


def _cmd(args) -> None:
    from lowbit_tp.fileio import check_output_path

    if args.json:
        check_output_path(args.json)
    cfg = E2EConfig()
    kw = {k: tuple(v) for k, v in (("networks", args.network), ("tps", args.tp), ("codecs", args.codec),
                                   ("prompt_lens", args.prompt_len)) if v}
    cfg = replace(cfg, **kw, algorithm=args.algorithm, exact_baseline=not args.no_exact, new_tokens=args.new_tokens,
                  repeats=args.repeats, rounds=args.rounds, model=args.model, hidden=args.hidden, intermediate=args.intermediate,
                  layers=args.layers, heads=args.heads, kv_heads=args.kv_heads, delay=args.delay,
                  threads_per_rank=args.threads_per_rank, sync_wire=not args.no_sync_wire)
    out = run_e2e_bench(cfg, json_path=args.json)
    print(out["markdown"])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="bench-e2e rank process (internal)")
    ap.add_argument("--worker", nargs=2, metavar=("CONFIG_JSON", "OUT_DIR"), required=True)
    _worker(*ap.parse_args().worker)
