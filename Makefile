# Two commands a new user needs: `make train` (main job) and `make test` (whole test suite).
# Both create/reuse a virtualenv in $(VENV) and install this package with every dependency at the exact version
# in the lock file $(LOCK) (CPython 3.11, Linux x86_64, CPU torch), via tools/setup_env.py:
#   - torch==2.13.0 (the CPU build; an unpinned torch would pull a multi-GB CUDA build) when the venv has no torch;
#   - a torch already in the venv that is not the pin (a user's CUDA build: `make test VENV=/path/to/env`) is kept,
#     and the lock's torch/triton lines are then not applied;
#   - `LOCK=` installs unlocked (setup.py's lower bounds only).
# `make lock` regenerates the lock (pip-tools); `make test-latest` runs the suite against the newest releases.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.aahr_fast-installed
TORCH_PIN ?= torch==2.13.0
LOCK ?= requirements/lock-py311.txt
PIP_TOOLS ?= pip-tools==7.6.2
LOCK_VENV ?= .venv-lock
LATEST_VENV ?= .venv-latest
PYTEST_ARGS ?=

.PHONY: setup train test test-fast bench lock test-latest clean

setup: $(STAMP)

$(STAMP): setup.py pyproject.toml $(LOCK) tools/setup_env.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) tools/setup_env.py install --lock "$(LOCK)" --torch-pin "$(TORCH_PIN)" --extras test
	@touch $(STAMP)

train: setup
	$(PY) -m aahr_fast.train $(ARGS)

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest tests -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) -m pytest benchmarks --benchmark-only $(PYTEST_ARGS)

# Regenerate the lock with the newest releases setup.py allows (torch held at $(TORCH_PIN) by requirements/lock.in),
# resolved by pip with this machine's pip configuration (it must see the CPU torch wheel). Then run `make test`.
lock:
	@test -x $(LOCK_VENV)/bin/python || $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q "$(PIP_TOOLS)"
	$(LOCK_VENV)/bin/python -m piptools compile --quiet --upgrade --extra test --allow-unsafe --strip-extras \
		--no-emit-index-url --no-emit-find-links --output-file "$(LOCK).new" setup.py requirements/lock.in
	$(LOCK_VENV)/bin/python tools/setup_env.py finalize-lock "$(LOCK).new"
	@mv "$(LOCK).new" "$(LOCK)"
	@echo "$(LOCK) regenerated: run 'make test' before committing it"

# Drift check (not part of CI): a separate venv with the newest release of every dependency that setup.py allows
# (torch stays at the CPU pin), then the whole suite. Prints the packages whose version differs from the lock.
test-latest:
	@test -x $(LATEST_VENV)/bin/python || $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager "$(TORCH_PIN)" -e ".[test]"
	@$(LATEST_VENV)/bin/python -m pip freeze --exclude-editable > $(LATEST_VENV)/versions.txt
	@$(PYTHON) tools/setup_env.py drift $(LOCK) $(LATEST_VENV)/versions.txt
	$(LATEST_VENV)/bin/python -m pytest tests $(PYTEST_ARGS)

clean:
	rm -rf build *.egg-info .pytest_cache .benchmarks
