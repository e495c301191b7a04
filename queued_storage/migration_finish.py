"""Finishing a storage's move to a new remote, once every host runs the switched
configuration: the files saved on the old configuration after the last look at
the migration (only a row of the old key) get a row of the new key, copied from
their local copy; the old key's rows are then dropped, but for the files that
are only on the old remote. The old remote is never touched."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from functools import reduce
from operator import or_
from typing import TYPE_CHECKING, Any, Literal

from django.db import transaction
from django.db.models import Q
from django.db.models.functions import Now
from django.utils import timezone

from queued_storage import registry
from queued_storage.checksums import storage_sha256
from queued_storage.conf import settings as conf
from queued_storage.failures import ledger_db
from queued_storage.models import (
    PendingTransfer,
    PendingTransferQuerySet,
    retry_when_locked,
)

if TYPE_CHECKING:
    from queued_storage.storage import QueuedStorage

Status = PendingTransfer.Status
DEFAULT_PAGE_SIZE = 500
#: How many names of the files left behind a report lists.
LISTED = 100
#: What the new key's row of a carried file takes from the old key's.
CARRIED = ("generation", "size", "checksum", "host")
#: What becomes of an old key's row: the name of its count, or ``carry``.
Outcome = Literal[
    "superseded", "carry", "carried", "only_old_remote", "elsewhere", "busy", "changed"
]


class CannotFinish(ValueError):
    """The keys given are not a switched storage's and the key it had before:
    nothing was changed."""


@dataclass
class FinishCounts:
    """What a finish did with the old key's rows: each live one is ``scanned``
    once, and is ``superseded`` (the new key has a row of its name at its
    generation or a later one), ``carried`` (a row of the new key queued, from
    its local copy), ``only_old_remote`` (no local copy: the old remote alone
    has it), ``elsewhere`` (its local copy is on another host's disk) or
    ``busy`` (a worker copies it, or an older version of it to the new key: run
    again) or ``changed`` (its local copy is another version than it records,
    with no row of the new key: run again).
    ``tombstones``: the old key's deleted rows dropped, their purge with them."""

    scanned: int = 0
    superseded: int = 0
    carried: int = 0
    only_old_remote: int = 0
    elsewhere: int = 0
    busy: int = 0
    changed: int = 0
    tombstones: int = 0
    #: The old key's rows left, kept for a person: the first ``LISTED`` names.
    left: list[str] = field(default_factory=list)

    @property
    def left_behind(self) -> int:
        return self.only_old_remote + self.elsewhere + self.busy + self.changed

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "left_behind": self.left_behind}


@dataclass
class MigrationFinish:
    """Carry the live rows of ``old_key`` over to ``storage`` (the switched
    configuration's storage, whose key the serving mirror had) and drop them."""

    storage: QueuedStorage
    old_key: str
    page_size: int = DEFAULT_PAGE_SIZE
    counts: FinishCounts = field(default_factory=FinishCounts)
    #: ``QUEUED_STORAGE_TRANSFER_TIMEOUT``, read (and checked) before any write.
    timeout: float = field(default_factory=lambda: conf.QUEUED_STORAGE_TRANSFER_TIMEOUT)
    #: The locked page's transferring rows whose worker is taken for dead.
    _dead: set[int] = field(default_factory=set, repr=False)

    def old_rows(self) -> Any:
        return PendingTransfer.objects.filter(storage_key=self.old_key)

    def run(self) -> FinishCounts:
        """Walk the old key's live rows by primary key, a page a transaction, then
        drop its tombstones."""
        last = 0
        while True:
            page = list(
                self.old_rows()
                .filter(deleted=False, pk__gt=last)
                .order_by("pk")[: self.page_size]
            )
            if not page:
                break
            last = page[-1].pk
            self._finish_page(page)
        self._drop_tombstones()
        return self.counts

    @retry_when_locked
    def _finish_page(self, page: list[PendingTransfer]) -> None:
        db = ledger_db()
        key = self.storage.key
        counts = self.counts
        with transaction.atomic(using=db):
            manager = PendingTransfer.objects.using(db)
            # The page was read unlocked: a re-save on a host not yet switched, or
            # a claim by one of its workers, may have changed a row since. Locked
            # and read again, each row is acted on as it is now, and a save or
            # claim of it waits for this transaction.
            pks = [row.pk for row in page]
            manager.filter(pk__in=pks).lock()
            page = list(manager.filter(pk__in=pks, deleted=False).order_by("pk"))
            self._dead = set(
                _dead(manager.filter(pk__in=pks), self.timeout).values_list(
                    "pk", flat=True
                )
            )
            # Locked: a save on a switched host bumps the generation of a row of
            # the new key under its lock; a carried row never replaces it.
            newer = {
                row.name_hash: row
                for row in manager.select_for_update()
                .filter(storage_key=key, name_hash__in=[r.name_hash for r in page])
                .order_by("pk")
            }
            dropped: list[PendingTransfer] = []
            carried: list[PendingTransfer] = []
            for row in page:
                counts.scanned += 1
                current = newer.get(row.name_hash)
                outcome = self._outcome(row, current, db)
                if outcome == "carry":
                    carried.append(self._new_row(row))
                    outcome = "carried"
                setattr(counts, outcome, getattr(counts, outcome) + 1)
                if outcome in ("superseded", "carried"):
                    dropped.append(row)
                else:
                    self._left(row)
            # A save of a name with no row of the new key meanwhile wrote a newer
            # version: its row wins (the conflict is ignored).
            manager.bulk_create(carried, ignore_conflicts=True)
            if dropped:
                manager.filter(
                    reduce(or_, (Q(pk=r.pk, generation=r.generation) for r in dropped))
                ).delete()

    def _outcome(
        self, row: PendingTransfer, current: PendingTransfer | None, db: str
    ) -> Outcome:
        """What becomes of the old key's ``row`` (locked, as is ``current``, the new
        key's row of its name)."""
        if row.status == Status.TRANSFERRING and row.pk not in self._dead:
            # A worker of the old configuration uploads it, or did until its lease
            # ran out and may still wake (dropped now, its completion would find
            # no row and leave a tombstone). Once its lease is out and the row
            # has not been renewed for the transfer timeout, the worker is taken
            # for dead (transfer_status's "stuck"): the row is carried, and should
            # the worker wake after all, the purge of its tombstone keeps the local
            # copy that the new key's row still has to send.
            return "busy"
        if current is not None and current.generation >= row.generation:
            return "superseded" if self._wakes(current, row, db) else "busy"
        if not row.local_copy_here(local_shared=self.storage.local_shared):
            return "elsewhere"
        if not self.storage.local.exists(row.name):
            return "only_old_remote"
        if not self._local_copy_is(row):
            # Generations are two hosts' clocks: the local copy is another
            # version than this row's, the new key's row's if it has one.
            return "superseded" if current is not None else "changed"
        if current is None:
            return "carry"
        return "carried" if self._requeue(current, row, db) else "busy"

    def _wakes(self, current: PendingTransfer, row: PendingTransfer, db: str) -> bool:
        """Whether the new key's ``current`` row will copy the file without the old
        key's row: a mirror's copy parked held waits for the old row's completion,
        so it is queued now (unless the old row waits held as well, or the storage
        is delayed, whose held rows wait for ``transfer()``)."""
        if current.status != Status.HELD or row.status == Status.HELD:
            return True
        if self.storage.delayed:
            return True
        now = timezone.now()
        return bool(
            PendingTransfer.objects.using(db)
            .filter(pk=current.pk, generation=current.generation, status=Status.HELD)
            .update(status=Status.QUEUED, next_attempt_at=Now(), updated_at=now)
        )

    def _local_copy_is(self, row: PendingTransfer) -> bool:
        """Whether the local copy is the version ``row`` records (its size, and its
        checksum when it has one)."""
        local = self.storage.local
        if row.size is not None and local.size(row.name) != row.size:
            return False
        return not row.checksum or storage_sha256(local, row.name) == row.checksum

    def _new_row(self, row: PendingTransfer) -> PendingTransfer:
        now = timezone.now()
        return PendingTransfer(
            storage_key=self.storage.key,
            name=row.name,
            name_hash=row.name_hash,
            created_at=now,
            updated_at=now,
            **_waiting(row, now),
            **{name: getattr(row, name) for name in CARRIED},
        )

    def _requeue(self, current: PendingTransfer, row: PendingTransfer, db: str) -> bool:
        """The new key's row of an older version becomes the carried file's copy,
        unless a worker holds a live lease on it."""
        if current.has_live_lease():
            return False
        now = timezone.now()
        return bool(
            PendingTransfer.objects.using(db)
            .filter(pk=current.pk, generation=current.generation)
            .update(
                deleted=False,
                attempts=0,
                lease_token="",
                lease_expires_at=None,
                last_error="",
                error_history=[],
                transferred_at=None,
                updated_at=now,
                **_waiting(row, now),
                **{name: getattr(row, name) for name in CARRIED},
            )
        )

    def _left(self, row: PendingTransfer) -> None:
        if len(self.counts.left) < LISTED:
            self.counts.left.append(row.name)

    @retry_when_locked
    def _drop_tombstones(self) -> None:
        # Their purge of the old remote will never run: no worker knows the key.
        self.counts.tombstones += (
            self.old_rows().using(ledger_db()).filter(deleted=True).delete()[0]
        )


def _waiting(row: PendingTransfer, now: datetime) -> dict[str, Any]:
    """A carried file's copy waits as the old key's row did: held (a delayed
    storage's, for ``transfer()``) or queued, due now. Now by this host's clock,
    or by the clock of the host that last wrote the old row when that is
    earlier: a finishing host whose clock is ahead would leave the copy due
    only once the workers' clocks catch up."""
    if row.status == Status.HELD:
        return {"status": Status.HELD, "next_attempt_at": None}
    due = now if row.updated_at is None else min(now, row.updated_at)
    return {"status": Status.QUEUED, "next_attempt_at": due}


def finish_migration(
    key: str, old_key: str, *, page_size: int = DEFAULT_PAGE_SIZE
) -> FinishCounts:
    """:class:`MigrationFinish` of the old key ``old_key`` into the storage of
    ``key``; :class:`CannotFinish` before anything is written when this
    configuration still uses ``old_key`` or knows no storage ``key``;
    ``ImproperlyConfigured`` for a setting it reads, before anything either."""
    timeout = conf.QUEUED_STORAGE_TRANSFER_TIMEOUT
    known = set(registry.known_keys()) | set(registry.mirror_keys())
    if old_key in known:
        raise CannotFinish(
            f"This configuration still uses the key {old_key!r}: switch every "
            "host's STORAGES to the entry migrate_storage printed, then run "
            "--finish there."
        )
    storage = registry.get(key)
    if storage is None:
        raise CannotFinish(
            f"Unknown storage key {key!r}: pass the key of the storage after the "
            f"switch (the serving mirror's). Known keys: "
            f"{', '.join(sorted(known)) or 'none'}."
        )
    if storage.primary is not None:
        raise CannotFinish(
            f"{key!r} is mirror {storage.mirror_name!r} of {storage.primary.key!r}: "
            "pass the key of the storage after the switch."
        )
    storage._registered()  # KeyConflict before a row is written
    return MigrationFinish(storage, old_key, page_size=page_size, timeout=timeout).run()


def finish_line(key: str, old_key: str, counts: FinishCounts) -> str:
    """The summary of a finish, for a person."""
    line = (
        f"Finished {old_key} -> {key}: scanned={counts.scanned} "
        f"superseded={counts.superseded} carried={counts.carried} "
        f"only_old_remote={counts.only_old_remote} elsewhere={counts.elsewhere} "
        f"busy={counts.busy} changed={counts.changed} tombstones={counts.tombstones}."
    )
    if counts.carried:
        line += f" The workers of {key} copy the {counts.carried} carried files."
    if counts.tombstones:
        line += (
            f" {counts.tombstones} deletes of {old_key} are dropped unpurged: "
            "the old remote is never touched, its objects stay there."
        )
    return line


def left_behind(old_key: str, counts: FinishCounts) -> str:
    """What a person does about the old key's rows a finish left."""
    parts = []
    if counts.only_old_remote:
        parts.append(
            f"{counts.only_old_remote} files are only on the old remote: put the "
            "old configuration's mirror back and run migrate_storage again"
        )
    if counts.elsewhere:
        parts.append(
            f"{counts.elsewhere} files have their local copy on another host's "
            "disk: run this command on that host"
        )
    if counts.busy:
        parts.append(
            f"{counts.busy} files are being copied (by a worker of the old "
            "configuration, or an older version to the new key): run this "
            "command again"
        )
    if counts.changed:
        parts.append(
            f"{counts.changed} files have a local copy that is not the version "
            "their row records: run this command again"
        )
    names = ", ".join(counts.left[:10])
    more = "" if counts.left_behind <= 10 else ", ..."
    return (
        "; ".join(parts)
        + f" (rows of {old_key} kept: {names}{more}; --json lists up to {LISTED})."
    )


def _abandoned(row: PendingTransfer, timeout: float | None = None) -> bool:
    """Whether the transferring ``row``'s worker is taken for dead, as the
    ledger has it now: its lease ran out and nothing renewed it for ``timeout``
    (``QUEUED_STORAGE_TRANSFER_TIMEOUT``)."""
    if timeout is None:
        timeout = conf.QUEUED_STORAGE_TRANSFER_TIMEOUT
    rows = PendingTransfer.objects.using(ledger_db()).filter(pk=row.pk)
    return bool(_dead(rows, timeout).exists())


def _dead(rows: PendingTransferQuerySet, timeout: float) -> PendingTransferQuerySet:
    """Those of the transferring ``rows`` whose worker is taken for dead: out of
    their lease, and not renewed for ``timeout`` seconds, both by the database's
    clock (the finishing host's may be ahead of the worker's, and would take a
    live worker for dead)."""
    now = Now()
    return rows.filter(
        status=Status.TRANSFERRING,
        updated_at__lte=now - timedelta(seconds=timeout),
    ).exclude(lease_expires_at__gt=now)
