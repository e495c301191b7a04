from __future__ import annotations

from django.apps import AppConfig


class TransferLogConfig(AppConfig):
    name = "mysite.transferlog"
    label = "transferlog"

    def ready(self) -> None:
        from mysite.transferlog import receivers  # noqa: F401 - connects them
