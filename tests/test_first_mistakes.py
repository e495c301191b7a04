"""The first mistakes of a site that starts using the storage, caught early: the app
missing from ``INSTALLED_APPS``, and the ledger not migrated on its database. Each
is told by ``manage.py check`` (an ID and a hint, no traceback) and by a clear
error at the first save, which changes nothing. Real ``manage.py`` processes
against a site of their own, on an empty database of the selected vendor."""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.apps import apps
from django.core.checks import run_checks
from django.db import connection
from django.db.migrations.loader import MigrationLoader

from queued_storage import checks, installation
from queued_storage.installation import LABEL
from tests.databases import database_settings, live_database, run_id, selected_vendor
from tests.helpers import BACKEND, FS, files_under
from tests.workers import run_command

pytestmark = pytest.mark.slow

E016 = "queued_storage.E016"
MIGRATE_HINT = "HINT: Run manage.py migrate queued_storage."
NOT_INSTALLED_HINT = (
    "HINT: Add 'queued_storage' to INSTALLED_APPS and run manage.py migrate "
    "queued_storage."
)

#: A site's app whose model stores files with a QueuedStorage: one built in the
#: field, one 0.8 subclass configured by class attributes.
MODELS = """\
from django.db import models

from queued_storage.backends import QueuedStorage


class LegacySubclass(QueuedStorage):
    local = "queued_local"
    remote = "queued_remote"
    delayed = True


class Upload(models.Model):
    file = models.FileField(
        storage=QueuedStorage("queued_local", "queued_remote", key="uploads")
    )
    legacy = models.FileField(storage=LegacySubclass(key="legacy"))
"""

#: Saves with each storage of the site, in and out of a transaction, small and
#: large (a large file is written before its row): the outcome of each, and the
#: files the local storage holds afterwards.
SAVES = """\
import contextlib
import json
from django.apps import apps
from django.core.files.base import ContentFile
from django.core.files.storage import storages
from django.db import transaction
from queued_storage import prefetch_locations

storage = {"STORAGES": lambda: storages["queued"]}
if apps.is_installed("site_app"):
    from site_app.models import Upload
    storage["field"] = lambda: Upload._meta.get_field("file").storage
    storage["0.8 subclass"] = lambda: Upload._meta.get_field("legacy").storage


def prefetched(storage):
    with prefetch_locations(storage, ["1.txt"]):
        return storage.exists("1.txt")


uses = {}
for which, get in storage.items():
    for size, atomic in [(1, False), (1, True), (5 * 2**20, True)]:
        where = "in" if atomic else "out of"
        uses[f"{which} {size} {where} a transaction"] = (
            lambda get=get, size=size: get().save(
                f"{size}.txt", ContentFile(b"x" * size)
            ),
            atomic,
        )
    uses[f"{which} exists"] = (lambda get=get: get().exists("1.txt"), False)
    uses[f"{which} prefetched"] = (lambda get=get: prefetched(get()), False)
outcomes = {}
for case, (use, atomic) in uses.items():
    try:
        with transaction.atomic() if atomic else contextlib.nullcontext():
            result = use()
    except Exception as exc:
        cause = exc.__cause__
        outcomes[case] = [
            type(exc).__name__,
            str(exc),
            None if cause is None else type(cause).__name__,
        ]
    else:
        outcomes[case] = result if isinstance(result, bool) else "saved"
print("OUTCOMES " + json.dumps(outcomes))
"""

SAVES_CASES = [
    "1 out of a transaction",
    "1 in a transaction",
    "5242880 in a transaction",
    "exists",
    "prefetched",
]


def site_settings(root: Path, database: dict[str, Any], *apps: str) -> dict[str, Any]:
    """Settings of a small site under ``root``: ``apps``, no admin, its own
    storages' directories, and ``database``."""
    return {
        "INSTALLED_APPS": ["django.contrib.contenttypes", "django.contrib.auth", *apps],
        "ROOT_URLCONF": "site_urls",
        "MIDDLEWARE": [],
        "DATABASES": {"default": database},
        "STORAGES": {
            "default": {"BACKEND": FS, "OPTIONS": {"location": str(root / "media")}},
            "queued_local": {
                "BACKEND": FS,
                "OPTIONS": {"location": str(root / "local")},
            },
            "queued_remote": {
                "BACKEND": FS,
                "OPTIONS": {"location": str(root / "remote")},
            },
            "queued": {
                "BACKEND": BACKEND,
                "OPTIONS": {"local": "queued_local", "remote": "queued_remote"},
            },
        },
    }


Manage = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def site_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory on the subprocesses' path with the site's app and URLs."""
    app = tmp_path / "site_app"
    app.mkdir()
    (app / "__init__.py").write_text("")
    (app / "models.py").write_text(MODELS)
    (tmp_path / "site_urls.py").write_text("urlpatterns = []\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return tmp_path


@pytest.fixture
def empty_database(site_root: Path) -> Iterator[dict[str, Any]]:
    """The settings of an empty database of the selected vendor, dropped after."""
    vendor = selected_vendor()
    database = database_settings(vendor)
    if vendor == "sqlite":
        database["NAME"] = str(site_root / "empty.sqlite3")
        yield database
        return
    database["NAME"] = f"first_mistakes_{run_id()}_{uuid.uuid4().hex[:6]}"
    with live_database(database["NAME"]):
        yield database


def manage_with(settings: dict[str, Any]) -> Manage:
    def manage(*args: str) -> subprocess.CompletedProcess[str]:
        return run_command(*args, overrides=settings)

    return manage


def saves(manage: Manage) -> dict[str, Any]:
    done = manage("shell", "-c", SAVES)
    assert done.returncode == 0, done.stdout + done.stderr
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("OUTCOMES")]
    outcomes: dict[str, Any] = json.loads(line.removeprefix("OUTCOMES "))
    return outcomes


def warnings_of(done: subprocess.CompletedProcess[str]) -> list[str]:
    """The queued_storage messages of a check's output, each with its hint."""
    lines = done.stderr.splitlines()
    return [
        f"{line.strip()} | {lines[i + 1].strip()}"
        for i, line in enumerate(lines)
        if "(queued_storage." in line
    ]


def as_raised(warning: str) -> str:
    """The error a first save raises for a check's ``warning`` (of
    :func:`warnings_of`): the same problem and hint."""
    problem, _, hint = warning.partition(" | HINT: ")
    return f"{problem.partition(') ')[2]} {hint}"


def save_errors(outcomes: dict[str, Any]) -> set[str]:
    """The messages the saves of :data:`SAVES` raised (each chained to the
    database's own error): the reads in the outcomes are left out."""
    errors = set()
    for case, outcome in outcomes.items():
        if "transaction" in case:
            error, message, cause = outcome
            assert error == "ImproperlyConfigured", case
            assert cause in ("OperationalError", "ProgrammingError"), case
            errors.add(message)
    return errors


def ledger_tables() -> set[str]:
    return {model._meta.db_table for model in apps.get_app_config(LABEL).get_models()}


def ledger_migrations() -> list[str]:
    """The app's migrations, in the order migrate applies them."""
    graph = MigrationLoader(None).graph
    (leaf,) = graph.leaf_nodes(LABEL)
    return [f"{app}.{name}" for app, name in graph.forwards_plan(leaf) if app == LABEL]


def not_migrated(warning: str) -> tuple[set[str], list[str]]:
    """The missing tables and the unapplied migrations a W001 ``warning`` names."""
    match = re.search(r"on database 'default': (.*) \(unapplied: (.*)\)\. \|", warning)
    assert match, warning
    missing = set(re.findall(r"table (\w+) is missing", match[1]))
    return missing, match[2].split(", ")


# The app missing from INSTALLED_APPS


def test_check_without_the_app_names_it_with_e016_and_no_traceback(
    site_root: Path,
) -> None:
    """Today's silence (the app's checks are registered by its ready(), which
    never runs) and the traceback of the model import are gone: the storages of
    the model fields and of STORAGES are named."""
    manage = manage_with(
        site_settings(site_root, database_settings(selected_vendor()), "site_app")
    )

    done = manage("check")

    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr == (
        "SystemCheckError: System check identified some issues:\n"
        "\n"
        "ERRORS:\n"
        f"?: ({E016}) 'queued_storage' is not in INSTALLED_APPS, so the ledger that "
        "every QueuedStorage writes has no table (used by STORAGES['queued'], "
        "site_app.Upload.file, site_app.Upload.legacy).\n"
        f"\t{NOT_INSTALLED_HINT}\n"
        "\n"
        "System check identified 1 issue (0 silenced).\n"
    )


def test_first_save_without_the_app_says_what_to_do_and_writes_nothing(
    site_root: Path, empty_database: dict[str, Any]
) -> None:
    manage = manage_with(site_settings(site_root, empty_database, "site_app"))

    outcomes = saves(manage)

    assert list(outcomes) == [
        f"{which} {case}"
        for which in ("STORAGES", "field", "0.8 subclass")
        for case in SAVES_CASES
    ]
    for case, outcome in outcomes.items():
        error, message, cause = outcome
        assert error == "ImproperlyConfigured", case
        assert message.endswith(NOT_INSTALLED_HINT.removeprefix("HINT: ")), case
        assert "app_label" not in message
        assert cause is None  # raised before anything was tried
    assert not (site_root / "local").exists()


# The ledger not migrated


def test_plain_check_asks_no_database(
    site_root: Path, empty_database: dict[str, Any]
) -> None:
    """The database check runs with --database only (and before migrate): a plain
    check of a site whose ledger is not migrated reports nothing of it. (On Django
    6.1 Django's own JSONField check opens a connection in a plain check, so a
    database that cannot be reached is no test of ours there.)"""
    manage = manage_with(site_settings(site_root, empty_database, "queued_storage"))

    plain = manage("check")

    assert plain.returncode == 0, plain.stderr
    assert "System check identified no issues" in plain.stdout
    assert "W001" not in plain.stdout + plain.stderr


def test_empty_database_database_check_warns_w001_and_migrate_fixes_it(
    site_root: Path, empty_database: dict[str, Any]
) -> None:
    """A warning, not an error: ``migrate`` runs the database checks first, and an
    error would stop the command that fixes it."""
    manage = manage_with(site_settings(site_root, empty_database, "queued_storage"))

    checked = manage("check", "--database", "default")
    strict = manage("check", "--database", "default", "--fail-level", "WARNING")
    migrated = manage("migrate", "queued_storage")
    after = manage("check", "--database", "default", "--fail-level", "WARNING")

    assert checked.returncode == 0, checked.stderr
    assert strict.returncode == 1
    assert "Traceback" not in checked.stderr + strict.stderr
    (warning,) = warnings_of(checked)
    assert not_migrated(warning) == (ledger_tables(), ledger_migrations()), warning
    assert warning.startswith(
        "?: (queued_storage.W001) The ledger is not migrated on database 'default': "
    )
    assert warning.endswith(f" | {MIGRATE_HINT}")
    assert warnings_of(strict) == [warning]
    # migrate warned first, and went on.
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    assert warnings_of(migrated) == [warning]
    assert "Applying queued_storage.0001_initial... OK" in migrated.stdout
    assert after.returncode == 0, after.stderr
    assert warnings_of(after) == []


def test_empty_database_first_use_raises_the_checks_problem_and_hint(
    site_root: Path, empty_database: dict[str, Any]
) -> None:
    """Saves in the caller's transaction too (which the error aborted on
    PostgreSQL), of a small file (its row first) and a large one (its file
    first), and reads: the check's words, and nothing written."""
    manage = manage_with(site_settings(site_root, empty_database, "queued_storage"))

    (warning,) = warnings_of(manage("check", "--database", "default"))
    outcomes = saves(manage)

    assert list(outcomes) == [f"STORAGES {case}" for case in SAVES_CASES]
    assert save_errors(outcomes) == {as_raised(warning)}
    assert outcomes["STORAGES exists"][:2] == [
        "ImproperlyConfigured",
        as_raised(warning),
    ]
    assert outcomes["STORAGES prefetched"][:2] == outcomes["STORAGES exists"][:2]
    assert as_raised(warning).endswith(f". {MIGRATE_HINT.removeprefix('HINT: ')}")
    assert not (site_root / "local").exists()


def test_half_migrated_database_is_reported_with_what_is_missing(
    site_root: Path, empty_database: dict[str, Any]
) -> None:
    manage = manage_with(site_settings(site_root, empty_database, "queued_storage"))
    assert manage("migrate", "queued_storage", "0002").returncode == 0

    checked = manage("check", "--database", "default")
    outcomes = saves(manage)

    (warning,) = warnings_of(checked)
    assert "(queued_storage.W001)" in warning
    # What came after 0002: the state table (0003) and those since.
    after_0002 = ledger_migrations()[2:]
    assert after_0002[0] == "queued_storage.0003_storage_state"
    assert not_migrated(warning) == (
        ledger_tables() - {"queued_storage_pendingtransfer"},
        after_0002,
    )
    assert warning.endswith(f" | {MIGRATE_HINT}")
    assert outcomes["STORAGES exists"] is False  # reads need no state table
    assert outcomes["STORAGES prefetched"] is False
    assert save_errors(outcomes) == {as_raised(warnings_of(checked)[0])}
    assert not (site_root / "local").exists()


def test_a_table_without_a_column_fails_the_save_and_removes_its_file(
    site_root: Path, empty_database: dict[str, Any]
) -> None:
    """Every migration recorded as applied, and a column gone (dropped by hand,
    or a migration faked): the check names the column and the way back; a large
    file's save, which wrote its file before the row, removes it again."""
    manage = manage_with(site_settings(site_root, empty_database, "queued_storage"))
    assert manage("migrate", "queued_storage").returncode == 0
    dropped = manage(
        "shell",
        "-c",
        "from django.db import connection\n"
        "with connection.cursor() as cursor:\n"
        "    cursor.execute('ALTER TABLE queued_storage_pendingtransfer DROP COLUMN host')",
    )
    assert dropped.returncode == 0, dropped.stderr

    checked = manage("check", "--database", "default")
    outcomes = saves(manage)

    assert warnings_of(checked) == [
        "?: (queued_storage.W001) The ledger is not migrated on database 'default': "
        "table queued_storage_pendingtransfer has no column host. | HINT: "
        "django_migrations records every migration of queued_storage as applied on "
        "'default', yet the tables do not match: restore what is missing (manage.py "
        "sqlmigrate queued_storage NAME prints a migration's SQL) or, if none of the "
        "tables is there, run manage.py migrate queued_storage zero --fake and then "
        "manage.py migrate queued_storage."
    ]
    assert outcomes["STORAGES exists"] is False  # reads need no host
    assert outcomes["STORAGES prefetched"] is False
    assert save_errors(outcomes) == {as_raised(warnings_of(checked)[0])}
    # The large file was written (the directory is made by a write), then removed.
    assert (site_root / "local").is_dir()
    assert files_under(site_root / "local") == []


def test_an_unapplied_migration_with_the_tables_there_is_w002(
    site_root: Path, empty_database: dict[str, Any]
) -> None:
    """The migration loader compares: a migration that changes no column (a data
    migration, or one recorded away) is still one to apply."""
    manage = manage_with(site_settings(site_root, empty_database, "queued_storage"))
    assert manage("migrate", "queued_storage").returncode == 0
    forgotten = manage(
        "shell",
        "-c",
        "from django.db.migrations.recorder import MigrationRecorder\n"
        "from django.db import connection\n"
        "MigrationRecorder(connection).record_unapplied("
        "'queued_storage', '0003_storage_state')",
    )
    assert forgotten.returncode == 0, forgotten.stderr

    checked = manage("check", "--database", "default")

    assert warnings_of(checked) == [
        "?: (queued_storage.W002) The ledger has unapplied migrations on database "
        f"'default': queued_storage.0003_storage_state. | {MIGRATE_HINT}"
    ]
    assert saves(manage) == {
        "STORAGES 1 out of a transaction": "saved",
        "STORAGES 1 in a transaction": "saved",
        "STORAGES 5242880 in a transaction": "saved",
        "STORAGES exists": True,
        "STORAGES prefetched": True,
    }


# In this process


def test_checks_are_registered_once_with_the_app_installed(settings: Any) -> None:
    """backends imports the checks (for sites without the app) and ready() does:
    each message comes once."""
    settings.QUEUED_STORAGE_WORKER = "nope"

    ids = [m.id for m in run_checks() if m.id and m.id.startswith("queued_storage")]

    assert ids == ["queued_storage.E003"]


@pytest.mark.django_db
def test_the_database_check_costs_a_query_per_table_and_the_loaders(
    django_assert_num_queries: Any,
) -> None:
    """Cheap: the migration recorder's two queries, the table names, and a query
    of no rows per table of the ledger."""
    tables = len(installation.ledger_databases()[connection.alias])

    with django_assert_num_queries(3 + tables):
        assert checks.check_ledger_tables(databases=[connection.alias]) == []
    with django_assert_num_queries(0):
        assert checks.check_ledger_tables(databases=None) == []


def test_every_model_of_the_app_declares_its_app_label() -> None:
    """Without it, a site without the app dies importing queued_storage.backends
    (Django's "doesn't declare an explicit app_label") instead of hearing E016."""
    undeclared = [
        model.__name__
        for model in apps.get_app_config(LABEL).get_models(include_auto_created=True)
        if model._meta.original_attrs.get("app_label") != LABEL
    ]

    assert undeclared == [], 'add app_label = "queued_storage" to their Meta'
