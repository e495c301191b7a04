"""The matrix's plumbing (tests/legs.py, tests/run_matrix.py): which tests leave
the server legs, and the closing line the matrix is judged by."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import legs, run_matrix

TESTS = Path(__file__).parent
pytestmark = pytest.mark.any_database


def test_every_any_database_module_exists() -> None:
    # A renamed module would silently run on every leg again.
    missing = [
        name
        for name in legs.MODULES
        if not (TESTS / f"{name.removeprefix('tests.')}.py").is_file()
    ]
    assert missing == []


def collect(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != legs.ELSEWHERE_ENV}
    if env_value is not None:
        env[legs.ELSEWHERE_ENV] = env_value
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q"]
    done = subprocess.run(
        [*command, "tests/test_checks.py", "tests/test_fields.py"],
        cwd=TESTS.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_any_database_tests_leave_only_the_legs_told_so() -> None:
    everywhere = collect(None)
    elsewhere = collect("1")
    assert "tests/test_checks.py::" in everywhere
    assert "deselected" not in everywhere
    assert "tests/test_checks.py::" not in elsewhere
    assert "tests/test_fields.py::" in elsewhere
    assert "deselected" in elsewhere


def test_the_closing_line_reads_pytest_summaries() -> None:
    lines = ["...", "==== 3 failed, 10 passed, 2 skipped, 1 error in 5.1s ===="]
    assert run_matrix.parse_counts(lines) == {
        "failed": 3,
        "passed": 10,
        "skipped": 2,
        "errors": 1,
    }
    assert run_matrix.parse_counts(["no summary here"]) is None


def test_a_python_that_cannot_run_the_suite_is_named(tmp_path: Path) -> None:
    version, problem = run_matrix.interpreter_version(str(tmp_path / "no-python"))
    assert version == ""
    assert problem is not None and "no-python" in problem
