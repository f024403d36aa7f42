"""Faults and bad input, as a user meets them (issue 12's "Must show").

Lifecycle: a real ``lowbit-tp bench-comm`` on 2 spawned ranks (synthetic partials, no model,
repeats large enough to run until stopped), signalled from outside. Each case checks that
the run ends within its bound, that no process it started is left (``/proc``), that its
temporary directory is gone, and that stderr is one line.

Bad flags: every case of the issue fails in under 5 s with one line and status 2, before
any model load or rank spawn (the parent never loads weights for these checks).
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOOP = ["bench-comm", "--world-size", "2", "--codec", "int8", "--algorithm", "gather", "--numel", "4096",
        "--hidden", "64", "--repeats", "100000000", "--no-throughput"]


# ------------------------------------------------------------------ /proc helpers
def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4: the parent's pid
                out.append(int(d.name))
    return out


def _descendants(pid: int) -> set[int]:
    seen, todo = set(), [pid]
    while todo:
        for c in _children(todo.pop()):
            if c not in seen:
                seen.add(c)
                todo.append(c)
    return seen


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


def _status(pid: int, field: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    return ""


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _ranks_running(pid: int, world: int, timeout: float = 60.0) -> list[int]:
    """The spawned ranks of ``pid`` once each has entered its rank function: the rank
    entry switches SIGINT from ignored (inherited at start) back to its default action,
    so bit 2 of SigIgn clears."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        ranks = [c for c in _children(pid) if "spawn_main" in _cmdline(c)]
        try:
            ready = [c for c in ranks if not int(_status(c, "SigIgn") or "0", 16) & (1 << (signal.SIGINT - 1))]
        except OSError:
            ready = []
        if len(ranks) == world and len(ready) == world:
            return ranks
        time.sleep(0.1)
    raise AssertionError(f"ranks of {pid} did not start: {[(c, _cmdline(c)) for c in _children(pid)]}")


@contextlib.contextmanager
def _cli(args: list[str], tmp_path: Path, **popen):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path))
    env.pop("LOWBIT_TP_DEBUG", None)
    # Start the CLI as a terminal would: SIGINT at its default action. A runner that starts
    # the suite in the background (non-interactive `cmd &`) makes SIGINT ignored, and an
    # ignored SIGINT is inherited: then no Ctrl-C could ever reach the CLI.
    proc = subprocess.Popen([sys.executable, "-m", "lowbit_tp.cli", *args], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **popen)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def _finish(proc, started: set[int], tmp_path: Path, *, within: float) -> tuple[int, str, float]:
    """Wait for the CLI to exit; check nothing it started is left and the temp dir is gone."""
    t0 = time.monotonic()
    try:
        _, err = proc.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"the run did not end within {within} s")
    took = time.monotonic() - t0
    end = time.monotonic() + 5  # SIGKILL'd ranks may take a moment to be reaped
    while any(_alive(p) for p in started) and time.monotonic() < end:
        time.sleep(0.05)
    left = [(p, _cmdline(p)) for p in started if _alive(p)]
    assert not left, f"processes left behind: {left}"
    assert not list(tmp_path.iterdir()), f"files left behind: {list(tmp_path.iterdir())}"
    return proc.returncode, err, took


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------ lifecycle
def _listening_addresses(pids) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of the TCP sockets ``pids`` listen on."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    out = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pids[0]}/net/{table}").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # state LISTEN, owned by our processes
                out.append(f[1])
    return out


def test_sigterm_to_parent_kills_ranks_and_tracker_and_removes_temp_dir(tmp_path):
    """Also: while the ranks run, every TCP socket the parent or a rank listens on is bound
    to 127.0.0.1 (the rendezvous store and gloo), none to 0.0.0.0 or ::."""
    with _cli(LOOP + ["--timeout", "30"], tmp_path) as proc:
        ranks = _ranks_running(proc.pid, 2)
        started = _descendants(proc.pid)  # 2 ranks + multiprocessing's resource tracker
        assert len(started) >= 3, [(p, _cmdline(p)) for p in started]
        time.sleep(1.0)  # let gloo set up its listeners
        listening = _listening_addresses([proc.pid, *ranks])
        assert listening, "found no listening socket of the run"
        loopback = ("0100007F:", "0000000000000000FFFF00000100007F:", "00000000000000000000000001000000:")
        assert all(addr.startswith(loopback) for addr in listening), listening
        proc.send_signal(signal.SIGTERM)
        rc, err, took = _finish(proc, started, tmp_path, within=10)
    assert rc == 128 + signal.SIGTERM
    assert "terminated" in _one_line(err)


def test_sigint_to_parent_alone_stops_ranks_at_once(tmp_path):
    with _cli(LOOP + ["--timeout", "30"], tmp_path) as proc:
        ranks = _ranks_running(proc.pid, 2)
        started = _descendants(proc.pid)
        proc.send_signal(signal.SIGINT)
        rc, err, took = _finish(proc, started, tmp_path, within=10)
    assert rc == 130 and _one_line(err) == "lowbit-tp: interrupted"
    assert took < 5 and not any(_alive(r) for r in ranks)


def test_terminal_ctrl_c_prints_one_line(tmp_path):
    """Ctrl-C in a terminal signals the whole foreground process group: parent and ranks."""
    with _cli(LOOP + ["--timeout", "30"], tmp_path, start_new_session=True) as proc:
        _ranks_running(proc.pid, 2)
        started = _descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)
        rc, err, _ = _finish(proc, started, tmp_path, within=10)
    assert rc == 130 and _one_line(err) == "lowbit-tp: interrupted"


def test_stalled_rank_is_reported_within_the_timeout(tmp_path):
    """SIGSTOP on rank 1: rank 0's collective times out, and the parent reports that first
    failure at once and kills the stopped rank, instead of waiting for the deadline."""
    timeout = 4
    with _cli(LOOP + ["--timeout", str(timeout)], tmp_path) as proc:
        ranks = _ranks_running(proc.pid, 2)
        started = _descendants(proc.pid)
        time.sleep(1.5)  # into the benchmark's collectives
        stopped = max(ranks)  # the later-started rank: rank 1
        os.kill(stopped, signal.SIGSTOP)
        rc, err, took = _finish(proc, started, tmp_path, within=timeout + 10)
    line = _one_line(err)
    assert rc == 1 and took < timeout + 6, (took, line)
    assert line.startswith("lowbit-tp: error: rank 0: ") and "stopped the other 1 rank" in line, line


def test_signalled_rank_is_reported_at_once(tmp_path):
    """SIGINT to one rank (SIGTERM takes the same default action): that rank ends without
    a traceback, the parent names it at once and stops the other rank."""
    with _cli(LOOP + ["--timeout", "30"], tmp_path) as proc:
        ranks = _ranks_running(proc.pid, 2)
        started = _descendants(proc.pid)
        os.kill(max(ranks), signal.SIGINT)
        rc, err, took = _finish(proc, started, tmp_path, within=10)
    line = _one_line(err)
    assert rc == 1 and took < 5, (took, line)
    assert "rank 1 was killed by SIGINT" in line and "stopped the other 1 rank" in line, line


def test_sigkill_of_parent_takes_the_ranks_with_it_and_leaves_no_file(tmp_path):
    """Nothing runs in the parent after SIGKILL: the ranks' parent-death signal ends them,
    and since ranks hand their results over pipes, nothing is left in the temp dir (the
    run's TMPDIR and working directory, both ``tmp_path``)."""
    with _cli(LOOP + ["--timeout", "30"], tmp_path) as proc:
        _ranks_running(proc.pid, 2)
        started = _descendants(proc.pid)  # the ranks and the resource tracker
        proc.kill()
        proc.wait(5)
        end = time.monotonic() + 5
        while any(_alive(p) for p in started) and time.monotonic() < end:
            time.sleep(0.05)
        assert not [(p, _cmdline(p)) for p in started if _alive(p)]
    assert not list(tmp_path.iterdir()), f"files left behind: {list(tmp_path.iterdir())}"


# ------------------------------------------------------------------ bad input: one line, < 5 s, no spawn
def _tiny_checkpoint(root: Path) -> str:
    """A config.json is all the checks read (no weights are needed to refuse a flag)."""
    path = root / "tiny"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, "num_hidden_layers": 2, "max_position_embeddings": 64}))
    return str(path)


def _run_main(argv) -> tuple[int, str, float]:
    from lowbit_tp.cli import main

    err = io.StringIO()
    t0 = time.monotonic()
    with contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse
            rc = exc.code
    return rc, err.getvalue(), time.monotonic() - t0


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    model = _tiny_checkpoint(root)
    (root / "cal_dir").mkdir()
    (root / "binary.txt").write_bytes(bytes(range(128, 256)) * 200)
    return root, model


BAD = {
    # name: (argv with {model} / {root}, words the message must contain)
    "run --tp 0": (["run", "--model", "{model}", "--tp", "0", "--prompt", "hi"], ["--tp", "positive"]),
    "run --tp 64": (["run", "--model", "{model}", "--tp", "64", "--prompt", "hi"], ["TP degree 64", "valid degrees: 1, 2, 4"]),
    "run --tp 3": (["run", "--model", "{model}", "--tp", "3", "--prompt", "hi"], ["TP degree 3", "valid degrees"]),
    "run --max-new-tokens 0": (["run", "--model", "{model}", "--tp", "2", "--prompt", "hi", "--max-new-tokens", "0"],
                               ["--max-new-tokens", "positive"]),
    "run --prompt ''": (["run", "--model", "{model}", "--tp", "2", "--prompt", ""], ["prompt 0 is empty"]),
    "run unknown model": (["run", "--model", "{root}/nowhere", "--tp", "2", "--prompt", "hi"], ["unknown model"]),
    "run --codec nope": (["run", "--model", "{model}", "--tp", "2", "--prompt", "hi", "--codec", "nope"],
                         ["unknown codec 'nope'"]),
    "run static codec, no calibration": (["run", "--model", "{model}", "--tp", "2", "--prompt", "hi", "--codec",
                                          "int4-outlier"], ["needs a calibration"]),
    "run --calibration DIR": (["run", "--model", "{model}", "--tp", "2", "--prompt", "hi", "--codec", "int4-outlier",
                               "--calibration", "{root}/cal_dir"], ["is a directory"]),
    "run --calibration missing": (["run", "--model", "{model}", "--tp", "2", "--prompt", "hi", "--codec",
                                   "int4-outlier", "--calibration", "{root}/none.safetensors"], ["does not exist"]),
    "run --json under a file": (["run", "--model", "{model}", "--tp", "2", "--prompt", "hi", "--json",
                                 "{root}/binary.txt/out.json"], ["cannot write", "is a file"]),
    "run --timeout 0": (["run", "--model", "{model}", "--tp", "2", "--prompt", "hi", "--timeout", "0"], ["--timeout"]),
    "run --algorithm exact with a codec": (["run", "--model", "{model}", "--tp", "2", "--prompt", "hi", "--codec",
                                            "int4-g32", "--algorithm", "exact"],
                                           ["algorithm 'exact'", "would ignore codec 'int4-g32'"]),
    "bench-comm --codec nope": (["bench-comm", "--codec", "nope"], ["unknown codec 'nope'"]),
    "bench-comm --world-size 0": (["bench-comm", "--world-size", "0"], ["--world-size", "positive"]),
    "bench-comm --repeats 0": (["bench-comm", "--repeats", "0"], ["--repeats", "positive"]),
    "bench-comm --hidden 0": (["bench-comm", "--hidden", "0"], ["--hidden", "positive"]),
    "calibrate --k 10000": (["calibrate", "--model", "{model}", "--tp", "2", "--seq-len", "32", "--k", "10000", "--out",
                             "{root}/c.safetensors"], ["--k 10000", "hidden size 64"]),
    "calibrate --out DIR": (["calibrate", "--model", "{model}", "--tp", "2", "--seq-len", "32", "--out", "{root}/cal_dir"],
                            ["is a directory"]),
    "eval --seq-len 1": (["eval", "--model", "{model}", "--tp", "2", "--codec", "bf16", "--seq-len", "1"],
                         ["at least 2"]),
    "eval undecodable text": (["eval", "--model", "{model}", "--tp", "2", "--codec", "bf16", "--seq-len", "32", "--text",
                               "{root}/binary.txt"], ["not UTF-8 text"]),
    "eval --tp 3": (["eval", "--model", "{model}", "--tp", "3", "--codec", "bf16"], ["TP degree 3"]),
    "demo --tp 3": (["demo", "--model", "{model}", "--tp", "3"], ["TP degree 3"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_fails_fast_with_one_line(case, bad_inputs, monkeypatch):
    from lowbit_tp.collectives import launch

    root, model = bad_inputs
    argv_t, words = BAD[case]
    argv = [a.format(model=model, root=root) for a in argv_t]
    # Nothing may be spawned or loaded for a bad flag.
    monkeypatch.setattr(launch.mp, "get_context", lambda *a: pytest.fail("spawned ranks for a bad flag"))
    rc, err, took = _run_main(argv)
    line = _one_line(err)
    assert rc == 2, (rc, err)
    assert took < 5, took
    assert line.startswith("lowbit-tp"), line
    for w in words:
        assert w in line, (w, line)


def test_seq_len_beyond_the_context_warns_in_one_line(bad_inputs, tmp_path):
    """9000 > 64 positions of the tiny model: a one-line warning, then (here) the text check refuses."""
    root, model = bad_inputs
    rc, err, _ = _run_main(["eval", "--model", model, "--tp", "2", "--codec", "bf16", "--seq-len", "9000",
                            "--text", str(root / "binary.txt")])
    lines = err.strip().splitlines()
    assert lines[0] == ("lowbit-tp: warning: --seq-len 9000 exceeds the model's context of 64 tokens; "
                        "results beyond it are not meaningful"), err
    assert rc == 2 and len(lines) == 2


def test_rank_error_reaches_the_user_as_one_line():
    from lowbit_tp.collectives import RankFailure, spawn_ranks

    t0 = time.monotonic()
    with pytest.raises(RankFailure) as info:
        spawn_ranks(_rank_zero_fails_rank_one_waits, 2, timeout_s=60)
    assert time.monotonic() - t0 < 30  # not the 60 s timeout: the first failure ends the run
    assert info.value.summary == "rank 0: ZeroDivisionError: division by zero (stopped the other 1 rank)"
    assert "Traceback" in str(info.value)  # the full report is kept for LOWBIT_TP_DEBUG


_LEAK_SCRIPT = """
import os, sys, time
from multiprocessing import resource_tracker

from lowbit_tp.collectives import RankFailure, spawn_ranks


def rank_fn(rank, world):
    from tqdm.auto import tqdm

    tqdm(range(2)).close()  # its write lock is a named semaphore, as in a rank loading a GGUF model
    os.write(1, f"rank {os.getpid()}\\n".encode())  # one write: the two ranks' lines must not interleave
    if rank == 0 and sys.argv[1] == "fail":
        time.sleep(0.5)  # rank 1 is asleep by now
        raise ValueError("planted")
    time.sleep(120)  # stopped by the parent, or by Ctrl-C


if __name__ == "__main__":
    try:
        spawn_ranks(rank_fn, 2, timeout_s=60)
    except RankFailure as exc:
        print("failed:", exc.summary, flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    print("tracker", resource_tracker._resource_tracker._pid, flush=True)
"""


def test_rank_failure_leaks_no_semaphore_and_leaves_no_process(tmp_path):
    """A rank that raised left by os._exit, and the rank stopped after it by SIGKILL: neither
    ran multiprocessing's finalizers, so the named semaphore of each rank's tqdm lock stayed
    registered with the parent's resource tracker, which printed "There appear to be 2 leaked
    semaphore objects to clean up at shutdown" after the one-line error. Both now release it
    (the stopped one on the parent's SIGTERM); the ranks and the tracker are gone after."""
    script = tmp_path / "leak.py"
    script.write_text(_LEAK_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("LOWBIT_TP_DEBUG", None)
    proc = subprocess.run([sys.executable, str(script), "fail"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "failed: rank 0: ValueError: planted (stopped the other 1 rank)" in proc.stdout, proc.stdout
    _no_leak_and_nothing_left(proc.stdout, proc.stderr)


def _no_leak_and_nothing_left(out: str, err: str) -> None:
    assert "leaked" not in err and "resource_tracker" not in err, err
    pids = [int(line.split()[1]) for line in out.splitlines() if line.startswith(("rank ", "tracker "))]
    assert len(pids) == 3, out  # 2 ranks, 1 tracker
    end = time.monotonic() + 5  # the tracker exits once the parent's end of its pipe closes
    while any(_alive(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.05)
    assert not [(p, _cmdline(p)) for p in pids if _alive(p)]


@pytest.mark.parametrize("runs", [1, pytest.param(3, marks=pytest.mark.slow)])  # 7 s a run: three in the slow suite
def test_terminal_ctrl_c_leaks_no_semaphore(tmp_path, runs):
    """Ctrl-C reaches the parent and every rank. A rank died by SIGINT's default action, so
    its tqdm lock leaked as above. Its handler now releases first; and since the kernel may
    hand the signal to another thread of the rank (its main thread then slept on and the
    parent's SIGKILL came first: 'There appear to be 2 leaked semaphore objects' in about
    half the runs), a watcher thread acts on the signal wherever it lands. One run here,
    three in the slow suite."""
    import queue
    import threading

    script = tmp_path / "leak.py"
    script.write_text(_LEAK_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("LOWBIT_TP_DEBUG", None)
    for _ in range(runs):
        proc = subprocess.Popen([sys.executable, str(script), "sleep"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout], daemon=True).start()
        try:
            out = [lines.get(timeout=120), lines.get(timeout=120)]  # both ranks asleep
            assert all(ln.startswith("rank ") for ln in out), out
            time.sleep(0.3)
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        time.sleep(0.2)  # the reader thread takes the rest of stdout
        while not lines.empty():
            out.append(lines.get())
        assert proc.returncode == 0 and "interrupted\n" in out, out
        _no_leak_and_nothing_left("".join(out), proc.stderr.read())


def _rank_zero_fails_rank_one_waits(rank, world):
    if rank == 0:
        # Ranks show no progress bars (the GGUF loader's tqdm bars of N ranks interleave).
        from tqdm.auto import tqdm

        if not tqdm(range(2)).disable:
            raise AssertionError("tqdm bars are enabled in a rank")
        return 1 / 0
    time.sleep(120)


def test_version_comes_from_the_package_metadata():
    from importlib.metadata import PackageNotFoundError, version

    import lowbit_tp

    try:
        expected = version("lowbit-tp")
    except PackageNotFoundError:
        expected = "0+unknown"
    assert lowbit_tp.__version__ == expected and lowbit_tp.__version__ != "0"


def test_output_path_is_created_up_front_and_written_atomically(tmp_path):
    from lowbit_tp.errors import UserError
    from lowbit_tp.fileio import atomic_write_text, check_output_path

    target = tmp_path / "missing" / "deeper" / "out.json"
    assert check_output_path(target) == target and target.parent.is_dir() and not target.exists()
    atomic_write_text(target, "first")
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]  # no temporary file left
    mask = os.umask(0o022)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask  # as open() makes it, not mkstemp's 0600
    with pytest.raises(UserError, match="is a directory"):
        check_output_path(tmp_path)
    # `calibrate --out runs/` (no such directory yet) calibrated, then wrote the artifact as a
    # file named `runs`; `eval --json runs/` did the same
    with pytest.raises(UserError, match=r"names a directory \(it ends in '/'\); give a file name$"):
        check_output_path(f"{tmp_path}/runs/")
    assert not (tmp_path / "runs").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        check_output_path(tmp_path / "file" / "out.json")
    # /proc passes os.access for root but takes no new file: `calibrate --out /proc/cal.safetensors`
    # calibrated for minutes, then ended in a FileNotFoundError traceback
    with pytest.raises(UserError, match=r"^cannot write output file /proc/out\.json: "):
        check_output_path("/proc/out.json")


def test_a_stray_byte_is_kept_but_binary_text_is_refused(tmp_path):
    from lowbit_tp.data import load_documents

    ok = tmp_path / "ok.txt"
    ok.write_bytes(b"To be, or not to be: that is the question. \xff Whether 'tis nobler in the mind")
    assert "question" in load_documents(ok)[0].text
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ab " + bytes(range(128, 256)))
    with pytest.raises(ValueError, match="not UTF-8 text"):
        load_documents(bad)


def test_eval_reads_any_utf8_text_dir_and_uses_the_last_word_items_there_are(tmp_path):
    """Issue 11 defect 7, at the CLI: a directory of .py / .md / .rst files is evaluation text,
    and asking for more last-word items than it holds uses those there are, with a one-line
    warning (not a Python warning with its source line)."""
    import random

    from helpers import save_tiny

    model = save_tiny(tmp_path, "llama")
    text = tmp_path / "text"
    text.mkdir()
    rng = random.Random(0)
    words = "the king and queen walked along river under night sky while people watched from distant hills".split()
    for i, ext in enumerate([".py", ".md", ".py", ".md", ".rst", ".py", ".md", ".py"]):
        lines = [" ".join(rng.choice(words) for _ in range(12)).capitalize() + "." for _ in range(40)]
        (text / f"doc{i}{ext}").write_text("\n".join(lines) + "\n")
    out = tmp_path / "eval.json"
    rc, err, _ = _run_main(["eval", "--model", model, "--tp", "2", "--codec", "bf16", "--samples", "2",
                            "--seq-len", "32", "--lambada", "500", "--text", str(text), "--json", str(out)])
    assert rc == 0, err
    res = json.loads(out.read_text())
    used = len(res["text"]["lambada"])
    assert 0 < used < 500
    assert {Path(d).suffix for d in res["text"]["split"]["documents"]} <= {".py", ".md", ".rst"}
    warnings_ = [line for line in err.splitlines() if "warning" in line.lower()]
    assert warnings_ == [f"lowbit-tp: warning: text too short: found only {used} non-overlapping last-word "
                         f"passages with 128 context tokens, 500 requested; using {used}"], err


def test_a_model_that_gives_inf_is_one_line_in_eval_and_calibrate(tmp_path):
    """A checkpoint whose partials hold Inf (one weight set to Inf): `eval` printed the simulator's
    NonFiniteError and `calibrate` a ValueError from the statistics, each as a full traceback."""
    import torch

    from helpers import save_tiny
    from lowbit_tp.models import load_model

    path = save_tiny(tmp_path, "llama")
    model, tok, _ = load_model(path)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("inf")
    model.save_pretrained(path)
    common = ["--model", path, "--tp", "2", "--samples", "2", "--seq-len", "16"]
    # the error is the last line and starts its own: the progress bar is closed first (it was left
    # open, so the error followed "eval:   0%|...|" on its line and the bar's close came after it)
    rc, err, _ = _run_main(["eval", *common, "--codec", "int4-g32", "--lambada", "0"])
    assert rc == 1 and "Traceback" not in err and re.search(
        r"\nlowbit-tp: error: int4-g32: \d+ NaN/Inf value\(s\) in the communicated tensor of layer "
        r"'model\.layers\.1\.mlp\.down_proj', source 0; .* \(LOWBIT_TP_DEBUG=1 shows the traceback\)\n$", err), err
    rc, err, _ = _run_main(["calibrate", *common, "--allocate", "0", "--out", str(tmp_path / "c.safetensors")])
    assert rc == 2 and "Traceback" not in err and re.search(
        r"\nlowbit-tp: error: non-finite values in calibration activations of 'model\.layers\.1\.mlp\.down_proj' "
        r"\(source 0\): the model gives NaN/Inf[^\n]*\n$", err), err
    assert not (tmp_path / "c.safetensors").exists()


def test_a_run_directory_left_by_a_killed_run_is_removed_by_the_next(tmp_path, monkeypatch):
    """`eval --runtime tp` keeps the baseline logits in a temporary directory (1.6 GB for SmolLM2's
    default 32 x 256 windows) and bench-e2e its random model; a `kill -9` of the parent left them
    in /tmp for good. A run's directory carries its pid; the next run removes those whose process
    is gone, and keeps a live run's and anything not named by that scheme."""
    import tempfile

    from lowbit_tp.fileio import run_tempdir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = tmp_path / f"lowbit_tp_eval_baseline_{gone.pid}_abc"
    live = tmp_path / f"lowbit_tp_eval_baseline_{os.getpid()}_def"
    other = tmp_path / "lowbit_tp_eval_baseline_notapid"
    for d in (stale, live, other):
        d.mkdir()
        (d / "batch0.pt").write_bytes(b"x" * 10)
    # a run in another pid namespace: its pid means nothing here, its lock is held
    elsewhere = tmp_path / f"lowbit_tp_eval_baseline_{gone.pid}_ghi"
    elsewhere.mkdir()
    (elsewhere / ".lock").write_text("")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1]); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(elsewhere / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with run_tempdir("lowbit_tp_eval_baseline_") as mine:
            assert Path(mine).parent == tmp_path and Path(mine).name.startswith(
                f"lowbit_tp_eval_baseline_{os.getpid()}_")
            assert not stale.exists() and live.exists() and other.exists() and elsewhere.exists()
            # and this run's own directory is locked while it lives: the next run keeps it
            from lowbit_tp.fileio import _run_over
            assert not _run_over(Path(mine), gone.pid)
    finally:
        holder.kill()
        holder.wait()
    assert not Path(mine).exists()
    from lowbit_tp.fileio import _run_over
    assert _run_over(elsewhere, gone.pid)  # its holder is gone: the lock can be taken


def test_a_run_directory_is_never_in_view_without_its_lock(tmp_path, monkeypatch):
    """The directory was named in view, then its ``.lock`` made, then locked: a concurrent run
    looking in between found the lock free, judged the run over and could delete it live. Here
    another run looks at the moment this run first locks: nothing of this run may look over."""
    import fcntl
    import tempfile
    from types import SimpleNamespace

    from lowbit_tp import fileio

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen = {}

    def flock(fd, op):
        if not seen:  # the run's own first lock: look first, as the other run would (its flocks pass through)
            seen["busy"] = True
            seen["over"] = [fileio._run_over(d, 2 ** 22 + 1) for d in tmp_path.glob("lowbit_tp_race_*")]
        return fcntl.flock(fd, op)

    monkeypatch.setattr(fileio, "fcntl", SimpleNamespace(flock=flock, LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB))
    with fileio.run_tempdir("lowbit_tp_race_") as mine:
        assert Path(mine).name.startswith(f"lowbit_tp_race_{os.getpid()}_") and (Path(mine) / ".lock").exists()
        assert not fileio._run_over(Path(mine), 2 ** 22 + 1)
    assert seen["over"] == [] or not any(seen["over"]), seen
    assert list(tmp_path.iterdir()) == []  # nothing left, not even the hidden staging name


def test_a_run_directory_never_takes_over_one_already_in_view(tmp_path, monkeypatch):
    """Renaming the hidden directory into view fails when that name is taken (another run's live
    directory): the run fails, the other directory and its files stay, and the hidden one goes.
    (The cleanup used to remove the name it meant to take, i.e. the other run's directory.)"""
    import tempfile

    from lowbit_tp import fileio

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    real_rename = os.rename

    def rename(src, dst):  # another run shows the same name first, with a file in it
        os.mkdir(dst)
        Path(dst, "theirs").write_text("live")
        return real_rename(src, dst)

    monkeypatch.setattr(fileio.os, "rename", rename)
    with pytest.raises(OSError):
        with fileio.run_tempdir("lowbit_tp_taken_"):
            pass
    left = list(tmp_path.iterdir())
    assert len(left) == 1 and not left[0].name.startswith(".") and (left[0] / "theirs").read_text() == "live"


def test_run_at_tp_1_warns_that_the_codec_never_runs(tmp_path):
    """`run --tp 1 --codec int4-g32` generated and reported 0 bytes sent without a word (eval warns)."""
    from helpers import save_tiny

    path = save_tiny(tmp_path, "llama")
    rc, err, _ = _run_main(["run", "--model", path, "--tp", "1", "--codec", "int4-g32", "--prompt", "hi",
                            "--max-new-tokens", "2", "--quiet"])
    assert rc == 0 and "lowbit-tp: warning: --tp 1 has no all-reduce, so codec 'int4-g32' never runs" in err, err


def _env_rank(rank: int, world: int, port: int, args: list[str], tmp_path: Path):
    """One rank of ``lowbit-tp`` started as torchrun starts it (RANK, WORLD_SIZE, MASTER_*)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env.pop("LOWBIT_TP_DEBUG", None)
    return subprocess.Popen([sys.executable, "-m", "lowbit_tp.cli", *args], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_a_collective_error_on_a_torchrun_rank_is_one_line(tmp_path):
    """Under torchrun each rank is its own ``lowbit-tp``: the CollectiveError it meets (ranks
    that disagree on the codec; a rendezvous a peer never joins) is one line and status 1, as a
    spawned run's RankFailure is, not a traceback per rank (stderr filtered of c10d's own
    native log lines, which torch writes before Python sees the error)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import save_tiny
    from lowbit_tp.collectives.launch import free_port

    model = save_tiny(tmp_path, "llama")
    run = ["run", "--model", model, "--prompt", "Hi", "--max-new-tokens", "2", "--timeout", "20", "--quiet"]
    port = free_port()
    procs = [_env_rank(r, 2, port, run + ["--codec", codec], tmp_path) for r, codec in enumerate(["int4-g32", "mxfp4"])]
    for r, proc in enumerate(procs):
        _, err = proc.communicate(timeout=120)
        line = _one_line(err)
        assert proc.returncode == 1, (r, line)
        assert line.startswith("lowbit-tp: error: ranks disagree on the compressed all-reduce configuration: ")
        assert "'codec': 'int4-g32'" in line and "'codec': 'mxfp4'" in line, line
    alone = _env_rank(0, 2, free_port(), run[:-3] + ["--timeout", "2", "--codec", "int4-g32"], tmp_path)
    _, err = alone.communicate(timeout=120)
    line = _one_line("\n".join(ln for ln in err.splitlines() if not ln.startswith(("[W", "[E"))))
    assert alone.returncode == 1 and line.startswith("lowbit-tp: error: rank 0/2: joining the process group at "
                                                     "127.0.0.1:"), line


_INIT_CASES = r"""
import json, os, sys
from lowbit_tp.collectives.launch import init_from_env
out = []
for env, backend in json.loads(sys.argv[1]):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)
    os.environ.update(env)
    try:
        init_from_env(backend=backend, timeout_s=1)
        out.append("no error")
    except Exception as exc:
        out.append(f"{type(exc).__name__}: {exc}")
print(json.dumps(out))
"""


def test_init_from_env_tells_a_setup_mistake_from_a_failed_rendezvous():
    """Every RuntimeError/ValueError of ``init_process_group`` was reported as a failed rendezvous
    ("Did every rank start?"), also a missing variable; an unknown backend escaped as a bare
    AssertionError. Now only torch's rendezvous errors get that hint, setup mistakes say what is wrong."""
    from lowbit_tp.collectives.launch import free_port

    port = str(free_port())  # served by no one
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    alone = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    cases = [({k: v for k, v in env.items() if k != "MASTER_ADDR"}, "gloo"), ({**env, "MASTER_PORT": "abc"}, "gloo"),
             (env, "glooo"), (env, "gloo"), (alone, "gloo"), (alone, "gloo")]
    proc = subprocess.run([sys.executable, "-c", _INIT_CASES, json.dumps(cases)], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr
    unset, not_int, backend, nobody, first, twice = json.loads(proc.stdout.splitlines()[-1])
    # a second init of the default group is not an environment problem: torch's own ValueError
    assert first == "no error" and twice.startswith("ValueError: ") and "environment" not in twice, twice
    assert unset == ("UserError: rank 1/2: torch.distributed could not read its setup from the environment (RANK='1', "
                     f"WORLD_SIZE='2', MASTER_ADDR unset, MASTER_PORT='{port}'): Error initializing torch.distributed "
                     "using env:// rendezvous: environment variable MASTER_ADDR expected, but not set; start the ranks "
                     "with torchrun or set these variables"), unset
    assert not_int.startswith("UserError: rank 1/2: torch.distributed could not read its setup from the environment ("
                              "RANK='1', WORLD_SIZE='2', MASTER_ADDR='127.0.0.1', MASTER_PORT='abc'): "), not_int
    assert backend.startswith("UserError: rank 1/2: torch.distributed backend 'glooo' is not available in this "
                              "torch build (available: gloo"), backend
    assert nobody.startswith(f"CollectiveError: rank 1/2: joining the process group at 127.0.0.1:{port} failed: ")
    assert nobody.endswith("Did every rank start (timeout 1 s)?") and "\n" not in nobody, nobody
    assert all("\n" not in msg and "Did every rank" not in msg for msg in (unset, not_int, backend))
