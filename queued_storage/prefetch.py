"""Ledger states read ahead for many names: a page that shows 100 files asks the
ledger once, not 100 times.

The states live in a context variable for the length of a ``with`` block, so they
are never shared between threads, requests or async tasks, and never outlive the
block that read them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, NamedTuple

from django.db import OperationalError, ProgrammingError
from django.db.models import FileField, Model

from queued_storage import installation
from queued_storage.configuration import ConfiguredStorage
from queued_storage.models import PendingTransfer, name_hash

if TYPE_CHECKING:
    from queued_storage.storage import QueuedStorage

#: A row as ``PendingTransferQuerySet.states_with_mirror`` returns it:
#: ``(status, deleted, size, generation)``.
Row = tuple[str, bool, int | None, int]

#: Names per query: well under every database's limit on query parameters.
CHUNK = 500

States = dict[tuple[str, str], "RowState | None"]

#: The states of each enclosing block, innermost last (each holds its own
#: names and those of the blocks around it).
_blocks: ContextVar[tuple[States, ...]] = ContextVar(
    "queued_storage_prefetched", default=()
)


class NotRead:
    """What :func:`prefetched` returns for a name nobody read ahead."""


NOT_READ = NotRead()


class RowState(NamedTuple):
    status: str
    deleted: bool
    size: int | None
    #: Served by the serving mirror's remote (see :func:`serving`), not the
    #: storage's own.
    mirrored: bool = False


def state_of(key: str, name: str) -> RowState | None:
    """The state of the ledger row of ``name`` now (one indexed query), or None."""
    found = PendingTransfer.objects.state_of(key, name)
    return None if found is None else RowState(*found)


def served_state(storage: ConfiguredStorage, name: str) -> RowState | None:
    """The row state that ``name`` is served by: read ahead by
    :func:`prefetch_files` or :func:`prefetch_locations` when inside one, else
    one query (on the rows of the storage and of its serving mirror, if any)."""
    found = prefetched(storage.key, name)
    if not isinstance(found, NotRead):
        return found
    mirror = storage.serving_mirror
    if mirror is None:
        return state_of(storage.key, name)
    return serving(
        *PendingTransfer.objects.states_with_mirror(
            storage.key, storage.mirror_key(mirror), name
        )
    )


def current_state(storage: ConfiguredStorage, name: str) -> RowState | None:
    """The row state that ``name`` is served by now, never one read ahead."""
    mirror = storage.serving_mirror
    if mirror is None:
        return state_of(storage.key, name)
    return serving(
        *PendingTransfer.objects.states_with_mirror(
            storage.key, storage.mirror_key(mirror), name
        )
    )


def serving(primary: Row | None, mirror: Row | None) -> RowState | None:
    """Which row serves a name of a storage with a serving mirror: the mirror's,
    once it is done and live at the storage's generation (or the storage has no
    row of the name), so that a file is served from the new remote only once
    verified there; else the storage's own row, as without a mirror. Equal, not
    newer: a generation is the saving host's clock, and a re-save on a host
    whose clock is behind gets a smaller one than the copy the mirror has.
    A tombstone of the storage hides the name whatever its mirror row says."""
    if (
        mirror is not None
        and mirror[0] == PendingTransfer.Status.DONE
        and not mirror[1]
        and (primary is None or (not primary[1] and mirror[3] == primary[3]))
    ):
        return RowState(mirror[0], False, mirror[2], True)
    if primary is None:
        return None
    return RowState(primary[0], primary[1], primary[2])


def prefetched(key: str, name: str) -> RowState | NotRead | None:
    """The state read ahead for ``name`` in this context (None: no row), or
    ``NOT_READ``."""
    blocks = _blocks.get()
    if not blocks:
        return NOT_READ
    return blocks[-1].get((key, name), NOT_READ)


def forget(key: str, name: str) -> None:
    """Drop what was read ahead for ``name`` (it is being saved or deleted), in
    this block and in every block around it: the row read there is stale too."""
    for states in _blocks.get():
        states.pop((key, name), None)


@contextmanager
def prefetch_locations(storage: QueuedStorage, names: Iterable[str]) -> Iterator[None]:
    """Read the ledger rows of ``names`` in one query; inside the block, ``url()``,
    ``exists()``, ``size()``, ``open()`` and ``get_storage()`` of those names use
    them instead of a query each.

    ::

        with prefetch_locations(storage, names):
            urls = [storage.url(name) for name in names]
    """
    with _prefetch({storage: set(names)}):
        yield


@contextmanager
def prefetch_files(objects: Iterable[Model], *fields: str) -> Iterator[list[Model]]:
    """Read ahead the ledger rows of the files of ``objects`` (model instances or
    a queryset, evaluated here) for every ``FileField`` on a ``QueuedStorage``, or
    only the ``fields`` named; one query per storage. Yields the instances.

    Render inside the block (``render()``, not a lazy ``TemplateResponse``)::

        with prefetch_files(Document.objects.all()[:100]) as documents:
            html = render_to_string("list.html", {"documents": documents})
    """
    instances = list(objects)
    wanted: dict[ConfiguredStorage, set[str]] = defaultdict(set)
    for instance in instances:
        for field in instance._meta.concrete_fields:
            if not isinstance(field, FileField) or (
                fields and field.name not in fields
            ):
                continue
            storage = field.storage
            if not isinstance(storage, ConfiguredStorage):
                continue
            name = getattr(instance, field.attname).name
            if name:
                wanted[storage].add(str(name))
    with _prefetch(wanted):
        yield instances


@contextmanager
def _prefetch(wanted: dict[ConfiguredStorage, set[str]]) -> Iterator[None]:
    blocks = _blocks.get()
    states: States = dict(blocks[-1]) if blocks else {}
    for storage, names in wanted.items():
        installation.refuse_unless_installed(storage.key)
        mirror = storage.serving_mirror
        try:
            if mirror is None:
                states.update(_read(storage.key, names))
            else:
                mirror_key = storage.mirror_key(mirror)
                states.update(_read_with_mirror(storage.key, mirror_key, names))
        except (ProgrammingError, OperationalError) as exc:
            installation.raise_if_not_migrated(exc)
            raise
    token = _blocks.set((*blocks, states))
    try:
        yield
    finally:
        _blocks.reset(token)


def _read(key: str, names: set[str]) -> dict[tuple[str, str], RowState | None]:
    found: dict[tuple[str, str], RowState | None] = dict.fromkeys(
        ((key, name) for name in names), None
    )
    ordered = sorted(names)
    for start in range(0, len(ordered), CHUNK):
        by_hash = {name_hash(name): name for name in ordered[start : start + CHUNK]}
        rows = PendingTransfer.objects.filter(
            storage_key=key, name_hash__in=list(by_hash)
        ).values_list("name_hash", "status", "deleted", "size")
        for hashed, status, deleted, size in rows:
            found[(key, by_hash[hashed])] = RowState(str(status), bool(deleted), size)
    return found


def _read_with_mirror(
    key: str, mirror_key: str, names: set[str]
) -> dict[tuple[str, str], RowState | None]:
    """:func:`_read` for a storage with a serving mirror: its rows and the
    mirror's in one query per chunk, each name's state as :func:`serving` says."""
    found: dict[tuple[str, str], RowState | None] = {}
    ordered = sorted(names)
    for start in range(0, len(ordered), CHUNK):
        by_hash = {name_hash(name): name for name in ordered[start : start + CHUNK]}
        pairs: dict[str, list[Row | None]] = {
            hashed: [None, None] for hashed in by_hash
        }
        rows = PendingTransfer.objects.filter(
            storage_key__in=[key, mirror_key], name_hash__in=list(by_hash)
        ).values_list(
            "storage_key", "name_hash", "status", "deleted", "size", "generation"
        )
        for row_key, hashed, status, deleted, size, generation in rows:
            row = (str(status), bool(deleted), size, int(generation))
            pairs[hashed][0 if row_key == key else 1] = row
        for hashed, (primary, mirror) in pairs.items():
            found[(key, by_hash[hashed])] = serving(primary, mirror)
    return found
