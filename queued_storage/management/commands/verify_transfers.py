"""Reconcile the ledger with the remote: every row recorded as done should have its
object on the remote, with the right size (and content, with --checksum)."""

from __future__ import annotations

import logging
import time
from typing import Any

from django.core.management.base import CommandParser

from queued_storage.management.cli import (
    AttentionNeeded,
    LedgerCommand,
    Progress,
    add_batch_size_argument,
    add_output_arguments,
    add_storage_filter,
    check_storage_keys,
    eta,
    of_storages,
    positive_int,
    write_json,
)
from queued_storage.models import PendingTransfer
from queued_storage.verification import (
    DEFAULT_BATCH_SIZE,
    UNVERIFIABLE,
    Problem,
    VerifyStats,
    rows_to_verify,
    verify,
)

logger = logging.getLogger("queued_storage")


class Command(LedgerCommand):
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
        rows = of_storages(rows_to_verify(), keys)
        total = rows.count()
        display = Progress(
            self, verbosity=verbosity, as_json=json, live=progress, every=progress_every
        )
        started = time.monotonic()
        talk = verbosity > 0 and not json

        def checked(
            row: PendingTransfer, found: Problem | None, stats: VerifyStats
        ) -> None:
            if found is not None and found.problem == UNVERIFIABLE:
                if talk and verbosity > 1:
                    self.stdout.write(
                        f"unverifiable key={found.key} name={found.name}: "
                        f"{found.detail}"
                    )
            elif found is not None and talk:
                outcome = " (re-queued)" if found.fixed else ""
                self.stdout.write(
                    f"{found.problem.upper()} key={found.key} name={found.name}: "
                    f"{found.detail}{outcome}"
                )
            display.update(
                lambda: (
                    f"{stats.checked}/{total} checked  ok {stats.ok}  "
                    f"mismatched {len(stats.problems)}  "
                    f"ETA {eta(stats.checked, total, time.monotonic() - started)}"
                )
            )

        stats = verify(
            rows,
            checksum=checksum,
            fix=fix,
            concurrency=concurrency,
            batch_size=batch_size,
            checked=checked,
        )
        display.finish()
        logger.info("verified %s", stats.summary())
        if json:
            write_json(self, stats.as_dict())
        elif verbosity > 0:
            self.stdout.write(stats.summary())
        unfixed = stats.unfixed
        if unfixed:
            hint = "" if fix else "; --fix re-queues those with a local copy"
            raise AttentionNeeded(
                f"{len(unfixed)} transfer(s) recorded as done do not match the "
                f"remote{hint}."
            )
