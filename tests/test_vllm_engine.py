"""lowbit-tp inside vLLM (marker ``vllm``): SmolLM2-135M (Q4_1 GGUF dequantized to fp32,
exported to HF safetensors) at TP 3 on vLLM's CPU build, ``mp`` executor.

Run with ``make test-vllm``. Each vLLM start is one subprocess under the ``.venv-vllm``
interpreter (vLLM needs its own transformers); references (simulator, calibration) are
computed here, in the main environment, independently of vLLM.

A vLLM start costs about a minute on a quiet machine (several under load), so the module
starts vLLM five times and shares each start between the tests it can serve honestly:

* ``plain``: vLLM without the plugin (eager): the reference tokens and prompt NLLs;
* the bf16/exact ``lowbit-tp run --engine vllm`` (eager): its own test;
* ``int4``: int4-outlier through the plugin in vLLM's *compiled* graph (no
  ``enforce_eager``): the bitwise collective check and the quality check;
* ``ef``: int4-outlier with error feedback (eager): the chain captured across three layers
  of one forward pass, checked bitwise, and the quality check with 8 requests batched;
* ``server``: ``lowbit-tp serve`` with the ``default`` codec: the HTTP test and the
  bitwise collective check of the default codec (captured while the server runs).

The bad-calibration test stops before vLLM starts, which is the point of it.
"""
import json
import os
import socket
import subprocess
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
    """Model, calibration (cached) and held-out token windows (8 x 128 tokens)."""
    from lowbit_tp.data import chunk_tokens, load_split
    from lowbit_tp.demo import cached_calibration
    from lowbit_tp.models import load_model

    bundle = load_model(MODEL, progress=False)
    model, tokenizer, _ = bundle
    cal, cal_path = cached_calibration(bundle, tp=TP, samples=32)
    ids = chunk_tokens(tokenizer, load_split(None).evaluation, num_samples=8, seq_len=128, seed=1).input_ids
    return {"model": model, "cal": cal, "cal_path": str(cal_path), "ids": ids, "sequences": ids.tolist()}


# Batch layouts of the 8 windows for the simulator's error-feedback runs: all in one batch, one
# by one, two batches of 4, four interleaved pairs. Each gives a forward pass another row count,
# so two-shot cuts its rows into other chunks and another rank owns (and feeds back) a row's
# second-stage error: one more draw of where the rounding falls, as vLLM's batches are.
EF_LAYOUTS = ([list(range(8))], [[i] for i in range(8)], [[0, 1, 2, 3], [4, 5, 6, 7]],
              [[0, 4], [1, 5], [2, 6], [3, 7]])


def _sim_nll(ref, codec, ef, groups) -> list[float]:
    """Per-window prompt NLL (nats/token) through the simulator, the windows run in ``groups``."""
    from lowbit_tp.codecs import make_codec
    from lowbit_tp.simulator import TPSimulator

    model, ids, out = ref["model"], ref["ids"], [0.0] * len(ref["ids"])
    for group in groups:
        built = None if codec is None else make_codec(codec, calibration=ref["cal"])
        x = ids[group]
        with torch.no_grad(), TPSimulator(model, tp=TP, codec=built, algorithm="two-shot", error_feedback=ef):
            logits = model(x).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, x[:, 1:, None])[..., 0]
        for i, v in zip(group, (-lp.mean(1)).tolist()):
            out[i] = v
    return out


@pytest.fixture(scope="module")
def sim(ref):
    """The simulator's per-window NLLs (nats/token), uncompressed and int4-outlier (two-shot, as
    the plugin's ``auto`` at TP 3 with every message compressed), all 8 windows in one batch;
    and, per batch layout of :data:`EF_LAYOUTS`, the per-window NLL change with error feedback."""
    everything = EF_LAYOUTS[0]
    out = {"exact": _sim_nll(ref, None, False, everything),
           "int4-outlier": _sim_nll(ref, "int4-outlier", False, everything)}
    out["ef_layouts"] = []
    for groups in EF_LAYOUTS:
        base = out["exact"] if groups is everything else _sim_nll(ref, None, False, groups)
        out["ef_layouts"].append([c - b for c, b in zip(_sim_nll(ref, "int4-outlier", True, groups), base)])
    # first-stage feedback is row-local: one layout stands for all (docs/bench/ef_layout_spread.md)
    out["ef_first"] = [c - b for c, b in zip(_sim_nll(ref, "int4-outlier", "first-stage", everything), out["exact"])]
    return out


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
    """int4-outlier on every message, in vLLM's compiled graph (``fullgraph=True``, the op opaque)."""
    return _captured(work, "int4-outlier", ref, "int4-outlier",
                     {"sequences": ref["sequences"], "engine": {"enforce_eager": False}})


EF_LAYERS = ("model.layers.0.self_attn.o_proj", "model.layers.5.mlp.down_proj", "model.layers.6.self_attn.o_proj")


@pytest.fixture(scope="module")
def ef(ref, work):
    """int4-outlier with error feedback on every message (eager), capturing three layers;
    the 8 windows' prompt NLLs come from one generate call (vLLM batches the requests)."""
    cap = work / "capture-ef"
    spec = {"model": MODEL, "tp": TP, "prompts": PROMPTS[:1], "max_new_tokens": 4, "sequences": ref["sequences"],
            "plugin": {"codec": "int4-outlier", "calibration": ref["cal_path"], "algorithm": "auto", "min_bytes": 0,
                       "error_feedback": True, "capture_dir": str(cap), "capture_layer": ",".join(EF_LAYERS)}}
    return _session(work, "ef", spec), cap


@pytest.fixture(scope="module")
def ef_first(ref, work):
    """The same with first-stage feedback (the plugin's ``error_feedback="first-stage"``,
    ``LOWBIT_TP_ERROR_FEEDBACK=first-stage``: no owner errors), capturing the same layers."""
    cap = work / "capture-ef-first"
    spec = {"model": MODEL, "tp": TP, "prompts": PROMPTS[:1], "max_new_tokens": 2, "sequences": ref["sequences"],
            "plugin": {"codec": "int4-outlier", "calibration": ref["cal_path"], "algorithm": "auto", "min_bytes": 0,
                       "error_feedback": "first-stage", "capture_dir": str(cap), "capture_layer": ",".join(EF_LAYERS)}}
    return _session(work, "ef-first", spec), cap


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ref, work):
    """``lowbit-tp serve`` with the default codec on every message, capturing ``LAYER``."""
    from lowbit_tp.integrations.vllm.engine import server_session

    port, cap = _free_port(), work / "capture-serve"
    env = _env() | {"LOWBIT_TP_CAPTURE_DIR": str(cap), "LOWBIT_TP_CAPTURE_LAYER": LAYER}
    cmd = [VPY, "-m", "lowbit_tp.cli", "serve", "--model", MODEL, "--tp", str(TP), "--codec", "default",
           "--calibration", ref["cal_path"], "--min-bytes", "0", "--port", str(port)]
    with server_session(cmd, port=port, log_path=work / "serve.log", env=env, cwd=REPO, timeout=TIMEOUT) as base:
        yield base, cap


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
    assert out["config"]["engine"] == "vllm"  # was the native RunConfig's "native"
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
    assert partials[0].shape[0] > 8  # a prefill of real tokens (the capture keeps the latest call)
    codec = make_codec(codec_name, calibration=ref["cal"], nonfinite="propagate")  # the plugin's default
    want = simulate_all_reduce(partials, codec, "two-shot", layer=LAYER)  # auto at TP 3, min_bytes 0
    assert not torch.equal(want, torch.stack(partials).sum(0))  # lossy codec: the comparison can fail
    for g in got:
        assert g["algorithm"] == "auto"
        assert torch.equal(g["output"], want), f"rank {g['rank']}: vLLM's collective != simulate_all_reduce"


def test_int4_outlier_collective_in_vllms_compiled_graph_equals_the_simulator_bitwise(int4, ref):
    """vLLM compiled (no enforce_eager): the custom op stays in the graph and computes, bitwise,
    what ``simulate_all_reduce`` computes from the same captured partials."""
    out, cap = int4
    assert out["spec"]["engine"] == {"enforce_eager": False}
    _check_capture(cap, ref, "int4-outlier")
    for r in out["reports"]:
        assert r["comm"]["by_algorithm"].get("two-shot", 0) > 0 and r["comm"]["bits_per_value"] < 8


def _complete(base, prompt, max_tokens):
    body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True}).encode()
    req = urllib.request.Request(base + "/completions", data=body, headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=600).read())


def test_default_codec_collective_inside_vllm_serve_equals_the_simulator_bitwise(server, ref):
    """The capture holds the layer's latest call: the last step of this request (max_tokens 1:
    the prefill of the prompt's tokens)."""
    base, cap = server
    _complete(base, PROMPTS[1], 1)
    _check_capture(cap, ref, "default")


def test_quality_change_through_vllm_matches_the_simulator(plain, int4, sim):
    """Prompt-logprob NLL on 8 held-out windows of 128 tokens: (int4-outlier - uncompressed)
    through vLLM vs through the simulator (same codec, calibration and algorithm).

    Tolerance: 3 standard errors of the per-window paired difference of the two changes,
    plus 1e-3 nats. Why not bitwise: vLLM's fp32 kernels (and its compiled graph) sum in
    another order than the HF model under the simulator, so the partials differ in the last
    bits, and a 4-bit codec turns some of those into a different rounding step; that
    spreads per window, and the paired spread measures it. The 1e-3 floor covers the
    uncompressed engines' own difference (checked below). The test can fail: the
    simulator's change must itself exceed the tolerance, so a plugin that did not compress
    (change ~0) would be caught."""
    import statistics

    v_base, v_codec = plain["quality"]["per_sequence"], int4[0]["quality"]["per_sequence"]
    s_base, s_codec = sim["exact"], sim["int4-outlier"]
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
    # ...the codec's damage is measurable at this tolerance...
    assert mean_s > noise
    # ...and the damage seen through vLLM is the simulator's, within noise.
    assert abs(mean_v - mean_s) <= noise


def test_serve_answers_a_completion_on_loopback(server):
    base, cap = server
    answer = _complete(base, PROMPTS[0], 8)
    assert answer["usage"]["completion_tokens"] == 8 and answer["choices"][0]["text"].strip()
    assert sorted(p.name for p in cap.iterdir()) == [f"{LAYER}.rank{r}.pt" for r in range(TP)]  # plugin ran


def test_serve_refuses_a_calibration_for_another_tp_degree_in_one_line(work):
    from lowbit_tp.calibration.synthetic import synthetic_calibration

    layers = [f"model.layers.{i}.{k}" for i in range(30) for k in ("self_attn.o_proj", "mlp.down_proj")]
    bad = work / "tp2.safetensors"
    synthetic_calibration(layers, world=2, hidden=576, tokens=8, batches=1).save(bad)
    proc = subprocess.run([VPY, "-m", "lowbit_tp.cli", "serve", "--model", MODEL, "--tp", str(TP), "--codec",
                           "int4-outlier", "--calibration", str(bad), "--port", str(_free_port())],
                          env=_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 2  # a user error, as in every other command
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip().splitlines() == [
        f"lowbit-tp: error: serve: calibration {bad}: calibration was made for TP degree 2, but this run uses TP 3; "
        f"recalibrate with --tp 3"]


@pytest.mark.parametrize("mode", ["full", "first-stage"])
def test_error_feedback_chain_inside_vllm_equals_the_simulator_bitwise(ef, ef_first, ref, mode):
    """The latest forward pass (the batched windows) seen at three row-parallel layers on every
    rank: the first layer got no carry (the chain starts over each pass); layer 5's
    down_proj output is bitwise ``simulate_all_reduce`` of the captured partials with the
    captured carries, and the carries it leaves are, bitwise, what layer 6's o_proj got. With
    ``first-stage`` the simulator's feedbacks leave out the owners' errors (a full chain's
    carries would not match)."""
    from lowbit_tp.codecs import make_codec
    from lowbit_tp.collectives import simulate_all_reduce
    from lowbit_tp.collectives.feedback import Feedback

    out, cap = ef if mode == "full" else ef_first
    owner = mode == "full"
    got = {layer: [torch.load(cap / f"{layer}.rank{r}.pt") for r in range(TP)] for layer in EF_LAYERS}
    first, down, nxt = (got[layer] for layer in EF_LAYERS)
    rows = down[0]["partial"].shape[0]
    assert rows > 128 and all(g["partial"].shape[0] == rows for per in got.values() for g in per)  # one pass, batched
    assert all(g["carry"] is None for g in first)
    codec = make_codec("int4-outlier", calibration=ref["cal"], nonfinite="propagate")
    for layer, seen, after in ((EF_LAYERS[1], down, nxt), (EF_LAYERS[2], nxt, None)):
        fbs = [Feedback(carry=g["carry"], owner_error=owner) for g in seen]
        assert all(f.carry is not None and f.carry.abs().max() > 0 for f in fbs)
        want = simulate_all_reduce([g["partial"] for g in seen], codec, "two-shot", layer=layer, feedback=fbs)
        assert not torch.equal(want, simulate_all_reduce([g["partial"] for g in seen], codec, "two-shot", layer=layer))
        for g in seen:
            assert torch.equal(g["output"], want), f"rank {g['rank']} at {layer}"
        if after is not None:
            for f, g in zip(fbs, after):
                assert torch.equal(g["carry"], f.next), f"rank {g['rank']}: carry into {EF_LAYERS[2]}"
    for r in out["reports"]:
        assert r["error_feedback"] is True and r["calls"]["fallback"] == 0


def test_error_feedback_quality_through_vllm_matches_the_simulator(plain, ef, int4, sim):
    """Prompt-logprob NLL change with error feedback, 8 batched requests through vLLM, against
    the simulator's; and feedback removes, through vLLM as in the simulator, most of the plain
    codec's damage.

    Tolerance. With two-shot, which rank owns a row's second-stage error, and so feeds it back
    into its next partial, depends on the forward pass's row count (the rows are cut into N
    chunks); another owner rounds its next message differently, and feedback carries that
    from layer to layer. The simulator's own change moves by up to 0.31 nats on one window
    when only the batch layout changes, while without feedback it is bitwise the same in
    every layout (docs/bench/ef_layout_spread.md). vLLM batches the 8 windows with its own row
    count, so it is one more draw, not a paired copy of the simulator. The simulator runs each of :data:`EF_LAYOUTS` (the first four tried, before
    eight random ones); the centre is the mean of those draws, and the bound is 3 standard
    errors of one draw's 8-window mean about it (plus 1e-3), the larger of two estimates: from
    the windows' spread across the draws (which assumes independent windows) and from the
    spread of the draws' means. ``scripts/ef_layout_spread.py`` measured 12 layouts
    (docs/bench/ef_layout_spread.json). The test can fail: the plain codec's change (no
    feedback) is 0.92 nats, far outside, and is checked to be."""
    import statistics

    v_base = plain["quality"]["per_sequence"]
    dv = [c - b for c, b in zip(ef[0]["quality"]["per_sequence"], v_base)]
    dv_plain = [c - b for c, b in zip(int4[0]["quality"]["per_sequence"], v_base)]
    draws = sim["ef_layouts"]
    n, k = len(dv), len(draws)
    centre = statistics.fmean(statistics.fmean(d) for d in draws)
    spread = statistics.fmean(statistics.variance(w) for w in zip(*draws))  # per window, across the draws
    of_means = statistics.variance([statistics.fmean(d) for d in draws])  # one draw's mean, directly
    noise = 3 * (max(spread / n, of_means) * (1 + 1 / k)) ** 0.5 + 1e-3
    mean_v, mean_plain = statistics.fmean(dv), statistics.fmean(dv_plain)
    print(f"\nNLL change with error feedback (nats/token) through vLLM {mean_v:+.5f}, simulator {centre:+.5f} "
          f"(layouts {', '.join(f'{statistics.fmean(d):+.4f}' for d in draws)}), bound {noise:.5f}; "
          f"without feedback through vLLM {mean_plain:+.5f}")
    assert abs(mean_v - centre) <= noise
    assert abs(mean_plain - centre) > noise  # the bound tells feedback from no feedback
    assert mean_v < 0.5 * mean_plain and mean_plain - mean_v > noise


def test_first_stage_feedback_through_vllm_is_the_simulators_paired_copy(plain, ef_first, int4, sim):
    """First-stage feedback (each rank's own encode errors only) is row-local, so, unlike full
    two-shot feedback, the simulator's per-window change does not depend on the batch layout
    and vLLM's is a paired copy of it: the tolerance is the paired one of
    :func:`test_quality_change_through_vllm_matches_the_simulator` (3 standard errors of the
    per-window difference + 1e-3). Measured (stop 27): +0.556 through vLLM, +0.511 in the
    simulator, bound 0.200 (the engines' last-bit differences, carried from layer to layer,
    spread the windows), so this bound tells first-stage from no feedback (+0.916, checked to
    be outside) but not from full feedback (+0.327); the bitwise chain test pins the mode."""
    import statistics

    ef_first = ef_first[0]
    v_base = plain["quality"]["per_sequence"]
    dv = [c - b for c, b in zip(ef_first["quality"]["per_sequence"], v_base)]
    ds = sim["ef_first"]
    diff = [a - b for a, b in zip(dv, ds)]
    n = len(diff)
    noise = 3 * statistics.stdev(diff) / n ** 0.5 + 1e-3
    mean_v, mean_s = statistics.fmean(dv), statistics.fmean(ds)
    mean_plain = statistics.fmean(c - b for c, b in zip(int4[0]["quality"]["per_sequence"], v_base))
    full = statistics.fmean(statistics.fmean(d) for d in sim["ef_layouts"])
    print(f"\nNLL change with first-stage feedback (nats/token) through vLLM {mean_v:+.5f}, simulator {mean_s:+.5f}, "
          f"paired bound {noise:.5f}; full feedback in the simulator {full:+.5f}, no feedback through vLLM "
          f"{mean_plain:+.5f}")
    assert abs(mean_v - mean_s) <= noise
    assert abs(mean_plain - mean_s) > noise and mean_v < mean_plain
    for r in ef_first["reports"]:
        assert r["error_feedback"] is True and r["calls"]["fallback"] == 0


# ------------------------------------------------------------------ Gemma 3 (post-norms) error feedback in vLLM
GEMMA, GEMMA_TP = "gemma3-270m", 2
GEMMA_EF_LAYERS = ("model.layers.0.self_attn.o_proj", "model.layers.5.mlp.down_proj", "model.layers.6.self_attn.o_proj")


@pytest.fixture(scope="module")
def gemma_windows():
    """Gemma 3 270M (Q4_K_M GGUF dequantized to fp32), its HF export (made here: the vLLM
    environment installs SmolLM2's GGUF package only) and 8 held-out windows of 128 tokens."""
    from lowbit_tp.data import chunk_tokens, load_split
    from lowbit_tp.models import load_model
    from lowbit_tp.models.export import export_hf

    model, tokenizer, _ = load_model(GEMMA, progress=False)
    ids = chunk_tokens(tokenizer, load_split(None).evaluation, num_samples=8, seq_len=128, seed=1).input_ids
    return {"model": model, "dir": str(export_hf(GEMMA)), "ids": ids}


def _gemma_plugin(ef, cap=None):
    extra = {"capture_dir": str(cap), "capture_layer": ",".join(GEMMA_EF_LAYERS)} if cap else {}
    return {"codec": "int4-g32", "algorithm": "gather", "min_bytes": 0, "error_feedback": ef, **extra}


@pytest.fixture(scope="module")
def gemma_ef(work, gemma_windows):
    """Gemma 3 270M at TP 2 in vLLM (eager), int4-g32 (gather) with error feedback on every
    message, capturing three layers; the last forward passes are the prefills of the windows
    (prompt logprobs), whose NLLs come back too."""
    cap = work / "capture-gemma-ef"
    spec = {"model": gemma_windows["dir"], "tp": GEMMA_TP, "prompts": ["The capital of France is"],
            "max_new_tokens": 2, "sequences": gemma_windows["ids"].tolist(), "plugin": _gemma_plugin(True, cap)}
    return _session(work, "gemma-ef", spec), cap


@pytest.fixture(scope="module")
def gemma_plain(work, gemma_windows):
    """The same without error feedback: the windows' NLLs."""
    spec = {"model": gemma_windows["dir"], "tp": GEMMA_TP, "sequences": gemma_windows["ids"].tolist(),
            "plugin": _gemma_plugin(False)}
    return _session(work, "gemma-plain", spec)


def test_gemma_error_feedback_inside_vllm_maps_the_carry_through_the_post_norms(gemma_ef, gemma_windows):
    """Gemma's chain inside vLLM, the latest forward pass on both ranks: the first layer got no
    share (the chain starts over each pass); layer 5's down_proj output is bitwise the
    post-norm chain's step written from its definition (tests/helpers.postnorm_step, with the
    norms of the model loaded by transformers) from the captured partials and shares, the
    shares it leaves are bitwise what layer 6's o_proj got, and that layer's output is the
    definition's too."""
    from helpers import gemma_post_norms, postnorm_step
    from lowbit_tp.codecs import make_codec
    from lowbit_tp.collectives import simulate_all_reduce

    out, cap = gemma_ef
    got = {layer: [torch.load(cap / f"{layer}.rank{r}.pt") for r in range(GEMMA_TP)] for layer in GEMMA_EF_LAYERS}
    first, down, nxt = (got[layer] for layer in GEMMA_EF_LAYERS)
    rows = down[0]["partial"].shape[0]
    assert rows >= 64 and all(g["partial"].shape[0] == rows for per in got.values() for g in per)  # a prefill
    assert all(g["carry"] is None for g in first)
    norms = gemma_post_norms(gemma_windows["model"])
    codec = make_codec("int4-g32", nonfinite="propagate")
    for layer, seen, after in ((GEMMA_EF_LAYERS[1], down, nxt), (GEMMA_EF_LAYERS[2], nxt, None)):
        shares = [g["carry"] for g in seen]
        assert all(s is not None and s.abs().max() > 0 for s in shares)
        parts = [g["partial"] for g in seen]
        want, new = postnorm_step(parts, shares, norms[layer], codec, "gather", layer)
        assert not torch.equal(want, simulate_all_reduce(parts, codec, "gather", layer=layer))
        for g in seen:
            assert torch.equal(g["output"], want), f"rank {g['rank']} at {layer}"
        if after is not None:
            for s, g in zip(new, after):
                assert torch.equal(g["carry"], s), f"rank {g['rank']}: share into {GEMMA_EF_LAYERS[2]}"
    for r in out["reports"]:
        assert r["error_feedback"] is True and r["calls"]["fallback"] == 0


def test_gemma_error_feedback_quality_through_vllm_matches_the_simulator(gemma_ef, gemma_plain, gemma_windows):
    """Prompt NLL change (nats/token) of int4-g32 with and without error feedback, 8 windows
    through vLLM vs the native simulator (TPSimulator, TP 2, gather), both against the
    simulator's uncompressed model: within 3 standard errors of the per-window paired
    difference + 1e-3 (the uncompressed NLLs of vLLM and the simulator differ in the last
    bits, as for SmolLM2); the simulator's changes must exceed that bound."""
    import statistics

    from lowbit_tp.codecs import make_codec
    from lowbit_tp.simulator import TPSimulator

    model, ids = gemma_windows["model"], gemma_windows["ids"]
    sim = {}
    with torch.no_grad():
        for key, codec, ef in (("exact", None, False), ("plain", "int4-g32", False), ("ef", "int4-g32", True)):
            with TPSimulator(model, tp=GEMMA_TP, codec=codec and make_codec(codec), algorithm="gather",
                             error_feedback=ef):
                logits = model(ids).logits.float()
            lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
            sim[key] = (-lp.mean(1)).tolist()
    n, lines = len(sim["exact"]), []
    for key, vllm in (("plain", gemma_plain), ("ef", gemma_ef[0])):
        dv = [c - b for c, b in zip(vllm["quality"]["per_sequence"], sim["exact"])]
        ds = [c - b for c, b in zip(sim[key], sim["exact"])]
        diff = [a - b for a, b in zip(dv, ds)]
        noise = 3 * statistics.stdev(diff) / n ** 0.5 + 1e-3
        mean_v, mean_s = sum(dv) / n, sum(ds) / n
        lines.append(f"{key}: vLLM {mean_v:+.5f}, simulator {mean_s:+.5f}, bound {noise:.5f}")
        assert abs(mean_v - mean_s) <= noise, lines[-1]
        assert mean_s > noise, lines[-1]
    print(f"\nGemma 3 270M TP 2 int4-g32, NLL change (nats/token) vs the simulator's uncompressed "
          f"{sum(sim['exact']) / n:.4f}: " + "; ".join(lines))
