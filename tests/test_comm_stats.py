"""What the byte counters report: all bytes sent per value, ring-equivalent bits, world size 1."""
import pytest
import torch

from lowbit_tp.calibration.synthetic import planted_partials, synthetic_calibration
from lowbit_tp.codecs import make_codec
from lowbit_tp.collectives import CommStats, all_reduce, simulate_all_reduce, spawn_ranks

LAYER = "layers.0.o_proj"
HIDDEN = 192


def _bits(codec, rows):
    """A codec's payload bits per value, from its byte size alone."""
    return 8 * codec.payload_nbytes((rows, HIDDEN), LAYER) / (rows * HIDDEN)


def test_two_shot_counts_both_stages_and_ring_equivalent_bits():
    world, tokens = 3, 12  # 4 rows per chunk, no padding
    cal = synthetic_calibration([LAYER], world=world, hidden=HIDDEN, tokens=32, batches=2)
    partials = planted_partials(world, tokens, HIDDEN, seed=0, noise_seed=5)
    two = make_codec("rot-lm4-g64+sum8", calibration=cal)
    b1, b2 = _bits(two.first, 4), _bits(two.second, 4)
    assert b2 > 8 > 4 < b1 < 5
    st = CommStats()
    simulate_all_reduce(partials, two, "two-shot", layer=LAYER, stats=st)
    # each stage carries (N-1)/N of the values once: all bytes per value is the stages' mean
    assert st.bits_per_value == pytest.approx((b1 + b2) / 2)
    assert st.ring_equiv_bits == pytest.approx((b1 + b2) / 2)
    assert st.payload_bits_per_value == pytest.approx(b1)
    g = CommStats()
    simulate_all_reduce(partials, two, "gather", layer=LAYER, stats=g)
    # gather: N - 1 copies of a one-stage payload; a ring would send 2(N-1)/N of the message
    assert g.bits_per_value == pytest.approx(b1)
    assert g.ring_equiv_bits == pytest.approx(b1 * world / 2)
    e = CommStats()
    simulate_all_reduce(partials, make_codec("bf16"), "exact", layer=LAYER, stats=e)
    assert e.bits_per_value == pytest.approx(32.0, rel=1e-3)  # fp32 partials through the backend
    assert e.ring_equiv_bits == pytest.approx(32.0, rel=1e-3)
    total = CommStats()
    total.add(st)
    total.add(g)
    assert total.bytes_sent == st.bytes_sent + g.bytes_sent and total.by_algorithm == {"two-shot": 1, "gather": 1}


def _rank_world_one(rank, world):
    x = torch.randn(3, 8)
    y = all_reduce(x, make_codec("bf16"), algorithm="gather")
    return torch.equal(x, y), x.data_ptr() != y.data_ptr()


def test_world_size_one_returns_a_new_tensor():
    assert spawn_ranks(_rank_world_one, 1, timeout_s=20) == [(True, True)]
    x = torch.randn(3, 8)
    y = simulate_all_reduce([x], make_codec("int4-g32"))
    assert torch.equal(x, y) and y.data_ptr() != x.data_ptr()
