# The two commands of the README: `make demo` (the main job on a built-in
# default) and `make test`. Both set up .venv and system packages first.
VENV ?= .venv
PYTHON := $(VENV)/bin/python

.PHONY: setup demo test test-fast lint bench

setup:
	@VENV=$(VENV) ./scripts/setup.sh

demo: setup
	$(VENV)/bin/norton demo

# Lint (ruff: pyflakes, isort, pyupgrade, bugbear) and types (mypy on src/norton),
# configured in pyproject.toml.
lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy

# The suite runs on both cores (pytest-xdist), one intra-op thread per worker: the
# tests' tiny convolutions gain nothing from more, and the DDP test's worker
# processes would otherwise oversubscribe the cores.
test: lint
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -q -n 2

test-fast: setup
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -q -n 2 -m "not slow"
