"""Which tests run on one leg of the matrix per Python, and why (a pytest plugin,
loaded by tests/conftest.py; tests/run_matrix.py drives it).

A test marked ``any_database`` checks behaviour that does not depend on the
database vendor: the ledger queries it makes are the ones every other test
makes on every database. tests/run_matrix.py runs such tests on the sqlite leg
of each Python (Django version) and sets ``QUEUED_STORAGE_TEST_ELSEWHERE=1`` on
that Python's other legs, where they are deselected (the matrix summary counts
them under "desel."). Without that variable every test runs, so a plain
``QUEUED_STORAGE_TEST_DB=postgresql pytest`` still runs the whole suite.

A test marked ``one_leg`` depends on neither the database nor the Django
version (the source's layout, the matrix's own plumbing), or is an end-to-end
run whose parts every leg tests: it runs on the matrix's first sqlite leg only.
tests/run_matrix.py sets ``QUEUED_STORAGE_TEST_ELSEWHERE=one_leg`` on the legs
that leave it to that one (``=1`` leaves both kinds).

A test module is marked here, by name (``MODULES``, ``ONE_LEG_MODULES``), or a
test marks itself with ``@pytest.mark.any_database`` or ``one_leg``.
"""

from __future__ import annotations

import os

import pytest

ELSEWHERE_ENV = "QUEUED_STORAGE_TEST_ELSEWHERE"
MARKER = "any_database"
ONE_LEG = "one_leg"
#: What each value of ELSEWHERE_ENV deselects.
LEFT: dict[str, tuple[str, ...]] = {"1": (MARKER, ONE_LEG), ONE_LEG: (ONE_LEG,)}

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
    # A site written from the 0.8 docs, switched as the README says, in
    # subprocesses (about 25 s of CPU a leg): what it checks is the API a 0.8
    # user calls; the ledger's SQL under it runs on every leg in the other tests.
    "tests.test_legacy08": "the 0.8 site end to end, its own processes",
    "tests.test_redaction": "secrets by value in rows, logs and outputs",
    "tests.test_without_celery": "an import test in a subprocess",
}


#: Test modules whose every test is ``one_leg``, with the reason.
ONE_LEG_MODULES: dict[str, str] = {
    "tests.test_layout": "reads the package's source: its modules and imports",
    "tests.test_layout_tests": "reads the tests' source: fixtures and helpers",
    "tests.test_legs": "the matrix's plumbing, run in subprocesses of its own",
    # 1,000 files through two moto buckets, a killed worker and the switch
    # (50-80 s): adoption, mirror copies, --check and --finish, each on every
    # leg in tests/test_migration*.py and tests/test_redteam_*.py.
    "tests.test_migration_e2e": "the whole migration end to end, on one leg",
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}: does not depend on the database vendor; tests/run_matrix.py "
        "runs it on one leg per Python (see tests/legs.py)",
    )
    config.addinivalue_line(
        "markers",
        f"{ONE_LEG}: depends on neither the database nor the Django version; "
        "tests/run_matrix.py runs it on one leg (see tests/legs.py)",
    )
    value = os.environ.get(ELSEWHERE_ENV, "")
    if value and value not in LEFT:
        raise pytest.UsageError(
            f"{ELSEWHERE_ENV}={value!r}: use one of {', '.join(sorted(LEFT))} "
            "(tests/legs.py), or leave it unset to run every test."
        )


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and module.__name__ in MODULES:
            item.add_marker(MARKER)
        if module is not None and module.__name__ in ONE_LEG_MODULES:
            item.add_marker(ONE_LEG)
    left = LEFT.get(os.environ.get(ELSEWHERE_ENV, ""), ())
    if not left:
        return

    def elsewhere(item: pytest.Item) -> bool:
        return any(item.get_closest_marker(marker) for marker in left)

    kept = [item for item in items if not elsewhere(item)]
    deselected = [item for item in items if elsewhere(item)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept
