"""Backfill mirrors: queue a copy on a storage's mirrors of each file it has
transferred, paced, and optionally wait until the copies are done. Resumable
by running it again."""

from __future__ import annotations

import logging
from typing import Any

from django.core.management.base import CommandError, CommandParser

from queued_storage.management.cli import (
    EXIT_ERROR,
    AttentionNeeded,
    LedgerCommand,
    Progress,
    add_batch_size_argument,
    add_output_arguments,
    add_pacing_arguments,
    counters_line,
    human_bytes,
    mirror_names,
    mirrored_storage,
    write_json,
)
from queued_storage.mirror_backfill import DEFAULT_PAGE_SIZE, MirrorBackfill, Waiting

logger = logging.getLogger("queued_storage")


class Command(LedgerCommand):
    help = (
        "Queue a copy on the mirrors of the storage KEY of each file it has "
        "transferred whose copy there is missing or of another version, paced by "
        "--max-rate and --max-files; with --wait, wait until the copies are done. "
        "Interrupted, it resumes when run again. Exit status 1 when interrupted, "
        "2 for bad arguments, 3 when --wait found failed copies."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("key", metavar="KEY", help="The storage's key.")
        parser.add_argument(
            "--mirror",
            action="append",
            dest="mirrors",
            metavar="NAME",
            help="Only this mirror (repeatable; default: every mirror).",
        )
        parser.add_argument(
            "--wait",
            action="store_true",
            help="Then wait, showing progress, until every copy is done or failed.",
        )
        add_pacing_arguments(parser, wait_help="Seconds between looks while waiting")
        add_batch_size_argument(
            parser, default=DEFAULT_PAGE_SIZE, what="Files read per query"
        )
        add_output_arguments(parser, progress=True)

    def handle(
        self,
        *,
        key: str,
        mirrors: list[str] | None,
        max_rate: float | None,
        max_files: float | None,
        wait: bool,
        wait_every: float,
        batch_size: int,
        json: bool,
        progress: bool | None,
        progress_every: float,
        verbosity: int,
        **options: Any,
    ) -> None:
        storage = mirrored_storage(key)
        names = mirror_names(storage, mirrors)
        backfill = MirrorBackfill(
            storage, names, max_rate=max_rate, max_files=max_files, page_size=batch_size
        )
        display = Progress(
            self, verbosity=verbosity, as_json=json, live=progress, every=progress_every
        )
        counts = backfill.counts

        def line() -> str:
            return (
                f"{counts.scanned}/{counts.total} files {counters_line(counts)} "
                f"({human_bytes(counts.bytes)} queued)"
            )

        waiting: Waiting | None = None
        try:
            backfill.run(after_chunk=lambda: display.update(line))
            display.finish()
            logger.info("mirror backfill key=%s mirrors=%s %s", key, names, line())
            if wait:
                waiting = looking = Waiting(storage, names)
                waiting.wait(
                    wait_every, lambda: display.update(lambda: waiting_line(looking))
                )
                display.finish()
        except KeyboardInterrupt:
            display.finish()
            raise CommandError(
                f"Interrupted after {counts.scanned} files ({line()}); run the same "
                "command again to resume.",
                returncode=EXIT_ERROR,
            ) from None
        if json:
            payload: dict[str, Any] = {"storage": key, "mirrors": names}
            payload |= counts.as_dict()
            if waiting is not None:
                payload["copies"] = waiting.counts
            write_json(self, payload)
        elif verbosity > 0:
            self.stdout.write(f"Queued: {line()}")
            if waiting is not None:
                self.stdout.write(f"Copies: {waiting_line(waiting)}")
        if waiting is not None and waiting.failed:
            raise AttentionNeeded(
                f"{waiting.failed} copies failed: see their errors in the admin, "
                "re-queue them (requeue_transfers --storage MIRROR-KEY) and run this "
                "command again."
            )


def waiting_line(waiting: Waiting) -> str:
    return " ".join(
        f"{name}: done={counts['done']} failed={counts['failed']} "
        f"pending={counts['pending']}"
        for name, counts in waiting.counts.items()
    )
