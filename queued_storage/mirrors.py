"""Mirrors' rows: each mirror's copy of a file is a row under the mirror's own
key, queued when the primary's row is recorded as done (in that transaction),
copied from the local copy or the primary's remote, and tombstoned with the
primary's row. The local copy goes only once every destination has the file.

A storage without mirrors never gets here: each entry point is asked only
when the storage has some, so that its per-row path costs no query more."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.core.files.storage import Storage
from django.db import connections, transaction
from django.db.models import Case, F, Q, Value, When
from django.utils import timezone

from queued_storage.errors import Outcome
from queued_storage.failures import ledger_db, retry_limits
from queued_storage.ledger_sql import conflict_target
from queued_storage.models import (
    PendingTransfer,
    PendingTransferQuerySet,
    name_hash,
    retry_delay,
    retry_when_locked,
)
from queued_storage.tombstones import reconcile

if TYPE_CHECKING:
    from queued_storage.storage import MirrorStorage, QueuedStorage

logger = logging.getLogger("queued_storage")

#: Mirrors' copies queued by this process so far: a drain that finds nothing due
#: claims again when its last records queued some.
copies_queued = 0

Status = PendingTransfer.Status
#: What a mirror's row takes from the primary's when it is queued.
COPIED = ("generation", "size", "checksum", "host")
#: What queueing a mirror's copy writes besides COPIED (as a save resets a row).
RESET = (
    "deleted",
    "attempts",
    "next_attempt_at",
    "last_error",
    "error_history",
    "transferred_at",
    "updated_at",
)


def _fresh(row: PendingTransfer, now: datetime) -> dict[str, Any]:
    return {
        **{field: getattr(row, field) for field in COPIED},
        "deleted": False,
        "attempts": 0,
        "next_attempt_at": now,
        "last_error": "",
        "error_history": [],
        "transferred_at": None,
        "updated_at": now,
    }


def fan_out(
    storage: QueuedStorage,
    rows: list[PendingTransfer],
    db: str,
    keys: list[str] | None = None,
) -> int:
    """Queue each mirror's copy of ``rows``, the primary's rows just recorded as
    done, in that transaction: at the same generation, size, checksum and host,
    due now. A mirror's row of the name is reset as a re-save resets a row (a
    live lease is kept: its worker finds the new generation when it completes,
    and hands the row back); one already done at the generation is left alone.
    ``keys``: only these mirrors' (a backfill's). Returns how many rows were
    queued."""
    global copies_queued
    if keys is None:
        keys = [mirror.key for mirror in storage.mirrors.values()]
    if not keys or not rows:
        return 0
    now = timezone.now()
    manager = PendingTransfer.objects.using(db)
    hashes = [name_hash(row.name) for row in rows]
    existing = set(
        manager.filter(storage_key__in=keys, name_hash__in=set(hashes)).values_list(
            "storage_key", "name_hash"
        )
    )
    leased = Q(status=Status.TRANSFERRING, lease_expires_at__gt=now)
    new: list[PendingTransfer] = []
    queued = 0
    for row, hashed in zip(rows, hashes, strict=True):
        fresh = _fresh(row, now)
        for key in keys:
            if (key, hashed) not in existing:
                new.append(
                    PendingTransfer(
                        storage_key=key,
                        name=row.name,
                        name_hash=hashed,
                        status=Status.QUEUED,
                        created_at=now,
                        **fresh,
                    )
                )
                continue
            # Status and lease first: MariaDB assigns left to right, and
            # ``leased`` reads them (it stays as true or false as it was).
            queued += (
                manager.filter(storage_key=key, name_hash=hashed)
                .exclude(status=Status.DONE, deleted=False, generation=row.generation)
                .update(
                    status=Case(
                        When(leased, then=F("status")), default=Value(Status.QUEUED)
                    ),
                    lease_token=Case(
                        When(leased, then=F("lease_token")), default=Value("")
                    ),
                    lease_expires_at=Case(
                        When(leased, then=F("lease_expires_at")), default=Value(None)
                    ),
                    **fresh,
                )
            )
    if new:
        # A mirror's tombstone that a late upload left may appear meanwhile
        # (reconcile): it becomes the copy's row, and keeps owning the object.
        manager.bulk_create(
            new,
            update_conflicts=True,
            unique_fields=conflict_target(connections[db]),
            update_fields=[
                "status",
                "lease_token",
                "lease_expires_at",
                *COPIED,
                *RESET,
            ],
        )
    # Counted before the commit: a claim made after it finds them, one made
    # before it sees the count change, and claims again.
    copies_queued += queued + len(new)
    return queued + len(new)


def fan_out_batch(
    completed: list[tuple[QueuedStorage, PendingTransfer]], db: str
) -> None:
    """:func:`fan_out` of the rows of a batch recorded as done together, one
    call per storage that has mirrors (none for those that have not)."""
    groups: dict[str, tuple[QueuedStorage, list[PendingTransfer]]] = {}
    for storage, row in completed:
        if storage.mirror_targets:
            groups.setdefault(row.storage_key, (storage, []))[1].append(row)
    for storage, rows in groups.values():
        fan_out(storage, rows, db)


def _primary_rows(mirror: MirrorStorage, name: str) -> PendingTransferQuerySet:
    assert mirror.primary is not None
    return PendingTransfer.objects.for_name(mirror.primary.key, name)


def _ready(found: tuple[str, bool, int] | None, generation: int) -> bool:
    return found == (Status.DONE, False, generation)


def source_of(mirror: MirrorStorage, row: PendingTransfer) -> Storage | None:
    """Where the claimed row of ``mirror`` is copied from: the local copy when
    there is one, else the primary's remote; None when the primary's row is not
    done, live and at the row's generation (its remote may hold another version,
    or nothing). One query."""
    found = (
        _primary_rows(mirror, row.name)
        .values_list("status", "deleted", "generation")
        .first()
    )
    if not _ready(found, row.generation):
        return None
    return copy_source(mirror, row.name)


def copy_source(mirror: MirrorStorage, name: str) -> Storage:
    """The local copy of ``name`` when there is one, else the primary's remote
    (for a primary's row known to be done at the generation copied)."""
    assert mirror.primary is not None
    local = mirror.local
    return local if local.exists(name) else mirror.primary.remote


@retry_when_locked
def park(mirror: MirrorStorage, row: PendingTransfer) -> Outcome | None:
    """Hold the claimed row of ``mirror`` until the primary's completion queues
    it again, without counting the attempt. The primary's row is read again
    under its lock, which that completion holds while it queues this row: a
    completion since the first look means the copy can go now (None).

    Only a live primary's row at the row's generation or a later one will queue
    it: with none (a host switched to this key as its own storage wrote the row,
    see migrate_storage) it is handed back, due after the retry delay, for a
    worker that knows the key as a primary."""
    db = ledger_db()
    rows = _primary_rows(mirror, row.name).using(db)
    with transaction.atomic(using=db):
        rows.lock()
        found = rows.values_list("status", "deleted", "generation").first()
        if _ready(found, row.generation):
            return None
        if found is None or found[1] or found[2] < row.generation:
            return _hand_back(mirror, row)
        won = row._leased().update(
            status=Status.HELD,
            lease_token="",
            lease_expires_at=None,
            next_attempt_at=None,
            attempts=F("attempts") - 1,
            updated_at=timezone.now(),
        )
    if not won:
        return reconcile(mirror, row)
    logger.info(
        "mirror waits for its primary key=%s name=%s generation=%s",
        row.storage_key,
        row.name,
        row.generation,
    )
    return Outcome.STALE


#: The shortest wait of a row handed back to another configuration's workers: a
#: retry delay of 0 would have this worker claim it again at once, for ever.
MIN_HAND_BACK_DELAY = 1.0


def _hand_back(mirror: MirrorStorage, row: PendingTransfer) -> Outcome:
    """Queue the claimed row again, due after the retry delay, without counting
    the attempt: no primary's row of this worker's configuration will."""
    _retries, base, _why = retry_limits(mirror.task_class)
    delay = max(retry_delay(1, base), MIN_HAND_BACK_DELAY)
    now = timezone.now()
    won = row._leased().update(
        status=Status.QUEUED,
        lease_token="",
        lease_expires_at=None,
        next_attempt_at=now + timedelta(seconds=delay),
        attempts=F("attempts") - 1,
        updated_at=now,
    )
    if not won:
        return reconcile(mirror, row)
    logger.info(
        "mirror has no primary row here, handed back key=%s name=%s generation=%s "
        "primary=%s",
        row.storage_key,
        row.name,
        row.generation,
        mirror.primary.key if mirror.primary is not None else "",
    )
    return Outcome.STALE


def _everywhere(
    storage: QueuedStorage, name: str, generation: int
) -> tuple[PendingTransferQuerySet, PendingTransferQuerySet, list[str]]:
    primary = storage.primary or storage
    rows = PendingTransfer.objects.filter(
        name_hash=name_hash(name),
        generation=generation,
        status=Status.DONE,
        deleted=False,
    )
    keys = [mirror.key for mirror in primary.mirrors.values()]
    return (
        rows.filter(storage_key=primary.key),
        rows.filter(storage_key__in=keys),
        keys,
    )


def done_everywhere(storage: QueuedStorage, name: str, generation: int) -> bool:
    """Whether every destination's row of ``name`` (``storage`` is the primary or
    one of its mirrors) is done, live and at ``generation``."""
    primary, mirrored, keys = _everywhere(storage, name, generation)
    return primary.exists() and mirrored.count() == len(keys)


@retry_when_locked
def delete_local_copy(storage: QueuedStorage, name: str, generation: int) -> bool:
    """Delete the local copy of ``name`` once every destination's row of it
    (``storage`` is the primary or one of its mirrors) is done, live and at
    ``generation``; returns whether it did. The primary's row is locked first,
    as a re-save and a delete of the name lock it before they write (see
    :func:`queued_storage.tombstones.delete_local_copy`), then the mirrors'."""
    primary = storage.primary or storage
    db = ledger_db()
    first, mirrored, keys = _everywhere(storage, name, generation)
    with transaction.atomic(using=db):
        if not first.using(db).lock():
            return False
        if mirrored.using(db).locked() != len(keys):
            return False
        primary.local.delete(name)
    return True


def tombstones_of(
    storage: QueuedStorage, name: str, generation: int
) -> list[tuple[MirrorStorage, int]]:
    """Each mirror's tombstone of ``name`` that the delete of generation
    ``generation`` left, with its storage: for the purges after commit."""
    by_key = {mirror.key: mirror for mirror in storage.mirrors.values()}
    found = PendingTransfer.objects.filter(
        storage_key__in=list(by_key),
        name_hash=name_hash(name),
        generation=generation,
        deleted=True,
    ).values_list("storage_key", "pk")
    return [(by_key[key], pk) for key, pk in found]
