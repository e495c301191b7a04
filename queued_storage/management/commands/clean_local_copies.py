"""Remove local copies of files that have been on the remote, verified and recorded
as done, for a while. Nothing else is ever removed."""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.utils import timezone

from queued_storage import registry
from queued_storage.backends import QueuedStorage
from queued_storage.management.cli import (
    AttentionNeeded,
    Progress,
    add_batch_size_argument,
    add_output_arguments,
    add_storage_filter,
    check_storage_keys,
    counters_line,
    duration,
    error_text,
    human_bytes,
    in_batches,
    local_copy_elsewhere,
    of_storages,
    write_json,
)
from queued_storage.models import PendingTransfer
from queued_storage.names import misspelling
from queued_storage.tombstones import delete_local_copy

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
    checked: int = 0
    removed: int = 0
    bytes: int = 0
    absent: int = 0
    changed: int = 0
    other_host: int = 0
    unknown_storage: int = 0
    unverified: int = 0
    errors: int = 0


class Command(BaseCommand):
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
        cutoff = timezone.now() - older_than
        rows = of_storages(
            PendingTransfer.objects.done().live().filter(transferred_at__lte=cutoff),
            keys,
        )
        self.stats = CleanStats()
        self.check_remote = check_remote
        self.dry_run = dry_run
        self.talk = verbosity > 1 and not json
        display = Progress(
            self, verbosity=verbosity, as_json=json, live=progress, every=progress_every
        )
        for batch in in_batches(rows, size=batch_size, fields=CLEAN_FIELDS):
            for row in batch:
                self.stats.checked += 1
                self._clean(row)
                display.update(self._line)
        display.finish()
        logger.info(
            "cleaned local copies dry_run=%s older_than=%ss %s",
            dry_run,
            int(older_than.total_seconds()),
            self._line(),
        )
        if json:
            write_json(self, {"dry_run": dry_run} | asdict(self.stats))
        elif verbosity > 0:
            verb = "Would remove" if dry_run else "Removed"
            self.stdout.write(
                f"{verb} {self.stats.removed} local copies "
                f"({human_bytes(self.stats.bytes)}): {self._line()}"
            )
        trouble = self.stats.unverified + self.stats.errors
        if trouble:
            raise AttentionNeeded(
                f"{trouble} local copies were kept: their remote copy could not be "
                "verified or the removal failed (run with -v 2 for the names)."
            )

    def _line(self) -> str:
        return counters_line(self.stats)

    def _say(self, what: str, row: PendingTransfer, why: str) -> None:
        if self.talk:
            self.stdout.write(
                f"{what} key={row.storage_key} name={row.name}: {why}".rstrip(": ")
            )

    def _clean(self, row: PendingTransfer) -> None:
        storage = registry.get(row.storage_key)
        if storage is None:
            self.stats.unknown_storage += 1
            return
        if local_copy_elsewhere(storage, row):
            self.stats.other_host += 1  # that host's own run cleans it
            return
        wrong = misspelling(row.name)
        if wrong is not None:
            self.stats.errors += 1
            self._say("kept", row, wrong)
            return
        try:
            self._clean_copy(storage, row)
        except Exception as exc:
            self.stats.errors += 1
            self._say("error", row, error_text(storage, exc))

    def _clean_copy(self, storage: QueuedStorage, row: PendingTransfer) -> None:
        local = storage.local
        if not local.exists(row.name):
            self.stats.absent += 1
            return
        if row.size is None:
            # An adopted file whose size its adoption has not read yet: nothing
            # has checked the remote copy against anything.
            self.stats.unverified += 1
            self._say("kept", row, "not verified yet: run adopt_remote_files")
            return
        size = local.size(row.name)
        if size != row.size or self._changed_since(storage, row):
            # Written again after the transfer: not the copy the remote has.
            self.stats.changed += 1
            self._say("kept", row, "the local file changed after the transfer")
            return
        if self.check_remote:
            remote = storage.remote
            if not remote.exists(row.name) or remote.size(row.name) != size:
                self.stats.unverified += 1
                self._say(
                    "kept",
                    row,
                    "the remote copy is missing or has another size (see "
                    "verify_transfers)",
                )
                return
        # The row is checked again at the last moment, under its lock: a re-save
        # or delete of the name since the batch was read leaves the file alone.
        if self.dry_run:
            kept = not row.while_done().exists()
        else:
            kept = not delete_local_copy(storage, row.name, row.while_done())
        if kept:
            self.stats.changed += 1
            return
        if not self.dry_run:
            logger.info(
                "local copy removed key=%s name=%s bytes=%s",
                row.storage_key,
                row.name,
                size,
            )
        self.stats.removed += 1
        self.stats.bytes += size
        self._say("would remove" if self.dry_run else "removed", row, "")

    @staticmethod
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
