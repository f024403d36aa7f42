"""``lowbit-tp run``: generate text under real TP, on spawned local ranks or under torchrun.

    lowbit-tp run --model smollm2-135m --tp 3 --codec int4-outlier --calibration cal.safetensors \\
        --prompt "The capital of France is" --max-new-tokens 32 --json out.json
    torchrun --nproc-per-node 3 -m lowbit_tp.cli run --model smollm2-135m --codec int4-g32 --prompt "..."

Under torchrun (``RANK`` and ``WORLD_SIZE`` set) nothing is spawned: this process is one
rank and ``--tp`` defaults to ``WORLD_SIZE``.
"""
from __future__ import annotations

import os

from lowbit_tp.cli.argtypes import add_feedback_flag, nonneg_int, positive_float, positive_int
from lowbit_tp.cli.common import default, warn, write_json
from lowbit_tp.cli.serve import ensure_vllm_python
from lowbit_tp.configs import ALGORITHMS, ENGINES, AutoPolicy, RunConfig, SamplingConfig
from lowbit_tp.errors import UserError
from lowbit_tp.fileio import check_output_path


def register(subparsers) -> None:
    d, s = RunConfig, SamplingConfig  # defaults are read from their fields
    p = subparsers.add_parser("run", help="generate text with a tensor-parallel model over N ranks")
    p.add_argument("--engine", default=default(d, "engine"), choices=[*ENGINES, "vllm"],
                   help="native: lowbit-tp's own ranks; transformers: HF transformers' TP with the "
                        "lowbit_rowwise style; vllm: vLLM with the lowbit-tp plugin (needs .venv-vllm)")
    p.add_argument("--compile", action="store_true", help="vllm engine: compiled graph instead of enforce_eager")
    p.add_argument("--model", default=default(d, "model"), help="registry name or HF checkpoint directory")
    p.add_argument("--tp", type=positive_int, help="number of ranks (required unless under torchrun)")
    p.add_argument("--codec", default=default(d, "codec"),
                   help="all-reduce codec (bf16 with --algorithm exact = uncompressed)")
    p.add_argument("--calibration", default=default(d, "calibration"),
                   help="calibration .safetensors (static codecs need one)")
    p.add_argument("--algorithm", default=default(d, "algorithm"), choices=ALGORITHMS)
    add_feedback_flag(p, default(d, "error_feedback"),
                      "each rank adds its previous all-reduce's quantization error back into its next partial "
                      "within a forward pass (same bytes; every engine; through the post-norms on Gemma 2/3)")
    p.add_argument("--min-bytes", type=nonneg_int, default=default(AutoPolicy, "min_bytes"),
                   help="auto: messages below this many bf16 bytes use exact (default %(default)s)")
    p.add_argument("--prompt", action="append", required=True, help="repeatable; generated one after another")
    p.add_argument("--max-new-tokens", type=positive_int, default=default(d, "max_new_tokens"))
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=positive_float, default=default(s, "temperature"))
    p.add_argument("--top-k", type=nonneg_int, default=default(s, "top_k"))
    p.add_argument("--top-p", type=float, default=default(s, "top_p"))
    p.add_argument("--seed", type=int, default=default(s, "seed"))
    p.add_argument("--timeout", type=positive_float, default=default(d, "timeout_s"),
                   help="collective timeout in seconds (dead-peer detection)")
    p.add_argument("--threads-per-rank", type=positive_int, default=default(d, "threads_per_rank"))
    p.add_argument("--json", help="write config and results here")
    p.add_argument("--quiet", action="store_true", help="do not stream text")
    p.set_defaults(func=cmd)


def config_from_args(args, tp: int) -> RunConfig:
    """The run's config; ``--engine vllm`` runs the native engine's config through vLLM."""
    return RunConfig(model=args.model, tp=tp, prompts=tuple(args.prompt), codec=args.codec,
                     calibration=args.calibration, algorithm=args.algorithm,
                     policy=AutoPolicy(min_bytes=args.min_bytes),
                     max_new_tokens=args.max_new_tokens, ignore_eos=args.ignore_eos,
                     sampling=SamplingConfig(do_sample=args.sample, temperature=args.temperature,
                                             top_k=args.top_k, top_p=args.top_p, seed=args.seed),
                     timeout_s=args.timeout, threads_per_rank=args.threads_per_rank,
                     engine="native" if args.engine == "vllm" else args.engine, error_feedback=args.error_feedback)


def report(out) -> str:
    """One line per prompt of a :class:`~lowbit_tp.runtime.RunResult`."""
    lines = []
    for i, r in enumerate(out.results):
        lines.append(
            f"[prompt {i}] {r.new_tokens} tokens ({r.finish_reason}): prefill {r.prefill_s * 1e3:.1f} ms, "
            f"decode {r.decode_tokens_per_s:.2f} tok/s, overall {r.tokens_per_s:.2f} tok/s; "
            f"rank 0 sent {r.comm.prefill.bytes_sent} B in prefill, {r.comm.decode.bytes_sent} B in decode")
    return "\n".join(lines)


def _check_sampling_flags(args) -> None:
    """Refuse sampling flags without ``--sample`` (greedy decoding would ignore them, as it
    ignored them silently before; ``--seed`` too: it seeds only the sampler's generator); a
    flag left at its default is no change and passes."""
    s = SamplingConfig
    given = [f"--{flag.replace('_', '-')} {getattr(args, flag)}" for flag in ("temperature", "top_k", "top_p", "seed")
             if getattr(args, flag) != default(s, flag)]
    if given and not args.sample:
        verb = "apply" if len(given) > 1 else "applies"
        raise UserError(f"{', '.join(given)} only {verb} with --sample (greedy decoding is the default)")


def _check_engine_flags(args) -> None:
    """Refuse flags the chosen engine or algorithm would ignore (as they were, silently):
    ``--compile`` is vLLM's, ``--timeout`` and ``--threads-per-rank`` are not; ``--min-bytes`` is the size gate of ``--algorithm auto`` (and of
    vLLM's plugin, which gates every algorithm). A flag left at its default passes."""
    if args.compile and args.engine != "vllm":
        raise UserError(f"--compile only applies with --engine vllm (the {args.engine} engine runs eagerly)")
    if args.engine == "vllm":  # the vLLM engine passes neither on: vLLM has its own timeouts and threads
        given = [f"--{flag.replace('_', '-')} {getattr(args, flag)}" for flag, field in
                 (("timeout", "timeout_s"), ("threads_per_rank", "threads_per_rank"))
                 if getattr(args, flag) != default(RunConfig, field)]
        if given:
            raise UserError(f"{', '.join(given)} {'do' if len(given) > 1 else 'does'} not apply with --engine vllm "
                            f"(its workers run with OMP_NUM_THREADS threads, default 1, and vLLM's own timeouts)")
    if args.min_bytes != default(AutoPolicy, "min_bytes") and args.algorithm != "auto" and args.engine != "vllm":
        raise UserError(f"--min-bytes {args.min_bytes} only applies with --algorithm auto (its size gate); "
                        f"--algorithm {args.algorithm} sends every message the same way")


def past_context(results, context: int | None) -> list[str]:
    """A warning per generation that ran past the model's context (``max_position_embeddings``):
    the ranks generate on, and text beyond it is not meaningful. Said after the run, since only
    the ranks tokenize the prompts."""
    if not context:
        return []
    return [f"prompt {i}: {len(r.prompt_ids)} prompt + {r.new_tokens} new tokens exceed the model's context of "
            f"{context} tokens; the text beyond it is not meaningful"
            for i, r in enumerate(results) if len(r.prompt_ids) + r.new_tokens > context]


def cmd(args) -> None:
    _check_sampling_flags(args)
    _check_engine_flags(args)
    if args.json:  # before the run: a missing directory must not lose a whole run's results
        check_output_path(args.json)
    if args.engine == "vllm":
        if args.tp is None:
            raise UserError("--tp is required")
        ensure_vllm_python()  # may restart this command under the vLLM venv: nothing below runs twice
    # Library code (torch) is imported when the command runs, so that `--help` stays fast.
    from lowbit_tp.preflight import check_calibration_file, check_model_tp, plan_feedback_warnings

    if args.calibration and os.environ.get("RANK", "0") == "0":  # as eval: a plan made for feedback, run without
        for text in plan_feedback_warnings(check_calibration_file(args.calibration), [args.codec],
                                           args.error_feedback):
            warn(text)
    if args.engine == "vllm":
        return _run_vllm(args, config_from_args(args, args.tp))
    from lowbit_tp.runtime.engine import run_config, run_from_env, under_torchrun

    if under_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if args.tp is not None and args.tp != world:
            raise UserError(f"--tp {args.tp} but torchrun started {world} ranks")
        out = run_from_env(config_from_args(args, world), stream=not args.quiet)
        if out is None:  # not rank 0
            return
    else:
        if args.tp is None:
            raise UserError("--tp is required (or launch under torchrun)")
        if args.tp == 1 and args.codec != "bf16":  # as eval --tp 1: the codec never runs
            warn(f"--tp 1 has no all-reduce, so codec {args.codec!r} never runs (0 bytes sent); give the TP "
                 f"degree whose communication you mean to compress")
        out = run_config(config_from_args(args, args.tp), stream=not args.quiet)
    print(report(out))
    write_json(args.json, out.to_json())  # first: nothing after the run may lose its results
    for text in past_context(out.results, getattr(check_model_tp(args.model, out.config["tp"]),
                                                  "max_position_embeddings", None)):
        warn(text)


def _run_vllm(args, cfg: RunConfig) -> None:
    """``lowbit-tp run --engine vllm``: the native engine's ``RunConfig`` through vLLM."""
    ensure_vllm_python()
    # vLLM's side imports vLLM itself: only when this engine runs.
    from lowbit_tp.calibration import CalibrationError
    from lowbit_tp.integrations.vllm.engine import VllmEngineConfig, run

    try:
        out = run(cfg, engine=VllmEngineConfig(enforce_eager=not args.compile))
    except (CalibrationError, ValueError, FileNotFoundError, ModuleNotFoundError) as exc:
        raise UserError(f"run: {exc}") from None
    for i, r in enumerate(out.results):
        print(f"[prompt {i}] {r.new_tokens} tokens ({r.finish_reason}), {r.tokens_per_s:.2f} tok/s: {r.text!r}")
    write_json(args.json, out.to_json())
