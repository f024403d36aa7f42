"""Typed eval rows: the JSON they write is byte-identical to the files written before the type."""
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from lowbit_tp.collectives import CommStats
from lowbit_tp.configs import EvalConfig
from lowbit_tp.evaluation.evaluate import result_row
from lowbit_tp.evaluation.records import CodecEvalRow

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results.json"


def stored_rows() -> list[dict]:
    """Rows of docs/results.json in the current schema (written by the dict code, before CodecEvalRow)."""
    data = json.loads(RESULTS.read_text())
    return [r for entry in data.values() for r in entry["rows"] if "ppl_increase_pct_ci95" in r]


def test_stored_rows_round_trip_byte_for_byte():
    rows = stored_rows()
    assert len(rows) >= 2
    for row in rows:
        assert json.dumps(CodecEvalRow.from_json(row).to_json()) == json.dumps(row)


def test_unknown_or_missing_fields_are_refused():
    row = stored_rows()[0]
    with pytest.raises(ValueError, match="unknown fields \\['extra'\\]"):
        CodecEvalRow.from_json({**row, "extra": 1})
    with pytest.raises(ValueError, match="missing fields \\['kl'\\]"):
        CodecEvalRow.from_json({k: v for k, v in row.items() if k != "kl"})


def test_result_row_fields_and_derived_values():
    comparison = {"tokens": 100, "sequences": 4, "ppl_baseline": 10.0, "ppl": 10.5, "kl": 0.01, "top1": 0.97,
                  "ppl_increase_pct_ci95": [4.0, 6.0], "kl_ci95": [0.009, 0.011], "top1_ci95": [0.96, 0.98]}
    stats = CommStats(calls=1, values=64 * 10, bytes_sent=200, payload_bytes=200, wire_values=640.0, ring_values=640.0)
    info = SimpleNamespace(name="m", hidden_size=64)
    row = result_row(EvalConfig(tp=2, codecs=("int8",)), info, "int8", comparison, stats, [True, False, True],
                     0.75, 1.234, num_layers=4)
    out = row.on("sim").to_json()
    assert list(out)[:5] == ["model", "tp", "codec", "algorithm", "split"] and list(out)[-1] == "runtime"
    assert out["ppl_increase_pct"] == pytest.approx(5.0)
    assert out["lambada_acc"] == pytest.approx(2 / 3)
    assert out["pct_of_baseline_lambada"] == pytest.approx(100 * (2 / 3) / 0.75)
    assert out["bytes_sent_per_rank_per_token"] == pytest.approx(200 * 4 / 10)  # 10 tokens of 64 values
    assert out["seconds"] == 1.23 and "runtime" not in row.to_json()
    assert CodecEvalRow.from_json(out) == row.on("sim")
    assert math.isnan(result_row(EvalConfig(tp=2), info, "int8", comparison, stats, [], 0.0, 0.0,
                                 num_layers=4).lambada_acc)
