"""Backfill: a ledger row for every file of a storage's local storage that has none
(saved before the app was installed, or a lost row), so that the worker moves it.
Batched, and resumable by running it again: a file with a row is left alone."""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from django.core.exceptions import SuspiciousFileOperation
from django.core.files.storage import Storage
from django.utils import timezone

from queued_storage import redaction
from queued_storage.conf import settings as conf
from queued_storage.models import PendingTransfer, name_hash
from queued_storage.names import canonical_name

if TYPE_CHECKING:
    from queued_storage.storage import QueuedStorage

DEFAULT_BATCH_SIZE = 500


@dataclass
class BackfillCounts:
    """What a backfill found, file by file (a file counts once in ``scanned`` and
    at most once more: ``queued`` and ``conflicts`` may both count one)."""

    scanned: int = 0
    queued: int = 0
    done: int = 0
    existing: int = 0
    conflicts: int = 0
    invalid: int = 0
    vanished: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def walk(storage: Storage, top: str) -> Iterator[str]:
    """Every file name under ``top``, depth first, each directory in sorted order.

    A missing ``top`` raises FileNotFoundError; a subdirectory removed while the
    walk runs is skipped."""
    dirs, files = storage.listdir(top)
    for file_name in sorted(files):
        yield posixpath.join(top, file_name) if top else file_name
    for dir_name in sorted(dirs):
        try:
            yield from walk(storage, posixpath.join(top, dir_name) if top else dir_name)
        except FileNotFoundError:
            continue


class Backfill:
    """One backfill of ``storage``'s local files under ``top`` (a canonical
    directory, "" for all): :meth:`run` walks and records them in batches.

    ``check_remote`` asks the remote for each file: one it already has with the
    same size gets a done row instead of a queued one. ``skipped`` hears of each
    file whose name the storage would read as another (counted ``invalid``)."""

    def __init__(
        self,
        storage: QueuedStorage,
        *,
        top: str = "",
        check_remote: bool = False,
        dry_run: bool = False,
        skipped: Callable[[str, Exception], object] | None = None,
    ) -> None:
        self.storage = storage
        self.top = top
        self.check_remote = check_remote
        self.dry_run = dry_run
        self.skipped = skipped
        self.counts = BackfillCounts()

    def run(
        self,
        batch_size: int = DEFAULT_BATCH_SIZE,
        *,
        after_batch: Callable[[], object] | None = None,
    ) -> BackfillCounts:
        """Walk the local storage and :meth:`record` its files ``batch_size`` at a
        time; ``after_batch`` is called after each full batch (progress).

        A missing ``top`` raises FileNotFoundError (``counts.scanned`` is 0 then).
        What the storages raise is scrubbed of their credentials: the walk and
        the remote checks call them directly, not through the queued storage."""
        batch: list[str] = []
        try:
            for name in walk(self.storage.local, self.top):
                self.counts.scanned += 1
                batch.append(name)
                if len(batch) >= batch_size:
                    self.record(batch)
                    batch = []
                    if after_batch is not None:
                        after_batch()
            if batch:
                self.record(batch)
        except Exception as exc:
            redaction.scrub(self.storage, exc)
            raise
        return self.counts

    def record(self, names: list[str]) -> None:
        """Give each of ``names`` that has no row one: queued (held for a delayed
        storage), or done when ``check_remote`` finds the same file there."""
        storage = self.storage
        counts = self.counts
        valid = self._valid(names)
        known = set(
            PendingTransfer.objects.filter(
                storage_key=storage.key, name_hash__in=list(valid)
            ).values_list("name_hash", flat=True)
        )
        counts.existing += len(known)
        now = timezone.now()
        host = conf.QUEUED_STORAGE_HOSTNAME
        rows = []
        for digest, name in valid.items():
            if digest in known:
                continue
            try:
                size = storage.local.size(name)
            except FileNotFoundError:
                counts.vanished += 1  # deleted since the listing
                continue
            row = PendingTransfer(
                storage_key=storage.key,
                name=name,
                name_hash=digest,
                size=size,
                host=host,
                created_at=now,
                updated_at=now,
            )
            if self.check_remote and storage.remote.exists(name):
                if storage.remote.size(name) == size:
                    row.status = PendingTransfer.Status.DONE
                    row.remote_owned = True
                    row.transferred_at = now
                    counts.done += 1
                    rows.append(row)
                    continue
                # Not ours and not the same file: the engine reports it, never
                # overwrites it (see the remote conflict in the README).
                counts.conflicts += 1
            if storage.delayed:
                row.status = PendingTransfer.Status.HELD
            else:
                row.status = PendingTransfer.Status.QUEUED
                row.next_attempt_at = now
            counts.queued += 1
            rows.append(row)
        if rows and not self.dry_run:
            # A save of the same name may have won the race since the lookup: its
            # row stays, this one is dropped.
            PendingTransfer.objects.bulk_create(rows, ignore_conflicts=True)

    def _valid(self, names: list[str]) -> dict[str, str]:
        """``names`` by their hash, without those the storage reads as another."""
        valid: dict[str, str] = {}
        for name in names:
            try:
                canonical = canonical_name(name)
                if canonical != name:
                    # A row under this spelling would be a second row for the
                    # file that the storage reads it as.
                    raise SuspiciousFileOperation(
                        f"the storage reads this name as {canonical!r}; rename the file"
                    )
            except (ValueError, SuspiciousFileOperation) as exc:
                self.counts.invalid += 1
                if self.skipped is not None:
                    self.skipped(name, exc)
                continue
            valid[name_hash(name)] = name
        return valid
