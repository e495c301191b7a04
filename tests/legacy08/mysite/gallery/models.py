"""The site's models, written from the 0.8 documentation.

The one change 0.9 asked of them is the ``key=`` of the storages that share their
local and remote classes with another one (README "Coming from
django-queued-storage 0.8"): each such storage is a storage of its own in the
ledger. ``tests/test_legacy08.py`` runs this site without them too.
"""

from __future__ import annotations

from django.db import models

from mysite.storage import ArchiveStorage
from queued_storage.backends import QueuedS3BotoStorage, QueuedStorage
from queued_storage.fields import QueuedFileField

# The 0.8 README's example.
queued_s3storage = QueuedStorage(
    "django.core.files.storage.FileSystemStorage",
    "storages.backends.s3boto.S3BotoStorage",
)

# The Tasks page's example: the local copy goes once the file is on S3.
s3_delete_storage = QueuedS3BotoStorage(
    task="queued_storage.tasks.TransferAndDelete", key="s3-delete"
)

# The Tasks page's TransferAndNotify as a storage's task.
s3_notify_storage = QueuedS3BotoStorage(
    task="mysite.tasks.TransferAndNotify", key="s3-notify"
)


class MyModel(models.Model):
    """The README's model."""

    image = models.ImageField(storage=queued_s3storage)

    def __str__(self) -> str:
        return self.image.name


class Photo(models.Model):
    """The Tasks page's ``ImageField(storage=s3_delete_storage)``."""

    image = models.ImageField(
        upload_to="photos",
        storage=s3_delete_storage,
        width_field="width",
        height_field="height",
    )
    width = models.PositiveIntegerField(null=True, blank=True)
    height = models.PositiveIntegerField(null=True, blank=True)

    def __str__(self) -> str:
        return self.image.name


class Scan(models.Model):
    """The Fields page's model: saved locally, transferred on demand."""

    image = QueuedFileField(storage=QueuedS3BotoStorage(delayed=True, key="s3-delayed"))

    def __str__(self) -> str:
        return self.image.name


class Report(models.Model):
    file = QueuedFileField(upload_to="reports", storage=s3_notify_storage)

    def __str__(self) -> str:
        return self.file.name


class Attachment(models.Model):
    file = models.FileField(upload_to="attachments", storage=ArchiveStorage())

    def __str__(self) -> str:
        return self.file.name
