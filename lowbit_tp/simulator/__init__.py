"""Exact single-process simulation of tensor parallelism on a Hugging Face model."""
from lowbit_tp.simulator.tp_sim import SimulatedRowParallel, TPSimulator

__all__ = ["SimulatedRowParallel", "TPSimulator"]
