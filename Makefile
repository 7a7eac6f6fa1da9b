# The two commands of the README: `make demo` (the main job on a built-in
# default) and `make test`. Both set up .venv and system packages first.
VENV ?= .venv
PYTHON := $(VENV)/bin/python

.PHONY: setup demo test test-fast bench

setup:
	@VENV=$(VENV) ./scripts/setup.sh

demo: setup
	$(VENV)/bin/norton demo

# One intra-op thread: the tests' tiny convolutions gain nothing from more, and
# the DDP test's worker processes would otherwise oversubscribe the cores.
test: setup
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -q

test-fast: setup
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -q -m "not slow"
