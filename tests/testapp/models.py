from __future__ import annotations

from django.db import models

from queued_storage.backends import QueuedStorage
from queued_storage.fields import QueuedFileField

#: Built from STORAGES aliases, which the tests point at a fresh directory each.
document_storage = QueuedStorage("queued_local", "queued_remote", key="documents")
held_storage = QueuedStorage(
    "queued_local", "queued_remote", delayed=True, key="documents-held"
)


class Document(models.Model):
    title = models.CharField(max_length=100, blank=True)
    file = QueuedFileField(upload_to="docs", storage=document_storage)

    def __str__(self) -> str:
        return self.file.name or ""


class HeldDocument(models.Model):
    file = QueuedFileField(upload_to="held", storage=held_storage)

    def __str__(self) -> str:
        return self.file.name or ""
