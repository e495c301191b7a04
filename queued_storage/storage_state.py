"""What the ledger knows of a storage as a whole, one row per storage key."""

from __future__ import annotations

from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from queued_storage.names import MAX_NAME_LENGTH


class StorageState(models.Model):
    """A storage's standing: whether the files its remote held before the ledger
    are adopted (have rows), and how far a running adoption has got."""

    # Compares exactly, as PendingTransfer.storage_key does: on MariaDB/MySQL
    # migration 0003 gives it a binary collation, which a migration altering it
    # must keep.
    storage_key = models.CharField(_("storage key"), max_length=255, unique=True)
    adopted_at = models.DateTimeField(
        _("adopted at"),
        null=True,
        blank=True,
        help_text=_(
            "When every file the remote held before was recorded, or the storage "
            "was declared new. Until then, a name the ledger has never seen is "
            "asked of the remote before a new upload gets it."
        ),
    )
    adoption_started_at = models.DateTimeField(
        _("adoption started at"), null=True, blank=True
    )
    adoption_cursor = models.CharField(
        _("adoption cursor"),
        max_length=MAX_NAME_LENGTH,
        blank=True,
        help_text=_(
            "The last remote name an unfinished adoption recorded; running it again "
            "continues after it."
        ),
    )
    adoption_counts = models.JSONField(_("adoption counts"), default=dict, blank=True)
    created_at = models.DateTimeField(_("created at"), default=timezone.now)
    updated_at = models.DateTimeField(_("updated at"), default=timezone.now)

    class Meta:
        verbose_name = _("storage state")
        verbose_name_plural = _("storage states")
        ordering = ["storage_key"]

    def __str__(self) -> str:
        adopted = "adopted" if self.adopted_at else "not adopted"
        return f"{self.storage_key} ({adopted})"
