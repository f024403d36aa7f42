"""The calibration / evaluation split of documents.

Split rule (:func:`split_documents`): documents sorted by name; document ``i`` (0-based)
goes to evaluation iff ``floor((i + 1) * f) > floor(i * f)`` with ``f = eval_fraction``.
For ``f = 0.25`` that is every 4th document (i = 3, 7, 11, ...). Shakespeare: 42 works,
32 calibration / 10 evaluation. A single file is split by contiguous characters instead
(:func:`split_text`).

The evaluation side is the *test* text: nothing is tuned on it. Design choices use the
*dev* windows, drawn from the calibration side away from every calibration window
(:func:`lowbit_tp.data.windows.chunk_tokens` with ``exclude``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Sequence

from lowbit_tp.data.documents import (
    DEFAULT_TEXT_GLOB,
    SHAKESPEARE_VERSION,
    Document,
    load_documents,
    shakespeare_documents,
)

__all__ = ["DEFAULT_EVAL_FRACTION", "TextSplit", "load_split", "make_split", "split_documents", "split_text"]

DEFAULT_EVAL_FRACTION = 0.25


@dataclass(frozen=True)
class TextSplit:
    """Calibration and evaluation documents; no document text is on both sides."""

    calibration: tuple[Document, ...]
    evaluation: tuple[Document, ...]
    description: str



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


def _split_user_path(path: Path, eval_fraction: float, glob: str) -> TextSplit:
    docs = load_documents(path, glob=glob)
    if len(docs) == 1:  # one file: split by contiguous characters
        first, last = split_text(docs[0], eval_fraction=eval_fraction)
        calibration, evaluation = [first], [last]
        how = f"first {1 - eval_fraction:.0%} of the text calibration / last {eval_fraction:.0%} evaluation"
    else:  # a directory: split by file
        calibration, evaluation = split_documents(docs, eval_fraction=eval_fraction)
        how = f"{len(calibration)} files calibration / {len(evaluation)} evaluation"
    return make_split(calibration, evaluation, description=f"{path}: {how}")


def load_split(
    text: str | Path | None = None,
    *,
    role: Literal["split", "calibration", "evaluation"] = "split",
    eval_fraction: float = DEFAULT_EVAL_FRACTION,
    glob: str = DEFAULT_TEXT_GLOB,
) -> TextSplit:
    """The calibration/evaluation split for a run.

    ``text=None``: Shakespeare, split by work (module docstring). Otherwise ``text`` is a
    file or a directory of UTF-8 text files (those matching ``glob``, see
    :func:`load_documents`) and ``role`` says what it is for:

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
        return _split_user_path(path, eval_fraction, glob)
    user = load_documents(path, glob=glob)
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
