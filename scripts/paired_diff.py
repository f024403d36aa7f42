"""Paired comparison of codecs evaluated on the same windows by one ``lowbit-tp eval --json``.

Each row of an eval JSON written since the per-window sums were added (``per_sequence``)
carries every window's NLL, KL and top-1 sums. For each ``A:B`` pair this prints the
difference B - A of ppl increase (percentage points), KL and top-1, and the KL ratio
(``kl_B / kl_A - 1``), each with a 95% paired percentile bootstrap over windows (the same
windows drawn for both codecs in each resample; ``lowbit_tp.evaluation.metrics.
paired_difference_ci``). An interval that excludes 0 says the difference is outside the
noise of which windows were drawn.

    PYTHONPATH=. python scripts/paired_diff.py docs/dev/X.json [Y.json ...] --pairs A:B [C:D ...] [--json OUT]

Several eval JSONs are merged first (``lowbit_tp.evaluation.evaluate.merge_results``, which
refuses results of other windows, model, split or calibration). ``--by-setup`` also pairs
results of one codec under other collective set-ups (algorithm, error feedback): each row's
name gets its set-up (``default@two-shot``, ``default@two-shot+ef``,
``default@two-shot+ef=first-stage``), and the pairs name those. ``--by-calibration`` pairs
results of other calibrations of the same model and TP (e.g. two Fisher passes): each window's
baseline NLL must agree, and each row's name gets ``@`` and its JSON file's stem
(``alloc+fisher@fw4``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lowbit_tp.evaluation.evaluate import merge_results
from lowbit_tp.evaluation.metrics import paired_difference_ci
from lowbit_tp.results import json_text


def per_sequence(result: dict, codec: str) -> dict:
    if sum(row["codec"] == codec for row in result["rows"]) > 1:
        raise SystemExit(f"error: rows named {codec} appear more than once; name them apart (--by-setup) or pass one")
    for row in result["rows"]:
        if row["codec"] == codec:
            if "per_sequence" not in row:
                raise SystemExit(f"error: row {codec!r} has no per_sequence sums (written before they were added)")
            return row["per_sequence"]
    raise SystemExit(f"error: no row for codec {codec!r}; rows: {[r['codec'] for r in result['rows']]}")


def compare(result: dict, pairs: list[tuple[str, str]]) -> list[dict]:
    out = []
    for a, b in pairs:
        d = paired_difference_ci(per_sequence(result, a), per_sequence(result, b))
        out.append({"a": a, "b": b, "windows": len(per_sequence(result, a)["tokens"]),
                    "tokens": int(sum(per_sequence(result, a)["tokens"])), **d})
    return out


def table(rows: list[dict]) -> str:
    def ci(x):
        return f"[{x[0]:+.3g}, {x[1]:+.3g}]"

    lines = ["| A | B | windows | Δ ppl increase, pp [95%] | Δ KL [95%] | KL ratio B/A − 1 [95%] | Δ top-1 [95%] |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        p, k, t = r["ppl_increase_pct"], r["kl"], r["top1"]
        lines.append(f"| `{r['a']}` | `{r['b']}` | {r['windows']} | {p['diff']:+.3g} {ci(p['ci95'])} | "
                     f"{k['diff']:+.3g} {ci(k['ci95'])} | {100 * k['ratio']:+.1f}% "
                     f"[{100 * k['ratio_ci95'][0]:+.1f}%, {100 * k['ratio_ci95'][1]:+.1f}%] | "
                     f"{t['diff']:+.3g} {ci(t['ci95'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("eval_json", type=Path, nargs="+", help="eval JSONs of the same windows and calibration")
    ap.add_argument("--pairs", nargs="+", required=True, metavar="A:B",
                    help="codec names of one row pair, B compared to A")
    ap.add_argument("--json", type=Path, help="also write the differences here")
    ap.add_argument("--by-setup", action="store_true",
                    help="pair results of other algorithms or error feedback: rows are named CODEC@ALGORITHM[+ef[=MODE]]")
    ap.add_argument("--by-calibration", action="store_true",
                    help="pair results of other calibrations (same windows and baseline): rows are named CODEC@FILESTEM")
    args = ap.parse_args(argv)
    pairs = []
    for p in args.pairs:
        a, sep, b = p.partition(":")
        if not sep or not a or not b:
            ap.error(f"pair {p!r} is not A:B")
        pairs.append((a, b))
    try:
        labels = None
        if args.by_calibration:  # the file's stem, or parent/stem where two files share a stem (runA/eval.json)
            stems = [p.stem for p in args.eval_json]
            labels = [f"{p.parent.name}/{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in args.eval_json]
        result = merge_results([json.loads(p.read_text()) for p in args.eval_json], by_setup=args.by_setup,
                               labels=labels)
    except (OSError, ValueError) as e:  # a missing or unreadable file, or not JSON: one line
        raise SystemExit(f"error: {e}") from None
    rows = compare(result, pairs)
    print(table(rows))
    if args.json:
        args.json.write_text(json_text({"sources": [str(p) for p in args.eval_json], "pairs": rows}, indent=1)
                             + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
