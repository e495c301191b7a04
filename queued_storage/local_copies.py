"""Cleaning local copies: remove the local copy of a file that has been on the
remote, checked and recorded as done, for a while. Nothing else is ever removed."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Literal

from django.utils import timezone

from queued_storage import mirrors, registry
from queued_storage.models import PendingTransfer, PendingTransferQuerySet
from queued_storage.names import misspelling
from queued_storage.paging import in_batches
from queued_storage.redaction import error_text
from queued_storage.tombstones import delete_local_copy

if TYPE_CHECKING:
    from queued_storage.storage import QueuedStorage

logger = logging.getLogger("queued_storage")

DEFAULT_BATCH_SIZE = 500
#: A local file modified this long after its transfer counts as changed: room for
#: a file server whose clock runs ahead of the worker's.
CLOCK_SKEW = timedelta(seconds=60)
#: What a check reads of a row.
CLEAN_FIELDS = (
    "pk",
    "storage_key",
    "name",
    "generation",
    "size",
    "host",
    "transferred_at",
)


@dataclass
class CleanStats:
    """A clean's counts: each row checked lands in one of the others."""

    checked: int = 0
    removed: int = 0
    bytes: int = 0
    absent: int = 0
    changed: int = 0
    other_host: int = 0
    unknown_storage: int = 0
    unverified: int = 0
    not_mirrored: int = 0
    errors: int = 0

    @property
    def kept_in_doubt(self) -> int:
        """Copies kept because their remote copy could not be checked, or their
        removal failed: what a person should look at."""
        return self.unverified + self.errors

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


#: The CleanStats field a row counts in, besides ``checked``.
Counted = Literal[
    "removed",
    "absent",
    "changed",
    "other_host",
    "unknown_storage",
    "unverified",
    "not_mirrored",
    "errors",
]


@dataclass(frozen=True)
class Cleaned:
    """What happened to one row's local copy: ``counted`` names the CleanStats
    field it counts in; ``action`` ("removed", "would remove", "kept", "error")
    and ``reason`` are set where a person may want to hear of it."""

    counted: Counted
    action: str = ""
    reason: str = ""
    bytes: int = 0


def rows_to_clean(older_than: timedelta) -> PendingTransferQuerySet:
    """The rows whose local copy may go: done, not deleted, transferred at least
    ``older_than`` ago."""
    cutoff = timezone.now() - older_than
    return PendingTransfer.objects.done().live().filter(transferred_at__lte=cutoff)


def clean_local_copies(
    rows: PendingTransferQuerySet,
    *,
    check_remote: bool = True,
    dry_run: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    cleaned: Callable[[PendingTransfer, Cleaned, CleanStats], object] | None = None,
) -> CleanStats:
    """Remove the local copy of each of ``rows`` (done rows) that is the file
    transferred, after checking (with ``check_remote``) that the remote has it
    with the same size. ``cleaned`` hears of each row once it is counted. A
    mirror's row is left out: its primary's answers for every destination."""
    stats = CleanStats()
    mirror_keys = registry.mirror_keys()
    if mirror_keys:
        rows = rows.exclude(storage_key__in=mirror_keys)
    for batch in in_batches(rows, size=batch_size, fields=CLEAN_FIELDS):
        for row in batch:
            outcome = clean_one(row, check_remote=check_remote, dry_run=dry_run)
            stats.checked += 1
            setattr(stats, outcome.counted, getattr(stats, outcome.counted) + 1)
            stats.bytes += outcome.bytes
            if cleaned is not None:
                cleaned(row, outcome, stats)
    return stats


def clean_one(
    row: PendingTransfer, *, check_remote: bool = True, dry_run: bool = False
) -> Cleaned:
    """Remove the local copy of the done ``row`` when it is safe (see
    :func:`clean_local_copies`); never raises for a storage's error."""
    storage = registry.get(row.storage_key)
    if storage is None:
        return Cleaned("unknown_storage")
    # A mirror's row: the copy is the primary's to clean, as for its own row.
    storage = storage.primary or storage
    if not row.local_copy_here(local_shared=storage.local_shared):
        return Cleaned("other_host")  # that host's own run cleans it
    wrong = misspelling(row.name)
    if wrong is not None:
        return Cleaned("errors", "kept", wrong)
    try:
        return _clean_copy(storage, row, check_remote=check_remote, dry_run=dry_run)
    except Exception as exc:
        return Cleaned("errors", "error", error_text(storage, exc))


def _clean_copy(
    storage: QueuedStorage, row: PendingTransfer, *, check_remote: bool, dry_run: bool
) -> Cleaned:
    local = storage.local
    if not local.exists(row.name):
        return Cleaned("absent")
    if row.size is None:
        # An adopted file whose size its adoption has not read yet: nothing has
        # checked the remote copy against anything.
        return Cleaned("unverified", "kept", "not verified yet: run adopt_remote_files")
    size = local.size(row.name)
    if size != row.size or _changed_since(storage, row):
        # Written again after the transfer: not the copy the remote has.
        return Cleaned("changed", "kept", "the local file changed after the transfer")
    if storage.mirror_targets and not mirrors.done_everywhere(
        storage, row.name, row.generation
    ):
        return Cleaned("not_mirrored", "kept", "a mirror has no verified copy yet")
    if check_remote:
        for name, _key, destination in storage.destinations:
            remote = destination.remote
            if not remote.exists(row.name) or remote.size(row.name) != size:
                where = f"mirror {name!r}'s" if name else "the remote"
                return Cleaned(
                    "unverified",
                    "kept",
                    f"{where} copy is missing or has another size (see "
                    "verify_transfers)",
                )
    # The row is checked again at the last moment, under its lock: a re-save or
    # delete of the name since the batch was read leaves the file alone.
    if dry_run:
        kept = not row.while_done().exists()
    elif storage.mirror_targets:
        kept = not mirrors.delete_local_copy(storage, row.name, row.generation)
    else:
        kept = not delete_local_copy(storage, row.name, row.while_done())
    if kept:
        return Cleaned("changed")
    if dry_run:
        return Cleaned("removed", "would remove", bytes=size)
    logger.info(
        "local copy removed key=%s name=%s bytes=%s", row.storage_key, row.name, size
    )
    return Cleaned("removed", "removed", bytes=size)


def _changed_since(storage: QueuedStorage, row: PendingTransfer) -> bool:
    transferred_at: datetime | None = row.transferred_at
    if transferred_at is None:
        return False
    try:
        modified = storage.local.get_modified_time(row.name)
    except (NotImplementedError, AttributeError):
        return False
    if timezone.is_naive(modified):
        modified = timezone.make_aware(modified, timezone.get_default_timezone())
    return bool(modified > transferred_at + CLOCK_SKEW)
