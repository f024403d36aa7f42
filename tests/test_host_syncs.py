"""No host sync per message on the fused (Triton) path; one per step at check_nonfinite().

On a GPU, ``.item()``, ``.tolist()``, ``bool(t)``, ``int(t)``, ``.cpu()`` and friends wait for
the device. The kernels run here under ``TRITON_INTERPRET=1`` on CPU tensors, where nothing
waits, so the test counts the *calls* that would: a ``TorchFunctionMode`` sees every tensor
method call made while a codec or collective runs, and counts those that read a device value
on the host. Calls made by Triton's interpreter itself (it copies tensors to numpy to run a
kernel on the CPU) are not the codec's and are left out.
"""
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before lowbit_tp imports any kernel module

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (optional: the Triton kernels are skipped)")
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")

from lowbit_tp.calibration.synthetic import synthetic_calibration  # noqa: E402
from lowbit_tp.codecs import NonFiniteError, make_codec  # noqa: E402
from lowbit_tp.collectives import simulate_all_reduce  # noqa: E402

LAYER = "L"
WORLD = 2
SYNCING = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__len__", "cpu", "numpy", "nonzero",
           "equal", "allclose", "any", "all", "_local_scalar_dense", "unique", "masked_select"}
TRITON_DIR = os.sep + "triton" + os.sep


ALLOCATING = {"empty", "zeros", "ones", "full", "empty_like", "zeros_like", "ones_like", "full_like", "cat", "stack",
              "clone", "new_empty", "new_zeros", "pad", "where", "float", "int", "contiguous", "to"}
CONVERSIONS = {"float", "int", "contiguous", "to"}


class SyncCounter(TorchFunctionMode):
    """Records the host-syncing tensor calls (or, with ``names=ALLOCATING``, the calls that
    allocate a new tensor) made outside Triton's interpreter."""

    def __init__(self, names=SYNCING):
        super().__init__()
        self.names = names
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in self.names or (self.names is SYNCING and name == "to"
                                  and any(str(a) == "cpu" for a in (*args[1:], *(kwargs or {}).values()))):
            f = sys._getframe(1)
            while f is not None and TRITON_DIR not in f.f_code.co_filename:
                f = f.f_back
            if f is None:  # not inside the interpreter
                self.calls.append(name)
        out = func(*args, **(kwargs or {}))
        if self.calls and self.calls[-1] == name and name in CONVERSIONS and args and out is args[0]:
            self.calls.pop()  # a conversion to the dtype it already has returns its input: no allocation
        return out


def count(fn, names=SYNCING) -> list[str]:
    with SyncCounter(names) as c:
        fn()
    return c.calls


CAL = synthetic_calibration([LAYER], world=WORLD, hidden=64, tokens=64, batches=1)
CODECS = ["int4-outlier", "int8", "int4-g32", "rot-lm4-g64-lg8-k4", "mxfp4"]


def messages(codec, xs, bufs=None):
    """One step's codec work: N encodes, a decode-and-sum and a two-shot reduce-and-re-encode."""
    shape = tuple(xs[0].shape)
    payloads = [codec.encode(x, layer=LAYER, source=r, out=None if bufs is None else bufs[r]) for r, x in enumerate(xs)]
    codec.decode_sum(payloads, shape, layer=LAYER, out=None if bufs is None else bufs[-1])
    codec.reduce_encode(payloads, shape, layer=LAYER, out=None if bufs is None else bufs[-2],
                        scratch=None if bufs is None else bufs[-1])  # the sum's fp32 buffer, where it is split


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("mode", ["error", "flag", "propagate"])
def test_fused_path_has_no_host_sync_per_message(name, mode):
    codec = make_codec(name, calibration=CAL, nonfinite=mode, backend="triton")
    xs = [torch.randn(3, 64) for _ in range(WORLD)]
    xs[1][2, 5] = float("nan") if mode != "error" else 1.0
    messages(codec, xs)  # warm-up: tables and flags are built (and copied to the device) once
    n = codec.payload_nbytes((3, 64), LAYER)
    bufs = [torch.empty(n, dtype=torch.uint8) for _ in range(WORLD + 1)] + [torch.empty(3, 64)]
    assert count(lambda: messages(codec, xs)) == []
    assert count(lambda: messages(codec, xs, bufs)) == []
    # with out= buffers nothing is allocated either (what a CUDA graph capture needs)
    assert count(lambda: messages(codec, xs, bufs), ALLOCATING) == []
    assert "empty" in count(lambda: messages(codec, xs), ALLOCATING)  # the counter sees fresh outputs
    # the step's one check reads the flags once
    calls = []
    with SyncCounter() as c:
        try:
            codec.check_nonfinite()
        except NonFiniteError:
            assert mode == "flag"
        calls = c.calls
    assert calls == ([] if mode == "propagate" else ["tolist"])


@pytest.mark.parametrize("algorithm", ["gather", "two-shot"])
def test_simulated_collective_has_no_host_sync(algorithm):
    codec = make_codec("int4-outlier", calibration=CAL, backend="triton")
    xs = [torch.randn(5, 64) for _ in range(WORLD)]
    simulate_all_reduce(xs, codec, algorithm, layer=LAYER)
    assert count(lambda: simulate_all_reduce(xs, codec, algorithm, layer=LAYER)) == []


def test_the_counter_sees_the_reference_scan():
    """The reference path raises at once, so it reads every message's range on the host."""
    codec = make_codec("int4-outlier", calibration=CAL, backend="reference")
    x = torch.randn(3, 64)
    codec.encode(x, layer=LAYER, source=0)
    assert count(lambda: codec.encode(x, layer=LAYER, source=0))


def test_deferred_error_names_layer_and_source_once_per_step():
    """Error mode on the fused path: bytes as usual, the error at the step's check, then clean."""
    from lowbit_tp.codecs.base import OutOfRangeError

    codec = make_codec("int4-g32", backend="triton")  # nonfinite="error", deferred on the fused path
    assert codec.defers_errors("cpu")
    x = torch.randn(3, 64)
    codec.encode(x, layer=LAYER, source=0)
    codec.check_nonfinite()  # clean
    bad = x.clone()
    bad[1, 2] = float("inf")
    codec.encode(bad, layer=LAYER, source=1)
    codec.encode(x, layer="other", source=0)
    with pytest.raises(NonFiniteError, match=r"layer 'L', source 1 \(cpu\)") as err:
        codec.check_nonfinite()
    assert "other" not in str(err.value) and not isinstance(err.value, OutOfRangeError)
    codec.check_nonfinite()  # reset
    big = x.clone()
    big[0, 0] = 1e30  # finite, beyond 7 * 65504
    codec.encode(big, layer=LAYER, source="sum")
    with pytest.raises(OutOfRangeError, match="source 'sum'"):
        codec.check_nonfinite()
    with pytest.raises(OutOfRangeError):  # the reference refuses the same input at once
        make_codec("int4-g32", backend="reference").encode(big, layer=LAYER, source="sum")


def test_generate_checks_the_reducer_once_per_step():
    """The runtime's decode loop calls the deferred check once after every forward."""
    from types import SimpleNamespace

    from lowbit_tp.runtime.generate import generate

    class Tiny(torch.nn.Module):
        def forward(self, input_ids, use_cache=True, past_key_values=None):
            logits = torch.zeros(1, input_ids.shape[1], 5)
            logits[..., 3] = 1.0
            return SimpleNamespace(logits=logits, past_key_values=None)

    tok = SimpleNamespace(decode=lambda ids, skip_special_tokens=True: " ".join(map(str, ids)))
    checks = []
    res = generate(Tiny(), tok, [1, 2], max_new_tokens=4, check_nonfinite=lambda: checks.append(1))
    assert res.token_ids == [3, 3, 3, 3] and len(checks) == 4

    def fail():
        raise NonFiniteError("int4-g32: NaN/Inf ... layer 'L', source 0")

    with pytest.raises(NonFiniteError):
        generate(Tiny(), tok, [1, 2], max_new_tokens=4, check_nonfinite=fail)


def test_dist_reducer_check_names_the_rank():
    import torch.distributed as dist

    from lowbit_tp.tp.row_parallel import DistReducer

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        codec = make_codec("int4-g32", backend="triton")
        reducer = DistReducer(codec=codec)
        x = torch.randn(2, 64)
        x[0, 0] = float("nan")
        codec.encode(x, layer="model.layers.3.mlp.down_proj", source=0)
        with pytest.raises(NonFiniteError, match=r"rank 0/1: int4-g32: .*layer 'model.layers.3.mlp.down_proj', source 0"):
            reducer.check_nonfinite()
        reducer.check_nonfinite()  # reset
    finally:
        dist.destroy_process_group()


def test_simulated_reducer_defers_like_the_runtime():
    from lowbit_tp.tp.row_parallel import SimulatedReducer

    reducer = SimulatedReducer(codec=make_codec("int4-g32", backend="triton"))
    x = torch.randn(3, 64)
    bad = x.clone()
    bad[2, 9] = float("nan")
    out = reducer.reduce([x, bad], layer=LAYER)  # no raise per message on the fused path
    assert torch.isnan(out[2, 9])
    with pytest.raises(NonFiniteError, match="layer 'L', source 1"):
        reducer.check_nonfinite()
    with pytest.raises(NonFiniteError):  # the reference path raises at the message
        SimulatedReducer(codec=make_codec("int4-g32", backend="reference")).reduce([x, bad], layer=LAYER)


def test_tp_simulator_raises_a_deferred_error_when_the_block_ends():
    from helpers import tiny_model

    from lowbit_tp.simulator import TPSimulator

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")  # NaN in one rank's partial
        ids = torch.tensor([[1, 2, 3]])
        with pytest.raises(NonFiniteError, match="down_proj"):
            with TPSimulator(model, tp=2, codec=make_codec("int4-g32", backend="triton")):
                model(ids)  # the fused path does not stop the forward


class AtenCounter(TorchDispatchMode):
    """Lists the aten ops (views and metadata ops apart) dispatched outside Triton's interpreter:
    on a GPU each would launch a kernel or allocate, and cost host time, on every message."""

    VIEWS = {"view", "_unsafe_view", "slice", "select", "as_strided", "alias", "detach", "unsqueeze", "squeeze",
             "expand", "split", "unbind", "lift_fresh", "_reshape_alias", "t", "transpose", "permute"}

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in self.VIEWS:
            f = sys._getframe(1)
            while f is not None and TRITON_DIR not in f.f_code.co_filename:
                f = f.f_back
            if f is None:
                self.ops.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", CODECS + ["int4", "int4-random-k",
                                           pytest.param("rot-int6-g64-lg8-k4", marks=pytest.mark.slow)])  # 3 s: slow
@pytest.mark.parametrize("mode", ["error", "flag"])
def test_fused_path_runs_no_torch_op_per_message(name, mode):
    """With out= buffers, a message costs its kernel launch(es) and nothing else on the device:
    no flag zeroed, no table copied or rebuilt, no contiguous() copy (what a CUDA graph would
    otherwise capture as extra nodes, and eager mode pays in launches)."""
    codec = make_codec(name, calibration=CAL, nonfinite=mode, backend="triton")
    xs = [torch.randn(3, 64) for _ in range(WORLD)]
    n = codec.payload_nbytes((3, 64), LAYER)
    bufs = [torch.empty(n, dtype=torch.uint8) for _ in range(WORLD + 1)] + [torch.empty(3, 64)]
    messages(codec, xs, bufs)  # warm-up
    with AtenCounter() as c:
        messages(codec, xs, bufs)
    assert c.ops == []
    with AtenCounter() as c:  # the counter sees a per-call op where there is one
        codec.encode(xs[0].t().contiguous().t(), layer=LAYER, source=0, out=bufs[0])
    assert "clone" in c.ops or "copy_" in c.ops


@pytest.mark.parametrize("name", ["int4-outlier", "int4-g32", "rot-lm4-g64-lg8-k4", "mxfp4"])
def test_backend_and_received_params_are_resolved_once(name, monkeypatch):
    """kernel_backend() is asked several times per message; after the first message the
    answer (and decode_sum's per-source parameters and payload size) come from the cache."""
    import lowbit_tp.codecs.base as base

    codec = make_codec(name, calibration=CAL, nonfinite="flag", backend="triton")
    xs = [torch.randn(3, 64) for _ in range(WORLD)]
    messages(codec, xs)
    calls, resolve = [], base.resolve_backend

    def counted(*a, **k):
        calls.append(a)
        return resolve(*a, **k)

    monkeypatch.setattr(base, "resolve_backend", counted)
    made = []
    monkeypatch.setattr(codec, "_make_params", lambda *a: made.append(a))
    messages(codec, xs)
    assert calls == [] and made == []


def test_cached_received_params_keep_every_payload_check():
    """decode_sum caches what depends on (shape, layer, sources, device) only: a wrong payload,
    or more payloads than sources, is refused after a good call with the same key too."""
    codec = make_codec("int4-outlier", calibration=CAL, nonfinite="flag", backend="triton")
    xs = [torch.randn(3, 64) for _ in range(WORLD)]
    ps = [codec.encode(x, layer=LAYER, source=r) for r, x in enumerate(xs)]
    codec.decode_sum(ps, (3, 64), layer=LAYER, sources=[0, 1])
    with pytest.raises(ValueError, match="3 payloads but 2 sources"):
        codec.decode_sum(ps + [ps[0]], (3, 64), layer=LAYER, sources=[0, 1])
    with pytest.raises(ValueError, match="payload 1"):
        codec.decode_sum([ps[0], ps[1][:-1]], (3, 64), layer=LAYER, sources=[0, 1])
    with pytest.raises(ValueError, match="payload 0"):
        codec.decode_sum([ps[0].view(torch.int8), ps[1]], (3, 64), layer=LAYER)


def test_a_refused_backend_is_not_cached():
    from lowbit_tp.kernels import BackendUnavailable

    codec = make_codec("int4-g32", backend="cpu")
    for _ in range(2):
        with pytest.raises(BackendUnavailable):
            codec.kernel_backend(torch.device("meta"))


def test_the_per_shape_caches_stay_bounded_over_many_token_counts():
    """A server sees a new token count at almost every step: decode_sum's per-shape cache
    keeps at most RECEIVED_CACHE_SIZE keys, and the rot kernels' argument cache gains no entry
    per token count (found by the final review: both grew with every new shape)."""
    from lowbit_tp.calibration.synthetic import synthetic_calibration
    from lowbit_tp.codecs import base, make_codec

    cal = synthetic_calibration(["L"], world=2, hidden=64, tokens=16, batches=1)
    codec = make_codec("rot-lm4-g64-lg8-k4", calibration=cal)
    limit = base.RECEIVED_CACHE_SIZE
    for t in range(1, limit + 40):
        x = torch.zeros(t, 64)
        p = [codec.encode(x, layer="L", source=r) for r in range(2)]
        codec.decode_sum(p, (t, 64), layer="L")
    assert len(codec._received) == limit
    assert (limit + 39, 64) in {k[0] for k in codec._received}  # the newest kept, the oldest gone
    assert (1, 64) not in {k[0] for k in codec._received}
    # the Triton path's kernel-argument sets are per (params, hidden, device), not per token count
    p0, cpu = codec.params("L", 0, 64), torch.device("cpu")
    for t in range(1, 200):
        assert codec._kernel_args(p0, t, 64, cpu)["code_bytes"] == codec._code_bytes(t * 64)
    args = [k for k in codec._tables if isinstance(k, tuple) and k and k[0] == "args"]
    assert len(args) == 1, args
