"""Checks that run in the parent, before any model load or rank spawn, in well under 5 s.

Each check raises :class:`~lowbit_tp.errors.UserError` with one clear sentence. They read
only what is cheap: a model's header (:func:`~lowbit_tp.models.quick_config.quick_config`,
never loading the weights), the calibration file (a few MB), the codec registry, and the
weight files' sha256 when a calibration records the one it was made for. The runtime,
evaluation and calibration entry points call them first, so a bad TP degree or codec
name fails in a second instead of after every rank has loaded the model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

from lowbit_tp.calibration import Calibration, CalibrationError
from lowbit_tp.codecs import CODEC_ALIASES, codec_spec, list_codecs, make_codec
from lowbit_tp.codecs.mixed import plan_feedback_warnings
from lowbit_tp.configs import check_min
from lowbit_tp.data import DEFAULT_TEXT_GLOB, load_split
from lowbit_tp.errors import UserError
from lowbit_tp.fileio import check_output_path
from lowbit_tp.models import TPGeometry, check_tp
from lowbit_tp.models.quick_config import quick_config
from lowbit_tp.models.registry import resolve_source, sha256_of_files

__all__ = [
    "check_calibration_file",
    "check_codecs",
    "check_engine_tp",
    "check_min",
    "check_model_tp",
    "check_seq_len",
    "check_text",
]


def check_model_tp(model: str, tp: int) -> Any:
    """The model's header config; raises when the model is unknown or ``tp`` does not fit it,
    listing the TP degrees that do."""
    check_min(tp, "the TP degree (--tp)")
    try:
        config = quick_config(model)
    except (ValueError, OSError, ModuleNotFoundError) as exc:
        raise UserError(str(exc)) from None
    try:
        check_tp(config, tp, name=model)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return config


def check_engine_tp(config: Any, tp: int, engine: str, *, name: str = "the model") -> None:
    """transformers' TP splits the KV heads and cannot replicate them (the native engine and
    vLLM can): ``--engine transformers`` needs ``tp`` to divide them (Gemma 3 270M's single
    KV head allows TP 1 only there). One line otherwise."""
    if engine != "transformers":
        return
    geo = TPGeometry.from_config(config, name=name)
    if geo.num_kv_heads % tp:
        raise UserError(f"--engine transformers splits the KV heads and cannot replicate them: TP {tp} does not "
                        f"divide the {geo.num_kv_heads} KV head(s) of {geo.name}; use --engine native (or vllm)")


def check_calibration_file(path: str | Path):
    """Load a calibration artifact (small) with a clear error for a directory or a bad file."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f"calibration path {p} is a directory; give the .safetensors file "
                        f"written by `lowbit-tp calibrate --out`")
    if not p.exists():
        raise UserError(f"calibration file {p} does not exist")
    try:
        return Calibration.load(p)
    except CalibrationError as exc:
        raise UserError(str(exc)) from None


def check_codecs(names: Iterable[str], *, calibration: str | Path | None = None, tp: int | None = None,
                 hidden_size: int | None = None, num_layers: int | None = None, build: bool = True,
                 model: str | None = None):
    """Every codec name is registered and (``build``) can be built with this calibration; the
    calibration fits ``tp`` and ``hidden_size`` and covers ``num_layers`` blocks, and, with
    ``model`` (a registry name, checkpoint directory or ``.gguf``), was made for that model's
    weights (their sha256, well under a second for the registry's models). Returns the loaded
    calibration (or None)."""
    names = list(names)
    if not names:
        raise UserError("give at least one codec")
    known = list_codecs()
    for n in names:
        try:
            codec_spec(n)
        except KeyError:
            raise UserError(f"unknown codec {n!r}; known codecs: {', '.join([*CODEC_ALIASES, *known])} "
                            f"(rot-*, alloc and default also as NAME+fisher)") from None
    if not build:
        return None
    cal = None if calibration is None else check_calibration_file(calibration)
    try:
        if cal is not None:
            cal.check_compatible(tp=tp, hidden_size=hidden_size, num_layers=num_layers,
                                 weights_sha256=_weights_sha256(model, cal), model_name=model)
        for name in names:
            make_codec(name, calibration=cal)
    except (CalibrationError, KeyError, ValueError) as exc:
        raise UserError(str(exc).strip("'\"")) from None
    return cal


def _weights_sha256(model: str | None, cal: Calibration) -> str | None:
    """The sha256 of ``model``'s weight files when ``cal`` records the one it was made for
    (else None: nothing to compare, so the files are not read). A calibration from another
    model of the same shape passes every size check and used to be caught only after each
    rank had loaded the model."""
    if model is None or not (cal.meta.get("model") or {}).get("weights_sha256"):
        return None
    try:
        return sha256_of_files(resolve_source(model).weight_files())
    except (ValueError, OSError):  # an unknown model is check_model_tp's error, not this one's
        return None


def check_seq_len(seq_len: int, config: Any, *, flag: str = "--seq-len") -> list[str]:
    """At least 2 tokens (a window of 1 predicts nothing). Returns a warning (a list of
    0 or 1 sentences) when ``seq_len`` exceeds the model's context."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise UserError(f"{flag} must be at least 2 (a window of 1 token has no next token to predict), "
                        f"got {seq_len!r}")
    context = getattr(config, "max_position_embeddings", None)
    if context and seq_len > int(context):
        return [f"{flag} {seq_len} exceeds the model's context of {context} tokens; "
                f"results beyond it are not meaningful"]
    return []


def check_text(text: str | Path | None, glob: str = DEFAULT_TEXT_GLOB) -> None:
    """A user text path must exist and hold decodable text (the default corpus is not read here).
    A ``--text-glob`` other than the default needs a ``--text`` directory: on the default
    corpus or a single file it selected nothing and was ignored."""
    if glob != DEFAULT_TEXT_GLOB and (text is None or Path(text).expanduser().is_file()):
        raise UserError(f"--text-glob {glob!r} selects files of a --text directory; "
                        + ("without --text the default corpus (Shakespeare) is read" if text is None
                           else f"{text} is a file"))
    if text is None:
        return

    try:
        load_split(text, glob=glob)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from None


def _warn_with(warn: Callable[[str], None] | None) -> Callable[[str], None]:
    if warn is not None:
        return warn
    import warnings

    return lambda text: warnings.warn(text, UserWarning, stacklevel=3)


def preflight_eval(cfg: Any, *, out: str | Path | None = None, warn: Callable[[str], None] | None = None) -> None:
    """``lowbit-tp eval``'s checks (an ``EvalConfig``): model and TP degree, window length,
    codecs with the calibration, the user's text, the output path. Warnings go to ``warn``
    as soon as found (default: ``warnings.warn``)."""
    config = check_model_tp(cfg.model, cfg.tp)
    if cfg.tp == 1:  # the rows read as lossless codecs (+0%, KL 0), which they are not
        _warn_with(warn)("--tp 1 has no all-reduce, so no codec runs: every codec's row equals the unmodified "
                         "model (bits/value nan); give the TP degree whose communication you mean to measure")
    for text in check_seq_len(cfg.seq_len, config):
        _warn_with(warn)(text)
    check_min(cfg.samples, "--samples")
    cal = check_codecs(cfg.codecs, calibration=cfg.calibration, tp=cfg.tp, hidden_size=config.hidden_size,
                       num_layers=getattr(config, "num_hidden_layers", None), model=cfg.model)
    for text in plan_feedback_warnings(cal, cfg.codecs, getattr(cfg, "error_feedback", False)):
        _warn_with(warn)(text)
    check_text(cfg.text, getattr(cfg, "text_glob", "*"))
    if out:
        check_output_path(out)


def preflight_calibrate(cfg: Any, *, out: str | Path, warn: Callable[[str], None] | None = None) -> None:
    """``lowbit-tp calibrate``'s checks (a ``CalibrationConfig``): model and TP degree, window
    length, ``k`` at most the hidden size, the allocation codecs, the text, the output path.
    Warnings go to ``warn`` (default: ``warnings.warn``)."""
    config = check_model_tp(cfg.model, cfg.tp)
    for text in check_seq_len(cfg.seq_len, config):
        _warn_with(warn)(text)
    if cfg.k is not None and not 1 <= cfg.k <= config.hidden_size:
        raise UserError(f"--k {cfg.k}: the outlier channel count must be between 1 and the hidden size "
                        f"{config.hidden_size}")
    if cfg.allocate:
        check_codecs([cfg.alloc_low, cfg.alloc_high, *getattr(cfg, "alloc_codecs", ())], build=False)
        check_budget(cfg, config.hidden_size)
    # the Fisher pass reads the first windows of this calibration (more were silently cut to --samples)
    if cfg.fisher_draws and cfg.fisher_windows > cfg.samples:
        raise UserError(f"--fisher-windows {cfg.fisher_windows}: this calibration reads {cfg.samples} windows "
                        f"(--samples)")
    check_text(cfg.text, getattr(cfg, "text_glob", "*"))
    check_output_path(out, what="calibration file")


def check_budget(cfg: Any, hidden: int) -> None:
    """``--allocate BITS`` below what the cheapest codec the allocation may pick sends (``--alloc-low``,
    or the cheapest of ``--alloc-codecs``): the calibration and the sensitivity probe ran for
    minutes, then no allocation was stored. Bits/value depend only on the codec, the hidden size
    and ``k``, so they are measured here on a synthetic calibration of that shape; a codec that
    needs more than statistics to build is left to the run (which says it after the probe).
    Only a budget or codec the user chose is refused: with every allocation flag at its default
    (a small model, whose default budget is out of reach) the statistics are still stored, with
    a warning, as before."""
    from lowbit_tp.calibration.synthetic import synthetic_calibration
    from lowbit_tp.configs import CalibrationConfig

    if all(getattr(cfg, f, None) == getattr(CalibrationConfig, f) for f in ("allocate", "alloc_low", "alloc_codecs")):
        return
    names = list(getattr(cfg, "alloc_codecs", ()) or [cfg.alloc_low])
    syn = synthetic_calibration(["probe"], world=cfg.tp, hidden=hidden, tokens=4, batches=1)
    cal = Calibration(meta={**syn.meta, "k": syn.meta["k"] if cfg.k is None else cfg.k}, stats=syn.stats)
    try:
        bits = {n: make_codec(n, calibration=cal).bits_per_value((256, hidden)) for n in names}
    except (CalibrationError, KeyError, ValueError):
        return
    cheapest = min(bits, key=bits.get)
    if cfg.allocate < bits[cheapest] - 1e-9:
        which = "--alloc-low" if len(names) == 1 and not getattr(cfg, "alloc_codecs", ()) else "the cheapest of --alloc-codecs"
        raise UserError(f"--allocate {cfg.allocate:g}: {which}, {cheapest}, sends {bits[cheapest]:.3f} bits/value at "
                        f"hidden size {hidden}, so no allocation could meet the budget; raise it, or --allocate 0 "
                        f"to skip the allocation")


def preflight_fisher_from(cfg: Any, *, source: str | Path, out: str | Path) -> None:
    """``lowbit-tp calibrate --from CAL --fisher-weights N``'s checks: draws given, model and
    TP degree, CAL readable and made for that TP degree, ``out`` writable and not CAL."""
    if not cfg.fisher_draws:
        raise UserError("--from adds Fisher weights to a calibration: give --fisher-weights DRAWS (e.g. 4)")
    if Path(out).expanduser().resolve() == Path(source).expanduser().resolve():
        raise UserError("--out must differ from --from (the source calibration is not overwritten)")
    config = check_model_tp(cfg.model, cfg.tp)
    cal = check_calibration_file(source)
    try:
        cal.check_compatible(tp=cfg.tp, hidden_size=config.hidden_size,
                             num_layers=getattr(config, "num_hidden_layers", None))
    except CalibrationError as exc:
        raise UserError(str(exc)) from None
    n = int(((cal.meta.get("text") or {}).get("chunks") or {}).get("num_samples") or 0)
    if not 1 <= cfg.fisher_windows <= n:
        raise UserError(f"--fisher-windows {cfg.fisher_windows}: {source} has {n} calibration windows")
    check_output_path(out, what="calibration file")
