# Every target sets itself up: a fresh machine with Python 3.11 needs nothing else.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# Overrides for `make train`, e.g. `make train ARGS="trainer.max_steps=500"`.
ARGS ?=
BENCH_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install install-test train test bench chaos lint format clean

help: ## list every target
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	@touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $@

install: $(VENV)/.installed ## create .venv and install the project (torch==2.13.0, CPU build where available)

install-test: $(VENV)/.installed-test ## install the project with its test extras

train: install ## a short CPU training on built-in synthetic data, with checkpoints
	$(BIN)/python train.py +experiment=example $(ARGS)

test: install-test lint ## lint, then the whole test suite on CPU (what .ci/run calls)
	$(BIN)/python -m pytest

bench: install ## checkpoint performance on this machine and disk (BENCH_ARGS="--size-gib 2")
	$(BIN)/python -m spot bench $(BENCH_ARGS)

CHAOS_ARGS ?= --interruptions 5 --step-delay 0.01 -- +experiment=example trainer.max_steps=600
chaos: install ## train under random interruptions (notice, SIGTERM, SIGKILL), compare bitwise
	$(BIN)/python -m spot chaos $(CHAOS_ARGS)

lint: install-test ## the pre-commit hooks (ruff, format, weights_only loads, YAML), all offline
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pre-commit run --all-files --show-diff-on-failure

format: install-test ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean: ## remove runs, caches and the venv
	rm -rf runs outputs multirun wandb .pytest_cache .ruff_cache $(VENV)
