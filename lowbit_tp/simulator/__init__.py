"""Exact single-process simulation of tensor parallelism on a Hugging Face model."""
from lowbit_tp.simulator.tp_sim import TPSimulator, simulated_row_parallel

__all__ = ["TPSimulator", "simulated_row_parallel"]
