"""Does error feedback along depth help a model with post-norms (Gemma 2/3)? A dev-split study.

In Gemma 3 each row-parallel output ``y_l`` goes through an RMSNorm before the residual add:
``h <- h + g_l * y_l / rms(y_l)`` (``g_l = 1 + weight``). An error ``E`` in ``y_l`` reaches the
residual as about ``g_l / rms(y_l) * E``, so the plain feedback of ``lowbit_tp.collectives.feedback``
(rank r adds ``-e_{l-1,r}`` to its next partial) cancels the previous error only where
``g_l / rms(y_l) = g_{l-1} / rms(y_{l-1})``. This script measures, on the dev split, with one
baseline and the same windows:

* ``off``: no feedback;
* ``plain``: the library's feedback unchanged (what ``--error-feedback`` would do);
* ``gain-oracle``: the carry mapped through the two norms, ``c_l = g_{l-1}/g_l * rms(y_l)/rms(y_{l-1}) * carry``
  (the ratio of gains clipped to [0, 8]), with ``rms(y_l)`` taken from the EXACT sum of the
  partials, which no rank knows: an upper bound for any mapping a rank could compute;
* ``gain-prev``: the same with ``rms(y_l)`` replaced by ``rms(y_{l-1})`` (what every rank
  knows after the previous all-reduce), i.e. only the per-channel gain ratio.

* ``carry-EST[@a=ALPHA,f=FLOOR,c=CAP]``: the self-correcting carry (stop 18): rank r keeps its
  share ``d_r`` of the residual error, sends ``c_r = -ALPHA * rms_est * d_r / g_l`` (0 on
  channels with ``|g_l| < FLOOR * median|g_l|``, clipped to ``CAP * rms(p_r)``), then adds
  ``J_l(yhat) (c_r + q_r)`` to ``d_r``. ``EST``: ``oracle`` (rms of the exact sum),
  ``own1`` (``sqrt(N) rms(p_r)``: what ``lowbit_tp.collectives.feedback.PostNormFeedback``
  does with f=0.3, c=2), ``own`` (``rms(p_r)`` times a per-layer ratio from the calibration's
  channel extremes), ``prev``/``prev1`` (the previous output's rms, with/without that ratio).

* ``library``: the library's own feedback, ``TPSimulator(..., error_feedback=True)``
  (``PostNormFeedback``: the ``own1`` estimate with f=0.3, c=2), so that the variants above,
  which carry their own copy of the maths, are compared with what ``--error-feedback`` does
  on the same windows in the same run.

The variants plug their own :class:`~lowbit_tp.tp.Reducer` into
:class:`~lowbit_tp.tp.RowParallelLinear` (the supported extension point).

    PYTHONPATH=. python scripts/ef_postnorm_study.py --model gemma3-270m --tp 2 \\
        --calibration /work/runs/gemma-tp2-s32.safetensors --codec default --samples 16 --seed 1 --json OUT.json
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from lowbit_tp.results import json_text


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--calibration", required=True)
    ap.add_argument("--codec", default="default")
    ap.add_argument("--algorithm", default="gather")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--modes", nargs="+", default=["off", "plain", "gain-oracle", "gain-prev"])
    ap.add_argument("--gain-floor", type=float, default=0.1,
                    help="carry modes: no compensation on channels whose |gain| < floor * median |gain| (mode option f=)")
    ap.add_argument("--no-projection", dest="projection", action="store_false",
                    help="carry modes: drop the norm Jacobian's projection term")
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    import torch

    from lowbit_tp.codecs import make_codec
    from lowbit_tp.collectives import simulate_all_reduce
    from lowbit_tp.collectives.algorithms import sum_in_rank_order
    from lowbit_tp.collectives.feedback import Feedback, FeedbackChain
    from lowbit_tp.configs import EvalConfig
    from lowbit_tp.evaluation.evaluate import eval_inputs
    from lowbit_tp.evaluation.metrics import LMComparison, paired_difference_ci
    from lowbit_tp.models import get_adapter, load_model
    from lowbit_tp.simulator import TPSimulator
    from lowbit_tp.tp.plan import swap_module
    from lowbit_tp.tp.row_parallel import RowParallelLinear, shard_weight

    cfg = EvalConfig(model=args.model, tp=args.tp, codecs=(args.codec,), algorithm=args.algorithm,
                     calibration=args.calibration, samples=args.samples, seed=args.seed, split="dev", lambada=0,
                     batch_size=args.batch_size)
    model, tokenizer, info = load_model(cfg.model)
    calibration, _split, chunks, _items, _ = eval_inputs(cfg, tokenizer, info)
    adapter = get_adapter(model, name=info.name)
    layers = adapter.row_parallel_layers(model)
    order = tuple(l.name for l in layers)

    def post_norm(name: str):
        block = name.rsplit(".", 2)[0]  # model.layers.i
        norm = "post_attention_layernorm" if name.endswith("o_proj") else "post_feedforward_layernorm"
        return model.get_submodule(f"{block}.{norm}")

    gains = {n: (1.0 + post_norm(n).weight.detach().float()) for n in order}
    eps = {n: float(getattr(post_norm(n), "eps", getattr(post_norm(n), "variance_epsilon", 1e-6))) for n in order}
    med_gain = {n: float(g.abs().median()) for n, g in gains.items()}

    def stat_norm(layer: str, src: str) -> float:
        """A per-layer size of ``src``'s output from the calibration's per-channel extremes."""
        st = calibration.get(layer, src)
        return float(torch.maximum(st.require("mean_min").abs(), st.require("mean_max").abs()).pow(2).mean().sqrt())

    # calibrated ratios: rms(sum)/rms(rank r's partial) at a layer; rms(sum_l)/rms(sum_{l-1})
    own_ratio = {(n, r): stat_norm(n, "sum") / stat_norm(n, r) for n in order for r in range(args.tp)}
    prev_ratio = {order[i]: stat_norm(order[i], "sum") / stat_norm(order[i - 1], "sum") for i in range(1, len(order))}

    def rms(x):
        return x.float().pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()

    def jvp(layer, yhat, v):
        """The post-norm's Jacobian at the decoded sum ``yhat`` applied to ``v`` (per token)."""
        y = yhat.float()
        m = y.pow(2).mean(-1, keepdim=True) + eps[layer]
        out = v - (y * v).mean(-1, keepdim=True) / m * y if args.projection else v
        return gains[layer] * out / m.sqrt()

    class CarryReducer:
        """Self-correcting carry in residual space: rank r keeps d_r (its share of the residual
        error so far), sends c_r = -alpha * rms_est / g_l * d_r, then d_r += J_l(yhat) (c_r + q_r)."""

        def __init__(self, mode: str):
            est, _, opts = mode.removeprefix("carry-").partition("@")
            kv = dict(o.split("=") for o in opts.split(",") if o)
            self.est, self.alpha = est, float(kv.get("a", 1.0))
            self.floor, self.cap = float(kv.get("f", args.gain_floor)), float(kv.get("c", 0.0))
            self.codec = make_codec(args.codec, calibration=calibration)
            self.d, self.prev_layer, self.prev_rms = None, None, None

        def reduce(self, partials, *, layer):
            partials = list(partials)
            i = order.index(layer)
            if i == 0 or self.prev_layer != order[i - 1]:
                self.d = None
            fb = [Feedback() for _ in partials]
            if self.d is not None:
                for r, f in enumerate(fb):
                    if self.est == "oracle":
                        est = rms(sum_in_rank_order(partials))
                    elif self.est == "own":
                        est = rms(partials[r]) * own_ratio[(layer, r)]
                    elif self.est == "own1":
                        est = rms(partials[r]) * args.tp ** 0.5
                    elif self.est == "prev":
                        est = self.prev_rms * prev_ratio[layer]
                    elif self.est == "prev1":
                        est = self.prev_rms
                    else:
                        raise SystemExit(f"unknown rms estimate {self.est!r}")
                    g = gains[layer]
                    ginv = torch.where(g.abs() >= self.floor * med_gain[layer], 1.0 / g, torch.zeros(()))
                    c = -self.alpha * est * ginv * self.d[r]
                    if self.cap > 0:  # what is not sent stays in d_r and is carried on
                        lim = self.cap * rms(partials[r])
                        c = torch.maximum(torch.minimum(c, lim), -lim)
                    f.carry = c
            out = simulate_all_reduce(partials, self.codec, args.algorithm, layer=layer, feedback=fb)
            new = []
            for r, f in enumerate(fb):
                step = (0.0 if f.carry is None else f.carry) - f.next  # c_r + q_r (q_r = decoded - sent)
                new.append(jvp(layer, out, step) + (0.0 if self.d is None else self.d[r]))
            self.d, self.prev_layer, self.prev_rms = new, layer, rms(out)
            return out

    class StudyReducer:
        def __init__(self, mode: str):
            self.mode, self.codec = mode, make_codec(args.codec, calibration=calibration)
            self.chain = None if mode == "off" else FeedbackChain(order, ranks=args.tp)
            self.prev: tuple[str, torch.Tensor] | None = None  # (layer, rms of its decoded output per token)

        def reduce(self, partials, *, layer):
            partials = list(partials)
            if self.chain is None:
                return simulate_all_reduce(partials, self.codec, args.algorithm, layer=layer)
            fb = self.chain.start(layer)
            if fb[0].carry is not None and self.mode != "plain":
                prev_layer, prev_rms = self.prev
                ratio = (gains[prev_layer] / gains[layer]).clamp(0.0, 8.0)
                if self.mode == "gain-oracle":
                    exact = sum_in_rank_order(partials)
                    rms = exact.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
                else:
                    rms = prev_rms
                for f in fb:
                    f.carry = f.carry * ratio * (rms / prev_rms)
            out = simulate_all_reduce(partials, self.codec, args.algorithm, layer=layer, feedback=fb)
            self.chain.finish(layer, fb)
            self.prev = (layer, out.float().pow(2).mean(-1, keepdim=True).add(1e-6).sqrt())
            return out

    originals = {l.name: model.get_submodule(l.name) for l in layers}

    def install(reducer):
        for l in layers:
            lin = originals[l.name]
            shards = adapter.input_shards(l, args.tp)
            w = lin.weight.detach()
            new = RowParallelLinear([shard_weight(w, s) for s in shards],
                                    None if lin.bias is None else lin.bias.detach(), shards=shards, name=l.name,
                                    reducer=reducer)
            swap_module(model, l.name, new)

    def restore():
        for name, lin in originals.items():
            swap_module(model, name, lin)

    comps = {m: LMComparison() for m in args.modes}
    t0 = time.perf_counter()
    with torch.no_grad():
        for ids in chunks.input_ids.split(args.batch_size):
            base = model(ids).logits
            for m in args.modes:
                if m == "library":
                    with TPSimulator(model, tp=args.tp, codec=make_codec(args.codec, calibration=calibration),
                                     algorithm=args.algorithm, error_feedback=True):
                        comps[m].update(ids, base, model(ids).logits)
                    continue
                install(CarryReducer(m) if m.startswith("carry-") else StudyReducer(m))
                try:
                    comps[m].update(ids, base, model(ids).logits)
                finally:
                    restore()
    rows = []
    for m in args.modes:
        r = comps[m].result()
        rows.append({"mode": m, "codec": args.codec, **{k: r[k] for k in ("ppl_baseline", "ppl", "kl", "kl_ci95",
                                                                            "top1", "ppl_increase_pct_ci95",
                                                                            "per_sequence")},
                     "ppl_increase_pct": 100.0 * (r["ppl"] / r["ppl_baseline"] - 1.0)})
        print(f"{m:12s} ppl +{rows[-1]['ppl_increase_pct']:.2f}% {r['ppl_increase_pct_ci95']}  KL {r['kl']:.4f} "
              f"{r['kl_ci95']}  top1 {r['top1']:.3f}", flush=True)
    base_row = next((r for r in rows if r["mode"] == "off"), None)
    paired = []
    if base_row is not None:  # each mode against no feedback on the same windows (paired bootstrap)
        for r in rows:
            if r is not base_row:
                try:
                    d = paired_difference_ci(base_row["per_sequence"], r["per_sequence"])
                except Exception as exc:  # keep the rows even if the comparison fails
                    print(f"paired comparison of {r['mode']} failed: {exc}", flush=True)
                    continue
                paired.append({"a": "off", "b": r["mode"], **d})
                print(f"{r['mode']:12s} - off: ppl {d['ppl_increase_pct']}  KL ratio {d['kl']['ratio']} "
                      f"{d['kl']['ratio_ci95']}", flush=True)
    out = {"args": vars(args), "windows": chunks.manifest(), "calibration": calibration.fingerprint(),
           "seconds": round(time.perf_counter() - t0, 1), "rows": rows,
           "paired_vs_off": paired}
    if args.json:
        Path(args.json).write_text(json_text(out, indent=1))


if __name__ == "__main__":
    main()
