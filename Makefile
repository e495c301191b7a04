# Developer and CI entry points. Everything runs from .venv, which `venv`
# creates and keeps in step with pyproject.toml.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: venv test demo lint format mypy clean

venv: $(STAMP)

# The stamp is newer than pyproject.toml once the install succeeded, so the
# install reruns only when the dependencies may have changed.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[test,s3,dev]"
	touch $(STAMP)

# Runs pytest once per database (sqlite, postgresql, mariadb); pytest
# options go through ARGS, e.g. make test ARGS="-k ledger -x".
test: venv
	$(BIN)/python tests/run_matrix.py $(ARGS)

demo: venv
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py demo

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
