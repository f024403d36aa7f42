# `make demo` and `make test` set everything up on a fresh machine, then run.
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lowbit-tp-setup

.PHONY: setup demo test test-slow test-models bench-comm setup-vllm test-vllm

$(STAMP): pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/lowbit-tp demo

# The default suite on two pytest workers (pytest-xdist): 951 s -> 605 s on the 2-core machine
# (stop 31, measured one after the other). PYTEST_WORKERS=0 runs it in one process. loadgroup:
# the tests marked xdist_group (the network-namespace ones share a prefix) stay on one worker.
PYTEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadgroup

# Heavier runs kept out of the default suite (marker `slow`: extra builds of the CPU kernels,
# the bench-e2e loopback run, torchrun, long fits); .ci/run runs them. Two workers, as `test`: most
# of it is the one-threaded Triton interpreter (one process: 21m36s in stop 32's CI; two: 12m14s
# here in stop 33, another run).
test-slow: $(STAMP)
	$(BIN)/python -m pytest -m "slow and not model and not vllm" -n $(PYTEST_WORKERS) --dist loadgroup

# Tests that load the real pretrained models (SmolLM2-135M, Gemma 3 270M). Two workers: much of
# a test is one-threaded (GGUF loading and dequantizing), so two at once use both cores (one
# process: 11m43s in stop 32's CI; two: 5m39s here in stop 33, another run).
test-models: $(STAMP)
	$(BIN)/python -m pytest -m model -n $(PYTEST_WORKERS) --dist loadgroup

bench-comm: $(STAMP)
	$(BIN)/lowbit-tp bench-comm --world-size 2 --world-size 4 --json docs/bench/comm.json

# vLLM integration: a separate venv (vLLM pins an older transformers), then the `vllm` tests,
# which run from the main venv and start vLLM with the .venv-vllm interpreter.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.lowbit-tp-setup

$(VLLM_STAMP): pyproject.toml scripts/setup_vllm.sh
	VLLM_VENV=$(VLLM_VENV) bash scripts/setup_vllm.sh
	touch $(VLLM_STAMP)

setup-vllm: $(VLLM_STAMP)

test-vllm: $(STAMP) $(VLLM_STAMP)
	LOWBIT_TP_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(BIN)/python -m pytest -m vllm
