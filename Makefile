# Two commands a new user needs: `make train` (main job) and `make test` (whole test suite).
# Both create/reuse a virtualenv in $(VENV), install torch==2.13.0 there when no torch is present
# (CPU build; an unpinned torch would pull a multi-GB CUDA build), then this package in editable mode.
# A user with their own (CUDA) torch: `make test VENV=/path/to/their/env` reuses that environment and
# never touches its torch.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.aahr_fast-installed
TORCH_PIN ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup train test test-fast bench clean

setup: $(STAMP)

$(STAMP): setup.py pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e ".[test]"
	@touch $(STAMP)

train: setup
	$(PY) -m aahr_fast.train $(ARGS)

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest tests -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) -m pytest benchmarks --benchmark-only $(PYTEST_ARGS)

clean:
	rm -rf build *.egg-info .pytest_cache .benchmarks
