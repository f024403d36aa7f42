"""Every run's configuration, as frozen dataclasses, in one torch-free module.

The library modules that do the work import their config from here, and the ``lowbit-tp``
command reads its flag defaults from these fields, so a default is stated once. This module
imports only the standard library and :mod:`lowbit_tp.errors`: ``lowbit-tp --help`` builds
its parser from it without importing torch. Validation here is cheap (types and ranges);
checks that need the codec registry or a model header run in :mod:`lowbit_tp.preflight`.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from lowbit_tp.errors import UserError

__all__ = [
    "ALGORITHMS",
    "DEFAULT_ALGORITHM",
    "ENGINES",
    "SPLITS",
    "AutoPolicy",
    "CalibrationConfig",
    "CommBenchConfig",
    "DemoConfig",
    "E2EConfig",
    "EvalConfig",
    "RankOptions",
    "RunConfig",
    "SamplingConfig",
    "check_min",
]

ALGORITHMS = ("exact", "gather", "two-shot", "auto")
# The one default of every API that takes an algorithm (all_reduce, simulate_all_reduce,
# TPSimulator, EvalConfig, RunConfig, the CLI): the seed paper's collective. It always
# applies the codec (``auto`` may choose ``exact`` for small messages) and every quality
# result is measured with it; ``auto`` and ``two-shot`` are opt-in.
DEFAULT_ALGORITHM = "gather"

ENGINES = ("native", "transformers")  # engines of RunConfig; `lowbit-tp run --engine vllm` maps onto native's config
SPLITS = ("test", "dev")  # EvalConfig.split

# ``calibrate --alloc-codecs ladder``: the candidates of the 4.25-bit plans with error feedback
# and Fisher weights (docs/design-dev.md, stops 29-30; SmolLM2 TP 3 +0.36%, Gemma 3 TP 2 +0.94%
# on test): the whole-bit rot-* formats and the five fixed-rate ECSQ research codecs (no GPU kernels).
ALLOC_LADDER = ("rot-lm3-g64-lg8-k4", "rot-lm4-g64-lg8-k4", "rot-lm4-g32-lg8-k4", "rot-int5-g64-lg8-k4",
                "rot-int6-g64-lg8-k4", "rot-int8-g64-lg8-k4", "rot-ecsq3.5-k4", "rot-ecsq3.875-k4",
                "rot-ecsq4.25-k4", "rot-ecsq4.625-k4", "rot-ecsq5-k4")


def check_min(value: Any, name: str, minimum: float = 1) -> None:
    """``value`` must be a number ``>= minimum`` (and finite); ``name`` is the flag shown."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or value < minimum):  # (numbers.Real: numpy's integer and float scalars too)
        raise UserError(f"{name} must be {'a positive integer' if minimum == 1 else f'>= {minimum}'}, got {value!r}")


@dataclass(frozen=True)
class AutoPolicy:
    """How ``algorithm="auto"`` picks, in this order (all thresholds configurable):

    1. ``world_size == 1`` -> nothing to reduce.
    2. the message, counted as bf16 bytes (``2 * numel``), is below ``min_bytes`` ->
       ``exact``: small (decode-time) messages are latency-bound, so encoding them only
       adds time.
    3. ``world_size >= two_shot_min_world`` -> ``two-shot``: at N >= 3 it sends fewer
       bytes than ``gather`` (2(N-1)/N vs N-1 payloads per rank).
    4. otherwise ``gather`` (one quantization instead of two, same bytes at N = 2).

    Defaults come from ``lowbit-tp bench-comm`` on loopback gloo (docs/speed.md); retune
    them with that command for a given link.

    ``chunk_bytes`` (counted as bf16 bytes, like ``min_bytes``) pipelines compressed
    messages larger than it: they go as row chunks of about that size, so that encoding
    chunk i+1, moving chunk i and decoding chunk i-1 overlap (see
    :func:`~lowbit_tp.collectives.dist.all_reduce`). ``0`` (the default) sends every
    message whole. The result is bitwise the same either way: every codec encodes each
    token row on its own.

    Why off by default: measured with ``scripts/bench_chunks.py`` (docs/bench/comm_chunks_net.md,
    TP 2, gloo, 1M and 4M values), chunking was never faster than one message, neither on
    loopback (up to 3-4x slower) nor on an emulated 1 Gbit/s link (equal at best): on a CPU
    the asynchronous transfer's threads compete with the codec for the same cores, and the
    codec (about 1 ms per 1M values) is short next to the per-chunk overheads. Pipelining can
    pay only where the transfer runs on its own hardware (NIC DMA, NCCL copy engines) and a
    chunk's transfer outlasts its codec time: measure that link with the script, then set it.
    Those runs were under load 12-14. ``scripts/bench_wire.py`` (docs/bench/tp2_allreduce.md:
    one prefill-sized call at a time after a barrier, the slower rank's time) found 1 MiB
    chunks 1.3-1.7x faster on emulated 1 Gbit/s for bf16 and int4-outlier alike (whole
    8 MiB messages ran the link at ~55%). On the quiet machine of stop 22
    (docs/bench/comm_chunks_net_stop22.md, same script, TP 2, 4M values) 1 MiB chunks were 10%
    slower on loopback and 24% faster on 1 Gbit/s than whole messages: the default stays 0, and a
    slow link should set it.
    """

    min_bytes: int = 64 * 1024
    two_shot_min_world: int = 3
    chunk_bytes: int = 0

    def __post_init__(self):
        # chunk_bytes=-1 read as 0 (off) and a string failed at the first message
        check_min(self.min_bytes, "AutoPolicy.min_bytes", 0)
        check_min(self.chunk_bytes, "AutoPolicy.chunk_bytes", 0)
        check_min(self.two_shot_min_world, "AutoPolicy.two_shot_min_world", 2)

    def chunk_rows(self, *, tokens: int, hidden: int) -> int:
        """Rows per pipelined chunk of a ``[tokens, hidden]`` message (``tokens``: no chunking)."""
        if self.chunk_bytes <= 0 or 2 * tokens * hidden <= self.chunk_bytes:
            return tokens
        return max(1, self.chunk_bytes // (2 * hidden))

    def choose(self, *, numel: int, world_size: int) -> str:
        if world_size <= 1:
            return "exact"
        if 2 * numel < self.min_bytes:
            return "exact"
        return "two-shot" if world_size >= self.two_shot_min_world else "gather"


@dataclass(frozen=True)
class RankOptions:
    """How spawned local ranks run: ``timeout_s`` bounds each collective (a dead or stalled
    peer surfaces as a ``CollectiveError`` after at most this long); ``threads_per_rank``
    torch threads per rank process."""

    timeout_s: float = 60.0
    threads_per_rank: int = 1


@dataclass(frozen=True)
class SamplingConfig:
    """Greedy by default. With ``do_sample``: temperature, then top-k (0 = off), then
    top-p (1.0 = off), then one multinomial draw from a generator seeded with ``seed``."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature <= 0:
            raise UserError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0, got {self.top_k}")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything that decides a TP generation run; recorded next to its results.

    ``codec`` names a registered codec; ``calibration`` is a ``.safetensors`` path (needed by
    static codecs, optional for dynamic ones). ``algorithm``: ``gather`` (default,
    the one rule of :data:`DEFAULT_ALGORITHM`) | ``two-shot`` | ``auto`` | ``exact``;
    ``policy`` sets the thresholds of ``auto``. ``timeout_s`` is the process group's
    collective timeout: a dead peer surfaces as ``CollectiveError`` after at most this long.
    ``ignore_eos`` always generates ``max_new_tokens``. ``engine``: ``native`` (lowbit-tp's
    own sharding, :func:`~lowbit_tp.runtime.shard.shard_model`) or ``transformers``
    (transformers' TP with the ``lowbit_rowwise`` style); both reduce through a
    :class:`~lowbit_tp.tp.DistReducer` and report the same fields.
    """

    model: str = "smollm2-135m"
    tp: int
    prompts: tuple[str, ...]
    codec: str = "bf16"
    calibration: str | None = None
    algorithm: str = DEFAULT_ALGORITHM
    policy: AutoPolicy = AutoPolicy()
    max_new_tokens: int = 64
    sampling: SamplingConfig = SamplingConfig()
    ignore_eos: bool = False
    timeout_s: float = RankOptions.timeout_s
    threads_per_rank: int = RankOptions.threads_per_rank
    keep_prefill_logits: bool = False
    engine: str = "native"
    # lowbit_tp.collectives.feedback; every engine (the vLLM plugin too); FEEDBACK_MODES
    error_feedback: bool | str = False

    def __post_init__(self):
        if isinstance(self.prompts, str):
            raise TypeError("prompts must be a sequence of strings, not one string")
        object.__setattr__(self, "prompts", tuple(self.prompts))
        if not self.prompts:
            raise UserError("give at least one prompt")
        other = [i for i, p in enumerate(self.prompts) if not isinstance(p, str)]
        if other:
            raise UserError(f"prompt {other[0]} is a {type(self.prompts[other[0]]).__name__}, not a string")
        empty = [i for i, p in enumerate(self.prompts) if not p]
        if empty:
            raise UserError(f"prompt {empty[0]} is empty; give some text to continue")
        if not isinstance(self.codec, str):  # each rank builds its codec from the name (and calibration path)
            raise UserError(f"codec must be a codec name such as 'int4-g32' (each rank builds its own), got a "
                            f"{type(self.codec).__name__}")
        check_min(self.tp, "tp")
        check_min(self.max_new_tokens, "max_new_tokens")
        check_min(self.threads_per_rank, "threads_per_rank")
        if not (isinstance(self.timeout_s, (int, float)) and self.timeout_s > 0):
            raise UserError(f"timeout_s must be a positive number of seconds, got {self.timeout_s!r}")
        if self.algorithm not in ALGORITHMS:
            raise UserError(f"unknown algorithm {self.algorithm!r}; one of {', '.join(ALGORITHMS)}")
        if self.algorithm == "exact" and self.codec != "bf16":  # as TPSimulator: never ignore a codec silently
            raise UserError(f"algorithm 'exact' (the backend all-reduce, uncompressed) would ignore codec "
                            f"{self.codec!r}; use gather, two-shot or auto, or codec bf16 for the exact baseline")
        feedback_mode(self.error_feedback)
        if self.algorithm == "exact" and self.error_feedback:  # as TPSimulator: the exact sum has no error
            raise UserError("error feedback needs a compressed all-reduce: algorithm 'exact' has no quantization "
                            "error to feed back; use gather, two-shot or auto")
        if self.engine not in ENGINES:
            raise UserError(f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CalibrationConfig:
    """What ``lowbit-tp calibrate`` does; recorded in the artifact."""

    model: str = "smollm2-135m"
    tp: int = 3
    samples: int = 64
    seq_len: int = 256
    batch_size: int = 8
    seed: int = 0
    ema_decay: float = 0.9
    k: int | None = None  # bf16 channels for codecs that take k from the calibration; None: hidden // 64
    text: str | None = None  # None: the Shakespeare calibration plays
    text_glob: str = "*"  # files of a ``text`` directory to read
    side: str = "calibration"  # which side of the text split to read; "evaluation" for held-out analysis
    # Per-layer bit allocation stored for codec "alloc" (= "default"): mean bits/value budget,
    # the codec most layers get, the one the most sensitive layers get. None skips it.
    allocate: float | None = 4.5
    alloc_low: str = "rot-lm4-g64-lg8-k4"
    alloc_high: str = "rot-int6-g64-lg8-k4"
    alloc_samples: int = 2
    # Candidate codecs for a multi-codec allocation (allocate_many); empty: the two above.
    # alloc_low is then the reference codec whose per-layer KL is measured.
    alloc_codecs: tuple[str, ...] = ()
    # Measure the per-layer KL with error feedback along depth: the plan for runs that use
    # --error-feedback (a layer's cost with feedback is not its cost without).
    alloc_error_feedback: bool = False
    # Fisher channel weights for the NAME+fisher codecs (lowbit_tp.calibration.fisher):
    # label draws (0 skips the pass) over the first fisher_windows calibration windows.
    fisher_draws: int = 0
    fisher_windows: int = 4


@dataclass(frozen=True)
class EvalConfig:
    """What ``lowbit-tp eval`` measures; recorded with every result."""

    model: str = "smollm2-135m"
    tp: int = 3
    codecs: tuple[str, ...] = ("int4-outlier",)
    algorithm: str = DEFAULT_ALGORITHM
    calibration: str | None = None
    samples: int = 32
    seq_len: int = 256
    batch_size: int = 8
    lambada: int = 128          # last-word items; 0 skips
    lambada_context: int = 128  # tokens of context before each target word
    # Evaluation windows. 10, not 1: seed 1's first 16 held-out windows are the ones the default
    # codec was chosen on (a larger --samples of one seed is a superset), and seed 10 shares no
    # window with seed 1's first 64 (scripts/heldout_windows.py). Differs from calibration's 0.
    seed: int = 10
    text: str | None = None
    text_glob: str = "*"        # which files of a --text directory to read
    split: str = "test"         # "test": the held-out text; "dev": calibration text off the calibration windows
    codec_options: dict = field(default_factory=dict)
    # Error feedback along depth (lowbit_tp.collectives.feedback) for every codec of the run:
    # one of FEEDBACK_MODES
    error_feedback: bool | str = False

    def __post_init__(self):
        object.__setattr__(self, "codecs", tuple(self.codecs))
        check_min(self.tp, "tp")
        check_min(self.samples, "samples")
        check_min(self.batch_size, "batch_size")
        check_min(self.lambada, "lambada", 0)
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise UserError(f"seq_len must be at least 2 (a window of 1 token has no next token to predict), "
                            f"got {self.seq_len!r}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        feedback_mode(self.error_feedback)


# bench-comm message sizes in bytes of the bf16 tensor: 64 KB to 64 MB.
DEFAULT_MESSAGE_BYTES = (64 * 1024, 1024 * 1024, 16 * 1024 * 1024, 64 * 1024 * 1024)


@dataclass(frozen=True)
class CommBenchConfig:
    """One ``lowbit-tp bench-comm`` sweep: every world size x message size x codec x
    algorithm x chunk size. ``timeout_s`` bounds each collective. The codec names are
    checked against the registry when the sweep starts (:func:`~lowbit_tp.bench.comm.run_comm_bench`)."""

    world_sizes: tuple[int, ...] = (2,)
    codecs: tuple[str, ...] = ("bf16", "int8", "int4-outlier", "int4-g32", "int4-g128", "mxfp4")
    numels: tuple[int, ...] = tuple(b // 2 for b in DEFAULT_MESSAGE_BYTES)
    algorithms: tuple[str, ...] = ("gather", "two-shot")
    hidden: int = 4096
    repeats: int = 5
    backend: str = "gloo"
    threads_per_rank: int = 1
    timeout_s: float = 300.0
    chunk_bytes: tuple[int, ...] = (AutoPolicy.chunk_bytes,)
    speed_backends: tuple[str, ...] = ("reference", "auto")

    def __post_init__(self):  # refuse bad settings here, before any rank is spawned
        for w in self.world_sizes:
            check_min(w, "world size", 2)  # a collective between ranks (one rank divided by zero in the ranks)
        for n in self.numels:
            check_min(n, "numel")
        check_min(self.hidden, "hidden")
        for n in self.numels:  # a message is [numel / hidden, hidden]: any other count was rounded, unsaid
            if n % self.hidden:
                raise UserError(f"numel {n} is not a multiple of hidden {self.hidden} (a message is "
                                f"[numel / hidden, hidden]); e.g. numel {max(1, round(n / self.hidden)) * self.hidden}")
        check_min(self.repeats, "repeats")
        check_min(self.threads_per_rank, "threads_per_rank")
        if not self.codecs:
            raise UserError("give at least one codec")
        bad = [a for a in self.algorithms if a not in ALGORITHMS or a == "exact"]
        if bad:
            raise UserError(f"unknown algorithm {bad[0]!r}; bench-comm runs gather and/or two-shot")
        if self.backend not in ("gloo", "nccl"):
            raise UserError(f"backend must be gloo or nccl, got {self.backend!r}")


@dataclass(frozen=True)
class E2EConfig:
    """One ``bench-e2e`` sweep; recorded in the results.

    ``networks``: ``loopback`` and/or tc rates (``10gbit``); ``delay``: one-way delay per
    packet on emulated links (``0``: none; needs netem otherwise). ``codecs`` run with
    ``algorithm``; ``bf16`` always runs with ``gather`` as the baseline, and with ``exact``
    too when ``exact_baseline``. ``model``: ``random-llama`` (shape from ``hidden``,
    ``intermediate``, ``layers``, ``heads``, ``kv_heads``) or a registry name / checkpoint
    directory. ``repeats`` prompts of each length run per launch; ``rounds`` launches per
    variant, interleaved (medians pool all ``repeats * rounds``). ``sync_wire``: a barrier
    before each backend collective inside an all-reduce, so that the wire timer excludes the
    ranks' arrival skew (reported as ``*_skew_ms``). ``chunk_bytes``: the
    :class:`AutoPolicy` pipelining chunk size of every variant alike (0: whole messages).
    ``error_feedback``: ``off`` (every compressed codec without it), ``on`` (with
    :mod:`~lowbit_tp.collectives.feedback`, as ``RunConfig.error_feedback``) or ``both``
    (each compressed codec twice, interleaved in the same rounds, so that feedback's cost is
    measured in the same run; bf16 never uses it).
    """

    networks: tuple[str, ...] = ("loopback", "10gbit", "1gbit")
    tps: tuple[int, ...] = (2,)
    codecs: tuple[str, ...] = ("int4-outlier", "int4-g32")
    algorithm: str = DEFAULT_ALGORITHM
    exact_baseline: bool = True
    prompt_lens: tuple[int, ...] = (2048, 512)
    new_tokens: int = 16
    repeats: int = 3
    rounds: int = 1
    model: str = "random-llama"
    hidden: int = 2048
    intermediate: int = 5632
    layers: int = 2
    heads: int = 16
    kv_heads: int = 4
    calibration_samples: int = 8
    delay: str = "0"
    threads_per_rank: int = 1
    sync_wire: bool = True
    chunk_bytes: int = AutoPolicy.chunk_bytes
    run_timeout_s: float = 900.0
    error_feedback: str = "off"

    def __post_init__(self):
        if self.error_feedback not in FEEDBACK_VARIANTS:
            raise UserError(f"error_feedback must be one of {', '.join(FEEDBACK_VARIANTS)}, "
                            f"got {self.error_feedback!r}")
        two_shot = self.algorithm == "two-shot" or (
            self.algorithm == "auto" and max(self.tps) >= AutoPolicy.two_shot_min_world)
        if self.error_feedback != "off" and two_shot and self.chunk_bytes > 0:
            raise UserError(f"error feedback with two-shot needs whole messages ({self.algorithm} is two-shot at "
                            f"TP {max(self.tps)}): use --chunk-bytes 0 or --algorithm gather")
        # flags that were silently ignored: a checkpoint brings its own shape, loopback has no link to delay
        shape = [f"--{f.name.replace('_', '-')}" for f in fields(self)
                 if f.name in ("hidden", "intermediate", "layers", "heads", "kv_heads")
                 and getattr(self, f.name) != f.default]
        if shape and self.model != "random-llama":
            raise UserError(f"{', '.join(shape)} shape{'' if len(shape) > 1 else 's'} the random-llama model; "
                            f"--model {self.model} has its own shape")
        if self.delay not in ("0", "") and all(n == "loopback" for n in self.networks):
            raise UserError(f"--delay {self.delay} applies to emulated links (--network RATE); loopback has none")

    def variants(self) -> list[tuple[str, str, bool]]:
        """(codec, algorithm, error feedback) of one network and TP degree, baseline first."""
        out = [("bf16", "gather", False)] + ([("bf16", "exact", False)] if self.exact_baseline else [])
        flags = FEEDBACK_VARIANTS[self.error_feedback]
        return out + [(c, self.algorithm, f) for c in self.codecs if c != "bf16" for f in flags]


# E2EConfig.error_feedback: which feedback settings each compressed codec runs with
FEEDBACK_VARIANTS = {"off": (False,), "on": (True,), "both": (False, True)}

# what ``error_feedback=`` takes everywhere else (TPSimulator, RunConfig, EvalConfig): off, on
# (every error, two-shot's owners' second-stage errors too), or each rank's own first-stage
# errors only (two-shot's output of a row then does not depend on its batch; for gather the
# same as True): lowbit_tp.collectives.feedback.FeedbackChain.owner_errors
FEEDBACK_MODES = (False, True, "first-stage")


def feedback_mode(value) -> tuple[bool, bool]:
    """``(on, owner_errors)`` for an ``error_feedback=`` value of :data:`FEEDBACK_MODES`;
    a one-line :class:`UserError` (a ``ValueError``) for anything else."""
    if value is False or value is True:
        return value, True
    if value == "first-stage":
        return True, False
    raise UserError(f"error_feedback must be one of {', '.join(map(repr, FEEDBACK_MODES))}, got {value!r}")


@dataclass(frozen=True)
class DemoConfig:
    """``lowbit-tp demo``: calibrate (``cal_samples`` windows, cached), measure quality on
    ``eval_samples`` held-out windows, then generate ``max_new_tokens`` per prompt on ``tp``
    real ranks, for each codec."""

    model: str = "smollm2-135m"
    tp: int = 3
    codecs: tuple[str, ...] = ("bf16", "int4-outlier", "default")
    prompts: tuple[str, ...] = ("To be, or not to be, that is the question:", "The capital of France is")
    max_new_tokens: int = 24
    cal_samples: int = 32
    eval_samples: int = 8
