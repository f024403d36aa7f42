import os

# Triton reads this when it is first imported: set it before any test module imports triton,
# so the kernel tests run on CPU tensors under the interpreter whatever the collection order.
# (tests/test_triton_compile.py compiles for a GPU target in a subprocess without it.)
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

# One intra-op thread in the test process. The tests' tensors are small, and on the shared
# 2-core machine torch's spinning worker threads made a loaded run several times slower
# (three of test_cpu_kernels' bitwise cases at load 8: 17.4 s -> 3.7 s, CPU time 10.7 ->
# 4.4 s). Spawned ranks and CLI subprocesses set their own threads.
torch.set_num_threads(1)

from lowbit_tp.calibration.synthetic import synthetic_calibration

LAYERS = ["layers.0.o_proj", "layers.0.down_proj"]


@pytest.fixture(scope="session")
def cal_factory():
    cache = {}

    def make(world: int, hidden: int):
        key = (world, hidden)
        if key not in cache:
            cache[key] = synthetic_calibration(LAYERS, world=world, hidden=hidden, tokens=64, batches=2)
        return cache[key]

    return make


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
