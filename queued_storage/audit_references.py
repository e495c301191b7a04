"""The names that the models' file fields using a storage reference: which of a
batch of names are referenced (one query a field), and every reference in
primary key batches, resumable after a (field, primary key). Read through each
model's base manager (a default manager may hide rows that still reference a
file); a field whose table cannot be read raises :class:`UnreadableField`."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

from django.db import DatabaseError, connections, transaction

from queued_storage import registry

T = TypeVar("T")

#: ``(model, field name)`` of a file field.
FieldRef = tuple[type[Any], str]


@dataclass(frozen=True)
class Reference:
    """A model instance's file field (``field``: its label) naming ``name``."""

    field: str
    model: str
    pk: Any
    name: str

    @property
    def where(self) -> str:
        return f"{self.model}.pk={self.pk}"


class UnreadableField(DatabaseError):
    """The references of ``field`` could not be read (``error``): its table is
    missing, say, as an unmanaged model's may be."""

    def __init__(self, field: FieldRef, error: DatabaseError) -> None:
        super().__init__(f"{label_of(field)}: {error}")
        self.field = field
        self.error = error


def read_field(field: FieldRef, query: Callable[[Any], T]) -> T:
    """``query`` run on ``field``'s model's base manager, a failure raised as
    :class:`UnreadableField`. Inside a transaction the query runs in a savepoint,
    so that PostgreSQL's transaction survives the error."""
    manager = field[0]._base_manager
    db = manager.db
    guard: AbstractContextManager[Any] = (
        transaction.atomic(using=db)
        if connections[db].in_atomic_block
        else nullcontext()
    )
    try:
        with guard:
            return query(manager)
    except DatabaseError as exc:
        raise UnreadableField(field, exc) from exc


def check_readable(field: FieldRef) -> None:
    """Raise :class:`UnreadableField` unless ``field``'s references can be read."""
    read_field(field, lambda rows: list(rows.values_list(field[1])[:1]))


def fields_of(key: str) -> list[FieldRef]:
    """The file fields that reference the storage ``key``, in a stable order."""
    found = registry.referencing_fields(key)
    return sorted(found, key=label_of)


def label_of(field: FieldRef) -> str:
    model, name = field
    return f"{model._meta.label}.{name}"


def referenced(fields: Sequence[FieldRef], names: Sequence[str]) -> set[str]:
    """Which of ``names`` a row of one of ``fields`` references: one query a field."""
    found: set[str] = set()
    wanted = sorted(set(names))
    if not wanted:
        return found
    for field in fields:
        found.update(str(value) for value in read_field(field, _in(field[1], wanted)))
    return found


def _in(name: str, wanted: list[str]) -> Callable[[Any], list[Any]]:
    """The query of the values of the field ``name`` that are in ``wanted``."""
    return lambda rows: list(
        rows.filter(**{f"{name}__in": wanted}).values_list(name, flat=True)
    )


def references(
    fields: Sequence[FieldRef], *, after: tuple[str, Any] | None, size: int
) -> Iterator[list[Reference]]:
    """Every non-empty reference of ``fields``, field by field (in ``fields``
    order) and by primary key, ``size`` at a time; ``after``: (field label,
    primary key) of the last reference already seen."""
    started = after is None
    for field in fields:
        label = label_of(field)
        last = None
        if not started:
            if label != after[0]:  # type: ignore[index]
                continue
            started = True
            last = after[1]  # type: ignore[index]
        yield from _of_field(field, label, last, size)


def _of_field(
    field: FieldRef, label: str, last: Any, size: int
) -> Iterator[list[Reference]]:
    model, name = field
    model_label = model._meta.label

    def page_after(last: Any) -> list[tuple[Any, Any]]:
        def query(manager: Any) -> list[tuple[Any, Any]]:
            rows = manager.exclude(**{name: ""}).exclude(**{f"{name}__isnull": True})
            page = rows.order_by("pk")
            if last is not None:
                page = page.filter(pk__gt=last)
            return list(page.values_list("pk", name)[:size])

        return read_field(field, query)

    while True:
        batch = page_after(last)
        if not batch:
            return
        last = batch[-1][0]
        yield [Reference(label, model_label, pk, str(value)) for pk, value in batch]
