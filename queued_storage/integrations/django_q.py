"""django-q2 as the wake-up: one ``async_task`` per committed save."""

from __future__ import annotations

from django_q.tasks import async_task


def run(key: str, name: str) -> str | None:
    """The task django-q2 runs: transfer the row if it is due, else nothing."""
    from queued_storage.transfer import transfer_name

    outcome = transfer_name(key, name)
    return None if outcome is None else outcome.value


def enqueue(key: str, name: str) -> None:
    async_task(
        "queued_storage.integrations.django_q.run",
        key,
        name,
        group="queued_storage",
        task_name=f"queued_storage transfer {name[:80]}",
    )
