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


def test_every_any_database_and_one_leg_module_exists() -> None:
    # A renamed module would silently run on every leg again.
    missing = [
        name
        for name in [*legs.MODULES, *legs.ONE_LEG_MODULES]
        if not (TESTS / f"{name.removeprefix('tests.')}.py").is_file()
    ]
    assert missing == []


def collect(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != legs.ELSEWHERE_ENV}
    if env_value is not None:
        env[legs.ELSEWHERE_ENV] = env_value
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q"]
    done = subprocess.run(
        [*command, "tests/test_checks.py", "tests/test_fields.py", __file__],
        cwd=TESTS.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_any_database_and_one_leg_tests_leave_only_the_legs_told_so() -> None:
    everywhere = collect(None)
    assert "tests/test_checks.py::" in everywhere
    assert "tests/test_legs.py::" in everywhere
    assert "deselected" not in everywhere
    elsewhere = collect("1")
    assert "tests/test_checks.py::" not in elsewhere
    assert "tests/test_legs.py::" not in elsewhere
    assert "tests/test_fields.py::" in elsewhere
    assert "deselected" in elsewhere
    # The sqlite leg of another Python: the any_database tests stay.
    other_python = collect("one_leg")
    assert "tests/test_checks.py::" in other_python
    assert "tests/test_legs.py::" not in other_python
    assert "tests/test_fields.py::" in other_python


def test_an_unknown_elsewhere_value_is_a_usage_error() -> None:
    with pytest.raises(AssertionError, match="use one of 1, one_leg"):
        collect("yes")


def leg(python: str, vendor: str) -> run_matrix.Leg:
    return run_matrix.Leg(python, vendor)


def test_the_first_sqlite_leg_runs_the_one_leg_tests_and_each_python_its_own() -> None:
    matrix = [
        leg("py52", "mariadb"),
        leg("py52", "sqlite"),
        leg("py52", "postgresql"),
        leg("py61", "sqlite"),
        leg("py61", "postgresql"),
        leg("py70", "postgresql"),
    ]
    run_matrix.assign_elsewhere(matrix)
    assert [m.elsewhere for m in matrix] == ["1", "", "1", "one_leg", "1", "one_leg"]


def test_without_a_sqlite_leg_the_first_leg_runs_everything() -> None:
    matrix = [leg("py52", "postgresql"), leg("py52", "mariadb")]
    run_matrix.assign_elsewhere(matrix)
    assert [m.elsewhere for m in matrix] == ["", "one_leg"]


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
