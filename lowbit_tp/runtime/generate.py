"""Token-by-token decoding on one TP rank, with the HF KV cache.

Every rank runs :func:`generate` together (each forward triggers two all-reduces per
block). The next token is chosen on rank 0 and broadcast (one int64 per step), so ranks
can never drift apart even if their logits differed in the last bit; with identical
logits (the compressed all-reduce gives every rank bitwise the same sum) the broadcast
only costs one tiny message. Sampling uses a ``torch.Generator`` seeded with
``SamplingConfig.seed``.
"""
from __future__ import annotations

import copy
import inspect
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from lowbit_tp.collectives import CollectiveError, CommStats
from lowbit_tp.configs import SamplingConfig
from lowbit_tp.results import record_kwargs

__all__ = ["GenerationResult", "PhaseComm", "SamplingConfig", "generate", "select_token"]


@dataclass(frozen=True)
class PhaseComm:
    """One prompt's all-reduce traffic on one rank, split at the first new token."""

    prefill: CommStats
    decode: CommStats

    def to_json(self) -> dict[str, dict]:
        return {"prefill": self.prefill.as_dict(), "decode": self.decode.as_dict()}

    @classmethod
    def from_json(cls, d: dict) -> "PhaseComm":
        return cls(prefill=CommStats.from_dict(d["prefill"]), decode=CommStats.from_dict(d["decode"]))


@dataclass(frozen=True)
class GenerationResult:
    """One prompt's generation, as seen by one rank.

    Times in seconds (wall clock, this rank). ``prefill_s`` covers the prompt's forward
    pass and the choice of the first new token; ``decode_s[i]`` the forward pass and choice
    of new token ``i + 1``. ``comm`` holds this rank's all-reduce traffic split into
    ``prefill`` and ``decode``; the per-step token broadcast (8 bytes) is control traffic
    and is not counted there. ``prompt``: the prompt's text, set by the engine that ran it.
    """

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    prefill_s: float
    decode_s: list[float]
    comm: PhaseComm
    prefill_logits: torch.Tensor | None = None
    prompt: str | None = None

    @property
    def tokens_per_s(self) -> float:
        """New tokens over the whole wall time (prefill included)."""
        total = self.prefill_s + sum(self.decode_s)
        return len(self.token_ids) / total if total > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        """Steady-state decode rate: tokens after the first over their decode time."""
        t = sum(self.decode_s)
        return len(self.decode_s) / t if t > 0 else float("nan")

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    def to_json(self) -> dict[str, Any]:
        """The row ``lowbit-tp run`` writes under ``results``: the fields, then the rates and
        ``new_tokens``, then ``prompt`` and ``prefill_logits`` where set."""
        d = {"prompt_ids": self.prompt_ids, "token_ids": self.token_ids, "text": self.text,
             "finish_reason": self.finish_reason, "prefill_s": self.prefill_s, "decode_s": self.decode_s,
             "comm": self.comm.to_json(), "tokens_per_s": self.tokens_per_s,
             "decode_tokens_per_s": self.decode_tokens_per_s, "new_tokens": self.new_tokens}
        if self.prompt is not None:
            d["prompt"] = self.prompt
        if self.prefill_logits is not None:
            d["prefill_logits"] = self.prefill_logits
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "GenerationResult":
        """A row as :meth:`to_json` wrote it (derived keys are recomputed, not read)."""
        kw = record_kwargs(cls, d, derived=("tokens_per_s", "decode_tokens_per_s", "new_tokens"),
                           what="a GenerationResult row")
        return cls(**{k: (PhaseComm.from_json(v) if k == "comm" else v) for k, v in kw.items()})


def select_token(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> int:
    """Next token id from the last position's logits ``[vocab]``: argmax, or a seeded draw."""
    logits = logits.float()
    if not sampling.do_sample:
        return int(torch.argmax(logits))
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = torch.cumsum(sorted_p, 0) - sorted_p >= sampling.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def _agree_on_token(token: int, *, rank: int, world: int, group) -> int:
    """Broadcast rank 0's token to all ranks of ``group`` (no-op for one rank)."""
    if world == 1:
        return token
    t = torch.tensor([token], dtype=torch.int64)
    try:
        dist.broadcast(t, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    except Exception as exc:
        raise CollectiveError(f"rank {rank}/{world}: broadcast of the next token failed: {exc}. "
                              f"A peer rank probably died or stalled past the process-group timeout.") from exc
    return int(t.item())


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    rank: int = 0,
    world: int = 1,
    group=None,
    stats: CommStats | None = None,
    sampling: SamplingConfig = SamplingConfig(),
    eos_token_ids: Sequence[int] = (),
    on_text: Callable[[str], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
    keep_prefill_logits: bool = False,
    check_nonfinite: Callable[[], None] | None = None,
) -> GenerationResult:
    """Decode up to ``max_new_tokens`` after ``prompt_ids`` (batch of one) with a KV cache.

    ``stats``: the :class:`CommStats` the model's row-parallel layers record into (the
    result reports its prefill/decode deltas). ``on_text(piece)`` streams new text (call
    it on rank 0 only); ``on_step(step, token)`` runs on every rank after each token (a
    hook for tests). Stops early at any of ``eos_token_ids`` (the eos token is kept).
    ``check_nonfinite()`` runs once after each step's forward (the reducer's
    :meth:`~lowbit_tp.tp.row_parallel.DistReducer.check_nonfinite`: NaN/Inf recorded on the
    device by the codec kernels raise here, with one host read per step, not per message).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    stats = stats if stats is not None else CommStats()
    gen = torch.Generator().manual_seed(sampling.seed) if sampling.do_sample else None
    eos = set(int(t) for t in eos_token_ids)
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
    tokens: list[int] = []
    decode_s: list[float] = []
    shown = ""
    finish = "length"
    before = copy.deepcopy(stats)
    prefill_logits = None
    cache = None
    # transformers >= 5.2x renamed ``past_key_values`` to ``cache`` (input and output)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    for step in range(max_new_tokens):
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, **{cache_kw: cache})
        cache = getattr(out, cache_kw)
        if check_nonfinite is not None:
            check_nonfinite()
        if step == 0 and keep_prefill_logits:
            prefill_logits = out.logits[0].detach().clone()
        token = select_token(out.logits[0, -1], sampling, gen) if rank == 0 else -1
        token = _agree_on_token(token, rank=rank, world=world, group=group)
        dt = time.perf_counter() - t0
        if step == 0:
            prefill_s = dt
            mid = copy.deepcopy(stats)
        else:
            decode_s.append(dt)
        tokens.append(token)
        ids = torch.tensor([[token]], dtype=torch.long)
        if on_step is not None:
            on_step(step, token)
        if on_text is not None:
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            if len(text) > len(shown) and not text.endswith("\ufffd"):  # wait for whole UTF-8 characters
                on_text(text[len(shown):])
                shown = text
        if token in eos:
            finish = "eos"
            break

    return GenerationResult(
        prompt_ids=list(prompt_ids),
        token_ids=tokens,
        text=tokenizer.decode(tokens, skip_special_tokens=True),
        finish_reason=finish,
        prefill_s=prefill_s,
        decode_s=decode_s,
        comm=PhaseComm(prefill=mid.since(before), decode=stats.since(mid)),
        prefill_logits=prefill_logits,
    )
