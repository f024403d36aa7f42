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

from helpers import RecordingReducer, gemma_post_norms, postnorm_replay, reference_greedy, save_tiny, save_tiny_gemma
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


# ------------------------------------------------------------------ error feedback inside transformers' TP
EF_IDS = [[5, 72, 101, 108, 108, 111, 44, 32, 116, 112, 33]]  # 11 byte tokens
EF_NEW = 4


def _assert_ranks_follow_the_feedback_simulator(model, codec, algo, ranks, steps: int, mode=True) -> None:
    """Each rank's greedy run (logits per step, tokens) against the native simulator with
    feedback ``mode``: the same tokens, prefill logits bitwise, decode steps within 1e-6; and
    the simulator without feedback differs at every step (the feedback acted)."""
    from lowbit_tp.simulator import TPSimulator

    with TPSimulator(model, tp=2, codec=codec, algorithm=algo, error_feedback=mode):
        sim, sim_tokens = _greedy_steps(model, steps)
    with TPSimulator(model, tp=2, codec=codec, algorithm=algo):
        plain, _ = _greedy_steps(model, steps)
    for r, (logits, tokens) in enumerate(ranks):
        assert tokens == sim_tokens, (algo, r)
        assert torch.equal(logits[0], sim[0]), (algo, r)
        for step, (a, b, off) in enumerate(zip(logits, sim, plain)):
            assert (a - b).abs().max() <= 1e-6, (algo, r, step)
            assert (b - off).abs().max() > 1e-3, (algo, step)  # the feedback acted at every step


def _greedy_steps(model, n):
    """Prefill of ``EF_IDS`` then ``n - 1`` one-token decode steps with a KV cache (each a
    forward pass of its own): every step's logits (prefill: all rows) and the greedy tokens."""
    import inspect

    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ids, cache, logits, tokens = torch.tensor(EF_IDS), None, [], []
    for _ in range(n):
        out = model(input_ids=ids, use_cache=True, **{cache_kw: cache})
        cache = getattr(out, cache_kw)
        logits.append(out.logits[0].clone())
        tokens.append(int(out.logits[0, -1].argmax()))
        ids = torch.tensor([[tokens[-1]]])
    return logits, tokens


def _rank_ef(rank, world, path, algorithms):
    """Per algorithm: through the CLI's start-up (engine transformers, --error-feedback) the
    step logits; through the style with a recording reducer every collective call
    (layer, own partial, result). Then `run`'s own generation (rank_main)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    from lowbit_tp.codecs import make_codec
    from lowbit_tp.collectives.feedback import FeedbackChain
    from lowbit_tp.integrations.transformers import register_lowbit_rowwise, tp_plan
    from lowbit_tp.runtime import RunConfig, rank_main
    from lowbit_tp.runtime.startup import start_rank
    from lowbit_tp.tp import DistReducer
    from lowbit_tp.tp.plan import DECODER_PLAN

    steps, calls = [], []
    for algo in algorithms:
        started = start_rank(rank, world, model=path, tp=world, codecs=["int4-g32"], calibration=None, algorithm=algo,
                             engine="transformers", error_feedback=True)
        with torch.no_grad():
            steps.append(_greedy_steps(started.model, EF_NEW))
        rec = RecordingReducer(DistReducer(codec=make_codec("int4-g32"), algorithm=algo))
        register_lowbit_rowwise(reducer=rec)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                     distributed_config=DistributedConfig(tp_size=world,
                                                                                          tp_plan=tp_plan()))
        names = [n for n, _ in model.named_modules() if n.endswith(("o_proj", "down_proj"))]
        rec.inner.feedback = FeedbackChain(DECODER_PLAN.forward_order(reversed(names)), ranks=1)
        with torch.no_grad():
            _greedy_steps(model, EF_NEW)
        calls.append(rec.calls)
        if algo == "gather":  # the style's own reducer with error_feedback=True: the start-up's logits
            style = register_lowbit_rowwise(codec=make_codec("int4-g32"), algorithm=algo, error_feedback=True,
                                            config=AutoConfig.from_pretrained(path))
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                         distributed_config=DistributedConfig(tp_size=world,
                                                                                              tp_plan=tp_plan()))
            with torch.no_grad():
                own = _greedy_steps(model, EF_NEW)
            assert all(torch.equal(a, b) for a, b in zip(own[0], steps[-1][0])) and own[1] == steps[-1][1]
            assert style.stats().calls == 4 * EF_NEW
    run = rank_main(rank, world, RunConfig(model=path, tp=world, prompts=("Hello, tp!",), codec="int4-g32",
                                           algorithm="gather", max_new_tokens=EF_NEW, ignore_eos=True, timeout_s=60,
                                           engine="transformers", error_feedback=True))
    return steps, calls, run.results[0]


def _definition_steps(model, codec, n):
    """:func:`_greedy_steps` on the unsharded model whose o_proj/down_proj run TP 2 gather with
    error feedback written from its definition (codec.roundtrip only): rank r sends
    ``x[:, half_r] @ W[:, half_r].T + c_r``, keeps ``c_r = sent - roundtrip(sent)``; the
    first row-parallel layer of each forward pass starts with no carry."""
    import torch.nn.functional as F

    names = [n for n, _ in model.named_modules() if n.endswith(("o_proj", "down_proj"))]
    state, originals = {"carry": None}, {}

    def emulate(name, linear):
        def fwd(x):
            x2 = x.reshape(-1, x.shape[-1])
            half = x2.shape[1] // 2
            parts = [F.linear(x2[:, :half].contiguous(), linear.weight[:, :half].contiguous()),
                     F.linear(x2[:, half:].contiguous(), linear.weight[:, half:].contiguous())]
            if name != names[0]:
                parts = [p + c for p, c in zip(parts, state["carry"])]
            dec = [codec.roundtrip(p, layer=name, source=r) for r, p in enumerate(parts)]
            state["carry"] = [p - d for p, d in zip(parts, dec)]
            return (dec[0] + dec[1]).reshape(*x.shape[:-1], -1)
        return fwd

    for name in names:
        originals[name] = model.get_submodule(name).forward
        model.get_submodule(name).forward = emulate(name, model.get_submodule(name))
    try:
        return _greedy_steps(model, n)
    finally:
        for name, fwd in originals.items():
            model.get_submodule(name).forward = fwd


def test_error_feedback_inside_transformers_tp_equals_the_simulator_and_the_definition(tiny):
    """``--engine transformers --error-feedback`` at TP 2, prefill + 3 one-token decode steps:

    * every collective call inside transformers' TP is bitwise ``simulate_all_reduce`` of both
      ranks' partials with the carries of a chain kept here (reset at each forward pass's
      first layer, carried layer to layer), gather and two-shot;
    * the prefill logits are bitwise the native simulator's with ``error_feedback=True``;
      the decode steps' within 1e-6 (transformers' TP decode differs from the simulator in
      the last bits with or without feedback), far below what the feedback changes;
    * gather: within rounding of an EF loop written from the definition (which catches a
      wrong sign; a chain that leaked into the next step fails the replay bitwise)."""
    from lowbit_tp.codecs import make_codec
    from lowbit_tp.collectives.feedback import Feedback
    from lowbit_tp.models import load_model

    algorithms = ["gather", "two-shot"]
    per_rank = spawn_ranks(_rank_ef, 2, tiny, algorithms, timeout_s=60, deadline_s=300)
    model = load_model(tiny)[0]
    codec = make_codec("int4-g32")
    with torch.no_grad():
        for i, algo in enumerate(algorithms):
            calls = [per_rank[r][1][i] for r in range(2)]
            first = calls[0][0][0]
            assert sum(layer == first for layer, _, _ in calls[0]) == EF_NEW  # one chain per forward pass
            carries = [None, None]
            for j, (layer, _, _) in enumerate(calls[0]):
                if layer == first:
                    carries = [None, None]
                fbs = [Feedback(carry=c) for c in carries]
                want = simulate_all_reduce([calls[r][j][1] for r in range(2)], codec, algo, layer=layer, feedback=fbs)
                for r in range(2):
                    assert torch.equal(calls[r][j][2], want), (algo, j, layer, r)
                carries = [f.next for f in fbs]
            _assert_ranks_follow_the_feedback_simulator(model, codec, algo, [per_rank[r][0][i] for r in range(2)],
                                                        EF_NEW)
        definition, def_tokens = _definition_steps(model, codec, EF_NEW)
    engine, tokens = per_rank[0][0][0]
    assert tokens == def_tokens
    for step, (got, ref) in enumerate(zip(engine, definition)):
        assert (got - ref).abs().max() <= 1e-4, step
    run = per_rank[0][2]  # `lowbit-tp run --engine transformers --error-feedback`'s generation
    assert run.token_ids and run.new_tokens == EF_NEW and run.comm.prefill.calls == 4
    from lowbit_tp.integrations.transformers import LowbitRowwiseParallel

    with pytest.raises(ValueError, match="its own FeedbackChain"):
        LowbitRowwiseParallel(reducer=object(), error_feedback=True)


def _rank_style_modes(rank, world, path, modes):
    """Per feedback mode: the greedy steps of the style's own reducers (two-shot) built with
    ``register_lowbit_rowwise(error_feedback=mode)``."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    from lowbit_tp.codecs import make_codec
    from lowbit_tp.integrations.transformers import register_lowbit_rowwise, tp_plan

    out = []
    for mode in modes:
        register_lowbit_rowwise(codec=make_codec("int4-g32"), algorithm="two-shot", error_feedback=mode,
                                config=AutoConfig.from_pretrained(path))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                     distributed_config=DistributedConfig(tp_size=world,
                                                                                          tp_plan=tp_plan()))
        with torch.no_grad():
            out.append(_greedy_steps(model, EF_NEW))
    return out


@pytest.mark.slow  # a variant of the feedback test above (first-stage mode); ~24 s
def test_style_first_stage_feedback_equals_the_simulator_and_differs_from_full(tiny):
    """``register_lowbit_rowwise(error_feedback="first-stage")``, two-shot at TP 2: each rank's
    greedy run follows the native simulator's first-stage feedback (prefill logits bitwise),
    and its prefill logits differ from the style's full feedback, so a style that ignored the
    mode (a full chain) fails here."""
    from lowbit_tp.codecs import make_codec
    from lowbit_tp.integrations.transformers import LowbitRowwiseParallel
    from lowbit_tp.models import load_model

    per_rank = spawn_ranks(_rank_style_modes, 2, tiny, ["first-stage", True], timeout_s=60, deadline_s=300)
    model = load_model(tiny)[0]
    with torch.no_grad():
        _assert_ranks_follow_the_feedback_simulator(model, make_codec("int4-g32"), "two-shot",
                                                    [per_rank[r][0] for r in range(2)], EF_NEW, mode="first-stage")
    for r in range(2):
        first, full = per_rank[r][0][0][0], per_rank[r][1][0][0]
        assert (first - full).abs().max() > 1e-4, r  # the owner errors were left out
    with pytest.raises(ValueError, match="error_feedback must be one of"):
        LowbitRowwiseParallel(codec=make_codec("int4-g32"), error_feedback="first")


# ------------------------------------------------------------------ Gemma 3 (post-norms) error feedback
GEMMA_STEPS = 3  # prefill + 2 one-token decode steps


@pytest.fixture(scope="module", params=["gemma3", pytest.param("gemma2", marks=pytest.mark.slow)])  # gemma2: slow suite
def tiny_gemma(request, tmp_path_factory):
    return save_tiny_gemma(tmp_path_factory.mktemp("tiny_gemma"), request.param)


def _record_rowwise(model, calls):
    """Forward hooks on o_proj/down_proj inside transformers' TP: (layer, this rank's partial
    recomputed from the hook's local input and weight shard, the reduced output)."""
    import torch.nn.functional as F

    for name, module in model.named_modules():
        if name.endswith(("o_proj", "down_proj")):
            def hook(m, args, out, name=name):
                w = m.weight.to_local() if hasattr(m.weight, "to_local") else m.weight
                x = args[0]
                calls.append((name, F.linear(x, w).reshape(-1, out.shape[-1]).clone(),
                              out.reshape(-1, out.shape[-1]).clone()))
            module.register_forward_hook(hook)


def _rank_gemma_ef(rank, world, path, algorithms):
    """Per algorithm, ``--engine transformers --error-feedback`` through the CLI's start-up:
    step logits and every collective call. Then the style used directly (gather):
    ``error_feedback=True, config=...`` with ``tp_plan(config=...)``: its step logits; and
    loaded with a plan that names no norms: its first forward's error."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    from lowbit_tp.codecs import make_codec
    from lowbit_tp.integrations.transformers import register_lowbit_rowwise, tp_plan
    from lowbit_tp.runtime.startup import start_rank

    steps, calls = [], []
    for algo in algorithms:
        started = start_rank(rank, world, model=path, tp=world, codecs=["int4-g32"], calibration=None, algorithm=algo,
                             engine="transformers", error_feedback=True)
        calls.append([])
        _record_rowwise(started.model, calls[-1])
        with torch.no_grad():
            steps.append(_greedy_steps(started.model, GEMMA_STEPS))
    config = AutoConfig.from_pretrained(path)
    register_lowbit_rowwise(codec=make_codec("int4-g32"), algorithm="gather", error_feedback=True, config=config)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, distributed_config=DistributedConfig(tp_size=world, tp_plan=tp_plan(config=config)))
    with torch.no_grad():
        own = _greedy_steps(model, GEMMA_STEPS)
    register_lowbit_rowwise(codec=make_codec("int4-g32"), algorithm="gather", error_feedback=True, config=config)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, distributed_config=DistributedConfig(tp_size=world, tp_plan=tp_plan()))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor(EF_IDS))
        refused = None
    except RuntimeError as exc:
        refused = str(exc)
    return steps, calls, own, refused


def test_gemma_error_feedback_inside_transformers_tp_maps_the_carry_through_the_post_norms(tiny_gemma):
    """``--engine transformers --error-feedback`` on a tiny Gemma 3 and Gemma 2 at TP 2 (prefill + 2
    decode steps), gather and two-shot:

    * every collective call is bitwise ``simulate_all_reduce`` of both ranks' partials with
      the carries of the post-norm chain replayed here from its definition (a chain without
      the Jacobian's second term, or without sqrt(N), gives other bits);
    * the prefill logits are bitwise the native simulator's with ``error_feedback=True``
      (decode within 1e-6, as for Llama), and differ from the plain codec's;
    * the style used directly (``config=`` and ``tp_plan(config=...)``) gives the start-up's
      logits bitwise; loaded with a plan that names no norms, it refuses at its first forward."""
    from lowbit_tp.codecs import make_codec
    from lowbit_tp.models import load_model

    algorithms = ["gather", "two-shot"]
    per_rank = spawn_ranks(_rank_gemma_ef, 2, tiny_gemma, algorithms, timeout_s=60, deadline_s=300)
    model = load_model(tiny_gemma)[0]
    codec = make_codec("int4-g32")
    norms = gemma_post_norms(model)
    with torch.no_grad():
        for i, algo in enumerate(algorithms):
            calls = [per_rank[r][1][i] for r in range(2)]
            assert len(calls[0]) == 4 * GEMMA_STEPS and sum(l == calls[0][0][0] for l, _, _ in calls[0]) == GEMMA_STEPS
            want = postnorm_replay(calls, norms, codec, algo, 2)
            for j, w in enumerate(want):
                for r in range(2):
                    assert torch.equal(calls[r][j][2], w), (algo, j, calls[0][j][0], r)
            _assert_ranks_follow_the_feedback_simulator(model, codec, algo, [per_rank[r][0][i] for r in range(2)],
                                                        GEMMA_STEPS)
    for r in range(2):
        steps, _, own, refused = per_rank[r]
        assert all(torch.equal(a, b) for a, b in zip(own[0], steps[0][0])) and own[1] == steps[0][1]
        assert refused is not None and "tp_plan(config=config)" in refused, refused


def test_gemma_style_plan_names_the_post_norms_and_the_style_still_needs_a_config():
    """``tp_plan(config=...)`` adds the two post-norms of a Gemma decoder layer (with the
    recorder style) and nothing for Llama; without a config, feedback stays refused."""
    from transformers import Gemma3TextConfig, LlamaConfig

    from lowbit_tp.codecs import make_codec
    from lowbit_tp.integrations.transformers import LowbitRowwiseParallel, tp_plan

    extra = set(tp_plan(config=Gemma3TextConfig())) - set(tp_plan())
    assert extra == {"model.layers.*.post_attention_layernorm", "model.layers.*.post_feedforward_layernorm"}
    assert {tp_plan(config=Gemma3TextConfig())[k] for k in extra} == {"lowbit_rowwise_postnorm"}
    assert tp_plan(config=LlamaConfig()) == tp_plan()
    # the attention modules get the heads check (HeadsCheck), under the style's name
    assert {k: v for k, v in tp_plan(style="mine").items() if v.endswith("_heads")} == {
        "model.layers.*.self_attn": "mine_heads"}
    with pytest.raises(ValueError, match="needs the model's config"):
        LowbitRowwiseParallel(codec=make_codec("int4-g32"), error_feedback=True)
    assert LowbitRowwiseParallel(codec=make_codec("int4-g32"), error_feedback=True, config=Gemma3TextConfig()).error_feedback


def _rank_kv1(rank, world, path):
    """The style built by hand at a TP that does not divide the KV heads: what loading says."""
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    from lowbit_tp.codecs import make_codec
    from lowbit_tp.integrations.transformers import register_lowbit_rowwise, tp_plan

    register_lowbit_rowwise(codec=make_codec("bf16"))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, distributed_config=DistributedConfig(tp_size=world, tp_plan=tp_plan()))
        with torch.no_grad():
            model(torch.tensor([[5, 6, 7, 8, 9]]))
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "ran"


@pytest.mark.slow  # an error path on spawned ranks (~19 s); the default suite checks the style's own refusal in process (below)
def test_style_built_by_hand_refuses_a_tp_that_does_not_divide_the_kv_heads(tmp_path):
    """transformers splits the KV heads evenly and cannot replicate them; at TP 2 with one KV head
    the forward failed inside attention ("shape '[1, 5, -1, 16]' is invalid for input of size 40").
    The CLI refuses it before loading (check_engine_tp); the style built by hand now refuses it
    while transformers shards the model, in one line."""
    import transformers as tf

    from helpers import byte_tokenizer, tiny_config

    config = tiny_config("llama")
    config.num_key_value_heads = 1
    torch.manual_seed(0)
    path = tmp_path / "kv1"
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    for got in spawn_ranks(_rank_kv1, 2, str(path), timeout_s=60, deadline_s=180):
        assert got == ("ValueError: transformers' tensor parallelism splits the attention heads evenly and cannot "
                       "replicate KV heads: TP 2 must divide the 4 query and 1 KV head(s); use the native runtime "
                       "(lowbit_tp.runtime) or vLLM, which replicate KV heads"), got


def test_heads_check_and_the_dtensor_style_refuse_uneven_heads_in_process():
    """The default suite's check of the two styles' KV-head refusal (the spawned-rank tests above
    and in test_engines_dtensor are slow): transformers' ``HeadsCheck`` and the DTensor o_proj style
    refuse TP 2 on 4 query heads and 1 KV head with the messages written here, before any sharding,
    and pass a TP that divides both (or a module without head counts)."""
    from types import SimpleNamespace

    from helpers import tiny_config
    from lowbit_tp.codecs import make_codec
    from lowbit_tp.integrations.dtensor import LowbitRowwiseParallel
    from lowbit_tp.integrations.transformers import HeadsCheck

    config = tiny_config("llama")
    config.num_key_value_heads = 1
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 1)
    attn, mesh = SimpleNamespace(config=config), (lambda n: SimpleNamespace(size=lambda: n))
    with pytest.raises(ValueError) as info:
        HeadsCheck().install_forward(attn, mesh(2))
    assert str(info.value) == ("transformers' tensor parallelism splits the attention heads evenly and cannot "
                               "replicate KV heads: TP 2 must divide the 4 query and 1 KV head(s); use the native "
                               "runtime (lowbit_tp.runtime) or vLLM, which replicate KV heads")
    assert HeadsCheck().install_forward(attn, mesh(1)) is attn
    assert HeadsCheck().install_forward(SimpleNamespace(), mesh(2)) is not None  # no config: nothing to check

    style = LowbitRowwiseParallel(layer="model.layers.0.self_attn.o_proj", codec=make_codec("bf16"), heads=(4, 1))
    with pytest.raises(ValueError) as info:  # the mesh stub has no group: a refusal after sharding began would fail otherwise
        style._apply(torch.nn.Linear(8, 8), mesh(2))
    assert str(info.value).startswith("model.layers.0.self_attn.o_proj: parallelize_module splits the attention heads "
                                      "evenly and cannot replicate KV heads: TP 2 must divide the 4 query and 1 KV "
                                      "head(s)"), str(info.value)
