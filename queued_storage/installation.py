"""Whether a site can use the ledger: the app installed, and its tables migrated on
the databases the ledger's models are routed to; the errors that say how to fix
it, for ``manage.py check`` and for the first use of a storage."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from django.apps import apps
from django.core.exceptions import ImproperlyConfigured
from django.db import (
    DEFAULT_DB_ALIAS,
    OperationalError,
    ProgrammingError,
    connections,
    router,
)
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.migrations.loader import MigrationLoader
from django.db.migrations.recorder import MigrationRecorder
from django.db.models import Model

#: The app label of the ledger's models (they declare it: see models.py).
LABEL = "queued_storage"
NOT_INSTALLED = (
    "'queued_storage' is not in INSTALLED_APPS, so the ledger that every "
    "QueuedStorage writes has no table"
)
NOT_INSTALLED_HINT = (
    "Add 'queued_storage' to INSTALLED_APPS and run manage.py migrate queued_storage."
)


def installed() -> bool:
    """Whether the app is installed (a dict lookup: on every use of a storage)."""
    return LABEL in apps.app_configs


def refuse_unless_installed(key: str) -> None:
    if LABEL not in apps.app_configs:
        raise ImproperlyConfigured(
            f"QueuedStorage {key!r} cannot be used: {NOT_INSTALLED}. "
            f"{NOT_INSTALLED_HINT}"
        )


def ledger_databases() -> dict[str, list[type[Model]]]:
    """The ledger's models (with a table to migrate) by the database each is
    read from or written to."""
    found: dict[str, list[type[Model]]] = {}
    for model in apps.get_app_config(LABEL).get_models():
        if not model._meta.managed or model._meta.proxy:
            continue
        for alias in dict.fromkeys(
            [router.db_for_write(model), router.db_for_read(model)]
        ):
            found.setdefault(alias, []).append(model)
    return found


def schema_gaps(
    connection: BaseDatabaseWrapper, models: Iterable[type[Model]]
) -> list[str]:
    """What the tables of ``models`` lack on ``connection``, in words: each
    missing table, and each table's missing columns. One query per table."""
    gaps: list[str] = []
    introspection = connection.introspection
    with connection.cursor() as cursor:
        tables = set(introspection.table_names(cursor))
        for model in models:
            table = model._meta.db_table
            if table not in tables:
                gaps.append(f"table {table} is missing")
                continue
            # Not get_table_description(): on SQLite that costs a query a column.
            cursor.execute(
                f"SELECT * FROM {connection.ops.quote_name(table)} WHERE 1 = 0"
            )
            columns = {str(column[0]) for column in cursor.description}
            lacking = [
                str(field.column)
                for field in model._meta.local_concrete_fields
                if field.column not in columns
            ]
            if lacking:
                gaps.append(f"table {table} has no column {', '.join(lacking)}")
    return gaps


def unapplied_migrations(connection: BaseDatabaseWrapper) -> list[str]:
    """The app's migrations that ``migrate`` would apply on ``connection``: the
    loader's graph from disk (a squashed migration counts as applied when all it
    replaces are) against ``django_migrations`` read on ``connection`` itself
    (the recorder's queries would go to the alias's connection, which may be in
    an aborted transaction). Two queries."""
    recorder = MigrationRecorder(connection)
    applied: set[tuple[str, str]] = set()
    if recorder.has_table():
        table = connection.ops.quote_name(recorder.Migration._meta.db_table)
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT name FROM {table} WHERE app = %s", [LABEL])
            applied = {(LABEL, str(name)) for (name,) in cursor.fetchall()}
    graph = MigrationLoader(None, ignore_no_migrations=True).graph
    unapplied: dict[tuple[str, str], None] = {}
    for leaf in graph.leaf_nodes(LABEL):
        for node in graph.forwards_plan(leaf):
            migration = graph.nodes[node]
            if node[0] != LABEL or node in applied:
                continue
            if migration.replaces and all(old in applied for old in migration.replaces):
                continue
            unapplied[node] = None
    return [f"{app}.{name}" for app, name in unapplied]


@dataclass(frozen=True)
class NotMigrated:
    """Why the ledger is not migrated on a database, and how to fix it."""

    #: A table or column is missing (saves fail), not only a migration unapplied.
    tables_behind: bool
    problem: str
    hint: str


def not_migrated(
    connection: BaseDatabaseWrapper, models: Iterable[type[Model]]
) -> NotMigrated | None:
    """What keeps the ledger's ``models`` from being migrated on ``connection``:
    the tables against the models, then the migrations against the loader. None
    when nothing does."""
    alias = connection.alias
    gaps = schema_gaps(connection, models)
    unapplied = unapplied_migrations(connection)
    where = f"on database {alias!r}"
    if gaps:
        problem = f"The ledger is not migrated {where}: {'; '.join(gaps)}"
        if unapplied:
            return NotMigrated(
                True, f"{problem} (unapplied: {', '.join(unapplied)}).", _migrate(alias)
            )
        return NotMigrated(True, f"{problem}.", _recorded_but_missing(alias))
    if unapplied:
        return NotMigrated(
            False,
            f"The ledger has unapplied migrations {where}: {', '.join(unapplied)}.",
            _migrate(alias),
        )
    return None


def _migrate(alias: str) -> str:
    return f"Run manage.py migrate {LABEL}{_database_option(alias)}."


def _recorded_but_missing(alias: str) -> str:
    """The fix when ``django_migrations`` says the app is migrated but its tables
    do not match (dropped, changed by hand, or ``migrate --fake``)."""
    option = _database_option(alias)
    return (
        f"django_migrations records every migration of {LABEL} as applied on "
        f"{alias!r}, yet the tables do not match: restore what is missing "
        f"(manage.py sqlmigrate {LABEL} NAME prints a migration's SQL) or, if "
        f"none of the tables is there, run manage.py migrate {LABEL} zero --fake"
        f"{option} and then manage.py migrate {LABEL}{option}."
    )


def _database_option(alias: str) -> str:
    return "" if alias == DEFAULT_DB_ALIAS else f" --database {alias}"


def _inspectable(alias: str) -> tuple[BaseDatabaseWrapper, bool]:
    """A connection to ``alias`` that can run a query now, and whether it is one
    of our own (to close). The caller's may be in a transaction that the error
    aborted (PostgreSQL refuses every statement until its rollback)."""
    connection = connections[alias]
    if connection.needs_rollback or (
        connection.vendor == "postgresql" and connection.in_atomic_block
    ):
        own = type(connection)(dict(connection.settings_dict), alias)
        return own, True
    return connection, False


def raise_if_not_migrated(exc: BaseException) -> None:
    """After ``exc`` was raised by a use of the ledger: raise the error that says
    the ledger is not migrated where it lives, if that is why (chained to
    ``exc``); return otherwise, for ``exc`` to stand. Only ever called after an
    error: it costs queries."""
    if not isinstance(exc, ProgrammingError | OperationalError) or not installed():
        return
    problems = []
    try:
        for alias, models in ledger_databases().items():
            connection, own = _inspectable(alias)
            try:
                found = not_migrated(connection, models)
            finally:
                if own:
                    connection.close()
            if found is not None and found.tables_behind:
                problems.append(f"{found.problem} {found.hint}")
    except Exception:  # the database is down, say: the original error says so
        return
    if problems:
        raise ImproperlyConfigured(" ".join(problems)) from exc
