"""Finishing a storage's move to a new remote, once every host runs the switched
configuration: the files saved on the old configuration after the last look at
the migration (only a row of the old key) get a row of the new key, copied from
their local copy; the old key's rows are then dropped, but for the files that
are only on the old remote. The old remote is never touched."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.db import transaction
from django.utils import timezone

from queued_storage import registry
from queued_storage.failures import ledger_db
from queued_storage.models import PendingTransfer, retry_when_locked

if TYPE_CHECKING:
    from queued_storage.backends import QueuedStorage

Status = PendingTransfer.Status
DEFAULT_PAGE_SIZE = 500
#: How many names of the files left behind a report lists.
LISTED = 100
#: What the new key's row of a carried file takes from the old key's.
CARRIED = ("generation", "size", "checksum", "host")


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
    ``busy`` (a worker copies an older version of it to the new key: run again).
    ``tombstones``: the old key's deleted rows dropped, their purge with them."""

    scanned: int = 0
    superseded: int = 0
    carried: int = 0
    only_old_remote: int = 0
    elsewhere: int = 0
    busy: int = 0
    tombstones: int = 0
    #: The old key's rows left, kept for a person: the first ``LISTED`` names.
    left: list[str] = field(default_factory=list)

    @property
    def left_behind(self) -> int:
        return self.only_old_remote + self.elsewhere + self.busy

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
            # Locked: a save on a switched host bumps the generation of a row of
            # the new key under its lock; a carried row never replaces it.
            newer = {
                row.name_hash: row
                for row in manager.select_for_update()
                .filter(storage_key=key, name_hash__in=[r.name_hash for r in page])
                .order_by("pk")
            }
            dropped: list[int] = []
            carried: list[PendingTransfer] = []
            for row in page:
                counts.scanned += 1
                current = newer.get(row.name_hash)
                if current is not None and current.generation >= row.generation:
                    counts.superseded += 1
                    dropped.append(row.pk)
                    continue
                if not row.local_copy_here(local_shared=self.storage.local_shared):
                    counts.elsewhere += 1
                    self._left(row)
                    continue
                if not self.storage.local.exists(row.name):
                    counts.only_old_remote += 1
                    self._left(row)
                    continue
                if current is None:
                    carried.append(self._new_row(row))
                elif not self._requeue(current, row, db):
                    counts.busy += 1
                    self._left(row)
                    continue
                counts.carried += 1
                dropped.append(row.pk)
            # A save of a name with no row of the new key meanwhile wrote a newer
            # version: its row wins (the conflict is ignored).
            manager.bulk_create(carried, ignore_conflicts=True)
            manager.filter(pk__in=dropped).delete()

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
    storage's, for ``transfer()``) or queued, due now."""
    if row.status == Status.HELD:
        return {"status": Status.HELD, "next_attempt_at": None}
    return {"status": Status.QUEUED, "next_attempt_at": now}


def finish_migration(
    key: str, old_key: str, *, page_size: int = DEFAULT_PAGE_SIZE
) -> FinishCounts:
    """:class:`MigrationFinish` of the old key ``old_key`` into the storage of
    ``key``; :class:`CannotFinish` before anything is written when this
    configuration still uses ``old_key`` or knows no storage ``key``."""
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
    return MigrationFinish(storage, old_key, page_size=page_size).run()


def finish_line(key: str, old_key: str, counts: FinishCounts) -> str:
    """The summary of a finish, for a person."""
    line = (
        f"Finished {old_key} -> {key}: scanned={counts.scanned} "
        f"superseded={counts.superseded} carried={counts.carried} "
        f"only_old_remote={counts.only_old_remote} elsewhere={counts.elsewhere} "
        f"busy={counts.busy} tombstones={counts.tombstones}."
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
            f"{counts.busy} files have an older version being copied: run this "
            "command again"
        )
    names = ", ".join(counts.left[:10])
    more = "" if counts.left_behind <= 10 else ", ..."
    return (
        "; ".join(parts)
        + f" (rows of {old_key} kept: {names}{more}; --json lists up to {LISTED})."
    )
