"""Diagnostic: how much of a codec's KL comes from the first position of each window?

Evaluates, on the dev split, ``CODEC`` and ``CODEC`` with the first row of every window
(the BOS / attention-sink position of the simulator's ``[batch * seq_len, E]`` messages)
sent exactly in bf16 (named ``CODEC+row0``; the extra bf16 row is counted in the bits).
Not a product codec: it relies on the simulator's row order (window-major).

    PYTHONPATH=. python scripts/first_token_probe.py --model smollm2-135m --tp 3 \\
        --calibration CAL.safetensors --codec rot-lm4-g64-lg8-k4 --samples 8
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from lowbit_tp.results import json_text


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--tp", type=int, required=True)
    ap.add_argument("--calibration", required=True)
    ap.add_argument("--codec", default="rot-lm4-g64-lg8-k4")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    import torch

    from lowbit_tp.calibration import Calibration
    from lowbit_tp.codecs import Codec, make_codec, register_codec
    from lowbit_tp.evaluation import EvalConfig, evaluate_codecs
    from lowbit_tp.evaluation.records import DEV_COLUMNS

    period = args.seq_len

    class FirstRowExact(Codec):
        needs_calibration = True

        def __init__(self, **kw):
            super().__init__(**kw)
            self.inner = make_codec(args.codec, calibration=self.calibration)
            self.name = f"{args.codec}+row0"

        def payload_nbytes(self, shape, layer=None):
            t, e = shape
            return self.inner.payload_nbytes(shape, layer) + 2 * ((t + period - 1) // period) * e

        def encode(self, x, *, layer=None, source=0, out=None):
            head = x[::period].to(torch.bfloat16).contiguous().view(torch.uint8).reshape(-1)
            p = torch.cat([self.inner.encode(x, layer=layer, source=source), head])
            return p if out is None else out.copy_(p)

        def decode(self, payload, shape, *, layer=None, source=0):
            n = self.inner.payload_nbytes(shape, layer)
            y = self.inner.decode(payload[:n], shape, layer=layer, source=source).clone()
            rows = y[::period].shape[0]
            y[::period] = payload[n:].view(torch.bfloat16).reshape(rows, shape[1]).float()
            return y

        def decode_sum(self, payloads, shape, *, layer=None, sources=None, out=None):
            sources = list(range(len(payloads))) if sources is None else list(sources)
            acc = None
            for p, s in zip(payloads, sources):
                y = self.decode(p, shape, layer=layer, source=s).float()
                acc = y if acc is None else acc + y
            return acc if out is None else out.copy_(acc)

        def _encode(self, x, params, nonfinite):  # pragma: no cover - encode() is overridden
            raise NotImplementedError

        def _decode(self, payload, shape, params):  # pragma: no cover
            raise NotImplementedError

    name = f"{args.codec}+row0"
    register_codec(name, FirstRowExact, needs_calibration=True)
    cal = Calibration.load(args.calibration)
    # seed 1: the dev windows docs/design-dev.md reports (EvalConfig now defaults to 10)
    cfg = EvalConfig(model=args.model, tp=args.tp, codecs=(args.codec, name), split="dev", seed=1, samples=args.samples,
                     seq_len=args.seq_len, lambada=0)
    res = evaluate_codecs(cfg, calibration=cal)
    print(res.table(DEV_COLUMNS))
    if args.json:
        Path(args.json).write_text(json_text(res.to_json(), indent=1))


if __name__ == "__main__":
    main()
