"""The ``lowbit-tp`` package: flag defaults equal the config dataclasses' defaults, and
``--help`` never imports torch."""
import dataclasses
import re
import subprocess
import sys

import pytest

from lowbit_tp.cli import bench, build_parser, calibrate, demo, eval, run, serve
from lowbit_tp.configs import (AutoPolicy, CalibrationConfig, CommBenchConfig, DemoConfig, E2EConfig, EvalConfig,
                               RankOptions, RunConfig, SamplingConfig)
from lowbit_tp.errors import UserError
from lowbit_tp.integrations.vllm.config import PluginConfig
from lowbit_tp.integrations.vllm.engine import VllmEngineConfig


def field_defaults(cls) -> dict:
    """Read straight from ``dataclasses.fields`` (not through the CLI's helper)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def parse(*argv):
    return build_parser().parse_args(list(argv))


# (subcommand argv with only the required flags, config class, {flag dest: config field}).
# Every flag with a scalar default must equal that field's default.
SCALAR_FLAGS = [
    (["calibrate", "--tp", "3", "--out", "x.safetensors"], CalibrationConfig,
     {"model": "model", "samples": "samples", "seq_len": "seq_len", "batch_size": "batch_size", "seed": "seed",
      "ema_decay": "ema_decay", "k": "k", "text": "text", "text_glob": "text_glob", "allocate": "allocate",
      "alloc_low": "alloc_low", "alloc_high": "alloc_high", "alloc_samples": "alloc_samples",
      "fisher_weights": "fisher_draws", "fisher_windows": "fisher_windows"}),
    (["eval", "--tp", "3", "--codec", "int4-g32"], EvalConfig,
     {"model": "model", "algorithm": "algorithm", "calibration": "calibration", "samples": "samples",
      "seq_len": "seq_len", "batch_size": "batch_size", "lambada": "lambada", "seed": "seed", "text": "text",
      "text_glob": "text_glob", "split": "split", "error_feedback": "error_feedback"}),
    (["eval", "--tp", "3", "--codec", "int4-g32"], RankOptions,
     {"timeout": "timeout_s", "threads_per_rank": "threads_per_rank"}),
    (["run", "--prompt", "hi"], RunConfig,
     {"engine": "engine", "model": "model", "codec": "codec", "calibration": "calibration", "algorithm": "algorithm",
      "max_new_tokens": "max_new_tokens", "timeout": "timeout_s", "threads_per_rank": "threads_per_rank",
      "error_feedback": "error_feedback"}),
    (["run", "--prompt", "hi"], SamplingConfig,
     {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "seed": "seed"}),
    (["run", "--prompt", "hi"], AutoPolicy, {"min_bytes": "min_bytes"}),
    (["demo"], DemoConfig, {"model": "model", "tp": "tp", "max_new_tokens": "max_new_tokens"}),
    (["bench-comm"], CommBenchConfig,
     {"hidden": "hidden", "repeats": "repeats", "backend": "backend", "threads_per_rank": "threads_per_rank",
      "timeout": "timeout_s"}),
    (["bench-e2e"], E2EConfig,
     {"algorithm": "algorithm", "new_tokens": "new_tokens", "repeats": "repeats", "rounds": "rounds",
      "model": "model", "hidden": "hidden", "intermediate": "intermediate", "layers": "layers", "heads": "heads",
      "kv_heads": "kv_heads", "delay": "delay", "threads_per_rank": "threads_per_rank",
      "chunk_bytes": "chunk_bytes"}),
    # serve's plugin flags default to None (the environment, then PluginConfig's defaults, fill them:
    # serve.plugin_config); test_a_command_without_flags_builds_the_default_config checks the result
    (["serve", "--tp", "2"], VllmEngineConfig, {"max_model_len": "max_model_len"}),
]


@pytest.mark.parametrize("argv,cls,flags", SCALAR_FLAGS, ids=lambda v: v.__name__ if isinstance(v, type) else None)
def test_every_flag_default_is_the_config_default(argv, cls, flags):
    args, want = vars(parse(*argv)), field_defaults(cls)
    assert {dest: args[dest] for dest in flags} == {dest: want[name] for dest, name in flags.items()}


def test_a_command_without_flags_builds_the_default_config(monkeypatch):
    for var in PluginConfig().as_env() | {"LOWBIT_TP_CODEC": "", "LOWBIT_TP_CALIBRATION": ""}:
        monkeypatch.delenv(var, raising=False)
    assert calibrate.config_from_args(parse("calibrate", "--tp", "3", "--out", "x")) == CalibrationConfig(tp=3)
    assert eval.config_from_args(parse("eval", "--tp", "2", "--codec", "int8")) == EvalConfig(tp=2, codecs=("int8",))
    assert run.config_from_args(parse("run", "--prompt", "hi"), 2) == RunConfig(tp=2, prompts=("hi",))
    assert demo.config_from_args(parse("demo")) == DemoConfig()
    assert bench.comm_config_from_args(parse("bench-comm")) == CommBenchConfig()
    assert bench.e2e_config_from_args(parse("bench-e2e")) == E2EConfig()
    assert serve.plugin_config(parse("serve", "--tp", "2")) == PluginConfig(codec=RunConfig.codec)


def test_error_feedback_flag_takes_first_stage_and_nothing_else(capsys):
    """A bare --error-feedback is every error (True); --error-feedback first-stage the mode
    without two-shot's owner errors, for eval, run and serve; any other word is a parse error."""
    assert parse("eval", "--tp", "2", "--codec", "int4-g32", "--error-feedback").error_feedback is True
    args = parse("eval", "--tp", "2", "--error-feedback", "first-stage", "--codec", "int4-g32")
    assert eval.config_from_args(args).error_feedback == "first-stage"
    assert parse("eval", "--tp", "2", "--codec", "int4-g32").error_feedback is False
    got = run.config_from_args(parse("run", "--tp", "2", "--prompt", "a", "--error-feedback", "first-stage"), 2)
    assert got.error_feedback == "first-stage"
    with pytest.raises(SystemExit):
        parse("eval", "--tp", "2", "--codec", "int4-g32", "--error-feedback", "on")
    assert "the only mode is 'first-stage'" in capsys.readouterr().err
    plugin = serve.plugin_config(parse("serve", "--tp", "2", "--codec", "int4-g32", "--error-feedback", "first-stage"))
    assert plugin.error_feedback == "first-stage"


def test_serve_keeps_error_feedback_from_the_environment(monkeypatch):
    """`LOWBIT_TP_ERROR_FEEDBACK=1 lowbit-tp serve` ran without feedback: the flag's False
    overrode the variable. The flag can only switch it on."""
    for var in PluginConfig().as_env():
        monkeypatch.delenv(var, raising=False)
    assert not serve.plugin_config(parse("serve", "--tp", "2")).error_feedback
    assert serve.plugin_config(parse("serve", "--tp", "2", "--error-feedback")).error_feedback
    monkeypatch.setenv("LOWBIT_TP_ERROR_FEEDBACK", "1")
    assert serve.plugin_config(parse("serve", "--tp", "2")).error_feedback


def test_flags_reach_the_config():
    cfg = run.config_from_args(parse("run", "--prompt", "a", "--prompt", "b", "--min-bytes", "0", "--sample",
                                     "--top-k", "5", "--engine", "vllm", "--timeout", "7"), 3)
    assert cfg == RunConfig(tp=3, prompts=("a", "b"), policy=AutoPolicy(min_bytes=0), timeout_s=7.0,
                            sampling=SamplingConfig(do_sample=True, top_k=5))
    cfg = bench.comm_config_from_args(parse("bench-comm", "--codec", "int8", "--numel", "64", "--hidden", "64",
                                            "--chunk-bytes", "0"))
    assert (cfg.codecs, cfg.numels, cfg.hidden, cfg.chunk_bytes, cfg.world_sizes) == (("int8",), (64,), 64, (0,), (2,))
    assert bench.e2e_config_from_args(parse("bench-e2e", "--chunk-bytes", "1048576")).chunk_bytes == 1048576
    assert bench.e2e_config_from_args(parse("bench-e2e", "--error-feedback", "both")).error_feedback == "both"
    assert calibrate.config_from_args(parse("calibrate", "--tp", "2", "--out", "x", "--allocate", "0")).allocate is None
    cfg = calibrate.config_from_args(parse("calibrate", "--tp", "2", "--out", "x", "--alloc-codecs", "int8,int4-g32"))
    assert cfg.alloc_codecs == ("int8", "int4-g32") and cfg.alloc_error_feedback is False
    # `ladder` stands for the stop-29/30 candidates, in order, each once
    cfg = calibrate.config_from_args(parse("calibrate", "--tp", "2", "--out", "x", "--alloc-codecs",
                                           "int8, ,ladder,rot-lm4-g64-lg8-k4", "--alloc-error-feedback"))
    assert cfg.alloc_error_feedback is True
    assert cfg.alloc_codecs[:3] == ("int8", "rot-lm3-g64-lg8-k4", "rot-lm4-g64-lg8-k4") and len(cfg.alloc_codecs) == 12
    assert {c for c in cfg.alloc_codecs if "ecsq" in c} == {f"rot-ecsq{r}-k4" for r in ("3.5", "3.875", "4.25", "4.625", "5")}


HELP = """
import runpy, sys
sys.argv = ["lowbit-tp", *sys.argv[1:]]
try:
    runpy.run_module("lowbit_tp.cli", run_name="__main__")
except SystemExit as exc:
    assert exc.code == 0, exc.code
print("\\nIMPORTED", *sorted(m for m in ("torch", "transformers", "numpy", "safetensors") if m in sys.modules))
"""


@pytest.mark.parametrize("argv", [["--help"], ["eval", "--help"], ["run", "--help"], ["bench-e2e", "--help"],
                                  ["serve", "--help"], ["calibrate", "--help"]])
def test_help_does_not_import_torch(argv):
    out = subprocess.run([sys.executable, "-c", HELP, *argv], capture_output=True, text=True, check=True).stdout
    assert "usage: lowbit-tp" in out
    assert out.rstrip().splitlines()[-1] == "IMPORTED"  # none of the heavy modules


def test_version_flag():
    """`lowbit-tp --version` said "the following arguments are required: command" (exit 2)."""
    import lowbit_tp

    proc = subprocess.run([sys.executable, "-m", "lowbit_tp.cli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == f"lowbit-tp {lowbit_tp.__version__}\n", (proc.stdout, proc.stderr)


def test_a_bad_flag_is_one_line_with_status_2():
    proc = subprocess.run([sys.executable, "-m", "lowbit_tp.cli", "eval", "--tp", "0", "--codec", "x"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--tp" in proc.stderr


def test_a_calibration_for_another_model_of_the_same_shape_is_refused_before_any_rank_starts(tmp_path):
    """Same hidden size, TP degree and layer names, other weights: ``run``'s and ``eval``'s
    preflight compare the weight files' sha256 with the one the calibration records (it used to
    be caught only on the ranks, after each had loaded the model). Its own model's sha passes,
    and a calibration that records no sha is not refused for it."""
    from helpers import save_tiny
    from lowbit_tp.calibration.synthetic import synthetic_calibration
    from lowbit_tp.errors import UserError
    from lowbit_tp.models.registry import resolve_source, sha256_of_files
    from lowbit_tp.preflight import preflight_eval
    from lowbit_tp.runtime import RunConfig
    from lowbit_tp.runtime.engine import preflight_run

    path = save_tiny(tmp_path, "llama")
    layers = [f"model.layers.{i}.{kind}" for i in range(2) for kind in ("self_attn.o_proj", "mlp.down_proj")]
    cal = synthetic_calibration(layers, world=2, hidden=64, tokens=16, batches=1)
    own = sha256_of_files(resolve_source(path).weight_files())
    runs = {"run": lambda c: preflight_run(RunConfig(model=path, tp=2, prompts=("ab",), codec="int4-outlier",
                                                      calibration=c)),
            "eval": lambda c: preflight_eval(EvalConfig(model=path, tp=2, codecs=("int4-outlier",), calibration=c),
                                             warn=lambda _: None)}
    for sha, refused in (("0f" * 32, True), (own, False), (None, False)):
        cal.meta["model"] = {"name": "other-model", "weights_sha256": sha}
        file = str(cal.save(tmp_path / f"cal-{sha}.safetensors"))
        for name, check in runs.items():
            if refused:
                with pytest.raises(UserError, match=r"made for model 'other-model' \(weights sha256 0f0f"):
                    check(file)
            else:
                check(file)


def test_error_feedback_on_gemma_passes_the_run_checks_of_every_engine(tmp_path):
    """Gemma 3's carry through the post-norms runs on the transformers engine too (and in vLLM,
    whose check is the checkpoint's): ``run``'s checks no longer refuse it; they still refuse a
    bad TP degree, and one the transformers engine cannot shard, in one line."""
    from helpers import save_tiny
    from lowbit_tp.errors import UserError
    from lowbit_tp.runtime import RunConfig
    from lowbit_tp.runtime.engine import preflight_run

    path = save_tiny(tmp_path, "gemma3")
    for engine in ("native", "transformers"):
        preflight_run(RunConfig(model=path, tp=2, prompts=("ab",), codec="int4-g32", engine=engine,
                                error_feedback=True))
    with pytest.raises(UserError, match="TP degree 3"):
        preflight_run(RunConfig(model=path, tp=3, prompts=("ab",), codec="int4-g32", engine="transformers",
                                error_feedback=True))
    # transformers' TP cannot replicate KV heads (2 here): TP 4 runs natively only, and says so in one line
    preflight_run(RunConfig(model=path, tp=4, prompts=("ab",), codec="int4-g32", engine="native"))
    proc = subprocess.run([sys.executable, "-m", "lowbit_tp.cli", "run", "--model", path, "--tp", "4", "--engine",
                           "transformers", "--codec", "int4-g32", "--error-feedback", "--prompt", "ab"],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and "does not divide the 2 KV head(s)" in proc.stderr, proc.stderr


def test_a_benchmark_file_says_the_command_that_made_it(tmp_path):
    """A rerun overwrites the markdown, so the command line is written into it, retypeable."""
    import json
    import shlex

    from lowbit_tp.cli.common import command_line
    from lowbit_tp.results import write_results

    cmd = command_line(["bench-comm", "--codec", "int4-outlier", "--json", "a b.json"],
                       {"NETNS_PREFIX": "lbt cpu", "HOME": "/root"})
    assert shlex.split(cmd) == ["NETNS_PREFIX=lbt cpu", "lowbit-tp", "bench-comm", "--codec", "int4-outlier",
                                "--json", "a b.json"]
    write_results(tmp_path / "r.json", {"rows": [], "command": cmd}, "| t |")
    assert (tmp_path / "r.md").read_text() == f"Command: `{cmd}`\n\n| t |\n"
    assert json.loads((tmp_path / "r.json").read_text())["command"] == cmd
    write_results(tmp_path / "s.json", {"rows": []}, "| t |")  # no command known: the table alone
    assert (tmp_path / "s.md").read_text() == "| t |\n"


def test_calibrate_refuses_a_negative_budget_before_the_probe():
    """A negative --allocate budget ran the whole sensitivity probe first; the flag parser refuses it now."""
    proc = subprocess.run([sys.executable, "-m", "lowbit_tp.cli", "calibrate", "--tp", "2", "--out", "x",
                           "--allocate", "-1"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--allocate: must be a finite number >= 0" \
        in proc.stderr, proc.stderr


@pytest.mark.slow  # 20 s: a calibration with its allocation probe
def test_calibrate_says_when_it_stored_no_bit_allocation(tmp_path):
    """An --allocate budget below what the codecs can meet was kept only in the file's header
    (exit 0, no word): the user found out when codec 'default' refused the file later."""
    from helpers import save_tiny

    path, out = save_tiny(tmp_path, "llama"), tmp_path / "cal.safetensors"
    # hidden 64: the default 4.5-bit budget is out of reach (its bf16 channels alone cost a bit per value)
    proc = subprocess.run([sys.executable, "-m", "lowbit_tp.cli", "calibrate", "--model", path, "--tp", "2", "--out",
                           str(out), "--samples", "2", "--seq-len", "32", "--alloc-samples", "1"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and out.is_file(), proc.stderr
    warned = [line for line in proc.stderr.splitlines() if line.startswith("lowbit-tp: warning:")]
    assert len(warned) == 1 and "no bit allocation stored" in warned[0] and "below the cheap codec" in warned[0], \
        proc.stderr


def test_bench_comm_refuses_one_rank_and_codecs_its_calibration_cannot_feed():
    """Both failed inside the spawned ranks (exit 1, 'rank 0: ZeroDivisionError' for one rank)."""
    from lowbit_tp.bench.comm import run_comm_bench
    from lowbit_tp.errors import UserError

    with pytest.raises(UserError, match="world size must be >= 2, got 1"):
        CommBenchConfig(world_sizes=(1,))
    for name, why in (("default", "per-layer plan"), ("rot-lm4-g64-lg8-k4+fisher", "Fisher weights")):
        with pytest.raises(UserError, match=f"synthetic calibration, which codec '{re.escape(name)}' cannot use: "
                                            f".*{why}"):
            run_comm_bench(CommBenchConfig(codecs=("int4-g32", name), numels=(4096,), repeats=1), throughput=False)
    with pytest.raises(UserError, match="^bench-comm: codec 'int4-outlier\\+fisher': channel weights apply to rot-"):
        run_comm_bench(CommBenchConfig(codecs=("int4-outlier+fisher",), numels=(4096,), repeats=1), throughput=False)


def test_bench_comm_refuses_a_message_size_its_width_does_not_divide():
    """A message is [numel / hidden, hidden]: --numel 1000 (hidden 64) measured 960 values and
    --numel 10 (hidden 4096) measured 4096, with no word."""
    from lowbit_tp.errors import UserError

    with pytest.raises(UserError, match=r"numel 1000 is not a multiple of hidden 64 .*e\.g\. numel 1024"):
        bench.comm_config_from_args(parse("bench-comm", "--numel", "1000", "--hidden", "64"))
    with pytest.raises(UserError, match=r"numel 10 is not a multiple of hidden 4096 .*e\.g\. numel 4096"):
        CommBenchConfig(numels=(10,))
    assert CommBenchConfig().numels and CommBenchConfig(numels=(1024,), hidden=64).numels == (1024,)


def test_run_refuses_sampling_flags_without_sample():
    """`run --temperature 0.5` decoded greedily and said nothing."""
    from lowbit_tp.errors import UserError

    proc = subprocess.run([sys.executable, "-m", "lowbit_tp.cli", "run", "--tp", "3", "--codec", "bf16", "--prompt",
                           "hi", "--temperature", "0.5", "--top-p", "0.9"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr == ("lowbit-tp: error: --temperature 0.5, --top-p 0.9 only apply with "
                                                    "--sample (greedy decoding is the default)\n"), proc.stderr
    # `run --seed 3` without --sample: greedy decoding draws nothing, so the seed changed nothing
    with pytest.raises(UserError, match=r"^--seed 3 only applies with --sample \(greedy decoding is the default\)$"):
        run._check_sampling_flags(parse("run", "--prompt", "hi", "--seed", "3"))
    run._check_sampling_flags(parse("run", "--prompt", "hi", "--sample", "--seed", "3"))
    run._check_sampling_flags(parse("run", "--prompt", "hi", "--sample", "--temperature", "0.5", "--top-k", "4"))
    run._check_sampling_flags(parse("run", "--prompt", "hi", "--temperature", "1.0"))  # the default: no change


def test_flags_an_engine_runtime_or_from_would_ignore_are_refused(tmp_path):
    """Each ran and ignored the flag without a word: `run --compile` on the native engine,
    `run --min-bytes 0 --algorithm gather`, `eval --timeout 5` in the simulator, `calibrate --from
    CAL --samples 8` (a flag left at its default passes)."""
    from lowbit_tp.errors import UserError

    def refused(parsed, check, msg):
        with pytest.raises(UserError, match=msg):
            check(parsed)

    refused(parse("run", "--prompt", "hi", "--compile"), run.cmd,
            r"^--compile only applies with --engine vllm \(the native engine runs eagerly\)$")
    refused(parse("run", "--prompt", "hi", "--engine", "transformers", "--compile"), run.cmd, "the transformers engine")
    refused(parse("run", "--prompt", "hi", "--algorithm", "gather", "--min-bytes", "0"), run.cmd,
            r"^--min-bytes 0 only applies with --algorithm auto \(its size gate\); --algorithm gather sends")
    # `run --engine vllm --threads-per-rank 2` ran its workers on one thread each, `--timeout` had no effect
    # (the check itself: past it, run.cmd would re-execute this process under a vLLM venv if one is set)
    refused(parse("run", "--prompt", "hi", "--tp", "3", "--engine", "vllm", "--threads-per-rank", "2"),
            run._check_engine_flags,
            r"^--threads-per-rank 2 does not apply with --engine vllm \(its workers run with OMP_NUM_THREADS")
    refused(parse("run", "--prompt", "hi", "--tp", "3", "--engine", "vllm", "--timeout", "5", "--threads-per-rank",
                  "2"), run._check_engine_flags, r"^--timeout 5.0, --threads-per-rank 2 do not apply with --engine vllm")
    for ok in (("--algorithm", "auto", "--min-bytes", "0"), ("--engine", "vllm", "--algorithm", "gather",
                                                              "--min-bytes", "0", "--compile"),
               ("--algorithm", "gather", "--min-bytes", "65536")):
        run._check_engine_flags(parse("run", "--prompt", "hi", *ok))
    refused(parse("eval", "--tp", "2", "--codec", "bf16", "--timeout", "5", "--threads-per-rank", "2"), eval.cmd,
            r"^--timeout 5.0, --threads-per-rank 2 only apply with --runtime tp \(the simulator")
    refused(parse("eval", "--tp", "2", "--codec", "bf16", "--threads-per-rank", "2"), eval.cmd,
            r"^--threads-per-rank 2 only applies with --runtime tp")
    eval._check_runtime_flags(parse("eval", "--tp", "2", "--codec", "bf16", "--runtime", "tp", "--timeout", "5"))
    eval._check_runtime_flags(parse("eval", "--tp", "2", "--codec", "bf16", "--timeout", "60"))  # the default
    refused(parse("calibrate", "--tp", "2", "--out", "x", "--from", "c", "--fisher-weights", "1", "--samples", "8",
                  "--k", "3"), calibrate.cmd, r"^--samples, --k do not apply with --from \(its statistics, windows")
    refused(parse("calibrate", "--tp", "2", "--out", "x", "--from", "c", "--fisher-weights", "1", "--allocate", "0"),
            calibrate.cmd, r"^--allocate does not apply with --from")
    calibrate._check_from_flags(calibrate.config_from_args(parse("calibrate", "--tp", "2", "--out", "x", "--from", "c",
                                                                 "--fisher-weights", "2", "--fisher-windows", "2")))
    # `calibrate --fisher-windows 3` without --fisher-weights ran no Fisher pass; with --fisher-windows
    # above --samples the pass read --samples windows
    # (the checks themselves: without them cmd would calibrate SmolLM2)
    from lowbit_tp.preflight import preflight_calibrate

    def cal_cfg(*argv):
        return calibrate.config_from_args(parse("calibrate", "--tp", "3", "--out", "x", *argv))

    # `calibrate --allocate 0 --alloc-low int4` skipped the probe and ignored --alloc-low
    refused(cal_cfg("--allocate", "0", "--alloc-low", "int4"), calibrate._check_alloc_flags,
            r"^--alloc-low applies to the bit allocation, which --allocate 0 skips$")
    refused(cal_cfg("--allocate", "0", "--alloc-codecs", "int4,int8", "--alloc-samples", "3"),
            calibrate._check_alloc_flags, r"^--alloc-codecs, --alloc-samples apply to the bit allocation")
    refused(cal_cfg("--allocate", "0", "--alloc-error-feedback"), calibrate._check_alloc_flags,
            r"^--alloc-error-feedback applies to the bit allocation, which --allocate 0 skips$")
    refused(cal_cfg("--alloc-error-feedback"), calibrate._check_from_flags,
            r"^--alloc-error-feedback does not apply with --from")
    calibrate._check_alloc_flags(cal_cfg("--allocate", "4", "--alloc-low", "int4", "--alloc-samples", "3"))
    calibrate._check_alloc_flags(cal_cfg("--allocate", "0"))
    refused(cal_cfg("--fisher-windows", "3"), calibrate._check_fisher_flags,
            r"^--fisher-windows 3 applies to the Fisher pass: give --fisher-weights DRAWS too$")
    calibrate._check_fisher_flags(cal_cfg("--fisher-windows", "3", "--fisher-weights", "1"))
    # `calibrate --allocate 2`: the calibration and the sensitivity probe ran, then no allocation
    # was stored (the default --alloc-low sends more than 2 bits/value)
    out = str(tmp_path / "c.safetensors")
    refused(cal_cfg("--allocate", "2"), lambda c: preflight_calibrate(c, out=out),
            r"^--allocate 2: --alloc-low, rot-lm4-g64-lg8-k4, sends 4\.\d{3} bits/value at hidden size 576, so no")
    refused(cal_cfg("--allocate", "3.9", "--alloc-codecs", "int8,int4"), lambda c: preflight_calibrate(c, out=out),
            r"^--allocate 3\.9: the cheapest of --alloc-codecs, int4, sends 4\.000 bits/value")
    for ok in (("--allocate", "4.5"), ("--allocate", "4", "--alloc-codecs", "int8,int4"), ("--allocate", "0")):
        preflight_calibrate(cal_cfg(*ok), out=out)
    refused(cal_cfg("--fisher-weights", "1", "--samples", "8", "--fisher-windows", "9"),
            lambda c: preflight_calibrate(c, out=str(tmp_path / "c.safetensors")),
            r"^--fisher-windows 9: this calibration reads 8 windows")


def test_eval_at_tp_1_says_that_no_codec_runs():
    """`eval --tp 1 --codec int4-g32` printed a row of +0% perplexity and KL 0 without a word: at
    TP 1 nothing is all-reduced, so the codec never ran (header only: no weights are loaded)."""
    from lowbit_tp.preflight import preflight_eval

    warned = []
    preflight_eval(EvalConfig(tp=1, codecs=("int4-g32",)), warn=warned.append)
    assert len(warned) == 1 and warned[0].startswith("--tp 1 has no all-reduce, so no codec runs"), warned
    warned.clear()
    preflight_eval(EvalConfig(tp=3, codecs=("int4-g32",)), warn=warned.append)
    assert warned == []


def test_text_glob_needs_a_text_directory(tmp_path):
    """`eval --text-glob '*.md'` without --text (or with --text FILE) read Shakespeare (or the file)
    and ignored the glob without a word; a directory takes it (header only: no weights load)."""
    from lowbit_tp.errors import UserError
    from lowbit_tp.preflight import preflight_calibrate, preflight_eval

    (tmp_path / "a.md").write_text("some text " * 50)
    out = str(tmp_path / "c.safetensors")
    with pytest.raises(UserError, match=r"^--text-glob '\*\.md' selects files of a --text directory; without "
                                        r"--text the default corpus \(Shakespeare\) is read$"):
        preflight_eval(EvalConfig(tp=3, codecs=("int4-g32",), text_glob="*.md"), warn=lambda _: None)
    with pytest.raises(UserError, match=r"^--text-glob '\*\.md' selects files of a --text directory; .*a\.md is a file$"):
        preflight_calibrate(CalibrationConfig(tp=3, text=str(tmp_path / "a.md"), text_glob="*.md"), out=out)
    preflight_calibrate(CalibrationConfig(tp=3, text=str(tmp_path), text_glob="*.md", allocate=0), out=out)
    preflight_eval(EvalConfig(tp=3, codecs=("int4-g32",), text=str(tmp_path / "a.md")), warn=lambda _: None)


def test_demo_synthetic_refuses_the_model_demos_flags():
    """`demo --synthetic --tp 1` ran its TP-2 tour and ignored --tp (a flag left at its default passes)."""
    proc = subprocess.run([sys.executable, "-m", "lowbit_tp.cli", "demo", "--synthetic", "--tp", "1", "--codec",
                           "int8"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr == ("lowbit-tp: error: --tp, --codec apply to the model demo; "
                                                    "--synthetic runs every codec at TP 2 without a model\n"), \
        proc.stderr
    proc = subprocess.run([sys.executable, "-m", "lowbit_tp.cli", "demo", "--synthetic", "--max-new-tokens", "5"],
                          capture_output=True, text=True)  # one flag: "applies" (was "apply")
    assert proc.returncode == 2 and proc.stderr.startswith("lowbit-tp: error: --max-new-tokens applies to the model "
                                                           "demo; --synthetic"), proc.stderr


def test_run_warns_about_generations_past_the_models_context():
    """`run` generated past max_position_embeddings without a word (eval warns for --seq-len)."""
    from types import SimpleNamespace

    results = [SimpleNamespace(prompt_ids=[0] * 60, new_tokens=4), SimpleNamespace(prompt_ids=[0] * 60, new_tokens=5),
               SimpleNamespace(prompt_ids=[0] * 3, new_tokens=100)]
    assert run.past_context(results, 64) == [
        "prompt 1: 60 prompt + 5 new tokens exceed the model's context of 64 tokens; the text beyond it is not "
        "meaningful",
        "prompt 2: 3 prompt + 100 new tokens exceed the model's context of 64 tokens; the text beyond it is not "
        "meaningful"]
    assert run.past_context(results, None) == []


def test_demo_synthetic_tours_the_default_codecs_family_and_matches_the_simulator():
    """The tour said "every codec" but left out the rot-* codecs the default codec is made of."""
    from lowbit_tp.configs import CalibrationConfig
    from lowbit_tp.demo import codec_demo

    rows, table = codec_demo(world=2, tokens=16, hidden=256)
    codecs = {r["codec"] for r in rows}
    assert {CalibrationConfig.alloc_low, CalibrationConfig.alloc_high, "int4-outlier", "bf16"} <= codecs
    assert all(r["bitwise_equal_to_simulator"] for r in rows) and len(rows) == 2 * len(codecs)
    assert f"| {CalibrationConfig.alloc_low} | two-shot |" in table


def test_run_config_refuses_a_codec_object_and_a_prompt_that_is_not_text():
    """run_tp / RunConfig take a codec *name* (each rank builds its codec): a Codec object, which
    every other API takes, failed in the preflight with "AttributeError: 'GroupInt4Codec' object has
    no attribute 'endswith'"; token ids as a prompt were called "empty"."""
    from lowbit_tp.codecs import make_codec
    from lowbit_tp.configs import RunConfig
    from lowbit_tp.errors import UserError

    with pytest.raises(UserError, match=r"codec must be a codec name such as 'int4-g32' \(each rank builds its own\), "
                                        r"got a \w+Codec$"):
        RunConfig(tp=2, prompts=("hi",), codec=make_codec("int4-g32"))
    with pytest.raises(UserError, match=r"^prompt 1 is a list, not a string$"):
        RunConfig(tp=2, prompts=("hi", [5, 6]))
    with pytest.raises(UserError, match=r"^prompt 0 is empty"):
        RunConfig(tp=2, prompts=("",))


def test_serve_and_run_vllm_refuse_a_bad_port_tp_or_length_before_vllm(tmp_path, monkeypatch, capsys):
    """`serve --port 70000` (vLLM: OverflowError traceback after 19 s), `--tp 0`/`-2`,
    `--max-model-len 0` are refused while parsing; a TP degree the model's heads do not divide
    (`serve --model smollm2-135m --tp 2 --codec bf16`: a 57-line pydantic traceback from vLLM)
    is one line from `serve` and from `run --engine vllm`, before vLLM is imported."""
    from helpers import save_tiny
    from lowbit_tp.integrations.vllm import engine as E

    for bad in (["--port", "70000"], ["--port", "0"], ["--port", "http"], ["--tp", "0"], ["--tp", "-2"],
                ["--max-model-len", "0"], ["--min-bytes", "-1"]):
        argv = ["serve", *(["--tp", "3"] if bad[0] != "--tp" else []), *bad]
        with pytest.raises(SystemExit) as exc:
            parse(*argv)
        assert exc.value.code == 2, argv
        assert bad[0] in capsys.readouterr().err, argv
    assert parse("serve", "--tp", "3", "--port", "65535").port == 65535

    tiny = save_tiny(tmp_path, "llama")  # 4 heads, 2 KV heads: TP 3 does not fit
    monkeypatch.setattr(serve, "ensure_vllm_python", lambda *a: None)
    monkeypatch.setattr(serve, "model_directory", lambda model: model)
    args = parse("serve", "--model", tiny, "--tp", "3", "--codec", "bf16", "--dry-run")
    with pytest.raises(UserError, match=r"^serve: TP degree 3 does not divide the 4 attention heads"):
        args.func(args)
    args = parse("serve", "--model", tiny, "--tp", "2", "--codec", "bf16", "--dry-run")
    args.func(args)  # fits: the vLLM command is printed
    assert "--tensor-parallel-size 2" in capsys.readouterr().out
    monkeypatch.setattr(run, "ensure_vllm_python", lambda *a: None)
    args = parse("run", "--engine", "vllm", "--model", tiny, "--tp", "3", "--codec", "bf16", "--prompt", "x")
    monkeypatch.setattr(E, "model_directory", lambda model: model)
    with pytest.raises(UserError, match=r"^run: TP degree 3 does not divide the 4 attention heads"):
        args.func(args)
    for codec in ("none", "bf16"):  # without the plugin too (vLLM's own refusal is a traceback as well)
        args = parse("serve", "--model", tiny, "--tp", "3", "--codec", codec, "--dry-run")
        with pytest.raises(UserError, match=r"^serve: TP degree 3 does not divide"):
            args.func(args)
        args = parse("run", "--engine", "vllm", "--model", tiny, "--tp", "3", "--codec", codec, "--prompt", "x")
        with pytest.raises(UserError, match=r"^run: TP degree 3 does not divide"):
            args.func(args)


def test_serve_dry_run_prints_the_environment_the_server_needs(tmp_path, monkeypatch, capsys):
    """`serve --dry-run` printed the bare vLLM command: run as printed, it started vLLM with no
    LOWBIT_TP_* settings, i.e. uncompressed, silently. The printed line, run by a shell, gives
    the workers the plugin config that serve itself would (and `--codec none` removes a stray
    LOWBIT_TP_CODEC and names no plugin)."""
    import json
    import os
    import shlex

    from helpers import save_tiny
    from lowbit_tp.integrations.vllm.config import ENV

    tiny = save_tiny(tmp_path, "llama")
    monkeypatch.setattr(serve, "ensure_vllm_python", lambda *a: None)
    monkeypatch.setattr(serve, "model_directory", lambda model: model)
    probe = "import os, json; print(json.dumps(dict(os.environ)))"

    def child_env(line: str) -> dict:
        words = shlex.split(line)
        cut = words.index("-m")  # the interpreter before it: replace the server by a probe
        proc = subprocess.run([*words[:cut - 1], sys.executable, "-c", probe], capture_output=True, text=True,
                              check=True)
        return json.loads(proc.stdout)

    monkeypatch.setenv("LOWBIT_TP_CAPTURE_DIR", str(tmp_path / "cap"))  # tracing from the environment, kept
    flags = ["serve", "--model", tiny, "--tp", "2", "--codec", "int4-g32", "--algorithm", "two-shot",
             "--min-bytes", "0", "--error-feedback", "first-stage"]
    args = parse(*flags, "--dry-run")
    args.func(args)
    env = child_env(capsys.readouterr().out.strip())
    assert PluginConfig.from_env(env) == serve.plugin_config(parse(*flags)) == PluginConfig(
        codec="int4-g32", algorithm="two-shot", min_bytes=0, error_feedback="first-stage",
        capture_dir=str(tmp_path / "cap"))
    assert "VLLM_PLUGINS" not in env

    monkeypatch.setenv("LOWBIT_TP_CODEC", "int8")
    monkeypatch.setenv("VLLM_PLUGINS", "lowbit_tp")
    args = parse("serve", "--model", tiny, "--tp", "2", "--codec", "none", "--dry-run")
    args.func(args)
    env = child_env(capsys.readouterr().out.strip())
    assert env["VLLM_PLUGINS"] == "none" and not any(v in env for v in ENV.values())
    assert os.environ["LOWBIT_TP_CODEC"] == "int8"  # a dry run changes nothing here


def test_serve_flags_left_at_their_defaults_keep_the_environments_settings(monkeypatch):
    """`LOWBIT_TP_MIN_BYTES=0 lowbit-tp serve ...` kept the 64 KiB gate: every flag's default
    overrode its variable (as --error-feedback's did before), so LOWBIT_TP_ALGORITHM,
    LOWBIT_TP_CALIBRATION and LOWBIT_TP_CODEC were dropped silently. A flag given explicitly
    still wins."""
    for var in PluginConfig().as_env() | {"LOWBIT_TP_CODEC": "", "LOWBIT_TP_CALIBRATION": ""}:
        monkeypatch.delenv(var, raising=False)
    env = {"LOWBIT_TP_CODEC": "int4-g32", "LOWBIT_TP_CALIBRATION": "c.safetensors", "LOWBIT_TP_ALGORITHM": "two-shot",
           "LOWBIT_TP_MIN_BYTES": "0", "LOWBIT_TP_NONFINITE": "error"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert serve.plugin_config(parse("serve", "--tp", "2")) == PluginConfig.from_env(env) == PluginConfig(
        codec="int4-g32", calibration="c.safetensors", algorithm="two-shot", min_bytes=0, nonfinite="error")
    given = serve.plugin_config(parse("serve", "--tp", "2", "--codec", "int8", "--calibration", "d.safetensors",
                                      "--algorithm", "gather", "--min-bytes", "4096"))
    assert given == PluginConfig(codec="int8", calibration="d.safetensors", algorithm="gather", min_bytes=4096,
                                 nonfinite="error")
    assert serve.plugin_config(parse("serve", "--tp", "2", "--codec", "none")) is None
    # a flag given with the default's value still wins over the environment (it compared equal to
    # the default and lost: --codec default --min-bytes 65536 kept int4-g32 and 0)
    d = PluginConfig()
    explicit = serve.plugin_config(parse("serve", "--tp", "2", "--codec", "default", "--algorithm", d.algorithm,
                                         "--min-bytes", str(d.min_bytes)))
    assert (explicit.codec, explicit.algorithm, explicit.min_bytes) == ("default", "auto", 65536)
    for k in env:
        monkeypatch.delenv(k)
    assert serve.plugin_config(parse("serve", "--tp", "2")) == PluginConfig(codec=serve.default(RunConfig, "codec"))


def test_serve_checks_the_plugin_settings_passed_on_in_additional_config(tmp_path, monkeypatch, capsys):
    """`serve --codec int4-g32 -- --additional-config '{"lowbit_tp": {"codec": "bogus"}}'`: the
    preflight checked the flags alone, and every worker, which reads the additional config on
    top, stopped with a traceback. Now the settings the workers will use are checked."""
    from helpers import save_tiny

    tiny = save_tiny(tmp_path, "llama")
    for var in PluginConfig().as_env() | {"LOWBIT_TP_CODEC": "", "LOWBIT_TP_CALIBRATION": ""}:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(serve, "ensure_vllm_python", lambda *a: None)
    monkeypatch.setattr(serve, "model_directory", lambda model: model)

    def dry(codec, *vllm_args):
        args = parse("serve", "--model", tiny, "--tp", "2", "--codec", codec, "--dry-run", "--", *vllm_args)
        args.func(args)
        return capsys.readouterr().out

    for codec, extra, msg in (
            ("int4-g32", ["--additional-config", '{"lowbit_tp": {"codec": "bogus"}}'], "unknown codec 'bogus'"),
            ("int4-g32", ['--additional-config={"lowbit_tp": {"codec": "int4-outlier"}}'],
             "'int4-outlier' uses static scales and needs a calibration"),
            ("int4-g32", ["--additional-config", '{"lowbit_tp": {"algorithm": "exact"}}'],
             "algorithm 'exact' .* would ignore codec 'int4-g32'"),
            ("int4-g32", ["--additional-config", "{lowbit_tp: 1"], "--additional-config is not JSON"),
            ("int4-g32", ["--additional_config", '{"lowbit_tp": {"codec": "bogus"}}'], "unknown codec 'bogus'"),
            ("int4-g32", ['--additional_config={"lowbit_tp": {"codec": "int8"}}',  # the last one given wins
                          "--additional-config", '{"lowbit_tp": {"codec": "bogus"}}'], "unknown codec 'bogus'"),
            ("none", ["--additional-config", '{"lowbit_tp": {"codec": "int8"}}'], "--codec none runs vLLM without")):
        with pytest.raises(UserError, match="^serve: .*" + msg):
            dry(codec, *extra)
    # a flag serve sets itself, given again after --: vLLM took the last one (it listened on 9000
    # while serve's start line said 8000)
    for extra, msg in ((["--port", "9000"], "--port after -- would override .* give it as serve's --port"),
                       (["--tensor_parallel_size=3"], "--tensor_parallel_size after -- .* serve's --tp"),
                       (["-tp", "3"], "-tp after -- .* serve's --tp"),
                       (["--dtype", "bfloat16"], "--dtype after -- .* serve sets it")):
        with pytest.raises(UserError, match="^serve: " + msg):
            dry("int4-g32", *extra)
    assert dry("int4-g32", "--max-num-seqs", "4").rstrip().endswith("--max-num-seqs 4")
    out = dry("int4-g32", "--additional-config", '{"lowbit_tp": {"algorithm": "two-shot"}, "other": 1}')
    assert out.rstrip().endswith("--additional-config '{\"lowbit_tp\": {\"algorithm\": \"two-shot\"}, \"other\": 1}'")
    assert "LOWBIT_TP_CODEC=int4-g32" in dry("int4-g32", "--additional-config", '{"other": 1}')


def test_run_warns_when_a_plan_made_for_feedback_runs_without_it(tmp_path, capsys):
    """`calibrate --alloc-error-feedback` plans each layer's bits by its cost with feedback; `run`
    (as `eval`) says so when that plan runs without --error-feedback, before anything loads."""
    from lowbit_tp.calibration.artifact import Calibration
    from lowbit_tp.calibration.synthetic import synthetic_calibration

    cal = synthetic_calibration(["a.o_proj", "a.down_proj"], world=2, hidden=64, tokens=4, batches=1)
    for made_with, given, warned in ((True, [], True), (True, ["--error-feedback"], False), (False, [], False)):
        plan = {"budget": 5.0, "layers": {name: "int4-g32" for name in cal.layers}, "error_feedback": made_with}
        path = Calibration(meta={**cal.meta, "bit_allocation": plan}, stats=cal.stats).save(tmp_path / "c.safetensors")
        args = parse("run", "--model", str(tmp_path / "no-model"), "--tp", "2", "--codec", "default", "--calibration",
                     str(path), "--prompt", "x", *given)
        with pytest.raises(UserError):  # the missing model, after the warning
            args.func(args)
        err = capsys.readouterr().err
        assert ("codec 'default': the calibration's bit allocation was planned with error feedback" in err) is warned, err


def test_eval_and_serve_warn_when_a_plan_made_for_feedback_runs_without_it(tmp_path, monkeypatch, capsys):
    """The warning of `run` (above), from `eval`'s preflight and from `serve` (its vLLM workers
    would run the plan without feedback), before anything starts; with feedback, none."""
    from helpers import save_tiny
    from lowbit_tp.calibration.synthetic import synthetic_calibration
    from lowbit_tp.preflight import preflight_eval

    path = save_tiny(tmp_path, "llama")
    layers = [f"model.layers.{i}.{kind}" for i in range(2) for kind in ("self_attn.o_proj", "mlp.down_proj")]
    cal = synthetic_calibration(layers, world=2, hidden=64, tokens=16, batches=1)
    cal.meta["bit_allocation"] = {"budget": 5.0, "layers": dict.fromkeys(layers, "int4-g32"), "error_feedback": True}
    file = str(cal.save(tmp_path / "c.safetensors"))
    said = "the calibration's bit allocation was planned with error feedback"
    for ef in (False, True):
        warned: list[str] = []
        preflight_eval(EvalConfig(model=path, tp=2, codecs=("default", "int4-g32"), calibration=file,
                                  error_feedback=ef), warn=warned.append)
        assert [w.split(":")[0] for w in warned if said in w] == ([] if ef else ["codec 'default'"]), warned
    monkeypatch.setattr(serve, "ensure_vllm_python", lambda *a: None)
    monkeypatch.setattr(serve, "model_directory", lambda model: model)
    for given in ([], ["--error-feedback"]):
        args = parse("serve", "--model", path, "--tp", "2", "--codec", "alloc", "--calibration", file, *given,
                     "--dry-run")
        args.func(args)
        assert (said in capsys.readouterr().err) is (not given)
