"""The multi-codec bit allocation: budget kept, and the plan matches an exhaustive search."""
import itertools
import math

import pytest
import torch

from lowbit_tp.calibration.allocate import allocate_many
from lowbit_tp.calibration.synthetic import synthetic_calibration

CODECS = ("rot-lm3-g64-lg8-k4", "rot-lm4-g64-lg8-k4", "rot-int5-g64-lg8-k4", "rot-int6-g64-lg8-k4")


def _bits(e):
    # independent: 4 bf16 channels, b-bit codes, one lg8 byte per 64 values + a bf16 base per token
    return {c: b + (4 * 16 + 8 * math.ceil(e / 64) + 16) / e for c, b in zip(CODECS, (3, 4, 5, 6))}


@pytest.mark.parametrize("budget", [3.3, 4.0, 4.25, 4.6, 5.5])
def test_allocate_many_matches_brute_force(budget):
    layers = [f"l{i}" for i in range(5)]
    cal = synthetic_calibration(layers, world=2, hidden=576)
    g = torch.Generator().manual_seed(1)
    sens = {l: float(v) for l, v in zip(layers, torch.rand(5, generator=g) * torch.tensor([1, 10, 1, 0.1, 3]))}
    # error energy falls 4x per bit (6 dB), with a per-layer wobble
    errs = {l: {c: 4.0 ** -(i + float(torch.rand(1, generator=g)) * 0.3) for i, c in enumerate(CODECS)} for l in layers}
    plan = allocate_many(sens, errs, reference="rot-lm4-g64-lg8-k4", codecs=CODECS, budget=budget, calibration=cal)
    bits = _bits(576)
    assert plan["mean_bits"] == pytest.approx(sum(bits[plan["layers"][l]] for l in layers) / 5)
    assert plan["mean_bits"] <= budget + 1e-9

    def cost(choice):
        return sum(sens[l] * errs[l][c] / errs[l]["rot-lm4-g64-lg8-k4"] for l, c in zip(layers, choice))

    feasible = [ch for ch in itertools.product(CODECS, repeat=5) if sum(bits[c] for c in ch) / 5 <= budget + 1e-9]
    best = min(cost(ch) for ch in feasible)
    got = cost([plan["layers"][l] for l in layers])
    assert plan["predicted_kl"] == pytest.approx(got)
    # greedy on (near-)convex per-layer curves: within 5% of the exhaustive optimum here
    assert got <= best * 1.05 + 1e-12


def test_allocate_many_refuses_a_budget_below_the_cheapest_codec():
    cal = synthetic_calibration(["a"], world=2, hidden=576)
    with pytest.raises(ValueError, match="below the cheapest"):
        allocate_many({"a": 1.0}, {"a": {c: 1.0 for c in CODECS}}, reference=CODECS[1], codecs=CODECS, budget=3.0,
                      calibration=cal)
