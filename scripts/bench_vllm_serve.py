"""Throughput of `lowbit-tp serve` (vLLM, CPU build) at TP 3, with and without compression,
and the share of generation time spent in the all-reduce.

    PYTHONPATH=. .venv/bin/python scripts/bench_vllm_serve.py [--concurrency 8] [--new-tokens 32]

Model: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to fp32, exported to HF safetensors).
Workload: ``--concurrency`` requests sent at once, each a different held-out window of
``--prompt-tokens`` tokens, greedy, EOS ignored, ``--new-tokens`` new tokens; ``--rounds``
rounds after one warm-up request. Two measurements, each its own vLLM start:

1. HTTP: `lowbit-tp serve` with ``--codec none`` (vLLM's own all-reduce) and with
   ``int4-outlier`` (size gate 64 KiB: prefill compressed, batched decode messages left
   to vLLM). Output tokens/s over the whole rounds.
2. Offline (``vllm.LLM``, same batch): the plugin's reducer times every row-parallel
   all-reduce in the workers. ``vllm-own``: every message to vLLM's own all-reduce (gate
   at infinity), so its time is measured by the same wrapper; then int4-outlier with
   the 64 KiB gate and with every message compressed.
Writes docs/bench/vllm_serve.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lowbit_tp.bench.common import environment  # noqa: E402
from lowbit_tp.results import markdown_table, write_results  # noqa: E402

MODEL, TP = "smollm2-135m", 3
GATE = 64 * 1024


def vllm_python() -> str:
    py = os.environ.get("LOWBIT_TP_VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")
    if not Path(py).is_file():
        raise SystemExit("no vLLM environment: run `make setup-vllm`")
    return py


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOWBIT_TP_") or k == "LOWBIT_TP_CACHE"}
    env["PYTHONPATH"] = str(REPO)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float = 900) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=timeout).read())


def serve_throughput(py, *, codec, cal_path, prompts, new_tokens, rounds, log_dir) -> dict:
    port = free_port()
    cmd = [py, "-m", "lowbit_tp.cli", "serve", "--model", MODEL, "--tp", str(TP), "--codec", codec,
           "--port", str(port)]
    if codec != "none":
        cmd += ["--calibration", cal_path]
    log = open(Path(log_dir) / f"serve-{codec}.log", "w")
    proc = subprocess.Popen(cmd, env=child_env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        t0 = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited; see {log.name}")
            try:
                urllib.request.urlopen(base + "/models", timeout=5).read()
                break
            except OSError:
                time.sleep(3)
        startup = time.monotonic() - t0
        body = {"model": MODEL, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
        post(base + "/completions", {**body, "prompt": prompts[0], "max_tokens": 2})  # warm-up
        walls, latencies, tokens = [], [], 0
        for _ in range(rounds):
            results = [None] * len(prompts)

            def one(i):
                t = time.perf_counter()
                ans = post(base + "/completions", {**body, "prompt": prompts[i]})
                results[i] = (ans["usage"]["completion_tokens"], time.perf_counter() - t)

            threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
            t = time.perf_counter()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            walls.append(time.perf_counter() - t)
            tokens += sum(r[0] for r in results)
            latencies += [r[1] for r in results]
        return {"startup_s": startup, "walls_s": walls, "new_tokens": tokens, "tokens_per_s": tokens / sum(walls),
                "mean_latency_s": sum(latencies) / len(latencies)}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server session this script started
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        log.close()


def offline_share(py, *, plugin, prompts, new_tokens, rounds, work) -> dict:
    spec = {"model": MODEL, "tp": TP, "plugin": plugin, "batch_prompt_ids": prompts,
            "max_new_tokens": new_tokens, "repeats": rounds}
    name = f"{plugin['codec']}-{plugin['min_bytes']}"
    sp, op = Path(work) / f"{name}.spec.json", Path(work) / f"{name}.out.json"
    sp.write_text(json.dumps(spec))
    proc = subprocess.run([py, "-m", "lowbit_tp.integrations.vllm.engine", str(sp), str(op)], env=child_env(),
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"offline session {name} failed:\n{proc.stderr[-4000:]}")
    out = json.loads(op.read_text())
    wall = sum(out["batch"]["walls_s"])
    reps = out["reports"]
    # per rank: seconds inside the all-reduce (either path) over the timed generate calls
    shares = [(r["seconds"]["compressed"] + r["seconds"]["fallback"]) / wall for r in reps]
    r0 = next(r for r in reps if r["rank"] == 0)
    return {"tokens_per_s": out["batch"]["tokens_per_s"], "wall_s": wall,
            "allreduce_share": sum(shares) / len(shares), "allreduce_share_per_rank": shares,
            "compressed_calls": r0["calls"]["compressed"], "fallback_calls": r0["calls"]["fallback"],
            "compressed_s": r0["seconds"]["compressed"], "fallback_s": r0["seconds"]["fallback"],
            "bits_per_value": r0["comm"]["bits_per_value"], "by_algorithm": r0["comm"]["by_algorithm"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default=str(REPO / "docs" / "bench" / "vllm_serve.json"))
    args = ap.parse_args()

    from lowbit_tp.data import chunk_tokens, load_split
    from lowbit_tp.demo import cached_calibration
    from lowbit_tp.models import load_model

    bundle = load_model(MODEL, progress=False)
    _, cal_path = cached_calibration(bundle, tp=TP, samples=32)
    prompts = chunk_tokens(bundle[1], load_split(None).evaluation, num_samples=args.concurrency,
                           seq_len=args.prompt_tokens, seed=7).input_ids.tolist()
    del bundle
    py = vllm_python()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_vllm_") as work:
        for codec, label in (("none", "vLLM's own all-reduce (no plugin)"), ("int4-outlier", "int4-outlier, gate 64 KiB")):
            r = serve_throughput(py, codec=codec, cal_path=str(cal_path), prompts=prompts, new_tokens=args.new_tokens,
                                 rounds=args.rounds, log_dir=work)
            rows.append({"measurement": "HTTP serve", "config": label, **r})
            print(rows[-1], flush=True)
        for plugin, label in (
                ({"codec": "bf16", "algorithm": "exact", "min_bytes": 1 << 50}, "vLLM's own all-reduce (timed by the gate)"),
                ({"codec": "int4-outlier", "calibration": str(cal_path), "algorithm": "auto", "min_bytes": GATE},
                 "int4-outlier, gate 64 KiB"),
                ({"codec": "int4-outlier", "calibration": str(cal_path), "algorithm": "auto", "min_bytes": 0},
                 "int4-outlier, every message")):
            r = offline_share(py, plugin=plugin, prompts=prompts, new_tokens=args.new_tokens, rounds=args.rounds,
                              work=work)
            rows.append({"measurement": "offline LLM", "config": label, **r})
            print(rows[-1], flush=True)
    base_http = rows[0]["tokens_per_s"]
    base_off = rows[2]["tokens_per_s"]
    for r in rows:
        r["vs_uncompressed"] = r["tokens_per_s"] / (base_http if r["measurement"] == "HTTP serve" else base_off)
    cols = ["measurement", "config", "tokens_per_s", "vs_uncompressed", "allreduce_share", "compressed_calls",
            "fallback_calls", "bits_per_value"]
    title = (f"# vLLM serve at TP {TP} on this CPU ({MODEL}, fp32)\n\n"
             f"{args.concurrency} concurrent requests x {args.prompt_tokens} prompt tokens -> {args.new_tokens} new "
             f"tokens, {args.rounds} rounds. `allreduce_share`: mean over ranks of the seconds inside the "
             f"row-parallel all-reduce over the generate wall time. Command: "
             f"`PYTHONPATH=. .venv/bin/python scripts/bench_vllm_serve.py`\n\n")
    table = title + markdown_table(rows, cols)
    write_results(args.json, {"environment": environment(), "args": vars(args), "rows": rows}, table)
    print(table)


if __name__ == "__main__":
    main()
