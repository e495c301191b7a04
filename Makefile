# Developer and CI entry points. Everything runs from .venv, which `venv`
# creates and keeps in step with pyproject.toml.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=
PORT ?= 8000

# Azurite (the Azure Blob emulator) comes from npm, into a git-ignored folder.
NODE_PREFIX := .cache/node
AZURITE_VERSION := 3.35.0
AZURITE_STAMP := $(NODE_PREFIX)/.azurite-$(AZURITE_VERSION)

.PHONY: venv tools test bench bench-full demo sandbox lint format mypy clean

venv: $(STAMP)

# The stamp is newer than pyproject.toml once the install succeeded, so the
# install reruns only when the dependencies may have changed.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[test,s3,dev]"
	touch $(STAMP)

# Server tools the backend tests need beyond pip. Without npm the Azure tests
# skip with a loud reason; under CI=true a missing npm is an error here.
tools:
	@if [ -f $(AZURITE_STAMP) ]; then exit 0; fi; \
	if command -v npm >/dev/null 2>&1 && mkdir -p $(NODE_PREFIX) && \
		npm install --prefix $(NODE_PREFIX) --no-save --no-audit --no-fund \
			--loglevel=error azurite@$(AZURITE_VERSION); then \
		touch $(AZURITE_STAMP); \
	elif [ "$${CI:-}" = true ]; then \
		echo "make tools: cannot install azurite from npm (is npm installed?)" >&2; \
		exit 1; \
	else \
		echo "!!! make tools: no azurite (npm missing or failed): the Azure" \
			"backend tests will be SKIPPED" >&2; \
	fi

# Runs pytest once per database (sqlite, postgresql, mariadb); pytest
# options go through ARGS, e.g. make test ARGS="-k ledger -x".
test: venv tools
	$(BIN)/python tests/run_matrix.py $(ARGS)

# Benchmarks (benchmarks/README.md): side-by-side ratios against the same work
# without the package, written to benchmarks/results/. bench: SQLite and
# PostgreSQL, a few minutes; bench-full: the issue's sizes, MariaDB too.
bench: venv
	$(BIN)/python -m benchmarks $(ARGS)

bench-full: venv
	$(BIN)/python -m benchmarks --full $(ARGS)

demo: venv
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py demo

# The dev server at http://127.0.0.1:$(PORT)/ (admin: admin / admin), moto's S3
# and a worker; Ctrl-C stops all three. SANDBOX_WORKER=django_q runs qcluster.
sandbox: venv
	$(BIN)/python manage.py runsandbox --port $(PORT)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

mypy: venv
	$(BIN)/mypy

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .tox \
		.coverage .coverage.* test-results
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +
