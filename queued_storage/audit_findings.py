"""What an audit of a storage finds, and its counts: kept with the audit's cursor,
so that a run resumed after a crash reports the totals of the whole audit."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

#: On a remote, with no row and no reference: a file nothing uses.
ORPHAN = "orphan"
#: On a remote and referenced, but with no row: ``--fix`` adopts it.
UNRECORDED = "unrecorded"
#: Referenced by a model's field, with no file anywhere: no row done, no local or
#: remote file.
MISSING_FILE = "missing_file"
#: On a remote with no row, under a name the remote reads as another one (``d\\x``
#: for ``d/x`` on S3): never deleted nor adopted, whose file it is is not known.
MISSPELLED = "misspelled"
#: A model's file field whose references could not be read (its table is
#: missing, say): the audit deletes no orphan, for it cannot tell them apart.
UNREADABLE_FIELD = "unreadable_field"
#: A row (not deleted) whose name no model's field references.
UNREFERENCED_ROW = "unreferenced_row"
#: A row recorded as done whose remote has no object.
MISSING_REMOTE = "missing_remote"
#: A row recorded as done whose remote object has another size.
SIZE_MISMATCH = "size_mismatch"
#: A row recorded as done whose remote object has other content.
CHECKSUM_MISMATCH = "checksum_mismatch"

KINDS = (
    ORPHAN,
    UNRECORDED,
    MISSPELLED,
    UNREADABLE_FIELD,
    MISSING_FILE,
    UNREFERENCED_ROW,
    MISSING_REMOTE,
    SIZE_MISMATCH,
    CHECKSUM_MISMATCH,
)
#: The kinds whose fix is a re-queue (when the local copy is there).
REQUEUED_KINDS = (MISSING_REMOTE, SIZE_MISMATCH, CHECKSUM_MISMATCH)


@dataclass
class Finding:
    """One problem: its kind, the ledger key of the destination it was found at,
    the name, what was seen, and what the audit did about it (``action``: ""
    when nothing, else ``requeued``, ``adopted`` or ``deleted``)."""

    kind: str
    key: str
    name: str
    detail: str
    action: str = ""
    #: The model and primary key of a reference (MISSING_FILE), the field's label
    #: (UNREADABLE_FIELD), else "".
    reference: str = ""

    @property
    def settled(self) -> bool:
        """Whether the audit fixed what it found."""
        return bool(self.action)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        done = f" ({self.action})" if self.action else ""
        where = f" reference={self.reference}" if self.reference else ""
        name = f" name={self.name}" if self.name else ""
        return f"{self.kind.upper()} key={self.key}{name}{where}: {self.detail}{done}"


@dataclass
class AuditCounts:
    """Counts of a whole audit (a resumed one's include the runs before it)."""

    listed: int = 0
    rows: int = 0
    references: int = 0
    orphan: int = 0
    unrecorded: int = 0
    misspelled: int = 0
    unreadable_field: int = 0
    missing_file: int = 0
    unreferenced_row: int = 0
    missing_remote: int = 0
    size_mismatch: int = 0
    checksum_mismatch: int = 0
    requeued: int = 0
    adopted: int = 0
    deleted: int = 0
    #: Findings left as found (not fixed): the exit status says whether any.
    unsettled: int = 0
    #: Names the storage reads as other names, or that raised while checked.
    skipped: int = 0
    errors: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, stored: dict[str, Any]) -> AuditCounts:
        counts = cls()
        for item in fields(cls):
            if item.name in stored:
                setattr(counts, item.name, stored[item.name])
        return counts

    def count(self, finding: Finding) -> None:
        setattr(self, finding.kind, getattr(self, finding.kind) + 1)
        if finding.action:
            setattr(self, finding.action, getattr(self, finding.action) + 1)
        else:
            self.unsettled += 1

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return " ".join(
            f"{item.name}={getattr(self, item.name)}"
            for item in fields(self)
            if item.name != "errors"
        )
