# Every target sets itself up: a fresh machine with Python 3.11 needs nothing else.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# Overrides for `make train`, e.g. `make train ARGS="trainer.max_steps=500"`.
ARGS ?=
BENCH_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install install-test train test test-fast bench chaos lint format clean new-experiment

help: ## list every target
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	@touch $@

# Azurite (Azure Blob Storage's emulator, for the tests) from npm, beside the venv: Node.js is the
# one thing the tests need outside Python.
AZURITE_VERSION := 3.37.0
$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test]'
	npm install --silent --no-audit --no-fund --prefix $(VENV)/azurite azurite@$(AZURITE_VERSION)
	@touch $@

install: $(VENV)/.installed ## create .venv, install the project editable with its runtime deps (torch 2.13.0 as your pip index serves it, hydra, boto3, wandb)

install-test: $(VENV)/.installed-test ## install the project with its test extras (and Azurite, from npm)

train: install ## a short CPU training on built-in synthetic data, with checkpoints
	$(BIN)/python train.py +experiment=example $(ARGS)

# The suite in two parts: the independent tests on two workers (a file per worker at a time, so
# a file's shared fixtures are built once), then the multi-process and timing-measuring ones
# (marked serial) alone, so no other test competes with their timeouts and ratios.
test: install-test lint ## lint, then the whole test suite on CPU (what .ci/run calls)
	$(BIN)/python -m pytest -n 2 --dist loadfile -m "not serial" --durations=15
	$(BIN)/python -m pytest -m serial --durations=10

test-fast: install-test ## the unit tests while you work (tests/unit: no train.py runs, not multi-process)
	$(BIN)/python -m pytest -n 2 tests/unit

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

# `make new-experiment NAME=x`: conf/experiment/x.yaml, a starting point for `+experiment=x`.
# The checks are make's own $(error): one line, and NAME never reaches a shell unchecked.
NAME ?=
experiment := $(value NAME)
NAME_CHARS := a b c d e f g h i j k l m n o p q r s t u v w x y z 0 1 2 3 4 5 6 7 8 9 _
without_chars = $(if $2,$(call without_chars,$(subst $(firstword $2),,$1),$(wordlist 2,$(words $2),$2)),$1)
options = $(sort $(basename $(notdir $(wildcard conf/$1/*.yaml))))
define EXPERIMENT_TEMPLATE
# @package _global_
# `python train.py +experiment=$(experiment)`. Values here override conf/config.yaml and its
# groups; the command line overrides these. See README, "Fork it".
defaults:
  # Each choice is a file in conf/<group>/; add yours there (a model in models/ with
  # conf/model/<name>.yaml, a data set in data/ with conf/data/<name>.yaml).
  - override /model: mlp                  # $(call options,model)
  - override /data: vectors               # $(call options,data)
  - override /optimizer: adamw            # $(call options,optimizer)
  - override /scheduler: warmup_cosine    # $(call options,scheduler)

run:
  name: $(experiment)

trainer:
  max_steps: 1000
  batch_size: 64          # per rank
  log_every: 50

checkpoint:
  every_minutes: 15       # the work an interruption without notice can cost; or every_steps
  keep_last: 3
endef
export EXPERIMENT_TEMPLATE

new-experiment: ## write conf/experiment/NAME.yaml to start your own run (NAME=my_model)
	$(if $(experiment),,$(error new-experiment: give a name, e.g. make new-experiment NAME=my_model))
	$(if $(or $(filter-out 1,$(words $(experiment))),$(call without_chars,$(experiment),$(NAME_CHARS))),$(error new-experiment: NAME must be lowercase letters, digits and underscores, not '$(experiment)'))
	$(if $(wildcard conf/experiment/$(experiment).yaml),$(error new-experiment: conf/experiment/$(experiment).yaml already exists; edit it or pick another NAME))
	@printf '%s\n' "$$EXPERIMENT_TEMPLATE" > conf/experiment/$(experiment).yaml
	@echo "wrote conf/experiment/$(experiment).yaml; train it with: $(BIN)/python train.py +experiment=$(experiment)"

clean: ## remove runs, caches and the venv
	rm -rf runs outputs multirun wandb .pytest_cache .ruff_cache $(VENV)
