"""The paper's central claim, checked: are outlier channels consistent across text?

For every layer and source (rank, or the reduced sum), compare the top-k channels by EMA
range selected on calibration text with those selected on held-out text, and measure
what share of the total channel range the top-k carry.
"""
from __future__ import annotations

from pathlib import Path
from statistics import mean, median

import torch

from lowbit_tp.calibration.artifact import Calibration
from lowbit_tp.codecs.static import topk_channels


def consistency(cal: Calibration, held_out: Calibration, *, k: int | None = None) -> list[dict]:
    """Per (layer, source): overlap |A ∩ B| / k of the two top-k sets, and the range share of A."""
    if cal.layers != held_out.layers or cal.tp != held_out.tp:
        raise ValueError("the two calibrations must cover the same model and TP degree")
    k = cal.k if k is None else k
    rows = []
    for layer in cal.layers:
        for src in [*range(cal.tp), "sum"]:
            ra, rb = cal.get(layer, src).range, held_out.get(layer, src).range
            a, b = set(topk_channels(ra, k).tolist()), set(topk_channels(rb, k).tolist())
            share = float(ra[list(a)].sum() / ra.sum())
            rows.append({"layer": layer, "source": str(src), "k": k, "overlap": len(a & b) / k,
                         "range_share_topk": share, "uniform_share": k / ra.numel(),
                         "top_over_median_range": float(ra[list(a)].min() / ra.median())})
    return rows


def summarize(rows: list[dict]) -> dict:
    """Means and medians of the per-(layer, source) figures, split by layer kind."""
    out = {}
    for kind, sel in (("all", rows), ("o_proj", [r for r in rows if "o_proj" in r["layer"]]),
                      ("down_proj", [r for r in rows if "down_proj" in r["layer"]])):
        if not sel:
            continue
        out[kind] = {"mean_overlap": mean(r["overlap"] for r in sel),
                     "median_overlap": median(r["overlap"] for r in sel),
                     "min_overlap": min(r["overlap"] for r in sel),
                     "mean_range_share_topk": mean(r["range_share_topk"] for r in sel),
                     "uniform_share": sel[0]["uniform_share"]}
    return out


def range_heatmap(cal: Calibration, path: str | Path, *, source=0, title: str = "") -> Path:
    """PNG of log10 channel range, rows = row-parallel layers in forward order, cols = channels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mat = torch.stack([cal.get(l, source).range for l in cal.layers]).clamp_min(1e-8).log10().numpy()
    fig, ax = plt.subplots(figsize=(12, 0.12 * len(cal.layers) + 2.5))
    im = ax.imshow(mat, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_xlabel("channel")
    ax.set_ylabel("row-parallel layer (o_proj, down_proj alternating)")
    ax.set_title(title or f"log10 EMA range of communicated values, source {source}")
    fig.colorbar(im, ax=ax, label="log10(max - min)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
