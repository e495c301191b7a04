"""A django-health-check (4.x) check: unhealthy when transfers wait too long.

Only this module imports ``health_check``; install it with the ``health`` extra.
"""

from __future__ import annotations

import dataclasses
import datetime

from django.db import connections, router
from django.utils import timezone
from health_check.base import HealthCheck
from health_check.exceptions import ServiceUnavailable

from queued_storage.conf import settings as conf
from queued_storage.models import PendingTransfer


@dataclasses.dataclass
class TransferBacklog(HealthCheck):  # type: ignore[misc]
    """Reports unavailable when the oldest due transfer (queued and due, or held
    by a worker whose lease ran out) has waited longer than ``max_age``: no worker
    is keeping up. ``max_age`` defaults to ``QUEUED_STORAGE_HEALTH_MAX_AGE``;
    ``storage`` narrows the check to one storage key."""

    max_age: datetime.timedelta | None = None
    storage: str | None = None

    def run(self) -> None:
        limit = self.max_age or datetime.timedelta(
            seconds=conf.QUEUED_STORAGE_HEALTH_MAX_AGE
        )
        rows = PendingTransfer.objects.all()
        if self.storage is not None:
            rows = rows.filter(storage_key=self.storage)
        db = router.db_for_read(PendingTransfer)
        try:
            now = timezone.now()
            oldest = rows.using(db).oldest_due_at(now)
        finally:
            # Checks run in a thread pool: do not leave a connection per thread.
            if not connections[db].in_atomic_block:
                connections[db].close()
        if oldest is None:
            return
        waited = now - oldest
        if waited > limit:
            raise ServiceUnavailable(
                f"the oldest due transfer has waited {int(waited.total_seconds())} s, "
                f"more than {int(limit.total_seconds())} s: is process_transfers "
                "running?"
            )
