"""Quality metrics of a codec's logits against the baseline's, accumulated over batches."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LMComparison:
    """Running sums over predicted tokens: NLL of baseline and codec, KL(base || codec), top-1."""

    tokens: int = 0
    nll_base: float = 0.0
    nll_codec: float = 0.0
    kl: float = 0.0
    top1_agree: int = 0

    def update(self, ids: torch.Tensor, base_logits: torch.Tensor, codec_logits: torch.Tensor) -> None:
        """``ids [B, S]``; logits ``[B, S, V]``. Position t predicts token t + 1."""
        target = ids[:, 1:].reshape(-1)
        lb = F.log_softmax(base_logits[:, :-1].float().reshape(-1, base_logits.shape[-1]), dim=-1)
        lc = F.log_softmax(codec_logits[:, :-1].float().reshape(-1, codec_logits.shape[-1]), dim=-1)
        self.tokens += target.numel()
        self.nll_base += float(-lb.gather(1, target[:, None]).sum())
        self.nll_codec += float(-lc.gather(1, target[:, None]).sum())
        self.kl += float((lb.exp() * (lb - lc)).sum())
        self.top1_agree += int((lb.argmax(-1) == lc.argmax(-1)).sum())

    def result(self) -> dict:
        n = max(self.tokens, 1)
        return {"tokens": self.tokens, "ppl_baseline": math.exp(self.nll_base / n), "ppl": math.exp(self.nll_codec / n),
                "kl": self.kl / n, "top1": self.top1_agree / n}


def last_word_correct(logits: torch.Tensor, context_len: int, target_ids: list[int]) -> bool:
    """LAMBADA rule: every target token is the argmax given the context and earlier targets.

    ``logits [S, V]`` for the sequence ``context + target[:-1]``.
    """
    preds = logits[context_len - 1: context_len - 1 + len(target_ids)].argmax(-1)
    return bool((preds == torch.tensor(target_ids)).all())
