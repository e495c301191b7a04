"""External tools the integration and browser tests need: skipped loudly when
missing on a developer's machine, a failure under ``CI=true``."""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NoReturn

import pytest

from tests.databases import selected_vendor

IN_CI = os.environ.get("CI", "").lower() == "true"


def missing(reason: str) -> NoReturn:
    """Skip with ``reason``; under CI=true, fail: CI must run every test."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: a missing tool fails the run)", pytrace=False)
    pytest.skip(f"NOT TESTED: {reason}")


def require_module(module: str, install: str) -> ModuleType:
    """Import ``module`` or skip/fail, naming the package that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing(f"{module} is not importable ({exc}); pip install {install}")


#: For tests that start several processes: they run once per matrix, on the
#: sqlite leg (which CI always runs), not again on each server database.
sqlite_leg_only = pytest.mark.skipif(
    selected_vendor() != "sqlite",
    reason=(
        "runs on the sqlite leg of the matrix only (multi-process test, too slow "
        "to repeat per database); QUEUED_STORAGE_TEST_DB=sqlite runs it"
    ),
)
