"""The vLLM plugin's parts that need no vLLM: config, name mapping, calibration check, the
custom op under torch.compile, and the size-gated reducer on real gloo ranks.

The end-to-end checks inside vLLM are in tests/test_vllm_engine.py (marker ``vllm``).
"""
import dataclasses
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lowbit_tp.calibration import CalibrationError
from lowbit_tp.calibration.synthetic import planted_partials, synthetic_calibration
from lowbit_tp.codecs import make_codec
from lowbit_tp.collectives import AutoPolicy, simulate_all_reduce, spawn_ranks
from lowbit_tp.errors import UserError
from lowbit_tp.integrations.vllm import op
from lowbit_tp.integrations.vllm.checkpoint import CheckpointIdentity, calibration_layer_name, check_calibration
from lowbit_tp.integrations.vllm.config import PluginConfig, resolve_config
from lowbit_tp.tp import DistReducer

LAYERS = [f"model.layers.{i}.{k}" for i in range(2) for k in ("self_attn.o_proj", "mlp.down_proj")]
HIDDEN = 128


def test_lowbit_tp_imports_no_vllm():
    import subprocess

    code = ("import sys, lowbit_tp.cli, lowbit_tp.integrations.vllm, lowbit_tp.integrations.vllm.op, "
            "lowbit_tp.integrations.vllm.engine, lowbit_tp.cli.serve, lowbit_tp.integrations.vllm.checkpoint;"
            "lowbit_tp.cli.build_parser(); print('vllm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_config_from_env_and_additional_config(monkeypatch):
    monkeypatch.setenv("LOWBIT_TP_CODEC", "int4-g32")
    monkeypatch.setenv("LOWBIT_TP_MIN_BYTES", "0")
    monkeypatch.delenv("LOWBIT_TP_ALGORITHM", raising=False)
    cfg = resolve_config(None)
    assert (cfg.codec, cfg.min_bytes, cfg.algorithm, cfg.enabled) == ("int4-g32", 0, "auto", True)
    cfg = resolve_config({"lowbit_tp": {"codec": "int4-outlier", "algorithm": "two-shot"}})
    assert (cfg.codec, cfg.algorithm, cfg.min_bytes) == ("int4-outlier", "two-shot", 0)
    assert PluginConfig.from_env(cfg.as_env()) == cfg  # round trip through the workers' environment
    with pytest.raises(ValueError, match="unknown setting"):
        resolve_config({"lowbit_tp": {"codecs": "x"}})
    with pytest.raises(ValueError, match="unknown algorithm"):
        PluginConfig(codec="bf16", algorithm="ring")
    # was taken, and the workers' reducer then sent every message uncompressed
    with pytest.raises(ValueError, match="^lowbit-tp plugin: algorithm 'exact' .* would ignore codec 'int4-g32'"):
        PluginConfig.from_env({"LOWBIT_TP_CODEC": "int4-g32", "LOWBIT_TP_ALGORITHM": "exact"})
    assert PluginConfig(codec="bf16", algorithm="exact").enabled
    monkeypatch.delenv("LOWBIT_TP_CODEC")
    assert not resolve_config({}).enabled


def test_config_errors_name_the_setting(monkeypatch):
    # were: int()'s "invalid literal for int() with base 10: 'abc'", and a string's characters
    # listed as "unknown setting(s) ['-', '2', '3', ...]"
    with pytest.raises(ValueError, match="lowbit-tp plugin: min_bytes must be an integer number of bytes, got 'abc'"):
        PluginConfig.from_env({"LOWBIT_TP_CODEC": "int4-g32", "LOWBIT_TP_MIN_BYTES": "abc"})
    # were: --additional-config's {"min_bytes": 1.9} and {"min_bytes": true} read as 1, without a word
    for bad in (1.9, True):
        with pytest.raises(ValueError, match=f"min_bytes must be an integer number of bytes, got {bad!r}"):
            PluginConfig.from_mapping({"codec": "int4-g32", "min_bytes": bad})
    assert PluginConfig.from_mapping({"min_bytes": 4096.0}).min_bytes == 4096
    monkeypatch.delenv("LOWBIT_TP_CODEC", raising=False)
    with pytest.raises(ValueError, match="lowbit-tp plugin: settings must be a mapping .* got str 'int4-g32'"):
        resolve_config({"lowbit_tp": "int4-g32"})


def test_layer_names_map_by_index_and_kind():
    assert calibration_layer_name("model.layers.1.mlp.down_proj", LAYERS) == "model.layers.1.mlp.down_proj"
    gemma = ["model.language_model.layers.3.self_attn.o_proj"]
    assert calibration_layer_name("language_model.model.layers.3.self_attn.o_proj", gemma) == gemma[0]
    assert calibration_layer_name("model.layers.7.mlp.down_proj", None) == "model.layers.7.mlp.down_proj"
    with pytest.raises(CalibrationError, match="another model"):
        calibration_layer_name("model.layers.2.mlp.down_proj", LAYERS)
    with pytest.raises(CalibrationError):  # same index, other kind
        calibration_layer_name("model.layers.0.self_attn.o_proj", ["model.layers.0.mlp.down_proj"])


def _ident(**kw):
    base = dict(directory=Path("/m"), hidden_size=HIDDEN, num_layers=2, weights_sha256=("a" * 64, "b" * 64))
    return CheckpointIdentity(**{**base, **kw})


def test_calibration_check_names_the_problem():
    cal = synthetic_calibration(LAYERS, world=3, hidden=HIDDEN, tokens=8, batches=1)
    cal.meta["model"]["weights_sha256"] = "b" * 64  # the export's GGUF hash counts as this model
    check_calibration(cal, _ident(), tp=3)
    with pytest.raises(CalibrationError, match="TP degree 3, but this run uses TP 2"):
        check_calibration(cal, _ident(), tp=2, path="c.safetensors")
    with pytest.raises(CalibrationError, match="hidden size"):
        check_calibration(cal, _ident(hidden_size=256), tp=3)
    with pytest.raises(CalibrationError, match="made for model"):
        check_calibration(cal, _ident(weights_sha256=("c" * 64,)), tp=3)
    with pytest.raises(CalibrationError, match="lacks 2 of the model's 6"):
        check_calibration(cal, _ident(num_layers=3), tp=3)


class _Fn:
    """A stand-in reducer (one process, no group) computing ``fn(partial, layer)``."""

    def __init__(self, fn):
        self.fn = fn

    def reduce(self, partials, *, layer):
        return self.fn(partials[0], layer)


def test_custom_op_compiles_fullgraph_and_matches_eager():
    op.register_reducer("unit-test", _Fn(lambda p, layer: p * 3.0 + (1.0 if layer == "L" else 0.0)))

    def f(x):
        return torch.ops.lowbit_tp.all_reduce(torch.relu(x), "L", "unit-test") + 1

    x = torch.randn(5, 8)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    assert torch.equal(compiled(x), f(x))
    torch.testing.assert_close(f(x), torch.relu(x) * 3 + 2)
    y = torch.randn(9, 8)  # another token count through the same dynamic graph
    assert torch.equal(compiled(y), f(y))
    torch.library.opcheck(torch.ops.lowbit_tp.all_reduce.default, (x, "L", "unit-test"))


def test_custom_op_output_never_aliases_input():
    op.register_reducer("identity", _Fn(lambda p, layer: p))
    x = torch.randn(3, 4)
    y = torch.ops.lowbit_tp.all_reduce(x, "L", "identity")
    assert torch.equal(x, y) and y.data_ptr() != x.data_ptr()


def _rank_reducer(rank, world, min_bytes):
    cal = synthetic_calibration([LAYERS[0]], world=world, hidden=HIDDEN, tokens=32, batches=2)
    codec = make_codec("int4-outlier", calibration=cal)
    fallback_calls = []

    def fallback(x):
        fallback_calls.append(tuple(x.shape))
        out = x.clone()
        dist.all_reduce(out)
        return out

    inner = DistReducer(codec=codec, group=None, algorithm="auto", policy=AutoPolicy(min_bytes=min_bytes))
    red = op.GatedReducer(inner=inner, rank=rank, min_bytes=min_bytes, fallback=fallback)
    op.register_reducer("gloo", red)
    big = planted_partials(world, 300, HIDDEN, seed=0, noise_seed=5)[rank]    # 2*300*128 B >= min_bytes
    small = planted_partials(world, 2, HIDDEN, seed=0, noise_seed=6)[rank]    # 512 B < min_bytes
    y_big = torch.ops.lowbit_tp.all_reduce(big, LAYERS[0], "gloo")
    y_small = torch.ops.lowbit_tp.all_reduce(small, LAYERS[0], "gloo")
    return y_big, y_small, fallback_calls, red.report()


def test_reducer_gates_by_size_and_matches_the_simulator_bitwise():
    world = 2
    res = spawn_ranks(_rank_reducer, world, 16 * 1024, timeout_s=60)
    cal = synthetic_calibration([LAYERS[0]], world=world, hidden=HIDDEN, tokens=32, batches=2)
    codec = make_codec("int4-outlier", calibration=cal)
    big = planted_partials(world, 300, HIDDEN, seed=0, noise_seed=5)
    small = planted_partials(world, 2, HIDDEN, seed=0, noise_seed=6)
    ref = simulate_all_reduce(big, codec, "gather", layer=LAYERS[0])  # what auto picks at TP 2
    assert not torch.equal(ref, torch.stack(big).sum(0))  # the codec is lossy: the check can fail
    for y_big, y_small, calls, rep in res:
        assert torch.equal(y_big, ref)
        assert calls == [(2, HIDDEN)]
        torch.testing.assert_close(y_small, torch.stack(small).sum(0))
        assert rep["calls"] == {"compressed": 1, "fallback": 1}
        assert rep["comm"]["by_algorithm"] == {"gather": 1} and rep["comm"]["bits_per_value"] < 8


def test_serve_without_vllm_is_one_clear_line(tmp_path):
    import os
    import subprocess

    env = dict(os.environ, LOWBIT_TP_VLLM_PYTHON=str(tmp_path / "missing-python"))
    proc = subprocess.run([sys.executable, "-m", "lowbit_tp.cli", "serve", "--tp", "3"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr  # a user error, like every command's
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("lowbit-tp: error: vLLM is not installed here")


def test_gated_reducer_falls_back_below_the_gate_and_writes_its_report(tmp_path):
    import json

    inner = DistReducer(codec=make_codec("bf16"), group=None)  # never reached: every message is below the gate
    red = op.GatedReducer(inner=inner, rank=2, min_bytes=1 << 40, fallback=lambda x: x * 2, report_dir=str(tmp_path))
    x = torch.randn(4, 16)
    assert torch.equal(red.reduce([x], layer="L"), x * 2)
    rep = json.loads((tmp_path / "report.rank2.json").read_text(), parse_constant=lambda t: pytest.fail(t))
    assert rep["calls"] == {"compressed": 0, "fallback": 1} and rep["rank"] == 2 and rep["comm"]["calls"] == 0
    assert rep["comm"]["bits_per_value"] is None  # nothing compressed: strict JSON's null, not NaN


def test_error_feedback_setting_reads_from_env_and_refuses_nonsense():
    cfg = PluginConfig.from_env({"LOWBIT_TP_CODEC": "int4-g32", "LOWBIT_TP_ERROR_FEEDBACK": "1"})
    assert cfg.error_feedback is True and PluginConfig.from_env(cfg.as_env()) == cfg
    assert PluginConfig.from_env({"LOWBIT_TP_CODEC": "x", "LOWBIT_TP_ERROR_FEEDBACK": "false"}).error_feedback is False
    assert resolve_config({"lowbit_tp": {"error_feedback": True}}).error_feedback is True
    with pytest.raises(ValueError, match="error_feedback must be 1/true, 0/false or first-stage"):
        PluginConfig.from_mapping({"error_feedback": "maybe"})
    # the batch-invariant mode: from the environment and additional_config, through as_env, into the chain
    first = PluginConfig.from_env({"LOWBIT_TP_CODEC": "int4-g32", "LOWBIT_TP_ERROR_FEEDBACK": "First-Stage"})
    assert first.error_feedback == "first-stage" and PluginConfig.from_env(first.as_env()) == first
    assert resolve_config({"lowbit_tp": {"error_feedback": "first-stage"}}).error_feedback == "first-stage"


def test_the_plugins_chain_maker_passes_the_feedback_mode(tmp_path):
    """``feedback_chain_maker`` (what ``layer._setup`` builds the chain with) keeps the owners'
    errors by default and leaves them out when asked (``first-stage``; through vLLM:
    tests/test_vllm_engine.py)."""
    from transformers import AutoConfig

    from helpers import save_tiny
    from lowbit_tp.integrations.vllm.checkpoint import feedback_chain_maker

    path = save_tiny(tmp_path, "llama")
    names = ["model.layers.1.mlp.down_proj", "model.layers.0.self_attn.o_proj"]
    for owner in (True, False):
        chain = feedback_chain_maker(AutoConfig.from_pretrained(path), path, tp=2, owner_errors=owner)(names)
        assert chain.owner_errors is owner and chain.order == tuple(reversed(names))
    assert chain.start(chain.order[0])[0].owner_error is False


# Forward passes as a vLLM worker sees them: rows = tokens of whatever it scheduled.
EF_PASSES = [(300, "big"), (200, "big"), (2, "small"), (300, "big")]


def _ef_pass_partials(world, p, layer_index, rows):
    return planted_partials(world, rows, HIDDEN, seed=10 * p + layer_index, noise_seed=50 + 10 * p + layer_index)


def _rank_ef_gated(rank, world, capture_dir):
    inner = DistReducer(codec=make_codec("int4-g32"), group=None, algorithm="gather")

    def fallback(x):
        out = x.clone()
        dist.all_reduce(out)
        return out

    red = op.GatedReducer(inner=inner, rank=rank, min_bytes=16 * 1024, fallback=fallback, capture_dir=capture_dir,
                          capture_layer=",".join(LAYERS[1:3]), feedback_layers=[])
    op.register_reducer("gloo-ef", red)
    red.feedback_layers.extend(reversed(LAYERS))  # as the layers are built (any order)
    outs, captured = [], []
    for p, (rows, _) in enumerate(EF_PASSES):
        outs.append([torch.ops.lowbit_tp.all_reduce(_ef_pass_partials(world, p, i, rows)[rank], layer, "gloo-ef")
                     for i, layer in enumerate(LAYERS)])
        captured.append({layer: torch.load(Path(capture_dir) / f"{layer}.rank{rank}.pt") for layer in LAYERS[1:3]})
    return outs, captured, red.report()


def test_gated_reducer_feeds_errors_forward_within_each_forward_pass(tmp_path):
    """Error feedback behind the vLLM op on gloo ranks, four forward passes of 4 layers with
    another token count each (one below the gate: vLLM's exact all-reduce, no carry):
    every compressed output is bitwise ``simulate_all_reduce`` with the carries of a chain
    replayed here (none at each pass's first layer), and the captured carries are its."""
    from lowbit_tp.collectives.feedback import Feedback

    world = 2
    res = spawn_ranks(_rank_ef_gated, world, str(tmp_path), timeout_s=60)
    codec = make_codec("int4-g32")
    for p, (rows, kind) in enumerate(EF_PASSES):
        carries = [None] * world
        for i, layer in enumerate(LAYERS):
            parts = _ef_pass_partials(world, p, i, rows)
            if kind == "small":
                for r in range(world):
                    torch.testing.assert_close(res[r][0][p][i], torch.stack(parts).sum(0))
                continue
            fbs = [Feedback(carry=c) for c in carries]
            want = simulate_all_reduce(parts, codec, "gather", layer=layer, feedback=fbs)
            if i > 0:  # the feedback acted
                assert not torch.equal(want, simulate_all_reduce(parts, codec, "gather", layer=layer))
            for r in range(world):
                assert torch.equal(res[r][0][p][i], want), (p, layer, r)
                if layer in LAYERS[1:3]:
                    got = res[r][1][p][layer]["carry"]
                    assert torch.equal(got, carries[r]) and got.shape == (rows, HIDDEN), (p, layer, r)
            carries = [f.next for f in fbs]
    for _, _, rep in res:
        assert rep["error_feedback"] is True and rep["calls"] == {"compressed": 12, "fallback": 4}


GEMMA_HIDDEN = 64  # helpers.save_tiny_gemma's hidden size


def _gemma_pass_partials(world, p, layer_index, rows):
    return planted_partials(world, rows, GEMMA_HIDDEN, seed=10 * p + layer_index, noise_seed=70 + 10 * p + layer_index)


def _rank_ef_gemma(rank, world, path):
    """The plugin's Gemma chain (``feedback_chain_maker``, as ``layer._setup`` builds it) behind
    the op, over the passes of :data:`EF_PASSES`."""
    from transformers import AutoConfig

    from lowbit_tp.integrations.vllm.checkpoint import feedback_chain_maker

    inner = DistReducer(codec=make_codec("int4-g32"), group=None, algorithm="gather")

    def fallback(x):
        out = x.clone()
        dist.all_reduce(out)
        return out

    red = op.GatedReducer(inner=inner, rank=rank, min_bytes=16 * 1024, fallback=fallback, feedback_layers=[],
                          make_chain=feedback_chain_maker(AutoConfig.from_pretrained(path), path, tp=world))
    op.register_reducer("gloo-ef-gemma", red)
    red.feedback_layers.extend(reversed(LAYERS))
    return [[torch.ops.lowbit_tp.all_reduce(_gemma_pass_partials(world, p, i, rows)[rank], layer, "gloo-ef-gemma")
             for i, layer in enumerate(LAYERS)] for p, (rows, _) in enumerate(EF_PASSES)]


@pytest.mark.parametrize("family", ["gemma3", pytest.param("gemma2", marks=pytest.mark.slow)])  # gemma2: slow suite
def test_gated_reducer_maps_gemmas_carry_through_the_post_norms(tmp_path, family):
    """Gemma 3 (and 2) error feedback behind the vLLM op on gloo ranks (norms read from the checkpoint
    by each rank): every compressed output is bitwise ``simulate_all_reduce`` with the carries
    of the post-norm chain replayed from its definition with the norms of the model loaded by
    transformers; a pass below the gate is exact and leaves no carry."""
    from helpers import gemma_post_norms, postnorm_replay, save_tiny_gemma
    from lowbit_tp.models import load_model

    world = 2
    path = save_tiny_gemma(tmp_path, family)
    res = spawn_ranks(_rank_ef_gemma, world, path, timeout_s=60)
    norms = gemma_post_norms(load_model(path)[0])
    codec = make_codec("int4-g32")
    for p, (rows, kind) in enumerate(EF_PASSES):
        parts = [_gemma_pass_partials(world, p, i, rows) for i in range(len(LAYERS))]
        if kind == "small":
            for r in range(world):
                for i in range(len(LAYERS)):
                    torch.testing.assert_close(res[r][p][i], torch.stack(parts[i]).sum(0))
            continue
        calls = [[(layer, parts[i][r], res[r][p][i]) for i, layer in enumerate(LAYERS)] for r in range(world)]
        want = postnorm_replay(calls, norms, codec, "gather", world)
        for i, w in enumerate(want):
            if i > 0:  # the feedback acted
                assert not torch.equal(w, simulate_all_reduce(parts[i], codec, "gather", layer=LAYERS[i]))
            for r in range(world):
                assert torch.equal(res[r][p][i], w), (p, LAYERS[i], r)


def test_error_feedback_preflight_needs_gemmas_post_norms_in_the_checkpoint(tmp_path):
    """Before vLLM starts: feedback on Llama and Gemma passes; a Gemma checkpoint without one
    post-norm weight is refused, naming it (the workers would read it)."""
    from safetensors.torch import load_file, save_file

    from helpers import save_tiny
    from lowbit_tp.integrations.vllm.checkpoint import preflight

    llama, gemma = save_tiny(tmp_path, "llama"), save_tiny(tmp_path, "gemma3")
    preflight(llama, tp=2, calibration=None, error_feedback=True)
    preflight(gemma, tp=2, calibration=None, error_feedback=True)
    preflight(save_tiny(tmp_path, "gemma2"), tp=2, calibration=None, error_feedback=True)
    weights = Path(gemma) / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.1.post_feedforward_layernorm.weight"]
    save_file(tensors, weights)
    preflight(gemma, tp=2, calibration=None)  # without feedback: nothing to check
    with pytest.raises(ValueError, match="no weight for the post-norm 'layers.1.post_feedforward_layernorm'"):
        preflight(gemma, tp=2, calibration=None, error_feedback=True)


def test_running_llm_shuts_the_engine_down_on_leaving(monkeypatch):
    """The engine core (and with it vLLM's worker processes) is shut down when the block is
    left, also on an error, not left to finalizers at interpreter exit."""
    from types import SimpleNamespace

    from lowbit_tp.integrations.vllm import engine as E

    calls = []
    fake = SimpleNamespace(llm_engine=SimpleNamespace(engine_core=SimpleNamespace(shutdown=lambda: calls.append(1))))
    monkeypatch.setattr(E, "make_llm", lambda *a, **k: fake)
    with E.running_llm("m", tp=2, plugin=None, engine=E.VllmEngineConfig()) as llm:
        assert llm is fake and calls == []
    assert calls == [1]
    with pytest.raises(RuntimeError, match="boom"):
        with E.running_llm("m", tp=2, plugin=None, engine=E.VllmEngineConfig()):
            raise RuntimeError("boom")
    assert calls == [1, 1]


def test_preflight_builds_the_codec_before_vllm_starts(tmp_path, monkeypatch):
    """An unknown codec name, or a static codec without a calibration, is refused before vLLM
    starts, in one line from `serve` and `run --engine vllm` (it passed the preflight and every
    worker stopped with a traceback after vLLM's 1-2 minute start-up: 397 lines)."""
    from types import SimpleNamespace

    from helpers import save_tiny
    from lowbit_tp.cli import build_parser, serve
    from lowbit_tp.configs import RunConfig
    from lowbit_tp.integrations.vllm import engine as E
    from lowbit_tp.integrations.vllm.checkpoint import preflight

    llama = save_tiny(tmp_path, "llama")
    for ok in ("bf16", "int4-g32", "mxfp4"):  # dynamic codecs need no calibration
        preflight(llama, tp=2, calibration=None, codec=ok)
    with pytest.raises(ValueError, match=r"^unknown codec 'bogus'; known codecs: bf16, "):
        preflight(llama, tp=2, calibration=None, codec="bogus")
    with pytest.raises(CalibrationError, match="'int4-outlier' uses static scales and needs a calibration"):
        preflight(llama, tp=2, calibration=None, codec="int4-outlier")

    # the two commands pass the codec to the preflight (vLLM is not imported: none is installed here)
    monkeypatch.setattr(serve, "ensure_vllm_python", lambda *a: None)
    monkeypatch.setattr(serve, "model_directory", lambda model: llama)
    args = build_parser().parse_args(["serve", "--tp", "2", "--codec", "bogus", "--dry-run"])
    with pytest.raises(UserError, match=r"^serve: unknown codec 'bogus'"):
        args.func(args)
    monkeypatch.setattr(E, "model_directory", lambda model: llama)
    with pytest.raises(ValueError, match="unknown codec 'bogus'"):
        E.run(RunConfig(model="m", tp=2, prompts=("hi",), codec="bogus"))
