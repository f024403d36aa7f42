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


def test_an_interrupted_save_leaves_the_earlier_file_whole(tmp_path, cal, monkeypatch):
    # before: safetensors truncated the target and wrote into it, so Ctrl-C (or a full disk)
    # while `calibrate --out cal.safetensors` rewrote an existing calibration destroyed it
    import safetensors.torch

    path = cal.save(tmp_path / "cal.safetensors")
    before = path.read_bytes()

    def interrupted(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x10\x00\x00\x00half")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cal.save(path)
    assert path.read_bytes() == before and Calibration.load(path).fingerprint() == cal.fingerprint()
    assert [p.name for p in tmp_path.iterdir()] == ["cal.safetensors"]  # no temporary file left


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


def test_a_calibration_must_cover_every_block_of_the_model(tmp_path):
    """One block calibrated, two in the model: refused with the count, by the preflight of a
    run as by the ranks' load; names without the usual tails are left to the run."""
    from lowbit_tp.calibration.synthetic import synthetic_calibration
    from lowbit_tp.errors import UserError
    from lowbit_tp.preflight import check_codecs

    one = synthetic_calibration(["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"], world=2,
                                hidden=64, tokens=16, batches=1)
    one.check_compatible(tp=2, hidden_size=64, num_layers=1)
    with pytest.raises(CalibrationError, match=r"lacks 2 of the model's 4 row-parallel layers \(it has 2, "
                                               r"made for 'synthetic'\)"):
        one.check_compatible(num_layers=2)
    half = synthetic_calibration(["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"], world=2,
                                 hidden=64, tokens=16, batches=1)
    with pytest.raises(CalibrationError, match="lacks 2 of the model's 4"):  # both blocks, MLPs missing
        half.check_compatible(num_layers=2)
    path = one.save(tmp_path / "one.safetensors")
    with pytest.raises(UserError, match="lacks 2 of the model's 4"):
        check_codecs(["int4-outlier"], calibration=path, tp=2, hidden_size=64, num_layers=2)
    other = synthetic_calibration(["a.o_proj"], world=2, hidden=64, tokens=16, batches=1)
    other.check_compatible(num_layers=30)  # not the HF tails: the run looks each layer up itself


def test_mismatched_run(cal):
    with pytest.raises(CalibrationError, match="TP degree 2.*TP 4"):
        cal.check_compatible(tp=4)
    with pytest.raises(CalibrationError, match="made for model 'm'"):
        cal.check_compatible(weights_sha256="cd" * 32, model_name="other")
    with pytest.raises(CalibrationError, match="hidden size 64"):
        cal.check_compatible(hidden_size=128)
    cal.check_compatible(tp=2, hidden_size=64, weights_sha256="ab" * 32)
    with pytest.raises(CalibrationError, match="made for TP degree 2 and has no rank 5"):
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


def _rewrite(path, meta, tensors=None, *, fix_checksums=True):
    """Write ``meta`` (and ``tensors``) back, with valid checksums when asked: a crafted file."""
    import hashlib

    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path)) if tensors is None else tensors
    if fix_checksums and isinstance(meta, dict):
        h = hashlib.sha256()
        for name in sorted(tensors):
            t = tensors[name].contiguous()
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        meta = dict(meta, tensor_sha256=h.hexdigest())
        body = {k: v for k, v in meta.items() if k != "header_sha256"}
        meta["header_sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    save_file(tensors, str(path), metadata={"lowbit_tp": json.dumps(meta)})


def test_header_edit_is_caught_and_changes_the_fingerprint(tmp_path, cal):
    """Issue 12: changing the allocation plan in the header loaded silently, same fingerprint."""
    cal.meta["bit_allocation"] = {"budget": 4.5, "layers": {"a.o_proj": "rot-lm4-g64", "a.down_proj": "rot-lm4-g64"}}
    path = cal.save(tmp_path / "cal.safetensors")
    before = Calibration.load(path).fingerprint()
    meta = json.loads(json.dumps(Calibration.load(path).meta))
    meta["bit_allocation"]["layers"]["a.o_proj"] = "rot-lm4-g32"
    _rewrite(path, meta, fix_checksums=False)
    with pytest.raises(CalibrationError, match="header checksum"):
        Calibration.load(path)
    _rewrite(path, meta)  # re-signed by hand: loads, but it is another calibration
    assert Calibration.load(path).fingerprint() != before


@pytest.mark.parametrize("craft", ["list", "no_tp", "tp_str", "k_big", "layers_str", "model_list", "plan_list"])
def test_crafted_headers_are_calibration_errors(tmp_path, cal, craft):
    path = cal.save(tmp_path / "cal.safetensors")
    meta = json.loads(json.dumps(cal.meta))
    if craft == "list":
        meta = [meta]
    elif craft == "no_tp":
        del meta["tp"]
    elif craft == "tp_str":
        meta["tp"] = "2"
    elif craft == "k_big":
        meta["k"] = 10000
    elif craft == "layers_str":
        meta["layers"] = "a.o_proj"
    elif craft == "model_list":
        meta["model"] = ["m"]
    elif craft == "plan_list":
        meta["bit_allocation"] = ["rot-lm4-g64"]
    _rewrite(path, meta)
    with pytest.raises(CalibrationError):
        Calibration.load(path)


@pytest.mark.parametrize("name", ["a.o_proj|rankX|ema_min", "a.o_proj|rank1|mean", "nobar", "a.o_proj|rank9|absmax",
                                  "zz|sum|absmax", "a.o_proj|rank-1|absmax"])
def test_crafted_tensor_names_are_calibration_errors(tmp_path, cal, name):
    from safetensors.torch import load_file

    path = cal.save(tmp_path / "cal.safetensors")
    tensors = load_file(str(path))
    prefix, _, stat = name.rpartition("|")
    for st_name in (["ema_min", "ema_max", "absmax"] if stat in ("ema_min", "ema_max", "absmax") else [stat]):
        tensors[f"{prefix}|{st_name}" if prefix else st_name] = torch.zeros(64)  # complete, so only the name is wrong
    _rewrite(path, json.loads(json.dumps(cal.meta)), tensors)
    with pytest.raises(CalibrationError):
        Calibration.load(path)


def test_wrong_shaped_statistic_is_a_calibration_error(tmp_path, cal):
    from safetensors.torch import load_file

    path = cal.save(tmp_path / "cal.safetensors")
    tensors = load_file(str(path))
    tensors["a.o_proj|rank0|absmax"] = torch.zeros(63)
    _rewrite(path, json.loads(json.dumps(cal.meta)), tensors)
    with pytest.raises(CalibrationError, match=r"expected float32 \(64,\)"):
        Calibration.load(path)


def test_a_nonfinite_statistic_is_refused_on_save_and_load(tmp_path, cal):
    """A statistic holding NaN (a file rewritten with a valid checksum, or a Calibration built in
    code) loaded without a word, and int4-outlier then decoded finite input to NaN."""
    import dataclasses

    from safetensors.torch import load_file

    from lowbit_tp.codecs import make_codec

    path = cal.save(tmp_path / "cal.safetensors")
    tensors = load_file(str(path))
    tensors["a.o_proj|rank0|ema_max"][5] = float("nan")
    _rewrite(path, json.loads(json.dumps(cal.meta)), tensors)
    with pytest.raises(CalibrationError, match=r"a\.o_proj\|0\|ema_max holds NaN/Inf; recalibrate$"):
        Calibration.load(path)
    st = cal.stats[("a.o_proj", 1)]
    stats = {**cal.stats, ("a.o_proj", 1): dataclasses.replace(st, absmax=st.absmax.clone().fill_(float("inf")))}
    with pytest.raises(CalibrationError, match=r"a\.o_proj\|1\|absmax holds NaN/Inf"):
        Calibration(meta=cal.meta, stats=stats).save(tmp_path / "inf.safetensors")
    assert not (tmp_path / "inf.safetensors").exists()
    # never saved: a codec asking for those statistics gets the same refusal, not NaN decodes
    with pytest.raises(CalibrationError, match=r"statistics a\.o_proj\|1\|absmax hold NaN/Inf; recalibrate$"):
        make_codec("int4-outlier", calibration=Calibration(meta=cal.meta, stats=stats)).encode(
            torch.randn(3, 64), layer="a.o_proj", source=1)
    # statistics built in code in float64 still save (as fp32, as before the check on save)
    as64 = {k: dataclasses.replace(v, **{f: getattr(v, f).double() for f in ("absmax", "ema_max")})
            for k, v in cal.stats.items()}
    saved = Calibration.load(Calibration(meta=dict(cal.meta), stats=as64).save(tmp_path / "f64.safetensors"))
    assert torch.equal(saved.stats[("a.o_proj", 1)].absmax, cal.stats[("a.o_proj", 1)].absmax.float())
    x = torch.randn(3, 64)  # the finite calibration decodes finite input to finite values
    codec = make_codec("int4-outlier", calibration=Calibration.load(cal.save(tmp_path / "ok.safetensors")))
    assert torch.isfinite(codec.decode(codec.encode(x, layer="a.o_proj"), (3, 64), layer="a.o_proj")).all()


def test_directory_is_not_reported_missing(tmp_path):
    with pytest.raises(CalibrationError, match="is a directory"):
        Calibration.load(tmp_path)


def test_codecs_take_k_from_the_calibration():
    """Issue 11 defect 3: `calibrate --k 16` was recorded, then ignored (codecs used E // 64)."""
    from lowbit_tp.codecs import make_codec

    c16 = synthetic_calibration(LAYERS, world=2, hidden=128, tokens=16, batches=1)
    c16.meta["k"] = 16
    x = torch.randn(3, 128)
    for name in ["int4-outlier", "int4-random-k", "rot-lm4-g64"]:
        codec = make_codec(name, calibration=c16)
        assert codec.params("a.o_proj", 0, 128).outliers.numel() == 16, name
    # 16 bf16 channels + 112 int4 per token: 3 * (32 + 56) bytes
    assert make_codec("int4-outlier", calibration=c16).encode(x, layer="a.o_proj", source=0).numel() == 3 * (32 + 56)
    # an explicit k (the -k4 names) still wins
    assert make_codec("rot-lm4-g64-lg8-k4", calibration=c16).params("a.o_proj", 0, 128).outliers.numel() == 4
