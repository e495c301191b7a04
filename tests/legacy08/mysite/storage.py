"""A backend defined the 0.8 way: a ``QueuedStorage`` subclass whose class
attributes configure it ("You can use this to specify your own backends")."""

from __future__ import annotations

from django.conf import settings

from queued_storage.backends import QueuedFileSystemStorage


class ArchiveStorage(QueuedFileSystemStorage):
    remote = "django.core.files.storage.FileSystemStorage"
    remote_options = {"location": settings.ARCHIVE_ROOT, "base_url": "/archive/"}
    task = "queued_storage.tasks.TransferAndDelete"
