"""The names that the models' file fields using a storage reference: which of a
batch of names are referenced (one query a field), and every reference in
primary key batches, resumable after a (field, primary key)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from queued_storage import registry

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
    for model, name in fields:
        rows = model._default_manager.filter(**{f"{name}__in": wanted})
        found.update(str(value) for value in rows.values_list(name, flat=True))
    return found


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
    rows = model._default_manager.exclude(**{name: ""}).exclude(
        **{f"{name}__isnull": True}
    )
    model_label = model._meta.label
    while True:
        page = rows.order_by("pk")
        if last is not None:
            page = page.filter(pk__gt=last)
        batch = list(page.values_list("pk", name)[:size])
        if not batch:
            return
        last = batch[-1][0]
        yield [Reference(label, model_label, pk, str(value)) for pk, value in batch]
