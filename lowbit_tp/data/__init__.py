"""Calibration / evaluation text: documents, disjoint splits, token windows, LAMBADA items.

``documents`` reads and cleans text (Shakespeare by default), ``split`` divides it into
calibration and evaluation (test) sides, ``windows`` draws token windows, ``lastword``
draws last-word items.
"""

from lowbit_tp.data.documents import (
    DEFAULT_TEXT_GLOB,
    SHAKESPEARE_VERSION,
    Document,
    clean_text,
    load_documents,
    shakespeare_documents,
    shakespeare_texts_dir,
    strip_gutenberg,
)
from lowbit_tp.data.lastword import LambadaItem, lambada_passages, token_char_spans
from lowbit_tp.data.split import (
    DEFAULT_EVAL_FRACTION,
    TextSplit,
    load_split,
    make_split,
    split_documents,
    split_text,
)
from lowbit_tp.data.windows import TokenChunks, chunk_tokens, window_spans

__all__ = [
    "DEFAULT_EVAL_FRACTION",
    "DEFAULT_TEXT_GLOB",
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
    "token_char_spans",
    "window_spans",
]
