"""LAMBADA-style last-word items: a passage of text ending at a word, and the word."""

from __future__ import annotations

import random
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from lowbit_tp.data.documents import Document
from lowbit_tp.data.windows import Tokenizer, _bos, _encode

__all__ = ["LambadaItem", "lambada_passages", "token_char_spans"]


@dataclass(frozen=True)
class LambadaItem:
    """Predict ``target_word`` (tokens ``target_ids``, with its leading space) from
    ``context_ids`` (BOS first when one was used, see :func:`chunk_tokens`). ``char_start`` /
    ``char_end``: the span of the document the item covers (context start to word end)."""

    doc: str
    sha256: str
    char_start: int
    char_end: int
    context_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    target_word: str

    def manifest(self) -> dict[str, Any]:
        return {
            "doc": self.doc,
            "sha256": self.sha256,
            "char_start": self.char_start,
            "char_end": self.char_end,
            "target_word": self.target_word,
        }



# A target word: >= 3 letters after a single space, ending a sentence (. ! ?) or a line
# (optionally followed by , ; :). Speaker names ("HAMLET.") start their line and stage
# directions start with "[", so neither matches; all-caps words and words inside a
# bracketed stage direction are filtered out below.
_TARGET_RE = re.compile(r"(?<= )([A-Za-z]{3,})(?=[.!?]|[,;:]?[ \t]*(?:\n|$))")
_CHARS_PER_TOKEN_GUESS = 6


@dataclass(frozen=True)
class _Candidate:
    doc_index: int
    space: int  # index of the space before the word
    word_end: int
    word: str = field(compare=False)


def _candidates(documents: Sequence[Document]) -> list[_Candidate]:
    found = []
    for d, doc in enumerate(documents):
        for m in _TARGET_RE.finditer(doc.text):
            word = m.group(1)
            line = doc.text[doc.text.rfind("\n", 0, m.start()) + 1 : m.start()]
            # Skip all-caps words and words inside an open stage direction "[...".
            if word.isupper() or line.rfind("[") > line.rfind("]"):
                continue
            found.append(_Candidate(d, m.start(1) - 1, m.end(1), word))
    return found


def _context_ids(
    tokenizer: Tokenizer, text: str, end: int, context_tokens: int
) -> tuple[list[int], int] | None:
    """The last ``context_tokens`` tokens of ``text[:end]`` and the character where the
    encoded span began, or None when the text before ``end`` is too short."""
    span = context_tokens * _CHARS_PER_TOKEN_GUESS
    while True:
        start = max(0, end - span)
        if start > 0:
            # Begin at a word boundary so the first token is not a fragment.
            boundary = text.find(" ", start, end)
            start = boundary + 1 if boundary >= 0 else start
        ids = _encode(tokenizer, text[start:end])
        if len(ids) >= context_tokens:
            return ids[-context_tokens:], start
        if start == 0:
            return None
        span *= 2


def lambada_passages(
    tokenizer: Tokenizer,
    documents: Sequence[Document],
    *,
    num_passages: int,
    context_tokens: int,
    seed: int = 0,
    add_bos: bool | None = None,
    exclude_chars: Mapping[str, Sequence[tuple[int, int]]] | None = None,
    warn: Callable[[str], None] | None = None,
) -> tuple[LambadaItem, ...]:
    """LAMBADA-style items: a passage of evaluation text ending at a word, and the word.

    Candidates are words of >= 3 letters (not all caps) preceded by a space and ending a
    sentence or a line. ``random.Random(seed)`` shuffles all candidates; they are taken
    in that order, skipping any whose span overlaps an accepted item of the same
    document or a span of ``exclude_chars`` (document sha256 -> character spans), until
    ``num_passages`` are found. When the text runs out first, the items found are
    returned with a warning (``warn(message)``, else :func:`warnings.warn`); none at
    all is a ``ValueError``.
    The context is the ``context_tokens`` text tokens before the space preceding the
    word, with BOS prepended as in :func:`chunk_tokens` (``add_bos``); the target is
    the encoding of ``" " + word`` (possibly several tokens).
    """
    if num_passages < 1 or context_tokens < 1:
        raise ValueError(
            f"num_passages and context_tokens must be >= 1, got {num_passages}, {context_tokens}"
        )
    candidates = _candidates(documents)
    random.Random(seed).shuffle(candidates)
    bos = _bos(tokenizer, add_bos)
    prefix = (bos,) if bos is not None else ()
    accepted: list[LambadaItem] = []
    spans: dict[int, list[tuple[int, int]]] = {}
    for cand in candidates:
        if len(accepted) == num_passages:
            break
        doc = documents[cand.doc_index]
        taken = spans.setdefault(cand.doc_index, list((exclude_chars or {}).get(doc.sha256, ())))
        # Cheap pre-check on the word itself before tokenizing the context.
        if any(a < cand.word_end and cand.space < b for a, b in taken):
            continue
        context = _context_ids(tokenizer, doc.text, cand.space, context_tokens)
        if context is None:
            continue
        ids, start = context
        if any(a < cand.word_end and start < b for a, b in taken):
            continue
        taken.append((start, cand.word_end))
        accepted.append(
            LambadaItem(
                doc=doc.name,
                sha256=doc.sha256,
                char_start=start,
                char_end=cand.word_end,
                context_ids=prefix + tuple(ids),
                target_ids=tuple(_encode(tokenizer, " " + cand.word)),
                target_word=cand.word,
            )
        )
    if not accepted:
        raise ValueError(
            f"text too short: no last-word passage with {context_tokens} context tokens "
            f"({num_passages} requested)"
        )
    if len(accepted) < num_passages:
        msg = (f"text too short: found only {len(accepted)} non-overlapping last-word passages with "
               f"{context_tokens} context tokens, {num_passages} requested; using {len(accepted)}")
        if warn is None:
            warnings.warn(msg, stacklevel=2)
        else:
            warn(msg)
    return tuple(accepted)


def token_char_spans(
    tokenizer: Any,
    documents: Sequence[Document],
    token_spans: Mapping[str, Sequence[tuple[int, int]]],
    *,
    margin: int = 64,
) -> dict[str, list[tuple[int, int]]]:
    """Character spans of token spans (document sha256 -> ``(start, end)`` token indices
    of the document encoded without special tokens), widened by ``margin`` characters
    each side. Offsets are the lengths of the decoded token prefixes, so a tokenizer
    whose decoding differs slightly from the text is covered by the margin."""
    out: dict[str, list[tuple[int, int]]] = {}
    for doc in documents:
        spans = token_spans.get(doc.sha256)
        if not spans:
            continue
        ids = _encode(tokenizer, doc.text)

        def offset(i: int) -> int:
            return len(tokenizer.decode(ids[:i])) if i > 0 else 0

        out[doc.sha256] = [(max(0, offset(a) - margin), offset(b) + margin) for a, b in spans]
    return out
