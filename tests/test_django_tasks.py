"""Django's tasks framework as the wake-up: the immediate backend, and the database
backend of django-tasks-db drained by its own worker process."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import django
import pytest
from django.core.files.base import ContentFile
from django.utils import timezone

from queued_storage.backends import QueuedStorage
from queued_storage.models import PendingTransfer
from tests.helpers import (
    content,
    queued,
    remote_calls,
    row_of,
    save_rolled_back,
    saved_name,
)
from tests.testapp.models import Document
from tests.tools import require_module
from tests.workers import run_command

pytestmark = pytest.mark.django_db

Status = PendingTransfer.Status
IMMEDIATE = (
    "django.tasks.backends.immediate.ImmediateBackend"
    if django.VERSION >= (6, 0)
    else "django_tasks.backends.immediate.ImmediateBackend"
)
DATABASE = "django_tasks_db.DatabaseBackend"


def tasks_module() -> Any:
    if django.VERSION >= (6, 0):
        return require_module("django.tasks", "'Django>=6'")
    return require_module("django_tasks", "django-tasks")


@pytest.fixture
def enqueued(settings: Any) -> Iterator[list[Any]]:
    """The worker is the tasks framework; yields every task result it enqueues."""
    signals = require_module(f"{tasks_module().__name__}.signals", "django-tasks")
    settings.QUEUED_STORAGE_WORKER = "django_tasks"
    results: list[Any] = []

    def record(sender: Any, task_result: Any, **kwargs: Any) -> None:
        results.append(task_result)

    signals.task_enqueued.connect(record)
    yield results
    signals.task_enqueued.disconnect(record)


@pytest.fixture
def immediate(enqueued: list[Any], settings: Any) -> list[Any]:
    settings.TASKS = {"default": {"BACKEND": IMMEDIATE}}
    return enqueued


@pytest.fixture
def database_backend(enqueued: list[Any], settings: Any) -> list[Any]:
    require_module("django_tasks_db", "django-tasks-db")
    settings.TASKS = {"default": {"BACKEND": DATABASE}}
    return enqueued


def test_the_immediate_backend_transfers_after_commit(
    immediate: list[Any],
    storage: QueuedStorage,
    django_capture_on_commit_callbacks: Any,
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        name = storage.save("notes.txt", content("minutes"))
        assert immediate == [], "enqueued before the commit"
        assert storage.using_local(name)
    [result] = immediate
    assert result.args == [storage.key, name]
    assert result.return_value == "done"
    assert row_of(storage, name).status == Status.DONE
    assert storage.using_remote(name)
    with storage.remote.open(name) as remote_file:
        assert remote_file.read() == b"minutes"


def test_a_rolled_back_save_enqueues_nothing(
    immediate: list[Any],
    storage: QueuedStorage,
    django_capture_on_commit_callbacks: Any,
) -> None:
    save_rolled_back(storage, django_capture_on_commit_callbacks)
    assert immediate == []


def test_a_task_for_a_row_that_is_not_due_does_nothing(
    immediate: list[Any], storage: QueuedStorage
) -> None:
    from queued_storage.integrations.django_tasks import transfer

    name = storage.save("later.txt", content())
    later = timezone.now() + timedelta(hours=1)
    PendingTransfer.objects.for_name(storage.key, name).update(
        attempts=3, next_attempt_at=later
    )
    result = transfer.enqueue(storage.key, name)
    assert result.return_value is None
    row = row_of(storage, name)
    assert (row.status, row.attempts, row.next_attempt_at) == (
        Status.QUEUED,
        3,
        later,
    )
    assert not storage.remote.exists(name)


def test_a_task_run_twice_uploads_once(
    immediate: list[Any],
    storage: QueuedStorage,
    django_capture_on_commit_callbacks: Any,
) -> None:
    from queued_storage.integrations.django_tasks import transfer

    with django_capture_on_commit_callbacks(execute=True):
        name = storage.save("twice.txt", content())
    assert transfer.enqueue(storage.key, name).return_value is None
    assert remote_calls(storage, "save") == 1
    assert row_of(storage, name).status == Status.DONE


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_the_database_backend_queues_rows_that_its_worker_drains(
    database_backend: list[Any],
    settings: Any,
    fresh_storages: dict[str, Path],
) -> None:
    from django_tasks_db.models import DBTaskResult

    saved = {}
    for number in range(3):
        body = f"file {number} ".encode() * (number + 1)
        document = Document.objects.create(
            file=ContentFile(body, name=f"tasks-{number}.txt")
        )
        saved[saved_name(document.file)] = body
    # Enqueued after each commit, nothing run yet: the files wait on local storage.
    assert len(database_backend) == 3
    assert DBTaskResult.objects.ready().count() == 3
    assert {tuple(r.args_kwargs["args"]) for r in DBTaskResult.objects.all()} == {
        ("documents", name) for name in saved
    }
    rows = PendingTransfer.objects.filter(storage_key="documents")
    assert set(rows.values_list("status", flat=True)) == {Status.QUEUED}

    worker = run_command(
        "db_worker",
        "--batch",
        "--no-startup-delay",
        "--no-reload",
        "--interval",
        "0",
        overrides={"TASKS": settings.TASKS},
    )
    assert worker.returncode == 0, worker.stdout + worker.stderr

    assert set(rows.values_list("status", flat=True)) == {Status.DONE}
    assert (
        list(DBTaskResult.objects.values_list("return_value", flat=True))
        == ["done"] * 3
    )
    for name, body in saved.items():
        assert (fresh_storages["remote"] / name).read_bytes() == body
        assert queued(Document.objects.get(file=name).file.storage).using_remote(name)
