"""The 0.8 docs' ``file_transferred`` receiver, word for word (Signals page)."""

from __future__ import annotations

from django.dispatch import receiver
from django.utils.timezone import now

from mysite.transferlog.models import TransferLogEntry
from queued_storage.signals import file_transferred


@receiver(file_transferred)
def log_file_transferred(sender, name, local, remote, **kwargs):
    remote_url = remote.url(name)
    TransferLogEntry.objects.create(
        name=name, remote_url=remote_url, transfer_date=now()
    )


# Alternatively, you can also use the signal's connect method to connect:
file_transferred.connect(log_file_transferred)
