"""A model's shape from its header alone, in milliseconds: no weights, no tokenizer.

``transformers.AutoConfig`` on a GGUF file parses every metadata field, the tokenizer's
vocabulary included (4 s for SmolLM2, 20 s for Gemma 3's 262k tokens). The checks that
run before any model load (TP degree, ``--k``, ``--seq-len``) only need a few integers:
:func:`quick_config` reads ``config.json`` of a checkpoint directory, or walks a GGUF
file's key/value header and skips the arrays without decoding them.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from lowbit_tp.models.registry import resolve_source

__all__ = ["quick_config", "read_gguf_metadata"]

# GGUF value types -> struct format of one element (strings and arrays handled apart).
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Reader:
    def __init__(self, data):
        self.data, self.pos = data, 0

    def take(self, fmt: str):
        out = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return out[0]

    def string(self, *, keep: bool = True) -> str | None:
        n = self.take("Q")
        start, self.pos = self.pos, self.pos + n
        if self.pos > len(self.data):
            raise ValueError("GGUF header ends inside a string")
        return self.data[start:self.pos].decode("utf-8", "replace") if keep else None

    def value(self, vtype: int, *, keep: bool) -> Any:
        if vtype in _SCALAR:
            return self.take(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string(keep=keep)
        if vtype == _ARRAY:
            etype, count = self.take("I"), self.take("Q")
            if etype in _SCALAR:  # fixed size: skip in one step
                self.pos += count * struct.calcsize("<" + _SCALAR[etype])
                return None
            for _ in range(count):
                self.value(etype, keep=False)
            return None
        raise ValueError(f"unknown GGUF value type {vtype}")


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """The scalar and string key/values of a GGUF file's header (arrays are skipped: ``None``)."""
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        r = _Reader(mm)  # mmap slices are copies: no buffer export outlives the file
        try:
            if r.data[:4] != b"GGUF":
                raise ValueError("not a GGUF file (bad magic)")
            r.pos = 4
            version = r.take("I")
            if version not in (2, 3):
                raise ValueError(f"GGUF version {version} is not supported")
            r.take("Q")  # tensor count
            n_kv = r.take("Q")
            out = {}
            for _ in range(n_kv):
                key = r.string()
                out[key] = r.value(r.take("I"), keep=True)
            return out
        except struct.error as exc:
            raise ValueError(f"truncated GGUF header: {exc}") from None


def _from_gguf(path: Path) -> SimpleNamespace:
    meta = read_gguf_metadata(path)
    arch = meta.get("general.architecture")
    if not arch:
        raise ValueError(f"{path}: GGUF header has no general.architecture")

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    heads = get("attention.head_count")
    hidden = get("embedding_length")
    if heads is None or hidden is None or get("feed_forward_length") is None:
        raise ValueError(f"{path}: GGUF header lacks the {arch} attention/embedding/feed-forward sizes")
    return SimpleNamespace(
        model_type={"gemma3": "gemma3_text"}.get(arch, arch),
        hidden_size=int(hidden),
        num_attention_heads=int(heads),
        num_key_value_heads=int(get("attention.head_count_kv", heads)),
        head_dim=get("attention.key_length"),
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count", 0)),
        max_position_embeddings=get("context_length"),
        _name_or_path=str(path),
    )


def _from_config_json(directory: Path) -> SimpleNamespace:
    cfg = json.loads((directory / "config.json").read_text())
    cfg = cfg.get("text_config") or cfg  # multimodal wrappers keep the decoder's fields here
    heads = cfg["num_attention_heads"]
    return SimpleNamespace(
        model_type=str(cfg.get("model_type", "")),
        hidden_size=int(cfg["hidden_size"]),
        num_attention_heads=int(heads),
        num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=cfg.get("head_dim"),
        intermediate_size=int(cfg["intermediate_size"]),
        num_hidden_layers=int(cfg.get("num_hidden_layers", 0)),
        max_position_embeddings=cfg.get("max_position_embeddings"),
        _name_or_path=str(directory),
    )


def quick_config(name_or_path: str) -> SimpleNamespace:
    """The sizes of ``name_or_path`` (registry name, checkpoint directory or ``.gguf``) without
    loading it: ``model_type``, ``hidden_size``, ``num_attention_heads``,
    ``num_key_value_heads``, ``head_dim`` (or None), ``intermediate_size``,
    ``num_hidden_layers``, ``max_position_embeddings`` (or None). Accepted by
    :func:`~lowbit_tp.models.valid_tp_degrees` and :func:`~lowbit_tp.models.check_tp`.

    Raises ``ValueError`` for an unknown model or an unreadable header.
    """
    source = resolve_source(name_or_path)
    try:
        if source.gguf_file:
            return _from_gguf(source.path)
        return _from_config_json(source.directory)
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read the configuration of model {name_or_path!r}: {exc}") from None
