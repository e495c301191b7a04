"""The audit of a storage: its remote's listing (and each mirror's) merged in name
order with the ledger's rows of the destination, each batch checked against the
names the models' file fields reference; then every reference checked for a
file. A batch at a time, its cursor kept in the storage's state, so that an
audit that stops is continued by the next run from its last batch.

The merge is :mod:`queued_storage.audit_merge`'s; what it finds is in
:mod:`queued_storage.audit_findings`; ``fix`` re-queues a done row whose remote
copy is missing or wrong (its local copy there) and adopts a referenced remote
file without a row; ``delete_orphans`` deletes
remote orphans older than the grace period (:mod:`queued_storage.audit_orphans`),
unless a field's references could not be read. A remote file whose name the
remote reads as another name is reported, never deleted nor adopted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from django.db import router, transaction
from django.utils import timezone

from queued_storage import adoption, registry
from queued_storage.audit_findings import (
    CHECKSUM_MISMATCH,
    MISSING_FILE,
    MISSING_REMOTE,
    MISSPELLED,
    ORPHAN,
    SIZE_MISMATCH,
    UNREADABLE_FIELD,
    UNRECORDED,
    UNREFERENCED_ROW,
    AuditCounts,
    Finding,
)
from queued_storage.audit_merge import Pair, chunks, ledger_rows, merged
from queued_storage.audit_orphans import (
    DELETED,
    delete_orphan,
    is_held_tombstone,
    remove_held_tombstone,
)
from queued_storage.audit_references import (
    FieldRef,
    UnreadableField,
    check_readable,
    fields_of,
    label_of,
    referenced,
    references,
)
from queued_storage.checksums import remote_sha256, storage_md5
from queued_storage.models import PendingTransfer, StorageState, name_hash
from queued_storage.redaction import error_text
from queued_storage.remote_listing import (
    RemoteEntry,
    read_as_another,
    remote_entries,
)
from queued_storage.verification import Problem, fix_row

if TYPE_CHECKING:
    from queued_storage.storage import QueuedStorage

logger = logging.getLogger("queued_storage")

DEFAULT_BATCH_SIZE = 1000
DEFAULT_GRACE = timedelta(hours=24)
#: Errors kept in the counts (the first ones): enough to say what went wrong.
ERRORS_KEPT = 20
Status = PendingTransfer.Status


@dataclass(frozen=True)
class AuditOptions:
    fix: bool = False
    delete_orphans: bool = False
    grace: timedelta = DEFAULT_GRACE
    checksum: bool = False
    batch_size: int = DEFAULT_BATCH_SIZE


class Audit:
    """One audit run of ``storage`` (a storage: its remote, then each mirror's;
    a mirror: its remote) and of the references to it. ``found`` hears of each
    finding once it is counted; ``progress`` after each batch."""

    def __init__(
        self,
        storage: QueuedStorage,
        options: AuditOptions | None = None,
        *,
        fields: Sequence[FieldRef] | None = None,
        found: Callable[[Finding], object] | None = None,
        progress: Callable[[str, AuditCounts], object] | None = None,
        restart: bool = False,
    ) -> None:
        self.storage = storage
        self.primary = storage.primary or storage
        registry.register(self.primary)
        self.options = options or AuditOptions()
        self.fields = list(fields_of(self.primary.key) if fields is None else fields)
        #: The labels of the fields whose references could not be read: while
        #: any, no orphan is deleted (it may be one of theirs).
        self.unreadable: list[str] = []
        self.found = found
        self.progress = progress
        if storage.primary is None:
            self.destinations: list[QueuedStorage] = [
                destination for _name, _key, destination in storage.destinations
            ]
        else:
            self.destinations = [storage]
        state, _created = StorageState.objects.get_or_create(storage_key=storage.key)
        stored: dict[str, Any] = {} if restart else dict(state.audit_progress or {})
        #: Where the run before this one stopped ({} when it finished).
        self.resumed: dict[str, Any] = {
            k: v for k, v in stored.items() if k != "counts"
        }
        self.cursor: dict[str, Any] = {
            "destination": 0,
            "after": "",
            "started_at": timezone.now().isoformat(),
            **self.resumed,
        }
        self.counts = AuditCounts.of(stored.get("counts", {}))

    # The run.

    def run(self) -> AuditCounts:
        """Audit every destination, then the references; the cursor is cleared
        once done."""
        size = self.options.batch_size
        for field in list(self.fields):
            try:
                check_readable(field)
            except UnreadableField as exc:
                self._unreadable(exc)
        for index, destination in enumerate(self.destinations):
            if index < self.cursor["destination"]:
                continue
            after = str(self.cursor.get("after") or "")
            pairs = merged(
                remote_entries(destination.remote, after),
                ledger_rows(destination.key, after, size),
            )
            for chunk in chunks(pairs, size):
                self._check_pairs(destination, chunk)
                self._keep(destination=index, after=chunk[-1][0])
                self._tell(f"remote {destination.key}")
            self._keep(destination=index + 1, after="")
        after_ref = self.cursor.get("reference")
        fields = list(self.fields)
        while fields:
            try:
                self._check_all_references(fields, after_ref)
                break
            except UnreadableField as exc:
                # Its table went away since the audit began: on with the next.
                self._unreadable(exc)
                fields = fields[fields.index(exc.field) + 1 :]
                after_ref = None
        self._finish()
        return self.counts

    def _check_all_references(
        self, fields: list[FieldRef], after_ref: list[Any] | None
    ) -> None:
        size = self.options.batch_size
        for batch in references(
            fields, after=tuple(after_ref) if after_ref else None, size=size
        ):
            self._check_references(batch)
            last = batch[-1]
            pk = last.pk if isinstance(last.pk, int) else str(last.pk)
            self._keep(destination=len(self.destinations), reference=[last.field, pk])
            self._tell("references")

    def _unreadable(self, exc: UnreadableField) -> None:
        """Report once that the references of ``exc.field`` could not be read,
        and leave the field out of the rest of the audit."""
        if exc.field in self.fields:
            self.fields.remove(exc.field)
        label = label_of(exc.field)
        if label in self.unreadable:
            return
        self.unreadable.append(label)
        detail = (
            f"its references could not be read ({error_text(self.primary, exc.error)})"
            "; the audit deletes no orphan while a field's references are unknown"
        )
        self._report(
            Finding(UNREADABLE_FIELD, self.primary.key, "", detail, reference=label)
        )

    def _referenced(self, names: list[str]) -> set[str]:
        """Which of ``names`` the readable fields reference."""
        while True:
            try:
                return referenced(self.fields, names)
            except UnreadableField as exc:
                self._unreadable(exc)

    def _keep(self, **cursor: Any) -> None:
        self.cursor.update(cursor)
        StorageState.objects.filter(storage_key=self.storage.key).update(
            audit_progress={**self.cursor, "counts": self.counts.as_dict()},
            updated_at=timezone.now(),
        )

    def _finish(self) -> None:
        StorageState.objects.filter(storage_key=self.storage.key).update(
            audit_progress={}, updated_at=timezone.now()
        )
        logger.info("audit key=%s %s", self.storage.key, self.counts.summary())

    def _tell(self, where: str) -> None:
        if self.progress is not None:
            self.progress(where, self.counts)

    def _report(self, finding: Finding) -> None:
        self.counts.count(finding)
        if finding.action == "":
            logger.info("audit finding %s", finding.line())
        if self.found is not None:
            self.found(finding)

    def _error(self, storage: QueuedStorage, name: str, exc: Exception) -> None:
        self.counts.skipped += 1
        if len(self.counts.errors) < ERRORS_KEPT:
            self.counts.errors.append(f"{name}: {error_text(storage, exc)}")

    # A destination's remote against its rows.

    def _check_pairs(self, destination: QueuedStorage, chunk: list[Pair]) -> None:
        refs = self._referenced([name for name, _e, _r in chunk])
        now = timezone.now()
        for name, entry, row in chunk:
            self.counts.listed += entry is not None
            self.counts.rows += row is not None
            try:
                findings = self._pair(destination, name, entry, row, name in refs, now)
                for finding in findings:
                    self._report(finding)
            except Exception as exc:
                self._error(destination, name, exc)

    def _pair(
        self,
        destination: QueuedStorage,
        name: str,
        entry: RemoteEntry | None,
        row: PendingTransfer | None,
        is_referenced: bool,
        now: Any,
    ) -> Iterator[Finding]:
        key = destination.key
        if row is not None and is_held_tombstone(row):
            # An audit stopped between taking the name and its delete: the name
            # has no live row, and this audit decides again.
            remove_held_tombstone(row)
            row = None
            if entry is None:
                return
        if row is None:
            assert entry is not None
            wrong = read_as_another(destination.remote, name)
            if wrong is not None:
                yield self._misspelled(destination, entry, wrong, is_referenced)
            elif is_referenced:
                yield self._unrecorded(destination, entry)
            else:
                yield self._orphan(destination, entry, now)
            return
        if row.deleted:
            return  # being removed: its purge deletes the copies
        # Not while a field's references are unknown: the row may be one of theirs.
        known = self.fields and not self.unreadable
        if known and not is_referenced and destination is self.storage:
            yield Finding(
                UNREFERENCED_ROW, key, name, f"a {row.status} row no field references"
            )
        if row.status != Status.DONE:
            return
        remote = destination.remote
        if entry is None:
            if remote.exists(name):
                return  # transferred after the listing passed the name
            yield self._requeue(
                destination, row, MISSING_REMOTE, "done, the remote has no object"
            )
            return
        if row.size is not None and entry.size is not None and row.size != entry.size:
            actual = remote.size(name)  # asked again: re-saved since the listing?
            if actual != row.size:
                yield self._requeue(
                    destination,
                    row,
                    SIZE_MISMATCH,
                    f"the remote copy has {actual} bytes, the ledger {row.size}",
                )
            return
        if self.options.checksum:
            wrong = self._checksum_problem(destination, row, entry)
            if wrong:
                yield self._requeue(destination, row, CHECKSUM_MISMATCH, wrong)

    def _checksum_problem(
        self, destination: QueuedStorage, row: PendingTransfer, entry: RemoteEntry
    ) -> str:
        """What differs between the content of the row's version and the remote
        copy; "" when they match or nothing cheap tells. The listing's MD5 is
        compared with the local copy's when there is one, else the ledger's
        SHA-256 with the remote's (kept by S3, or read)."""
        local = destination.local
        if entry.md5 and local.exists(row.name):
            md5 = storage_md5(local, row.name)
            if md5 != entry.md5:
                return f"the remote copy has MD5 {entry.md5}, the local copy {md5}"
            return ""
        if row.checksum:
            found = remote_sha256(destination.remote, row.name)
            if found != row.checksum:
                return f"the remote copy has SHA-256 {found}, the ledger {row.checksum}"
        return ""

    def _requeue(
        self, destination: QueuedStorage, row: PendingTransfer, kind: str, detail: str
    ) -> Finding:
        finding = Finding(kind, destination.key, row.name, detail)
        if self.options.fix:
            problem = Problem(row.storage_key, row.name, kind, detail)
            fix_row(row, problem)
            finding.detail = problem.detail
            finding.action = "requeued" if problem.fixed else ""
        return finding

    def _unrecorded(self, destination: QueuedStorage, entry: RemoteEntry) -> Finding:
        name = entry.name
        finding = Finding(
            UNRECORDED, destination.key, name, "on the remote and referenced, no row"
        )
        if not self.options.fix:
            return finding
        if destination.primary is not None:
            finding.detail += "; backfill_mirror copies a mirror's files"
            return finding
        db = router.db_for_write(PendingTransfer)
        try:
            with transaction.atomic(using=db):
                size = adoption.record_remote_file(
                    db, destination.key, name, destination.remote
                )
        except FileNotFoundError:
            finding.detail += "; gone from the remote since the listing"
            return finding
        if size is None:
            finding.detail += "; the name got a row since the listing"
        else:
            finding.action = "adopted"
        return finding

    def _misspelled(
        self,
        destination: QueuedStorage,
        entry: RemoteEntry,
        wrong: str,
        is_referenced: bool,
    ) -> Finding:
        referenced_as = "referenced" if is_referenced else "no reference"
        return Finding(
            MISSPELLED,
            destination.key,
            entry.name,
            f"on the remote, no row, {referenced_as}; kept: the remote reads it "
            f"as another name ({wrong})",
        )

    def _orphan(
        self, destination: QueuedStorage, entry: RemoteEntry, now: Any
    ) -> Finding:
        modified = entry.modified.isoformat() if entry.modified else "unknown"
        finding = Finding(
            ORPHAN,
            destination.key,
            entry.name,
            f"on the remote ({entry.size} bytes, modified {modified}), no row, "
            "no reference",
        )
        if self.options.delete_orphans and self.unreadable:
            finding.detail += (
                "; kept: the references of "
                f"{', '.join(self.unreadable)} could not be read"
            )
        elif self.options.delete_orphans:
            try:
                outcome = delete_orphan(
                    destination,
                    entry,
                    fields=self.fields,
                    grace=self.options.grace,
                    now=now,
                )
            except UnreadableField as exc:
                self._unreadable(exc)
                outcome = (
                    f"kept: the references of {label_of(exc.field)} could not be read"
                )
            if outcome == DELETED:
                finding.action = "deleted"
            else:
                finding.detail += f"; {outcome}"
        return finding

    # The references against the ledger and the storages.

    def _check_references(self, batch: list[Any]) -> None:
        primary = self.primary
        states = dict(
            (name, (status, deleted))
            for name, status, deleted in PendingTransfer.objects.filter(
                storage_key=primary.key,
                name_hash__in={name_hash(ref.name) for ref in batch},
            ).values_list("name", "status", "deleted")
        )
        for ref in batch:
            self.counts.references += 1
            if states.get(ref.name) == (Status.DONE, False):
                continue
            try:
                if primary.local.exists(ref.name) or primary.remote.exists(ref.name):
                    continue
            except Exception as exc:
                self._error(primary, ref.name, exc)
                continue
            state = states.get(ref.name)
            row = "no row" if state is None else f"a {state[0]} row"
            if state is not None and state[1]:
                row = "a deleted row"
            self._report(
                Finding(
                    MISSING_FILE,
                    primary.key,
                    ref.name,
                    f"referenced, {row}, no local or remote file",
                    reference=ref.where,
                )
            )
