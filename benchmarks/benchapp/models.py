"""The models the save benchmark compares (a round points each field at fresh
storages, ``field.storage = ...``: the storages here are placeholders), the
ledger-shaped table of its floor, and the model whose files the audit benchmark
audits."""

from __future__ import annotations

from django.core.files.storage import FileSystemStorage, Storage, storages
from django.db import models

from queued_storage.fields import QueuedFileField
from queued_storage.models import PendingTransfer


class QueuedDoc(models.Model):
    file = QueuedFileField(upload_to="docs", storage=FileSystemStorage())

    def __str__(self) -> str:
        return self.file.name or ""


class PlainDoc(models.Model):
    file = models.FileField(upload_to="docs", storage=FileSystemStorage())

    def __str__(self) -> str:
        return self.file.name or ""


def _audited_storage() -> Storage:
    return storages["audit"]


class AuditedDoc(models.Model):
    """The references of the audit benchmark's storage."""

    file = QueuedFileField(upload_to="docs", storage=_audited_storage)

    def __str__(self) -> str:
        return self.file.name or ""


def _ledger_twin() -> type[models.Model]:
    """A table shaped like the ledger's: PendingTransfer's own fields, unique
    constraint and indexes, cloned (under names of its own, which PostgreSQL
    wants unique), so that the save benchmark's floor writes a row that costs
    the database what a ledger row does, through the ORM."""
    attrs: dict[str, object] = {"__module__": __name__}
    for field in PendingTransfer._meta.local_fields:
        attrs[field.name] = field.clone()
    constraints = []
    for constraint in PendingTransfer._meta.constraints:
        assert isinstance(constraint, models.UniqueConstraint)
        constraints.append(
            models.UniqueConstraint(
                fields=list(constraint.fields), name=f"bench_twin_{constraint.name}"
            )
        )
    indexes = []
    for index in PendingTransfer._meta.indexes:
        twin = index.clone()
        twin.name = f"bench_twin_{index.name}"[:30]
        indexes.append(twin)
    attrs["Meta"] = type("Meta", (), {"constraints": constraints, "indexes": indexes})
    attrs["__str__"] = lambda self: str(self.name)
    return type("LedgerTwin", (models.Model,), attrs)


#: The save benchmark's floor writes one row of this per file.
LedgerTwin = _ledger_twin()
