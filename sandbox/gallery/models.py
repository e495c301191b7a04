from __future__ import annotations

from django.core.files.storage import Storage, storages
from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from queued_storage.fields import QueuedFileField


def queued_storage() -> Storage:
    """The "queued" entry of ``settings.STORAGES``.

    A callable keeps the storage's options out of the migrations: they record
    this function's path, not the configuration.
    """
    return storages["queued"]


class Upload(models.Model):
    """A file a user uploaded: on local disk at once, on S3 after the transfer."""

    title = models.CharField(_("title"), max_length=200)
    file = QueuedFileField(_("file"), upload_to="uploads", storage=queued_storage)
    created_at = models.DateTimeField(_("created at"), default=timezone.now)

    class Meta:
        verbose_name = _("upload")
        verbose_name_plural = _("uploads")
        ordering = ["-created_at", "-pk"]

    def __str__(self) -> str:
        return self.title


class Switches(models.Model):
    """Two switches a person (or the browser test) flips from the gallery page to
    watch the ledger at work: one row, read by the worker before each upload."""

    hold_transfers = models.BooleanField(
        _("hold transfers"),
        default=False,
        help_text=_("The worker waits before each upload: files stay on local disk."),
    )
    remote_down = models.BooleanField(
        _("S3 is down"),
        default=False,
        help_text=_("Every upload fails, is retried, and ends up failed."),
    )

    class Meta:
        verbose_name = _("sandbox switches")
        verbose_name_plural = _("sandbox switches")

    def __str__(self) -> str:
        return "sandbox switches"

    @classmethod
    def current(cls) -> Switches:
        switches, _created = cls.objects.get_or_create(pk=1)
        return switches
