"""Dev screen: predicted KL of Fisher channel weights, per-rank vs one vector shared by all ranks (rot-lm4-g64-lg8-k4 by default).

SmolLM2 TP 3, the first 4 calibration windows of CAL (never dev/test windows), 4 label
draws; weights fitted on the first half of the tokens, predicted KL (0.5 sum F err**2 / T)
on the second half, with the registered codec (reference backend).

    PYTHONPATH=. python scripts/fisher_shared_screen.py [CODEC] [CAL]
"""
import json, sys, time
import torch
from lowbit_tp.calibration import Calibration
from lowbit_tp.codecs import make_codec
from lowbit_tp.codecs.static import topk_channels
from lowbit_tp.collectives import simulate_all_reduce
from lowbit_tp.data import chunk_tokens, load_split
from lowbit_tp.models import load_model
from lowbit_tp.simulator import TPSimulator

CAL = sys.argv[2] if len(sys.argv) > 2 else "/root/.cache/lowbit_tp/smollm2-135m-tp3-s32-b179c9523d0e.safetensors"
torch.manual_seed(0)
t0 = time.time()
cal = Calibration.load(CAL)
model, tok, info = load_model("smollm2-135m", progress=False)
cc = cal.meta["text"]["chunks"]
ch = chunk_tokens(tok, load_split(None).calibration, num_samples=cc["num_samples"], seq_len=cal.meta["config"]["seq_len"], seed=cal.meta["config"]["seed"])
assert ch.manifest()["samples"] == cc["samples"]
ids = ch.input_ids[:4]
names = list(cal.meta["layers"]); e = cal.hidden_size; tp = 3
mods = dict(model.named_modules()); outs = {}
def keep(n):
    def hook(m, i, o):
        o.retain_grad(); outs[n] = o
    return hook
hooks = [mods[n].register_forward_hook(keep(n)) for n in names]
hooks.append(model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True)))
fisher = dict.fromkeys(names, 0.0)
with torch.enable_grad():
    for _ in range(4):
        lp = torch.log_softmax(model(ids).logits.float(), -1)
        y = torch.distributions.Categorical(logits=lp.detach()).sample()
        lp.gather(-1, y.unsqueeze(-1)).sum().backward()
        for n in names:
            fisher[n] = fisher[n] + outs[n].grad.reshape(-1, e).pow(2) / 4
        outs.clear()
for h in hooks: h.remove()
parts = {}
def observe(layer, partials, total):
    parts[layer] = (torch.stack([p.float() for p in partials]).clone(), total.float().clone())
with torch.no_grad(), TPSimulator(model, tp=tp, observer=observe, name=info.name):
    model(ids)
print("captured", time.time() - t0, flush=True)
T = ids.numel(); half = T // 2; fit, test = slice(0, half), slice(half, T)
ref = make_codec(sys.argv[1] if len(sys.argv) > 1 else "rot-lm4-g64-lg8-k4", calibration=cal, backend="reference")
def kl(n, err, rows): return 0.5 * float((fisher[n][rows] * err.pow(2)).sum()) / err.shape[0]
def norm(w): return w / w.pow(2).mean(-1, keepdim=True).sqrt()
pred = {k: 0.0 for k in ("ref", "per-rank", "shared", "shared-excl-kept", "shared-clamp16")}
stats = []
for n in names:
    p, total = parts[n]
    f = fisher[n][fit].mean(0).clamp_min(1e-30)
    ms = p[:, fit].pow(2).mean(1)  # [N, E]
    kept = torch.zeros(tp, e, dtype=torch.bool)
    for r in range(tp):
        kept[r, topk_channels(cal.get(n, r).range, 4)] = True
    w_rank = norm((f.sqrt() / ms.sqrt().clamp_min(1e-20)).sqrt())
    w_sh = norm((f.sqrt() / ms.sum(0).sqrt().clamp_min(1e-20)).sqrt())
    msx = (ms * ~kept).sum(0)
    w_ex = norm((f.sqrt() / msx.clamp_min(msx[msx > 0].min()).sqrt()).sqrt())
    w_cl = norm(w_sh.clamp(w_sh.pow(2).mean().sqrt() / 16, None))
    w_cl = norm(w_cl.clamp(None, 16)); 
    stats.append((float(w_sh.max()/w_sh.min()), float(w_sh.max()), float(w_sh.min())))
    tt = total[test]
    acc = {k: 0.0 for k in pred}
    for r in range(tp):
        x = p[r][test]
        acc["ref"] = acc["ref"] + ref.roundtrip(x, layer=n, source=r)
        for k, w in (("per-rank", w_rank[r]), ("shared", w_sh), ("shared-excl-kept", w_ex), ("shared-clamp16", w_cl)):
            acc[k] = acc[k] + ref.roundtrip(x * w, layer=n, source=r) / w
    for k in pred:
        pred[k] += kl(n, acc[k] - tt, test)
print(json.dumps({k: round(v, 5) for k, v in pred.items()}))
print({k: round(v / pred["ref"] - 1, 4) for k, v in pred.items()})
s = torch.tensor(stats); print("shared w max/min ratio: median", float(s[:,0].median()), "max", float(s[:,0].max()), "wmax max", float(s[:,1].max()), "wmin min", float(s[:,2].min()))
print("seconds", time.time() - t0)
