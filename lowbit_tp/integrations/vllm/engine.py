"""``lowbit-tp run --engine vllm`` and ``lowbit-tp serve``: vLLM with the plugin, from our configs.

Runs in the vLLM environment (``.venv-vllm``, see ``scripts/setup_vllm.sh``); the main
CLI re-executes itself there (:func:`vllm_python`). vLLM's ``mp`` executor starts one
worker process per TP rank; they inherit the ``LOWBIT_TP_*`` environment this module sets,
and the plugin reads it there.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from lowbit_tp.integrations.vllm.config import ENV, PluginConfig
from lowbit_tp.integrations.vllm.records import VllmPromptResult, VllmRunResult

VLLM_PYTHON_ENV = "LOWBIT_TP_VLLM_PYTHON"


def vllm_python() -> str | None:
    """The interpreter that has vLLM: ``$LOWBIT_TP_VLLM_PYTHON``, this one, or the repo's ``.venv-vllm``."""
    import importlib.util

    if os.environ.get(VLLM_PYTHON_ENV):
        py = os.environ[VLLM_PYTHON_ENV]
        return py if Path(py).is_file() else None
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    repo_venv = Path(__file__).resolve().parents[3] / ".venv-vllm" / "bin" / "python"
    return str(repo_venv) if repo_venv.is_file() else None


@dataclass(frozen=True)
class VllmEngineConfig:
    """vLLM settings of a run. ``dtype`` float32 matches the fp32 dequantized weights every
    other engine here uses. ``enforce_eager=False`` runs vLLM's compiled graph, with the
    compressed all-reduce as one opaque custom op. ``kv_cache_gib`` is vLLM's CPU KV cache."""

    dtype: str = "float32"
    enforce_eager: bool = True
    max_model_len: int = 1024
    kv_cache_gib: int = 1
    use_plugin: bool = True
    seed: int = 0


def plugin_env(plugin: PluginConfig | None, *, use_plugin: bool = True) -> dict[str, str | None]:
    """Environment changes for vLLM's processes: the plugin's settings, or no plugin at all."""
    env: dict[str, str | None] = {v: None for v in ENV.values()}
    if plugin is not None:
        env.update(plugin.as_env())
    # VLLM_PLUGINS lists the plugins vLLM may load; naming none of ours keeps vLLM pristine.
    env["VLLM_PLUGINS"] = None if use_plugin else "none"
    return env


def apply_env(env: dict[str, str | None]) -> None:
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


# vLLM CPU settings for a small shared machine (kept if the user set them). vLLM's "auto"
# binding wants one NUMA node per TP rank; a small box has one node.
CPU_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}


def cpu_defaults() -> None:
    """:data:`CPU_DEFAULTS` into the environment, where the user has not set them."""
    for k, v in CPU_DEFAULTS.items():
        os.environ.setdefault(k, v)


def model_directory(model: str) -> Path:
    from lowbit_tp.models.export import export_hf

    return export_hf(model)


@contextmanager
def running_llm(model_dir: str | Path, *, tp: int, plugin: PluginConfig | None,
                engine: VllmEngineConfig, name: str | None = None) -> Iterator[Any]:
    """:func:`make_llm`, shut down on leaving: the engine core and its worker processes stop
    here, while the interpreter is whole, instead of from vLLM's finalizers when the last
    reference goes or at exit (one CI run's session aborted there, after its work was done:
    'terminate called without an active exception', exit -6)."""
    llm = make_llm(model_dir, tp=tp, plugin=plugin, engine=engine, name=name)
    try:
        yield llm
    finally:
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if callable(getattr(core, "shutdown", None)):
            core.shutdown()


def make_llm(model_dir: str | Path, *, tp: int, plugin: PluginConfig | None, engine: VllmEngineConfig,
             name: str | None = None):
    """A ``vllm.LLM`` at TP ``tp`` (``mp`` executor) with the plugin configured as asked,
    after :func:`~lowbit_tp.integrations.vllm.checkpoint.preflight` (``name``: the model's, for
    its messages)."""
    from lowbit_tp.integrations.vllm.checkpoint import preflight

    if plugin is not None and plugin.enabled:
        preflight(model_dir, tp=tp, calibration=plugin.calibration, error_feedback=plugin.error_feedback,
                  codec=plugin.codec, name=name)
    else:  # the TP degree still (vLLM's own refusal is a pydantic error)
        preflight(model_dir, tp=tp, name=name)
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(engine.kv_cache_gib)
    cpu_defaults()
    apply_env(plugin_env(plugin, use_plugin=engine.use_plugin))
    # worker_reports() sends a function to the workers through collective_rpc; vLLM pickles
    # callables only when allowed. These are this run's own local processes.
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from vllm import LLM

    return LLM(model=str(model_dir), tensor_parallel_size=tp, distributed_executor_backend="mp",
               enforce_eager=engine.enforce_eager, dtype=engine.dtype, max_model_len=engine.max_model_len,
               seed=engine.seed, disable_log_stats=True)


def worker_reports(llm) -> list[dict[str, Any]]:
    """Every worker's reducer reports (empty lists where the plugin is off)."""
    from lowbit_tp.integrations.vllm import worker_reports as _reports

    return [r for per in llm.collective_rpc(_reports) for r in per]


def generate(llm, prompts, *, max_new_tokens: int, sampling=None, ignore_eos: bool = False,
             seed: int = 0) -> list[VllmPromptResult]:
    """One row per prompt, with the native engine's field names (``token_ids``, ``text``, ...)."""
    from vllm import SamplingParams

    tok = llm.get_tokenizer()
    if sampling is not None and sampling.do_sample:
        sp = SamplingParams(max_tokens=max_new_tokens, temperature=sampling.temperature, top_k=sampling.top_k or -1,
                            top_p=sampling.top_p, seed=sampling.seed, ignore_eos=ignore_eos)
    else:
        sp = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, ignore_eos=ignore_eos)
    rows = []
    for p in prompts:  # one at a time, as the native engine does, so times compare
        ids = tok(p).input_ids
        t0 = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)[0]
        wall = time.perf_counter() - t0
        c = out.outputs[0]
        rows.append(VllmPromptResult(prompt=p, prompt_ids=list(ids), token_ids=list(c.token_ids), text=c.text,
                                     finish_reason=c.finish_reason or "length", wall_s=wall))
    return rows


def prompt_nll(llm, sequences: list[list[int]]) -> dict[str, Any]:
    """Negative log-likelihood (nats/token) of each sequence's tokens after the first, from
    vLLM's prompt logprobs; ``per_sequence`` and the token-weighted mean ``nll``."""
    import math

    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": s} for s in sequences], sp, use_tqdm=False)
    per_seq, total, count = [], 0.0, 0
    for seq, out in zip(sequences, outs):
        nll = -sum(lp[seq[pos]].logprob for pos, lp in enumerate(out.prompt_logprobs[1:], start=1))
        per_seq.append(nll / (len(seq) - 1))
        total += nll
        count += len(seq) - 1
    return {"nll": total / count, "ppl": math.exp(total / count), "tokens": count, "per_sequence": per_seq}


def run(cfg, *, engine: VllmEngineConfig = VllmEngineConfig()) -> VllmRunResult:
    """``lowbit-tp run --engine vllm``: ``cfg`` is the native engine's ``RunConfig``."""
    model_dir = model_directory(cfg.model)
    plugin = None
    if cfg.codec != "none":  # "none": vLLM without the plugin (its own all-reduce)
        plugin = PluginConfig(codec=cfg.codec, calibration=cfg.calibration, algorithm=cfg.algorithm,
                              min_bytes=cfg.policy.min_bytes, error_feedback=cfg.error_feedback)
    elif cfg.error_feedback:
        raise ValueError("error feedback needs a codec; codec 'none' runs vLLM without the plugin")
    else:
        engine = replace(engine, use_plugin=False)
    t0 = time.perf_counter()
    with running_llm(model_dir, tp=cfg.tp, plugin=plugin, engine=engine, name=cfg.model) as llm:
        load_s = time.perf_counter() - t0
        results = generate(llm, cfg.prompts, max_new_tokens=cfg.max_new_tokens, sampling=cfg.sampling,
                           ignore_eos=cfg.ignore_eos)
        reports = worker_reports(llm)
    # the RunConfig is the native engine's (ENGINES has no vllm); the record names the engine that ran
    return VllmRunResult.from_reports(reports, codec_name=cfg.codec, config={**cfg.as_dict(), "engine": "vllm"},
                                      vllm=asdict(engine), plugin=None if plugin is None else asdict(plugin),
                                      model={"name": cfg.model, "directory": str(model_dir)}, load_s=load_s,
                                      results=tuple(results))


def session(spec: dict[str, Any]) -> dict[str, Any]:
    """One vLLM start doing several things, for tests and benchmarks (``python -m`` entry below).

    ``spec``: ``model``, ``tp``, ``plugin`` (a :class:`PluginConfig` dict, or None for vLLM
    without the plugin), ``engine`` (:class:`VllmEngineConfig` fields), ``prompts`` +
    ``max_new_tokens`` (greedy, EOS ignored), ``sequences`` (token id lists for
    :func:`prompt_nll`).
    """
    plugin = PluginConfig(**spec["plugin"]) if spec.get("plugin") else None
    engine = VllmEngineConfig(**{**spec.get("engine", {}), "use_plugin": plugin is not None})
    model_dir = model_directory(spec["model"])
    t0 = time.perf_counter()
    with running_llm(model_dir, tp=spec["tp"], plugin=plugin, engine=engine) as llm:
        out: dict[str, Any] = {"spec": spec, "model_dir": str(model_dir), "load_s": time.perf_counter() - t0}
        if spec.get("prompts"):
            out["results"] = [r.to_json() for r in generate(llm, spec["prompts"],
                                                            max_new_tokens=spec.get("max_new_tokens", 16),
                                                            ignore_eos=True)]
        if spec.get("sequences"):
            out["quality"] = prompt_nll(llm, spec["sequences"])
        out["reports"] = worker_reports(llm) if plugin is not None else []
    return out


@contextmanager
def server_session(cmd: Sequence[str], *, port: int, log_path: str | Path, env: Mapping[str, str] | None = None,
                   cwd: str | Path | None = None, host: str = "127.0.0.1",
                   timeout: float = 1200.0) -> Iterator[str]:
    """Start ``cmd`` (``lowbit-tp serve ...`` or ``vllm serve ...`` listening on ``host:port``)
    in its own process session, output to ``log_path``; wait until ``/v1/models`` answers and
    yield the API's base URL (``http://host:port/v1``). On exit the whole session (server and
    its vLLM workers) gets SIGTERM, then SIGKILL after 60 s.

    Raises :class:`RuntimeError` (with the log's tail) if the server exits or is not ready
    within ``timeout`` seconds.
    """
    import urllib.request

    log_path = Path(log_path)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(list(cmd), env=None if env is None else dict(env), cwd=cwd, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://{host}:{port}/v1"
        try:
            end = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited ({proc.returncode}); {log_path}:\n"
                                       + log_path.read_text()[-5000:])
                if time.monotonic() > end:
                    raise RuntimeError(f"server not ready in {timeout:.0f} s; {log_path}:\n"
                                       + log_path.read_text()[-5000:])
                try:
                    urllib.request.urlopen(base + "/models", timeout=5).read()
                    break
                except OSError:
                    time.sleep(2)
            yield base
        finally:
            _signal_session(proc.pid, signal.SIGTERM)  # the session started above (workers too), nothing else
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                _signal_session(proc.pid, signal.SIGKILL)
                proc.wait(30)


def _signal_session(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # the whole session has already exited
        pass


def main(argv: list[str] | None = None) -> int:
    """``python -m lowbit_tp.integrations.vllm.engine SPEC.json OUT.json``: run :func:`session`."""
    import json

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        raise SystemExit("usage: python -m lowbit_tp.integrations.vllm.engine SPEC.json OUT.json")
    with open(args[0]) as f:
        spec = json.load(f)
    result = session(spec)
    with open(args[1], "w") as f:
        json.dump(result, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
