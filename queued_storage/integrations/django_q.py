"""django-q2 as the wake-up: one ``async_task`` per committed save, and a schedule
that sweeps up whatever a lost task or a dead worker left due.

django-q2 may run a task twice (its own retry when a worker is slow to
acknowledge, or ``max_attempts`` after a failure). That never fights the ledger:
a task for a row that is not due (not yet, already done, held, or leased by
another worker) claims nothing and returns ``None``.
"""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django_q.conf import Conf
from django_q.models import Schedule
from django_q.tasks import async_task

from queued_storage.worker import drain, transfer_name

#: The dotted paths django-q2 stores; the worker imports these, never a path
#: read from the ledger.
TRANSFER_TASK = "queued_storage.integrations.django_q.transfer"
SWEEP_TASK = "queued_storage.integrations.django_q.sweep"
#: The group of every task this module sends, for the django-q2 admin.
GROUP = "queued_storage"
#: The name of the sweep's ``Schedule``; ``install_schedule()`` finds it by it.
SCHEDULE_NAME = "queued_storage: sweep due transfers"
# django-q2's Task.name is a CharField(max_length=100).
TASK_NAME_LENGTH = 100


def transfer(key: str, name: str) -> str | None:
    """Transfer the row of ``name`` if it is due; the outcome, or ``None`` when the
    row was not due and nothing was done."""
    outcome = transfer_name(key, name)
    return None if outcome is None else outcome.value


def sweep() -> dict[str, int]:
    """Drain every due row: retries whose backoff ran out, expired leases, and rows
    whose wake-up task was lost. What the schedule runs."""
    return drain().counts()


def enqueue(key: str, name: str) -> None:
    """Send the task for one row; called after the saving transaction commits."""
    if not Conf.ORM:
        _send(key, name)
        return
    # Outside a transaction, django-q2's ORM broker closes the connection before it
    # writes. In autocommit mode a wake-up runs while the model's INSERT is being
    # built (FileField.pre_save saves the file), and that INSERT's cursor would die.
    with transaction.atomic(using=Conf.ORM):
        _send(key, name)


def _send(key: str, name: str) -> None:
    async_task(
        TRANSFER_TASK,
        key,
        name,
        group=GROUP,
        task_name=f"queued_storage transfer {name}"[:TASK_NAME_LENGTH],
    )


def install_schedule(minutes: int = 1) -> tuple[Any, bool]:
    """Create or update the sweep's ``Schedule`` (every ``minutes``); returns it and
    whether it was created. Running it again changes nothing but the interval."""
    if minutes < 1:
        raise ValueError("The sweep runs every 1 minute or more.")
    schedules = list(Schedule.objects.filter(name=SCHEDULE_NAME).order_by("pk"))
    for duplicate in schedules[1:]:
        duplicate.delete()
    wanted: dict[str, Any] = {
        "func": SWEEP_TASK,
        "args": None,
        "kwargs": None,
        "schedule_type": Schedule.MINUTES,
        "minutes": minutes,
        "repeats": -1,
        "cluster": None,
    }
    if schedules:
        schedule = schedules[0]
        changed = [f for f, v in wanted.items() if getattr(schedule, f) != v]
        for field in changed:
            setattr(schedule, field, wanted[field])
        if changed:
            schedule.save(update_fields=changed)
        return schedule, False
    return Schedule.objects.create(name=SCHEDULE_NAME, **wanted), True


def remove_schedule() -> int:
    """Delete the sweep's ``Schedule``; returns how many were removed."""
    deleted, _by_model = Schedule.objects.filter(name=SCHEDULE_NAME).delete()
    return int(deleted)
