"""lowbit-tp inside Hugging Face transformers' tensor parallelism, on real gloo ranks.

* ``lowbit-tp run --engine transformers`` with bf16/exact gives the unsharded model's greedy
  tokens, and the same JSON fields as the native engine;
* with quantized codecs, every row-parallel output inside transformers' TP equals
  ``simulate_all_reduce`` of all ranks' partials of that call, bitwise; the layer names the
  style reports are the simulator's (a static codec needs them for its scales).
"""
import json

import pytest
import torch

from helpers import RecordingReducer, reference_greedy, save_tiny
from lowbit_tp.collectives import simulate_all_reduce, spawn_ranks

PROMPTS = ("Hello, tensor parallel world", "ab")
NEW = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny_hf"), "llama")


def test_run_engine_transformers_equals_unsharded_and_native_fields(tiny, tmp_path):
    """The native engine's JSON is a :class:`RunResult` that reads back and writes byte for
    byte (test_runtime); the transformers engine's must be too: the strict round trip
    (unknown or missing fields raise, defaults would show) means the same fields, with no
    second (native) run here."""
    from lowbit_tp.cli import main
    from lowbit_tp.models import load_model
    from lowbit_tp.runtime import RunResult

    out_json = tmp_path / "transformers.json"
    argv = ["run", "--engine", "transformers", "--model", tiny, "--tp", "2", "--codec", "bf16", "--algorithm",
            "exact", "--max-new-tokens", str(NEW), "--ignore-eos", "--timeout", "60", "--quiet", "--json", str(out_json)]
    for p in PROMPTS:
        argv += ["--prompt", p]
    assert main(argv) == 0
    hf = json.loads(out_json.read_text())
    assert hf["config"]["engine"] == "transformers"
    assert json.dumps(RunResult.from_json(hf).to_json(), indent=2) == out_json.read_text()
    assert len(hf["per_rank"]) == 2
    for prompt, res in zip(PROMPTS, hf["results"]):
        assert res["token_ids"] == reference_greedy(tiny, prompt, NEW), prompt
        assert res["comm"]["prefill"]["calls"] == 4  # 2 decoder layers x (o_proj, down_proj)
    full = sum(p.numel() * p.element_size() for p in load_model(tiny)[0].parameters())
    assert hf["per_rank"][1]["shard"]["shard_param_bytes"] < full


def _rank_records(rank, world, path, runs):
    """For each (codec, algorithm, calibration): load under transformers' TP, one forward."""
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    from lowbit_tp.codecs import make_codec
    from lowbit_tp.integrations.transformers import register_lowbit_rowwise, tp_plan
    from lowbit_tp.tp import DistReducer

    out = []
    ids = torch.randint(0, 260, (2, 9), generator=torch.Generator().manual_seed(3))
    for codec_name, algorithm, cal in runs:
        rec = RecordingReducer(DistReducer(codec=make_codec(codec_name, calibration=cal), algorithm=algorithm))
        register_lowbit_rowwise(reducer=rec)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                     distributed_config=DistributedConfig(tp_size=world,
                                                                                          tp_plan=tp_plan()))
        with torch.no_grad():
            model(ids)
        out.append(rec.calls)
    return out


def test_collective_outputs_inside_transformers_tp_equal_simulate_all_reduce(tiny, cal_factory):
    from lowbit_tp.calibration.synthetic import synthetic_calibration
    from lowbit_tp.codecs import make_codec
    from lowbit_tp.models import get_adapter, load_model

    model, _, _ = load_model(tiny)
    names = [l.name for l in get_adapter(model).row_parallel_layers(model)]
    cal = synthetic_calibration(names, world=2, hidden=64, tokens=32, batches=1)
    runs = [("int4-outlier", "gather", cal), ("int4-g32", "two-shot", None)]
    per_rank = spawn_ranks(_rank_records, 2, tiny, runs, timeout_s=60, deadline_s=240)
    for i, (codec_name, algorithm, c) in enumerate(runs):
        codec = make_codec(codec_name, calibration=c)
        calls = [per_rank[r][i] for r in range(2)]
        assert [layer for layer, _, _ in calls[0]] == names  # tagged with the simulator's names, in order
        for j, name in enumerate(names):
            partials = [calls[r][j][1] for r in range(2)]
            ref = simulate_all_reduce(partials, codec, algorithm, layer=name)
            exact = partials[0] + partials[1]
            assert not torch.equal(ref, exact)  # the codec really quantized
            for r in range(2):
                assert torch.equal(calls[r][j][2], ref), (codec_name, name, r)


@pytest.mark.model
def test_smollm2_tp3_transformers_engine_greedy_equals_unsharded(tmp_path):
    from lowbit_tp.cli import main

    prompt = "The capital of France is"
    out_json = tmp_path / "hf.json"
    argv = ["run", "--engine", "transformers", "--model", "smollm2-135m", "--tp", "3", "--codec", "bf16",
            "--algorithm", "exact", "--prompt", prompt, "--max-new-tokens", "24", "--ignore-eos", "--quiet",
            "--timeout", "180", "--json", str(out_json)]
    assert main(argv) == 0
    out = json.loads(out_json.read_text())
    assert out["results"][0]["token_ids"] == reference_greedy("smollm2-135m", prompt, 24)
