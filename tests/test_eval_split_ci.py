"""The dev/test split of evaluation text and the bootstrap confidence intervals."""
import math

import numpy as np
import pytest
import torch

from lowbit_tp.calibration.pipeline import CalibrationConfig, calibrate
from lowbit_tp.evaluation import EvalConfig, evaluate_codecs
from lowbit_tp.evaluation.metrics import LMComparison, bootstrap_ci, mean_per_token, ppl_increase_pct
from lowbit_tp.models.registry import ModelInfo

from test_simulator import tiny_model


# ------------------------------------------------------------------ bootstrap intervals

def test_bootstrap_two_sequences_hand_worked():
    # Two sequences of one token each with KL 1 and 3. A resample is (a, a), (a, b), (b, a)
    # or (b, b): mean 1, 2, 2, 3 with probabilities 1/4, 1/2, 1/4. With 4000 resamples the
    # 2.5% and 97.5% quantiles are therefore exactly 1 and 3.
    lo, hi = bootstrap_ci({"kl": [1.0, 3.0], "tokens": [1, 1]}, mean_per_token("kl"), resamples=4000, seed=5)
    assert (lo, hi) == (1.0, 3.0)
    # One distinct value: a degenerate interval.
    assert bootstrap_ci({"kl": [2.0] * 5, "tokens": [4] * 5}, mean_per_token("kl")) == [0.5, 0.5]


def test_bootstrap_matches_a_plain_loop_over_numpy_resamples():
    rng = np.random.default_rng(123)
    n = 17
    tokens = rng.integers(50, 60, n).astype(float)
    nll_b = tokens * rng.uniform(2.0, 3.0, n)
    nll_c = nll_b + tokens * rng.uniform(0.0, 0.1, n)
    per_seq = {"tokens": tokens, "nll_base": nll_b, "nll_codec": nll_c}
    got = bootstrap_ci(per_seq, ppl_increase_pct, resamples=500, seed=9)
    # Independent computation: draw the same indices, loop, use exp/ratio directly.
    idx = np.random.default_rng(9).integers(0, n, size=(500, n))
    vals = []
    for row in idx:
        t, b, c = tokens[row].sum(), nll_b[row].sum(), nll_c[row].sum()
        vals.append(100.0 * (np.exp(c / t) / np.exp(b / t) - 1.0))
    want = np.percentile(vals, [2.5, 97.5])
    assert got == pytest.approx(list(want), rel=1e-9)
    point = 100.0 * (np.exp(nll_c.sum() / tokens.sum()) / np.exp(nll_b.sum() / tokens.sum()) - 1)
    assert got[0] < point < got[1]


def test_lm_comparison_per_sequence_sums_and_intervals():
    torch.manual_seed(0)
    ids = torch.randint(0, 11, (6, 9))
    base = torch.randn(6, 9, 11)
    noisy = base + 0.3 * torch.randn(6, 9, 11)
    comp = LMComparison()
    comp.update(ids[:4], base[:4], noisy[:4])
    comp.update(ids[4:], base[4:], noisy[4:])
    res = comp.result()
    # Independent per-sequence reference for sequence 5.
    lb, lc = base[5, :-1].log_softmax(-1).double(), noisy[5, :-1].log_softmax(-1).double()
    assert comp.seq_kl[5] == pytest.approx(float((lb.exp() * (lb - lc)).sum()), rel=1e-5)
    assert comp.seq_nll_codec[5] == pytest.approx(float(-lc[torch.arange(8), ids[5, 1:]].sum()), rel=1e-5)
    assert comp.seq_tokens == [8] * 6 and res["sequences"] == 6 and res["tokens"] == 48
    assert sum(comp.seq_kl) == pytest.approx(comp.kl)
    for key, ci in (("kl", "kl_ci95"), ("top1", "top1_ci95")):
        assert res[ci][0] <= res[key] <= res[ci][1]
    inc = 100 * (res["ppl"] / res["ppl_baseline"] - 1)
    assert res["ppl_increase_pct_ci95"][0] <= inc <= res["ppl_increase_pct_ci95"][1]
    one = LMComparison()
    one.update(ids[:1], base[:1], noisy[:1])
    assert one.result()["kl_ci95"] is None


def _one_token_each(base, codec):
    """``LMComparison`` over [N, V] logits as N sequences of one predicted token: ``seq_kl`` is
    then the per-token KL. Returns (comparison, its result)."""
    n, v = base.shape
    comp = LMComparison()
    ids = torch.zeros(n, 2, dtype=torch.long)
    pad = torch.zeros(n, 1, v)
    comp.update(ids, torch.cat([base[:, None], pad], 1), torch.cat([codec[:, None], pad], 1))
    return comp, comp.result(resamples=50)


def test_kl_is_never_negative_when_the_logits_agree_to_an_ulp():
    """KL >= 0, but the float32 sum of p (log p - log q) went negative from rounding where
    the two logit rows agree to about an ulp, as the bf16 codec's nearly do: down to -3e-7 per
    token, and a negative mean over 256 tokens."""
    g = torch.Generator().manual_seed(0)
    base = (3 * torch.randn(256, 4096, generator=g)).bfloat16().float()
    up = torch.nextafter(base, torch.tensor(float("inf")))
    half = torch.rand(base.shape, generator=g) < 0.5
    one = torch.zeros_like(half)
    one[torch.arange(256), torch.randint(0, 4096, (256,), generator=g)] = True
    # half the logits one ulp apart (float32 rounding: down to -3e-7); one logit per row (the
    # exact KL ~1e-14 is below float64's own rounding: down to -9e-16 before the clamp); all
    # one ulp apart (a shift: KL 0); a bf16 round trip of bf16 values (identical)
    for codec in (torch.where(half, up, base), torch.where(one, up, base), up, base.bfloat16().float()):
        comp, res = _one_token_each(base, codec)
        assert min(comp.seq_kl) >= 0.0 and res["kl"] >= 0.0 and res["kl_ci95"][0] >= 0.0, min(comp.seq_kl)
    comp, res = _one_token_each(base, base.clone())
    assert comp.seq_kl == [0.0] * 256 and res["kl"] == 0.0


def test_kl_matches_hand_worked_and_float64_numpy_values():
    """p = (1/2, 1/4, 1/4), q = (1/4, 1/4, 1/2): KL = 1/2 ln 2 - 1/4 ln 2 = ln(2) / 4. Then
    random rows against numpy in float64. The other metrics keep their float32 values."""
    p, q = torch.tensor([[0.5, 0.25, 0.25]]), torch.tensor([[0.25, 0.25, 0.5]])
    comp, res = _one_token_each(p.log() + 1.5, q.log() - 0.5)  # any offset: logits, not log-probabilities
    assert comp.seq_kl[0] == pytest.approx(math.log(2) / 4, rel=1e-7) and res["kl"] == comp.seq_kl[0]
    assert comp.seq_nll_base[0] == pytest.approx(math.log(2), rel=1e-6)  # target token 0: -ln p_0
    assert comp.seq_nll_codec[0] == pytest.approx(math.log(4), rel=1e-6)

    g = torch.Generator().manual_seed(1)
    base, codec = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    b, c = base.double().numpy(), codec.double().numpy()
    lp = b - b.max(1, keepdims=True) - np.log(np.exp(b - b.max(1, keepdims=True)).sum(1, keepdims=True))
    lq = c - c.max(1, keepdims=True) - np.log(np.exp(c - c.max(1, keepdims=True)).sum(1, keepdims=True))
    want = (np.exp(lp) * (lp - lq)).sum(1)
    comp, res = _one_token_each(base, codec)
    assert comp.seq_kl == pytest.approx(list(want), rel=1e-12)
    assert res["kl"] == pytest.approx(want.mean(), rel=1e-12)
    # nll and top-1 are still taken from float32 log-softmaxes
    assert comp.seq_nll_codec == [float(-codec[i].log_softmax(-1)[0].double()) for i in range(5)]
    assert comp.seq_top1_agree == [int(base[i].argmax() == codec[i].argmax()) for i in range(5)]


# ------------------------------------------------------------------ dev / test split

class LengthTokenizer:
    """One token per byte (id = byte mod 101); ``decode`` keeps only the length, which is all
    the character offsets of the dev split need."""

    bos_token_id = None
    name_or_path = "byte-mod-101"

    def encode(self, text, add_special_tokens=True):
        return [b % 101 for b in text.encode()]

    def decode(self, ids):
        return "x" * len(ids)


@pytest.fixture(scope="module")
def bundle():
    model = tiny_model("llama")
    info = ModelInfo(name="tiny-llama", source="memory", weights_sha256="ef" * 32, model_type="llama",
                     hidden_size=64, num_layers=2)
    return model, LengthTokenizer(), info


@pytest.fixture(scope="module")
def cal(bundle):
    return calibrate(CalibrationConfig(model="tiny-llama", tp=2, samples=8, seq_len=64, batch_size=4,
                                       allocate=None), bundle=bundle, progress=False)


def _spans(manifest):
    return {(s["sha256"], s["token_start"]) for s in manifest["samples"]}


def test_dev_split_never_overlaps_calibration_windows_and_test_is_held_out(bundle, cal):
    # seq_len 64 with seed 0, as the calibration: without the exclusion the same slots would be drawn.
    dev = evaluate_codecs(EvalConfig(model="tiny-llama", tp=2, codecs=("int4",), samples=8, seq_len=64, seed=0,
                                     lambada=6, lambada_context=32, split="dev", batch_size=4),
                          bundle=bundle, calibration=cal, progress=False)
    test = evaluate_codecs(EvalConfig(model="tiny-llama", tp=2, codecs=("int4",), samples=8, seq_len=64,
                                      lambada=0, split="test", batch_size=4),
                           bundle=bundle, calibration=cal, progress=False)
    cal_m = cal.meta["text"]["chunks"]
    cal_docs = {s["doc"] for s in cal_m["samples"]}
    dev_docs = {s["doc"] for s in dev.text["chunks"]["samples"]}
    test_docs = {s["doc"] for s in test.text["chunks"]["samples"]}
    assert dev_docs <= {d for d in dev.text["split"]["documents"]}
    assert not test_docs & (cal_docs | dev_docs)  # test text is neither calibration nor dev text
    assert dev_docs & cal_docs  # dev is carved from the calibration works...
    width = 64
    cal_tok = {}
    for s in cal_m["samples"]:
        cal_tok.setdefault(s["sha256"], []).append((s["token_start"], s["token_start"] + width))
    for s in dev.text["chunks"]["samples"]:  # ...but never from a calibration window
        a = s["token_start"]
        assert all(not (x < a + width and a < y) for x, y in cal_tok.get(s["sha256"], []))
    for it in dev.text["lambada"]:  # with this tokenizer, token index == character index (ASCII)
        assert all(not (x < it["char_end"] and it["char_start"] < y) for x, y in cal_tok.get(it["sha256"], []))
    assert dev.rows[0].split == "dev" and test.rows[0].split == "test"
    assert dev.text["split"]["excluded_windows"] == 8
    for key in ("ppl_increase_pct_ci95", "kl_ci95", "top1_ci95"):
        lo, hi = getattr(dev.rows[0], key)
        assert lo <= hi


def test_split_must_be_dev_or_test():
    with pytest.raises(ValueError, match="split must be one of"):
        EvalConfig(split="train")


def test_merge_results_joins_codec_groups_and_refuses_other_windows(bundle, cal):
    from lowbit_tp.evaluation.evaluate import merge_results

    kw = dict(model="tiny-llama", tp=2, samples=4, seq_len=64, lambada=0, batch_size=4)
    a = evaluate_codecs(EvalConfig(codecs=("int4",), **kw), bundle=bundle, calibration=cal, progress=False)
    b = evaluate_codecs(EvalConfig(codecs=("int8",), **kw), bundle=bundle, calibration=cal, progress=False)
    merged = merge_results([a.to_json(), b.to_json()])
    assert [r["codec"] for r in merged["rows"]] == ["int4", "int8"] and merged["config"]["codecs"] == ["int4", "int8"]
    other = evaluate_codecs(EvalConfig(codecs=("int8",), **{**kw, "samples": 3}), bundle=bundle, calibration=cal,
                            progress=False)
    with pytest.raises(ValueError, match="other windows"):
        merge_results([a.to_json(), other.to_json()])
