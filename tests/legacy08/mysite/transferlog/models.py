from __future__ import annotations

from django.db import models


class TransferLogEntry(models.Model):
    """The log model of the 0.8 docs' Signals page."""

    name = models.CharField(max_length=255)
    remote_url = models.URLField(max_length=2000)
    transfer_date = models.DateTimeField()

    def __str__(self) -> str:
        return self.name
