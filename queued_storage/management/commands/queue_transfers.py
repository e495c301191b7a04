"""Backfill: give every file in a storage's local storage that has no ledger row one,
so that the worker moves it. Batched, and resumable by running it again."""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import SuspiciousFileOperation
from django.core.management.base import CommandError, CommandParser

from queued_storage.backfill import DEFAULT_BATCH_SIZE, Backfill
from queued_storage.management.cli import (
    EXIT_ERROR,
    LedgerCommand,
    Progress,
    UsageError,
    add_one_storage_arguments,
    counters_line,
    one_storage,
    write_json,
)
from queued_storage.names import canonical_directory

logger = logging.getLogger("queued_storage")


class Command(LedgerCommand):
    help = (
        "Create ledger rows for the files in a storage's local storage that have "
        "none (files saved before the app was installed, or lost rows), in batches. "
        "Interrupted, it resumes where it stopped when run again. Exit status 1 "
        "when interrupted, 2 for bad arguments."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--prefix",
            default="",
            metavar="PATH",
            help="Only files in this directory of the local storage, and below.",
        )
        parser.add_argument(
            "--check-remote",
            action="store_true",
            help="Ask the remote for each file: one it already has with the same "
            "size is recorded as done instead of queued (after a move from 0.8).",
        )
        add_one_storage_arguments(
            parser,
            verb="backfill",
            batch_size=DEFAULT_BATCH_SIZE,
            batch_what="Files per ledger round trip",
            dry_run_help="Count what would be queued; write nothing.",
        )

    def handle(
        self,
        *,
        storage: str | None,
        prefix: str,
        batch_size: int,
        check_remote: bool,
        dry_run: bool,
        json: bool,
        progress: bool | None,
        progress_every: float,
        verbosity: int,
        **options: Any,
    ) -> None:
        queued_storage = one_storage(storage, verb="backfill")
        try:
            top = canonical_directory(prefix)
        except (ValueError, SuspiciousFileOperation) as exc:
            raise UsageError(f"--prefix {prefix!r}: {exc}") from exc
        backfill = Backfill(
            queued_storage,
            top=top,
            check_remote=check_remote,
            dry_run=dry_run,
            skipped=self._skipped,
        )

        def line() -> str:
            return counters_line(backfill.counts)

        display = Progress(
            self, verbosity=verbosity, as_json=json, live=progress, every=progress_every
        )
        try:
            backfill.run(batch_size, after_batch=lambda: display.update(line))
        except FileNotFoundError as exc:
            if backfill.counts.scanned == 0:
                raise UsageError(
                    f"The local storage of {queued_storage.key!r} has no directory "
                    f"{top!r}."
                ) from exc
            raise
        except KeyboardInterrupt:
            display.finish()
            raise CommandError(
                f"Interrupted after {backfill.counts.scanned} files ({line()}); "
                "run the same command again to resume.",
                returncode=EXIT_ERROR,
            ) from None
        display.finish()
        logger.info(
            "backfill key=%s prefix=%s dry_run=%s %s",
            queued_storage.key,
            top,
            dry_run,
            line(),
        )
        if json:
            write_json(
                self,
                {"storage": queued_storage.key, "dry_run": dry_run}
                | backfill.counts.as_dict(),
            )
        elif verbosity > 0:
            verb = "Would record" if dry_run else "Recorded"
            self.stdout.write(f"{verb}: {line()}")

    def _skipped(self, name: str, error: Exception) -> None:
        self.stderr.write(f"skipped {name!r}: {error}")
