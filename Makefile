# Set-up and checks for a fresh machine. Each target creates .venv on first use.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: install quickstart test test-all lint bench

# constraints.txt pins the environment the published figures were measured in.
$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade "pip>=24,<27"
	$(PYTHON) -m pip install --quiet -c constraints.txt -e ".[restormer,dev]"
	touch $@

install: $(VENV)/.installed

# The main job: router, DAM pre-training, expert fine-tuning and evaluation on held-out
# photos, then the comparison table, figures and restored images (CPU, ~5-10 min with the install).
# Interrupt it and run it again to resume; ARGS=--overwrite starts over.
quickstart: install
	$(PYTHON) benchmarks/quickstart.py $(ARGS)

# Cost of routed experts against the bare backbone (run it alone on the machine).
bench: install
	$(PYTHON) benchmarks/overhead.py --quick

# Lint, then the test suite without the checks marked slow (see README, "Tests").
test: install
	$(PYTHON) -m ruff check loraxir adapters recipes benchmarks tests
	$(PYTHON) -m pytest -q

# Every test, slow ones included.
test-all: install
	$(PYTHON) -m pytest -q -m "slow or not slow"

lint: install
	$(PYTHON) -m ruff check loraxir adapters recipes benchmarks tests
