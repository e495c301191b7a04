"""The audit's walk of one destination: the ledger's rows of its key read in
code point order (streamed, or in keyset pages where the driver buffers a
result), merged with the remote's listing into one name-ordered stream of
pairs, and cut into batches."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from django.db import connections
from django.db.models import QuerySet
from django.db.models.functions import Collate

from queued_storage.models import PendingTransfer
from queued_storage.remote_listing import RemoteEntry
from queued_storage.verification import VERIFY_FIELDS

T = TypeVar("T")

#: What the merge reads of a row.
ROW_FIELDS = (*VERIFY_FIELDS, "status", "deleted")


class LedgerOrderError(RuntimeError):
    """The database returned the ledger's names in another order than the
    remote's listing: merging them would report false findings."""


#: Rows a keyset page reads where the driver cannot stream a result (MySQL's
#: buffers it whole): each page sorts the rows after the last one again.
KEYSET_PAGE = 5000


def ledger_rows(key: str, after: str, size: int) -> Iterator[PendingTransfer]:
    """The rows of ``key`` whose names come after ``after``, in code point order:
    one query read ``size`` rows at a time where the driver streams (SQLite, a
    server-side cursor on PostgreSQL), else keyset pages."""
    rows = PendingTransfer.objects.filter(storage_key=key)
    order = "name"
    vendor = connections[rows.db].vendor
    if vendor == "postgresql":
        # The database's collation sorts by language rules; "C" by code point.
        rows = rows.alias(ordered=Collate("name", "C"))
        order = "ordered"
    # SQLite compares names bytewise; MariaDB's name column has a binary NO PAD
    # collation (migration 0002): both sort by code point.
    rows = rows.only(*ROW_FIELDS).order_by(order)
    if vendor in ("sqlite", "postgresql"):
        found = rows.filter(**{f"{order}__gt": after}) if after else rows
        yield from found.iterator(chunk_size=size)
        return
    yield from keyset_pages(rows, order, after, max(size, KEYSET_PAGE))


def keyset_pages(
    rows: QuerySet[PendingTransfer], order: str, after: str, size: int
) -> Iterator[PendingTransfer]:
    """``rows`` (ordered by ``order``, which sorts as the names) after the name
    ``after``, ``size`` a query, each page after the last name of the one before."""
    last = after
    while True:
        page = rows.filter(**{f"{order}__gt": last}) if last else rows
        batch = list(page[:size])
        if not batch:
            return
        yield from batch
        last = batch[-1].name


Pair = tuple[str, RemoteEntry | None, PendingTransfer | None]


def merged(
    entries: Iterator[RemoteEntry], rows: Iterator[PendingTransfer]
) -> Iterator[Pair]:
    """The full outer join of two name-ordered streams, in name order."""
    entry = _next_in_order(entries, "")
    row = _next_in_order(rows, "")
    while entry is not None or row is not None:
        if row is None or (entry is not None and entry.name < row.name):
            assert entry is not None
            yield entry.name, entry, None
            entry = _next_in_order(entries, entry.name)
        elif entry is None or row.name < entry.name:
            yield row.name, None, row
            row = _next_in_order(rows, row.name)
        else:
            yield entry.name, entry, row
            entry = _next_in_order(entries, entry.name)
            row = _next_in_order(rows, row.name)


def _next_in_order(items: Iterator[Any], before: str) -> Any:
    item = next(items, None)
    if item is not None and before and not item.name > before:
        raise LedgerOrderError(
            f"names out of order: {item.name!r} came after {before!r}; the audit "
            "needs the database and the remote to sort names by code point"
        )
    return item


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """``items`` in lists of ``size``, the last one shorter."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
