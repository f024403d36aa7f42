import pytest
import torch

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
