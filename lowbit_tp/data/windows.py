"""Token windows: non-overlapping fixed-length samples of documents, and the spans they cover."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Protocol, Sequence

import torch

from lowbit_tp.data.documents import Document
from lowbit_tp.errors import UserError

__all__ = ["TokenChunks", "Tokenizer", "chunk_tokens", "window_spans"]


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer this module uses."""

    bos_token_id: int | None
    name_or_path: str

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass(frozen=True)
class TokenChunks:
    """``input_ids``: ``[num_samples, seq_len]`` int64, BOS first when ``bos_token_id``
    is not None (None: no BOS was prepended). ``provenance``: per sample
    ``{doc, sha256, token_start}``, where ``token_start`` indexes the document's tokens
    (encoded without special tokens)."""

    input_ids: torch.Tensor
    provenance: tuple[dict[str, Any], ...]
    seed: int
    tokenizer_name: str
    bos_token_id: int | None

    def manifest(self) -> dict[str, Any]:
        """JSON-serialisable record of how the chunks were drawn."""
        return {
            "tokenizer": self.tokenizer_name,
            "seed": self.seed,
            "num_samples": int(self.input_ids.shape[0]),
            "seq_len": int(self.input_ids.shape[1]),
            "bos_token_id": self.bos_token_id,
            "samples": [dict(p) for p in self.provenance],
        }



def _tokenizer_name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _bos(tokenizer: Any, add_bos: bool | None) -> int | None:
    """The BOS id to prepend, or None.

    ``add_bos=None`` follows the tokenizer: BOS is prepended iff the tokenizer has one
    *and* puts it in front of plain text itself (``encode(..., add_special_tokens=True)``).
    Gemma does (it degrades badly without ``<bos>``); SmolLM2's GGUF tokenizer names
    ``<|im_start|>`` as BOS but never adds it, and a chat-turn marker before raw prose
    would not match how the model reads plain text.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        if add_bos:
            raise ValueError(
                f"add_bos=True but tokenizer {_tokenizer_name(tokenizer)} has no BOS token"
            )
        return None
    if add_bos is None:
        probe = list(tokenizer.encode("a", add_special_tokens=True))
        add_bos = bool(probe) and probe[0] == bos
    return int(bos) if add_bos else None


def chunk_tokens(
    tokenizer: Tokenizer,
    documents: Sequence[Document],
    *,
    num_samples: int,
    seq_len: int,
    seed: int = 0,
    add_bos: bool | None = None,
    exclude: Mapping[str, Sequence[tuple[int, int]]] | None = None,
) -> TokenChunks:
    """Draw ``num_samples`` non-overlapping windows of ``seq_len`` tokens.

    Each document is encoded once without special tokens and cut into consecutive
    windows of ``L = seq_len - 1`` tokens when a BOS is used (it is then prepended, so
    every sample is ``seq_len`` tokens including BOS), else ``L = seq_len``. ``add_bos``:
    None follows the tokenizer (see ``_bos``: BOS iff it adds one to plain text itself),
    True / False force it.
    ``random.Random(seed).sample`` picks among all (document, window) pairs: same
    inputs and seed, same chunks. Raises ``ValueError`` if the text has fewer windows.

    ``exclude`` maps a document's sha256 to token spans ``(start, end)`` (end exclusive,
    indices into its tokens as above) that no window may overlap: the dev split uses it
    to stay clear of the calibration windows (:func:`window_spans`).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    bos = _bos(tokenizer, add_bos)
    width = seq_len - (1 if bos is not None else 0)
    if width < 1:
        raise ValueError(f"seq_len {seq_len} leaves no room for text after BOS")
    if not documents:
        raise ValueError("no documents to draw token windows from")

    token_lists = [_encode(tokenizer, doc.text) for doc in documents]
    exclude = exclude or {}
    slots = [
        (d, start)
        for d, ids in enumerate(token_lists)
        for start in range(0, len(ids) - width + 1, width)
        if not _overlaps(start, start + width, exclude.get(documents[d].sha256, ()))
    ]
    if num_samples > len(slots):
        total = sum(len(ids) for ids in token_lists)
        raise UserError(  # the user's flags against the user's text: one line from the CLI
            f"text too short: {num_samples} samples of {seq_len} tokens requested, but "
            f"{len(documents)} documents ({total} tokens) give only {len(slots)} "
            f"non-overlapping windows" + (" outside the excluded spans" if exclude else "")
            + "; lower --samples or --seq-len, or give more text (--text)"
        )
    chosen = random.Random(seed).sample(slots, num_samples)

    prefix = [bos] if bos is not None else []
    rows = [prefix + token_lists[d][start : start + width] for d, start in chosen]
    provenance = tuple(
        {"doc": documents[d].name, "sha256": documents[d].sha256, "token_start": start}
        for d, start in chosen
    )
    return TokenChunks(
        input_ids=torch.tensor(rows, dtype=torch.long),
        provenance=provenance,
        seed=seed,
        tokenizer_name=_tokenizer_name(tokenizer),
        bos_token_id=bos,
    )


def _overlaps(start: int, end: int, spans: Iterable[tuple[int, int]]) -> bool:
    return any(a < end and start < b for a, b in spans)


def window_spans(manifest: Mapping[str, Any]) -> dict[str, list[tuple[int, int]]]:
    """Token spans covered by the windows of a :meth:`TokenChunks.manifest`, by document
    sha256: ``(token_start, token_start + text tokens)``, BOS not counted."""
    width = int(manifest["seq_len"]) - (1 if manifest.get("bos_token_id") is not None else 0)
    out: dict[str, list[tuple[int, int]]] = {}
    for s in manifest["samples"]:
        out.setdefault(s["sha256"], []).append((int(s["token_start"]), int(s["token_start"]) + width))
    return out
