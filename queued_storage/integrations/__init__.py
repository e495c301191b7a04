"""Wake-ups: what runs the engine for a row after the save that wrote it commits.

The ledger is the truth; these only decide *when* a transfer starts. Each worker
integration lives in its own module and is imported only when it is chosen.
"""

from __future__ import annotations

from django.utils.module_loading import import_string

from queued_storage import redaction
from queued_storage.conf import settings as conf

#: ``QUEUED_STORAGE_WORKER`` value -> the function that wakes a worker for one row.
WAKERS = {
    "immediate": "queued_storage.worker.transfer_name",
    "django_q": "queued_storage.integrations.django_q.enqueue",
    "django_tasks": "queued_storage.integrations.django_tasks.enqueue",
    "celery": "queued_storage.integrations.celery.enqueue",
}


def wake_after_commit(db: str, key: str, name: str) -> None:
    """Ask the configured worker to transfer ``name`` once the caller's
    transaction on ``db`` (the ledger's) commits."""
    worker = conf.QUEUED_STORAGE_WORKER
    if worker is None:
        return
    wake = import_string(WAKERS[worker])
    redaction.after_commit(db, wake, key, name)
