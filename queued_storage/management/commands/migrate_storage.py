"""Move a storage's files to the remote of its serving mirror: backfill the
mirror, paced, watch the copies until every file is verified there, then print
the configuration to switch to. Resumable by running it again. After the
switch, ``--finish OLD_KEY`` carries over what the old configuration saved
late, and drops the old key's rows."""

from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError, CommandParser

from queued_storage.management.cli import (
    EXIT_ERROR,
    AttentionNeeded,
    LedgerCommand,
    Progress,
    UsageError,
    add_batch_size_argument,
    add_output_arguments,
    add_pacing_arguments,
    mirror_names,
    mirrored_storage,
    write_json,
)
from queued_storage.migration import MigrationProgress
from queued_storage.migration_finish import (
    CannotFinish,
    FinishCounts,
    finish_line,
    finish_migration,
    left_behind,
)
from queued_storage.mirror_backfill import DEFAULT_PAGE_SIZE
from queued_storage.storage_migration import NotServing, StorageMigration

#: --check: the migration is not ready to switch yet.
EXIT_NOT_READY = 1


class Command(LedgerCommand):
    help = (
        "Move the files of the storage KEY to the remote of its serving mirror "
        "NAME: queue the copy of each file the new remote lacks (paced by "
        "--max-rate and --max-files; the workers copy them), wait until every "
        "file is verified there, and print the STORAGES entry to switch to. "
        "Interrupted, it resumes when run again. --check only reports: exit "
        "status 0 when ready to switch, 1 when not. Otherwise 1 when "
        "interrupted, 2 for bad arguments, 3 when files need a person (failed "
        "copies). After the switch, once: migrate_storage NEW_KEY --finish "
        "OLD_KEY queues the copy of the files saved on the old configuration "
        "since (from their local copies) and drops the old key's rows; 3 when "
        "rows are left (files only on the old remote, on another host's disk: "
        "run it there, or being copied: run it again)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("key", metavar="KEY", help="The storage's key.")
        way = parser.add_mutually_exclusive_group(required=True)
        way.add_argument(
            "--mirror",
            metavar="NAME",
            help="The serving mirror whose remote the files move to.",
        )
        way.add_argument(
            "--finish",
            metavar="OLD_KEY",
            help="After the switch (every host runs the new configuration, whose "
            "key KEY is): queue the copy of each file only the old key OLD_KEY "
            "has a row of, from its local copy, and drop the old key's rows.",
        )
        parser.add_argument(
            "--check",
            action="store_true",
            help="Only report the progress: exit 0 when ready to switch, 1 when not.",
        )
        add_pacing_arguments(parser, wait_help="Seconds between looks at the copies")
        add_batch_size_argument(
            parser, default=DEFAULT_PAGE_SIZE, what="Files read per query"
        )
        add_output_arguments(parser, progress=True)

    def handle(
        self,
        *,
        key: str,
        mirror: str | None,
        finish: str | None,
        max_rate: float | None,
        max_files: float | None,
        check: bool,
        wait_every: float,
        batch_size: int,
        json: bool,
        progress: bool | None,
        progress_every: float,
        verbosity: int,
        **options: Any,
    ) -> None:
        if finish is not None:
            if check or max_rate is not None or max_files is not None:
                raise UsageError(
                    "--finish takes none of --check, --max-rate, --max-files."
                )
            try:
                counts = finish_migration(key, finish, page_size=batch_size)
            except CannotFinish as refused:
                raise UsageError(str(refused)) from None
            self._report_finish(key, finish, counts, as_json=json, verbosity=verbosity)
            if counts.left_behind:
                raise AttentionNeeded(left_behind(finish, counts))
            return
        assert mirror is not None  # one of --mirror and --finish is required
        storage = mirrored_storage(key)
        [name] = mirror_names(storage, [mirror])
        try:
            migration = StorageMigration(
                storage,
                name,
                max_rate=max_rate,
                max_files=max_files,
                page_size=batch_size,
            )
        except NotServing as refused:
            raise UsageError(str(refused)) from None
        # Progress goes to stderr whatever stdout carries.
        display = Progress(
            self, verbosity=verbosity, as_json=True, live=progress, every=progress_every
        )
        if check:
            found = migration.progress()
        else:
            try:
                found = migration.run(
                    wait_every,
                    lambda: display.update(lambda: migration.progress().line()),
                )
            except KeyboardInterrupt:
                display.finish()
                raise CommandError(
                    f"Interrupted: {migration.progress().line()}; run the same "
                    "command again to resume.",
                    returncode=EXIT_ERROR,
                ) from None
            display.finish()
        self._report(migration, found, as_json=json, verbosity=verbosity, check=check)
        if found.ready:
            return
        if check:
            raise CommandError(
                f"Not ready to switch: {found.line()}.", returncode=EXIT_NOT_READY
            )
        raise AttentionNeeded(_what_to_do(migration, found))

    def _report_finish(
        self,
        key: str,
        old_key: str,
        counts: FinishCounts,
        *,
        as_json: bool,
        verbosity: int,
    ) -> None:
        if as_json:
            write_json(self, {"storage": key, "finished": old_key, **counts.as_dict()})
        elif verbosity > 0:
            self.stdout.write(finish_line(key, old_key, counts))

    def _report(
        self,
        migration: StorageMigration,
        found: MigrationProgress,
        *,
        as_json: bool,
        verbosity: int,
        check: bool,
    ) -> None:
        if as_json:
            payload: dict[str, Any] = {
                "storage": migration.storage.key,
                "mirror": migration.mirror_name,
                "mirror_key": migration.mirror_key,
                "ready": found.ready,
                "progress": found.as_dict(),
                "switch_to": migration.switch_to(),
            }
            if not check:
                payload["queued"] = migration.queued.as_dict()
            write_json(self, payload)
            return
        if verbosity == 0:
            return
        self.stdout.write(f"{found.line()}.")
        if not found.ready:
            self.stdout.write(
                f"Not ready to switch: copying={found.copying} "
                f"failed={found.failed} on_its_way={found.on_its_way} "
                f"blocked={found.blocked} missing={found.missing}"
            )
            return
        self.stdout.write(
            "Ready to switch. Replace the storage's entry in settings.STORAGES "
            "with:\n\n" + migration.switch_to() + "\n"
        )


def _what_to_do(migration: StorageMigration, found: MigrationProgress) -> str:
    parts = []
    if found.failed:
        parts.append(
            f"{found.failed} copies to {migration.mirror_key} failed: see their "
            "errors in the admin, re-queue them (requeue_transfers --storage "
            f"{migration.mirror_key})"
        )
    if found.blocked:
        parts.append(
            f"{found.blocked} files did not reach the old remote (failed or held "
            f"rows of {migration.storage.key}): re-queue or transfer them"
        )
    if not parts:
        parts.append(f"{found.missing} files have no copy queued")
    return "; ".join(parts) + "; then run this command again."
