"""Reconcile the ledger with the remote: every row recorded as done should have its
object on the remote, with the right size (and content, with --checksum)."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from django.core.management.base import BaseCommand, CommandParser

from queued_storage import registry
from queued_storage.checksums import remote_sha256, storage_sha256
from queued_storage.management.cli import (
    AttentionNeeded,
    Progress,
    add_batch_size_argument,
    add_output_arguments,
    add_storage_filter,
    check_storage_keys,
    error_text,
    eta,
    in_batches,
    local_copy_elsewhere,
    of_storages,
    positive_int,
    write_json,
)
from queued_storage.models import PendingTransfer

if TYPE_CHECKING:
    from queued_storage.backends import QueuedStorage

logger = logging.getLogger("queued_storage")

DEFAULT_BATCH_SIZE = 200
#: What a mismatch is called in the output.
MISSING, SIZE, CHECKSUM, ERROR = "missing", "size", "checksum", "error"
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
    key: str
    name: str
    problem: str
    detail: str
    fixed: bool = False


@dataclass
class VerifyStats:
    checked: int = 0
    ok: int = 0
    unverifiable: int = 0
    fixed: int = 0
    problems: list[Problem] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(1 for problem in self.problems if problem.problem == kind)


class Command(BaseCommand):
    help = (
        "Check that the remote has every file the ledger records as done, with the "
        "right size (--checksum: the right content). --fix re-queues the ones whose "
        "local copy still exists. Exit status 3 when a mismatch is left unfixed."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        add_storage_filter(parser)
        parser.add_argument(
            "--checksum",
            action="store_true",
            help="Also compare SHA-256 (reads each remote object, unless the remote "
            "keeps a SHA-256 of its own).",
        )
        parser.add_argument(
            "--fix",
            action="store_true",
            help="Re-queue mismatched rows whose local copy still exists; the "
            "worker sends the file again.",
        )
        parser.add_argument(
            "--concurrency",
            type=positive_int,
            default=1,
            help="Check this many files at once, in threads (default: 1).",
        )
        add_batch_size_argument(
            parser, default=DEFAULT_BATCH_SIZE, what="Rows read per query"
        )
        add_output_arguments(parser, progress=True)

    def handle(
        self,
        *,
        storages: list[str] | None,
        checksum: bool,
        fix: bool,
        concurrency: int,
        batch_size: int,
        json: bool,
        progress: bool | None,
        progress_every: float,
        verbosity: int,
        **options: Any,
    ) -> None:
        keys = check_storage_keys(storages)
        rows = of_storages(PendingTransfer.objects.done().live(), keys)
        total = rows.count()
        self.with_checksum = checksum
        stats = VerifyStats()
        display = Progress(
            self, verbosity=verbosity, as_json=json, live=progress, every=progress_every
        )

        started = time.monotonic()

        def line() -> str:
            elapsed = time.monotonic() - started
            return (
                f"{stats.checked}/{total} checked  ok {stats.ok}  "
                f"mismatched {len(stats.problems)}  "
                f"ETA {eta(stats.checked, total, elapsed)}"
            )

        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            for batch in in_batches(rows, size=batch_size, fields=VERIFY_FIELDS):
                checked = (
                    pool.map(self._check, batch)
                    if concurrency > 1
                    else map(self._check, batch)
                )
                for row, found in zip(batch, checked, strict=True):
                    stats.checked += 1
                    if found is None:
                        stats.ok += 1
                    elif found.problem == "unverifiable":
                        stats.unverifiable += 1
                        if verbosity > 1 and not json:
                            self.stdout.write(
                                f"unverifiable key={found.key} name={found.name}: "
                                f"{found.detail}"
                            )
                    else:
                        if fix:
                            self._fix(row, found)
                            stats.fixed += found.fixed
                        stats.problems.append(found)
                        self._report(found, verbosity=verbosity, as_json=json)
                    display.update(line)
        display.finish()
        unfixed = [problem for problem in stats.problems if not problem.fixed]
        summary = (
            f"checked={stats.checked} ok={stats.ok} missing={stats.count(MISSING)} "
            f"size={stats.count(SIZE)} checksum={stats.count(CHECKSUM)} "
            f"errors={stats.count(ERROR)} unverifiable={stats.unverifiable} "
            f"fixed={stats.fixed}"
        )
        logger.info("verified %s", summary)
        if json:
            payload = asdict(stats)
            payload |= {
                "missing": stats.count(MISSING),
                "size_mismatches": stats.count(SIZE),
                "checksum_mismatches": stats.count(CHECKSUM),
                "errors": stats.count(ERROR),
                "unfixed": len(unfixed),
            }
            write_json(self, payload)
        elif verbosity > 0:
            self.stdout.write(summary)
        if unfixed:
            hint = "" if fix else "; --fix re-queues those with a local copy"
            raise AttentionNeeded(
                f"{len(unfixed)} transfer(s) recorded as done do not match the "
                f"remote{hint}."
            )

    def _check(self, row: PendingTransfer) -> Problem | None:
        try:
            return self._compare(row)
        except Exception as exc:
            try:
                storage = registry.get(row.storage_key)
            except registry.KeyConflict:
                storage = None  # the conflict is the error reported
            return Problem(row.storage_key, row.name, ERROR, error_text(storage, exc))

    def _compare(self, row: PendingTransfer) -> Problem | None:
        storage = registry.get(row.storage_key)
        if storage is None:
            return Problem(
                row.storage_key,
                row.name,
                "unverifiable",
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
        if not self.with_checksum:
            return None
        expected = row.checksum
        if not expected:
            if not storage.local.exists(row.name):
                return Problem(
                    row.storage_key,
                    row.name,
                    "unverifiable",
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

    def _fix(self, row: PendingTransfer, problem: Problem) -> None:
        storage = registry.get(row.storage_key)
        if storage is None:
            return
        if local_copy_elsewhere(storage, row):
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
        if row.requeue_unverified(VerificationFailed(problem.detail)):
            problem.fixed = True
            logger.warning(
                "requeued unverified key=%s name=%s problem=%s",
                row.storage_key,
                row.name,
                problem.problem,
            )
        else:
            problem.detail += "; the row changed meanwhile"

    def _report(self, problem: Problem, *, verbosity: int, as_json: bool) -> None:
        if as_json or verbosity == 0:
            return
        outcome = " (re-queued)" if problem.fixed else ""
        self.stdout.write(
            f"{problem.problem.upper()} key={problem.key} name={problem.name}: "
            f"{problem.detail}{outcome}"
        )


def _local_size(storage: QueuedStorage, name: str) -> str:
    """``, the local file N`` when a local copy is left to compare with."""
    try:
        return f", the local file {storage.local.size(name)}"
    except Exception:
        return ""
