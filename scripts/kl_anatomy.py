"""Where a codec's KL comes from, and what a few encoder ideas would save (dev work only).

On the first ``--windows`` *calibration* windows of the demo calibration (the artifact
records them, so ``eval --split dev`` never reads them):

1. the diagonal Fisher of the next-token distribution at every all-reduce output,
   ``F[t, j] = E_y (d log p(y) / d h[t, j])**2`` with ``y`` drawn from the model itself
   (``--draws`` draws; one backward pass each, summed over positions;
   ``lowbit_tp.calibration.fisher.diagonal_fisher``, the pass ``calibrate --fisher-weights``
   runs). Then
   ``0.5 * sum F * err**2 / T`` predicts the KL (per token) that an all-reduce error
   ``err`` at that layer causes; the script prints it next to the measured single-layer KL
   of ``measure.json`` (``alloc_study.py``) when ``--measure`` is given;
2. every layer's TP partials (``TPSimulator`` observer).

Screens, all as predicted KL of the whole model (sum over layers) with a codec of the
``rot-lm4-g64-lg8-k4`` family on every layer, on the *second* half of the windows (the
channel weights are fitted on the first half):

- ``reference``: the registered codec (gather all-reduce) - the baseline;
- ``fisher-weighted``: each rank's partial multiplied by a per-channel weight ``w`` before
  the codec and divided after (``lowbit_tp.calibration.weights.fisher_channel_weights``:
  ``w_j**2 ∝ sqrt(F_j / m_j)``, the minimiser of ``sum_j F_j E[err_j**2]`` when the rotated
  error is isotropic); no bytes added. ``m``: the mean square summed over ranks, one vector
  for all ranks, as the ``+fisher`` codecs do; ``fisher-weighted-per-rank``: each rank's own;
- ``scale-search``: each group's scale chosen among absmax × {1, .95, .9, .85, .8, .75}
  for least squared error (encoder-only; the decoder is unchanged);
- ``ecsq-*``: uniform scalar quantization of the rotated values with a step proportional to
  the token's rms and *ideal* entropy coding: the empirical entropy of the codes as the rate;
- the empirical entropy of the reference's own 4-bit codes;
- how the predicted KL spreads over layers, tokens and window positions.

With ``--eval-samples N`` it then evaluates the reference and ``REFERENCE+fisher`` (the
library codec, with weights from all ``--windows`` put into a copy of the calibration) on N
dev windows (seed 1), with intervals.

    PYTHONPATH=. python scripts/kl_anatomy.py --calibration CAL.safetensors \\
        --measure docs/dev/smollm2-tp3-measure.json --eval-samples 16 --json OUT.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from lowbit_tp.results import json_text, nan_for_null


def main(argv=None) -> None:
    from fisher_predictor import add_capture_args, load_capture

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_capture_args(ap)
    ap.add_argument("--reference", default="rot-lm4-g64-lg8-k4")
    ap.add_argument("--measure", help="alloc_study.py measure.json: compare with its measured single-layer KL")
    ap.add_argument("--eval-samples", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    import torch

    from lowbit_tp.calibration.fisher import diagonal_fisher
    from lowbit_tp.calibration.weights import fisher_channel_weights
    from lowbit_tp.codecs import make_codec
    from lowbit_tp.codecs.functional import fwht, hadamard_block
    from lowbit_tp.codecs.static import topk_channels
    from lowbit_tp.collectives import simulate_all_reduce
    from lowbit_tp.simulator import TPSimulator

    t0 = time.time()
    cal, model, tokenizer, info, ids, names, e = load_capture(args)

    # 1. diagonal Fisher at every all-reduce output (the layer's output), per token
    fisher = diagonal_fisher(model, ids, layers=names, draws=args.draws, seed=0, batch_size=len(ids), per_token=True)
    # 2. partials
    parts: dict = {}

    def observe(layer, partials, total):
        parts[layer] = (torch.stack([p.float() for p in partials]).clone(), total.float().clone())

    with torch.no_grad(), TPSimulator(model, tp=args.tp, observer=observe, name=info.name):
        model(ids)
    print(f"captured in {time.time() - t0:.0f} s", flush=True)

    t_all = ids.numel()
    half = t_all // 2
    fit, test = slice(0, half), slice(half, t_all)
    ref = make_codec(args.reference, calibration=cal)
    signs = ref.params(names[0], 0, e, "cpu").signs
    block = hadamard_block(e)
    levels = ref._levels
    bounds = (levels[1:] + levels[:-1]) / 2

    def kl(n, err, rows):
        return 0.5 * float((fisher[n][rows] * err.pow(2)).sum()) / err.shape[0]

    def channel_weights(n, rows, shared=True):
        """The +fisher codecs' weights (one vector for all ranks), or each rank its own."""
        ms = parts[n][0][:, rows].pow(2).mean(1)  # [tp, E]
        f = fisher[n][rows].mean(0)
        return fisher_channel_weights(f, ms.sum(0)).expand(args.tp, -1) if shared else fisher_channel_weights(f, ms)

    def entropy(code):
        h = torch.bincount((code - code.min()).reshape(-1).long()).float()
        p = h[h > 0] / h.sum()
        return float(-(p * p.log2()).sum())

    def kept(n, r):
        return topk_channels(cal.get(n, r).range, ref.num_kept(e))

    def rot_quant(x, o, mults=(1.0,)):
        """The reference's quantizer with exact (not lg8-rounded) scales, best of ``mults``."""
        x = x.clone()
        x[:, o] = 0
        z = fwht(x * signs, block)
        zg = z.reshape(z.shape[0], -1, ref.group)
        amax = zg.abs().amax(-1, keepdim=True).clamp_min(1e-30)
        best = None
        for m in mults:
            s = amax * m
            y = levels[torch.bucketize((zg / s).clamp(-1, 1), bounds)] * s
            err = (y - zg).pow(2).sum(-1, keepdim=True)
            best = (err, y) if best is None else (torch.minimum(err, best[0]), torch.where(err < best[0], y, best[1]))
        return best[1].reshape(z.shape)

    def unrot(z, xo, o):
        x = fwht(z, block) * signs
        x[:, o] = xo[:, o].bfloat16().float()
        return x

    steps = (0.9, 1.0, 1.1, 1.2, 1.35)
    pred = {"reference": 0.0, "reference-exact-scales": 0.0, "fisher-weighted": 0.0, "fisher-weighted-per-rank": 0.0,
            "scale-search": 0.0}
    pred.update({f"ecsq-{s}": 0.0 for s in steps})
    ecsq_bits = dict.fromkeys(steps, 0.0)
    code_entropy = []
    per_layer = {}
    tok = torch.zeros(t_all)
    for n in names:
        p, total = parts[n]
        y = simulate_all_reduce(list(p), ref, "gather", layer=n).float()
        err = y - total
        per_layer[n] = kl(n, err, slice(None))
        tok += 0.5 * (fisher[n] * err.pow(2)).sum(1) / t_all
        pred["reference"] += kl(n, err[test], test)
        ws, wr = channel_weights(n, fit), channel_weights(n, fit, shared=False)
        acc = {k: 0.0 for k in ("exact", "w", "wr", "ss")}
        acc_e = dict.fromkeys(steps, 0.0)
        for r in range(args.tp):
            x, o = p[r][test], kept(n, r)
            acc["exact"] = acc["exact"] + unrot(rot_quant(x, o), x, o)
            acc["ss"] = acc["ss"] + unrot(rot_quant(x, o, (1.0, .95, .9, .85, .8, .75)), x, o)
            xw = x * ws[r]
            acc["w"] = acc["w"] + unrot(rot_quant(xw, o), xw, o) / ws[r]
            xw = x * wr[r]
            acc["wr"] = acc["wr"] + unrot(rot_quant(xw, o), xw, o) / wr[r]
            xz = x.clone()
            xz[:, o] = 0
            z = fwht(xz * signs, block)
            # step = s * 2**-4 * 4 * token rms: about the 4-bit grid's step for a group absmax of 4 rms
            d = z.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-30) * 2 ** -2
            for s in steps:
                code = torch.round(z / (d * s))
                ecsq_bits[s] += entropy(code) / (args.tp * len(names))
                acc_e[s] = acc_e[s] + unrot(code * d * s, x, o)
            lv = torch.bucketize((z.reshape(z.shape[0], -1, ref.group)
                                  / z.reshape(z.shape[0], -1, ref.group).abs().amax(-1, keepdim=True).clamp_min(1e-30)
                                  ).clamp(-1, 1), bounds)
            code_entropy.append(entropy(lv))
        tt = total[test]
        pred["reference-exact-scales"] += kl(n, acc["exact"] - tt, test)
        pred["fisher-weighted"] += kl(n, acc["w"] - tt, test)
        pred["fisher-weighted-per-rank"] += kl(n, acc["wr"] - tt, test)
        pred["scale-search"] += kl(n, acc["ss"] - tt, test)
        for s in steps:
            pred[f"ecsq-{s}"] += kl(n, acc_e[s] - tt, test)
    srt = tok.sort(descending=True).values
    pos = tok.reshape(ids.shape)
    total_kl = sum(per_layer.values())
    top_layers = sorted(per_layer.items(), key=lambda kv: -kv[1])[:8]
    out = {
        "model": args.model, "tp": args.tp, "reference": args.reference, "windows": args.windows, "draws": args.draws,
        "tokens": t_all, "predicted_kl_held_out_half": {k: round(v, 5) for k, v in pred.items()},
        "ecsq_entropy_bits": {str(s): round(v, 3) for s, v in ecsq_bits.items()},
        "reference_code_entropy_bits": {"mean": round(sum(code_entropy) / len(code_entropy), 3),
                                        "min": round(min(code_entropy), 3), "max": round(max(code_entropy), 3)},
        "predicted_kl_all_windows": round(total_kl, 5),
        "top_layers_share": {n: round(v / total_kl, 3) for n, v in top_layers},
        "token_share": {f"top{int(f * 100)}pct": round(float(srt[: int(t_all * f)].sum() / srt.sum()), 3)
                        for f in (0.01, 0.05, 0.1)},
        "position0_share": round(float(pos[:, 0].sum() / pos.sum()), 3),
    }
    if args.measure:
        m = nan_for_null(json.loads(Path(args.measure).read_text())["sensitivity_kl"])
        out["fisher_vs_measured_single_layer_kl"] = {
            "fisher_sum": round(total_kl, 5), "measured_sum": round(sum(m.values()), 5),
            "corr_log": round(float(torch.corrcoef(torch.tensor([[per_layer[n] for n in names], [m[n] for n in names]]).log())[0, 1]), 3)}
    print(json.dumps(out, indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json_text(out, indent=1))

    if args.eval_samples:
        from lowbit_tp.evaluation import EvalConfig, evaluate_codecs

        weighted = cal.with_channel_weights({n: channel_weights(n, slice(None))[0] for n in names},
                                            {"method": "fisher", "source": "scripts/kl_anatomy.py",
                                             "windows": args.windows, "draws": args.draws})
        inner_name = args.reference
        cfg = EvalConfig(model=args.model, tp=args.tp, codecs=(inner_name, f"{inner_name}+fisher"), split="dev", seed=1,
                         samples=args.eval_samples, lambada=0)
        res = evaluate_codecs(cfg, bundle=(model, tokenizer, info), calibration=weighted)
        cols = ["codec", "split", "bits_per_value", "ppl_baseline", "ppl_increase_pct", "ppl_increase_pct_ci95",
                "kl", "kl_ci95", "top1", "top1_ci95"]
        print(res.table(cols))
        out["dev_eval"] = {"samples": args.eval_samples, "seed": 1,
                           "rows": [{c: r.to_json().get(c) for c in cols} for r in res.rows]}
    out["seconds"] = round(time.time() - t0)
    if args.json:
        Path(args.json).write_text(json_text(out, indent=1))


if __name__ == "__main__":
    main()
