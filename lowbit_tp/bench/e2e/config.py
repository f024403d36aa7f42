"""The configuration of one ``bench-e2e`` sweep."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class E2EConfig:
    """One benchmark sweep; recorded in the results.

    ``networks``: ``loopback`` and/or tc rates (``10gbit``); ``delay``: one-way delay per
    packet on emulated links (``0``: none; needs netem otherwise). ``codecs`` run with
    ``algorithm``; ``bf16`` always runs with ``gather`` as the baseline, and with ``exact``
    too when ``exact_baseline``. ``model``: ``random-llama`` (shape from ``hidden``,
    ``intermediate``, ``layers``, ``heads``, ``kv_heads``) or a registry name / checkpoint
    directory. ``repeats`` prompts of each length run per launch; ``rounds`` launches per
    variant, interleaved (medians pool all ``repeats * rounds``). ``sync_wire``: a barrier before each backend collective inside an all-reduce,
    so that the wire timer excludes the ranks' arrival skew (reported as ``*_skew_ms``).
    """

    networks: tuple[str, ...] = ("loopback", "10gbit", "1gbit")
    tps: tuple[int, ...] = (2,)
    codecs: tuple[str, ...] = ("int4-outlier", "int4-g32")
    algorithm: str = "gather"
    exact_baseline: bool = True
    prompt_lens: tuple[int, ...] = (2048, 512)
    new_tokens: int = 16
    repeats: int = 3
    rounds: int = 1
    model: str = "random-llama"
    hidden: int = 2048
    intermediate: int = 5632
    layers: int = 2
    heads: int = 16
    kv_heads: int = 4
    calibration_samples: int = 8
    delay: str = "0"
    threads_per_rank: int = 1
    sync_wire: bool = True
    run_timeout_s: float = 900.0

    def variants(self) -> list[tuple[str, str]]:
        """(codec, algorithm) pairs of one network and TP degree, baseline first."""
        out = [("bf16", "gather")] + ([("bf16", "exact")] if self.exact_baseline else [])
        return out + [(c, self.algorithm) for c in self.codecs if c != "bf16"]
