"""scripts/projection.py: the interconnect projection from measured GPU kernel times.

The device-check documents here are tiny synthetic ones in scripts/gpu_check.py's schema, with
per-call times chosen by hand; every expected time is worked out in the test from those
times and the formulas the document states (bytes from the wire format's bits per value),
not taken from the script.
"""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
E = 8192
G32_BYTES = 4.5 / 8  # int4-g32: 4-bit codes + an fp16 scale per 32 values

# hand-chosen seconds per call: (encode, decode-and-sum, reduce-and-re-encode) per tokens
W2 = {32: (100e-6, 60e-6, 70e-6), 2048: (160e-6, 110e-6, 300e-6), 8192: (400e-6, 300e-6, 1100e-6)}
W8 = {2048: (130e-6, 240e-6, 1300e-6)}


@pytest.fixture(scope="module")
def projection():
    spec = importlib.util.spec_from_file_location("projection", ROOT / "scripts" / "projection.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["projection"] = mod  # its dataclass looks its module up while being built
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules["projection"]
    return mod


def _row(codec, tokens, enc, dec, red, bits=4.5):
    f = 4 * tokens * E
    return {"codec": codec, "tokens": tokens, "hidden": E, "bits_per_value": bits, "copy_gbps": 2000.0,
            "encode_fp32_gbps": f / enc / 1e9, "decode_sum_fp32_gbps": f / dec / 1e9, "reduce_encode_us": red * 1e6}


IDENTITY_OK = {"bytes_equal_finite": True, "bytes_equal_nan_inf": True, "sum_equal_finite": True,
               "sum_equal_nan_inf": True}


def _doc(world, table, codec="int4-g32", extra_rows=(), **top):
    rows = [_row(codec, t, *v) for t, v in table.items()]
    for r in rows[:1]:  # as gpu_check: the identity checks ride on a codec's first shape
        r.update(IDENTITY_OK)
    doc = {"environment": {"cuda": "Test GPU", "torch": "0"}, "device": "cuda", "dry_run_interpreter": False,
           "world": world, "repeats": 20, "complete": True, "skipped_for_budget": [], "command": "test",
           "rows": rows + list(extra_rows)}
    doc.update(top)
    return doc


def _write(path, doc):
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture
def files(tmp_path):
    return [_write(tmp_path / "w2.json", _doc(2, W2)), _write(tmp_path / "w8.json", _doc(8, W8))]


@pytest.fixture
def kernels(projection, files):
    return projection.MeasuredKernels([projection.load_gpu_check(p) for p in files])


LINK = (50e9, 8e-6)


def test_gather_tp2_is_wire_plus_the_measured_calls(projection, kernels):
    t = projection.allreduce_time("int4-g32", "gather", tokens=2048, tp=2, link=LINK, kernels=kernels)
    payload = 2048 * E * G32_BYTES
    wire = 1 * 8e-6 + payload / 50e9  # one step, one payload sent
    assert t["bytes_sent"] == payload
    assert t["total_s"] == pytest.approx(wire + 160e-6 + 110e-6, rel=1e-12)


def test_gather_other_worlds_measured_or_bytes_model(projection, kernels):
    enc = 160e-6
    # TP 4: no world-4 rows -> the world-2 decode-and-sum scaled by (4p + 4)/(2p + 4)
    t4 = projection.allreduce_time("int4-g32", "gather", tokens=2048, tp=4, link=(1e30, 0.0), kernels=kernels)
    assert t4["codec_s"] == pytest.approx(enc + 110e-6 * (4 * G32_BYTES + 4) / (2 * G32_BYTES + 4), rel=1e-12)
    # TP 8: the measured world-8 row as it is
    t8 = projection.allreduce_time("int4-g32", "gather", tokens=2048, tp=8, link=(1e30, 0.0), kernels=kernels)
    assert t8["codec_s"] == pytest.approx(enc + 240e-6, rel=1e-12)
    # TP 16: the world-8 row scaled by (16p + 4)/(8p + 4)
    t16 = projection.allreduce_time("int4-g32", "gather", tokens=2048, tp=16, link=(1e30, 0.0), kernels=kernels)
    assert t16["codec_s"] == pytest.approx(enc + 240e-6 * (16 * G32_BYTES + 4) / (8 * G32_BYTES + 4), rel=1e-12)
    # above the largest measured shape: in proportion to the tokens
    big = projection.allreduce_time("int4-g32", "gather", tokens=16384, tp=2, link=(1e30, 0.0), kernels=kernels)
    assert big["codec_s"] == pytest.approx(2 * (400e-6 + 300e-6), rel=1e-12)


def test_two_shot_interpolates_the_chunk_size(projection, kernels):
    # TP 2, 2048 tokens: chunks of 1024 rows, between the measured 32 and 2048
    f = (1024 - 32) / (2048 - 32)
    lerp = [a + f * (b - a) for a, b in zip(W2[32], W2[2048])]
    enc, dec2, red2 = lerp
    dec1 = dec2 * (G32_BYTES + 4) / (2 * G32_BYTES + 4)  # a decode of one payload, bytes model
    chunk = 1024 * E * G32_BYTES
    wire = 2 * 1 * 8e-6 + 2 * 1 * chunk / 50e9
    t = projection.allreduce_time("int4-g32", "two-shot", tokens=2048, tp=2, link=LINK, kernels=kernels)
    assert t["bytes_sent"] == 2 * chunk
    assert t["total_s"] == pytest.approx(wire + 2 * enc + red2 + 2 * dec1, rel=1e-12)


def test_two_shot_small_chunks_take_the_smallest_shapes_time(projection, kernels):
    # decode step, TP 8: chunks of 4 rows are below the measured 32 -> the 32-token times; the
    # world-8 rows start at 2048 tokens, so the reduce comes from world 2 scaled by (8 + 1)/(2 + 1)
    enc, dec2, red2 = W2[32]
    dec1 = dec2 * (G32_BYTES + 4) / (2 * G32_BYTES + 4)
    t = projection.allreduce_time("int4-g32", "two-shot", tokens=32, tp=8, link=(1e30, 0.0), kernels=kernels)
    assert t["codec_s"] == pytest.approx(8 * enc + red2 * 9 / 3 + 8 * dec1, rel=1e-12)


def test_batched_two_shot_is_one_call_at_the_message_size(projection, kernels):
    # TP 8, 2048 tokens: the same wire as two-shot; the 8 chunk encodes (256 rows each) become one
    # encode of 8 * 256 = 2048 rows (measured: 160 us), the 8 decodes of one payload one decode of
    # 2048 rows (decode-and-sum of 2 at 2048 rows, bytes model to 1 payload); the reduce of 8 at
    # 256 rows is as in two-shot (world 2 rows interpolated, x (8 + 1) / (2 + 1))
    f = (256 - 32) / (2048 - 32)
    red2 = W2[32][2] + f * (W2[2048][2] - W2[32][2])
    dec1 = W2[2048][1] * (G32_BYTES + 4) / (2 * G32_BYTES + 4)
    t = projection.allreduce_time("int4-g32", "two-shot-batched", tokens=2048, tp=8, link=LINK, kernels=kernels)
    plain = projection.allreduce_time("int4-g32", "two-shot", tokens=2048, tp=8, link=LINK, kernels=kernels)
    assert t["bytes_sent"] == plain["bytes_sent"] and t["wire_s"] == plain["wire_s"]
    assert t["codec_s"] == pytest.approx(160e-6 + red2 * 9 / 3 + dec1, rel=1e-12)
    assert [c["calls"] for c in t["calls"]] == [1, 1, 1] and [c["calls"] for c in plain["calls"]] == [8, 1, 8]


def test_batched_rows_are_labelled_and_judged_apart(projection, kernels, tmp_path):
    rows = projection.project(kernels)
    assert any(r["scheme"] == "int4-g32 two-shot (batched launches)" for r in rows)
    judged = projection.goals(rows)
    assert [g["path"] for g in judged] == [projection.PER_CHUNK] * 3 + [projection.BATCHED_NOTE] * 3
    assert all(g["scheme"].endswith(projection.BATCHED) == (g["path"] != projection.PER_CHUNK) for g in judged)
    assert "measured where" in projection.BATCHED_NOTE and "else modelled" in projection.BATCHED_NOTE


def _with_batched(doc, tokens, enc_us, dec_us, equal=True):
    row = next(r for r in doc["rows"] if r["tokens"] == tokens)
    row.update({"two_shot_world": doc["world"], "two_shot_encode_chunks_us": enc_us,
                "two_shot_decode_chunks_us": dec_us, "two_shot_bytes_equal": equal, "two_shot_decode_equal": True})
    return doc


@pytest.mark.parametrize("equal", [True, False])
def test_measured_batched_calls_replace_the_model_only_when_bitwise(projection, tmp_path, equal):
    # world 8 at 2048 tokens timed the batched calls (777 us encode, 555 us decode): the batched
    # two-shot at TP 8 uses them; at TP 4 (not run) it keeps the model; a run whose batched bytes
    # were not the reference's is never read as a speed
    files = [_write(tmp_path / "w2.json", _doc(2, W2)),
             _write(tmp_path / "w8.json", _with_batched(_doc(8, W8), 2048, 777.0, 555.0, equal))]
    k = projection.MeasuredKernels([projection.load_gpu_check(p) for p in files])
    t = projection.allreduce_time("int4-g32", "two-shot-batched", tokens=2048, tp=8, link=LINK, kernels=k)
    enc, _, dec = t["calls"]
    if equal:
        assert (enc["each_us"], dec["each_us"]) == pytest.approx((777.0, 555.0), rel=1e-12)
        assert enc["basis"] == dec["basis"] == "measured batched, world 8"
    else:
        assert enc["basis"].startswith("model") and dec["basis"].startswith("model")
        assert enc["each_us"] == pytest.approx(160.0, rel=1e-12)
    t4 = projection.allreduce_time("int4-g32", "two-shot-batched", tokens=2048, tp=4, link=LINK, kernels=k)
    assert t4["calls"][0]["basis"].startswith("model")
    k.timing = "graph"  # the batched times are eager calls: the GPU-time-alone projection models them
    assert k.encode_chunks_s("int4-g32", 256, 8)[1].startswith("model")


def test_project_rows_scale_one_call_to_the_forward_pass(projection, kernels):
    rows = projection.project(kernels)
    pick = lambda scheme: next(r for r in rows if r["phase"] == "prefill" and r["tp"] == 2 and r["scheme"] == scheme
                               and r["link"] == projection.PCIE)
    base, g = pick("bf16 all-reduce"), pick("int4-g32 gather")
    m = 2048 * E
    bf16 = min(2 * 8e-6 + 2 * 1 / 2 * m * 2 / 50e9, 8e-6 + m * 2 / 50e9)
    mine = 8e-6 + m * G32_BYTES / 50e9 + 160e-6 + 110e-6
    assert base["comm_ms_per_pass"] == pytest.approx(80 * 2 * bf16 * 1e3, rel=1e-12)
    assert g["comm_speedup"] == pytest.approx(bf16 / mine, rel=1e-12)
    # codecs without a measured row are left out, not guessed
    assert not any(r["scheme"].startswith("int4-outlier") for r in rows)


def test_goals_follow_the_measured_speed(projection, tmp_path):
    def judged(scale):
        table = {t: tuple(s * scale for s in v) for t, v in W2.items()}
        k = projection.MeasuredKernels([projection.load_gpu_check(_write(tmp_path / "w.json", _doc(2, table)))])
        return {g["link"]: g for g in projection.goals(projection.project(k)) if g["path"] == projection.PER_CHUNK}

    fast = judged(1e-6)  # codec nearly free: the wire byte ratio decides
    m = 2048 * E
    bf16_pcie = 2 * 3 * 8e-6 + 2 * 7 / 8 * m * 2 / 50e9
    two_shot_pcie = 2 * 3 * 8e-6 + 2 * 7 * 256 * E * G32_BYTES / 50e9
    assert fast[projection.PCIE]["comm_speedup"] == pytest.approx(bf16_pcie / two_shot_pcie, rel=1e-3)
    assert fast[projection.PCIE]["met"] and fast[projection.IB]["met"] and fast[projection.NVLINK]["met"]
    slow = judged(1.0)
    assert not slow[projection.PCIE]["met"] and not slow[projection.NVLINK]["met"]


def test_bytes_model_check_against_the_measured_world8(projection, kernels):
    check = {(c["op"], c["tokens"]): c for c in projection.honesty_check(kernels)}
    dec = check[("decode-and-sum", 2048)]
    assert dec["measured_us"] == pytest.approx(240)
    assert dec["model_us"] == pytest.approx(110 * (8 * G32_BYTES + 4) / (2 * G32_BYTES + 4))
    assert check[("reduce-and-re-encode", 2048)]["model_us"] == pytest.approx(300 * 9 / 3)


# ----------------------------------------------------------------- refusals
@pytest.mark.parametrize("doc, words", [
    ({"environment": {"cuda": "NVIDIA H200"}, "shape": [8192, 8192],
      "rows": [{"codec": "int4", "bits_per_value": 4.0, "encode_gbps": 200.0, "decode_gbps": 380.0}]}, "old"),
    (_doc(2, W2, dry_run_interpreter=True, device="cpu"), "dry run"),
    (_doc(2, W2, device="cpu"), "not a GPU"),
    (_doc(2, {}, extra_rows=[{"codec": "int4-g32", "tokens": 32, "hidden": E, "error": "Boom: x"}]), "every row failed"),
    (_doc(2, {2048: W2[2048]}, extra_rows=[{"codec": "int8", "tokens": 32, "hidden": E, "copy_gbps": 1.0}]), "lacks"),
])
def test_unusable_device_checks_are_refused(projection, tmp_path, doc, words):
    path = _write(tmp_path / "bad.json", doc)
    with pytest.raises(projection.ProjectionInputError, match=words):
        projection.load_gpu_check(path)
    with pytest.raises(SystemExit) as exc:  # the CLI says it in one line
        projection.main(["--gpu-check", str(path), "--out", str(tmp_path / "p.md")])
    msg = str(exc.value.code)
    assert msg.startswith("projection: ") and "\n" not in msg and words in msg


def test_a_changed_wire_format_is_refused(projection, tmp_path):
    doc = _doc(2, W2)
    for r in doc["rows"]:
        r["bits_per_value"] = 4.25
    with pytest.raises(projection.ProjectionInputError, match="wire format changed"):
        projection.MeasuredKernels([projection.load_gpu_check(_write(tmp_path / "w.json", doc))])


def test_error_rows_are_left_out_and_listed(projection, tmp_path):
    err = [{"codec": "int8", "tokens": t, "hidden": E, "error": "AttributeError: boom"} for t in (32, 2048)]
    w2 = _write(tmp_path / "w2.json", _doc(2, W2, extra_rows=err))
    k = projection.MeasuredKernels([projection.load_gpu_check(w2)])
    assert k.has("int4-g32") and not k.has("int8")
    out = tmp_path / "projection.md"
    projection.write_doc(out, [w2])
    text = out.read_text()
    assert "Left out of the GPU tables" in text and "int8 two-shot" in text and "AttributeError: boom" in text
    assert "| int8 two-shot |" not in text.split("## Contrast")[0]
    assert (tmp_path / "projection.json").exists()


def test_codecs_not_bitwise_the_reference_and_incomplete_runs_are_reported(projection, tmp_path):
    doc = _doc(2, W2, extra_rows=[dict(_row("mxfp4", 32, *W2[32], bits=4.25), sum_equal_finite=False)],
               complete=False, skipped_for_budget=["int8@32x8192"])
    doc["rows"][0]["bytes_equal_finite"] = True  # int4-g32 checked and equal: kept
    path = _write(tmp_path / "w2.json", doc)
    k = projection.MeasuredKernels([projection.load_gpu_check(path)])
    assert k.has("int4-g32") and not k.has("mxfp4")
    out = tmp_path / "projection.md"
    projection.write_doc(out, [path])
    text = out.read_text()
    assert "`mxfp4`: not bitwise the CPU reference (sum_equal_finite=False at world 2)" in text
    assert "INCOMPLETE run" in text and "int8@32x8192" in text


def test_a_codec_wrong_at_world8_is_left_out_at_every_world(projection, tmp_path):
    """A wrong world-8 decode-and-sum drops the codec everywhere (its world-2 rows would
    otherwise feed the bytes model for TP 8) and the doc says why."""
    w8 = _doc(8, W8)
    w8["rows"][0]["sum_equal_nan_inf"] = False
    mx = [dict(_row("mxfp4", t, *W2[t], bits=4.25), **IDENTITY_OK) for t in W2]
    paths = [_write(tmp_path / "w2.json", _doc(2, W2, extra_rows=mx)), _write(tmp_path / "w8.json", w8)]
    k = projection.MeasuredKernels([projection.load_gpu_check(p) for p in paths])
    assert k.has("mxfp4") and not k.has("int4-g32") and not k.worlds("int4-g32")
    assert "sum_equal_nan_inf=False at world 8" in k.failed[("int4-g32", 2)]


def test_rows_without_identity_evidence_are_left_out(projection, tmp_path):
    """gpu_check writes the identity checks on a codec's first shape only; if that row failed,
    the later rows prove nothing about the bits and their speeds are not used."""
    doc = _doc(2, W2)
    extra = [_row("int8", t, *W2[t], bits=8.0) for t in (2048, 8192)]
    doc["rows"] += [{"codec": "int8", "tokens": 32, "hidden": E, "error": "RuntimeError: boom"}] + extra
    k = projection.MeasuredKernels([projection.load_gpu_check(_write(tmp_path / "w2.json", doc))])
    assert k.has("int4-g32") and not k.has("int8")
    assert k.failed[("int8", 2)] == "RuntimeError: boom"


def test_default_files_rule(projection, tmp_path):
    old = {"environment": {}, "shape": [8192, 8192], "rows": [{"codec": "int4", "encode_gbps": 1, "decode_gbps": 1}]}
    _write(tmp_path / "gpu_check.json", old)
    with pytest.raises(projection.ProjectionInputError, match="no fused-kernel device check"):
        projection.default_gpu_checks(tmp_path)
    for name in ("gpu_check_h100_run2.json", "gpu_check_h100_run10.json", "gpu_check_h100_run10_world8.json",
                 "gpu_check_h100_run2_world8.json"):
        _write(tmp_path / name, _doc(2, W2))
    assert [p.name for p in projection.default_gpu_checks(tmp_path)] == [
        "gpu_check_h100_run10.json", "gpu_check_h100_run10_world8.json"]
    _write(tmp_path / "gpu_check.json", _doc(2, W2))  # the final run in the fused schema wins
    assert [p.name for p in projection.default_gpu_checks(tmp_path)] == ["gpu_check.json"]
    _write(tmp_path / "gpu_check_world8.json", _doc(8, W8))
    assert [p.name for p in projection.default_gpu_checks(tmp_path)] == ["gpu_check.json", "gpu_check_world8.json"]


def test_the_doc_states_its_sources_and_no_assumed_scenario(projection, files, tmp_path):
    out = tmp_path / "projection.md"
    projection.write_doc(out, files)
    text = out.read_text()
    assert projection.COMMAND in text and "Test GPU" in text and "w8.json" in text
    assert "## Goals of issue 8" in text and "TP 64" in text and "100 GbE" in text
    assert "modelled, not measured" in text
    assert "fused-kernel scenario" not in text.lower() and not hasattr(projection, "FUSED_VALUES_PER_S")


def test_the_bytes_follow_the_wire_format(projection, kernels):
    e = projection.MODEL["hidden"]
    ring = projection.allreduce_time("bf16", "allreduce", tokens=64, tp=4, link=(10e9, 0.0))
    assert ring["bytes_sent"] == pytest.approx(2 * 3 / 4 * 64 * e * 2)
    gather = projection.allreduce_time("int4-g32", "gather", tokens=64, tp=4, link=(10e9, 0.0), kernels=kernels)
    # gather sends N-1 payloads of b bits/value, a bf16 ring 2(N-1)/N x 16 bits: ratio N * b / 32
    assert gather["bytes_sent"] / ring["bytes_sent"] == pytest.approx(4 * 4.5 / 32)
    two = projection.allreduce_time("int4-g32", "two-shot", tokens=64, tp=4, link=(10e9, 0.0), kernels=kernels)
    assert two["bytes_sent"] / ring["bytes_sent"] == pytest.approx(4.5 / 16)


def test_graph_timing_uses_the_gpu_time_alone(projection, tmp_path):
    """--timing graph takes gpu_check's CUDA-graph replay times for encode and decode-and-sum
    (reduce-and-re-encode stays eager); rows without them are left out with the reason."""
    doc = _doc(2, W2)
    for r in doc["rows"]:
        r["graph_encode_us"], r["graph_decode_sum_us"] = 7.0 * r["tokens"] / 32, 5.0 * r["tokens"] / 32
    mx = [dict(_row("mxfp4", t, *W2[t], bits=4.25), **IDENTITY_OK) for t in W2]  # eager only
    path = _write(tmp_path / "w2.json", dict(doc, rows=doc["rows"] + mx))
    eager = projection.MeasuredKernels([projection.load_gpu_check(path)])
    graph = projection.MeasuredKernels([projection.load_gpu_check(path)], "graph")
    assert eager.encode_s("int4-g32", 2048)[0] == pytest.approx(W2[2048][0])
    assert graph.encode_s("int4-g32", 2048)[0] == pytest.approx(7.0 * 64 * 1e-6)
    assert graph.decode_sum_s("int4-g32", 2048, 2)[0] == pytest.approx(5.0 * 64 * 1e-6)
    assert graph.reduce_encode_s("int4-g32", 2048, 2)[0] == pytest.approx(W2[2048][2])
    assert eager.has("mxfp4") and not graph.has("mxfp4")
    assert graph.failed[("mxfp4", 2)] == "no CUDA-graph timing in the run"
    out = tmp_path / "projection-graph.md"
    projection.write_doc(out, [path], timing="graph")
    assert "the GPU's time alone" in out.read_text() and "--timing graph" in out.read_text()
    with pytest.raises(projection.ProjectionInputError, match="timing"):
        projection.MeasuredKernels([projection.load_gpu_check(path)], "fast")


# ----------------------------------------------------------------- the owner stage from its own files
def _split_doc(rows, device="NVIDIA H100 80GB HBM3"):
    """scripts/gpu_reduce_split.py's schema: ``tokens`` is the whole message, ``chunk_rows`` the owner's chunk."""
    return {"device": device, "command": "test", "repeats": 10, "dry_run_interpreter": False,
            "rows": [{"codec": c, "world": w, "tokens": t, "hidden": E, "chunk_rows": -(-t // w), "equal": eq,
                      "copy_us": 1.0, "fused_us": 999.0, "split_us": us, "split_over_fused": us / 999.0}
                     for c, w, t, us, eq in rows]}


def _h100_gpu_check(tmp_path, codec="int8", bits=8.0):
    doc = _doc(2, W2)
    doc["environment"]["cuda"] = "NVIDIA H100 80GB HBM3"
    doc["rows"] = [dict(_row(codec, t, *v, bits=bits), graph_encode_us=v[0] * 1e6, graph_decode_sum_us=v[1] * 1e6)
                   for t, v in W2.items()]
    doc["rows"][0].update(IDENTITY_OK)
    return _write(tmp_path / "w2.json", doc)


def test_the_owner_stage_is_the_split_time_of_the_chunk_and_modelled_elsewhere(projection, tmp_path):
    """A split row prices the owner stage of its world at its CHUNK's rows (T / world), not at T;
    another world takes the split bytes model from the largest world run below it; a row whose
    payloads were not the reference's is never read as a speed."""
    w2 = _h100_gpu_check(tmp_path)
    split = _write(tmp_path / "rs.json", _split_doc([("int8", 2, 2048, 31.0, True), ("int8", 2, 8192, 130.0, True),
                                                     ("int8", 8, 2048, 15.0, True), ("int8", 8, 8192, 60.0, False)]))
    k = projection.MeasuredKernels([projection.load_gpu_check(w2)], "graph",
                                   [projection.load_reduce_split(split)])
    red = lambda tokens, tp: projection.allreduce_time("int8", "two-shot-batched", tokens=tokens, tp=tp, link=LINK,
                                                       kernels=k)["calls"][1]
    c = red(2048, 8)  # chunk 256 rows: the world-8 row as it is
    assert c["each_us"] == pytest.approx(15.0, rel=1e-12) and c["basis"].startswith("measured")
    assert "rs.json" in c["basis"]
    assert red(2048, 2)["each_us"] == pytest.approx(31.0, rel=1e-12)  # chunk 1024
    f = (2048 - 1024) / (4096 - 1024)  # T 4096 at TP 2: chunk 2048, between the chunks of 1024 and 4096 rows
    assert red(4096, 2)["each_us"] == pytest.approx(31.0 + f * (130.0 - 31.0), rel=1e-12)
    assert red(8192, 8)["each_us"] == pytest.approx(15.0 * 1024 / 256, rel=1e-12)  # the unequal row is not used
    p = 1.0  # int8: one byte per value (its scales are per channel, outside the payload's per-value bytes)
    scale = (16 * p + 8 + p) / (8 * p + 8 + p)  # TP 16, chunk 128 < 256: the smallest chunk's time, scaled
    c16 = red(2048, 16)
    assert c16["each_us"] == pytest.approx(15.0 * scale, rel=1e-9) and c16["basis"].startswith("modelled")
    c4 = red(2048, 4)  # world 4 not run: from world 2 (chunk 512 below its smallest, 1024)
    assert c4["each_us"] == pytest.approx(31.0 * (4 * p + 8 + p) / (2 * p + 8 + p), rel=1e-9)
    assert "world 2" in c4["basis"]


def test_owner_stage_files_need_graph_timing_and_one_device(projection, tmp_path):
    w2 = projection.load_gpu_check(_h100_gpu_check(tmp_path))
    split = projection.load_reduce_split(_write(tmp_path / "rs.json", _split_doc([("int8", 2, 2048, 31.0, True)])))
    with pytest.raises(projection.ProjectionInputError, match="--timing graph"):
        projection.MeasuredKernels([w2], "eager", [split])
    h200 = projection.load_reduce_split(_write(tmp_path / "rs200.json", _split_doc([("int8", 2, 2048, 31.0, True)],
                                                                                    device="NVIDIA H200")))
    with pytest.raises(projection.ProjectionInputError, match="more than one device"):
        projection.MeasuredKernels([w2], "graph", [h200])
    dry = dict(_split_doc([("int8", 2, 2048, 31.0, True)]), dry_run_interpreter=True)
    with pytest.raises(projection.ProjectionInputError, match="dry run"):
        projection.load_reduce_split(_write(tmp_path / "dry.json", dry))


def _committed(name):
    return json.loads((ROOT / "docs" / "bench" / name).read_text())


def test_the_h100_projection_prices_the_owner_stage_from_the_committed_runs(projection, tmp_path):
    """docs/projection-h100's command, run here: at every TP where a stop-26 run timed the owner
    stage at the prefill's chunk, the projection's owner-stage call is that run's number, read
    here from the JSON files themselves (split for the static and rot-* codecs, the feedback-cost
    run's fused owner stage for the group codecs), and the document names the file."""
    out = tmp_path / "projection-h100.md"
    projection.main(["--inputs", "h100-stop26", "--out", str(out)])
    res = json.loads(out.with_suffix(".json").read_text())
    assert len({d for d in res["sources"] if "h200" in d.lower()}) == 0
    split = [r for name in ("gpu_reduce_split_h100_stop26_run2.json", "gpu_reduce_split_h100_stop26_run3_world8.json")
             for r in _committed(name)["rows"] if "split_us" in r and r["tokens"] == 2048]
    fused = [r for r in _committed("gpu_feedback_cost_h100_stop26_run2.json")["rows"] if r["tokens"] == 2048]
    want = {(r["codec"], r["world"]): r["split_us"] for r in split}
    want.update({(r["codec"], r["world"]): r["two_shot_reduce_us"] for r in fused})
    seen = 0
    for row in res["rows_gpu_codec"]:
        codec = next((c for label, c, a in projection.SCHEMES if label == row["scheme"]), None)
        if row["phase"] != "prefill" or "two-shot" not in row["scheme"] or (codec, row["tp"]) not in want:
            continue
        owner = row["codec_calls"][1]
        assert owner["op"] == f"reduce-and-re-encode of {row['tp']}"
        assert owner["each_us"] == pytest.approx(want[(codec, row["tp"])], rel=1e-12), (codec, row["tp"])
        assert owner["basis"].startswith("measured") and "stop26" in owner["basis"]
        seen += 1
    # rot-lm4, int4-outlier, int8 at TP 2, 4, 8; int4-g32, int4-g128, mxfp4 at TP 2, 8; x 2 paths x 4 links
    assert seen == (3 * 3 + 3 * 2) * 2 * len(projection.LINKS)
    text = out.read_text()
    assert "--inputs" not in text and "--reduce-split docs/bench/gpu_reduce_split_h100_stop26_run2.json" in text
    assert "NVIDIA H100 80GB HBM3" in text and "H200" not in text.split("## Goals")[0]


def test_a_world_kept_from_a_log_and_a_codec_filter(projection, tmp_path):
    """A cut run's rows kept from its log (the GPU's name as device, a note, bits rounded to 3
    decimals) load as that GPU's rows and say so; FILE:codec reads only that codec's rows."""
    log = {"device": "NVIDIA H100 80GB HBM3", "world": 8, "command": "test", "complete": False, "note": "from the log",
           "rows": [dict(_row("int4-g128", 2048, *W8[2048], bits=4.125), **IDENTITY_OK),
                    dict(_row("int4-random-k", 2048, *W8[2048], bits=4.188), **IDENTITY_OK)]}
    path = _write(tmp_path / "w8.json", log)
    doc = projection.load_gpu_check(path)
    assert doc["environment"]["cuda"] == "NVIDIA H100 80GB HBM3" and doc["from_log"] == "from the log"
    w2 = _doc(2, W2, codec="int4-random-k")
    w2["environment"]["cuda"] = "NVIDIA H100 80GB HBM3"
    for r in w2["rows"]:
        r["bits_per_value"] = 4.1875
    k = projection.MeasuredKernels([projection.load_gpu_check(_write(tmp_path / "w2.json", w2)), doc])
    assert k.bits["int4-random-k"] == 4.1875 and k.worlds("int4-random-k") == [2, 8]
    picked = projection.load_gpu_check(f"{path}:int4-g128")
    assert [r["codec"] for r in picked["rows"]] == ["int4-g128"] and picked["codecs_used"] == ["int4-g128"]
    with pytest.raises(projection.ProjectionInputError, match="no rows for int8"):
        projection.load_gpu_check(f"{path}:int8")
    bad = dict(log, rows=[dict(r, bits_per_value=4.3) for r in log["rows"][1:]])
    with pytest.raises(projection.ProjectionInputError, match="wire format changed"):
        projection.MeasuredKernels([projection.load_gpu_check(tmp_path / "w2.json"),
                                    projection.load_gpu_check(_write(tmp_path / "bad.json", bad))])
    # the 3-decimal tolerance is the log's only: a run's own JSON must match the wire format exactly
    for r in w2["rows"]:
        r["bits_per_value"] = 4.188
    with pytest.raises(projection.ProjectionInputError, match="wire format changed"):
        projection.MeasuredKernels([projection.load_gpu_check(_write(tmp_path / "w2r.json", w2))])


def test_split_rows_price_the_owner_stage_only_while_the_library_runs_it_split(projection, tmp_path, monkeypatch):
    from lowbit_tp.kernels import triton_static

    w2 = projection.load_gpu_check(_h100_gpu_check(tmp_path))
    split = projection.load_reduce_split(_write(tmp_path / "rs.json", _split_doc([("int8", 8, 2048, 15.0, True)])))
    assert projection.owner_stage("int8") == "split" and projection.owner_stage("int4-g32") == "fused"
    monkeypatch.setattr(triton_static, "REDUCE_VARIANT", "fused")
    assert projection.owner_stage("int8") == "fused"
    k = projection.MeasuredKernels([w2], "graph", [split])
    assert not k.owner  # the split rows time a path the library would not run
    _, basis = k.reduce_encode_s("int8", 256, 8)
    assert "split" not in basis


def test_the_h100_goals_recomputed_from_the_committed_runs_and_the_link_formula(projection, tmp_path):
    """The headline: docs/projection-h100's batched int4-g128 two-shot at TP 8 (2048 tokens),
    recomputed here without the projection's code: its three calls are the feedback-cost run's
    `two_shot_encode_us`, `two_shot_reduce_us` and `two_shot_decode_us` (in that order); the wire
    is 2*3 steps of alpha plus 2*7 chunk payloads of [256, 8192] int4 with an fp16 scale per 128
    values; bf16 is the faster of ring and recursive doubling on [2048, 8192] bf16. The speed-ups
    (PCIe 2.89x, InfiniBand 3.04x, NVLink 1.19x) and the error-feedback rows (the *_feedback_us
    columns) follow."""
    out = tmp_path / "projection-h100.md"
    projection.main(["--inputs", "h100-stop26", "--out", str(out)])
    res = json.loads(out.with_suffix(".json").read_text())
    fb = next(r for r in _committed("gpu_feedback_cost_h100_stop26_run2.json")["rows"]
              if r["codec"] == "int4-g128" and r["world"] == 8 and r["tokens"] == 2048)
    m, chunk = 2048 * 8192, 256 * 8192
    p_chunk = chunk // 2 + 2 * chunk // 128
    links = {"PCIe Gen5 x16 (50 GB/s)": (50e9, 8e-6, 2.89), "400 Gb InfiniBand (45 GB/s)": (45e9, 5e-6, 3.04),
             "NVLink (H100/H200, 450 GB/s)": (450e9, 3e-6, 1.19)}
    text = out.read_text()
    for link, (bw, alpha, headline) in links.items():
        bf16 = min(6 * alpha + 2 * 7 / 8 * m * 2 / bw, 3 * alpha + 3 * m * 2 / bw)
        wire = 6 * alpha + 14 * p_chunk / bw
        plain = [fb["two_shot_encode_us"], fb["two_shot_reduce_us"], fb["two_shot_decode_us"]]
        goal = next(g for g in res["goals"] if g["link"] == link and g["path"] != projection.PER_CHUNK)
        assert goal["scheme"] == "int4-g128 two-shot (batched launches)"
        row = next(r for r in res["rows_gpu_codec"] if r["phase"] == "prefill" and r["tp"] == 8
                   and r["link"] == link and r["scheme"] == goal["scheme"])
        assert [c["each_us"] * c["calls"] for c in row["codec_calls"]] == pytest.approx(plain, rel=1e-9)
        speed = bf16 / (wire + sum(plain) * 1e-6)
        assert goal["comm_speedup"] == pytest.approx(speed, rel=1e-9) and round(speed, 2) == headline
        with_fb = bf16 / (wire + (fb["two_shot_encode_feedback_us"] + fb["two_shot_reduce_feedback_us"]
                                  + fb["two_shot_decode_us"]) * 1e-6)
        assert f"| {link} | int4-g128 two-shot (batched launches) |" in text
        assert f"| {with_fb:.2f}x | {goal['need']}x: {'met' if with_fb >= goal['need'] else 'not met'} |" in text
    assert "0.77x | 0.95x: not met" in text  # NVLink with feedback


# ----------------------------------------------------------------- a synthetic feedback-cost file
def _fb_row(codec, world, tokens, enc, red, dec, **extra):
    """scripts/gpu_feedback_cost.py's row schema (GPU time alone, microseconds); the feedback
    columns are twice the plain ones, so a mix-up between them shows."""
    return dict({"codec": codec, "world": world, "tokens": tokens, "hidden": E, "copy_us": 50.0,
                 "two_shot_encode_us": enc, "two_shot_reduce_us": red, "two_shot_decode_us": dec,
                 "two_shot_encode_feedback_us": 2 * enc, "two_shot_reduce_feedback_us": 2 * red}, **extra)


def _fb_doc(equal_w8, device="NVIDIA H100 80GB HBM3"):
    """int4-g32 at worlds 2 and 8, 2048 and 8192 tokens; ``two_shot_equal`` rides on a
    (codec, world)'s first shape, as gpu_feedback_cost writes it."""
    return {"device": device, "command": "test", "repeats": 10,
            "reduce_variants": {"static": "split", "rot": "split"},
            "rows": [_fb_row("int4-g32", 2, 2048, 21.0, 22.0, 23.0, payload_equal=True, two_shot_equal=True),
                     _fb_row("int4-g32", 2, 8192, 81.0, 82.0, 83.0),
                     _fb_row("int4-g32", 8, 2048, 31.0, 40.0, 33.0, payload_equal=True, two_shot_equal=equal_w8),
                     _fb_row("int4-g32", 8, 8192, 121.0, 150.0, 123.0)]}


@pytest.mark.parametrize("equal_w8", [True, False])
def test_a_feedback_cost_file_prices_two_shot_only_where_bitwise_and_scales_tp16_by_the_fused_rule(
        projection, tmp_path, equal_w8):
    """A synthetic feedback-cost file: int4-g32's world-8 rows price the batched two-shot at TP 8
    only when that (codec, world) was bitwise the reference (`two_shot_equal`); when it was not,
    none of its numbers (31/40/33, 121/150/123) may appear, and TP 8 falls back to world 2 and
    gpu_check's rows. TP 16 and 32 were not run: the fused owner stage is the largest run world's
    time x (N + 1)/(w + 1). Every expected number is worked out here from the file's numbers."""
    w2 = projection.load_gpu_check(_h100_gpu_check(tmp_path, codec="int4-g32", bits=4.5))
    fb = projection.load_feedback_cost(_write(tmp_path / "fb.json", _fb_doc(equal_w8)))
    assert projection.owner_stage("int4-g32") == "fused"
    k = projection.MeasuredKernels([w2], "graph", (), [fb])
    calls = lambda tokens, tp: [(c["each_us"], c["basis"]) for c in projection.allreduce_time(
        "int4-g32", "two-shot-batched", tokens=tokens, tp=tp, link=LINK, kernels=k)["calls"]]
    p = 4.5 / 8  # int4-g32 bytes per value
    enc_2048 = W2[2048][0] * 1e6  # gpu_check's world-2 graph encode at 2048 tokens: 160 us
    dec_2048 = W2[2048][1] * 1e6 * (1 * p + 4) / (2 * p + 4)  # one payload, from world 2's decode-and-sum of 2
    if equal_w8:
        w8_chunk256, w8_chunk1024 = 40.0, 150.0  # the world-8 owner stage at chunks 2048/8 and 8192/8
        (enc, eb), (red, rb), (dec, db) = calls(2048, 8)
        assert (enc, red, dec) == pytest.approx((31.0, 40.0, 33.0), rel=1e-12)
        assert "measured" in eb and "fb.json" in eb and rb.startswith("measured") and "fb.json" in db
        # TP 16: chunk 128 (below 256: its time) and chunk 2048 (above 1024: in proportion to the rows)
        tp16 = [(w8_chunk256, 2048), (w8_chunk1024 * 2048 / 1024, 32768)]
        w = 8
    else:
        assert ("int4-g32", 8) not in fb["verified"] and ("int4-g32", 2) in fb["verified"]
        (enc, eb), (red, rb), (dec, db) = calls(2048, 8)
        w2_chunk1024 = 22.0  # world 2's smallest chunk (2048 / 2); chunk 256 is below it
        assert red == pytest.approx(w2_chunk1024 * (8 + 1) / (2 + 1), rel=1e-12) and "world 2" in rb
        assert enc == pytest.approx(enc_2048, rel=1e-12) and eb.startswith("model")
        assert dec == pytest.approx(dec_2048, rel=1e-12) and db.startswith("model")
        # TP 16, chunk 2048: between world 2's chunks 1024 (22 us) and 4096 (82 us)
        tp16 = [(w2_chunk1024, 2048), (22.0 + (2048 - 1024) / (4096 - 1024) * (82.0 - 22.0), 32768)]
        w = 2
    for base, tokens in tp16:
        (enc, eb), (red, rb), _ = calls(tokens, 16)
        assert red == pytest.approx(base * (16 + 1) / (w + 1), rel=1e-12), (tokens, rb)
        assert rb.startswith("modelled") and f"world {w}" in rb and "(N + 1)/(w + 1)" in rb
        assert eb.startswith("model")  # no batched row at world 16
    (_, _), (red32, _), _ = calls(2048, 32)
    assert red32 == pytest.approx(tp16[0][0] * (32 + 1) / (w + 1), rel=1e-12)


# ----------------------------------------------------------------- the committed documents
COMMITTED_DOCS = ("projection.md", "projection-graph.md", "projection-graph-run6.md", "projection-h100.md")


def _header_argv(text):
    """The command a committed document says generated it (its first "Generated by `...`"), as argv."""
    import shlex

    command = text.split("Generated by `", 1)[1].split("`", 1)[0]
    assert command.startswith("PYTHONPATH=. python3 scripts/projection.py")
    return shlex.split(command)[3:]


@pytest.mark.parametrize("name", COMMITTED_DOCS)
def test_the_committed_documents_are_what_their_command_writes(projection, tmp_path, monkeypatch, name):
    """Each committed projection (Markdown and JSON) is byte for byte what the command in its own
    header writes from the committed inputs, so neither the documents nor their command can drift
    from the script. The only difference allowed is the `--out` path itself (here a temporary
    file, named once in the header and, for the documents with owner-stage files, once in the
    JSON's command line). The H100 document is
    also what its named input set (`--inputs h100-stop26`, the command README and the notes give)
    writes."""
    monkeypatch.chdir(ROOT)  # the headers name the inputs relative to the repository
    want_md = (ROOT / "docs" / name).read_text()
    want_json = (ROOT / "docs" / name).with_suffix(".json").read_text()
    argv = _header_argv(want_md)
    committed_out = None
    if "--out" in argv:
        i = argv.index("--out")
        committed_out = argv[i + 1]
        assert committed_out == f"docs/{name}"
        del argv[i:i + 2]
    runs = [argv] + ([["--inputs", "h100-stop26"]] if name == "projection-h100.md" else [])
    for k, args in enumerate(runs):
        out = tmp_path / str(k) / name
        out.parent.mkdir()
        projection.main(args + ["--out", str(out)])
        got_md, got_json = out.read_text(), out.with_suffix(".json").read_text()
        if committed_out:
            assert got_md.count(str(out)) == 1  # the header; and the JSON's command line where it has one
            assert got_json.count(str(out)) == int('"command_line"' in got_json)
            got_md, got_json = (t.replace(str(out), committed_out) for t in (got_md, got_json))
        assert got_md == want_md, f"docs/{name} is stale: regenerate it with the command in its header"
        assert got_json == want_json, f"docs/{name[:-3]}.json is stale: regenerate it with the command in its header"


# ----------------------------------------------------------------- a bytes-model call shows its arithmetic
def test_a_bytes_model_call_shows_its_inputs_and_formula(projection, kernels):
    """Synthetic: TP 8's decode-and-sum of [32, E] is world 2's measured 60 us x (8p + 4)/(2p + 4)
    (world 8 ran only 2048 rows, which took 240 us, more than the model: nothing more to say)."""
    t, basis = kernels.decode_sum_s("int4-g32", 32, 8)
    assert t == pytest.approx(60e-6 * (8 * G32_BYTES + 4) / (2 * G32_BYTES + 4), rel=1e-12)
    assert basis == ("bytes model from world 2: 60 us at 32 rows (measured) x (N*p + 4)/(w*p + 4) = "
                     "(8*0.5625 + 4)/(2*0.5625 + 4) = 1.66")
    t, basis = kernels.reduce_encode_s("int4-g32", 1024, 4)  # world 4 not run: from world 2, interpolated
    assert t == pytest.approx((70e-6 + (1024 - 32) / (2048 - 32) * 230e-6) * 5 / 3, rel=1e-12)
    assert basis.endswith("at 1024 rows (interpolated between its 32- and 2048-row shapes) x (N + 1)/(w + 1) = "
                          "(4 + 1)/(2 + 1) = 1.67")


# the cap: world N's own measured call on more rows bounds a bytes-model price from world w
W8_FAST = {2048: (130e-6, 80e-6, 150e-6), 8192: (400e-6, 200e-6, 500e-6)}  # world 8 faster than the model


@pytest.fixture
def capped(projection, tmp_path):
    files = [_write(tmp_path / "w2.json", _doc(2, W2)), _write(tmp_path / "w8.json", _doc(8, W8_FAST))]
    return projection.MeasuredKernels([projection.load_gpu_check(p) for p in files])


def test_a_bytes_model_price_above_the_worlds_own_larger_measured_call_is_capped_by_it(projection, capped):
    """Synthetic: world 8 ran only 2048 and 8192 rows. TP 8's owner stage of 256 rows is world 2's
    interpolated 95.6 us x (8 + 1)/(2 + 1) = 287 us by the bytes model, but world 8's own call of
    2048 rows (8x the rows) took 150 us: the price is 150 us, the cheapest larger call's (not
    8192 rows' 500 us), and the basis says so. Likewise decode-and-sum of 8 at 32 rows: world 2's
    60 us x (8p + 4)/(2p + 4) = 99.5 us, capped at world 8's 2048-row 80 us."""
    red256 = 70e-6 + (256 - 32) / (2048 - 32) * 230e-6
    assert red256 * 3 > 150e-6
    t, basis = capped.reduce_encode_s("int4-g32", 256, 8)
    assert t == 150e-6
    assert basis == ("bytes model from world 2: 95.6 us at 256 rows (interpolated between its 32- and 2048-row "
                     "shapes) x (N + 1)/(w + 1) = (8 + 1)/(2 + 1) = 3 gives 287 us; capped at world 8's measured "
                     "call of 2048 rows (150 us), a larger call")
    assert 60e-6 * (8 * G32_BYTES + 4) / (2 * G32_BYTES + 4) > 80e-6
    t, basis = capped.decode_sum_s("int4-g32", 32, 8)
    assert t == 80e-6
    assert basis.endswith("= 1.66 gives 99.5 us; capped at world 8's measured call of 2048 rows (80 us), a larger call")
    # and the all-reduce carries it: two-shot at TP 8, 2048 tokens = 8 encodes of 256 rows (world 2,
    # interpolated) + the capped owner stage + 8 decodes of one payload (world 2's bytes model to 1)
    f = (256 - 32) / (2048 - 32)
    enc = W2[32][0] + f * (W2[2048][0] - W2[32][0])
    dec1 = (W2[32][1] + f * (W2[2048][1] - W2[32][1])) * (G32_BYTES + 4) / (2 * G32_BYTES + 4)
    a = projection.allreduce_time("int4-g32", "two-shot", tokens=2048, tp=8, link=(1e30, 0.0), kernels=capped)
    assert a["codec_s"] == pytest.approx(8 * enc + 150e-6 + 8 * dec1, rel=1e-12)


def test_the_cap_binds_only_on_the_calls_own_world_and_only_when_the_model_is_above_it(projection, kernels, capped):
    """Synthetic: no cap where world N's larger call took more than the model's price (the
    standard fixture's world 8: 240 us decode-and-sum, 1300 us owner stage), nor from another
    world's call (TP 4 and TP 16 ran no rows of their own; world 8's 150/80 us do not bound them)."""
    t, basis = kernels.reduce_encode_s("int4-g32", 256, 8)
    red256 = 70e-6 + (256 - 32) / (2048 - 32) * 230e-6
    assert t == pytest.approx(red256 * 3, rel=1e-12) and "capped" not in basis
    t, basis = kernels.decode_sum_s("int4-g32", 32, 8)
    assert t == pytest.approx(60e-6 * (8 * G32_BYTES + 4) / (2 * G32_BYTES + 4), rel=1e-12) and "capped" not in basis
    t, basis = capped.reduce_encode_s("int4-g32", 256, 4)
    assert t == pytest.approx(red256 * 5 / 3, rel=1e-12) and t > 150e-6 and "capped" not in basis
    t, basis = capped.decode_sum_s("int4-g32", 32, 16)
    assert t == pytest.approx(60e-6 * (16 * G32_BYTES + 4) / (2 * G32_BYTES + 4), rel=1e-12) and t > 80e-6
    assert "capped" not in basis


def test_the_h200_goal_rows_owner_stage_is_capped_at_world_8s_measured_call(projection):
    """docs/projection.md's goal rows price int4-g128's TP-8 owner stage (8 payloads of the 256-row
    chunk). Worked out here from docs/bench/gpu_check*.json: world 8 ran only 2048 rows, so the
    bytes model gives world 2's eager reduce-and-re-encode (host launch cost included) read at
    256 rows between its 32- and 2048-row shapes, x (8 + 1)/(2 + 1) = 209 us. World 8's own
    measured call of 2048 rows (8x the chunk) took 174 us, less: the price is that call's time,
    and the document must say all of it."""
    w2 = {r["tokens"]: r["reduce_encode_us"] for r in _committed("gpu_check.json")["rows"] if r["codec"] == "int4-g128"}
    w8 = {r["tokens"]: r["reduce_encode_us"] for r in _committed("gpu_check_world8.json")["rows"]
          if r["codec"] == "int4-g128"}
    assert min(w8) == 2048 and {32, 2048} <= set(w2)
    at256 = w2[32] + (256 - 32) / (2048 - 32) * (w2[2048] - w2[32])
    model = at256 * 9 / 3
    assert round(model) == 209 and round(w8[2048]) == 174
    text = (ROOT / "docs" / "projection.md").read_text()
    call = (f"1 x reduce-and-re-encode of 8 [256, 8192] {w8[2048]:.3g} us (bytes model from world 2: {at256:.3g} us "
            "at 256 rows (interpolated between its 32- and 2048-row shapes) x (N + 1)/(w + 1) = (8 + 1)/(2 + 1) = 3 "
            f"gives {model:.3g} us; capped at world 8's measured call of 2048 rows ({w8[2048]:.3g} us), a larger call)")
    goals = text.split("## Goals")[1].split("##")[0]
    assert goals.count(call) == 3, call  # PCIe, InfiniBand, NVLink
