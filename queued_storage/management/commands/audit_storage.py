"""Audit a storage: its remote's files (and each mirror's), the ledger's rows and
the names the models' file fields reference, compared; --fix heals what is
safe, --delete-orphans deletes remote files nothing knows once older than
--grace. Resumable by running it again."""

from __future__ import annotations

import json as json_module
import logging
from typing import Any

from django.core.management.base import CommandError, CommandParser

from queued_storage.audit import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_GRACE,
    Audit,
    AuditOptions,
)
from queued_storage.audit_findings import AuditCounts, Finding
from queued_storage.audit_references import fields_of
from queued_storage.management.cli import (
    EXIT_ERROR,
    AttentionNeeded,
    LedgerCommand,
    Progress,
    UsageError,
    add_batch_size_argument,
    add_output_arguments,
    duration,
    one_storage,
)

logger = logging.getLogger("queued_storage")


class Command(LedgerCommand):
    help = (
        "Compare a storage's remote files (and each mirror's), its ledger rows and "
        "the names its models' file fields reference: report remote orphans, "
        "references without a file, rows without a reference and size or checksum "
        "mismatches. --fix re-queues mismatched rows that have a local copy and "
        "adopts referenced remote files without a row; --delete-orphans deletes "
        "orphans older than --grace. Interrupted, it continues where it stopped "
        "when run again. Exit status 1 when interrupted or failed, 2 for bad "
        "arguments, 3 when findings are left."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--storage",
            metavar="KEY",
            help="The storage to audit (needed when there is more than one); a "
            "mirror's key audits that mirror only.",
        )
        parser.add_argument(
            "--fix",
            action="store_true",
            help="Re-queue done rows whose remote copy is missing or wrong while "
            "the local copy exists; adopt referenced remote files without a row.",
        )
        parser.add_argument(
            "--delete-orphans",
            action="store_true",
            help="Delete remote files with no row and no reference, once older "
            "than --grace (by the remote's modified time; never one without).",
        )
        parser.add_argument(
            "--grace",
            type=duration,
            default=DEFAULT_GRACE,
            help="How old an orphan must be to be deleted: seconds or a number "
            "with s, m, h, d or w (default: 24h).",
        )
        parser.add_argument(
            "--checksum",
            action="store_true",
            help="Also compare content: the listing's MD5 (S3's ETag) with the "
            "local copy's, else the ledger's SHA-256 with the remote's.",
        )
        parser.add_argument(
            "--restart",
            action="store_true",
            help="Start from the beginning, forgetting where an interrupted audit "
            "stopped.",
        )
        add_batch_size_argument(
            parser, default=DEFAULT_BATCH_SIZE, what="Names checked per batch"
        )
        add_output_arguments(parser, progress=True)

    def handle(
        self,
        *,
        storage: str | None,
        fix: bool,
        delete_orphans: bool,
        grace: Any,
        checksum: bool,
        restart: bool,
        batch_size: int,
        json: bool,
        progress: bool | None,
        progress_every: float,
        verbosity: int,
        **options: Any,
    ) -> None:
        audited = one_storage(storage, verb="audit")
        options_ = AuditOptions(
            fix=fix,
            delete_orphans=delete_orphans,
            grace=grace,
            checksum=checksum,
            batch_size=batch_size,
        )
        fields = fields_of((audited.primary or audited).key)
        if delete_orphans and not fields:
            raise UsageError(
                f"No model's file field uses the storage {audited.key!r}, so the "
                "audit cannot tell which remote files are referenced: it deletes "
                "no orphan. Drop --delete-orphans."
            )
        out = _Output(self, audited.key, as_json=json, verbosity=verbosity)
        audit = Audit(
            audited, options_, fields=fields, found=out.finding, restart=restart
        )
        display = Progress(
            self, verbosity=verbosity, as_json=True, live=progress, every=progress_every
        )
        audit.progress = lambda where, counts: display.update(
            lambda: f"{where}: {counts.summary()}"
        )
        if not audit.fields and verbosity > 0:
            self.stderr.write(
                f"No model's file field uses {audited.key!r}: references are not "
                "compared."
            )
        if audit.resumed and verbosity > 0:
            self.stderr.write(f"resuming an interrupted audit at {audit.resumed}")
        out.start(audit)
        try:
            counts = audit.run()
        except NotImplementedError as exc:
            raise CommandError(
                f"A remote of {audited.key!r} cannot list its files: it cannot be "
                "audited.",
                returncode=EXIT_ERROR,
            ) from exc
        except KeyboardInterrupt:
            display.finish()
            raise CommandError(
                f"Interrupted ({audit.counts.summary()}); run the same command "
                "again to resume.",
                returncode=EXIT_ERROR,
            ) from None
        display.finish()
        out.end(counts)
        if counts.unsettled:
            hint = "" if fix else "; --fix heals what is safe"
            raise AttentionNeeded(
                f"{counts.unsettled} finding(s) left in {audited.key!r}{hint}."
            )


class _Output:
    """Findings as lines, or one JSON object written as they come (memory stays
    bounded however many there are)."""

    def __init__(
        self, command: LedgerCommand, key: str, *, as_json: bool, verbosity: int
    ) -> None:
        self.command = command
        self.key = key
        self.as_json = as_json
        self.verbosity = verbosity
        self.written = 0

    def _write(self, text: str) -> None:
        self.command.stdout.write(text, ending="")

    def start(self, audit: Audit) -> None:
        if not self.as_json:
            return
        head = {
            "storage": self.key,
            "destinations": [destination.key for destination in audit.destinations],
            "references": [f"{m._meta.label}.{name}" for m, name in audit.fields],
            "resumed_from": audit.resumed or None,
        }
        self._write(json_module.dumps(head, sort_keys=True)[:-1] + ', "findings": [')

    def finding(self, finding: Finding) -> None:
        if self.as_json:
            comma = ", " if self.written else ""
            self._write(comma + json_module.dumps(finding.as_dict(), sort_keys=True))
        elif self.verbosity > 0:
            self.command.stdout.write(finding.line())
        self.written += 1

    def end(self, counts: AuditCounts) -> None:
        if self.as_json:
            body = json_module.dumps(counts.as_dict(), sort_keys=True)
            self._write(f'], "counts": {body}}}\n')
        elif self.verbosity > 0:
            self.command.stdout.write(f"Audited {self.key!r}: {counts.summary()}")
