# Set-up and checks for a fresh machine. Each target creates .venv on first use.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: install quickstart test test-all lint bench

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade "pip>=24,<27"
	$(PYTHON) -m pip install --quiet -e ".[restormer,dev]"
	touch $@

install: $(VENV)/.installed

# The main job: cost of routed experts on NAFNet-w32 against the bare backbone (CPU, ~5 min).
quickstart: install
	$(PYTHON) benchmarks/overhead.py --backbones nafnet --size 128 --batches 4 --repeats 2

# Lint, then the test suite without the checks marked slow (see README, "Tests").
test: install
	$(PYTHON) -m ruff check loraxir adapters recipes benchmarks tests
	$(PYTHON) -m pytest -q

# Every test, slow ones included.
test-all: install
	$(PYTHON) -m pytest -q -m "slow or not slow"

lint: install
	$(PYTHON) -m ruff check loraxir adapters recipes benchmarks tests
