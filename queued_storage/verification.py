"""Verification: every row recorded as done should have its object on the remote,
with the right size (and content, when checksums are asked for); a mismatch whose
local copy is still there can be re-queued, so that the worker sends it again."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from queued_storage import registry
from queued_storage.checksums import remote_sha256, storage_sha256
from queued_storage.conf import settings as conf
from queued_storage.models import PendingTransfer, PendingTransferQuerySet
from queued_storage.paging import in_batches
from queued_storage.redaction import error_text

if TYPE_CHECKING:
    from queued_storage.storage import QueuedStorage

logger = logging.getLogger("queued_storage")

DEFAULT_BATCH_SIZE = 200
#: What a mismatch is called in the output.
MISSING, SIZE, CHECKSUM, ERROR = "missing", "size", "checksum", "error"
#: A row that cannot be checked here: not a mismatch.
UNVERIFIABLE = "unverifiable"
#: What a check reads of a row (a fix re-queues it, and records its error).
VERIFY_FIELDS = (
    "pk",
    "storage_key",
    "name",
    "generation",
    "size",
    "checksum",
    "attempts",
    "error_history",
    "host",
)


class VerificationFailed(Exception):
    """The remote copy of a row recorded as done failed a later check."""


@dataclass
class Problem:
    """What the check of one row found: a mismatch (``problem`` is one of MISSING,
    SIZE, CHECKSUM, ERROR) or UNVERIFIABLE; ``fixed`` once re-queued."""

    key: str
    name: str
    problem: str
    detail: str
    fixed: bool = False


@dataclass
class VerifyStats:
    """A verification's counts; ``problems`` lists the mismatches (not the
    unverifiable rows), in the order they were found."""

    checked: int = 0
    ok: int = 0
    unverifiable: int = 0
    fixed: int = 0
    problems: list[Problem] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(1 for problem in self.problems if problem.problem == kind)

    @property
    def unfixed(self) -> list[Problem]:
        return [problem for problem in self.problems if not problem.fixed]

    def summary(self) -> str:
        """``name=value`` counts, as logged and printed."""
        return (
            f"checked={self.checked} ok={self.ok} missing={self.count(MISSING)} "
            f"size={self.count(SIZE)} checksum={self.count(CHECKSUM)} "
            f"errors={self.count(ERROR)} unverifiable={self.unverifiable} "
            f"fixed={self.fixed}"
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {
            "missing": self.count(MISSING),
            "size_mismatches": self.count(SIZE),
            "checksum_mismatches": self.count(CHECKSUM),
            "errors": self.count(ERROR),
            "unfixed": len(self.unfixed),
        }


def rows_to_verify() -> PendingTransferQuerySet:
    """The rows a verification checks: done, not deleted."""
    return PendingTransfer.objects.done().live()


def verify(
    rows: PendingTransferQuerySet,
    *,
    checksum: bool = False,
    fix: bool = False,
    concurrency: int = 1,
    batch_size: int = DEFAULT_BATCH_SIZE,
    checked: Callable[[PendingTransfer, Problem | None, VerifyStats], object]
    | None = None,
) -> VerifyStats:
    """Check each of ``rows`` against its storage's remote, ``concurrency`` at a
    time; with ``fix``, re-queue each mismatch whose local copy is still there.

    ``checked`` hears of every row in the calling thread, in key order, once its
    outcome is counted (None: it matched)."""
    stats = VerifyStats()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for batch in in_batches(rows, size=batch_size, fields=VERIFY_FIELDS):
            found_all = (
                pool.map(lambda row: check(row, checksum=checksum), batch)
                if concurrency > 1
                else (check(row, checksum=checksum) for row in batch)
            )
            for row, found in zip(batch, found_all, strict=True):
                stats.checked += 1
                if found is None:
                    stats.ok += 1
                elif found.problem == UNVERIFIABLE:
                    stats.unverifiable += 1
                else:
                    if fix:
                        fix_row(row, found)
                        stats.fixed += found.fixed
                    stats.problems.append(found)
                if checked is not None:
                    checked(row, found, stats)
    return stats


def check(row: PendingTransfer, *, checksum: bool = False) -> Problem | None:
    """What is wrong with the remote copy of ``row``; None when it matches. An
    error while checking is a Problem (ERROR), without credentials."""
    try:
        return _compare(row, checksum)
    except Exception as exc:
        try:
            storage = registry.get(row.storage_key)
        except registry.KeyConflict:
            storage = None  # the conflict is the error reported
        return Problem(row.storage_key, row.name, ERROR, error_text(storage, exc))


def fix_row(row: PendingTransfer, problem: Problem) -> None:
    """Re-queue ``row`` when its local copy is on this host's disk, marking
    ``problem`` fixed; else say in its detail why not."""
    storage = registry.get(row.storage_key)
    if storage is None:
        return
    if not row.local_copy_here(local_shared=storage.local_shared):
        problem.detail += f"; its local copy is on host {row.host}: run --fix there"
        return
    try:
        has_local = storage.local.exists(row.name)
    except Exception as exc:
        problem.detail += f"; the local storage failed: {type(exc).__name__}"
        return
    if not has_local:
        problem.detail += "; no local copy to send again"
        return
    # The copy found is on this host's disk: a row with no host (adopted) is this
    # host's to send, or another host's worker would take it and find nothing.
    host = None if storage.local_shared else conf.QUEUED_STORAGE_HOSTNAME
    if row.requeue_unverified(VerificationFailed(problem.detail), host=host):
        problem.fixed = True
        logger.warning(
            "requeued unverified key=%s name=%s problem=%s",
            row.storage_key,
            row.name,
            problem.problem,
        )
    else:
        problem.detail += "; the row changed meanwhile"


def _compare(row: PendingTransfer, checksum: bool) -> Problem | None:
    storage = registry.get(row.storage_key)
    if storage is None:
        return Problem(
            row.storage_key,
            row.name,
            UNVERIFIABLE,
            "no storage with this key in this process",
        )
    remote = storage.remote
    if not remote.exists(row.name):
        return Problem(
            row.storage_key, row.name, MISSING, "the remote has no object here"
        )
    actual = remote.size(row.name)
    if row.size is not None and actual != row.size:
        return Problem(
            row.storage_key,
            row.name,
            SIZE,
            f"the remote copy has {actual} bytes, the ledger {row.size}"
            f"{_local_size(storage, row.name)}",
        )
    if not checksum:
        return None
    expected = row.checksum
    if not expected:
        if not storage.local.exists(row.name):
            return Problem(
                row.storage_key,
                row.name,
                UNVERIFIABLE,
                "no checksum in the ledger and no local copy to compare with",
            )
        expected = storage_sha256(storage.local, row.name)
    found = remote_sha256(remote, row.name)
    if found != expected:
        return Problem(
            row.storage_key,
            row.name,
            CHECKSUM,
            f"the remote copy has SHA-256 {found}, expected {expected}",
        )
    return None


def _local_size(storage: QueuedStorage, name: str) -> str:
    """``, the local file N`` when a local copy is left to compare with."""
    try:
        return f", the local file {storage.local.size(name)}"
    except Exception:
        return ""
