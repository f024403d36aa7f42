"""lowbit_tp.bench.device_script, the set-up the device-check scripts share: a ``--device cpu``
dry run must get the Triton interpreter, which ``triton.jit`` picks when a kernel module is
imported, so the helper itself must not import torch or a kernel module, and it must refuse
loudly when a kernel module came first. Each case runs in a fresh interpreter without
TRITON_INTERPRET (the test session's conftest sets it)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code_or_args, tmp_path=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_the_helper_imports_neither_torch_nor_triton():
    r = _run("import sys; import lowbit_tp.bench.device_script as d; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton') "
             "or m.startswith('lowbit_tp.kernels')))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_a_kernel_module_imported_before_the_dry_run_is_refused():
    r = _run("import lowbit_tp.kernels.triton_common\n"
             "from lowbit_tp.bench.device_script import open_device\n"
             "open_device('probe', 'cpu')")
    assert r.returncode != 0
    assert "RuntimeError: probe: --device cpu needs TRITON_INTERPRET=1" in r.stderr
    assert "lowbit_tp.kernels.triton_common already is" in r.stderr


def test_open_device_interprets_the_kernels():
    r = _run("import os\n"
             "from lowbit_tp.bench.device_script import open_device\n"
             "dev = open_device('probe', 'cpu')\n"
             "from lowbit_tp.kernels import triton_group\n"
             "print(dev, os.environ['TRITON_INTERPRET'], type(triton_group._feedback_of).__name__)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["cpu", "1", "InterpretedFunction"]


@pytest.mark.slow
def test_gpu_reduce_split_dry_run_from_the_shell(tmp_path):
    """The script as the docs run it (no TRITON_INTERPRET in the environment): the interpreter
    is set up, and the fused and split owner stages equal the reference's bytes."""
    r = _run(["scripts/gpu_reduce_split.py", "--device", "cpu", "--out", str(tmp_path), "--worlds", "2",
              "--codecs", "int4-outlier,rot-lm4-g64-lg8-k4"])
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads((tmp_path / "gpu_reduce_split.json").read_text())
    assert set(doc) == {"device", "command", "repeats", "dry_run_interpreter", "rows"}
    assert doc["dry_run_interpreter"] is True and len(doc["rows"]) == 2
    for row in doc["rows"]:
        assert "error" not in row and row["equal"] is True, row
        assert set(row) == {"codec", "world", "tokens", "hidden", "chunk_rows", "equal", "copy_us", "fused_us",
                            "split_us", "split_over_fused"}
