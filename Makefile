# Developer and CI entry points. Everything runs from .venv, which `venv`
# creates and keeps in step with pyproject.toml.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# `make demo` installs only what the demo needs into the same .venv; the full
# install (STAMP) brings all of that too.
DEMO_STAMP := $(VENV)/.installed-demo
# The newest Django on the newest Python, in a venv of its own (`make test-latest`,
# and .ci/run). PYTHON_LATEST must be a Python that Django 6.1 supports.
PYTHON_LATEST ?= python3.13
DJANGO_LATEST := Django>=6.1,<6.2
LATEST_VENV := .venv-django61
LATEST_BIN := $(LATEST_VENV)/bin
LATEST_STAMP := $(LATEST_VENV)/.installed
ARGS ?=
PORT ?= 8000

# Azurite (the Azure Blob emulator) comes from npm, into a git-ignored folder.
NODE_PREFIX := .cache/node
AZURITE_VERSION := 3.35.0
AZURITE_STAMP := $(NODE_PREFIX)/.azurite-$(AZURITE_VERSION)

.PHONY: venv venv-latest tools test test-latest ci bench bench-full demo sandbox \
	lint format mypy clean

venv: $(STAMP)

# The stamp is newer than pyproject.toml once the install succeeded, so the
# install reruns only when the dependencies may have changed. The test and dev
# tools are dependency groups (pyproject.toml), which pip installs from 25.1 on.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade "pip>=25.1"
	$(BIN)/python -m pip install -e . --group dev
	touch $(STAMP) $(DEMO_STAMP)

# The package with its s3 extra (django-storages, boto3) and the demo group
# (moto's S3 server); the q2 extra for `SANDBOX_WORKER=django_q make sandbox`,
# the prometheus extra for the sandbox's /metrics.
$(DEMO_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade "pip>=25.1"
	$(BIN)/python -m pip install -e ".[s3,q2,prometheus]" --group demo
	touch $(DEMO_STAMP)

venv-latest: $(LATEST_STAMP)

$(LATEST_STAMP): pyproject.toml
	test -x $(LATEST_BIN)/python || $(PYTHON_LATEST) -m venv $(LATEST_VENV)
	$(LATEST_BIN)/python -m pip install --upgrade "pip>=25.1"
	$(LATEST_BIN)/python -m pip install -e . --group test "$(DJANGO_LATEST)"
	touch $(LATEST_STAMP)

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

# The suite on the newest Django and Python: SQLite and PostgreSQL.
test-latest: venv venv-latest tools
	QUEUED_STORAGE_TEST_LEGS="$(LATEST_BIN)/python=sqlite,postgresql" \
		$(BIN)/python tests/run_matrix.py $(ARGS)

# What .ci/run runs: both of the above in one matrix, one summary line. The legs
# start in this order (.ci/run starts all five at once; with fewer at a time,
# the longest first: mariadb has the chaos test, the first sqlite leg the
# one_leg tests).
ci: venv venv-latest tools
	QUEUED_STORAGE_TEST_LEGS="$(BIN)/python=mariadb,sqlite,postgresql \
		$(LATEST_BIN)/python=sqlite,postgresql" \
		$(BIN)/python tests/run_matrix.py $(ARGS)

# Benchmarks (benchmarks/README.md): side-by-side ratios against the same work
# without the package, written to benchmarks/results/. bench: SQLite and
# PostgreSQL, a few minutes; bench-full: the issue's sizes, MariaDB too.
bench: venv
	$(BIN)/python -m benchmarks $(ARGS)

bench-full: venv
	$(BIN)/python -m benchmarks --full $(ARGS)

demo: $(DEMO_STAMP)
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py demo

# The dev server at http://127.0.0.1:$(PORT)/ (admin: admin / admin), moto's S3
# and a worker; Ctrl-C stops all three. SANDBOX_WORKER=django_q runs qcluster.
sandbox: $(DEMO_STAMP)
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
	find . -path ./$(VENV) -prune -o -path ./$(LATEST_VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +
