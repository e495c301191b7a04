"""Backfill: give every file in a storage's local storage that has no ledger row one,
so that the worker moves it. Batched, and resumable by running it again."""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from django.core.exceptions import SuspiciousFileOperation
from django.core.files.storage import Storage
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from queued_storage import redaction, registry
from queued_storage.backends import QueuedStorage
from queued_storage.conf import settings as conf
from queued_storage.management.cli import (
    EXIT_ERROR,
    Progress,
    UsageError,
    add_batch_size_argument,
    add_output_arguments,
    counters_line,
    write_json,
)
from queued_storage.models import PendingTransfer, name_hash
from queued_storage.names import canonical_directory, canonical_name

logger = logging.getLogger("queued_storage")

DEFAULT_BATCH_SIZE = 500


@dataclass
class BackfillStats:
    scanned: int = 0
    queued: int = 0
    done: int = 0
    existing: int = 0
    conflicts: int = 0
    invalid: int = 0
    vanished: int = 0


def walk(storage: Storage, top: str) -> Iterator[str]:
    """Every file name under ``top``, depth first, each directory in sorted order.

    A missing ``top`` raises FileNotFoundError; a subdirectory removed while the
    walk runs is skipped."""
    dirs, files = storage.listdir(top)
    for file_name in sorted(files):
        yield posixpath.join(top, file_name) if top else file_name
    for dir_name in sorted(dirs):
        try:
            yield from walk(storage, posixpath.join(top, dir_name) if top else dir_name)
        except FileNotFoundError:
            continue


def pick_storage(key: str | None) -> QueuedStorage:
    known = registry.known_keys()
    if key is None:
        if len(known) == 1:
            key = known[0]
        else:
            raise UsageError(
                "Name the storage to backfill with --storage KEY. Known keys: "
                f"{', '.join(known) or 'none'}."
            )
    storage = registry.get(key)
    if storage is None:
        raise UsageError(
            f"Unknown storage key: {key}. Known keys: {', '.join(known) or 'none'}."
        )
    return storage


class Command(BaseCommand):
    help = (
        "Create ledger rows for the files in a storage's local storage that have "
        "none (files saved before the app was installed, or lost rows), in batches. "
        "Interrupted, it resumes where it stopped when run again. Exit status 1 "
        "when interrupted, 2 for bad arguments."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--storage",
            metavar="KEY",
            help="The storage to backfill (needed when there is more than one).",
        )
        parser.add_argument(
            "--prefix",
            default="",
            metavar="PATH",
            help="Only files in this directory of the local storage, and below.",
        )
        add_batch_size_argument(
            parser, default=DEFAULT_BATCH_SIZE, what="Files per ledger round trip"
        )
        parser.add_argument(
            "--check-remote",
            action="store_true",
            help="Ask the remote for each file: one it already has with the same "
            "size is recorded as done instead of queued (after a move from 0.8).",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Count what would be queued; write nothing.",
        )
        add_output_arguments(parser, progress=True)

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
        queued_storage = pick_storage(storage)
        try:
            top = canonical_directory(prefix)
        except (ValueError, SuspiciousFileOperation) as exc:
            raise UsageError(f"--prefix {prefix!r}: {exc}") from exc
        self.storage = queued_storage
        self.check_remote = check_remote
        self.dry_run = dry_run
        self.stats = BackfillStats()
        display = Progress(
            self, verbosity=verbosity, as_json=json, live=progress, every=progress_every
        )
        batch: list[str] = []
        try:
            for name in walk(queued_storage.local, top):
                self.stats.scanned += 1
                batch.append(name)
                if len(batch) >= batch_size:
                    self._record(batch)
                    batch = []
                    display.update(self._line)
            if batch:
                self._record(batch)
        except FileNotFoundError as exc:
            if self.stats.scanned == 0:
                raise UsageError(
                    f"The local storage of {queued_storage.key!r} has no directory "
                    f"{top!r}."
                ) from exc
            redaction.scrub(queued_storage, exc)
            raise
        except KeyboardInterrupt:
            display.finish()
            raise CommandError(
                f"Interrupted after {self.stats.scanned} files ({self._line()}); "
                "run the same command again to resume.",
                returncode=EXIT_ERROR,
            ) from None
        except Exception as exc:
            # The walk and the remote checks call the storages themselves, not
            # through the queued storage's methods, which redact what they raise.
            redaction.scrub(queued_storage, exc)
            raise
        display.finish()
        logger.info(
            "backfill key=%s prefix=%s dry_run=%s %s",
            queued_storage.key,
            top,
            dry_run,
            self._line(),
        )
        if json:
            write_json(
                self,
                {"storage": queued_storage.key, "dry_run": dry_run}
                | asdict(self.stats),
            )
        elif verbosity > 0:
            verb = "Would record" if dry_run else "Recorded"
            self.stdout.write(f"{verb}: {self._line()}")

    def _line(self) -> str:
        return counters_line(self.stats)

    def _record(self, names: list[str]) -> None:
        storage = self.storage
        valid: dict[str, str] = {}
        for name in names:
            try:
                canonical = canonical_name(name)
                if canonical != name:
                    # A row under this spelling would be a second row for the
                    # file that the storage reads it as.
                    raise SuspiciousFileOperation(
                        f"the storage reads this name as {canonical!r}; rename the file"
                    )
            except (ValueError, SuspiciousFileOperation) as exc:
                self.stats.invalid += 1
                self.stderr.write(f"skipped {name!r}: {exc}")
                continue
            valid[name_hash(name)] = name
        known = set(
            PendingTransfer.objects.filter(
                storage_key=storage.key, name_hash__in=list(valid)
            ).values_list("name_hash", flat=True)
        )
        self.stats.existing += len(known)
        now = timezone.now()
        host = conf.QUEUED_STORAGE_HOSTNAME
        rows = []
        for digest, name in valid.items():
            if digest in known:
                continue
            try:
                size = storage.local.size(name)
            except FileNotFoundError:
                self.stats.vanished += 1  # deleted since the listing
                continue
            row = PendingTransfer(
                storage_key=storage.key,
                name=name,
                name_hash=digest,
                size=size,
                host=host,
                created_at=now,
                updated_at=now,
            )
            if self.check_remote and storage.remote.exists(name):
                if storage.remote.size(name) == size:
                    row.status = PendingTransfer.Status.DONE
                    row.remote_owned = True
                    row.transferred_at = now
                    self.stats.done += 1
                    rows.append(row)
                    continue
                # Not ours and not the same file: the engine reports it, never
                # overwrites it (see the remote conflict in the README).
                self.stats.conflicts += 1
            if storage.delayed:
                row.status = PendingTransfer.Status.HELD
            else:
                row.status = PendingTransfer.Status.QUEUED
                row.next_attempt_at = now
            self.stats.queued += 1
            rows.append(row)
        if rows and not self.dry_run:
            # A save of the same name may have won the race since the lookup: its
            # row stays, this one is dropped.
            PendingTransfer.objects.bulk_create(rows, ignore_conflicts=True)
