"""Which held-out windows an evaluation reads, and whether they avoid windows already looked at.

    python scripts/heldout_windows.py --samples 64 --seed 10 --against-seed 1 --against-samples 64

For each model (default: both registry models), draws the ``--split test`` windows that
``lowbit-tp eval --samples N --seed S`` reads (same code path: ``chunk_tokens`` on the
held-out plays), and those of ``--against-seed`` / ``--against-samples``, prints the
windows shared by the two draws and exits 1 if there are any. Only tokenizers are loaded.

Why: the default codec was chosen on the 16 windows of ``--samples 16 --seed 1`` (and
Gemma's tables on the first 8 of them), and on these plays ``random.Random(seed).sample``
draws a larger count of the same seed as a *superset* of a smaller one (seed 1's first 16
of 64 are the 16; ``--seed 1 --samples 16`` against 64 shows it), so a larger ``--samples``
alone would still contain the tuned-on windows. A different
seed whose windows share none with seed 1's is untouched text.
"""
from __future__ import annotations

import argparse
import sys

from lowbit_tp.data import chunk_tokens, load_split
from lowbit_tp.models import load_tokenizer


def windows(tokenizer, docs, *, samples: int, seed: int, seq_len: int) -> list[tuple[str, int]]:
    chunks = chunk_tokens(tokenizer, docs, num_samples=samples, seq_len=seq_len, seed=seed)
    return [(p["doc"], p["token_start"]) for p in chunks.provenance]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", help="default: smollm2-135m and gemma3-270m")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seed", type=int, default=10)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--against-seed", type=int, default=1)
    ap.add_argument("--against-samples", type=int, default=64)
    ap.add_argument("--list", action="store_true", help="print every window of the draw")
    args = ap.parse_args()
    docs = load_split(None).evaluation
    shared_any = False
    for model in args.model or ["smollm2-135m", "gemma3-270m"]:
        tok = load_tokenizer(model)
        new = windows(tok, docs, samples=args.samples, seed=args.seed, seq_len=args.seq_len)
        old = windows(tok, docs, samples=args.against_samples, seed=args.against_seed, seq_len=args.seq_len)
        shared = sorted(set(new) & set(old))
        shared_any |= bool(shared)
        print(f"{model}: --samples {args.samples} --seed {args.seed} -> {len(new)} windows of {args.seq_len} "
              f"tokens; shared with --samples {args.against_samples} --seed {args.against_seed}: {len(shared)}"
              + "".join(f"\n  shared: {d} @ token {s}" for d, s in shared))
        if args.list:
            for d, s in new:
                print(f"  {d} @ token {s}")
    return 1 if shared_any else 0


if __name__ == "__main__":
    sys.exit(main())
