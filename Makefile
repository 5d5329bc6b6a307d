SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# Re-install when the project's dependencies change.
INSTALLED := $(VENV)/.installed
PROTOS := $(wildcard protos/freshrec/v1/*.proto)
GENERATED := freshrec/v1/.generated
PYTEST_ARGS ?=
# `buf breaking` compares protos/ with those on branch main: the local branch where there is one,
# origin/main in a clone without it (a CI checkout of one commit).
PROTOS_BASE = $(shell git rev-parse --verify --quiet main >/dev/null && echo main || echo origin/main)

.PHONY: help
help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

$(INSTALLED): pyproject.toml requirements.lock | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	@# pyproject.toml says which versions work, requirements.lock which ones are installed (`make lock`).
	@# torch is pinned to 2.13.0 in both: any other spec pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet --config-settings editable_mode=compat -c requirements.lock -e '.[dev,text]'
	touch $@

.PHONY: install
install: $(INSTALLED) $(GENERATED) ## Create .venv, install everything, generate protobuf code

.PHONY: lock
lock: | $(BIN)/python ## Pin the versions installed in .venv in requirements.lock (after editing pyproject.toml)
	@# Without the old pins: installs what pyproject.toml now asks for, keeps what already fits.
	$(BIN)/pip install --quiet --config-settings editable_mode=compat -e '.[dev,text]'
	@# A local version label (torch's +cpu) names a build PyPI does not carry: pin the public version.
	{ echo '# Versions `make install` installs; pyproject.toml has the ranges. Regenerate: make lock.'; \
	  $(BIN)/pip freeze --exclude-editable | sed -E 's/^([^=]+==[^+]+)\+.*/\1/'; } > requirements.lock
	@if grep -n ' @ ' requirements.lock; then echo 'requirements.lock: not from PyPI (above)' >&2; exit 1; fi

$(GENERATED): $(PROTOS) $(INSTALLED)
	rm -rf freshrec/v1
	mkdir -p freshrec/v1
	$(BIN)/python -m grpc_tools.protoc -Iprotos \
		--python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	touch $@

.PHONY: proto
proto: $(GENERATED) ## Regenerate Python code and .pyi stubs from protos/

.PHONY: migration
migration: install ## New Alembic revision from model changes: make migration SERVICE=feature MSG="add x"
	$(BIN)/python -m cli.migration "$${SERVICE:?set SERVICE=<service>}" "$${MSG:?set MSG=<what changes>}"

.PHONY: run
run: install ## Start the whole stack (NATS, SQLite, model store under ./var, four services): freshrec up
	$(BIN)/freshrec up

.PHONY: test
test: install ## Run the test suite (real nats-server, SQLite, gRPC, onnxruntime)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

.PHONY: faults
faults: install ## Fault-injection suite: NATS, service and database faults under load (several minutes)
	$(BIN)/python -m pytest -m faults tests/faults -q $(PYTEST_ARGS)

.PHONY: lint
lint: install ## Ruff and mypy on hand-written code; buf lint, and buf breaking against main's protos
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy shared services cli
	$(BIN)/buf lint
	$(BIN)/buf breaking protos --against '.git#ref=$(PROTOS_BASE),subdir=protos'

.PHONY: bench
bench: install ## Run every benchmark under bench/ and write bench/results/<date>/REPORT.md with plots
	$(BIN)/python bench/report.py

.PHONY: docs
docs: install ## Regenerate docs/configuration.md and docs/metrics.md from the code
	$(BIN)/python -m cli.docs

.PHONY: clean
clean: ## Remove generated code and runtime state (keeps .venv)
	rm -rf freshrec var .pytest_cache
