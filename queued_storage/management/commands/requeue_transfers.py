"""Put failed rows (or held or waiting ones, narrowed by storage, error text and
age) back in the queue, due now with their attempts reset."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from django.core.management.base import CommandParser
from django.utils import timezone

from queued_storage.management.cli import (
    LedgerCommand,
    UsageError,
    add_output_arguments,
    add_storage_filter,
    check_storage_keys,
    duration,
    of_storages,
    write_json,
)
from queued_storage.models import REQUEUEABLE, PendingTransfer

logger = logging.getLogger("queued_storage")

Status = PendingTransfer.Status


class Command(LedgerCommand):
    help = (
        "Re-queue failed transfers: due now, attempts reset. Narrow with --storage, "
        "--error and --older-than; --status held or queued takes those rows instead. "
        "Exit status 2 for bad arguments."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--status",
            action="append",
            dest="statuses",
            choices=REQUEUEABLE,
            help="Rows in this status (repeatable; default: failed).",
        )
        add_storage_filter(parser)
        parser.add_argument(
            "--error",
            metavar="TEXT",
            help="Only rows whose last error contains TEXT (case-insensitive).",
        )
        parser.add_argument(
            "--older-than",
            type=duration,
            metavar="DURATION",
            help="Only rows unchanged for at least this long (e.g. 3600, 30m, 2d).",
        )
        parser.add_argument(
            "--newer-than",
            type=duration,
            metavar="DURATION",
            help="Only rows changed within this long (e.g. 1h).",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Count the rows that would be re-queued; change nothing.",
        )
        add_output_arguments(parser, progress=False)

    def handle(
        self,
        *,
        statuses: list[str] | None,
        storages: list[str] | None,
        error: str | None,
        older_than: timedelta | None,
        newer_than: timedelta | None,
        dry_run: bool,
        json: bool,
        verbosity: int,
        **options: Any,
    ) -> None:
        keys = check_storage_keys(storages)
        if error is not None and not error.strip():
            raise UsageError("--error needs some text to look for.")
        now = timezone.now()
        rows = of_storages(
            PendingTransfer.objects.filter(
                status__in=statuses or [Status.FAILED.value]
            ),
            keys,
        )
        if error:
            rows = rows.filter(last_error__icontains=error)
        if older_than is not None:
            rows = rows.filter(updated_at__lte=now - older_than)
        if newer_than is not None:
            rows = rows.filter(updated_at__gte=now - newer_than)
        if dry_run:
            count = rows.requeueable().count()
        else:
            count = rows.requeue(now)
            logger.info(
                "requeued count=%s statuses=%s keys=%s error=%s",
                count,
                ",".join(statuses or [Status.FAILED.value]),
                ",".join(keys) or "*",
                error or "",
            )
        if json:
            write_json(self, {"requeued": 0 if dry_run else count, "matched": count})
        elif verbosity > 0:
            if dry_run:
                self.stdout.write(f"Would re-queue {count} transfer(s) (dry run).")
            else:
                self.stdout.write(
                    f"Re-queued {count} transfer(s); process_transfers takes them next."
                )
