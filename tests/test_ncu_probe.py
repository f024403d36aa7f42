"""scripts/ncu_probe.py --summarize: Nsight Compute's CSV into the counters table."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("ncu_probe", ROOT / "scripts" / "ncu_probe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_summary_keeps_launch_order_and_counters(tmp_path):
    head = '"ID","Kernel Name","Block Size","Grid Size","Section Name","Metric Name","Metric Unit","Metric Value"\n'
    body = ['"0","enc_kernel(int)","(128, 1, 1)","(4, 1, 1)","SOL","DRAM Throughput","%","28.43"\n',
            '"0","enc_kernel(int)","(128, 1, 1)","(4, 1, 1)","LS","Registers Per Thread","register/thread","128"\n',
            '"0","enc_kernel(int)","(128, 1, 1)","(4, 1, 1)","X","Unlisted Metric","x","9"\n',
            '"1","dec_kernel(int)","(32, 1, 1)","(8, 1, 1)","SOL","DRAM Throughput","%","70.45"\n']
    csv = tmp_path / "ncu.csv"
    csv.write_text("==PROF== Connected\nprofiled: codec-a encode, decode_sum\n" + head + "".join(body))
    out = tmp_path / "ncu.md"
    _module().summarize(str(csv), str(out))
    text = out.read_text()
    assert "codec-a encode, decode_sum" in text.splitlines()[0]
    rows = [ln for ln in text.splitlines() if ln.startswith("| 0") or ln.startswith("| 1")]
    assert rows[0].startswith("| 0 | enc_kernel | (128, 1, 1) | (4, 1, 1) |  | 28.43 % |")
    assert "128 register/thread" in rows[0] and "Unlisted" not in text and "9 x" not in text
    assert rows[1].startswith("| 1 | dec_kernel | (32, 1, 1) | (8, 1, 1) |  | 70.45 % |")


def test_driver_runs_every_codec_under_the_interpreter(capsys):
    """The profiled driver itself (``--device cpu``: tiny default shape, Triton interpreter)."""
    import os

    os.environ["TRITON_INTERPRET"] = "1"
    _module().main(["--device", "cpu", "--codecs", "int4-outlier,int4-g32"])
    out = capsys.readouterr().out
    assert "profiled: int4-outlier encode, decode_sum [3, 128] world 2" in out and "int4-g32" in out
