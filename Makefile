# StreamMesh developer commands. `make` alone lists them; each target documents itself with `##`.

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:
MAKEFLAGS += --no-builtin-rules --no-print-directory

# The interpreter the venv is made from: python3.11 when it is on PATH, else python3 (checked).
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null)
VENV := .venv
BIN := $(VENV)/bin
# Written after a successful install; older than pyproject.toml means "install again".
STAMP := $(VENV)/.streammesh-installed
PYTEST_ARGS ?=

.PHONY: help venv install backends prometheus test check proto docs up demo bench down clean distclean

help: ## Show this list
	@echo "usage: make <target>   (variables: PYTEST_ARGS='-k name -x', PYTHON=python3.11)"
	@echo
	@awk 'BEGIN { FS = ":.*## " } /^[a-z][a-z-]*:.*## / { printf "  %-10s %s\n", $$1, $$2 }' \
		$(MAKEFILE_LIST)

$(BIN)/python:
	@test -n "$(PYTHON)" || { echo "no python3.11 or python3 on PATH" >&2; exit 1; }
	@"$(PYTHON)" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || { \
		echo "$(PYTHON) is not Python 3.11; run: make PYTHON=/path/to/python3.11" >&2; exit 1; }
	"$(PYTHON)" -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -qq --disable-pip-version-check -e ".[dev]"
	@touch $@

venv: $(BIN)/python ## Create .venv (Python 3.11) if it is missing

install: $(STAMP) ## Install the package and dev tools into .venv (again only when pyproject.toml changed)

backends: ## Make sure PostgreSQL and Redis answer locally (start or install them if not)
	@scripts/ensure-backends.sh

prometheus: ## Make sure the prometheus and promtool binaries exist (apt-get install if not)
	@scripts/ensure-prometheus.sh

test: install backends ## Run the test suite (pass options with PYTEST_ARGS=...)
	@scripts/ensure-prometheus.sh || echo "make: no Prometheus; tests/mesh/test_prometheus.py will skip" >&2
	$(BIN)/python -m pytest --durations=25 $(PYTEST_ARGS)

check: install ## Lint, format check, type check, buf lint/breaking, generated-code freshness
	@scripts/check.sh

proto: install ## Regenerate streammesh/api from proto/
	$(BIN)/python scripts/gen_protos.py

docs: install ## Regenerate docs/configuration.md from the settings classes
	$(BIN)/python scripts/gen_config_reference.py

up: install backends ## Start the five services as local processes
	$(BIN)/streammesh up

bench: install backends ## Benchmark a stack of its own (open and closed loops, raw baseline, variants, processing; see README)
	$(BIN)/streammesh bench

demo: install backends ## Start the stack and run the end-to-end demo
	$(BIN)/streammesh up
	$(BIN)/streammesh demo


down: ## Stop the local processes started by `make up` / `make demo`
	$(BIN)/streammesh down

clean: ## Remove caches and build output (keeps .venv)
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +
	rm -rf .pytest_cache .mypy_cache .ruff_cache build dist

distclean: clean ## Also remove .venv and the egg-info
	rm -rf $(VENV) *.egg-info
