# The two front-door commands: `make run` starts the server with its defaults
# (127.0.0.1:8765, ./data); `make test` runs every test. Both set themselves up.
# `make check` is the gate CI runs first: formatting, lint (with a complexity
# limit) and types, with zero findings.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test check bench bench-all clean

run: $(VENV)/.installed
	$(BIN)/sectionchat serve

test: $(VENV)/.installed
	./scripts/system-deps.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)

check: $(VENV)/.installed
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

# Every target's benchmark against its baseline, each ratio with its min–max over runs (about 20 minutes).
bench: $(VENV)/.installed
	$(BIN)/python -m bench.all

# That, plus scale-out over Redis, the plots and the growth curves (about 40 minutes).
bench-all: bench
	$(BIN)/python -m bench.scaling
	$(BIN)/python -m bench.plots
	$(BIN)/python -m bench.growth

# Costs against the data's size: start, history, subscribe, write, restart (about 15 minutes).
.PHONY: bench-growth
bench-growth: $(VENV)/.installed
	$(BIN)/python -m bench.growth

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test,bench,lint]'
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info test-artifacts
