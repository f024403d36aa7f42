"""The calibration artifact: round trip, and clear errors for every way it can be wrong."""
import json

import pytest
import torch

from lowbit_tp.calibration import SCHEMA_VERSION, Calibration, CalibrationError, StatsAccumulator
from lowbit_tp.calibration.synthetic import synthetic_calibration

LAYERS = ["a.o_proj", "a.down_proj"]


@pytest.fixture
def cal():
    c = synthetic_calibration(LAYERS, world=2, hidden=64, tokens=16, batches=2)
    c.meta["model"] = {"name": "m", "weights_sha256": "ab" * 32, "model_type": "llama"}
    return c


def test_round_trip(tmp_path, cal):
    path = cal.save(tmp_path / "cal.safetensors")
    back = Calibration.load(path)
    assert back.meta["schema_version"] == SCHEMA_VERSION
    assert back.layers == LAYERS and back.tp == 2 and back.hidden_size == 64
    for key, st in cal.stats.items():
        for name in ["ema_min", "ema_max", "absmax"]:
            assert torch.equal(getattr(back.stats[key], name), getattr(st, name))
    assert back.fingerprint() == cal.fingerprint()
    assert ("a.o_proj", "sum") in back.stats


def test_corrupted_tensor_bytes(tmp_path, cal):
    path = cal.save(tmp_path / "cal.safetensors")
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CalibrationError, match="checksum"):
        Calibration.load(path)


def test_truncated_and_garbage_files(tmp_path, cal):
    path = cal.save(tmp_path / "cal.safetensors")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CalibrationError, match="not a readable safetensors"):
        Calibration.load(path)
    (tmp_path / "junk").write_bytes(b"hello")
    with pytest.raises(CalibrationError):
        Calibration.load(tmp_path / "junk")
    with pytest.raises(CalibrationError, match="does not exist"):
        Calibration.load(tmp_path / "missing.safetensors")


def test_other_schema_version(tmp_path, cal):
    from safetensors.torch import load_file, save_file

    path = cal.save(tmp_path / "cal.safetensors")
    meta = dict(cal.meta, schema_version=99)
    save_file(load_file(str(path)), str(path), metadata={"lowbit_tp": json.dumps(meta)})
    with pytest.raises(CalibrationError, match="schema version 99"):
        Calibration.load(path)


def test_mismatched_run(cal):
    with pytest.raises(CalibrationError, match="TP degree 2.*TP 4"):
        cal.check_compatible(tp=4)
    with pytest.raises(CalibrationError, match="made for model 'm'"):
        cal.check_compatible(weights_sha256="cd" * 32, model_name="other")
    with pytest.raises(CalibrationError, match="hidden size 64"):
        cal.check_compatible(hidden_size=128)
    cal.check_compatible(tp=2, hidden_size=64, weights_sha256="ab" * 32)
    with pytest.raises(CalibrationError, match="no statistics for source 5"):
        cal.get("a.o_proj", 5)


def test_accumulator_ema_and_refuses_nonfinite():
    acc = StatsAccumulator(ema_decay=0.5)
    acc.update("L", 0, torch.tensor([[1.0, -2.0], [3.0, 0.0]]))
    acc.update("L", 0, torch.tensor([[5.0, -4.0]]))
    st = acc.build({"tp": 1, "hidden_size": 2}).get("L", 0)
    assert st.ema_max.tolist() == [4.0, -2.0]   # 0.5*3 + 0.5*5, 0.5*0 + 0.5*(-4)
    assert st.ema_min.tolist() == [3.0, -3.0]
    assert st.absmax.tolist() == [5.0, 4.0]
    with pytest.raises(ValueError, match="non-finite"):
        acc.update("L", 0, torch.tensor([[float("nan"), 0.0]]))
