"""bench-e2e: the emulated network (namespaces + tc), the row arithmetic and a loopback smoke run
(the interconnect projection script: tests/test_projection.py).

The namespace tests need root and a kernel with network namespaces; they skip otherwise.
"""
import os
import subprocess
from pathlib import Path

import pytest

from lowbit_tp.bench import e2e, netns
from lowbit_tp.bench.e2e.model import byte_tokenizer
from lowbit_tp.bench.e2e.report import E2ERow, add_ratios, rows_of_run

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "lbtptest"  # not the benchmark's namespaces, so a running benchmark is left alone
# One pytest-xdist worker runs this file (make test: --dist loadgroup): its namespace tests share
# PREFIX, and netns.sh's `up` first removes every namespace of the prefix.
pytestmark = pytest.mark.xdist_group("netns")


def _leftover_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]


@pytest.fixture(scope="module")
def netns_ok():
    ok, why = netns.netns_available(prefix=PREFIX)
    if not ok:
        pytest.skip(f"network namespaces unavailable: {why}")


# ----------------------------------------------------------------- network emulation
def test_emulated_link_requires_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(netns.NetnsError, match="root"):
        with netns.emulated_link(world=2, rate="1gbit", prefix=PREFIX):
            pass


def test_emulated_link_shapes_and_tears_down(netns_ok):
    """200 Mbit/s on each rank's egress: an 8 MiB TCP transfer runs near that rate, not at
    veth speed (several Gbit/s), and nothing is left behind afterwards."""
    with netns.emulated_link(world=2, rate="200mbit", prefix=PREFIX) as hosts:
        assert hosts == ["10.77.0.1", "10.77.0.2"]
        assert set(_leftover_namespaces()) == {f"{PREFIX}-br", f"{PREFIX}0", f"{PREFIX}1"}
        bps = netns.measure_transfer(hosts=hosts, nbytes=8 << 20, timeout=20, prefix=PREFIX)
    assert 100e6 < bps < 230e6, bps
    assert _leftover_namespaces() == []


def test_emulated_link_cleans_up_on_error(netns_ok):
    with pytest.raises(RuntimeError, match="boom"):
        with netns.emulated_link(world=2, rate="1gbit", prefix=PREFIX):
            raise RuntimeError("boom")
    assert _leftover_namespaces() == []


def test_bad_rate_fails_clearly(netns_ok):
    with pytest.raises(netns.NetnsError, match="rate must look like"):
        with netns.emulated_link(world=1, rate="fast", prefix=PREFIX):
            pass
    assert _leftover_namespaces() == []


# ----------------------------------------------------------------- prompts and rows
def test_byte_tokenizer_is_one_token_per_utf8_byte():
    """Ids are 2 + the byte's rank in the byte-level alphabet (ids 0/1 are <s>/</s>), whatever
    the whitespace, punctuation or multi-byte characters around it; decode gives the text back."""
    from tokenizers import pre_tokenizers

    tok = byte_tokenizer()
    byte_to_char = {b: c for b, c in zip(range(256), _gpt2_byte_chars())}
    rank = {c: i + 2 for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    text = "  Hello,\n\tworld's 日本 ü  x2.5e-3!!"
    want = [rank[byte_to_char[b]] for b in text.encode()]
    assert tok(text, add_special_tokens=False).input_ids == want
    assert tok(text).input_ids == [0] + want
    assert tok.decode(want) == text


def _gpt2_byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte 0..255 (the published table, written out here
    as the independent reference)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def test_byte_tokenizer_prompt_has_exact_length():
    tok = byte_tokenizer()
    for n in (2, 17, 512):
        assert len(tok(e2e.make_prompt(tok, n)).input_ids) == n


def _fake_run(prefill_s, bytes_prefill, calls=4):
    steps = [{"calls": calls, "all_reduce_s": prefill_s / 2, "wire_s": prefill_s / 4}] + \
            [{"calls": calls, "all_reduce_s": 0.001, "wire_s": 0.0005}] * 2
    res = {"prefill_s": prefill_s, "decode_s": [0.01, 0.01],
           "comm": {"prefill": {"bytes_sent": bytes_prefill, "payload_bytes": bytes_prefill, "values": 4 * 100},
                    "decode": {"bytes_sent": 80, "payload_bytes": 80, "values": 40}}}
    return {"config": {"tp": 2}, "results": [res] * 2, "timers": [steps] * 2, "prompt_lengths": [8, 100]}


def test_rows_medians_and_ratios():
    rows = rows_of_run([_fake_run(1.0, 800)], network="1gbit", codec="bf16", algorithm="gather", lens=[100],
                            repeats=1)
    rows += rows_of_run([_fake_run(0.5, 200)], network="1gbit", codec="int4-g32", algorithm="gather",
                             lens=[100], repeats=1)
    base, comp = add_ratios(rows)
    assert base.bits_per_value == 16 and comp.bits_per_value == 4
    assert base.prefill_bytes_per_token == 8 and base.decode_bytes_per_token == 40
    assert comp.prefill_speedup == pytest.approx(2.0)
    assert comp.prefill_allreduce_speedup == pytest.approx(2.0)
    assert comp.prefill_byte_ratio == pytest.approx(4.0)
    assert base.decode_ms_per_token == pytest.approx(10.0)
    assert base.allreduce_calls_per_token == 4
    # JSON: measured fields, then decode_tokens_per_s, then the ratios; a row without a
    # baseline has no ratio keys; from_json reads a row back
    assert list(comp.to_json())[-9:] == ["decode_tokens_per_s", "prefill_speedup", "prefill_allreduce_speedup",
                                         "prefill_allreduce_net_speedup", "prefill_wire_speedup", "decode_speedup",
                                         "prefill_byte_ratio", "prefill_amdahl_bound", "prefill_vs_amdahl"]
    alone = add_ratios(rows[1:])[0]
    assert list(alone.to_json())[-3:] == ["prefill_ms_all", "prefill_allreduce_net_ms",  # error_feedback only when on
                                          "decode_tokens_per_s"]
    assert E2ERow.from_json(comp.to_json()) == comp
    old = {k: v for k, v in comp.to_json().items() if not k.startswith("prefill_allreduce_net")}  # from before them
    assert E2ERow.from_json(old).to_json() == old


def test_every_saved_report_renders():
    """Each docs/bench/e2e*.json renders to markdown with today's code, its rows' own columns
    only (the oldest rows predate the Amdahl bound and the net all-reduce)."""
    import json

    from lowbit_tp.bench.e2e.report import columns_for, render_markdown

    files = sorted((ROOT / "docs" / "bench").glob("e2e*.json"))
    assert len(files) >= 10
    for f in files:
        payload = json.loads(f.read_text())
        md = render_markdown(payload)
        header = next(line for line in md.splitlines() if line.startswith("| network"))
        assert header == "| " + " | ".join(columns_for(payload["rows"])) + " |", f.name
        assert ("prefill_allreduce_net_ms" in header) == any("prefill_allreduce_net_ms" in r for r in payload["rows"])


def test_net_allreduce_is_the_median_of_each_prefills_allreduce_less_its_skew():
    """Per prefill (all-reduce, skew) = (10, 0), (20, 15), (30, 1) ms: the net all-reduce is
    the median of 10, 5, 29 = 10 ms, not the difference of the medians (20 - 1 = 19); its
    speed-up is against bf16's own net time."""
    def run(pairs):
        out = _fake_run(1.0, 800)
        out["results"] = [out["results"][0]] * (1 + len(pairs))
        out["timers"] = [out["timers"][0]] + [[{"calls": 4, "all_reduce_s": a / 1e3, "wire_s": 0.0,
                                                 "skew_s": k / 1e3}] + out["timers"][0][1:] for a, k in pairs]
        return out

    base, = rows_of_run([run([(40, 0), (60, 20), (50, 2)])], network="1gbit", codec="bf16", algorithm="gather",
                        lens=[100], repeats=3)
    comp, = rows_of_run([run([(10, 0), (20, 15), (30, 1)])], network="1gbit", codec="int4-g32",
                        algorithm="gather", lens=[100], repeats=3)
    assert comp.prefill_allreduce_ms == pytest.approx(20) and comp.prefill_skew_ms == pytest.approx(1)
    assert comp.prefill_allreduce_net_ms == pytest.approx(10)
    _, comp = add_ratios([base, comp])
    assert base.prefill_allreduce_net_ms == pytest.approx(40)  # of 40, 40, 48
    assert comp.prefill_allreduce_net_speedup == pytest.approx(4.0)
    assert comp.prefill_allreduce_speedup == pytest.approx(2.5)


def test_feedback_variants_and_their_label_check():
    """--error-feedback both runs each compressed codec twice (bf16 never), a two-shot run with
    feedback refuses pipelined chunks up front, and a row cannot claim a setting its ranks did
    not run."""
    from lowbit_tp.errors import UserError

    cfg = e2e.E2EConfig(codecs=("int4-g32",), exact_baseline=False, error_feedback="both")
    assert cfg.variants() == [("bf16", "gather", False), ("int4-g32", "gather", False), ("int4-g32", "gather", True)]
    assert e2e.E2EConfig(codecs=("int4-g32",), error_feedback="on").variants()[-1] == ("int4-g32", "gather", True)
    with pytest.raises(UserError, match="error_feedback must be one of"):
        e2e.E2EConfig(error_feedback="yes")
    with pytest.raises(UserError, match="whole messages"):
        e2e.E2EConfig(algorithm="two-shot", chunk_bytes=1 << 20, error_feedback="both")
    with pytest.raises(UserError, match="auto is two-shot at TP 4"):  # auto picks two-shot at N >= 3
        e2e.E2EConfig(algorithm="auto", tps=(2, 4), chunk_bytes=1 << 20, error_feedback="on")
    e2e.E2EConfig(algorithm="auto", tps=(2,), chunk_bytes=1 << 20, error_feedback="on")  # gather at TP 2
    run = _fake_run(0.5, 200)
    run["config"]["error_feedback"] = True
    row, = rows_of_run([run], network="1gbit", codec="int4-g32", algorithm="gather", lens=[100], repeats=1,
                       error_feedback=True)
    assert row.error_feedback and row.label == "int4-g32/gather+EF"
    assert row.to_json()["error_feedback"] is True and E2ERow.from_json(row.to_json()) == row
    with pytest.raises(ValueError, match="ranks ran with error_feedback"):
        rows_of_run([run], network="1gbit", codec="int4-g32", algorithm="gather", lens=[100], repeats=1)


def test_timers_barrier_before_a_start_never_before_a_wait():
    """sync_wire lines the ranks up before a transfer starts; a wait for a pipelined chunk
    already in flight is timed as wire without a barrier (gloo's would wait for every
    transfer in flight). No process group here: a barrier would raise."""
    from lowbit_tp.bench.e2e.worker import Timers
    from lowbit_tp.collectives.dist import WAIT

    t = Timers(sync_wire=True)
    assert t.around_wire(WAIT + "all_gather of payloads", None, lambda: 7) == 7
    assert t._cur["skew_s"] == 0.0 and t._cur["wire_s"] > 0.0
    with pytest.raises((RuntimeError, ValueError)):  # the start of a transfer: a barrier, needing a group
        t.around_wire("all_gather of payloads", None, lambda: 7)
    assert Timers(sync_wire=False).around_wire("all_gather of payloads", None, lambda: 8) == 8


# ----------------------------------------------------------------- a real run, loopback
@pytest.mark.slow  # five two-process runs and a calibration: ~1 min; `make test-slow`
def test_loopback_smoke(tmp_path):
    """Two ranks as separate processes, torchrun-style, a tiny random model: rows for the bf16
    baseline, one dynamic codec and ``default`` (which needs a calibration with a bit
    allocation, made by the benchmark), each with and without error feedback, with bytes and
    all-reduce time measured."""
    cfg = e2e.E2EConfig(networks=("loopback",), tps=(2,), codecs=("int4-g32", "default"), exact_baseline=False,
                        prompt_lens=(24,), new_tokens=3, repeats=1, hidden=256, intermediate=256, layers=2,
                        heads=4, kv_heads=2, calibration_samples=4, run_timeout_s=120, error_feedback="both")
    out = e2e.run_e2e_bench(cfg, json_path=str(tmp_path / "e2e.json"), log=lambda *a: None)
    rows = {(r["codec"], r.get("error_feedback", False)): r for r in out["rows"]}
    assert set(rows) == {("bf16", False), ("int4-g32", False), ("int4-g32", True), ("default", False),
                         ("default", True)}
    # each launch's ranks report the feedback setting they ran with (rows_of_run checks it)
    assert sorted((r["codec"], r["error_feedback"]) for r in out["runs"]) == sorted(rows)
    for r in rows.values():
        assert r["prompt_tokens"] == 24
        assert r["allreduce_calls_per_token"] == 4  # 2 layers x 2 row-parallel layers
        assert r["prefill_allreduce_ms"] > 0 and r["prefill_wire_ms"] > 0
        assert r["prefill_allreduce_ms"] >= r["prefill_wire_ms"] + r["prefill_skew_ms"]
        assert r["prefill_skew_ms"] > 0  # the barrier before each collective ran and was timed apart
        assert r["prefill_ms"] >= r["prefill_allreduce_ms"]
    assert rows[("bf16", False)]["bits_per_value"] == 16.0
    assert rows[("int4-g32", False)]["bits_per_value"] == 4.5
    assert 4.0 < rows[("default", False)]["bits_per_value"] <= 4.5  # per-layer allocation under the 4.5 budget
    # TP 2 gather: each rank sends its whole payload once: 2 all-reduces x 2 layers x 256 values per token
    assert rows[("bf16", False)]["prefill_bytes_per_token"] == 4 * 256 * 2
    assert rows[("int4-g32", False)]["prefill_byte_ratio"] == pytest.approx(16 / 4.5)
    for codec in ("int4-g32", "default"):  # feedback changes what is encoded, never how many bytes go
        assert rows[(codec, True)]["prefill_bytes_per_token"] == rows[(codec, False)]["prefill_bytes_per_token"]
    assert (tmp_path / "e2e.json").exists() and (tmp_path / "e2e.md").exists()


# ----------------------------------------------------------------- chunk-size sweep script
@pytest.mark.slow
def test_chunk_sweep_script_runs_on_loopback(tmp_path):
    """scripts/bench_chunks.py end to end on loopback (2 gloo ranks, a tiny message): its rank
    loop returns typed rows, which the worker must serialise (it once wrote dataclasses to
    json.dumps and failed on every run)."""
    import json
    import sys

    out = tmp_path / "chunks.json"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_chunks.py"), "--network", "loopback",
                          "--numel", "8192", "--hidden", "64", "--chunk-bytes", "0", "--chunk-bytes", "4096",
                          "--repeats", "1", "--json", str(out)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    got = {(r["codec"], r.get("chunk_bytes")) for r in rows}
    assert got == {("bf16", None), ("int4-outlier", 0), ("int4-outlier", 4096)}, got
    assert all(r["network"] == "loopback" and r["latency_ms"] > 0 for r in rows)


def test_a_tp_degree_or_codec_the_model_cannot_take_is_one_line_in_the_parent(tmp_path):
    """`bench-e2e --tp 3 --heads 4` and `--codec default` on a model too small for the default
    budget each started the ranks, which all failed with a traceback (76 lines), after the
    calibration for the codec; now one line from the parent."""
    from lowbit_tp.errors import UserError

    small = dict(networks=("loopback",), exact_baseline=False, prompt_lens=(16,), new_tokens=2, repeats=1,
                 hidden=64, intermediate=128, layers=1, heads=4, kv_heads=4, calibration_samples=2, run_timeout_s=60)
    with pytest.raises(UserError, match=r"^TP degree 3 does not divide the 4 attention heads .*valid degrees: 1, 2, 4$"):
        e2e.run_e2e_bench(e2e.E2EConfig(tps=(3,), codecs=("int4-g32",), **small), log=lambda *a: None)
    with pytest.raises(UserError, match=r"^codec 'alloc' \(the default\) needs a calibration that stores a per-layer "
                                        r"plan .*budget 4\.5 is below the cheap codec's"):
        e2e.run_e2e_bench(e2e.E2EConfig(tps=(2,), codecs=("default",), **small), log=lambda *a: None)


def test_a_failed_rank_stops_the_others_at_once_and_is_one_line(tmp_path, monkeypatch):
    """launch_ranks waited for rank 0 first: when rank 1 died, rank 0 sat in its collective until
    its own timeout (300 s in the benchmark) before the run failed, with every rank's log tail in
    a RuntimeError traceback. Ranks here are a stand-in interpreter: rank 1 fails, rank 0 hangs."""
    import sys
    import time as _time

    from lowbit_tp.bench.e2e.launch import launch_ranks
    from lowbit_tp.collectives.launch import RankFailure

    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nif [ \"$RANK\" = 1 ]; then sleep 1; echo 'Traceback ...'; echo 'ValueError: planted' >&2; "
                    "exit 3; fi\necho $$ > " + str(tmp_path) + "/rank0.pid\nexec sleep 60\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    t0 = _time.monotonic()
    with pytest.raises(RankFailure) as info:
        launch_ranks({"threads_per_rank": 1}, world=2, hosts=None, port=1, timeout_s=50)
    assert _time.monotonic() - t0 < 20
    assert info.value.summary == "bench-e2e run: rank 1 failed (exit 3): ValueError: planted", info.value.summary
    pid = int((tmp_path / "rank0.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # stopped (and reaped)


def test_config_refuses_shape_flags_with_a_checkpoint_and_delay_on_loopback_only():
    """`bench-e2e --model smollm2-135m --hidden 512` measured SmolLM2's own shape, and `--network
    loopback --delay 1ms` no delay, both without a word (a flag left at its default passes)."""
    from lowbit_tp.errors import UserError

    with pytest.raises(UserError, match=r"^--hidden, --layers shape the random-llama model; --model smollm2-135m has"):
        e2e.E2EConfig(model="smollm2-135m", hidden=512, layers=4)
    with pytest.raises(UserError, match=r"^--delay 1ms applies to emulated links \(--network RATE\); loopback"):
        e2e.E2EConfig(networks=("loopback",), delay="1ms")
    e2e.E2EConfig(model="smollm2-135m")
    e2e.E2EConfig(hidden=512, layers=4)  # random-llama takes them
    e2e.E2EConfig(networks=("loopback", "1gbit"), delay="1ms")


@pytest.mark.slow
def test_a_loopback_launch_tries_a_new_port_when_its_port_was_taken(tmp_path, monkeypatch):
    """The loopback port was chosen free, then closed before rank 0 bound it: another process
    taking it in between failed the whole run. Here the first port chosen is held by a listening
    socket; the stand-in ranks meet at a real TCPStore on MASTER_PORT, so rank 0 fails with
    torch's own EADDRINUSE, and the launch goes again on the next port. A failure of another kind
    is not retried."""
    import socket
    import sys

    from lowbit_tp.bench.e2e import launch
    from lowbit_tp.collectives.launch import RankFailure, free_port

    standin = tmp_path / "rank.py"
    standin.write_text(
        "import datetime, json, os, sys\nimport torch.distributed as dist\n"
        "r, w = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])\n"
        "if os.environ.get('PLANT') == str(r): raise SystemExit('planted failure')\n"
        "st = dist.TCPStore(os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT']), w, r == 0, "
        "datetime.timedelta(seconds=30))\n"
        "st.set(f'r{r}', '1'); st.wait([f'r{i}' for i in range(w)])\n"
        "json.dump({'rank': r, 'port': int(os.environ['MASTER_PORT'])}, open(os.path.join(sys.argv[-1], f'rank{r}.json'), 'w'))\n")
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} {standin} \"$@\"\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(1)
    taken = held.getsockname()[1]
    chosen = []

    def ports():
        chosen.append(taken if len(chosen) == 0 and "PLANT" not in os.environ else free_port())
        return chosen[-1]

    monkeypatch.setattr(launch, "free_port", ports)
    with held:
        outs = launch.launch_ranks({"threads_per_rank": 1}, world=2, hosts=None, port=None, timeout_s=60)
        assert chosen[0] == taken and len(chosen) == 2
        assert [o["rank"] for o in outs] == [0, 1] and {o["port"] for o in outs} == {chosen[1]}
        chosen.clear()
        monkeypatch.setenv("PLANT", "1")
        with pytest.raises(RankFailure, match="planted failure"):
            launch.launch_ranks({"threads_per_rank": 1}, world=2, hosts=None, port=None, timeout_s=60)
        assert len(chosen) == 1  # not retried
