"""Multi-process gloo all-reduce against the single-process reference, bitwise."""
import pytest
import torch

from lowbit_tp.calibration.artifact import CalibrationError
from lowbit_tp.calibration.synthetic import planted_partials, synthetic_calibration
from lowbit_tp.codecs import make_codec
from lowbit_tp.collectives import (AutoPolicy, CollectiveError, CommStats, RankFailure, all_reduce,
                                   check_group_config, simulate_all_reduce, spawn_ranks)
from lowbit_tp.collectives.dist import WAIT
from lowbit_tp.collectives.feedback import Feedback
from lowbit_tp.tp.row_parallel import DistReducer

LAYER = "layers.0.o_proj"
CODECS = ["bf16", "int8", "int4", "int4-outlier", "int4-random-k", "int4-g32", "int4-g128", "mxfp4",
          "rot-lm4-g64", "rot-lm3-g32-e8"]
TOKENS, HIDDEN = 7, 192  # 7 tokens: two-shot must pad rows at every world size here


def _cal(world):
    return synthetic_calibration([LAYER], world=world, hidden=HIDDEN, tokens=32, batches=2)


def _rank_all_codecs(rank, world):
    """Runs on each rank: every codec x algorithm, returning results and byte counts."""
    cal = _cal(world)
    partial = planted_partials(world, TOKENS, HIDDEN, seed=0, noise_seed=99)[rank]
    out = {}
    for name in CODECS:
        codec = make_codec(name, calibration=cal)
        for algo in ["gather", "two-shot", "exact"]:
            stats = CommStats()
            y = all_reduce(partial, codec, algorithm=algo, layer=LAYER, stats=stats)
            out[(name, algo)] = (y, stats.bytes_sent, stats.payload_bytes)
    return out


def _rank_successful_runs(rank, world):
    """The runs that succeed, for one spawn per world size (a spawn's imports cost more than
    these collectives): every codec x algorithm, then (at 2 and 3) the pipelined ones, then
    (at 3) the auto policy's."""
    out = {"all_codecs": _rank_all_codecs(rank, world)}
    if world in (2, 3):
        out["pipelined"] = _rank_pipelined(rank, world)
    if world == 3:
        out["auto"] = _rank_auto(rank, world)
    return out


@pytest.fixture(scope="module")
def ranks_at():
    """``ranks_at(world)[r][key]``: rank r's results of :func:`_rank_successful_runs`, spawned once per world."""
    cache = {}

    def get(world):
        if world not in cache:
            cache[world] = spawn_ranks(_rank_successful_runs, world, timeout_s=60)
        return cache[world]

    return get


@pytest.mark.parametrize("world", [2, 3, pytest.param(4, marks=pytest.mark.slow)])  # 4 ranks on 2 cores: ~15 s
def test_all_reduce_matches_reference_bitwise(world, ranks_at):
    results = [r["all_codecs"] for r in ranks_at(world)]
    cal = _cal(world)
    partials = planted_partials(world, TOKENS, HIDDEN, seed=0, noise_seed=99)
    exact = torch.stack(partials).sum(0)
    for name in CODECS:
        codec = make_codec(name, calibration=cal)
        for algo in ["gather", "two-shot", "exact"]:
            stats = CommStats()
            ref = simulate_all_reduce(partials, codec, algo, layer=LAYER, stats=stats)
            for r in range(world):
                y, sent, payload = results[r][(name, algo)]
                if algo == "exact":  # the backend's own reduction order: tolerance, not bits
                    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-5)
                else:
                    assert torch.equal(y, ref), (name, algo, r)
                assert sent == stats.bytes_sent, (name, algo, r)
            # Bytes on the wire follow from the payload sizes: gather N-1 payloads, two-shot 2(N-1) chunks.
            nbytes = codec.payload_nbytes((TOKENS, HIDDEN))
            if algo == "gather":
                assert stats.bytes_sent == (world - 1) * nbytes
            elif algo == "two-shot":
                rows = -(-TOKENS // world)
                chunk = codec.payload_nbytes((rows, HIDDEN))
                assert stats.bytes_sent == 2 * (world - 1) * chunk
            # Compressed results stay close to the exact sum (bf16 closest).
            err = (ref - exact).abs().max() / exact.abs().max()
            assert err < (0.01 if name == "bf16" else 0.35), (name, algo, float(err))


def _rank_auto(rank, world):
    partial = torch.full((2048, 64), float(rank + 1))
    small = torch.full((1, 64), float(rank + 1))
    codec = make_codec("int4-g32")
    policy = AutoPolicy(min_bytes=4096)
    s_big, s_small = CommStats(), CommStats()
    big = all_reduce(partial, codec, algorithm="auto", policy=policy, stats=s_big)
    tiny = all_reduce(small, codec, algorithm="auto", policy=policy, stats=s_small)
    return s_big.by_algorithm, s_small.by_algorithm, big, tiny


def test_auto_picks_by_size_and_world(ranks_at):
    res = [r["auto"] for r in ranks_at(3)]
    big_algos, small_algos, big, tiny = res[0]
    assert big_algos == {"two-shot": 1} and small_algos == {"exact": 1}
    assert torch.equal(tiny, torch.full((1, 64), 6.0))
    assert AutoPolicy().choose(numel=10**6, world_size=2) == "gather"
    assert AutoPolicy().choose(numel=10**6, world_size=1) == "exact"


def _refused(run) -> str:
    try:
        run()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def _rank_mismatch(rank, world):
    x = planted_partials(world, 4, HIDDEN)[rank]
    # refused on each rank before anything is sent: a calibration of another TP degree, a codec name
    refused = [_refused(lambda: all_reduce(x, make_codec(name, calibration=_cal(3)), algorithm=algo, layer=LAYER))
               for name in ("int4-outlier", "rot-lm4-g64+sum8") for algo in ("gather", "two-shot")]
    refused.append(_refused(lambda: all_reduce(x, "int4-g32", algorithm="gather", layer=LAYER)))
    # a group this rank is not in: torch makes every collective a no-op there, so exact returned the
    # partial unsummed, gather "needs at least one payload", two-shot a "negative dimension"
    import torch.distributed as dist

    alone = dist.new_group([0])
    outside = [] if rank == 0 else [_refused(lambda: all_reduce(x, make_codec("bf16"), alone, algorithm=algo,
                                                                layer=LAYER)) for algo in ("exact", "gather", "two-shot")]
    # the configuration check called directly there compared nothing and passed (and cached the pass)
    outside_check = [_refused(lambda: check_group_config(make_codec("int4-g32"), alone)) for _ in range(2)]
    codec = make_codec("int4-outlier" if rank == 0 else "int4-random-k", calibration=_cal(world))
    try:
        all_reduce(x, codec, algorithm="gather", layer=LAYER)
    except CollectiveError as exc:
        return {"mismatch": str(exc), "refused": refused, "outside": outside, "outside_check": outside_check}
    return {"mismatch": "no error", "refused": refused, "outside": outside, "outside_check": outside_check}


def test_codec_mismatch_across_ranks_is_a_clear_error():
    res = spawn_ranks(_rank_mismatch, 2, timeout_s=30)
    for r in res:
        m = r["mismatch"]
        assert "disagree" in m and "int4-random-k" in m and "int4-outlier" in m
        *other_tp, name = r["refused"]
        assert all(e.startswith("CalibrationError: calibration was made for TP degree 3, but this run uses TP 2; "
                                "recalibrate with --tp 2") for e in other_tp), other_tp
        assert name.startswith("TypeError: codec must be a lowbit_tp Codec") and "make_codec" in name, name
    assert res[1]["outside"] == ["CollectiveError: all_reduce: this process (global rank 1) is not a member of the "
                                 "group; call it on the group's ranks only"] * 3, res[1]["outside"]
    assert res[0]["outside_check"] == ["no error"] * 2  # rank 0 is the whole group
    assert res[1]["outside_check"] == ["CollectiveError: check_group_config: this process (global rank 1) is not a "
                                       "member of the group; call it on the group's ranks only"] * 2, res[1]


def _rank_wire_mismatch(rank, world):
    """Ranks that differ in what decides the wire traffic but not in the codec: gloo aborted on
    the mismatched sizes, or the call ran into the timeout. Each case is refused on every rank by
    the configuration check, before anything is sent, so the next case starts in step."""
    partials = planted_partials(world, 64, HIDDEN, seed=3)
    codec = make_codec("int4-g32")
    cases = {  # name: (algorithm, policy) per rank
        "chunk_bytes": [("gather", AutoPolicy()), ("gather", AutoPolicy(chunk_bytes=4096))],
        "algorithm": [("gather", None), ("two-shot", None)],
        "auto_threshold": [("auto", AutoPolicy(min_bytes=1, two_shot_min_world=2)), ("auto", AutoPolicy(min_bytes=1))],
        # auto sends this message compressed on rank 0 and exact on rank 1: another collective call
        "auto_exact": [("auto", AutoPolicy(min_bytes=1)), ("auto", AutoPolicy(min_bytes=10 ** 9))],
        # not on the wire with a fixed algorithm: no false refusal
        "same_wire": [("two-shot", AutoPolicy(min_bytes=1, chunk_bytes=4096)),
                      ("two-shot", AutoPolicy(two_shot_min_world=5, chunk_bytes=4096))],
    }
    out = {}
    for name, per_rank in cases.items():
        algo, policy = per_rank[rank]
        try:
            out[name] = all_reduce(partials[rank], codec, algorithm=algo, policy=policy, layer=LAYER)
        except CollectiveError as exc:
            out[name] = str(exc)
    out["again"] = _refused(lambda: all_reduce(partials[rank], codec, algorithm=cases["algorithm"][rank][0],
                                               layer=LAYER))  # a refused configuration is not cached as agreed
    return out


def test_ranks_that_differ_in_algorithm_or_chunking_get_a_collective_error():
    res = spawn_ranks(_rank_wire_mismatch, 2, timeout_s=20, deadline_s=90)
    for r in res:
        assert r["chunk_bytes"] == ("ranks disagree on the compressed all-reduce configuration:\n"
                                    "  rank 0: {'chunk_bytes': 0}\n  rank 1: {'chunk_bytes': 4096}"), r["chunk_bytes"]
        assert r["algorithm"] == ("ranks disagree on the compressed all-reduce configuration:\n"
                                  "  rank 0: {'algorithm': 'gather'}\n  rank 1: {'algorithm': 'two-shot'}"), r
        assert r["auto_threshold"].endswith("rank 0: {'two_shot_min_world': 2}\n  rank 1: {'two_shot_min_world': 3}")
        assert r["auto_exact"] == ("ranks disagree on the compressed all-reduce configuration:\n"
                                   "  rank 0: {'min_bytes': 1}\n  rank 1: {'min_bytes': 1000000000}"), r["auto_exact"]
        assert r["again"].startswith("CollectiveError: ranks disagree") and "'algorithm': 'gather'" in r["again"]
    ref = simulate_all_reduce(planted_partials(2, 64, HIDDEN, seed=3), make_codec("int4-g32"), "two-shot", layer=LAYER)
    assert all(torch.equal(r["same_wire"], ref) for r in res)


def test_simulate_refuses_what_all_reduce_refuses():
    cal3 = _cal(3)
    for name in ("int4-outlier", "int8", "rot-lm4-g64-lg8-k4", "rot-lm4-g64+sum8"):
        codec = make_codec(name, calibration=cal3)
        for world in (2, 4):  # fewer ranks: silently the wrong split's scales before; more: a 'sum' hint
            parts = planted_partials(world, TOKENS, HIDDEN)
            for algo in ("gather", "two-shot"):
                with pytest.raises(CalibrationError, match=f"made for TP degree 3, but this run uses TP {world}; recalibrate"):
                    simulate_all_reduce(parts, codec, algo, layer=LAYER)
        simulate_all_reduce(planted_partials(3, TOKENS, HIDDEN), codec, layer=LAYER)  # its own degree runs
        simulate_all_reduce(planted_partials(2, TOKENS, HIDDEN), codec, "exact", layer=LAYER)  # codec unused
    with pytest.raises(CalibrationError, match="made for TP degree 3 and has no rank 5"):
        make_codec("int4-outlier", calibration=cal3).encode(torch.randn(2, HIDDEN), layer=LAYER, source=5)
    with pytest.raises(TypeError, match="make_codec"):  # was: str.encode's "takes at most 2 arguments"
        simulate_all_reduce(planted_partials(2, TOKENS, HIDDEN), "int4-g32")


def _rank_dies(rank, world):
    import os
    import time

    if rank == 1:
        os._exit(3)  # a rank that dies without a word
    time.sleep(0.5)
    t0 = time.monotonic()
    try:
        all_reduce(torch.ones(256, 64), make_codec("int4-g32"), algorithm="gather", layer="L7")
    except CollectiveError as exc:
        return {"msg": str(exc), "seconds": time.monotonic() - t0}
    return {"msg": "no error", "seconds": time.monotonic() - t0}


def test_dead_rank_times_out_with_a_message():
    res = spawn_ranks(_rank_dies, 2, timeout_s=8, deadline_s=60, allow_failures=True)
    alive = res[0]
    assert "L7" in alive["msg"] and "rank 0/2" in alive["msg"], alive
    assert alive["seconds"] < 30


def _rank_nan(rank, world):
    x = torch.ones(4, 64)
    if rank == 1:
        x[0, 0] = float("nan")
    codec = make_codec("int4-g32")
    try:
        all_reduce(x, codec, algorithm="gather", layer="model.layers.3.mlp.down_proj")
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def test_nan_names_the_rank_and_layer():
    res = spawn_ranks(_rank_nan, 2, timeout_s=8, deadline_s=60, allow_failures=True)
    assert "NonFiniteError" in res[1] and "down_proj" in res[1] and "source 1" in res[1]
    # Rank 0 is not left hanging: its peer never sent, so its collective fails with a
    # CollectiveError naming the layer (by the timeout at the latest).
    assert res[0].startswith("CollectiveError: ") and "down_proj" in res[0], res[0]


def test_simulate_world_one_and_validation():
    x = torch.randn(3, 8)
    y = simulate_all_reduce([x], make_codec("int4-g32"))
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()  # a new tensor, as promised
    with pytest.raises(ValueError, match="rank 1"):
        simulate_all_reduce([x, torch.randn(4, 8)], make_codec("bf16"))
    with pytest.raises(ValueError, match="unknown algorithm"):
        simulate_all_reduce([x, x], make_codec("bf16"), "ring")


def test_rank_failure_reports_the_traceback():
    with pytest.raises(RankFailure, match="ZeroDivisionError"):
        spawn_ranks(_rank_raises, 2, timeout_s=20)


def _rank_raises(rank, world):
    return 1 / 0


def _rank_returns(rank, world):
    return rank


def test_a_tiny_timeout_fails_the_ranks_in_one_line():
    """`run --timeout 0.001`: the parent's own rendezvous store timed out connecting to itself,
    and closing its socket then raised OSError EBADF (the store had closed it), so the user got
    that (and a chained traceback) instead of the timeout. The parent's store now takes at least
    30 s; the ranks, which keep the timeout, fail as a RankFailure."""
    with pytest.raises(RankFailure) as info:
        spawn_ranks(_rank_returns, 2, timeout_s=1e-6)
    assert info.value.summary.startswith("rank "), info.value.summary
    assert spawn_ranks(_rank_returns, 2, timeout_s=5) == [0, 1]


def test_two_stage_codec_spends_more_bits_on_the_sum_only():
    world = 3
    cal = _cal(world)
    partials = planted_partials(world, 12, HIDDEN, seed=0, noise_seed=5)
    exact = torch.stack(partials).sum(0)
    plain, two = make_codec("rot-lm4-g64", calibration=cal), make_codec("rot-lm4-g64+sum8", calibration=cal)
    s_plain, s_two = CommStats(), CommStats()
    y_plain = simulate_all_reduce(partials, plain, "two-shot", layer=LAYER, stats=s_plain)
    y_two = simulate_all_reduce(partials, two, "two-shot", layer=LAYER, stats=s_two)
    assert (y_two - exact).norm() < (y_plain - exact).norm()
    assert s_two.bytes_sent > s_plain.bytes_sent
    # The gather collective never uses the sum stage: identical to the plain codec.
    assert torch.equal(simulate_all_reduce(partials, two, "gather", layer=LAYER),
                       simulate_all_reduce(partials, plain, "gather", layer=LAYER))


PIPE_CODECS = ["bf16", "int4-outlier", "int4-g32", "mxfp4", "rot-lm4-g64-lg8-k4"]
PIPE_TOKENS = 23
PIPE_POLICY = AutoPolicy(chunk_bytes=2 * HIDDEN * 5)  # 5 rows per chunk: 4 full chunks + 3 rows
INPLACE_RUNS = [("gather", PIPE_POLICY), ("gather", AutoPolicy(chunk_bytes=0)), ("two-shot", PIPE_POLICY),
                ("exact", PIPE_POLICY)]


def _rank_pipelined(rank, world):
    cal = synthetic_calibration([LAYER], world=world, hidden=HIDDEN, tokens=32, batches=2)
    partial = planted_partials(world, PIPE_TOKENS, HIDDEN, seed=1, noise_seed=7)[rank]
    out = {}
    for name in PIPE_CODECS:
        codec = make_codec(name, calibration=cal)
        for algo in ["gather", "two-shot"]:
            stats = CommStats()
            y = all_reduce(partial, codec, algorithm=algo, layer=LAYER, policy=PIPE_POLICY, stats=stats)
            out[(name, algo)] = (y, stats.bytes_sent, stats.calls)
    seen = []

    def hook(what, group, send):  # records what it wraps and whether send() started a transfer
        work = send()
        seen.append((what, hasattr(work, "wait")))  # a started Work, not a finished call
        return work

    for name in PIPE_CODECS:  # in place (out=partial) and into a separate out, chunked or not
        codec = make_codec(name, calibration=cal)
        for algo, policy in INPLACE_RUNS:
            p, o = partial.clone(), torch.full_like(partial, float("nan"))
            y = all_reduce(p, codec, algorithm=algo, layer=LAYER, policy=policy, out=p)
            z = all_reduce(partial, codec, algorithm=algo, layer=LAYER, policy=policy, out=o)
            out[("inplace", name, algo, policy.chunk_bytes)] = (y, y is p, z, z is o)
    codec = make_codec("int4-outlier", calibration=cal)
    # the reducer the native runtime uses (in place where it saves work), and the engines' default
    strided = torch.empty(HIDDEN, PIPE_TOKENS).t().copy_(partial)
    for key, algo, in_place, p in [("gather", "gather", True, partial.clone()),
                                   ("gather", "gather", False, partial.clone()),
                                   ("two-shot", "two-shot", True, partial.clone()),
                                   ("strided", "gather", True, strided)]:
        y = DistReducer(codec=codec, algorithm=algo, policy=PIPE_POLICY, in_place=in_place).reduce([p], layer=LAYER)
        out[("reducer", key, in_place)] = (y, y is p, torch.equal(p, partial))
    half = partial.to(torch.bfloat16)  # a bf16 partial, in place
    for algo in ["gather", "exact", "two-shot"]:
        p = half.clone()
        y = all_reduce(p, codec, algorithm=algo, layer=LAYER, policy=PIPE_POLICY, out=p)
        out[("inplace-bf16", algo)] = (y, y is p)
    for policy in (PIPE_POLICY, AutoPolicy(chunk_bytes=0)):  # two-shot into a fresh bf16 result
        out[("bf16-two-shot", policy.chunk_bytes)] = all_reduce(half, codec, algorithm="two-shot", layer=LAYER,
                                                               policy=policy)
    two = torch.empty(2 * PIPE_TOKENS, HIDDEN)  # out right after the partial: touching, not overlapping
    two[:PIPE_TOKENS] = partial
    y = all_reduce(two[:PIPE_TOKENS], codec, algorithm="gather", layer=LAYER, policy=PIPE_POLICY,
                   out=two[PIPE_TOKENS:])
    out["adjacent"] = (y, torch.equal(two[:PIPE_TOKENS], partial))
    # error feedback in place: the same sum and the same carry out (two-shot: whole messages)
    for algo, policy in [("gather", PIPE_POLICY), ("exact", PIPE_POLICY), ("two-shot", AutoPolicy(chunk_bytes=0))]:
        fb, fb_in = Feedback(carry=torch.full_like(partial, 0.25)), Feedback(carry=torch.full_like(partial, 0.25))
        y = all_reduce(partial, codec, algorithm=algo, layer=LAYER, policy=policy, feedback=fb)
        p = partial.clone()
        y_in = all_reduce(p, codec, algorithm=algo, layer=LAYER, policy=policy, feedback=fb_in, out=p)
        out[("inplace-fb", algo)] = (y, fb.next, y_in, fb_in.next, y_in is p)
    refused = {}
    two = torch.empty(2 * PIPE_TOKENS, HIDDEN)  # the partial and an out three rows further on
    two[:PIPE_TOKENS] = partial
    for label, src, o in [("shape", partial, partial[:-1].clone()), ("dtype", partial, partial.double()),
                          ("overlap", two[:PIPE_TOKENS], two[3:3 + PIPE_TOKENS]),
                          ("strided", partial, torch.empty(HIDDEN, PIPE_TOKENS).t())]:
        try:
            all_reduce(src, codec, algorithm="gather", layer=LAYER, out=o)
            refused[label] = None
        except ValueError as exc:
            refused[label] = str(exc)
    out["inplace-refused"] = refused
    for algo, policy in [("gather", PIPE_POLICY), ("two-shot", PIPE_POLICY), ("gather", AutoPolicy(chunk_bytes=0))]:
        seen.clear()
        all_reduce(partial, codec, algorithm=algo, layer=LAYER, policy=policy, wire_hook=hook)
        out[("hook", algo, policy.chunk_bytes)] = list(seen)
    return out


def test_wire_hook_wraps_the_first_start_and_the_waits_of_a_pipelined_message(ranks_at):
    """A pipelined message: the hook sees the first chunk's start (a started transfer, so a
    benchmark's barrier goes before anything moves), then every wait, named WAIT + what."""
    g, a2a, ag = "all_gather of payloads", "all_to_all of chunks", "all_gather of reduced chunks"
    for out in [r["pipelined"] for r in ranks_at(2)]:
        assert out[("hook", "gather", PIPE_POLICY.chunk_bytes)] == [(g, True)] + [(WAIT + g, False)] * 5
        two = out[("hook", "two-shot", PIPE_POLICY.chunk_bytes)]
        assert two[0] == (a2a, True) and len(two) == 11
        assert sorted(two[1:]) == sorted([(WAIT + a2a, False)] * 5 + [(WAIT + ag, False)] * 5)
        assert out[("hook", "gather", 0)] == [(g, False)]  # one message: one synchronous call


@pytest.mark.parametrize("world", [2, 3])
def test_in_place_all_reduce_writes_the_same_bits_over_the_partial(world, ranks_at):
    """``out=partial`` (as torch.distributed.all_reduce does) and ``out=`` a separate tensor:
    that very tensor comes back, holding bitwise the single-process result, chunked or not; with
    error feedback the carry out is unchanged too. A bad ``out`` is refused in one line."""
    results = [r["pipelined"] for r in ranks_at(world)]
    cal = synthetic_calibration([LAYER], world=world, hidden=HIDDEN, tokens=32, batches=2)
    partials = planted_partials(world, PIPE_TOKENS, HIDDEN, seed=1, noise_seed=7)
    for name in PIPE_CODECS:
        codec = make_codec(name, calibration=cal)
        for algo, policy in INPLACE_RUNS:
            ref = simulate_all_reduce(partials, codec, algo, layer=LAYER, policy=AutoPolicy(chunk_bytes=0))
            for r in range(world):
                y, y_is_partial, z, z_is_out = results[r][("inplace", name, algo, policy.chunk_bytes)]
                assert y_is_partial and z_is_out, (name, algo, r)
                if algo == "exact":  # the backend's own reduction order: tolerance, not bits
                    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-5)
                    assert torch.equal(y, z), (name, algo, r)
                else:
                    assert torch.equal(y, ref) and torch.equal(z, ref), (name, algo, r, policy.chunk_bytes)
    seed = make_codec("int4-outlier", calibration=cal)
    ref = simulate_all_reduce(partials, seed, "gather", layer=LAYER)
    ref_two = simulate_all_reduce(partials, seed, "two-shot", layer=LAYER)
    half = [p.to(torch.bfloat16) for p in partials]
    for r in range(world):
        for algo in ["gather", "exact", "two-shot"]:
            y, nxt, y_in, nxt_in, is_p = results[r][("inplace-fb", algo)]
            assert is_p and torch.equal(y, y_in) and torch.equal(nxt, nxt_in), (algo, r)
        y, same, untouched = results[r][("reducer", "gather", True)]  # in place: the partial holds the sum
        assert same and torch.equal(y, ref) and not untouched
        y, same, untouched = results[r][("reducer", "gather", False)]  # a fresh sum, the partial kept
        assert not same and torch.equal(y, ref) and untouched
        y, same, untouched = results[r][("reducer", "two-shot", True)]  # two-shot: fresh even when in place
        assert not same and torch.equal(y, ref_two) and untouched
        y, same, untouched = results[r][("reducer", "strided", True)]  # a strided partial cannot take it
        assert not same and torch.equal(y, ref) and untouched
        y, same = results[r][("inplace-bf16", "gather")]
        assert same and y.dtype == torch.bfloat16 and torch.equal(y, simulate_all_reduce(half, seed, "gather",
                                                                                        layer=LAYER))
        # two-shot decodes straight into a bf16 result (pipelined or not, in place or fresh): the
        # bits of the fp32 single-process result cast once (bf16 -> fp32 partials encode the same)
        want = simulate_all_reduce([h.float() for h in half], seed, "two-shot", layer=LAYER).to(torch.bfloat16)
        y, same = results[r][("inplace-bf16", "two-shot")]
        assert same and y.dtype == torch.bfloat16 and torch.equal(y, want), r
        for chunk_bytes in (PIPE_POLICY.chunk_bytes, 0):
            y = results[r][("bf16-two-shot", chunk_bytes)]
            assert y.dtype == torch.bfloat16 and torch.equal(y, want), (r, chunk_bytes)
        y, same = results[r][("inplace-bf16", "exact")]
        assert same and torch.equal(y, torch.stack(half).sum(0)) if world == 2 else same
        y, kept = results[r]["adjacent"]
        assert kept and torch.equal(y, ref)
        refused = results[r]["inplace-refused"]
        assert "shape, dtype and device" in refused["shape"] and "shape, dtype and device" in refused["dtype"]
        assert "overlaps the partial" in refused["overlap"]
        assert "contiguous" in refused["strided"]


def test_a_policy_with_a_negative_or_non_numeric_threshold_is_refused():
    """AutoPolicy(chunk_bytes=-1) ran unchunked without a word and min_bytes="x" failed only at
    the first message, inside the collective."""
    for kw, name in [({"chunk_bytes": -1}, "chunk_bytes"), ({"min_bytes": "x"}, "min_bytes"),
                     ({"min_bytes": True}, "min_bytes"), ({"two_shot_min_world": 1}, "two_shot_min_world")]:
        with pytest.raises(ValueError, match=rf"^AutoPolicy\.{name} must be >= "):
            AutoPolicy(**kw)
    AutoPolicy(min_bytes=0, chunk_bytes=0, two_shot_min_world=2)
    import numpy as np  # numpy's integer scalars are numbers too (a config read from an array)
    assert AutoPolicy(chunk_bytes=np.int64(1024)).chunk_rows(tokens=100, hidden=64) == 8


def test_chunk_rows_policy():
    p = AutoPolicy(chunk_bytes=1024)
    assert p.chunk_rows(tokens=100, hidden=64) == 8  # 8 rows of 64 bf16 values = 1024 bytes
    assert p.chunk_rows(tokens=4, hidden=64) == 4  # fits in one chunk
    assert AutoPolicy(chunk_bytes=0).chunk_rows(tokens=10**6, hidden=64) == 10**6
    assert p.chunk_rows(tokens=100, hidden=4096) == 1


@pytest.mark.parametrize("world", [2, 3])
def test_pipelined_all_reduce_equals_the_unchunked_result(world, ranks_at):
    """Chunked + async on real gloo ranks: bitwise the single-process (unchunked) result."""
    results = [r["pipelined"] for r in ranks_at(world)]
    cal = synthetic_calibration([LAYER], world=world, hidden=HIDDEN, tokens=32, batches=2)
    partials = planted_partials(world, PIPE_TOKENS, HIDDEN, seed=1, noise_seed=7)
    rows = PIPE_POLICY.chunk_rows(tokens=PIPE_TOKENS, hidden=HIDDEN)
    pieces = [min(rows, PIPE_TOKENS - s) for s in range(0, PIPE_TOKENS, rows)]
    assert pieces == [5, 5, 5, 5, 3]
    for name in PIPE_CODECS:
        codec = make_codec(name, calibration=cal)
        for algo in ["gather", "two-shot"]:
            ref = simulate_all_reduce(partials, codec, algo, layer=LAYER, policy=AutoPolicy(chunk_bytes=0))
            if algo == "gather":  # what the chunks put on the wire: proves the message was split
                sent = sum((world - 1) * codec.payload_nbytes((t, HIDDEN)) for t in pieces)
            else:
                sent = sum(2 * (world - 1) * codec.payload_nbytes((-(-t // world), HIDDEN)) for t in pieces)
            for r in range(world):
                y, bytes_sent, calls = results[r][(name, algo)]
                assert torch.equal(y, ref), (name, algo, r)
                assert calls == 1 and bytes_sent == sent, (name, algo, r, bytes_sent, sent)


def _rank_big_result_or_failure(rank, world):
    """Rank 0: a result far larger than a pipe's buffer (64 KiB), computed from the rank
    alone; rank 1 raises. Both first pass a barrier: a rank that raised while its peer was
    still inside init_process_group closed the gloo pairs under it, and the peer failed with
    "connectFullMesh failed ... Connection closed by peer" (seen once under load)."""
    import torch.distributed as dist

    dist.barrier()
    if rank == 1:
        raise ValueError("planted failure on rank 1")
    return torch.randn(1024, 1024, generator=torch.Generator().manual_seed(100 + rank))  # 4 MiB


def test_rank_results_larger_than_a_pipe_arrive_whole():
    """Ranks hand their results to the parent through pipes (nothing on disk): a result of
    many pipe buffers arrives whole and the parent is not deadlocked by a rank blocked on
    a full pipe; a failed rank's error and traceback arrive too."""
    res = spawn_ranks(_rank_big_result_or_failure, 2, timeout_s=30, deadline_s=90, allow_failures=True)
    assert torch.equal(res[0], torch.randn(1024, 1024, generator=torch.Generator().manual_seed(100)))
    assert res[1]["error"] == "ValueError: planted failure on rank 1" and "Traceback" in res[1]["traceback"]
