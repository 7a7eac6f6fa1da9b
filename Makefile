# The two commands of the README: `make demo` (the main job on a built-in
# default) and `make test`. Both set up .venv and system packages first.
VENV ?= .venv
PYTHON := $(VENV)/bin/python

.PHONY: setup demo test test-fast bench

setup:
	@VENV=$(VENV) ./scripts/setup.sh

demo: setup
	$(VENV)/bin/norton demo

test: setup
	$(PYTHON) -m pytest -q

test-fast: setup
	$(PYTHON) -m pytest -q -m "not slow"
