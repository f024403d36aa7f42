"""lowbit-tp inside vLLM (marker ``vllm``): SmolLM2-135M (Q4_1 GGUF dequantized to fp32,
exported to HF safetensors) at TP 3 on vLLM's CPU build, ``mp`` executor.

Run with ``make test-vllm``. Each vLLM start is one subprocess under the ``.venv-vllm``
interpreter (vLLM needs its own transformers); references (simulator, calibration) are
computed here, in the main environment, independently of vLLM.
"""
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[1]
_VENV_PY = REPO / ".venv-vllm" / "bin" / "python"
VPY = os.environ.get("LOWBIT_TP_VLLM_PYTHON") or (str(_VENV_PY) if _VENV_PY.is_file() else None)
if VPY is None:
    pytest.skip("no vLLM environment: run `make setup-vllm` (scripts/setup_vllm.sh) or set LOWBIT_TP_VLLM_PYTHON",
                allow_module_level=True)

MODEL, TP = "smollm2-135m", 3
PROMPTS = ["The capital of France is", "To be, or not to be, that is the question:"]
NEW_TOKENS = 24
LAYER = "model.layers.5.mlp.down_proj"  # the layer whose collective is captured inside vLLM
TIMEOUT = 1200


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    for k in list(env):
        if k.startswith("LOWBIT_TP_") and k not in ("LOWBIT_TP_CACHE", "LOWBIT_TP_VLLM_PYTHON"):
            env.pop(k)
    return env


def _check(proc, what):
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def _session(tmp: Path, name: str, spec: dict) -> dict:
    spec_path, out_path = tmp / f"{name}.spec.json", tmp / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run([VPY, "-m", "lowbit_tp.integrations.vllm.engine", str(spec_path), str(out_path)],
                          env=_env(), capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO)
    _check(proc, f"vLLM session {name}")
    return json.loads(out_path.read_text())


@pytest.fixture(scope="module")
def ref():
    """Calibration (cached), held-out token windows, and the simulator's NLLs on them."""
    from lowbit_tp.data import chunk_tokens, load_split
    from lowbit_tp.demo import cached_calibration
    from lowbit_tp.models import load_model
    from lowbit_tp.simulator import TPSimulator

    bundle = load_model(MODEL, progress=False)
    model, tokenizer, _ = bundle
    cal, cal_path = cached_calibration(bundle, tp=TP, samples=32)
    ids = chunk_tokens(tokenizer, load_split(None).evaluation, num_samples=8, seq_len=128, seed=1).input_ids
    sim = {}
    for codec in (None, "int4-outlier"):
        with torch.no_grad(), TPSimulator(model, tp=TP, codec=codec, algorithm="two-shot", calibration=cal):
            logits = model(ids).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        sim[codec or "exact"] = (-lp.mean(1)).tolist()
    return {"cal": cal, "cal_path": str(cal_path), "sequences": ids.tolist(), "sim": sim}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("vllm")


@pytest.fixture(scope="module")
def plain(ref, work):
    """vLLM without the plugin: greedy tokens and prompt NLLs."""
    return _session(work, "plain", {"model": MODEL, "tp": TP, "plugin": None, "prompts": PROMPTS,
                                    "max_new_tokens": NEW_TOKENS, "sequences": ref["sequences"]})


def _captured(work, name, ref, codec, extra=None):
    cap = work / f"capture-{name}"
    spec = {"model": MODEL, "tp": TP, "prompts": PROMPTS[:1], "max_new_tokens": 4,
            "plugin": {"codec": codec, "calibration": ref["cal_path"], "algorithm": "auto", "min_bytes": 0,
                       "capture_dir": str(cap), "capture_layer": LAYER}, **(extra or {})}
    return _session(work, name, spec), cap


@pytest.fixture(scope="module")
def int4(ref, work):
    return _captured(work, "int4-outlier", ref, "int4-outlier", {"sequences": ref["sequences"]})


def test_bf16_exact_through_the_plugin_gives_vllms_tokens(plain, work):
    """`lowbit-tp run --engine vllm` with bf16/exact on every message == vLLM without the plugin."""
    out_path = work / "run-bf16.json"
    cmd = [VPY, "-m", "lowbit_tp.cli", "run", "--engine", "vllm", "--model", MODEL, "--tp", str(TP),
           "--codec", "bf16", "--algorithm", "exact", "--min-bytes", "0", "--max-new-tokens", str(NEW_TOKENS),
           "--ignore-eos", "--quiet", "--json", str(out_path)]
    for p in PROMPTS:
        cmd += ["--prompt", p]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO)
    _check(proc, "lowbit-tp run --engine vllm")
    out = json.loads(out_path.read_text())
    assert out["engine"] == "vllm" and len(out["results"]) == len(PROMPTS)
    for mine, theirs in zip(out["results"], plain["results"]):
        assert mine["token_ids"] == theirs["token_ids"] and len(mine["token_ids"]) == NEW_TOKENS
        assert {"prompt", "token_ids", "text", "finish_reason", "new_tokens", "tokens_per_s"} <= set(mine)
    reports = out["per_rank"]
    assert sorted(r["rank"] for r in reports) == [0, 1, 2]
    for r in reports:  # every row-parallel call went through the plugin (min_bytes 0), as an exact all-reduce
        assert r["calls"]["fallback"] == 0 and r["calls"]["compressed"] > 0
        assert r["comm"]["by_algorithm"] == {"exact": r["calls"]["compressed"]}


def _check_capture(cap, ref, codec_name):
    from lowbit_tp.codecs import make_codec
    from lowbit_tp.collectives import simulate_all_reduce

    got = [torch.load(cap / f"{LAYER}.rank{r}.pt") for r in range(TP)]
    partials = [g["partial"] for g in got]
    assert partials[0].dim() == 2 and partials[0].shape[1] == 576 and partials[0].dtype == torch.float32
    codec = make_codec(codec_name, calibration=ref["cal"])
    want = simulate_all_reduce(partials, codec, "two-shot", layer=LAYER)  # auto at TP 3, min_bytes 0
    assert not torch.equal(want, torch.stack(partials).sum(0))  # lossy codec: the comparison can fail
    for g in got:
        assert g["algorithm"] == "auto"
        assert torch.equal(g["output"], want), f"rank {g['rank']}: vLLM's collective != simulate_all_reduce"


def test_int4_outlier_collective_inside_vllm_equals_the_simulator_bitwise(int4, ref):
    out, cap = int4
    _check_capture(cap, ref, "int4-outlier")
    for r in out["reports"]:
        assert r["comm"]["by_algorithm"].get("two-shot", 0) > 0 and r["comm"]["bits_per_value"] < 8


def test_default_codec_collective_inside_vllm_equals_the_simulator_bitwise(ref, work):
    out, cap = _captured(work, "default", ref, "default")
    _check_capture(cap, ref, "default")


def test_quality_change_through_vllm_matches_the_simulator(plain, int4, ref):
    """Prompt-logprob NLL on held-out text: (int4-outlier - uncompressed) in vLLM vs in the simulator."""
    import statistics

    v_base, v_codec = plain["quality"]["per_sequence"], int4[0]["quality"]["per_sequence"]
    s_base, s_codec = ref["sim"]["exact"], ref["sim"]["int4-outlier"]
    dv = [c - b for c, b in zip(v_codec, v_base)]
    ds = [c - b for c, b in zip(s_codec, s_base)]
    diff = [a - b for a, b in zip(dv, ds)]
    n = len(diff)
    noise = 3 * statistics.stdev(diff) / n ** 0.5 + 1e-3
    mean_v, mean_s = sum(dv) / n, sum(ds) / n
    print(f"\nNLL change (nats/token) through vLLM {mean_v:+.5f}, simulator {mean_s:+.5f}, noise bound {noise:.5f}; "
          f"uncompressed NLL vLLM {sum(v_base) / n:.4f} vs simulator {sum(s_base) / n:.4f}")
    # The engines agree uncompressed (fp32 both; different kernels, so not bitwise)...
    assert abs(sum(v_base) / n - sum(s_base) / n) < 1e-3
    # ...and the codec's damage seen through vLLM is the simulator's, within noise.
    assert abs(mean_v - mean_s) <= noise


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_a_completion_on_loopback(ref, work):
    port = _free_port()
    cap = work / "capture-serve"
    env = _env() | {"LOWBIT_TP_CAPTURE_DIR": str(cap), "LOWBIT_TP_CAPTURE_LAYER": LAYER}
    log = open(work / "serve.log", "w")
    proc = subprocess.Popen([VPY, "-m", "lowbit_tp.cli", "serve", "--model", MODEL, "--tp", str(TP),
                             "--codec", "int4-outlier", "--calibration", ref["cal_path"], "--min-bytes", "0",
                             "--port", str(port)], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        end = time.monotonic() + TIMEOUT
        while True:
            assert proc.poll() is None, "server exited:\n" + (work / "serve.log").read_text()[-5000:]
            assert time.monotonic() < end, "server not ready in time"
            try:
                urllib.request.urlopen(base + "/models", timeout=5).read()
                break
            except OSError:
                time.sleep(3)
        body = json.dumps({"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0,
                           "ignore_eos": True}).encode()
        req = urllib.request.Request(base + "/completions", data=body, headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=300).read())
        assert answer["usage"]["completion_tokens"] == 8 and answer["choices"][0]["text"].strip()
        assert sorted(p.name for p in cap.iterdir()) == [f"{LAYER}.rank{r}.pt" for r in range(TP)]  # plugin ran
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the session this test started
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        log.close()


def test_serve_refuses_a_calibration_for_another_tp_degree_in_one_line(work):
    from lowbit_tp.calibration.synthetic import synthetic_calibration

    layers = [f"model.layers.{i}.{k}" for i in range(30) for k in ("self_attn.o_proj", "mlp.down_proj")]
    bad = work / "tp2.safetensors"
    synthetic_calibration(layers, world=2, hidden=576, tokens=8, batches=1).save(bad)
    proc = subprocess.run([VPY, "-m", "lowbit_tp.cli", "serve", "--model", MODEL, "--tp", str(TP), "--codec",
                           "int4-outlier", "--calibration", str(bad), "--port", str(_free_port())],
                          env=_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip().splitlines() == [
        f"lowbit-tp serve: calibration {bad}: calibration was made for TP degree 2, but this run uses TP 3; "
        f"recalibrate with --tp 3"]


def test_compiled_graph_runs_the_op_and_keeps_vllms_tokens(plain, work):
    """Without enforce_eager (vLLM compiles with fullgraph=True): the custom op stays in the graph."""
    out = _session(work, "compiled", {"model": MODEL, "tp": TP, "prompts": PROMPTS, "max_new_tokens": NEW_TOKENS,
                                      "engine": {"enforce_eager": False},
                                      "plugin": {"codec": "bf16", "algorithm": "exact", "min_bytes": 0}})
    for mine, theirs in zip(out["results"], plain["results"]):
        assert mine["token_ids"] == theirs["token_ids"]
    for r in out["reports"]:
        assert r["calls"]["compressed"] > 0 and r["calls"]["fallback"] == 0
