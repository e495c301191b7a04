"""Backfilling mirrors: a mirror added to a storage in use gets a copy queued
of each file its primary has recorded as done, walked by primary key in
pages, paced in files and bytes per second. Resumable by running it again:
a file whose mirror row is at its generation is left alone. Then, if asked,
waiting until the mirrors' rows are done."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from django.db import connections, transaction
from django.db.models import Count, Max

from queued_storage import mirrors
from queued_storage.conf import MAX_SECONDS
from queued_storage.failures import ledger_db
from queued_storage.models import (
    PendingTransfer,
    PendingTransferQuerySet,
    retry_when_locked,
)

if TYPE_CHECKING:
    from queued_storage.storage import QueuedStorage

logger = logging.getLogger("queued_storage")

Status = PendingTransfer.Status
DEFAULT_PAGE_SIZE = 500
#: The pacing's clock and pause; tests replace them, so that nothing sleeps.
clock: Callable[[], float] = time.monotonic
pause: Callable[[float], None] = time.sleep
#: A primary's row to fan out: pk, generation, size, the mirror keys it needs.
Wanted = tuple[int, int, int | None, tuple[str, ...]]
#: What a mirror's row waits in, before it is done or failed.
PENDING = (Status.HELD, Status.QUEUED, Status.TRANSFERRING)


@dataclass
class BackfillCounts:
    """What a backfill did: each of the primary's done rows is scanned once, and
    counted in ``current`` when every mirror asked for has its row at the
    generation already; ``queued`` counts copies (a file times a mirror)."""

    total: int = 0
    scanned: int = 0
    queued: int = 0
    current: int = 0
    bytes: int = 0
    #: Seconds the pacing waited.
    paced: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


class Pacing:
    """Keeps the copies queued since ``start`` at or under ``max_files`` a
    second and ``max_rate`` bytes a second (None: no limit)."""

    def __init__(self, max_rate: float | None, max_files: float | None) -> None:
        self.max_rate = max_rate
        self.max_files = max_files
        self.start = clock()
        self.files = 0
        self.bytes = 0

    def chunks(self, wanted: list[Wanted]) -> Iterator[tuple[list[Wanted], int, int]]:
        """``wanted`` in parts of about a second's worth (at least one file),
        each with its copies and bytes."""
        part: list[Wanted] = []
        copies = size = 0
        for item in wanted:
            more, more_size = len(item[3]), (item[2] or 0) * len(item[3])
            if part and (
                (self.max_files and copies + more > self.max_files)
                or (self.max_rate and size + more_size > self.max_rate)
            ):
                yield part, copies, size
                part, copies, size = [], 0, 0
            part.append(item)
            copies += more
            size += more_size
        if part:
            yield part, copies, size

    def wait(self, files: int, size: int) -> float:
        """Wait until ``files`` more files of ``size`` bytes may be queued; returns
        the seconds waited."""
        self.files += files
        self.bytes += size
        due = max(
            self.files / self.max_files if self.max_files else 0.0,
            self.bytes / self.max_rate if self.max_rate else 0.0,
        )
        # A big file at a slow rate may be due later than time.sleep can wait
        # (OverflowError): a hundred years at most is as good as for ever.
        wait = min(self.start + due - clock(), MAX_SECONDS)
        if wait <= 0:
            return 0.0
        pause(wait)
        return wait


@dataclass
class MirrorBackfill:
    """Queue a copy on the mirrors ``names`` of ``storage`` (all of them by
    default) of every file whose copy there is missing or of another version."""

    storage: QueuedStorage
    names: list[str] = field(default_factory=list)
    max_rate: float | None = None
    max_files: float | None = None
    page_size: int = DEFAULT_PAGE_SIZE
    counts: BackfillCounts = field(default_factory=BackfillCounts)

    def __post_init__(self) -> None:
        self.names = self.names or list(self.storage.mirror_targets)
        self.keys = [self.storage.mirror_key(name) for name in self.names]

    def primary_rows(self) -> PendingTransferQuerySet:
        return PendingTransfer.objects.filter(
            storage_key=self.storage.key, status=Status.DONE, deleted=False
        )

    def run(self, after_chunk: Callable[[], object] | None = None) -> BackfillCounts:
        """Walk the primary's done rows by primary key and queue what is missing,
        paced; ``after_chunk`` hears of each chunk queued (for a progress line)."""
        self.storage._registered()  # KeyConflict before a row is written
        counts = self.counts
        counts.total = self.primary_rows().count()
        pacing = Pacing(self.max_rate, self.max_files)
        last = 0
        while True:
            page = list(
                self.primary_rows()
                .filter(pk__gt=last)
                .order_by("pk")
                .values_list("pk", "name_hash", "generation", "size")[: self.page_size]
            )
            if not page:
                return counts
            last = page[-1][0]
            wanted = self._missing(page)
            counts.scanned += len(page)
            counts.current += len(page) - len(wanted)
            for part, copies, size in pacing.chunks(wanted):
                counts.paced += pacing.wait(copies, size)
                counts.queued += self._queue(part)
                counts.bytes += size
                if after_chunk is not None:
                    after_chunk()
            if after_chunk is not None and not wanted:
                after_chunk()

    def _missing(self, page: list[tuple[int, str, int, int | None]]) -> list[Wanted]:
        """The rows of ``page`` with the mirror keys whose copy is missing, of
        another generation, or parked at it (its primary is done now)."""
        found: dict[tuple[str, str], tuple[int, str, bool]] = {
            (key, hashed): (generation, status, deleted)
            for key, hashed, generation, status, deleted in PendingTransfer.objects.filter(
                storage_key__in=self.keys, name_hash__in=[row[1] for row in page]
            ).values_list("storage_key", "name_hash", "generation", "status", "deleted")
        }
        wanted = []
        for pk, hashed, generation, size in page:
            keys = tuple(
                key
                for key in self.keys
                if found.get((key, hashed)) not in _current(generation)
            )
            if keys:
                wanted.append((pk, generation, size, keys))
        return wanted

    @retry_when_locked
    def _queue(self, part: list[Wanted]) -> int:
        """Fan out the rows of ``part`` that are still done at the generation
        read, under their lock (a completion of a newer version, which fans
        out itself, waits for it)."""
        db = ledger_db()
        seen = {pk: (generation, keys) for pk, generation, _size, keys in part}
        queued = 0
        with transaction.atomic(using=db):
            still = PendingTransfer.objects.using(db).filter(
                pk__in=list(seen), status=Status.DONE, deleted=False
            )
            if not connections[db].features.has_select_for_update:
                still.lock()  # SQLite: the write lock, before the read
            by_keys: dict[tuple[str, ...], list[PendingTransfer]] = {}
            for row in still.select_for_update().order_by("pk"):
                generation, keys = seen[row.pk]
                if row.generation == generation:
                    by_keys.setdefault(keys, []).append(row)
            for keys, rows in by_keys.items():
                queued += mirrors.fan_out(self.storage, rows, db, list(keys))
        return queued


def _current(generation: int) -> tuple[tuple[int, str, bool], ...]:
    """The states of a mirror's row that need no backfill at ``generation``."""
    return tuple(
        (generation, status, False)
        for status in (Status.QUEUED, Status.TRANSFERRING, Status.DONE, Status.FAILED)
    )


@dataclass
class Waiting:
    """The mirrors' rows that a backfill waits for, by mirror name."""

    storage: QueuedStorage
    names: list[str]
    #: Rows created after the backfill (new files) are not waited for.
    up_to: int = 0
    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        keys = [self.storage.mirror_key(name) for name in self.names]
        top = PendingTransfer.objects.filter(storage_key__in=keys).aggregate(
            top=Max("pk")
        )["top"]
        self.up_to = top or 0

    def look(self) -> bool:
        """Count the mirrors' live rows by state; whether none is pending."""
        by_key = {self.storage.mirror_key(name): name for name in self.names}
        found = (
            PendingTransfer.objects.filter(
                storage_key__in=list(by_key), deleted=False, pk__lte=self.up_to
            )
            .order_by()
            .values_list("storage_key", "status")
            .annotate(number=Count("pk"))
        )
        self.counts = {
            name: {"done": 0, "failed": 0, "pending": 0} for name in self.names
        }
        for key, status, number in found:
            state = {Status.DONE: "done", Status.FAILED: "failed"}.get(
                status, "pending"
            )
            self.counts[by_key[key]][state] += number
        return not any(counts["pending"] for counts in self.counts.values())

    def wait(self, every: float, looked: Callable[[], object] | None = None) -> None:
        """Look every ``every`` seconds until no row is pending."""
        while not self.look():
            if looked is not None:
                looked()
            pause(every)
        if looked is not None:
            looked()

    @property
    def failed(self) -> int:
        return sum(counts["failed"] for counts in self.counts.values())
