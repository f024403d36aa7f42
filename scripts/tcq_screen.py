"""Would trellis-coded quantization beat the ECSQ codecs on real partial sums? (dev work only)

docs/design-dev.md ("what a stronger quantizer would have to gain") puts the gap Gemma 3's
4.25-bit plan must close at 0.8-1.1 dB of mean squared error at equal bits, and says which
families could give it on paper. This script measures it on the model's own TP partials,
before anyone builds a codec:

1. the first ``--windows`` *calibration* windows (the artifact lists them, so
   ``eval --split dev`` never reads them) through the TP simulator: every layer's per-rank
   partials;
2. per rank and layer the ECSQ codecs' domain: the calibration's top-k channels left out
   (``--k``, the codecs' ``-k4``), the random-sign Hadamard rotation of the ``rot-*`` codecs,
   each token row divided by its RMS (the ECSQ step is proportional to it);
3. on those values, pooled over the sampled layers and ranks, two quantizers with *ideal*
   entropy coding (the empirical entropy of their symbols as the rate), over a sweep of steps:

   - ``ecsq``: ``q = round(u / step)``, reconstruction ``q * step`` (the ECSQ codecs' rule);
   - ``tcq-S``: trellis-coded quantization with S states (Marcellin and Fischer 1990): levels
     ``j * step``, split into four subsets by ``j mod 4``; the trellis (Ungerboeck's 1-D
     codes, parity checks ``h0, h1`` below) lets each state use the two subsets of one parity,
     and a Viterbi search per row picks the sequence of least squared error. Its symbols are
     ``(j - parity) / 2``, entropy-coded given the parity (the decoder follows the trellis).

   The rate-distortion curves are compared at equal rate (``log2 MSE`` interpolated in the
   rate): the gain in dB at ``--rates``. The same is run on i.i.d. Gaussian values as a
   check against the textbook figures (ECSQ 1.53 dB above the Gaussian bound at high rate).

MSE-only Viterbi and midpoint reconstruction: a lower bound on what an entropy-constrained
trellis quantizer (a rate term in the search, centroid levels) would give. A screen to decide
what to build, not a codec: no bytes, no payload format.

    PYTHONPATH=. python scripts/tcq_screen.py --model gemma3-270m --tp 2 \\
        --calibration CAL.safetensors --json docs/dev/gemma3-tcq-screen.json
"""
from __future__ import annotations

import argparse
import math
import time

import torch

# Ungerboeck's 1-D (amplitude) trellis codes: states -> (h0, h1) parity-check polynomials, octal
# (bit i is the coefficient of D^i). TCQ uses the same trellises.
TRELLIS = {4: (0o5, 0o2), 8: (0o13, 0o04), 16: (0o23, 0o04), 32: (0o45, 0o10), 64: (0o103, 0o024),
           128: (0o235, 0o126), 256: (0o515, 0o362)}


def trellis(states: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(parity [S], next_state [S, 2])`` of the systematic feedback encoder of
    ``TRELLIS[states]`` in observer canonical form: registers ``r_1..r_nu`` (``r_1`` the
    state's lowest bit), output parity ``y0 = r_1``, input ``y1`` (the second subset bit), and
    ``r_i <- r_{i+1} ^ h0_i y0 ^ h1_i y1``, so ``h0(D) y0(D) = h1(D) y1(D)``."""
    nu = int(math.log2(states))
    h0, h1 = TRELLIS[states]
    parity = torch.tensor([s & 1 for s in range(states)])
    nxt = torch.empty(states, 2, dtype=torch.long)
    for s in range(states):
        r = [(s >> i) & 1 for i in range(nu)]  # r[0] = r_1
        y0 = r[0]
        for y1 in (0, 1):
            new = [(r[i + 1] if i + 1 < nu else 0) ^ (((h0 >> (i + 1)) & 1) & y0) ^ (((h1 >> (i + 1)) & 1) & y1)
                   for i in range(nu)]
            nxt[s, y1] = sum(b << i for i, b in enumerate(new))
    return parity, nxt


def nearest_in_subset(u: torch.Tensor, step: float, subset: int) -> torch.Tensor:
    """The integer ``j = subset (mod 4)`` nearest to ``u / step``."""
    return torch.round((u / step - subset) / 4) * 4 + subset


def tcq(u: torch.Tensor, step: float, states: int) -> torch.Tensor:
    """Trellis-coded quantization of each row of ``u`` [rows, n] (one trellis path per row,
    starting in state 0): the level indices ``j`` [rows, n] of the least-squared-error path."""
    parity, nxt = trellis(states)
    rows, n = u.shape
    # predecessors: each state is entered by exactly two (state, y1) branches
    pred = [[] for _ in range(states)]
    for s in range(states):
        for y1 in (0, 1):
            pred[int(nxt[s, y1])].append((s, y1))
    if any(len(p) != 2 for p in pred):
        raise ValueError(f"the {states}-state trellis is not a rate-1/2 trellis")
    pa = torch.tensor([p[0][0] for p in pred])
    pb = torch.tensor([p[1][0] for p in pred])
    da = torch.tensor([2 * p[0][1] + int(parity[p[0][0]]) for p in pred])  # subset of each branch
    db = torch.tensor([2 * p[1][1] + int(parity[p[1][0]]) for p in pred])
    metric = torch.full((rows, states), math.inf, dtype=u.dtype)
    metric[:, 0] = 0.0
    choice = torch.empty(n, rows, states, dtype=torch.bool)  # True: came by the second branch
    for t in range(n):
        j = torch.stack([nearest_in_subset(u[:, t], step, d) for d in range(4)], 1)  # [rows, 4]
        cost = (u[:, t:t + 1] - j * step).pow(2)
        a = metric[:, pa] + cost[:, da]
        b = metric[:, pb] + cost[:, db]
        choice[t] = b < a
        metric = torch.minimum(a, b)
    out = torch.empty(rows, n, dtype=u.dtype)
    s = metric.argmin(1)
    for t in range(n - 1, -1, -1):
        c = choice[t].gather(1, s[:, None])[:, 0]
        prev = torch.where(c, pb[s], pa[s])
        d = torch.where(c, db[s], da[s])  # the subset of the branch taken into s
        j = torch.stack([nearest_in_subset(u[:, t], step, k) for k in range(4)], 1)
        out[:, t] = j.gather(1, d[:, None])[:, 0]
        s = prev
    return out


def entropy_bits(symbols: torch.Tensor) -> float:
    """Empirical entropy (bits per symbol) of integer-valued ``symbols``."""
    _, counts = torch.unique(symbols.reshape(-1), return_counts=True)
    p = counts.double() / counts.sum()
    return float(-(p * p.log2()).sum())


def tcq_rate(j: torch.Tensor) -> float:
    """Bits per value of the TCQ symbols ``(j - parity) / 2`` coded given their parity (which
    the decoder knows from the trellis state): ``sum_parity P(parity) H(symbol | parity)``."""
    odd = (j.remainder(2) != 0)
    total = j.numel()
    rate = 0.0
    for mask in (odd, ~odd):
        m = int(mask.sum())
        if m:
            rate += m / total * entropy_bits(torch.div(j[mask] - mask[mask].long(), 2, rounding_mode="floor"))
    return rate


def curve(u: torch.Tensor, steps: list[float], method: str) -> list[dict]:
    """``[{step, rate, mse}]`` of ``method`` ('ecsq' or 'tcq-S') on the rows of ``u``."""
    out = []
    for step in steps:
        if method == "ecsq":
            q = torch.round(u / step)
            rate, mse = entropy_bits(q), float((u - q * step).pow(2).mean())
        else:
            j = tcq(u, step, int(method.split("-")[1]))
            rate, mse = tcq_rate(j), float((u - j * step).pow(2).mean())
        out.append({"step": step, "rate": rate, "mse": mse})
    return out


def mse_at(points: list[dict], rate: float) -> float | None:
    """``MSE`` at ``rate`` by linear interpolation of ``log2 MSE`` in the rate; None outside."""
    pts = sorted(points, key=lambda p: p["rate"])
    for lo, hi in zip(pts, pts[1:]):
        if lo["rate"] <= rate <= hi["rate"] and hi["rate"] > lo["rate"]:
            w = (rate - lo["rate"]) / (hi["rate"] - lo["rate"])
            return 2 ** ((1 - w) * math.log2(lo["mse"]) + w * math.log2(hi["mse"]))
    return None


def compare(u: torch.Tensor, methods: list[str], rates: list[float], steps: list[float]) -> dict:
    curves = {m: curve(u, steps, m) for m in ["ecsq", *methods]}
    table = []
    for r in rates:
        ref = mse_at(curves["ecsq"], r)
        row = {"rate": r, "ecsq_mse": ref, "gaussian_bound_mse": 2 ** (-2 * r)}
        for m in methods:
            got = mse_at(curves[m], r)
            row[f"{m}_mse"] = got
            row[f"{m}_gain_db"] = None if got is None or ref is None else 10 * math.log10(ref / got)
        row["ecsq_above_gaussian_bound_db"] = None if ref is None else 10 * math.log10(ref / row["gaussian_bound_mse"])
        table.append(row)
    return {"values": u.numel(), "curves": curves, "table": table}


def rotated_rows(args) -> torch.Tensor:
    """The ECSQ codecs' domain on the model's partials: [rows, E], each row of unit RMS."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fisher_predictor import load_capture, tp_partials

    from lowbit_tp.codecs import make_codec
    from lowbit_tp.codecs.functional import fwht, hadamard_block
    from lowbit_tp.codecs.static import topk_channels

    cap = load_capture(args)
    args.calibration_fingerprint = cap.cal.fingerprint()
    parts = tp_partials(cap.model, cap.ids, tp=args.tp, name=cap.info.name)
    e = cap.hidden
    codec = make_codec(args.codec, calibration=cap.cal)
    block = hadamard_block(e)
    names = cap.names[::args.layer_stride]
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n in names:
        partials = parts[n][0]  # [tp, tokens, E]
        for r in range(args.tp):
            x = partials[r].reshape(-1, e).double().clone()
            x[:, topk_channels(cap.cal.get(n, r).range, args.k)] = 0
            signs = codec.params(n, r, e, "cpu").signs.double()
            z = fwht(x * signs, block)
            z = z / z.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-30)
            pick = torch.randperm(z.shape[0], generator=gen)[:args.rows_per_layer]
            rows.append(z[pick])
    print(f"{len(names)} layers x {args.tp} ranks, {sum(r.shape[0] for r in rows)} rows of {e}", flush=True)
    return torch.cat(rows).double()


def main(argv=None) -> int:
    from fisher_predictor import add_capture_args

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_capture_args(ap)
    ap.add_argument("--codec", default="rot-ecsq4.25-k4", help="whose rotation (random signs) to use")
    ap.add_argument("--k", type=int, default=4, help="kept channels, left out (the codecs' -k4)")
    ap.add_argument("--layer-stride", type=int, default=4, help="every Nth row-parallel layer")
    ap.add_argument("--rows-per-layer", type=int, default=32, help="token rows drawn per layer and rank")
    ap.add_argument("--states", default="8,256", help="trellis sizes, comma-separated (of 4..256)")
    ap.add_argument("--rates", default="3.5,3.875,4.125,4.5", help="bits/value at which to compare")
    ap.add_argument("--gaussian-rows", type=int, default=256, help="i.i.d. Gaussian rows for the check")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    methods = [f"tcq-{int(s)}" for s in args.states.split(",")]
    rates = [float(r) for r in args.rates.split(",")]
    steps = [2 ** (-k / 4) for k in range(3, 19)]  # 0.59 .. 0.044 of the RMS: ECSQ ~3 to ~6.5 bits, TCQ ~2 to ~5.5
    t0 = time.time()
    u = rotated_rows(args)
    result = {"command": "python scripts/tcq_screen.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
              "model": args.model, "tp": args.tp, "windows": args.windows,
              "calibration_fingerprint": args.calibration_fingerprint, "k": args.k, "rotation_of": args.codec,
              "partials": compare(u, methods, rates, steps)}
    g = torch.randn(args.gaussian_rows, u.shape[1], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    result["gaussian_iid"] = compare(g, methods, rates, steps)
    result["seconds"] = time.time() - t0
    for what in ("partials", "gaussian_iid"):
        print(f"{what} ({result[what]['values']} values): gain over ECSQ at equal rate, dB")
        for row in result[what]["table"]:
            gains = ", ".join(f"{m} {row[f'{m}_gain_db']:+.2f}" if row[f"{m}_gain_db"] is not None else f"{m} -"
                              for m in methods)
            above = row["ecsq_above_gaussian_bound_db"]
            print(f"  {row['rate']:.3f} bits: {gains}; ECSQ {above:.2f} dB above the Gaussian bound"
                  if above is not None else f"  {row['rate']:.3f} bits: {gains}")
    if args.json:
        from pathlib import Path

        from lowbit_tp.results import json_text

        Path(args.json).write_text(json_text(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
