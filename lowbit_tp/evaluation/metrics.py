"""Quality metrics of a codec's logits against the baseline's, accumulated over batches,
with bootstrap confidence intervals over sequences."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


@dataclass
class LMComparison:
    """Sums over predicted tokens (NLL of baseline and codec, KL(base || codec), top-1
    agreement), in total and per sequence (the ``seq_*`` lists, one entry per row of every
    batch, in order) for the bootstrap intervals."""

    tokens: int = 0
    nll_base: float = 0.0
    nll_codec: float = 0.0
    kl: float = 0.0
    top1_agree: int = 0
    seq_tokens: list[int] = field(default_factory=list)
    seq_nll_base: list[float] = field(default_factory=list)
    seq_nll_codec: list[float] = field(default_factory=list)
    seq_kl: list[float] = field(default_factory=list)
    seq_top1_agree: list[int] = field(default_factory=list)

    def update(self, ids: torch.Tensor, base_logits: torch.Tensor, codec_logits: torch.Tensor) -> None:
        """``ids [B, S]``; logits ``[B, S, V]``. Position t predicts token t + 1."""
        b, s = ids.shape
        target = ids[:, 1:].reshape(-1)
        lb = F.log_softmax(base_logits[:, :-1].float().reshape(-1, base_logits.shape[-1]), dim=-1)
        lc = F.log_softmax(codec_logits[:, :-1].float().reshape(-1, codec_logits.shape[-1]), dim=-1)
        nll_b = -lb.gather(1, target[:, None]).reshape(b, s - 1).double().sum(1)
        nll_c = -lc.gather(1, target[:, None]).reshape(b, s - 1).double().sum(1)
        # per sequence: [i, :-1] of contiguous logits is a view (the [:, :-1] reshape copied both whole)
        kl = torch.stack([token_kl(base_logits[i, :-1], codec_logits[i, :-1]).sum() for i in range(b)])
        agree = (lb.argmax(-1) == lc.argmax(-1)).reshape(b, s - 1).sum(1)
        self.tokens += target.numel()
        self.nll_base += float(nll_b.sum())
        self.nll_codec += float(nll_c.sum())
        self.kl += float(kl.sum())
        self.top1_agree += int(agree.sum())
        self.seq_tokens += [s - 1] * b
        self.seq_nll_base += nll_b.tolist()
        self.seq_nll_codec += nll_c.tolist()
        self.seq_kl += kl.tolist()
        self.seq_top1_agree += agree.tolist()

    def result(self, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict:
        """Point values, 95% percentile-bootstrap intervals over sequences (``*_ci95``, each
        ``[low, high]``; None with fewer than 2 sequences), and the per-sequence sums
        (``per_sequence``: ``tokens``, ``nll_base``, ``nll_codec``, ``kl``, ``top1`` lists) that
        :func:`paired_difference_ci` compares between two codecs on the same windows."""
        n = max(self.tokens, 1)
        out = {"tokens": self.tokens, "sequences": len(self.seq_tokens),
               "ppl_baseline": math.exp(self.nll_base / n), "ppl": math.exp(self.nll_codec / n),
               "kl": self.kl / n, "top1": self.top1_agree / n}
        per_seq = {"tokens": self.seq_tokens, "nll_base": self.seq_nll_base, "nll_codec": self.seq_nll_codec,
                   "kl": self.seq_kl, "top1": self.seq_top1_agree}
        for key, stat in (("ppl_increase_pct_ci95", ppl_increase_pct), ("kl_ci95", mean_per_token("kl")),
                          ("top1_ci95", mean_per_token("top1"))):
            out[key] = (bootstrap_ci(per_seq, stat, resamples=resamples, seed=seed)
                        if len(self.seq_tokens) >= 2 else None)
        out["per_sequence"] = {k: list(v) for k, v in per_seq.items()}
        return out


KL_ROWS = 64  # rows of logits per float64 block in token_kl: three [64, V] float64 temporaries
# (Gemma 3's V = 262,144: 400 MB)


def token_kl(base_logits: torch.Tensor, codec_logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(base) || softmax(codec))`` of each row of two ``[N, V]`` logit tensors, as
    float64 ``[N]``: ``sum_v p_v (log p_v - log q_v)``, the log-softmaxes taken in float64.

    In float32 (as before) the rounding of ``log p - log q`` (about 1e-7 relative to the log
    probabilities) exceeds the KL itself when the logits agree to an ulp or so, as the bf16
    codec's nearly do: such tokens came out negative, down to -3e-7, and so could a mean.
    Float64 takes that error down to about 1e-15.
    """
    n = base_logits.shape[0]
    out = torch.empty(n, dtype=torch.float64, device=base_logits.device)
    for i in range(0, n, KL_ROWS):
        lb = F.log_softmax(base_logits[i:i + KL_ROWS].double(), dim=-1)
        d = F.log_softmax(codec_logits[i:i + KL_ROWS].double(), dim=-1)
        torch.sub(lb, d, out=d)  # log p - log q
        out[i:i + KL_ROWS] = torch.mul(lb.exp_(), d, out=d).sum(-1)  # p (log p - log q)
    # Clamp at 0, for rounding only: the exact KL of the two (float64) distributions is >= 0
    # (Gibbs' inequality), so a negative sum is rounding error, and 0 is at least as close
    # to the exact value as that sum. Float64 rounding is ~1e-15 here, far below any KL reported.
    return out.clamp_min_(0.0)


def ppl_increase_pct(sums: Mapping[str, np.ndarray]) -> np.ndarray:
    """``100 * (ppl_codec / ppl_baseline - 1)`` from summed NLLs and token counts
    (arrays over resamples, or scalars)."""
    return 100.0 * np.expm1((sums["nll_codec"] - sums["nll_base"]) / sums["tokens"])


def mean_per_token(key: str) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
    """The statistic ``sum(key) / sum(tokens)``."""
    return lambda sums: sums[key] / sums["tokens"]


def bootstrap_ci(per_seq: Mapping[str, Sequence[float]], statistic: Callable[[Mapping[str, np.ndarray]], np.ndarray],
                 *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                 level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of a ratio-of-sums statistic over sequences.

    ``per_seq`` maps names to per-sequence sums (all the same length n). Each of
    ``resamples`` draws n sequence indices with replacement (``numpy.random.default_rng(seed)
    .integers(0, n, (resamples, n))``), sums every quantity over the drawn sequences and
    evaluates ``statistic`` on those sums; the interval is the ``(1 - level) / 2`` and
    ``(1 + level) / 2`` quantiles (numpy's default linear interpolation) of the values.
    """
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in per_seq.items()}
    n = len(next(iter(arrays.values())))
    if n < 1 or any(len(a) != n for a in arrays.values()):
        raise ValueError(f"per-sequence arrays must share a length >= 1, got {[len(a) for a in arrays.values()]}")
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    counts = np.zeros((resamples, n))
    np.add.at(counts, (np.arange(resamples)[:, None], idx), 1.0)  # how often each sequence is drawn
    sums = {k: counts @ a for k, a in arrays.items()}
    values = statistic(sums)
    alpha = (1.0 - level) / 2.0
    return [float(np.quantile(values, alpha)), float(np.quantile(values, 1.0 - alpha))]


PAIRED_STATISTICS = ("ppl_increase_pct", "kl", "top1")


def paired_difference_ci(a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]], *,
                         resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                         level: float = 0.95) -> dict[str, dict[str, float | list[float]]]:
    """Paired comparison of codec ``b`` against codec ``a`` measured on the same sequences.

    ``a`` and ``b`` are :meth:`LMComparison.result`'s ``per_sequence`` sums. For each of
    ``ppl_increase_pct`` (percentage points), ``kl`` and ``top1``: the point difference
    ``b - a`` and its percentile-bootstrap interval, drawing the *same* sequences for both
    codecs in each resample (:func:`bootstrap_ci`), so the noise of which windows were drawn
    cancels. ``kl`` also gets ``ratio`` (``kl_b / kl_a - 1``) with its interval. Refuses sums
    of different sequences (token counts or baseline NLL differ)."""
    ta, tb = np.asarray(a["tokens"], dtype=np.float64), np.asarray(b["tokens"], dtype=np.float64)
    if ta.shape != tb.shape or not np.array_equal(ta, tb):
        raise ValueError("paired comparison needs the same sequences: token counts differ")
    if not np.allclose(a["nll_base"], b["nll_base"], rtol=1e-9, atol=1e-9):
        raise ValueError("paired comparison needs the same sequences: baseline NLLs differ")
    joint = {"tokens": a["tokens"], "nll_base": a["nll_base"], "nll_a": a["nll_codec"], "nll_b": b["nll_codec"],
             "kl_a": a["kl"], "kl_b": b["kl"], "top1_a": a["top1"], "top1_b": b["top1"]}

    def side(s, x: str) -> dict:
        return {"tokens": s["tokens"], "nll_base": s["nll_base"], "nll_codec": s[f"nll_{x}"]}

    stats = {
        "ppl_increase_pct": lambda s: ppl_increase_pct(side(s, "b")) - ppl_increase_pct(side(s, "a")),
        "kl": lambda s: (s["kl_b"] - s["kl_a"]) / s["tokens"],
        "top1": lambda s: (s["top1_b"] - s["top1_a"]) / s["tokens"],
    }
    point = {k: np.asarray(v, dtype=np.float64).sum() for k, v in joint.items()}
    out: dict[str, dict[str, float | list[float]]] = {}
    for name, stat in stats.items():
        out[name] = {"diff": float(stat(point)),
                     "ci95": bootstrap_ci(joint, stat, resamples=resamples, seed=seed, level=level)}
    ratio = lambda s: s["kl_b"] / s["kl_a"] - 1.0  # noqa: E731 (same token counts cancel)
    out["kl"]["ratio"] = float(ratio(point))
    out["kl"]["ratio_ci95"] = bootstrap_ci(joint, ratio, resamples=resamples, seed=seed, level=level)
    return out


def last_word_correct(logits: torch.Tensor, context_len: int, target_ids: list[int]) -> bool:
    """LAMBADA rule: every target token is the argmax given the context and earlier targets.

    ``logits [S, V]`` for the sequence ``context + target[:-1]``.
    """
    preds = logits[context_len - 1: context_len - 1 + len(target_ids)].argmax(-1)
    return bool((preds == torch.tensor(target_ids)).all())
