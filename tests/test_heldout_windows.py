"""The claims docs/results.md makes about which held-out windows the test tables read.

- A larger ``--samples`` of one seed is a superset of a smaller one (so seed 1 at 64 samples
  would still read the 16 windows the default codec was chosen on).
- The reporting seed (10, the scripts' default) shares no window with seed 1's first 64,
  for either model's tokenizer (``-m model``: loads the two tokenizers).
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

from lowbit_tp.data import Document, chunk_tokens, load_split

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "heldout_windows.py"


class WordTokenizer:
    bos_token_id = None
    name_or_path = "word"

    def encode(self, text, add_special_tokens=True):
        return [len(w) for w in text.split()]


def _starts(docs, samples, seed):
    chunks = chunk_tokens(WordTokenizer(), docs, num_samples=samples, seq_len=8, seed=seed)
    return [(p["doc"], p["token_start"]) for p in chunks.provenance]


@pytest.mark.parametrize("windows", [40, 2000])  # both draws by random.sample's pool method, then its set method
def test_more_samples_of_one_seed_keep_the_fewer_as_their_first(windows):
    docs = [Document.from_text(name=f"d{i}", path=f"/x/d{i}", text=" ".join(["w"] * (8 * windows // 4)))
            for i in range(4)]
    few, many = _starts(docs, 16, 1), _starts(docs, 64 if windows > 64 else 40, 1)
    assert many[:16] == few


def test_a_different_seed_draws_different_windows():
    docs = [Document.from_text(name=f"d{i}", path=f"/x/d{i}", text=" ".join(["w"] * 4000)) for i in range(4)]
    assert _starts(docs, 16, 10) != _starts(docs, 16, 1)


def _run_script(*args) -> int:
    argv = sys.argv
    sys.argv = [str(SCRIPT), *args]
    try:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        sys.argv = argv
    return 0


@pytest.mark.model
def test_reporting_seed_avoids_the_tuned_on_windows(capsys):
    assert _run_script("--samples", "64", "--seed", "10", "--against-seed", "1", "--against-samples", "64") == 0
    out = capsys.readouterr().out
    assert out.count("shared with --samples 64 --seed 1: 0") == 2


@pytest.mark.model
def test_the_check_fails_on_the_tuned_on_windows(capsys):
    # seed 1 at 64 samples contains its own 16: the script must say so and exit 1
    assert _run_script("--model", "smollm2-135m", "--samples", "16", "--seed", "1",
                       "--against-seed", "1", "--against-samples", "64") == 1
    assert "shared with --samples 64 --seed 1: 16" in capsys.readouterr().out


def test_the_held_out_plays_have_room_for_64_windows():
    # 10 held-out plays: the draw needs no more than their windows (a cheap guard on the split)
    assert len(load_split(None).evaluation) == 10
