"""The published result JSONs use one unit (issue 11 defect 2: docs/frontier.json held one
layer's bytes per token in some entries and all layers' in others; docs/results.json too).

For every row: ``bytes_sent_per_rank_per_token`` is all row-parallel layers of the model
together, so ``8 * bytes / bits_per_value`` must be the values one rank sends per token:
``(N - 1) * E * L`` for gather, ``2 (N - 1) / N * E * L`` for two-shot (L = 2 per block:
o_proj and down_proj). The shapes are the models' published ones, not read from the code.
"""
import json
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
SHAPES = {"smollm2-135m": (576, 30), "gemma3-270m": (640, 18)}  # hidden size, decoder blocks


def _rows():
    for name in ("frontier.json", "results.json"):
        for key, entry in json.loads((DOCS / name).read_text()).items():
            for row in entry["rows"]:
                yield f"{name}:{key}:{row['codec']}", entry["config"], row


@pytest.mark.parametrize("where,cfg,row", list(_rows()), ids=lambda v: v if isinstance(v, str) else "")
def test_bytes_per_token_are_all_layers_and_match_the_bits(where, cfg, row):
    e, blocks = SHAPES[cfg["model"]]
    n, layers = cfg["tp"], 2 * blocks
    values = {"gather": (n - 1) * e * layers, "two-shot": 2 * (n - 1) / n * e * layers}[row["algorithm"]]
    bits = 8 * row["bytes_sent_per_rank_per_token"] / values
    assert bits == pytest.approx(row["bits_per_value"], rel=2e-3), where
    if "ring_equiv_bits" in row:
        ring = 8 * row["bytes_sent_per_rank_per_token"] / (2 * (n - 1) / n * e * layers)
        assert ring == pytest.approx(row["ring_equiv_bits"], rel=2e-3), where


@pytest.mark.parametrize("page", ["../README.md", "results.md", "frontier.md", "outliers.md", "quality-history.md",
                                  "outliers/smollm2-135m-tp3.md", "design-dev.md"])
def test_results_pages_disclose_the_baselines(page):
    """Issue 11: every page with model results says what the baseline models are."""
    text = " ".join((DOCS / page).read_text().split())
    assert "SmolLM2-135M-Instruct" in text and "Q4_1" in text and "dequantized to fp32" in text, page
    if page in ("../README.md", "results.md", "frontier.md", "quality-history.md"):  # the pages with Gemma 3 results
        assert "Gemma 3 270M from a Q4_K_M GGUF" in text, page
