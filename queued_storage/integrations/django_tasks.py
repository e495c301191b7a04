"""Django's tasks framework as the wake-up: ``django.tasks`` on Django 6, the
``django-tasks`` backport on Django 5.2. Any backend works; the task carries only
the storage key and the file name.

A task run twice, or for a row that is not due, claims nothing and returns
``None``: the ledger's backoff and leases stay in charge.
"""

from __future__ import annotations

try:
    from django.tasks import task
except ImportError:  # Django 5.2: the backport
    from django_tasks import task  # type: ignore[no-redef]

from queued_storage.worker import transfer_name


@task()
def transfer(key: str, name: str) -> str | None:
    """Transfer the row of ``name`` if it is due; the outcome, or ``None`` when the
    row was not due and nothing was done."""
    outcome = transfer_name(key, name)
    return None if outcome is None else outcome.value


def enqueue(key: str, name: str) -> None:
    """Enqueue the task for one row; called after the saving transaction commits."""
    transfer.enqueue(key, name)
