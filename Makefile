# `make demo` and `make test` set everything up on a fresh machine, then run.
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lowbit-tp-setup

.PHONY: setup demo test test-models bench-comm

$(STAMP): pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/lowbit-tp demo

test: $(STAMP)
	$(BIN)/python -m pytest

# Tests that load the real pretrained models (SmolLM2-135M, Gemma 3 270M).
test-models: $(STAMP)
	$(BIN)/python -m pytest -m model

bench-comm: $(STAMP)
	$(BIN)/lowbit-tp bench-comm --world-size 2 --world-size 4 --json docs/bench/comm.json
