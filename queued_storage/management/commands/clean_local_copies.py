"""Remove local copies of files that have been on the remote, verified and recorded
as done, for a while. Nothing else is ever removed."""

from __future__ import annotations

import argparse
import logging
from datetime import timedelta
from typing import Any

from django.core.management.base import CommandParser

from queued_storage.local_copies import (
    DEFAULT_BATCH_SIZE,
    Cleaned,
    CleanStats,
    clean_local_copies,
    rows_to_clean,
)
from queued_storage.management.cli import (
    AttentionNeeded,
    LedgerCommand,
    Progress,
    add_batch_size_argument,
    add_output_arguments,
    add_storage_filter,
    check_storage_keys,
    counters_line,
    duration,
    human_bytes,
    of_storages,
    write_json,
)
from queued_storage.models import PendingTransfer

logger = logging.getLogger("queued_storage")


class Command(LedgerCommand):
    help = (
        "Delete the local copies of files recorded as done for at least "
        "--older-than, after checking that the local file is the one transferred "
        "and (by default) that the remote still has it. Exit status 3 when a file "
        "could not be checked or removed."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--older-than",
            type=duration,
            required=True,
            metavar="DURATION",
            help="Only files transferred at least this long ago (e.g. 3600, 12h, 7d).",
        )
        add_storage_filter(parser)
        parser.add_argument(
            "--check-remote",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="Check the remote copy's size before removing the local one "
            "(default: on).",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Show what would be removed; remove nothing.",
        )
        add_batch_size_argument(
            parser, default=DEFAULT_BATCH_SIZE, what="Rows read per query"
        )
        add_output_arguments(parser, progress=True)

    def handle(
        self,
        *,
        older_than: timedelta,
        storages: list[str] | None,
        check_remote: bool,
        dry_run: bool,
        batch_size: int,
        json: bool,
        progress: bool | None,
        progress_every: float,
        verbosity: int,
        **options: Any,
    ) -> None:
        keys = check_storage_keys(storages)
        rows = of_storages(rows_to_clean(older_than), keys)
        talk = verbosity > 1 and not json
        display = Progress(
            self, verbosity=verbosity, as_json=json, live=progress, every=progress_every
        )

        def cleaned(row: PendingTransfer, outcome: Cleaned, stats: CleanStats) -> None:
            if talk and outcome.action:
                self.stdout.write(
                    f"{outcome.action} key={row.storage_key} name={row.name}: "
                    f"{outcome.reason}".rstrip(": ")
                )
            display.update(lambda: counters_line(stats))

        stats = clean_local_copies(
            rows,
            check_remote=check_remote,
            dry_run=dry_run,
            batch_size=batch_size,
            cleaned=cleaned,
        )
        display.finish()
        logger.info(
            "cleaned local copies dry_run=%s older_than=%ss %s",
            dry_run,
            int(older_than.total_seconds()),
            counters_line(stats),
        )
        if json:
            write_json(self, {"dry_run": dry_run} | stats.as_dict())
        elif verbosity > 0:
            verb = "Would remove" if dry_run else "Removed"
            self.stdout.write(
                f"{verb} {stats.removed} local copies "
                f"({human_bytes(stats.bytes)}): {counters_line(stats)}"
            )
        if stats.kept_in_doubt:
            raise AttentionNeeded(
                f"{stats.kept_in_doubt} local copies were kept: their remote copy "
                "could not be verified or the removal failed (run with -v 2 for the "
                "names)."
            )
