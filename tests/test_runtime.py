"""The multi-process TP runtime against the unsharded model and the single-process simulator.

Ranks are spawned processes (gloo, CPU). Each spawn costs a few seconds of imports per
rank, so each test spawns once and checks several things in that one run.
"""
import json
import os
import time

import pytest
import torch

from lowbit_tp.collectives import CollectiveError, spawn_ranks
from helpers import reference_greedy, save_tiny
from lowbit_tp.runtime import RunConfig, SamplingConfig, rank_main, run_config, run_tp, select_token

PROMPTS = ("Hello, tensor parallel world", "ab")
NEW = 8


# ------------------------------------------------------------------ tiny checkpoints on disk
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    return {f: save_tiny(root, f) for f in ("llama", "qwen2", "gemma3")}


def _simulated_logits(path: str, prompt: str, *, tp: int, codec: str, algorithm: str, calibration=None,
                      error_feedback: bool | str = False):
    from lowbit_tp.codecs import make_codec
    from lowbit_tp.models import load_model
    from lowbit_tp.simulator import TPSimulator

    model, tok, _ = load_model(path)
    ids = torch.tensor([tok(prompt).input_ids])
    with torch.no_grad(), TPSimulator(model, tp=tp, codec=make_codec(codec, calibration=calibration),
                                      algorithm=algorithm, error_feedback=error_feedback):
        return model(ids).logits[0]


# ------------------------------------------------------------------ rank functions (module level: spawnable)
def _rank_several(rank, world, cfgs):
    """Several runs in one spawn (imports dominate the cost of a spawn)."""
    return [rank_main(rank, world, cfg) for cfg in cfgs]


def _rank_mismatch_then_several(rank, world, cfgs):
    """Rank 1 first starts with another codec (all ranks must fail at start-up, and the
    group stays usable), then all ranks run ``cfgs``."""
    from dataclasses import replace

    bad = replace(cfgs[0], codec="int4-g128", calibration=None) if rank == 1 else cfgs[0]
    try:
        rank_main(rank, world, bad)
        mismatch = "no error"
    except CollectiveError as exc:
        mismatch = str(exc)
    return mismatch, _rank_several(rank, world, cfgs)


def _die_on_rank1(step, token):
    if step == 2 and int(os.environ.get("LOWBIT_TP_TEST_RANK", "-1")) == 1:
        os._exit(3)


def _rank_dies_mid_generation(rank, world, cfg):
    os.environ["LOWBIT_TP_TEST_RANK"] = str(rank)
    t0 = time.monotonic()
    try:
        rank_main(rank, world, cfg, on_step=_die_on_rank1)
    except CollectiveError as exc:
        return {"collective_error": str(exc), "after_s": time.monotonic() - t0}
    return {"finished": True}


# ------------------------------------------------------------------ tests
def test_tp2_greedy_equals_unsharded_model_via_cli(tiny, tmp_path, capsys):
    from lowbit_tp.cli import main

    out_json = tmp_path / "run.json"
    argv = ["run", "--model", tiny["llama"], "--tp", "2", "--codec", "bf16", "--algorithm", "exact",
            "--max-new-tokens", str(NEW), "--ignore-eos", "--timeout", "30", "--json", str(out_json)]
    for p in PROMPTS:
        argv += ["--prompt", p]
    assert main(argv) == 0
    out = json.loads(out_json.read_text())
    assert out["config"]["tp"] == 2 and out["config"]["codec"] == "bf16"
    for prompt, res in zip(PROMPTS, out["results"]):
        assert res["token_ids"] == reference_greedy(tiny["llama"], prompt, NEW)
        assert len(res["decode_s"]) == NEW - 1 and res["tokens_per_s"] > 0
        # exact at TP 2: 2 layers x 2 row-parallel Linears, each sends 2(N-1)/N = 1 fp32 message
        n_prompt = len(res["prompt_ids"])
        assert res["comm"]["prefill"]["calls"] == 4
        assert res["comm"]["prefill"]["bytes_sent"] == 4 * n_prompt * 64 * 4
        assert res["comm"]["decode"]["calls"] == 4 * (NEW - 1)
    for r in out["per_rank"]:
        assert r["shard"]["shard_param_bytes"] < r["shard"]["full_param_bytes"]
    assert "rank 0 sent" in capsys.readouterr().out
    # the typed result reads the file back and writes it byte for byte
    from lowbit_tp.runtime import RunResult

    assert json.dumps(RunResult.from_json(out).to_json(), indent=2) == out_json.read_text()


# slow: 4 ranks on 2 cores, ~28 s; TP 2 runs of the same path stay in the default suite
@pytest.mark.slow
def test_tp4_greedy_and_quantized_logits_equal_simulator(tiny):
    """TP 4 > 2 KV heads (replicated KV). bf16/exact: same tokens as the unsharded model.
    int4-g32: the runtime's prefill logits are bitwise the simulator's, gather and two-shot."""
    base = dict(tp=4, prompts=PROMPTS[:1], max_new_tokens=NEW, ignore_eos=True, timeout_s=30)
    cfgs = [RunConfig(model=tiny["gemma3"], codec="bf16", algorithm="exact", **base),
            RunConfig(model=tiny["qwen2"], codec="int4-g32", algorithm="gather", keep_prefill_logits=True, **base),
            RunConfig(model=tiny["llama"], codec="int4-g32", algorithm="two-shot", keep_prefill_logits=True, **base)]
    per_rank = spawn_ranks(_rank_several, 4, cfgs, timeout_s=30, deadline_s=240)
    exact, gather, two_shot = per_rank[0]
    assert exact.results[0].token_ids == reference_greedy(tiny["gemma3"], PROMPTS[0], NEW)
    for run, cfg in ((gather, cfgs[1]), (two_shot, cfgs[2])):
        sim = _simulated_logits(cfg.model, PROMPTS[0], tp=4, codec=cfg.codec, algorithm=cfg.algorithm)
        for r in range(4):  # every rank holds bitwise the same logits
            assert torch.equal(per_rank[r][cfgs.index(cfg)].results[0].prefill_logits, sim), (cfg.algorithm, r)
        pre = run.results[0].comm.prefill
        # >= 4.5: two-shot pads the token rows to a multiple of N (29 -> 32 at N = 4), the payload shows it
        assert pre.by_algorithm == {cfg.algorithm: 4} and 4.5 <= pre.bits_per_value < 5.0
    # KV heads replicated: each rank holds 1 q head and 1 of the 2 KV heads
    assert [r[0].shard["kv_heads"] for r in per_rank] == [(0,), (0,), (1,), (1,)]


def test_error_feedback_runtime_equals_simulator(tiny):
    """--error-feedback on real ranks: prefill logits bitwise the simulator's with error
    feedback (TP 2, gather and two-shot; Llama, and Gemma 3 whose carry goes through its
    post-norms), and not the plain codec's; decode steps run. ``error_feedback="first-stage"``
    (two-shot without the owners' errors): the simulator's first-stage logits, which differ
    from full feedback's."""
    base = dict(model=tiny["llama"], tp=2, prompts=PROMPTS[:1], max_new_tokens=4, ignore_eos=True, timeout_s=30,
                codec="int4-g32", keep_prefill_logits=True, error_feedback=True)
    cfgs = [RunConfig(algorithm=a, **{**base, "model": tiny[m]}) for m in ("llama", "gemma3")
            for a in ("gather", "two-shot")]
    cfgs += [RunConfig(algorithm="two-shot", **{**base, "model": tiny[m], "error_feedback": "first-stage"})
             for m in ("llama", "gemma3")]
    per_rank = spawn_ranks(_rank_several, 2, cfgs, timeout_s=30, deadline_s=180)
    for i, cfg in enumerate(cfgs):
        sim = _simulated_logits(cfg.model, PROMPTS[0], tp=2, codec=cfg.codec, algorithm=cfg.algorithm,
                                error_feedback=cfg.error_feedback)
        plain = _simulated_logits(cfg.model, PROMPTS[0], tp=2, codec=cfg.codec, algorithm=cfg.algorithm)
        assert not torch.equal(sim, plain)
        if cfg.error_feedback == "first-stage":
            assert not torch.equal(sim, _simulated_logits(cfg.model, PROMPTS[0], tp=2, codec=cfg.codec,
                                                          algorithm=cfg.algorithm, error_feedback=True))
        for r in range(2):
            assert torch.equal(per_rank[r][i].results[0].prefill_logits, sim), (cfg.model, cfg.algorithm, r)
            assert per_rank[r][i].results[0].new_tokens == 4


def test_tp2_outlier_codec_with_calibration_equals_simulator(tiny, tmp_path):
    """The seed codec (static scales, calibrated top-k channels in bf16) end to end, plus sampling.
    Before that, in the same spawn: a rank with another codec is a clear start-up error."""
    from lowbit_tp.calibration import Calibration, StatsAccumulator
    from lowbit_tp.models import load_model
    from lowbit_tp.simulator import TPSimulator

    path = tiny["llama"]
    model, tok, info = load_model(path)
    acc = StatsAccumulator()

    def observe(layer, partials, total):
        for r, p in enumerate(partials):
            acc.update(layer, r, p)
        acc.update(layer, "sum", total)

    ids = torch.randint(2, 258, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), TPSimulator(model, tp=2, observer=observe) as sim:
        model(ids)
    cal = acc.build({"tp": 2, "hidden_size": 64, "model": {"name": path, "weights_sha256": info.weights_sha256}},
                    layers=sim.layer_names)
    cal_path = str(cal.save(tmp_path / "cal.safetensors"))

    base = dict(model=path, tp=2, prompts=PROMPTS[:1], codec="int4-outlier", calibration=cal_path,
                max_new_tokens=NEW, ignore_eos=True, timeout_s=30)
    cfgs = [RunConfig(algorithm="gather", keep_prefill_logits=True, **base),
            RunConfig(algorithm="two-shot", sampling=SamplingConfig(do_sample=True, temperature=0.8, top_p=0.9,
                                                                    seed=7), **base),
            RunConfig(algorithm="two-shot", sampling=SamplingConfig(do_sample=True, temperature=0.8, top_p=0.9,
                                                                    seed=7), **base),
            RunConfig(algorithm="two-shot", sampling=SamplingConfig(do_sample=True, temperature=0.8, top_p=0.9,
                                                                    seed=8), **base)]
    out = spawn_ranks(_rank_mismatch_then_several, 2, cfgs, timeout_s=30, deadline_s=180)
    for mismatch, _ in out:
        assert "disagree" in mismatch and "int4-outlier" in mismatch and "int4-g128" in mismatch, mismatch
    per_rank = [runs for _, runs in out]
    sim = _simulated_logits(path, PROMPTS[0], tp=2, codec="int4-outlier", algorithm="gather",
                            calibration=Calibration.load(cal_path))
    for r in range(2):
        assert torch.equal(per_rank[r][0].results[0].prefill_logits, sim)
    # sampled tokens agree across ranks, a second run with the same seed repeats them, another seed differs
    sampled = [[per_rank[r][i].results[0].token_ids for i in (1, 2, 3)] for r in range(2)]
    assert sampled[0] == sampled[1]
    assert sampled[0][0] == sampled[0][1] and len(sampled[0][0]) == NEW
    assert sampled[0][2] != sampled[0][0]
    assert per_rank[0][0].codec["calibration"] == Calibration.load(cal_path).fingerprint()


def test_calibration_for_another_tp_is_refused(tiny, tmp_path, cal_factory):
    from lowbit_tp.calibration import Calibration, CalibrationError
    from lowbit_tp.models import load_model

    cal_path = str(cal_factory(3, 64).save(tmp_path / "cal3.safetensors"))
    _, _, info = load_model(tiny["llama"])
    cfg = RunConfig(model=tiny["llama"], tp=2, prompts=("x",), codec="int4-outlier", calibration=cal_path)
    with pytest.raises(CalibrationError, match="TP degree 3"):
        Calibration.load_for(cfg.calibration, tp=2, model=info)


def test_killed_rank_gives_collective_error_on_survivor(tiny):
    cfg = RunConfig(model=tiny["llama"], tp=2, prompts=PROMPTS[:1], codec="int4-g32", algorithm="gather",
                    max_new_tokens=NEW, ignore_eos=True, timeout_s=10)
    t0 = time.monotonic()
    res = spawn_ranks(_rank_dies_mid_generation, 2, cfg, timeout_s=10, deadline_s=60, allow_failures=True)
    assert time.monotonic() - t0 < 60
    assert "died" in res[1]["error"]
    assert "collective_error" in res[0], res[0]
    assert "peer rank probably died" in res[0]["collective_error"]
    assert res[0]["after_s"] < 10 + 30  # start-up plus at most one collective timeout


def test_select_token_greedy_and_sampling():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    assert select_token(logits, SamplingConfig(), None) == 1
    top1 = SamplingConfig(do_sample=True, top_k=1, seed=0)
    assert select_token(logits, top1, torch.Generator().manual_seed(0)) == 1
    nucleus = SamplingConfig(do_sample=True, top_p=0.5)
    draws = {select_token(logits, nucleus, torch.Generator().manual_seed(s)) for s in range(20)}
    assert draws <= {1, 3}
    with pytest.raises(ValueError):
        SamplingConfig(temperature=0)


def test_run_config_rejects_a_bare_string():
    with pytest.raises(TypeError):
        RunConfig(model="m", tp=2, prompts="hello")


def test_run_config_refuses_error_feedback_on_the_exact_sum():
    # `run --codec bf16 --algorithm exact --error-feedback` ran without a word (TPSimulator refuses it)
    from lowbit_tp.configs import EvalConfig
    from lowbit_tp.errors import UserError

    with pytest.raises(UserError, match="error feedback needs a compressed all-reduce"):
        RunConfig(model="m", tp=2, prompts=("hi",), algorithm="exact", error_feedback=True)
    RunConfig(model="m", tp=2, prompts=("hi",), algorithm="exact")
    RunConfig(model="m", tp=2, prompts=("hi",), algorithm="auto", error_feedback=True)
    RunConfig(model="m", tp=2, prompts=("hi",), algorithm="two-shot", error_feedback="first-stage")
    for bad in ("on", 1, "first_stage"):  # (EvalConfig takes the same modes)
        with pytest.raises(UserError, match="error_feedback must be one of False, True, 'first-stage'"):
            RunConfig(model="m", tp=2, prompts=("hi",), error_feedback=bad)
        with pytest.raises(UserError, match="error_feedback must be one of False, True, 'first-stage'"):
            EvalConfig(tp=2, codecs=("int4-g32",), error_feedback=bad)


@pytest.mark.model
@pytest.mark.parametrize("codec,algorithm", [("bf16", "exact")])
def test_smollm2_tp3_greedy_equals_unsharded_model(codec, algorithm):
    prompts = ("The capital of France is", "def fibonacci(n):")
    out = run_tp("smollm2-135m", tp=3, prompts=prompts, codec=codec, algorithm=algorithm, max_new_tokens=16,
                 ignore_eos=True, timeout_s=120)
    for prompt, res in zip(prompts, out.results):
        assert res.token_ids == reference_greedy("smollm2-135m", prompt, 16), prompt


@pytest.mark.slow
def test_torchrun_path_runs_the_same_rank_function(tiny, tmp_path):
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    out_json = tmp_path / "tr.json"
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "lowbit_tp.cli", "run", "--model", tiny["llama"],
           "--codec", "bf16", "--algorithm", "exact", "--prompt", PROMPTS[0], "--max-new-tokens", str(NEW),
           "--ignore-eos", "--timeout", "30", "--quiet", "--json", str(out_json)]
    subprocess.run(cmd, check=True, timeout=180, capture_output=True)
    out = json.loads(out_json.read_text())
    assert out["results"][0]["token_ids"] == reference_greedy(tiny["llama"], PROMPTS[0], NEW)
    assert len(out["per_rank"]) == 2
