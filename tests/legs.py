"""Which tests run on one leg of the matrix per Python, and why (a pytest plugin,
loaded by tests/conftest.py; tests/run_matrix.py drives it).

A test marked ``any_database`` checks behaviour that does not depend on the
database vendor: the ledger queries it makes are the ones every other test
makes on every database. tests/run_matrix.py runs such tests on the sqlite leg
of each Python (Django version) and sets ``QUEUED_STORAGE_TEST_ELSEWHERE=1`` on
that Python's other legs, where they are deselected (the matrix summary counts
them under "desel."). Without that variable every test runs, so a plain
``QUEUED_STORAGE_TEST_DB=postgresql pytest`` still runs the whole suite.

A test module is marked here, by name, or a test marks itself with
``@pytest.mark.any_database``.
"""

from __future__ import annotations

import os

import pytest

ELSEWHERE_ENV = "QUEUED_STORAGE_TEST_ELSEWHERE"
MARKER = "any_database"

#: Test modules whose every test is ``any_database``, with the reason.
MODULES: dict[str, str] = {
    # Remote-backend wire tests: each drives one remote (a server or emulator on
    # loopback, or the client library's own driver) through the package; what
    # they check happens between the package and the remote.
    "tests.test_backends": "every remote backend's round trip and real names",
    "tests.test_backend_dropbox": "Dropbox client wiring, no server",
    "tests.test_backend_ftp": "FTP wire test",
    "tests.test_backend_generic": "any Django Storage as local or remote",
    "tests.test_backend_s3": "moto S3 wire test",
    "tests.test_backend_sftp": "SFTP wire test",
    # Pure Python behaviour: options, checks and outputs, not the ledger's SQL.
    "tests.test_benchmark_harness": "arithmetic of the benchmark harness, no database",
    "tests.test_checks": "system checks read settings, not the database",
    # How 0.8's spellings build storages; their migrate runs are Django's own
    # operations, and the ledger's migrations run on every leg's test database.
    "tests.test_legacy_config": "0.8 configuration spellings",
    "tests.test_legacy_config_attack": "0.8 configuration spellings, attacked",
    "tests.test_redaction": "secrets by value in rows, logs and outputs",
    "tests.test_without_celery": "an import test in a subprocess",
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}: does not depend on the database vendor; tests/run_matrix.py "
        "runs it on one leg per Python (see tests/legs.py)",
    )


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and module.__name__ in MODULES:
            item.add_marker(MARKER)
    if os.environ.get(ELSEWHERE_ENV) != "1":
        return
    kept = [item for item in items if item.get_closest_marker(MARKER) is None]
    deselected = [item for item in items if item.get_closest_marker(MARKER)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept
