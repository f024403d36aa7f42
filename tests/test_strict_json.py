"""Result files are strict JSON (RFC 8259): a NaN or infinity is written as null and read back
as NaN, so ``jq``, JavaScript and ``json.loads(..., parse_constant=...)`` can read every file."""
import json
import math

import pytest

from lowbit_tp.cli.common import write_json
from lowbit_tp.evaluation import EvalConfig, evaluate_codecs
from lowbit_tp.evaluation.records import EvalResult
from lowbit_tp.results import json_text, markdown_table, nan_for_null, strict_json, write_results

from test_calibration_eval import bundle  # noqa: F401  (the tiny model, ByteTokenizer)


def strict_load(text):
    """``json.loads`` that refuses the NaN, Infinity and -Infinity tokens Python writes by default."""
    def refuse(tok):
        raise ValueError(f"non-strict JSON token {tok}")
    return json.loads(text, parse_constant=refuse)


def test_strict_load_refuses_what_json_dumps_writes():
    with pytest.raises(ValueError, match="NaN"):
        strict_load(json.dumps({"a": float("nan")}))


def test_non_finite_floats_become_null_everywhere():
    doc = {"a": math.nan, "b": [1.0, math.inf, (-math.inf, 2)], "c": {"d": {"e": math.nan}}, "f": "NaN", "g": 3}
    assert strict_json(doc) == {"a": None, "b": [1.0, None, [None, 2]], "c": {"d": {"e": None}}, "f": "NaN", "g": 3}
    assert strict_load(json_text(doc)) == {"a": None, "b": [1.0, None, [None, 2]], "c": {"d": {"e": None}},
                                           "f": "NaN", "g": 3}
    # finite documents are written exactly as json.dumps writes them
    fin = {"x": [1.5, 2, {"y": 1e-9}], "z": "s"}
    assert json_text(fin, indent=1) == json.dumps(fin, indent=1)


def test_writers_are_strict(tmp_path):
    write_json(str(tmp_path / "a.json"), {"v": math.nan})
    assert strict_load((tmp_path / "a.json").read_text()) == {"v": None}
    write_results(tmp_path / "b.json", {"v": [math.inf]}, "| t |")
    assert strict_load((tmp_path / "b.json").read_text()) == {"v": [None]}


def test_an_eval_without_last_word_items_round_trips(bundle, tmp_path):  # noqa: F811
    """lambada=0 leaves lambada_acc NaN: written as null, read back as NaN."""
    res = evaluate_codecs(EvalConfig(model="tiny-llama", tp=2, codecs=("int4-g32",), samples=2, seq_len=32,
                                     lambada=0), bundle=bundle, progress=False)
    assert math.isnan(res.rows[0].lambada_acc)
    path = tmp_path / "eval.json"
    write_json(str(path), res.to_json())
    doc = strict_load(path.read_text())
    assert doc["rows"][0]["lambada_acc"] is None and doc["rows"][0]["lambada_acc_baseline"] is None
    back = EvalResult.from_json(doc)
    assert math.isnan(back.rows[0].lambada_acc) and math.isnan(back.rows[0].pct_of_baseline_lambada)
    assert back.rows[0].kl == res.rows[0].kl and back.rows[0].bits_per_value == res.rows[0].bits_per_value
    # the optional list fields stay None (not NaN) when absent or null
    assert back.rows[0].lambada_acc_ci95 is None


def test_every_committed_result_file_is_strict():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "docs"
    files = sorted(root.rglob("*.json"))
    assert files
    for f in files:
        try:
            strict_load(f.read_text())
        except ValueError as e:
            raise AssertionError(f"{f.relative_to(root.parent)}: {e}") from None


def test_markdown_leaves_what_was_not_measured_blank():
    table = markdown_table([{"a": math.nan, "b": None, "c": 0.5}], ["a", "b", "c"])
    assert table.splitlines()[-1] == "|  |  | 0.5 |"


def test_a_table_of_errors_reads_back_with_nan():
    errs = {"L0": {"a": 0.5, "b": math.inf}, "L1": {"a": math.nan, "b": 1.0}}
    back = nan_for_null(strict_load(json_text(errs)))
    assert back["L0"]["a"] == 0.5 and back["L1"]["b"] == 1.0
    assert math.isnan(back["L0"]["b"]) and math.isnan(back["L1"]["a"])
