"""Paired bootstrap of the difference of two codecs on the same windows
(``paired_difference_ci``, ``scripts/paired_diff.py``) and the per-window sums in eval rows."""
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lowbit_tp.collectives import CommStats
from lowbit_tp.configs import EvalConfig
from lowbit_tp.evaluation.evaluate import result_row
from lowbit_tp.evaluation.metrics import LMComparison, paired_difference_ci
from lowbit_tp.evaluation.records import CodecEvalRow

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "paired_diff.py"


def load_script():
    spec = importlib.util.spec_from_file_location("paired_diff", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def windows(n=24, seed=0):
    """Per-window sums of two codecs A and B: each window has its own difficulty (shared by
    both codecs, large spread), B is better than A by a small, consistent amount."""
    rng = np.random.default_rng(seed)
    tokens = np.full(n, 255.0)
    hard = rng.lognormal(0.0, 0.8, n)  # window difficulty, shared
    nll_base = tokens * (3.5 + rng.normal(0, 0.3, n))
    kl_a = tokens * 0.06 * hard * (1 + 0.03 * rng.normal(size=n))
    kl_b = kl_a * 0.85 * (1 + 0.03 * rng.normal(size=n))
    a = {"tokens": tokens.tolist(), "nll_base": nll_base.tolist(), "nll_codec": (nll_base + kl_a).tolist(),
         "kl": kl_a.tolist(), "top1": (tokens * (0.85 - 0.1 * hard / hard.max())).round().tolist()}
    b = {"tokens": tokens.tolist(), "nll_base": nll_base.tolist(), "nll_codec": (nll_base + kl_b).tolist(),
         "kl": kl_b.tolist(), "top1": (np.asarray(a["top1"]) + rng.integers(0, 4, n)).tolist()}
    return a, b


def naive_paired(a, b, resamples, seed):
    """Independent reference: the same index draws, statistics by plain indexing and loops."""
    n = len(a["tokens"])
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    A = {k: np.asarray(v) for k, v in a.items()}
    B = {k: np.asarray(v) for k, v in b.items()}
    out = {"ppl_increase_pct": [], "kl": [], "top1": [], "ratio": []}
    for r in range(resamples):
        i = idx[r]
        t = A["tokens"][i].sum()
        inc_a = 100 * (np.exp(A["nll_codec"][i].sum() / t) / np.exp(A["nll_base"][i].sum() / t) - 1)
        inc_b = 100 * (np.exp(B["nll_codec"][i].sum() / t) / np.exp(B["nll_base"][i].sum() / t) - 1)
        out["ppl_increase_pct"].append(inc_b - inc_a)
        out["kl"].append((B["kl"][i].sum() - A["kl"][i].sum()) / t)
        out["top1"].append((B["top1"][i].sum() - A["top1"][i].sum()) / t)
        out["ratio"].append(B["kl"][i].sum() / A["kl"][i].sum() - 1)
    return {k: np.percentile(v, [2.5, 97.5]) for k, v in out.items()}


def test_paired_difference_matches_a_naive_loop():
    a, b = windows()
    got = paired_difference_ci(a, b, resamples=400, seed=3)
    want = naive_paired(a, b, 400, 3)
    for key in ("ppl_increase_pct", "kl", "top1"):
        assert got[key]["ci95"] == pytest.approx(list(want[key]), rel=1e-9, abs=1e-12)
    assert got["kl"]["ratio_ci95"] == pytest.approx(list(want["ratio"]), rel=1e-9)
    t = sum(a["tokens"])
    assert got["kl"]["diff"] == pytest.approx((sum(b["kl"]) - sum(a["kl"])) / t)
    assert got["kl"]["ratio"] == pytest.approx(sum(b["kl"]) / sum(a["kl"]) - 1)
    inc = [100 * (np.exp((sum(s["nll_codec"]) - sum(s["nll_base"])) / t) - 1) for s in (a, b)]
    assert got["ppl_increase_pct"]["diff"] == pytest.approx(inc[1] - inc[0])


def test_pairing_sees_a_consistent_gain_that_unpaired_intervals_miss():
    """B is ~15% better on every window, but windows differ far more than that: the two
    unpaired KL intervals overlap, the paired interval of the difference excludes 0."""
    from lowbit_tp.evaluation.metrics import bootstrap_ci, mean_per_token

    a, b = windows()
    ci_a, ci_b = (bootstrap_ci(s, mean_per_token("kl")) for s in (a, b))
    assert ci_b[1] > ci_a[0]  # unpaired: overlapping
    d = paired_difference_ci(a, b)
    assert d["kl"]["ci95"][1] < 0 and d["ppl_increase_pct"]["ci95"][1] < 0
    assert -0.2 < d["kl"]["ratio_ci95"][0] < d["kl"]["ratio"] < d["kl"]["ratio_ci95"][1] < -0.1


def test_identical_and_scaled_codecs_give_exact_intervals():
    a, _ = windows()
    same = paired_difference_ci(a, a, resamples=200)
    for key in ("ppl_increase_pct", "kl", "top1"):
        assert same[key]["diff"] == 0 and same[key]["ci95"] == [0.0, 0.0]
    half = {**a, "kl": [x / 2 for x in a["kl"]]}
    assert paired_difference_ci(a, half, resamples=200)["kl"]["ratio_ci95"] == pytest.approx([-0.5, -0.5])


def test_different_windows_are_refused():
    a, b = windows()
    with pytest.raises(ValueError, match="token counts differ"):
        paired_difference_ci(a, {**b, "tokens": b["tokens"][:-1]})
    with pytest.raises(ValueError, match="baseline NLLs differ"):
        paired_difference_ci(a, {**b, "nll_base": [x + 1 for x in b["nll_base"]]})


def eval_json_from_logits():
    """An eval JSON built through LMComparison and the real row type, two codecs on 5 windows."""
    torch.manual_seed(0)
    ids = torch.randint(0, 13, (5, 10))
    base = torch.randn(5, 10, 13)
    rows = []
    info = SimpleNamespace(name="m", hidden_size=8)
    stats = CommStats(calls=1, values=80, bytes_sent=40, payload_bytes=40, wire_values=80.0, ring_values=80.0)
    for name, noise in (("coarse", 0.6), ("fine", 0.2)):
        comp = LMComparison()
        logits = base + noise * torch.randn(5, 10, 13)
        comp.update(ids[:3], base[:3], logits[:3])
        comp.update(ids[3:], base[3:], logits[3:])
        res = comp.result()
        assert res["per_sequence"]["kl"] == comp.seq_kl and res["per_sequence"]["tokens"] == [9] * 5
        row = result_row(EvalConfig(tp=2, codecs=(name,)), info, name, res, stats, [], 0.0, 0.0, num_layers=1)
        out = row.to_json()
        assert CodecEvalRow.from_json(out) == row and list(out)[-1] == "per_sequence"
        rows.append(out)
    return {"config": {"model": "m", "tp": 2, "split": "dev", "algorithm": "gather"},
            "text": {"chunks": {"samples": [1, 2, 3, 4, 5]}}, "calibration": None, "rows": rows}


def test_script_on_rows_written_by_the_eval(tmp_path, capsys):
    mod = load_script()
    src = tmp_path / "eval.json"
    src.write_text(json.dumps(eval_json_from_logits()))
    out = tmp_path / "diff.json"
    assert mod.main([str(src), "--pairs", "coarse:fine", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| `coarse` | `fine` | 5 |" in printed
    pair = json.loads(out.read_text())["pairs"][0]
    rows = json.loads(src.read_text())["rows"]
    assert pair["tokens"] == 45
    assert pair["kl"]["diff"] == pytest.approx(rows[1]["kl"] - rows[0]["kl"])
    assert pair["ppl_increase_pct"]["diff"] == pytest.approx(rows[1]["ppl_increase_pct"] - rows[0]["ppl_increase_pct"])
    assert pair["kl"]["diff"] < 0  # less noise, less KL


def test_script_refuses_rows_without_sums(tmp_path):
    mod = load_script()
    data = eval_json_from_logits()
    del data["rows"][0]["per_sequence"]
    src = tmp_path / "eval.json"
    src.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="no per_sequence sums"):
        mod.main([str(src), "--pairs", "coarse:fine"])
    with pytest.raises(SystemExit, match="no row for codec 'other'"):
        mod.main([str(src), "--pairs", "fine:other"])
    # a missing file was a FileNotFoundError traceback (a file that is not JSON was already one line)
    with pytest.raises(SystemExit, match=r"^error: \[Errno 2\] No such file or directory: .*missing\.json'$"):
        mod.main([str(tmp_path / "missing.json"), "--pairs", "coarse:fine"])


def test_script_merges_results_of_the_same_windows_only(tmp_path):
    mod = load_script()
    data = eval_json_from_logits()
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    one.write_text(json.dumps({**data, "rows": data["rows"][:1]}))
    two.write_text(json.dumps({**data, "rows": data["rows"][1:]}))
    out = tmp_path / "diff.json"
    assert mod.main([str(one), str(two), "--pairs", "coarse:fine", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["pairs"][0]["kl"]["diff"] < 0
    two.write_text(json.dumps({**data, "text": {"chunks": {"samples": [9]}}, "rows": data["rows"][1:]}))
    with pytest.raises(SystemExit, match="other windows"):
        mod.main([str(one), str(two), "--pairs", "coarse:fine"])


def test_script_pairs_one_codec_across_collective_setups_only_when_asked(tmp_path):
    """Results of other algorithms or error feedback are refused unless --by-setup, which names
    each row by its set-up; the pair's difference is the two rows' own (fine's windows under
    "two-shot + first-stage" against coarse's under "gather")."""
    mod = load_script()
    data = eval_json_from_logits()
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    one.write_text(json.dumps({**data, "rows": data["rows"][:1]}))
    cfg2 = {**data["config"], "algorithm": "two-shot", "error_feedback": "first-stage"}
    two.write_text(json.dumps({**data, "config": cfg2, "rows": data["rows"][1:]}))
    with pytest.raises(SystemExit, match="algorithm or error feedback"):
        mod.main([str(one), str(two), "--pairs", "coarse:fine"])
    out = tmp_path / "diff.json"
    assert mod.main([str(one), str(two), "--by-setup", "--pairs", "coarse@gather:fine@two-shot+ef=first-stage",
                     "--json", str(out)]) == 0
    pair = json.loads(out.read_text())["pairs"][0]
    rows = data["rows"]
    assert pair["kl"]["diff"] == pytest.approx(rows[1]["kl"] - rows[0]["kl"])
    three = tmp_path / "three.json"
    three.write_text(json.dumps({**data, "config": {**data["config"], "error_feedback": True}, "rows": data["rows"][1:]}))
    assert mod.main([str(one), str(three), "--by-setup", "--pairs", "coarse@gather:fine@gather+ef"]) == 0
    three.write_text(json.dumps({**data, "config": {**data["config"], "error_feedback": True},
                                 "text": {"chunks": {"samples": [9]}}, "rows": data["rows"][1:]}))
    with pytest.raises(SystemExit, match="other windows"):  # the windows must still match
        mod.main([str(one), str(three), "--by-setup", "--pairs", "coarse@gather:fine@gather+ef"])
    # the same codec and set-up twice: a pair would have taken the first row silently
    with pytest.raises(SystemExit, match="coarse@gather appear more than once"):
        mod.main([str(one), str(one), "--by-setup", "--pairs", "coarse@gather:coarse@gather"])
    with pytest.raises(SystemExit, match="rows named coarse appear more than once"):
        mod.main([str(one), str(one), "--pairs", "coarse:coarse"])


def test_script_pairs_results_of_other_calibrations_only_when_asked_and_with_the_same_baseline(tmp_path):
    """Two runs of one codec under two calibrations (e.g. two Fisher passes): refused unless
    --by-calibration, which names rows by their file's stem and pairs them when every window's
    baseline NLL agrees; a run on other model weights (other baseline) is refused."""
    mod = load_script()
    data = eval_json_from_logits()
    cal_a = {"fingerprint": "aaaa", "config": {}}
    fw4, fw16 = tmp_path / "fw4.json", tmp_path / "fw16.json"
    coarse, fine = data["rows"]
    fw4.write_text(json.dumps({**data, "calibration": cal_a, "rows": [coarse]}))
    fw16.write_text(json.dumps({**data, "calibration": {**cal_a, "fingerprint": "bbbb"},
                                "rows": [{**fine, "codec": "coarse"}]}))
    with pytest.raises(SystemExit, match="or calibration than result 0"):
        mod.main([str(fw4), str(fw16), "--pairs", "coarse:coarse"])
    out = tmp_path / "diff.json"
    assert mod.main([str(fw4), str(fw16), "--by-calibration", "--pairs", "coarse@fw4:coarse@fw16",
                     "--json", str(out)]) == 0
    pair = json.loads(out.read_text())["pairs"][0]
    assert pair["kl"]["diff"] == pytest.approx(fine["kl"] - coarse["kl"]) and pair["kl"]["diff"] < 0
    merged = mod.merge_results([json.loads(fw4.read_text()), json.loads(fw16.read_text())], labels=["a", "b"])
    assert merged["calibration"] is None and [c["fingerprint"] for c in merged["calibrations"].values()] == [
        "aaaa", "bbbb"]
    shifted = {**fine["per_sequence"], "nll_base": [x + 0.5 for x in fine["per_sequence"]["nll_base"]]}
    fw16.write_text(json.dumps({**data, "calibration": cal_a, "rows": [{**fine, "per_sequence": shifted}]}))
    with pytest.raises(SystemExit, match="baseline NLL differs"):
        mod.main([str(fw4), str(fw16), "--by-calibration", "--pairs", "coarse@fw4:fine@fw16"])
    with pytest.raises(SystemExit, match="labels must name each result once"):
        mod.main([str(fw4), str(fw4), "--by-calibration", "--pairs", "coarse@fw4:coarse@fw4"])
    # two runs saved as runA/eval.json and runB/eval.json: named by folder and stem, not refused
    for run, row in (("runA", coarse), ("runB", {**fine, "codec": "coarse"})):
        (tmp_path / run).mkdir()
        (tmp_path / run / "eval.json").write_text(json.dumps({**data, "calibration": cal_a, "rows": [row]}))
    assert mod.main([str(tmp_path / "runA" / "eval.json"), str(tmp_path / "runB" / "eval.json"), "--by-calibration",
                     "--pairs", "coarse@runA/eval:coarse@runB/eval", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["pairs"][0]["kl"]["diff"] == pytest.approx(fine["kl"] - coarse["kl"])
    bare = {k: v for k, v in fine.items() if k != "per_sequence"}
    fw16.write_text(json.dumps({**data, "calibration": cal_a, "rows": [bare]}))
    with pytest.raises(SystemExit, match="result 1 has no per-window sums"):
        mod.main([str(fw4), str(fw16), "--by-calibration", "--pairs", "coarse@fw4:fine@fw16"])


# ------------------------------------------------------------------ last-word accuracy intervals

def test_lambada_intervals_against_a_naive_loop():
    from lowbit_tp.evaluation.evaluate import lambada_intervals

    rng = np.random.default_rng(1)
    base = rng.random(60) < 0.3
    codec = base.copy()
    codec[rng.choice(60, 6, replace=False)] = False  # the codec loses some of the baseline's hits
    got = lambada_intervals(codec.tolist(), base.tolist())
    idx = np.random.default_rng(0).integers(0, 60, size=(2000, 60))  # bootstrap_ci's documented draws
    acc = [codec[i].mean() for i in idx]
    delta = [codec[i].mean() - base[i].mean() for i in idx]
    assert got["lambada_acc_ci95"] == pytest.approx(list(np.percentile(acc, [2.5, 97.5])), abs=1e-12)
    assert got["lambada_acc_delta_ci95"] == pytest.approx(list(np.percentile(delta, [2.5, 97.5])), abs=1e-12)
    assert got["lambada_acc_delta_ci95"][1] <= 0  # it never gains a hit: the paired interval sees it
    same = lambada_intervals(base.tolist(), base.tolist())
    assert same["lambada_acc_delta_ci95"] == [0.0, 0.0]
    assert lambada_intervals([True], [True]) == {"lambada_acc_ci95": None, "lambada_acc_delta_ci95": None}
    assert lambada_intervals(codec.tolist(), None)["lambada_acc_delta_ci95"] is None
    with pytest.raises(ValueError, match="60 last-word hits, but 59"):
        lambada_intervals(codec.tolist(), base.tolist()[:-1])


def test_result_row_writes_lambada_intervals_only_with_items():
    comparison = {"tokens": 100, "sequences": 4, "ppl_baseline": 10.0, "ppl": 10.5, "kl": 0.01, "top1": 0.97,
                  "ppl_increase_pct_ci95": [4.0, 6.0], "kl_ci95": [0.009, 0.011], "top1_ci95": [0.96, 0.98]}
    stats = CommStats(calls=1, values=640, bytes_sent=200, payload_bytes=200, wire_values=640.0, ring_values=640.0)
    info = SimpleNamespace(name="m", hidden_size=64)
    cfg = EvalConfig(tp=2, codecs=("int8",))
    row = result_row(cfg, info, "int8", comparison, stats, [True, False, True, True], 0.5, 1.0, num_layers=4,
                     lambada_baseline_hits=[True, False, False, True])
    out = row.to_json()
    assert out["lambada_acc"] == 0.75 and 0.0 <= out["lambada_acc_ci95"][0] <= 0.75 <= out["lambada_acc_ci95"][1]
    assert out["lambada_acc_delta_ci95"][0] >= 0.0  # never fewer hits than the baseline
    assert CodecEvalRow.from_json(out) == row
    bare = result_row(cfg, info, "int8", comparison, stats, [], 0.0, 1.0, num_layers=4).to_json()
    assert "lambada_acc_ci95" not in bare and "lambada_acc_delta_ci95" not in bare
