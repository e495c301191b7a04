"""Adoption: the files a remote held before its storage used the ledger (a 0.8
site's transferred files) get ``DONE`` rows, so that no new upload is handed
their names.

Until a storage is adopted, a name the ledger has never seen is asked of the
remote once before it is handed out (:func:`record_remote_file` makes the answer
a row); ``manage.py adopt_remote_files`` lists the remote and records every file
in batches, then marks the storage adopted, after which no save asks the remote.
"""

from __future__ import annotations

import logging
import posixpath
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.core.exceptions import SuspiciousFileOperation
from django.core.files.storage import Storage
from django.db import models, transaction
from django.db.models import Case, Q, Value, When
from django.utils import timezone

from queued_storage import redaction
from queued_storage.ledger_sql import insert_new
from queued_storage.models import (
    PendingTransfer,
    StorageState,
    name_hash,
    new_generation,
)
from queued_storage.names import canonical_name

if TYPE_CHECKING:
    from queued_storage.storage import QueuedStorage

logger = logging.getLogger("queued_storage")

DEFAULT_BATCH_SIZE = 500

#: (database alias, storage key) of the storages seen adopted by this process: an
#: adoption is never taken back, so that once seen it costs no query.
_adopted: set[tuple[str, str]] = set()
#: Storage keys whose first remote question this process has logged.
_announced: set[str] = set()
_lock = threading.Lock()


def is_adopted(db: str, key: str) -> bool:
    """Whether the storage ``key`` is adopted in database ``db``: a set lookup once
    seen adopted, else one indexed query (a storage not yet adopted asks again)."""
    if (db, key) in _adopted:
        return True
    found = (
        StorageState.objects.using(db)
        .filter(storage_key=key, adopted_at__isnull=False)
        .exists()
    )
    if found:
        with _lock:
            _adopted.add((db, key))
    return found


def forget(key: str) -> None:
    """Forget that ``key`` was seen adopted (tests; an operator who takes an
    adoption back restarts the processes)."""
    with _lock:
        for seen in [seen for seen in _adopted if seen[1] == key]:
            _adopted.discard(seen)
        _announced.discard(key)


def _adopted_row(key: str, name: str, generation: int, now: Any) -> PendingTransfer:
    """The row of a file the remote holds that no upload of the ledger wrote: done,
    served from the remote, and owned, so that ``delete()`` removes it (as 0.8's
    did). Its size is read once the row is in (None until then)."""
    return PendingTransfer(
        storage_key=key,
        name=name,
        name_hash=name_hash(name),
        status=PendingTransfer.Status.DONE,
        generation=generation,
        remote_owned=True,
        next_attempt_at=None,
        size=None,
        host="",
        created_at=now,
        updated_at=now,
        transferred_at=now,
    )


def record_remote_file(db: str, key: str, name: str, remote: Storage) -> int | None:
    """Record that the remote holds a file at ``name``, which has no row, in the
    caller's transaction: the name is taken from now on, without asking again.
    Returns the file's size; None when the name got a row meanwhile (that row
    stays). Raises FileNotFoundError, recording nothing, when the file is gone."""
    if key not in _announced:
        with _lock:
            _announced.add(key)
        logger.info(
            "storage not adopted key=%s: a name the ledger has never seen is asked "
            "of the remote; run manage.py adopt_remote_files",
            key,
        )
    generation = new_generation()
    row = _adopted_row(key, name, generation, timezone.now())
    values = {
        field.name: getattr(row, field.attname)
        for field in PendingTransfer._meta.concrete_fields
        if not field.primary_key
    }
    # Whether the row is ours, from the insert itself: a save of the name in
    # another process may have inserted its row at the same generation.
    if not insert_new(PendingTransfer, values, db):
        return None
    recorded = (
        PendingTransfer.objects.using(db)
        .for_name(key, name)
        .filter(generation=generation)
    )
    try:
        # Asked after the row is in, as the adoption asks: a file deleted and
        # purged since the remote said it was there is found gone here.
        size = int(remote.size(name))
    except FileNotFoundError:
        recorded.delete()
        raise
    return size if recorded.update(size=size) else None


def state_of(key: str) -> StorageState | None:
    return StorageState.objects.filter(storage_key=key).first()


@dataclass(frozen=True)
class AdoptionStatus:
    """Whether a storage's remote files from before the ledger are adopted, and
    where an unfinished adoption stopped ("" when none did)."""

    adopted_at: datetime | None
    cursor: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "adopted": self.adopted_at is not None,
            "adopted_at": self.adopted_at.isoformat() if self.adopted_at else None,
            "adoption_cursor": self.cursor or None,
        }


def statuses(keys: list[str]) -> dict[str, AdoptionStatus]:
    """The adoption status of each storage of ``keys``, in their order: one query."""
    states = {
        state.storage_key: state
        for state in StorageState.objects.filter(storage_key__in=keys)
    }
    found: dict[str, AdoptionStatus] = {}
    for key in keys:
        state = states.get(key)
        found[key] = AdoptionStatus(
            adopted_at=state.adopted_at if state else None,
            cursor=state.adoption_cursor if state else "",
        )
    return found


def _state_for_update(key: str) -> StorageState:
    """The state row of ``key``, locked until the transaction ends; created when
    missing (two creators: one inserts, the other finds it)."""
    rows = StorageState.objects.select_for_update()
    found = rows.filter(storage_key=key).first()
    if found is not None:
        return found
    now = timezone.now()
    StorageState.objects.bulk_create(
        [StorageState(storage_key=key, created_at=now, updated_at=now)],
        ignore_conflicts=True,
    )
    return rows.get(storage_key=key)


def mark_adopted(key: str, counts: dict[str, int] | None = None) -> StorageState:
    """Mark the storage ``key`` adopted: its remote holds no file without a row
    (every one was recorded, or it is new). Its unfinished adoption, if any, ends."""
    now = timezone.now()
    with transaction.atomic(using=_db()):
        state = _state_for_update(key)
        state.adopted_at = state.adopted_at or now
        state.adoption_cursor = ""
        if counts is not None:
            state.adoption_counts = counts
        state.updated_at = now
        state.save()
        transaction.on_commit(lambda: _seen_adopted(key), using=_db())
    return state


def _seen_adopted(key: str) -> None:
    with _lock:
        _adopted.add((_db(), key))


def _db() -> str:
    from django.db import router

    return router.db_for_write(StorageState)


@dataclass
class AdoptionCounts:
    scanned: int = 0
    recorded: int = 0
    existing: int = 0
    vanished: int = 0
    invalid: int = 0

    @classmethod
    def of(cls, stored: dict[str, Any]) -> AdoptionCounts:
        names = {field.name for field in fields(cls)}
        return cls(**{k: int(v) for k, v in stored.items() if k in names})

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def remote_names(storage: Storage, after: str = "", top: str = "") -> Iterator[str]:
    """Every file name under ``top`` of ``storage`` that comes after ``after`` in
    walk order: depth first, each directory's files (sorted) before its
    subdirectories (sorted). Resuming after a name lists only the directories on
    its path and those after it."""
    dirs, files = storage.listdir(top)
    rest = after[len(top) + 1 :] if top else after
    head, inside, _tail = rest.partition("/")
    for file_name in sorted(files):
        # The files of a directory come before its subdirectories: a cursor in a
        # subdirectory is past all of them.
        if rest and (inside or file_name <= head):
            continue
        yield posixpath.join(top, file_name) if top else file_name
    for dir_name in sorted(dirs):
        if inside and dir_name < head:
            continue
        resume = after if inside and dir_name == head else ""
        try:
            yield from remote_names(
                storage, resume, posixpath.join(top, dir_name) if top else dir_name
            )
        except FileNotFoundError:
            continue  # removed while the walk runs


class Adoption:
    """One run of a storage's adoption: :meth:`record` each batch of listed names,
    then :meth:`finish`. The cursor and counts are kept with each batch, so that a
    run that stops is continued by the next from its last batch."""

    def __init__(
        self,
        storage: QueuedStorage,
        *,
        dry_run: bool = False,
        skipped: Callable[[str, Exception], object] | None = None,
    ) -> None:
        self.storage = storage
        self.dry_run = dry_run
        self.skipped = skipped
        self.counts = AdoptionCounts()
        self.resumed_after = ""
        if dry_run:
            return
        now = timezone.now()
        with transaction.atomic(using=_db()):
            state = _state_for_update(storage.key)
            if state.adoption_cursor:
                self.resumed_after = state.adoption_cursor
                self.counts = AdoptionCounts.of(state.adoption_counts)
            else:
                state.adoption_started_at = now
                state.adoption_counts = self.counts.as_dict()
            state.updated_at = now
            state.save()

    def names(self) -> Iterator[str]:
        """The remote's file names still to record, in walk order."""
        return remote_names(self.storage.remote, self.resumed_after)

    def run(
        self,
        batch_size: int = DEFAULT_BATCH_SIZE,
        *,
        after_batch: Callable[[], object] | None = None,
    ) -> AdoptionCounts:
        """List the remote and :meth:`record` its files ``batch_size`` at a time
        (``after_batch`` is called after each full batch: progress), then
        :meth:`finish`.

        A remote that cannot list raises NotImplementedError. What the remote
        raises is scrubbed of its credentials: the listing and the sizes come from
        it directly, not through the queued storage, which redacts its own."""
        batch: list[str] = []
        try:
            for name in self.names():
                batch.append(name)
                if len(batch) >= batch_size:
                    self.record(batch)
                    batch = []
                    if after_batch is not None:
                        after_batch()
            if batch:
                self.record(batch)
            self.finish()
        except Exception as exc:
            redaction.scrub(self.storage, exc)
            raise
        return self.counts

    def record(self, names: list[str]) -> None:
        """Record one batch of listed names (in walk order): a done row for each
        file that has none, never touching a row that is there."""
        counts = self.counts
        counts.scanned += len(names)
        valid = self._valid(names)
        if self.dry_run:
            known = PendingTransfer.objects.filter(
                storage_key=self.storage.key, name_hash__in=list(valid)
            ).count()
            counts.existing += known
            counts.recorded += len(valid) - known
            return
        found = self._insert(valid)
        counts.existing += len(valid) - len(found)
        sizes = self._sizes(found)
        counts.vanished += len(found) - len(sizes)
        counts.recorded += len(sizes)
        self._keep(sizes, cursor=names[-1] if names else "")

    def finish(self) -> None:
        """Mark the storage adopted (not in a dry run), once the rows a stopped run
        inserted but never sized are sized: one whose file was deleted before its
        batch went in is listed no more, and would serve a name with no file."""
        if self.dry_run:
            return
        unsized = list(
            PendingTransfer.objects.filter(
                storage_key=self.storage.key,
                status=PendingTransfer.Status.DONE,
                deleted=False,
                size__isnull=True,
            ).values_list("pk", "generation", "name")
        )
        if unsized:
            sizes = self._sizes(unsized)
            self.counts.vanished += len(unsized) - len(sizes)
            self.counts.recorded += len(sizes)
            self._keep(sizes, cursor="")
        mark_adopted(self.storage.key, self.counts.as_dict())

    def _valid(self, names: list[str]) -> dict[str, str]:
        valid: dict[str, str] = {}
        for name in names:
            try:
                if canonical_name(name) != name:
                    # A row under this spelling would be a second row for the
                    # file that the storage reads it as.
                    raise SuspiciousFileOperation(
                        "the storage reads this name as another; rename the file"
                    )
            except (ValueError, SuspiciousFileOperation) as exc:
                self.counts.invalid += 1
                if self.skipped is not None:
                    self.skipped(name, exc)
                continue
            valid[name_hash(name)] = name
        return valid

    def _insert(self, valid: dict[str, str]) -> list[tuple[int, int, str]]:
        """Insert a done row, without size, for each name of ``valid`` that has no
        row (a save of the name since keeps its own); returns (pk, generation,
        name) of the rows that wait for their size: these, and those an earlier
        run or a save's question to the remote left without one."""
        key = self.storage.key
        now = timezone.now()
        generation = new_generation()
        PendingTransfer.objects.bulk_create(
            [_adopted_row(key, name, generation, now) for name in valid.values()],
            ignore_conflicts=True,
        )
        return list(
            PendingTransfer.objects.filter(
                storage_key=key,
                name_hash__in=list(valid),
                status=PendingTransfer.Status.DONE,
                deleted=False,
                size__isnull=True,
            ).values_list("pk", "generation", "name")
        )

    def _sizes(self, found: list[tuple[int, int, str]]) -> dict[tuple[int, int], int]:
        """The remote's size of each file of ``found``. Asked after the row is in:
        a file deleted (and purged) before is found gone here, and its row is
        removed; one deleted later finds the row and hides it."""
        remote = self.storage.remote
        sizes: dict[tuple[int, int], int] = {}
        for pk, generation, name in found:
            try:
                sizes[(pk, generation)] = int(remote.size(name))
            except FileNotFoundError:
                PendingTransfer.objects.filter(
                    pk=pk,
                    generation=generation,
                    status=PendingTransfer.Status.DONE,
                    deleted=False,
                    size__isnull=True,
                ).delete()
        return sizes

    def _keep(self, sizes: dict[tuple[int, int], int], *, cursor: str) -> None:
        """Write the sizes, each row only in the generation it was read in, and the
        cursor and counts, in one short transaction."""
        now = timezone.now()
        with transaction.atomic(using=_db()):
            if sizes:
                match = Q()
                for pk, generation in sizes:
                    match |= Q(pk=pk, generation=generation)
                PendingTransfer.objects.filter(match, size__isnull=True).update(
                    size=Case(
                        *(
                            When(pk=pk, then=Value(size))
                            for (pk, _generation), size in sizes.items()
                        ),
                        output_field=models.BigIntegerField(),
                    )
                )
            StorageState.objects.filter(storage_key=self.storage.key).update(
                adoption_cursor=cursor,
                adoption_counts=self.counts.as_dict(),
                updated_at=now,
            )
