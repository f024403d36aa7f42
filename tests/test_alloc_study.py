"""scripts/alloc_study.py: a plan "with error feedback" is measured and evaluated with it.

Stop 18 built ``--error-feedback`` for the sensitivity pass but the script's own dev
evaluation ran without feedback, and a cached OUT/measure.json (e.g. measured without
feedback, or for another model) was reused whatever the flags said.
"""
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "alloc_study.py"
BASE = ["--model", "gemma3-270m", "--tp", "2", "--calibration", "c.safetensors", "--out-dir", "o"]


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("alloc_study", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("ef", [False, True])
def test_dev_eval_runs_with_the_feedback_the_plan_was_measured_with(study, ef):
    args = study.parse_args(BASE + ["--eval-samples", "8", "--eval-codecs", "default"]
                            + (["--error-feedback"] if ef else []))
    cfg = study.dev_eval_config(args, {"alloc-4.25": {}}, None)
    assert cfg.error_feedback is ef
    assert cfg.codecs == ("alloc-4.25", "default")
    assert (cfg.split, cfg.seed, cfg.samples, cfg.lambada) == ("dev", 1, 8, 0)


class _WordTokenizer:
    bos_token_id = None
    name_or_path = "word"

    def encode(self, text, add_special_tokens=True):
        return [len(w) for w in text.split()]


def test_dev_eval_seed_draws_other_dev_windows(study):
    """The seed reaches the dev config, and the eval's window draw (chunk_tokens with the
    config's samples, length and seed) then reads other windows than the default seed's."""
    from lowbit_tp.data import Document, chunk_tokens

    configs = [study.dev_eval_config(study.parse_args(BASE + ["--eval-samples", "8"] + extra), {"alloc-4.25": {}},
                                     None) for extra in ([], ["--eval-seed", "2"])]
    assert [(c.split, c.seed) for c in configs] == [("dev", 1), ("dev", 2)]
    docs = [Document.from_text(name=f"d{i}", path=f"d{i}.txt",
                               text=" ".join("w" * (1 + (i * 7 + j) % 9) for j in range(4000)))
            for i in range(3)]
    starts = [{(p["doc"], p["token_start"]) for p in chunk_tokens(_WordTokenizer(), docs, num_samples=c.samples,
                                                                   seq_len=c.seq_len, seed=c.seed).provenance}
              for c in configs]
    assert len(starts[0]) == len(starts[1]) == 8 and starts[0] != starts[1]


def _measure(ef, samples=("a", "b")):
    return {"model": "gemma3-270m", "tp": 2, "reference": "r", "error_feedback": ef,
            "probe": {"samples": list(samples), "seq_len": 128},
            "mse": {"l0": {"r": 1.0, "x": 0.5}, "l1": {"r": 1.0, "x": 0.4}}}


def _check(study, m, *, ef=True, samples=("a", "b"), codecs=("r", "x"), model="gemma3-270m", sensitivity="alone",
           own=False, cal=None):
    study.check_cached(m, model=model, tp=2, reference="r", error_feedback=ef,
                       probe={"samples": list(samples), "seq_len": 128}, codecs=list(codecs), path="m.json",
                       sensitivity=sensitivity, own_sensitivity=own, calibration_sha256=cal)


def test_cached_measure_of_the_same_study_is_reused(study):
    _check(study, _measure(True))
    _check(study, _measure(False), ef=False)
    _check(study, {**_measure(True), "sensitivity": "in-context"}, sensitivity="in-context")
    _check(study, {**_measure(True), "own_sensitivity": True, "calibration_sha256": "aa"}, own=True, cal="aa")


def test_the_calibration_digest_is_the_files_sha256(study, tmp_path):
    """measure.json records sha256_of_files([calibration]): the file's digest, read in blocks."""
    import hashlib

    p = tmp_path / "cal.bin"
    p.write_bytes(b"x" * (3 << 20) + b"tail")  # more than one read block
    assert study.sha256_of_files([p]) == hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("change, match", [
    (dict(m=_measure(False)), "error_feedback"),          # measured without feedback
    (dict(m={k: v for k, v in _measure(True).items() if k != "error_feedback"}), "error_feedback"),  # before the field
    (dict(model="smollm2-135m"), "smollm2"),
    (dict(sensitivity="in-context"), "in-context"),       # measured alone (field absent = alone)
    (dict(samples=("a", "c")), "probe"),
    (dict(codecs=("r", "x", "y")), "no errors for \\['y'\\]"),
    (dict(own=True), "own_sensitivity"),                  # fresh KL reused as the calibration's own
    (dict(m={**_measure(True), "own_sensitivity": True}), "own_sensitivity"),  # and the other way round
    (dict(m={**_measure(True), "calibration_sha256": "aa"}, cal="bb"), "calibration_sha256"),  # another calibration
    (dict(cal="bb"), "calibration_sha256"),               # a file that recorded no calibration
])
def test_cached_measure_of_another_study_is_refused(study, change, match):
    m = change.pop("m", _measure(True))
    with pytest.raises(SystemExit, match=match):
        _check(study, m, **change)


def _with_plan(cal, plan):
    import copy

    c = copy.copy(cal)
    c.meta = {**cal.meta, "bit_allocation": plan}
    return c


def test_eval_plans_takes_the_plan_of_a_copy_of_the_same_calibration(study, cal_factory):
    cal = cal_factory(2, 64)
    layers = {l: "rot-lm4-g64-lg8-k4" for l in cal.layers}
    old = {"layers": layers, "probe": {"samples": ["a"], "seq_len": 128}}
    files = {"old.safetensors": _with_plan(cal, old)}
    got = study.extra_plans(["prev=old.safetensors"], _with_plan(cal, {"layers": {}}), files.__getitem__)
    assert got == {"prev": old}


@pytest.mark.parametrize("spec, other, match", [
    ("prev", None, "NAME=PATH"),
    ("alloc-4.25=x", None, "taken"),
    ("prev=x", "no-plan", "no per-layer plan"),
    ("prev=x", "other-stats", "not written from --calibration"),
    ("prev=x", "other-header", "not written from --calibration"),
])
def test_eval_plans_refuses_what_is_not_a_plan_of_this_calibration(study, cal_factory, spec, other, match):
    cal = cal_factory(2, 64)
    plan = {"layers": {l: "rot-lm4-g64-lg8-k4" for l in cal.layers}}
    if other == "no-plan":
        o = _with_plan(cal, None)
    elif other == "other-stats":
        o = _with_plan(cal_factory(2, 128), plan)  # another calibration's statistics
    elif other == "other-header":
        o = _with_plan(cal, plan)
        o.meta = {**o.meta, "config": {**o.meta.get("config", {}), "seed": 12345}}
    else:
        o = _with_plan(cal, plan)
    with pytest.raises(SystemExit, match=match):
        study.extra_plans([spec], cal, lambda p: o)


def test_merge_probes_adds_only_windows_the_dev_split_does_not_yet_avoid(study):
    excl = {"samples": ["a", "b"], "seq_len": 128, "num_samples": 2}
    assert study.merge_probes(excl, None, "x") is excl
    assert study.merge_probes(excl, {"samples": ["b", "a"], "seq_len": 128}, "x") is excl
    got = study.merge_probes(excl, {"samples": ["b", "c"], "seq_len": 128}, "x")
    assert got == {"samples": ["a", "b", "c"], "seq_len": 128, "num_samples": 3}
    with pytest.raises(SystemExit, match="window length"):
        study.merge_probes(excl, {"samples": ["c"], "seq_len": 64}, "x")


def _src(tmp_path, **over):
    m = {**_measure(True), "sensitivity_kl": {"l1": 0.2, "l0": 0.1}, **over}
    p = tmp_path / "measure.json"
    import json

    p.write_text(json.dumps(m))
    return p


def _from(study, path, *, ef=True, samples=("a", "b"), cal="cc"):
    args = study.parse_args(BASE + ["--reference", "r", "--sensitivity-from", str(path)]
                            + (["--error-feedback"] if ef else []))
    return study.sensitivity_from(args, {"samples": list(samples), "seq_len": 128}, cal, ["l0", "l1"])


def test_sensitivity_from_an_earlier_study_of_the_same_setup(study, tmp_path):
    assert _from(study, _src(tmp_path)) == {"l0": 0.1, "l1": 0.2}
    assert _from(study, _src(tmp_path, calibration_sha256="cc")) == {"l0": 0.1, "l1": 0.2}


@pytest.mark.parametrize("over, kw, match", [
    ({}, dict(ef=False), "error_feedback"),                      # a plan without feedback from a KL with it
    ({}, dict(samples=("a", "c")), "probe"),                     # other probe windows
    ({"calibration_sha256": "dd"}, {}, "calibration_sha256"),    # another calibration, where recorded
    ({"sensitivity": "in-context"}, {}, "in-context"),
    ({"sensitivity_kl": {"l0": 0.1}}, {}, "no sensitivity for 'l1'"),
])
def test_sensitivity_from_another_setup_is_refused(study, tmp_path, over, kw, match):
    with pytest.raises(SystemExit, match=match):
        _from(study, _src(tmp_path, **over), **kw)


def test_a_cache_measured_afresh_is_not_reused_for_sensitivity_from(study):
    with pytest.raises(SystemExit, match="sensitivity_from"):
        study.check_cached(_measure(True), model="gemma3-270m", tp=2, reference="r", error_feedback=True,
                           probe={"samples": ["a", "b"], "seq_len": 128}, codecs=["r"], path="m.json",
                           sensitivity_from="ab12")
    study.check_cached({**_measure(True), "sensitivity_from": "ab12"}, model="gemma3-270m", tp=2, reference="r",
                       error_feedback=True, probe={"samples": ["a", "b"], "seq_len": 128}, codecs=["r"],
                       path="m.json", sensitivity_from="ab12")


def test_a_missing_sensitivity_from_file_is_one_line_before_any_model_load(study, tmp_path, monkeypatch):
    import lowbit_tp.models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the flag was checked")

    monkeypatch.setattr(lowbit_tp.models, "load_model", no_load)
    with pytest.raises(SystemExit, match="--sensitivity-from: no file"):
        study.main(BASE + ["--out-dir", str(tmp_path / "o"), "--sensitivity-from", str(tmp_path / "none.json")])
