"""Adoption: give every file a storage's remote holds that has no ledger row (a 0.8
site's transferred files) a done row, then mark the storage adopted. Batched, and
resumable by running it again."""

from __future__ import annotations

import logging
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from queued_storage import adoption, redaction, registry
from queued_storage.backends import QueuedStorage
from queued_storage.management.cli import (
    EXIT_ERROR,
    Progress,
    UsageError,
    add_batch_size_argument,
    add_output_arguments,
    check_storage_keys,
    counters_line,
    write_json,
)

logger = logging.getLogger("queued_storage")

DEFAULT_BATCH_SIZE = 500


def pick_storage(key: str | None) -> QueuedStorage:
    if key is None:
        known = registry.known_keys()
        if len(known) != 1:
            raise UsageError(
                "Name the storage to adopt with --storage KEY. Known keys: "
                f"{', '.join(known) or 'none'}."
            )
        key = known[0]
    check_storage_keys([key])
    storage = registry.get(key)
    assert storage is not None  # check_storage_keys found it
    return storage


class Command(BaseCommand):
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
            "--storage",
            metavar="KEY",
            help="The storage to adopt (needed when there is more than one).",
        )
        add_batch_size_argument(
            parser, default=DEFAULT_BATCH_SIZE, what="Remote files per ledger batch"
        )
        parser.add_argument(
            "--new",
            action="store_true",
            help="Declare the storage adopted without listing its remote: it holds "
            "no file from before the ledger (a new site).",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="List the remote and count what would be recorded; write nothing.",
        )
        add_output_arguments(parser, progress=True)

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
        queued_storage = pick_storage(storage)
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
        self.run = adoption.Adoption(
            queued_storage, dry_run=dry_run, skipped=self._skipped
        )
        display = Progress(
            self, verbosity=verbosity, as_json=json, live=progress, every=progress_every
        )
        if self.run.resumed_after and verbosity > 0:
            self.stderr.write(f"resuming after {self.run.resumed_after!r}")
        try:
            self._adopt(batch_size, display)
        except NotImplementedError as exc:
            raise CommandError(
                f"The remote of {queued_storage.key!r} cannot list its files. If it "
                "holds none from before the ledger, declare it with --new.",
                returncode=EXIT_ERROR,
            ) from exc
        except KeyboardInterrupt:
            display.finish()
            raise CommandError(
                f"Interrupted ({self._line()}); run the same command again to resume.",
                returncode=EXIT_ERROR,
            ) from None
        except Exception as exc:
            # The listing and the sizes come from the remote itself, not through
            # the queued storage's methods, which redact what they raise.
            redaction.scrub(queued_storage, exc)
            raise
        display.finish()
        logger.info(
            "adoption key=%s dry_run=%s %s", queued_storage.key, dry_run, self._line()
        )
        if json:
            write_json(
                self,
                {
                    "storage": queued_storage.key,
                    "dry_run": dry_run,
                    "adopted": not dry_run,
                    "resumed_after": self.run.resumed_after or None,
                }
                | self.run.counts.as_dict(),
            )
        elif verbosity > 0:
            if dry_run:
                self.stdout.write(f"Would record: {self._line()}")
            else:
                self.stdout.write(
                    f"Recorded: {self._line()}; {queued_storage.key!r} is adopted."
                )

    def _adopt(self, batch_size: int, display: Progress) -> None:
        batch: list[str] = []
        for name in self.run.names():
            batch.append(name)
            if len(batch) >= batch_size:
                self.run.record(batch)
                batch = []
                display.update(self._line)
        if batch:
            self.run.record(batch)
        self.run.finish()

    def _line(self) -> str:
        return counters_line(self.run.counts)

    def _skipped(self, name: str, error: Exception) -> None:
        self.stderr.write(f"skipped {name!r}: {error}")
