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
from lowbit_tp.results import json_text

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results.json"


def stored_rows() -> list[dict]:
    """Rows of docs/results.json in the current schema (written by the dict code, before CodecEvalRow)."""
    data = json.loads(RESULTS.read_text())
    return [r for entry in data.values() for r in entry["rows"] if "ppl_increase_pct_ci95" in r]


def test_stored_rows_round_trip_byte_for_byte():
    rows = stored_rows()
    assert len(rows) >= 2
    for row in rows:
        assert json_text(CodecEvalRow.from_json(row).to_json(), indent=None) == json.dumps(row)


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
    assert "error_feedback" not in out  # off: the JSON stays as before the option existed
    ef = result_row(EvalConfig(tp=2, codecs=("int8",), error_feedback=True), info, "int8", comparison, stats,
                    [True], 0.75, 1.0, num_layers=4).to_json()
    assert ef["error_feedback"] is True and CodecEvalRow.from_json(ef).error_feedback is True


# ------------------------------------------------------------------ the other commands' records
DOCS = RESULTS.parent


def test_eval_results_round_trip_byte_for_byte():
    from lowbit_tp.evaluation.records import EvalResult

    data = json.loads(RESULTS.read_text())
    entries = [{k: v for k, v in e.items() if k != "command"} for e in data.values()  # "command": added by scripts
               if all("ppl_increase_pct_ci95" in r for r in e["rows"])]
    assert entries
    for e in entries:
        assert json_text(EvalResult.from_json(e).to_json(), indent=None) == json.dumps(e)
    with pytest.raises(ValueError, match="unknown fields \\['command'\\]"):
        EvalResult.from_json({**entries[0], "command": "x"})


@pytest.mark.parametrize("name", ["comm.json", "comm_loopback_1m.json"])
def test_bench_comm_rows_round_trip_byte_for_byte(name):
    from lowbit_tp.bench.comm import CommBenchRow

    rows = json.loads((DOCS / "bench" / name).read_text())["rows"]
    assert any(r["codec"] == "bf16" and r["algorithm"] == "exact" for r in rows)  # the baseline row, no chunk_bytes
    for row in rows:
        assert json.dumps(CommBenchRow.from_json(row).to_json()) == json.dumps(row)
    with pytest.raises(ValueError, match="unknown fields \\['network'\\]"):  # scripts/bench_chunks.py's rows
        CommBenchRow.from_json({**rows[0], "network": "1gbit"})


@pytest.mark.parametrize("name", ["e2e.json", "e2e_fastpath.json", "e2e_fastpath_run2.json"])
def test_bench_e2e_rows_round_trip_byte_for_byte(name):
    from lowbit_tp.bench.e2e.report import E2ERow

    rows = json.loads((DOCS / "bench" / name).read_text())["rows"]
    for row in rows:
        assert json.dumps(E2ERow.from_json(row).to_json()) == json.dumps(row)


def test_vllm_run_result_fields_in_the_order_the_engine_wrote_them():
    from lowbit_tp.integrations.vllm.records import VllmPromptResult, VllmRunResult

    stats = CommStats(calls=2, values=128, bytes_sent=80, payload_bytes=80, wire_values=128.0, ring_values=128.0,
                      by_algorithm={"gather": 2})
    reports = [{"rank": 1, "codec": {"name": "int4-g32"}, "comm": CommStats().as_dict()},
               {"rank": 0, "codec": {"name": "int4-g32"}, "comm": stats.as_dict()}]
    row = VllmPromptResult(prompt="p", prompt_ids=[1, 2], token_ids=[3, 4, 5], text="abc", finish_reason="length",
                           wall_s=0.5)
    res = VllmRunResult.from_reports(reports, codec_name="int4-g32", config={"tp": 2}, vllm={}, plugin=None,
                                     model={"name": "m"}, load_s=1.0, results=(row,))
    out = res.to_json()
    assert list(out) == ["engine", "config", "vllm", "plugin", "model", "codec", "load_s", "results", "comm_total",
                         "per_rank"]
    assert out["engine"] == "vllm" and out["comm_total"] == stats.as_dict()  # rank 0's report, not rank 1's
    assert out["results"][0] == {"prompt": "p", "prompt_ids": [1, 2], "token_ids": [3, 4, 5], "text": "abc",
                                 "finish_reason": "length", "new_tokens": 3, "wall_s": 0.5, "tokens_per_s": 6.0}
    assert json.dumps(VllmRunResult.from_json(json.loads(json.dumps(out))).to_json()) == json.dumps(out)
    plain = VllmRunResult.from_reports([], codec_name="none", config={}, vllm={}, plugin=None, model={}, load_s=0.0,
                                       results=())
    assert plain.codec == {"name": "none"} and plain.comm_total == CommStats()
