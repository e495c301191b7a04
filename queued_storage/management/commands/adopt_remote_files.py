"""Adoption: give every file a storage's remote holds that has no ledger row (a 0.8
site's transferred files) a done row, then mark the storage adopted. Batched, and
resumable by running it again."""

from __future__ import annotations

import logging
from typing import Any

from django.core.management.base import CommandError, CommandParser

from queued_storage import adoption
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

logger = logging.getLogger("queued_storage")


class Command(LedgerCommand):
    help = (
        "Record the files a storage's remote already holds (files saved before the "
        "ledger, e.g. by django-queued-storage 0.8) as transferred, in batches, then "
        "mark the storage adopted: from then on no save asks the remote whether a "
        "name is taken. Interrupted, it continues where it stopped when run again. "
        "--new declares a storage whose remote holds nothing from before adopted "
        "without listing it. Exit status 1 when interrupted or failed, 2 for bad "
        "arguments."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--new",
            action="store_true",
            help="Declare the storage adopted without listing its remote: it holds "
            "no file from before the ledger (a new site).",
        )
        add_one_storage_arguments(
            parser,
            verb="adopt",
            batch_size=adoption.DEFAULT_BATCH_SIZE,
            batch_what="Remote files per ledger batch",
            dry_run_help="List the remote and count what would be recorded; write "
            "nothing.",
        )

    def handle(
        self,
        *,
        storage: str | None,
        batch_size: int,
        new: bool,
        dry_run: bool,
        json: bool,
        progress: bool | None,
        progress_every: float,
        verbosity: int,
        **options: Any,
    ) -> None:
        queued_storage = one_storage(storage, verb="adopt")
        if new and dry_run:
            raise UsageError(
                "--new writes nothing but the declaration: drop --dry-run."
            )
        if new:
            adoption.mark_adopted(queued_storage.key)
            logger.info("adoption declared key=%s new=True", queued_storage.key)
            if json:
                write_json(
                    self,
                    {"storage": queued_storage.key, "adopted": True, "new": True},
                )
            elif verbosity > 0:
                self.stdout.write(
                    f"Declared {queued_storage.key!r} adopted: its remote holds no "
                    "file from before the ledger."
                )
            return
        adopting = adoption.Adoption(
            queued_storage, dry_run=dry_run, skipped=self._skipped
        )

        def line() -> str:
            return counters_line(adopting.counts)

        display = Progress(
            self, verbosity=verbosity, as_json=json, live=progress, every=progress_every
        )
        if adopting.resumed_after and verbosity > 0:
            self.stderr.write(f"resuming after {adopting.resumed_after!r}")
        try:
            adopting.run(batch_size, after_batch=lambda: display.update(line))
        except NotImplementedError as exc:
            raise CommandError(
                f"The remote of {queued_storage.key!r} cannot list its files. If it "
                "holds none from before the ledger, declare it with --new.",
                returncode=EXIT_ERROR,
            ) from exc
        except KeyboardInterrupt:
            display.finish()
            raise CommandError(
                f"Interrupted ({line()}); run the same command again to resume.",
                returncode=EXIT_ERROR,
            ) from None
        display.finish()
        logger.info(
            "adoption key=%s dry_run=%s %s", queued_storage.key, dry_run, line()
        )
        if json:
            write_json(
                self,
                {
                    "storage": queued_storage.key,
                    "dry_run": dry_run,
                    "adopted": not dry_run,
                    "resumed_after": adopting.resumed_after or None,
                }
                | adopting.counts.as_dict(),
            )
        elif verbosity > 0:
            if dry_run:
                self.stdout.write(f"Would record: {line()}")
            else:
                self.stdout.write(
                    f"Recorded: {line()}; {queued_storage.key!r} is adopted."
                )

    def _skipped(self, name: str, error: Exception) -> None:
        self.stderr.write(f"skipped {name!r}: {error}")
