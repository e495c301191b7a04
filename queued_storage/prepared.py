"""Querysets compiled to SQL once per connection and run again with another
"now": the SELECTs every claim sends (its due rows, the storages' states), which
the ORM took longer to build than the database to run."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Generic, TypeVar

from django.conf import settings
from django.core.exceptions import EmptyResultSet
from django.db import connections, models
from django.db.models.base import ModelState
from django.db.models.query import ModelIterable, ValuesListIterable
from django.db.models.signals import post_init, pre_init
from django.db.models.sql.compiler import SQLCompiler

_Q = TypeVar("_Q", bound="models.QuerySet[Any, Any]")

#: The time a query is compiled with: where it appears in the parameters, the
#: time of each run goes instead (a time a ledger's own filters never hold);
#: naive where ``USE_TZ`` is off.
SENTINEL = datetime(2000, 1, 1, 0, 0, 0, 123457, tzinfo=timezone.utc)


def _plain(queryset: models.QuerySet[Any, Any]) -> bool:
    """Whether the rows of ``queryset`` are its model's own columns (or a
    ``values_list()`` of them), as :class:`_Compiled` builds them: no
    annotation, related or prefetched objects, extra columns, or fetch mode of
    its own (Django 6.1)."""
    query = queryset.query
    fresh: models.QuerySet[Any, Any] = models.QuerySet(queryset.model)
    return (
        queryset._iterable_class in (ModelIterable, ValuesListIterable)
        and not query.annotations
        and query.select_related is False
        and not getattr(queryset, "_prefetch_related_lookups", ())
        and not query.extra
        and getattr(queryset, "_fetch_mode", None)
        is getattr(fresh, "_fetch_mode", None)
    )


class _Compiled:
    """One query's SQL on one connection, the positions of the time in its
    parameters, and its compiler (its converters, and the fields of its rows)."""

    def __init__(
        self,
        query: models.QuerySet[Any, Any],
        field: models.Field[Any, Any],
        sentinel: datetime | None,
    ) -> None:
        self.db = query.db
        self.iterable = query._iterable_class
        connection = connections[self.db]
        self.connection = connection
        self.compiler: SQLCompiler = query.query.get_compiler(using=self.db)
        self.sql, params = self.compiler.as_sql()
        self.params = list(params)
        self.field = field
        self.slots: list[int] = []
        if sentinel is not None:
            marker = field.get_db_prep_value(sentinel, connection)
            self.slots = [i for i, value in enumerate(self.params) if value == marker]
        compiler = self.compiler
        self.converters = compiler.get_converters(
            [column[0] for column in compiler.select[0 : compiler.col_count]]
        )

    def rows(self, now: datetime) -> list[tuple[Any, ...]]:
        """The rows (with the database's converters applied) at time ``now``."""
        params = list(self.params)
        if self.slots:
            value = self.field.get_db_prep_value(now, self.connection)
            for slot in self.slots:
                params[slot] = value
        with self.connection.cursor() as cursor:
            cursor.execute(self.sql, params)
            fetched = cursor.fetchall()
        if not self.converters:
            return [tuple(row) for row in fetched]
        found = self.compiler.apply_converters(fetched, self.converters)
        return [tuple(row) for row in found]


class Prepared(Generic[_Q]):
    """``build(db, now, key)`` (a queryset of a time) compiled once per
    connection (per thread) and key, and run with another time each call. A queryset in which
    the time does not appear ``times`` times, as compiled, is compiled anew each
    call: a parameter equal to the sentinel would be taken for it."""

    def __init__(
        self,
        build: Callable[[str, datetime, Any], _Q],
        field: models.Field[Any, Any],
        times: int,
    ) -> None:
        self.build = build
        self.field = field
        self.times = times
        #: Per thread (a connection is): by (alias, key), the query compiled,
        #: or None where it is compiled anew each call.
        self._local = threading.local()

    def _get(self, db: str, key: Any) -> _Compiled | None:
        cache: dict[tuple[str, Any, bool], _Compiled | None] | None = getattr(
            self._local, "compiled", None
        )
        if cache is None:
            cache = self._local.compiled = {}
        connection = connections[db]
        slot = (db, key, settings.USE_TZ)
        seen = slot in cache
        compiled = cache.get(slot)
        if not seen or (compiled is not None and compiled.connection is not connection):
            compiled = cache[slot] = self._compile(db, key)
        return compiled

    def _compile(self, db: str, key: Any) -> _Compiled | None:
        sentinel = SENTINEL if settings.USE_TZ else SENTINEL.replace(tzinfo=None)
        queryset = self.build(db, sentinel, key)
        if not _plain(queryset):
            return None
        try:
            compiled = _Compiled(queryset, self.field, sentinel if self.times else None)
        except EmptyResultSet:
            return None  # the ORM's own path says "no rows"
        if len(compiled.slots) != self.times:
            return None
        return compiled

    def values(self, db: str, now: datetime, key: Any = None) -> list[tuple[Any, ...]]:
        """The rows of a ``values_list()`` queryset at time ``now``."""
        compiled = self._get(db, key)
        if compiled is None or compiled.iterable is not ValuesListIterable:
            return list(self.build(db, now, key))
        return compiled.rows(now)

    def objects(self, db: str, now: datetime, key: Any = None) -> list[Any]:
        """The model instances of the queryset at time ``now``."""
        compiled = self._get(db, key)
        if compiled is None or compiled.iterable is not ModelIterable:
            return list(self.build(db, now, key))
        compiler = compiled.compiler
        info = compiler.klass_info
        assert info is not None
        model = info["model"]
        fields = info["select_fields"]
        start, end = fields[0], fields[-1] + 1
        names = [column[0].target.attname for column in compiler.select[start:end]]
        found = compiled.rows(now)
        if (
            pre_init.has_listeners(model)
            or post_init.has_listeners(model)
            or len(names) != len(model._meta.concrete_fields)
        ):
            return [model.from_db(db, names, row[start:end]) for row in found]
        return [_built(model, db, names, row[start:end]) for row in found]


def _built(model: Any, db: str, names: list[str], values: tuple[Any, ...]) -> Any:
    """``model.from_db()`` without ``__init__``'s walk over the fields (no
    receiver of pre_init or post_init is told: there is none)."""
    instance = model.__new__(model)
    instance.__dict__.update(zip(names, values, strict=True))
    state = instance._state = ModelState()
    state.adding = False
    state.db = db
    return instance
