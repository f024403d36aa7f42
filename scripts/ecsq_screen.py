"""Screen fixed-rate ECSQ against the rot-lm codecs by predicted KL (dev work only).

On the first ``--windows`` calibration windows (never read by ``eval --split dev``), the
Fisher predictor of ``fisher_predictor.py`` (the one ``kl_anatomy.py`` validated) gives the
KL per token that each codec's gather all-reduce error would cause, summed over layers,
with the codec on every layer. Measured on the second half of the windows; the empirical
code tables are fitted on the first half.

- references: registered ``rot-*`` codecs (``--references``), their real payloads;
- ``ecsq``: the real ``EcsqCodec`` (lowbit_tp/codecs/ecsq.py) at each ``--budgets`` value
  (all-in bits/value: kept bf16 channels, the bf16 step and padding included), with
  (a) ``gauss``: a Huffman table for Gaussian codes at the budget's rate, with each
  ``--roundings`` offset of the encoder, and (b) ``emp``: a Huffman table of the
  symmetrised code histogram of the first half (two refits), nearest rounding;
- at 3.5 and 4.25 bits, the references interpolated (log KL linear in bits between the two
  nearest references) for a comparison at equal bits.

    PYTHONPATH=. python scripts/ecsq_screen.py --calibration CAL.safetensors \\
        --json docs/dev/smollm2-tp3-ecsq-screen.json
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from lowbit_tp.results import json_text


def interpolate(points: list[tuple[float, float]], bits: float) -> float | None:
    """log KL linear in bits between the nearest references below and above ``bits``."""
    below = [p for p in points if p[0] <= bits]
    above = [p for p in points if p[0] >= bits]
    if not below or not above:
        return None
    (b0, k0), (b1, k1) = max(below), min(above)
    if b1 == b0:
        return k0
    w = (bits - b0) / (b1 - b0)
    return math.exp((1 - w) * math.log(k0) + w * math.log(k1))


def main(argv=None) -> None:
    from fisher_predictor import add_capture_args, load_capture

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_capture_args(ap)
    ap.add_argument("--budgets", type=float, nargs="+", default=[3.264, 3.5, 4.25, 4.264])
    ap.add_argument("--roundings", type=float, nargs="+", default=[0.5],
                    help="encoder rounding offsets tried with the Gaussian table (0.5 = nearest)")
    ap.add_argument("--references", nargs="+", default=["rot-lm3-g64-lg8-k4", "rot-lm3-g32-lg8-k4",
                                                         "rot-lm4-g64-lg8-k4", "rot-int5-g64-lg8-k4"])
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    import torch

    from fisher_predictor import diagonal_fisher, predicted_kl, tp_partials
    from lowbit_tp.codecs import make_codec
    from lowbit_tp.codecs.ecsq import HALF, EcsqCodec, choose_steps, design_gaussian_lengths, huffman_lengths
    from lowbit_tp.collectives import simulate_all_reduce

    t0 = time.time()
    cal, model, _, info, ids, names, e = load_capture(args)
    fisher = diagonal_fisher(model, ids, names, e, draws=args.draws)
    parts = tp_partials(model, ids, tp=args.tp, name=info.name)
    print(f"captured in {time.time() - t0:.0f} s", flush=True)
    t_all = ids.numel()
    fit, test = slice(0, t_all // 2), slice(t_all // 2, t_all)
    shape = (t_all - t_all // 2, e)

    def predict(codec) -> float:
        kl = 0.0
        for n in names:
            p, total = parts[n]
            y = simulate_all_reduce([q[test] for q in p], codec, "gather", layer=n).float()
            kl += predicted_kl(fisher[n], y - total[test], test)
        return kl

    rows = []
    for name in args.references:
        c = make_codec(name, calibration=cal)
        rows.append({"codec": name, "bits": round(c.bits_per_value(shape), 4), "predicted_kl": predict(c)})
        print(rows[-1], flush=True)
    refs = [(r["bits"], r["predicted_kl"]) for r in rows]

    def empirical(codec) -> list[int]:
        """Huffman lengths of the symmetrised histogram of ``codec``'s codes on the fit half."""
        hist = torch.zeros(2 * HALF + 1, dtype=torch.float64)
        for n in names:
            for r in range(args.tp):
                z = codec.rotated(parts[n][0][r][fit], layer=n, source=r)
                _, q = choose_steps(z, codec._lengths, 8 * codec.slot_bytes(e), HALF)
                hist += torch.bincount((q + HALF).reshape(-1), minlength=2 * HALF + 1).double()
        hist = (hist + hist.flip(0)) / 2
        return huffman_lengths((hist / hist.sum()).tolist())

    tables = {}
    for b in args.budgets:
        coded = 8 * (math.floor(b * e / 8 + 1e-9) - 2 * 4 - 2) / e  # EcsqCodec.slot_bytes at k = 4
        ratio, gauss = design_gaussian_lengths(coded, HALF)
        variants = {"gauss": gauss}
        c = EcsqCodec(bits=b, k=4, table=gauss, calibration=cal)
        emp = empirical(c)
        emp = empirical(EcsqCodec(bits=b, k=4, table=emp, calibration=cal))
        variants["emp"] = emp
        tables[str(b)] = {"coded_bits_per_value": round(coded, 4), "gauss_ratio": ratio, **variants}
        runs = [(f"gauss-r{o:g}", gauss, o) for o in args.roundings] + [("emp-r0.5", emp, 0.5)]
        for label, ln, offset in runs:
            c = EcsqCodec(bits=b, k=4, table=ln, rounding=offset, calibration=cal, name=f"ecsq{b:g}-{label}")
            used, hist = [], torch.zeros(2 * HALF + 1, dtype=torch.float64)
            for n in names:
                for r in range(args.tp):
                    z = c.rotated(parts[n][0][r][test], layer=n, source=r)
                    _, q = choose_steps(z, c._lengths, 8 * c.slot_bytes(e), HALF, offset=offset)
                    used.append(float(c._lengths[q + HALF].sum(1).double().mean()))
                    hist += torch.bincount((q + HALF).reshape(-1), minlength=2 * HALF + 1).double()
            pr = hist[hist > 0] / hist.sum()
            row = {"codec": c.name, "bits": round(c.bits_per_value(shape), 4), "predicted_kl": predict(c),
                   "code_bits_budget_per_value": round(coded, 4),
                   "code_bits_used_per_value": round(sum(used) / len(used) / e, 4),
                   # the same codes' empirical entropy: what an ideal coder would have spent
                   "code_entropy_bits_per_value": round(float(-(pr * pr.log2()).sum()), 4)}
            ref = interpolate(refs, row["bits"])
            if ref is not None:
                row["reference_interpolated_kl"] = ref
                row["vs_reference_pct"] = round(100 * (row["predicted_kl"] / ref - 1), 1)
            rows.append(row)
            print(row, flush=True)
    out = {"model": args.model, "tp": args.tp, "windows": args.windows, "draws": args.draws, "tokens": t_all,
           "held_out_tokens": shape[0], "hidden": e, "rows": rows, "tables": tables,
           "seconds": round(time.time() - t0)}
    if args.json:
        Path(args.json).write_text(json_text(out, indent=1))
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
