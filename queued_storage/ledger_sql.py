"""What the ledger sends its database: the row keys (name hash, generation), short
statements tried again when the database aborted them over a lock, and the SQL of
the hot statements, built once per database alias because the ORM took longer to
build them than the database to run them."""

from __future__ import annotations

import functools
import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from django.apps import apps
from django.db import (
    IntegrityError,
    OperationalError,
    connections,
    models,
    router,
    transaction,
)
from django.db.models.constants import OnConflict

if TYPE_CHECKING:
    from queued_storage.models import PendingTransfer

#: Tries of a worker's ledger statement that the database aborted over a lock.
LOCKED_TRIES = 5

_P = ParamSpec("_P")
_R = TypeVar("_R")


def lost_a_lock(error: OperationalError) -> bool:
    """A deadlock victim (MariaDB 1213, PostgreSQL), a lock wait that timed out
    (MariaDB 1205), or SQLite's busy timeout: the statement changed nothing."""
    code = error.args[0] if error.args else None
    text = str(error).lower()
    return code in (1205, 1213) or any(
        words in text
        for words in ("deadlock", "database is locked", "could not serialize")
    )


def retry_when_locked(func: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run a short ledger statement again, after a short random pause, when the
    database aborted it over a lock. Never inside the caller's transaction: the
    database rolled all of it back, and only the caller can start it again."""

    @functools.wraps(func)
    def retrying(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        for attempt in range(1, LOCKED_TRIES + 1):
            try:
                return func(*args, **kwargs)
            except OperationalError as error:
                # Only on this path: the model is looked up, not imported, since
                # the model's module imports this one.
                model = apps.get_model("queued_storage", "PendingTransfer")
                db = router.db_for_write(model)
                if (
                    attempt == LOCKED_TRIES
                    or not lost_a_lock(error)
                    or connections[db].in_atomic_block
                ):
                    raise
                logging.getLogger("queued_storage").info(
                    "ledger statement retried call=%s attempt=%s error=%s",
                    func.__name__,
                    attempt,
                    error,
                )
                time.sleep(random.uniform(0.01, 0.03) * 2**attempt)
        raise AssertionError("unreachable")

    return retrying


def name_hash(name: str) -> str:
    """The SHA-256 of a name: the unique key, since MariaDB cannot index 1024 chars."""
    return hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()


#: The last generation :func:`new_generation` gave out in this process.
last_generation = 0
_generation_lock = threading.Lock()


def new_generation() -> int:
    """A fresh generation number, larger than every one this process gave out
    before: two saves in one tick of the clock, or across a step back of it
    (NTP), would otherwise give a re-save the generation of the version before."""
    global last_generation
    with _generation_lock:
        last_generation = max(time.time_ns(), last_generation + 1)
        return last_generation


#: SQL text of the hot statements, built once per database alias.
STATEMENTS: dict[tuple[str, str], str] = {}
#: Per database alias, what :func:`insert_new` writes (see :func:`_insert_plan`).
_Plan = list[tuple[str, "models.Field[Any, Any]", bool, Any]]
#: Per database alias: what ``reserve()`` sends (see :func:`reserve_statement`).
_Reserve = tuple[str, list[Any], dict[str, int], Callable[[datetime, Any], Any]]
_RESERVE: dict[str, _Reserve | None] = {}
#: In a plan: the default is computed by each insert (a callable such as now()).
_CALL_DEFAULT = object()
_PLANS: dict[str, _Plan | None] = {}


#: Field types whose Python values (str, int, bool, None) go to every database
#: driver unchanged.
_PLAIN_TYPES = frozenset(
    [
        "BigIntegerField",
        "BooleanField",
        "CharField",
        "IntegerField",
        "PositiveBigIntegerField",
        "PositiveIntegerField",
        "PositiveSmallIntegerField",
        "SmallIntegerField",
        "TextField",
    ]
)


def db_value(field: models.Field[Any, Any], value: Any, connection: Any) -> Any:
    if value is None or (
        type(value) in (str, int, bool) and field.get_internal_type() in _PLAIN_TYPES
    ):
        return value
    return field.get_db_prep_save(value, connection)


def _insert_plan(model: type[PendingTransfer], connection: Any) -> _Plan | None:
    """(name, field, whether its plain values go to the driver unchanged) of each
    column an insert writes, in order; None if a field needs SQL of its own."""
    if connection.alias not in _PLANS:
        fields = [
            field for field in model._meta.concrete_fields if not field.primary_key
        ]
        _PLANS[connection.alias] = (
            None
            if any(hasattr(field, "get_placeholder") for field in fields)
            else [
                (
                    field.name,
                    field,
                    field.get_internal_type() in _PLAIN_TYPES,
                    _prepared_default(field, connection),
                )
                for field in fields
            ]
        )
    return _PLANS[connection.alias]


def _prepared_default(field: models.Field[Any, Any], connection: Any) -> Any:
    """The database value of ``field``'s default, when it is the same every time
    (``list`` makes a new empty list each time, an equal one)."""
    default = field.default
    if default is models.NOT_PROVIDED or default is list or not callable(default):
        return db_value(field, field.get_default(), connection)
    return _CALL_DEFAULT


def _insert_sql(model: type[PendingTransfer], connection: Any, plan: _Plan) -> str:
    """``INSERT`` of every column of ``plan`` that writes nothing when the name
    has a row."""
    ops = connection.ops
    fields = [field for _name, field, _plain, _default in plan]
    suffix = ops.on_conflict_suffix_sql(
        fields,
        OnConflict.IGNORE,
        [],
        [column(model, name) for name in conflict_target(connection) or ()],
    )
    columns = ", ".join(ops.quote_name(column(model, field.name)) for field in fields)
    return (
        f"{ops.insert_statement(on_conflict=OnConflict.IGNORE)} "
        f"{ops.quote_name(model._meta.db_table)} ({columns}) "
        f"VALUES ({', '.join(['%s'] * len(fields))}) {suffix}"
    ).rstrip()


def insert_new(model: type[PendingTransfer], values: dict[str, Any], db: str) -> bool:
    """Insert a row of ``values`` (defaults for the fields not given) unless its
    name has a row; whether it did. The statement's own row count says so: a
    row that another process wrote in the same tick of the clock has the same
    generation, so the generation cannot."""
    connection = connections[db]
    plan = _insert_plan(model, connection)
    if plan is None:
        return bool(insert_with_orm(model, values, db))
    sql = STATEMENTS.get((db, "insert new"))
    if sql is None:
        sql = STATEMENTS[(db, "insert new")] = _insert_sql(model, connection, plan)
    params = []
    # The same datetime goes to several columns: prepared once per field type.
    prepared: dict[tuple[int, type], Any] = {}
    for name, field, plain, default in plan:
        if name in values:
            value = values[name]
        elif default is not _CALL_DEFAULT:
            params.append(default)
            continue
        else:
            value = field.get_default()
        if value is None or (plain and type(value) in (str, int, bool)):
            params.append(value)
            continue
        seen = (id(value), type(field))
        if seen not in prepared:
            prepared[seen] = field.get_db_prep_save(value, connection)
        params.append(prepared[seen])
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return bool(cursor.rowcount)


def insert_with_orm(
    model: type[PendingTransfer], values: dict[str, Any], db: str
) -> int:
    """:func:`insert_new` (and ``reserve()``) for a database whose fields need
    placeholders of their own: the rows written, 0 when the name has a row."""
    try:
        with transaction.atomic(using=db):
            model.objects.using(db).create(**values)
    except IntegrityError:
        return 0
    return 1


def reserve_statement(model: type[PendingTransfer], db: str) -> _Reserve | None:
    """The INSERT of ``reserve()`` for database ``db``, its parameters with the
    columns a new row always has filled in, where the others go, and how a
    datetime is sent; None where the ORM must build it."""
    statement = _RESERVE.get(db)
    if statement is not None:
        return statement
    connection = connections[db]
    plan = _insert_plan(model, connection)
    if plan is None:
        return None
    sql = _insert_sql(model, connection, plan)
    # reserve() fills the columns whose default is computed per row.
    template = [
        None if default is _CALL_DEFAULT else default
        for _name, _field, _plain, default in plan
    ]
    slot = {name: index for index, (name, *_rest) in enumerate(plan)}
    created = model._meta.get_field("created_at")
    assert isinstance(created, models.DateTimeField)

    def when(now: datetime, connection: Any) -> Any:
        return created.get_db_prep_save(now, connection)

    _RESERVE[db] = (sql, template, slot, when)
    return _RESERVE[db]


def lease_check_sql(model: type[PendingTransfer], db: str) -> str:
    """``SELECT 1`` of the row (pk, generation, lease token, status) whose lease
    has not run out by the time given: ``PendingTransfer.holds_lease()``."""
    sql = STATEMENTS.get((db, "leased"))
    if sql is None:
        quote = connections[db].ops.quote_name
        pk, generation, token, status, expires = (
            quote(column(model, field))
            for field in (
                "id",
                "generation",
                "lease_token",
                "status",
                "lease_expires_at",
            )
        )
        sql = STATEMENTS[(db, "leased")] = (
            f"SELECT 1 FROM {quote(model._meta.db_table)} "
            f"WHERE {pk} = %s AND {generation} = %s AND {token} = %s "
            f"AND {status} = %s AND {expires} > %s"
        )
    return sql


def column(model: type[PendingTransfer], field_name: str) -> str:
    field = model._meta.get_field(field_name)
    assert isinstance(field, models.Field) and field.column
    return str(field.column)


def conflict_target(connection: Any) -> list[str] | None:
    # MySQL/MariaDB's ON DUPLICATE KEY UPDATE takes no target.
    if connection.features.supports_update_conflicts_with_target:
        return ["storage_key", "name_hash"]
    return None
