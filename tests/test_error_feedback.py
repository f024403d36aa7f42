"""Error feedback along depth (lowbit_tp.collectives.feedback) against independent references.

References here: a two-step residual chain computed by hand (int4-g32 with a scale of
exactly 1, so every rounding is known), and an EF loop written from the definition with
``codec.roundtrip`` (rank r sends ``p_r + c_r``, keeps ``c_r <- sent - decoded``; in
two-shot the owner of a row chunk also keeps what re-encoding the chunk's sum lost).
"""
import re

import pytest
import torch

from lowbit_tp.calibration.synthetic import planted_partials, synthetic_calibration
from lowbit_tp.codecs import make_codec
from lowbit_tp.collectives import AutoPolicy, CommStats, all_reduce, simulate_all_reduce, spawn_ranks
from lowbit_tp.collectives.feedback import (Feedback, FeedbackChain, PostNorm, PostNormFeedback, compensate,
                                            feedback_of, postnorm_compensation, postnorm_share_update)
from lowbit_tp.tp.row_parallel import SimulatedReducer

E = 32  # one int4-g32 group per row


def _row(*pairs):
    """A [1, 32] row that is 0 except ``{index: value}``."""
    x = torch.zeros(1, E)
    for i, v in pairs:
        x[0, i] = v
    return x


# ------------------------------------------------------------------ hand-computed chain
# Every row holds a 7, so the group absmax is 7 and the fp16 scale absmax / 7 is exactly 1:
# int4-g32 rounds each value to the nearest integer (no ties below).
def test_two_step_residual_chain_by_hand():
    codec = make_codec("int4-g32")
    step1 = [_row((0, 7.0), (1, 0.4)), _row((0, 7.0), (2, 1.3))]
    step2 = [_row((0, 7.0), (1, 0.3)), _row((0, 7.0), (2, 0.4))]
    reducer = SimulatedReducer(codec=codec, feedback=FeedbackChain(("a", "b"), ranks=2))
    plain = SimulatedReducer(codec=codec)

    # step 1: 0.4 -> 0 and 1.3 -> 1 on both paths (nothing to feed back yet)
    y1 = reducer.reduce(step1, layer="a")
    assert torch.equal(y1, _row((0, 14.0), (2, 1.0)))
    assert torch.equal(plain.reduce(step1, layer="a"), y1)
    # step 2 without feedback: 0.3 -> 0, 0.4 -> 0
    assert torch.equal(plain.reduce(step2, layer="b"), _row((0, 14.0)))
    # with feedback rank 0 sends 0.3 + 0.4 = 0.7 -> 1, rank 1 sends 0.4 + 0.3 = 0.7 -> 1
    y2 = reducer.reduce(step2, layer="b")
    assert torch.equal(y2, _row((0, 14.0), (1, 1.0), (2, 1.0)))
    # The residual after both steps: exact [28, 0.7, 1.7]. Without feedback [28, 0, 1]
    # (both steps' errors, -0.7 each); with it [28, 1, 2]: only step 2's error, +0.3 each.
    exact = _row((0, 28.0), (1, 0.7), (2, 1.7))
    torch.testing.assert_close(y1 + y2 - exact, _row((1, 0.3), (2, 0.3)), rtol=0, atol=1e-6)


def test_chain_starts_over_at_every_forward_pass():
    codec = make_codec("int4-g32")
    parts = [_row((0, 7.0), (1, 0.4)), _row((0, 7.0), (2, 0.4))]
    order = ("l0.o", "l0.down", "l1.o")
    red = SimulatedReducer(codec=codec, feedback=FeedbackChain(order, ranks=2))
    first = red.reduce(parts, layer="l0.o")
    assert torch.equal(red.reduce(parts, layer="l0.down"), _row((0, 14.0), (1, 1.0), (2, 1.0)))  # compensated
    # a new forward pass (first layer again, here with another token count) starts clean
    three = [torch.cat([p, p, p]) for p in parts]
    assert torch.equal(red.reduce(three, layer="l0.o"), torch.cat([first] * 3))
    # a layer that does not follow the last one in the order gets no carry either
    red.reduce(parts, layer="l0.o")
    assert torch.equal(red.reduce(parts, layer="l1.o"), first)
    with pytest.raises(ValueError, match="not in the forward order"):
        red.reduce(parts, layer="nope")


def test_chain_validation():
    with pytest.raises(ValueError, match="none"):
        FeedbackChain(())
    with pytest.raises(ValueError, match="twice"):
        FeedbackChain(("a", "a"))
    chain = FeedbackChain(("a", "b"), ranks=2)
    fb = chain.start("a")
    with pytest.raises(ValueError, match="no compensation"):
        chain.finish("a", fb)  # the collective never set .next
    with pytest.raises(ValueError, match="carry of shape"):
        compensate(torch.zeros(2, 4), torch.zeros(3, 4))
    # error_feedback= takes False, True or "first-stage"; the chain's feedbacks carry its choice
    first = FeedbackChain(("a", "b"), ranks=2, owner_errors=False)
    assert [f.owner_error for f in first.start("a")] == [False, False] and not first.fresh().owner_errors
    assert [f.owner_error for f in chain.fresh().start("a")] == [True, True]
    from helpers import tiny_model
    from lowbit_tp.simulator import TPSimulator

    model = tiny_model("llama")
    for bad in ("yes", 1, "first_stage", None):
        with pytest.raises(ValueError, match=r"error_feedback must be one of False, True, 'first-stage', got"):
            TPSimulator(model, tp=2, codec="int4-g32", error_feedback=bad)
    assert not TPSimulator(model, tp=2, codec="int4-g32", error_feedback="first-stage").reducer.feedback.owner_errors
    assert TPSimulator(model, tp=2, codec="int4-g32", error_feedback=True).reducer.feedback.owner_errors


# ------------------------------------------------------------------ EF loop from its definition
def _reference_ef(steps, codec, algorithm, *, layer, owner_errors=True):
    """Outputs of a chain of all-reduces with error feedback, from codec.roundtrip only
    (``owner_errors=False``: two-shot's owners keep their second-stage errors out of it)."""
    world = len(steps[0])
    carries = [torch.zeros_like(steps[0][0]) for _ in range(world)]
    outs = []
    for parts in steps:
        sent = [p + c for p, c in zip(parts, carries)]
        if algorithm == "gather":
            dec = [codec.roundtrip(s, layer=layer, source=r) for r, s in enumerate(sent)]
            carries = [s - d for s, d in zip(sent, dec)]
            total = dec[0]
            for d in dec[1:]:
                total = total + d
            outs.append(total)
            continue
        t = sent[0].shape[0]
        rows = -(-t // world)
        pad = [torch.nn.functional.pad(s, (0, 0, 0, rows * world - t)) for s in sent]
        dec = [torch.cat([codec.roundtrip(c, layer=layer, source=r) for c in s.split(rows)]) for r, s in enumerate(pad)]
        carries = [(s - d)[:t] for s, d in zip(pad, dec)]
        stitched = []
        for j in range(world):
            chunk = dec[0][j * rows:(j + 1) * rows]
            for d in dec[1:]:
                chunk = chunk + d[j * rows:(j + 1) * rows]
            again = codec.roundtrip(chunk, layer=layer, source="sum")
            lo, hi = j * rows, min((j + 1) * rows, t)
            if hi > lo and owner_errors:
                carries[j][lo:hi] += (chunk - again)[:hi - lo]
            stitched.append(again)
        outs.append(torch.cat(stitched)[:t])
    return outs


def _steps(world, n=4, tokens=7, hidden=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(tokens, hidden, generator=g) * (1 + r) for r in range(world)] for _ in range(n)]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("algorithm", ["gather", "two-shot", "two-shot first-stage"])
def test_simulated_chain_equals_the_definition_and_telescopes(world, algorithm):
    """``two-shot first-stage``: only the ranks' own encode errors are fed back, so the
    residual keeps the owners' second-stage errors of every step, as without feedback."""
    algorithm, _, mode = algorithm.partition(" ")
    owner = mode != "first-stage"
    codec = make_codec("int4-g32")
    steps = _steps(world)
    ref = _reference_ef(steps, codec, algorithm, layer=None, owner_errors=owner)
    fbs = [Feedback() for _ in range(world)]
    h_ef, h_plain, h_exact = (torch.zeros(7, 64) for _ in range(3))
    st_ef, st_plain = CommStats(), CommStats()
    kept = torch.zeros(7, 64)  # first-stage: the second-stage errors that stay in the residual
    for i, parts in enumerate(steps):
        fbs = [Feedback(carry=f.next, owner_error=owner) for f in fbs]
        y = simulate_all_reduce(parts, codec, algorithm, feedback=fbs, stats=st_ef)
        torch.testing.assert_close(y, ref[i], rtol=0, atol=1e-5)
        h_ef += y
        h_plain += simulate_all_reduce(parts, codec, algorithm, stats=st_plain)
        h_exact += sum(parts)
        if not owner:  # this step's second-stage error: the output less what the ranks sent, decoded
            sent = [p + (0 if f.carry is None else f.carry) for p, f in zip(parts, fbs)]
            kept += y - (sum(sent) - sum(f.next for f in fbs))
        # the residual holds only the latest step's error: minus the ranks' next carries
        torch.testing.assert_close(h_ef - h_exact, kept - sum(f.next for f in fbs), rtol=0, atol=1e-5)
    assert (h_ef - h_exact).norm() < (0.75 if owner else 0.95) * (h_plain - h_exact).norm()
    assert st_ef.bytes_sent == st_plain.bytes_sent and st_ef.bits_per_value == st_plain.bits_per_value


def test_without_a_carry_the_result_is_bitwise_the_plain_one():
    cal = synthetic_calibration(["L"], world=3, hidden=192, tokens=32, batches=2)
    parts = planted_partials(3, 7, 192, seed=0, noise_seed=5)
    for name in ("int4-outlier", "rot-lm4-g64", "int4-g32"):
        codec = make_codec(name, calibration=cal)
        for algo in ("gather", "two-shot"):
            fbs = [Feedback() for _ in range(3)]
            got = simulate_all_reduce(parts, codec, algo, layer="L", feedback=fbs)
            assert torch.equal(got, simulate_all_reduce(parts, codec, algo, layer="L")), (name, algo)
            assert all(f.next is not None and f.next.dtype == torch.float32 for f in fbs)


def test_exact_and_world_one_sum_the_carry_and_leave_none():
    codec = make_codec("int4-g32")
    parts = [torch.ones(2, 8), 2 * torch.ones(2, 8)]
    fbs = [Feedback(carry=torch.full((2, 8), 0.5)), Feedback(carry=torch.full((2, 8), 0.25))]
    y = simulate_all_reduce(parts, codec, "exact", feedback=fbs)
    assert torch.equal(y, torch.full((2, 8), 3.75))
    assert all(torch.equal(f.next, torch.zeros(2, 8)) for f in fbs)
    one = [Feedback(carry=torch.full((2, 8), 0.5))]
    assert torch.equal(simulate_all_reduce(parts[:1], codec, "gather", feedback=one), torch.full((2, 8), 1.5))


def test_nonfinite_errors_are_never_fed_forward():
    assert torch.equal(feedback_of(torch.tensor([1.0, float("nan"), float("inf")]), torch.tensor([0.5, 1.0, 1.0])),
                       torch.tensor([0.5, 0.0, 0.0]))
    # bit for bit: NaN and both infinities become +0.0, a finite -0.0 error stays -0.0, and the
    # arguments are left as they were (the zeroing works in place on a temporary)
    sent = torch.tensor([1.0, float("nan"), float("inf"), float("-inf"), -0.0])
    dec = torch.tensor([0.5, 1.0, 1.0, 1.0, 0.0])
    keep = (sent.clone(), dec.clone())
    got = feedback_of(sent, dec)
    assert got.view(torch.int32).tolist() == torch.tensor([0.5, 0.0, 0.0, 0.0, -0.0]).view(torch.int32).tolist()
    assert torch.equal(sent.view(torch.int32), keep[0].view(torch.int32)) and torch.equal(dec, keep[1])
    codec = make_codec("int4-g32", nonfinite="propagate")
    parts = [torch.randn(3, 64), torch.randn(3, 64)]
    parts[0][1, 5] = float("nan")
    fbs = [Feedback(), Feedback()]
    y = simulate_all_reduce(parts, codec, "gather", feedback=fbs)
    assert torch.equal(torch.isnan(y), torch.isnan(simulate_all_reduce(parts, codec, "gather")))
    assert all(torch.isfinite(f.next).all() for f in fbs)
    # the "error" mode still refuses the NaN, carry or not
    with pytest.raises(FloatingPointError):
        simulate_all_reduce(parts, make_codec("int4-g32"), "gather", feedback=[Feedback(), Feedback()])


# ------------------------------------------------------------------ real ranks, bitwise
LAYERS = ("l0.o", "l0.down", "l1.o", "l1.down")
CODECS = ("int4-g32", "int4-outlier", "rot-lm4-g64")


def _cal(world):
    return synthetic_calibration(list(LAYERS), world=world, hidden=192, tokens=32, batches=2)


def _partials(world, layer_index):
    return planted_partials(world, 7, 192, seed=layer_index, noise_seed=40 + layer_index)


def _post_norm(world):
    """Synthetic post-norm gains (some near 0, one negative) for LAYERS."""
    gen = torch.Generator().manual_seed(5)
    norms = {}
    for l in LAYERS:
        g = torch.rand(192, generator=gen) * 6 - 0.3
        g[:3] = torch.tensor([1e-4, -2.0, 40.0])
        norms[l] = PostNorm(gain=g, eps=1e-6)
    return PostNormFeedback(norms=norms, tp=world)


def _rank_chain(rank, world):
    from lowbit_tp.tp.row_parallel import DistReducer

    cal, out = _cal(world), {}
    for algo in ("gather", "two-shot"):  # the post-norm chain: shares mapped through the norms
        red = DistReducer(codec=make_codec("int4-outlier", calibration=cal), algorithm=algo,
                          feedback=FeedbackChain(LAYERS, ranks=1, post_norm=_post_norm(world)))
        out[("post-norm", algo)] = [red.reduce([_partials(world, i)[rank]], layer=l) for i, l in enumerate(LAYERS)]
    for name in CODECS:
        for algo in ("gather", "two-shot"):
            red = DistReducer(codec=make_codec(name, calibration=cal), algorithm=algo,
                              feedback=FeedbackChain(LAYERS, ranks=1))
            out[(name, algo)] = [red.reduce([_partials(world, i)[rank]], layer=l) for i, l in enumerate(LAYERS)]
    red = DistReducer(codec=make_codec("int4-outlier", calibration=cal), algorithm="two-shot",
                      feedback=FeedbackChain(LAYERS, ranks=1, owner_errors=False))
    out["first-stage"] = [red.reduce([_partials(world, i)[rank]], layer=l) for i, l in enumerate(LAYERS)]
    # pipelined gather (rows in chunks of 2; each chunk's next carry written into its rows of
    # one): the same bits, on the group codecs' and the static codecs' feedback paths
    for name in ("int4-g32", "int4-outlier"):
        spare = torch.full((7, 192), 5.0)  # (written over with the next carry)
        fb = Feedback(carry=torch.randn(7, 192, generator=torch.Generator().manual_seed(rank)), spare=spare)
        y = all_reduce(_partials(world, 0)[rank], make_codec(name, calibration=cal), algorithm="gather",
                       policy=AutoPolicy(chunk_bytes=2 * 2 * 192), feedback=fb, layer=LAYERS[0])
        out["pipelined", name] = (y, fb.next.clone(), fb.next is spare)
    # a spare that is the carry's memory under another tensor object: left alone (whole message)
    c = torch.randn(7, 192, generator=torch.Generator().manual_seed(rank))
    keep = c.clone()
    fb = Feedback(carry=c, spare=c[:])
    y = all_reduce(_partials(world, 0)[rank], make_codec("int4-outlier", calibration=cal), algorithm="gather",
                   feedback=fb, layer=LAYERS[0])
    out["alias"] = (y, fb.next, torch.equal(c, keep))
    codec = make_codec("int4-g32")
    try:
        all_reduce(_partials(world, 0)[rank], codec, algorithm="two-shot", policy=AutoPolicy(chunk_bytes=2 * 2 * 192),
                   feedback=Feedback())
        out["refused"] = "no error"
    except ValueError as exc:
        out["refused"] = str(exc)
    # a carry of another shape (e.g. a stale one from a step with another token count), whole
    # or pipelined: refused before anything is sent (a longer one failed after the transfer, in
    # a TypeError or IndexError)
    out["bad carry"] = []
    for rows in (14, 3):
        for chunk in (0, 2 * 2 * 192):
            for algo in ("gather", "two-shot"):
                try:
                    all_reduce(_partials(world, 0)[rank], codec, algorithm=algo, policy=AutoPolicy(chunk_bytes=chunk),
                               feedback=Feedback(carry=torch.zeros(rows, 192)))
                    out["bad carry"].append("no error")
                except ValueError as exc:
                    out["bad carry"].append(str(exc))
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_runtime_chain_is_bitwise_the_simulated_chain(world):
    results = spawn_ranks(_rank_chain, world, timeout_s=60)
    cal = _cal(world)
    for name in CODECS:
        for algo in ("gather", "two-shot"):
            red = SimulatedReducer(codec=make_codec(name, calibration=cal), algorithm=algo,
                                   feedback=FeedbackChain(LAYERS, ranks=world))
            plain = SimulatedReducer(codec=make_codec(name, calibration=cal), algorithm=algo)
            for i, layer in enumerate(LAYERS):
                ref = red.reduce(_partials(world, i), layer=layer)
                for r in range(world):
                    assert torch.equal(results[r][(name, algo)][i], ref), (name, algo, layer, r)
                if i > 0:  # the feedback really acted
                    assert not torch.equal(ref, plain.reduce(_partials(world, i), layer=layer)), (name, algo, layer)
    red = SimulatedReducer(codec=make_codec("int4-outlier", calibration=cal), algorithm="two-shot",
                           feedback=FeedbackChain(LAYERS, ranks=world, owner_errors=False))
    full = SimulatedReducer(codec=make_codec("int4-outlier", calibration=cal), algorithm="two-shot",
                            feedback=FeedbackChain(LAYERS, ranks=world))
    for i, layer in enumerate(LAYERS):  # first-stage feedback on real ranks: the simulator's bits
        ref = red.reduce(_partials(world, i), layer=layer)
        for r in range(world):
            assert torch.equal(results[r]["first-stage"][i], ref), ("first-stage", layer, r)
        if i > 0:  # without the owners' errors the next layer rounds otherwise
            assert not torch.equal(ref, full.reduce(_partials(world, i), layer=layer)), ("first-stage", layer)
        else:
            full.reduce(_partials(world, i), layer=layer)
    for algo in ("gather", "two-shot"):
        red = SimulatedReducer(codec=make_codec("int4-outlier", calibration=cal), algorithm=algo,
                               feedback=FeedbackChain(LAYERS, ranks=world, post_norm=_post_norm(world)))
        plain = SimulatedReducer(codec=make_codec("int4-outlier", calibration=cal), algorithm=algo,
                                 feedback=FeedbackChain(LAYERS, ranks=world))
        for i, layer in enumerate(LAYERS):
            ref = red.reduce(_partials(world, i), layer=layer)
            other = plain.reduce(_partials(world, i), layer=layer)
            for r in range(world):
                assert torch.equal(results[r][("post-norm", algo)][i], ref), ("post-norm", algo, layer, r)
            if i > 0:  # the mapped carry is not the plain one
                assert not torch.equal(ref, other), ("post-norm", algo, layer)
    for name in ("int4-g32", "int4-outlier"):
        fbs = [Feedback(carry=torch.randn(7, 192, generator=torch.Generator().manual_seed(r))) for r in range(world)]
        ref = simulate_all_reduce(_partials(world, 0), make_codec(name, calibration=cal), "gather", feedback=fbs,
                                  layer=LAYERS[0])
        for r in range(world):
            y, nxt, into_spare = results[r]["pipelined", name]
            assert torch.equal(y, ref) and torch.equal(nxt, fbs[r].next) and into_spare, (name, r)
    ref_codec = make_codec("int4-outlier", calibration=cal)
    fbs = [Feedback(carry=torch.randn(7, 192, generator=torch.Generator().manual_seed(r))) for r in range(world)]
    ref = simulate_all_reduce(_partials(world, 0), ref_codec, "gather", feedback=fbs, layer=LAYERS[0])
    for r in range(world):
        y, nxt, carry_kept = results[r]["alias"]
        assert torch.equal(y, ref) and torch.equal(nxt, fbs[r].next) and carry_kept, r
    for r in range(world):
        assert "pipelined chunks" in results[r]["refused"], results[r]["refused"]
        assert len(results[r]["bad carry"]) == 8 and all(
            re.fullmatch(r"error-feedback carry of shape \((14|3), 192\) for a partial of shape \(7, 192\)", m)
            for m in results[r]["bad carry"]), results[r]["bad carry"]


@pytest.mark.parametrize("algorithm", ["gather", "two-shot", "exact"])
@pytest.mark.parametrize("post_norm", [False, True])
def test_chain_reuses_dead_carries_and_keeps_the_bits(algorithm, post_norm):
    """FeedbackChain hands each call the buffer its previous call left dead (Feedback.spare),
    and the collectives write ``next`` into it. At every call of three forward passes over four
    layers, the sum and every rank's ``next`` are bitwise those of the same call with fresh
    buffers (the same carries, no spare), computed first; after a pass's second call no new
    carry buffer is made, and a pass's first call gets no buffer of the pass before."""
    world = 3
    cal = _cal(world)
    for name in CODECS:
        codec = make_codec(name, calibration=cal)
        chain = FeedbackChain(LAYERS, ranks=world, post_norm=_post_norm(world) if post_norm else None, recycle=True)
        for step in range(3):
            seen = set()
            for i, layer in enumerate(LAYERS):
                parts = _partials(world, i + step)
                case = (name, step, layer)
                fbs = chain.start(layer, parts)
                if i == 0:  # no buffer crosses forward passes (CUDA graphs: module doc of Feedback)
                    assert all(f.spare is None for f in fbs), case
                fresh = [Feedback(carry=f.carry) for f in fbs]
                want = simulate_all_reduce(parts, codec, algorithm, layer=layer, feedback=fresh)
                got = simulate_all_reduce(parts, codec, algorithm, layer=layer, feedback=fbs)
                assert torch.equal(got, want), case
                for f, g in zip(fbs, fresh):
                    assert torch.equal(f.next.view(torch.int32), g.next.view(torch.int32)), case
                ptrs = {f.next.data_ptr() for f in fbs}
                if i >= 2:  # written into buffers earlier calls of this pass made
                    assert ptrs <= seen, case
                seen |= ptrs
                chain.finish(layer, fbs, got)


def test_spare_is_written_over_where_it_fits_and_ignored_elsewhere():
    """A Feedback.spare full of stale values gets the next carry (exact: zeros) with the bits of a
    fresh buffer, for every algorithm; a spare of another shape or dtype, or the carry itself,
    is left alone."""
    world = 3
    cal = _cal(world)
    parts = _partials(world, 1)
    carries = [torch.randn(7, 192, generator=torch.Generator().manual_seed(r)) * 0.2 for r in range(world)]
    for name in CODECS:
        codec = make_codec(name, calibration=cal)
        for algo in ("gather", "two-shot", "exact"):
            fresh = [Feedback(carry=c) for c in carries]
            want = simulate_all_reduce(parts, codec, algo, layer=LAYERS[1], feedback=fresh)
            spares = [torch.full((7, 192), 5.0) for _ in range(world)]
            fbs = [Feedback(carry=c, spare=s) for c, s in zip(carries, spares)]
            assert torch.equal(simulate_all_reduce(parts, codec, algo, layer=LAYERS[1], feedback=fbs), want)
            for f, g, sp in zip(fbs, fresh, spares):
                assert f.next is sp and torch.equal(f.next.view(torch.int32), g.next.view(torch.int32)), (name, algo)
            for bad in (torch.full((6, 192), 5.0), torch.full((7, 192), 5.0, dtype=torch.float64), "carry"):
                c = carries[0].clone()
                f = Feedback(carry=c, spare=c[:] if isinstance(bad, str) else bad)  # (a view: the same memory)
                simulate_all_reduce(parts, codec, algo, layer=LAYERS[1],
                                    feedback=[f] + [Feedback(carry=x) for x in carries[1:]])
                assert f.next is not f.spare and torch.equal(f.next, fresh[0].next), (name, algo)
                if isinstance(bad, str):
                    assert torch.equal(c, carries[0]), (name, algo)  # the carry was not written over
                else:
                    assert bool((bad == 5.0).all()), (name, algo)


# ------------------------------------------------------------------ post-norm (Gemma) feedback
def test_postnorm_share_update_is_the_real_norms_derivative():
    """J(y) v against a central difference of transformers' own Gemma 3 RMSNorm (which computes
    in fp32, so the step is 1e-3 of the row's rms: truncation ~1e-6, rounding ~1e-4)."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    gen = torch.Generator().manual_seed(3)
    norm = Gemma3RMSNorm(48, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48, generator=gen, dtype=torch.float64) * 3)
    y = torch.randn(5, 48, generator=gen, dtype=torch.float64) * torch.tensor([0.01, 1, 3, 100, 7.0],
                                                                               dtype=torch.float64)[:, None]
    v = torch.randn(5, 48, generator=gen, dtype=torch.float64)
    carry = torch.randn(5, 48, generator=gen, dtype=torch.float64)
    pn = PostNorm(gain=(1.0 + norm.weight.detach()).float(), eps=1e-6)
    got = postnorm_share_update(None, carry.float(), (carry - v).float(), y.float(), pn)  # J (carry - next) = J v
    t = 1e-3 * y.pow(2).mean(-1, keepdim=True).sqrt()
    with torch.no_grad():
        fd = (norm(y + t * v) - norm(y - t * v)) / (2 * t)
    torch.testing.assert_close(got.double(), fd, rtol=1e-3, atol=1e-4 * float(fd.abs().max()))
    share = torch.randn(5, 48, generator=gen)
    torch.testing.assert_close(postnorm_share_update(share, carry.float(), (carry - v).float(), y.float(), pn) - share,
                               got, rtol=1e-5, atol=1e-5)


def test_postnorm_compensation_by_hand():
    # partial rms is exactly 2 (every value +-2), tp 4: estimate 2 * 2 = 4; cap 2 * 2 = 4
    partial = torch.tensor([[2.0, -2.0, 2.0, -2.0, 2.0, -2.0, 2.0, -2.0]])
    gain = torch.tensor([1.0, 2.0, -4.0, 0.1, 8.0, 1.0, 1.0, 1.0])  # median |g| = 1, floor 0.3: 0.1 gets nothing
    share = torch.tensor([[0.5, 1.0, 1.0, 5.0, 0.25, -2.0, 0.0, float("nan")]])
    c = postnorm_compensation(share, partial, PostNorm(gain=gain), tp=4, gain_floor=0.3, cap=2.0)
    # -4 * share / g: -2, -2, +1, (0), -0.125, +8 -> cap 4, 0, nan -> 0
    assert torch.equal(c, torch.tensor([[-2.0, -2.0, 1.0, 0.0, -0.125, 4.0, 0.0, 0.0]]))


def test_postnorm_chain_needs_partials_output_and_every_norm():
    pn = PostNormFeedback(norms={"a": PostNorm(gain=torch.ones(4))}, tp=2)
    with pytest.raises(ValueError, match="no norm for layer 'b'"):
        FeedbackChain(("a", "b"), ranks=1, post_norm=pn)
    with pytest.raises(ValueError, match="gain_floor"):
        PostNormFeedback(norms={}, tp=2, cap=0.0)
    chain = FeedbackChain(("a",), ranks=1, post_norm=pn)
    with pytest.raises(ValueError, match="partial"):
        chain.start("a")
    fb = chain.start("a", [torch.ones(1, 4)])
    fb[0].next = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="decoded sum"):
        chain.finish("a", fb)
    assert chain.fresh().post_norm is pn


@pytest.mark.parametrize("algorithm", ["gather", "two-shot", "two-shot first-stage"])
def test_which_rank_holds_a_rows_error_depends_on_the_batch_only_in_two_shot(algorithm):
    """A row's all-reduce output never depends on the other rows of its message. Its next
    carries do in two-shot only: the rows are cut into N chunks, the owner of the chunk that
    holds a row adds the row's second-stage error to its own carry, and a message with another
    row count is cut elsewhere. Their sum over the ranks is the same either way (up to the fp32
    order of that sum). This is why feedback through vLLM (other batches) is another draw of
    the rounding, not the simulator's copy (tests/test_vllm_engine.py). With first-stage
    feedback (no owner errors) the carries are row-local, as with gather."""
    algorithm, _, mode = algorithm.partition(" ")
    owner = mode != "first-stage"
    world, e, rows = 3, 128, 10
    codec = make_codec("int4-outlier", calibration=synthetic_calibration(["L"], world=world, hidden=e, tokens=64,
                                                                         batches=1))
    xs = planted_partials(world, rows, e, seed=0, noise_seed=1)
    gen = torch.Generator().manual_seed(2)
    carries = [0.05 * torch.randn(rows, e, generator=gen) for _ in range(world)]
    whole = [Feedback(carry=c.clone(), owner_error=owner) for c in carries]
    out = simulate_all_reduce(xs, codec, algorithm, layer="L", feedback=whole)
    moved = False
    for lo, hi in ((0, 4), (4, 10), (0, 1)):
        part = [Feedback(carry=c[lo:hi].clone(), owner_error=owner) for c in carries]
        got = simulate_all_reduce([x[lo:hi] for x in xs], codec, algorithm, layer="L", feedback=part)
        assert torch.equal(got, out[lo:hi])
        same = all(torch.equal(a.next[lo:hi], b.next) for a, b in zip(whole, part))
        moved = moved or not same
        if algorithm == "gather":
            assert same
        torch.testing.assert_close(sum(f.next for f in part), sum(f.next for f in whole)[lo:hi], rtol=0, atol=1e-6)
    assert moved == (algorithm == "two-shot" and owner)
    if not owner:  # each rank's own first-stage error: what gather's carry is for this row-wise codec
        ref = [Feedback(carry=c.clone()) for c in carries]
        simulate_all_reduce(xs, codec, "gather", layer="L", feedback=ref)
        assert all(torch.equal(a.next, b.next) for a, b in zip(whole, ref))
