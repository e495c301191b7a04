"""The "(imaginary) notify function" of the 0.8 docs' TransferAndNotify example."""

from __future__ import annotations

from django.core.mail import mail_admins


def notify(result: object) -> None:
    mail_admins("File transferred", f"transfer result: {result!r}")
