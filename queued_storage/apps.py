from __future__ import annotations

from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class QueuedStorageConfig(AppConfig):
    name = "queued_storage"
    verbose_name = _("Queued storage")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from queued_storage import checks  # noqa: F401 - registers the checks
        from queued_storage.integrations import prometheus  # noqa: F401 - its check
