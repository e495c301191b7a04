"""The two models the save benchmark compares. A round points each field at fresh
storages (``field.storage = ...``); the storages here are placeholders."""

from __future__ import annotations

from django.core.files.storage import FileSystemStorage
from django.db import models

from queued_storage.fields import QueuedFileField


class QueuedDoc(models.Model):
    file = QueuedFileField(upload_to="docs", storage=FileSystemStorage())

    def __str__(self) -> str:
        return self.file.name or ""


class PlainDoc(models.Model):
    file = models.FileField(upload_to="docs", storage=FileSystemStorage())

    def __str__(self) -> str:
        return self.file.name or ""
