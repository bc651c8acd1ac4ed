# alphaalign — `make train` runs the offline CPU demo end to end; `make test` runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RECIPE ?= demo
ARGS   ?=
STAMP  := $(VENV)/.installed

.PHONY: install train validate test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned inside pyproject.toml and resolved in the same command: an unpinned torch pulls CUDA builds.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

train: install
	$(BIN)/alphaalign train recipes/$(RECIPE).yaml $(ARGS)

validate: install
	$(BIN)/alphaalign validate recipes/$(RECIPE).yaml $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(ARGS)

lint: install
	$(BIN)/ruff check alphaalign tests
	$(BIN)/ruff format --check alphaalign tests

clean:
	rm -rf outputs .cache .pytest_cache
