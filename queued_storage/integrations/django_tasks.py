"""Django's tasks framework as the wake-up (``django.tasks`` on Django 6, the
``django-tasks`` backport before)."""

from __future__ import annotations

try:
    from django.tasks import task
except ImportError:  # Django 5.2: the backport
    from django_tasks import task  # type: ignore[no-redef]


@task()
def transfer(key: str, name: str) -> str | None:
    """Transfer the row if it is due, else nothing."""
    from queued_storage.transfer import transfer_name

    outcome = transfer_name(key, name)
    return None if outcome is None else outcome.value


def enqueue(key: str, name: str) -> None:
    transfer.enqueue(key, name)
