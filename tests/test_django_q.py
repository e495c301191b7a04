"""django-q2 as the wake-up: a task per committed save, the sweep schedule, and a
real ``qcluster`` on the ORM broker."""

from __future__ import annotations

import io
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.core.files.base import ContentFile
from django.core.management import call_command
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
from tests.tools import group_members, require_module, stop_group
from tests.workers import start_command

pytestmark = pytest.mark.django_db

Status = PendingTransfer.Status


@pytest.fixture
def q2(settings: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """django-q2 as the worker; tasks go to the ORM broker (sync mode off)."""
    require_module("django_q", "django-q2")
    from django_q.conf import Conf

    settings.QUEUED_STORAGE_WORKER = "django_q"
    monkeypatch.setattr(Conf, "SYNC", False)
    return Conf


@pytest.fixture
def sync(q2: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """django-q2 in sync mode: ``async_task`` runs the task in this process."""
    monkeypatch.setattr(q2, "SYNC", True)
    return q2


def queued_tasks() -> list[dict[str, Any]]:
    """The task packages waiting in django-q2's ORM broker."""
    from django_q.models import OrmQ

    return [row.task for row in OrmQ.objects.order_by("pk")]


def test_a_committed_save_sends_one_task_with_only_key_and_name(
    q2: Any, storage: QueuedStorage, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        name = storage.save("report.txt", content("quarterly"))
        assert queued_tasks() == [], "sent before the commit"
    [task] = queued_tasks()
    assert task["func"] == "queued_storage.integrations.django_q.transfer"
    assert task["args"] == (storage.key, name)
    assert task["kwargs"] == {}
    assert task["group"] == "queued_storage"
    # Nothing ran yet: the file waits on local storage, its row queued.
    assert row_of(storage, name).status == Status.QUEUED
    assert storage.using_local(name)


@pytest.mark.django_db(transaction=True)
def test_a_model_save_in_autocommit_mode_sends_its_task(q2: Any) -> None:
    """With no transaction the wake-up runs inside the model's INSERT (the field
    saves the file while the INSERT is built); django-q2's ORM broker must not
    close the connection under it."""
    document = Document.objects.create(file=ContentFile(b"auto", name="auto.txt"))
    assert Document.objects.get(pk=document.pk).file.name == "docs/auto.txt"
    [task] = queued_tasks()
    assert task["args"] == ("documents", "docs/auto.txt")


@pytest.fixture
def sent(q2: Any) -> Iterator[list[dict[str, Any]]]:
    """Every task package handed to django-q2, whatever the broker keeps."""
    from django_q.signals import pre_enqueue

    packages: list[dict[str, Any]] = []

    def record(sender: Any, task: dict[str, Any], **kwargs: Any) -> None:
        packages.append(task)

    pre_enqueue.connect(record)
    yield packages
    pre_enqueue.disconnect(record)


def test_a_rolled_back_save_sends_nothing(
    sync: Any,
    sent: list[dict[str, Any]],
    storage: QueuedStorage,
    django_capture_on_commit_callbacks: Any,
) -> None:
    save_rolled_back(storage, django_capture_on_commit_callbacks)
    assert sent == []


def test_in_sync_mode_the_task_transfers_the_file(
    sync: Any, storage: QueuedStorage, django_capture_on_commit_callbacks: Any
) -> None:
    from django_q.models import Task

    with django_capture_on_commit_callbacks(execute=True):
        name = storage.save("photo.jpg", content("pixels"))
    assert row_of(storage, name).status == Status.DONE
    assert storage.using_remote(name)
    with storage.remote.open(name) as remote_file:
        assert remote_file.read() == b"pixels"
    task = Task.objects.get()
    assert task.success
    assert task.result == "done"
    assert task.args == (storage.key, name)


def test_a_task_for_a_row_that_is_not_due_does_nothing(
    sync: Any, storage: QueuedStorage
) -> None:
    """django-q2's own retry must not fight the ledger's backoff."""
    from django_q.tasks import async_task

    name = storage.save("later.txt", content())  # no commit: no wake-up yet
    later = timezone.now() + timedelta(hours=1)
    PendingTransfer.objects.for_name(storage.key, name).update(
        attempts=2, next_attempt_at=later
    )
    async_task("queued_storage.integrations.django_q.transfer", storage.key, name)
    row = row_of(storage, name)
    assert (row.status, row.attempts, row.next_attempt_at) == (
        Status.QUEUED,
        2,
        later,
    )
    assert not storage.remote.exists(name)


def test_a_task_for_a_row_already_done_does_nothing(
    sync: Any, storage: QueuedStorage, django_capture_on_commit_callbacks: Any
) -> None:
    from django_q.models import Task
    from django_q.tasks import async_task

    with django_capture_on_commit_callbacks(execute=True):
        name = storage.save("once.txt", content())
    assert row_of(storage, name).status == Status.DONE
    uploads = remote_calls(storage, "save")
    async_task("queued_storage.integrations.django_q.transfer", storage.key, name)
    assert remote_calls(storage, "save") == uploads == 1
    assert row_of(storage, name).status == Status.DONE
    second = Task.objects.order_by("-started").first()
    assert second is not None and second.success and second.result is None


def test_a_task_for_a_row_another_worker_holds_does_nothing(
    sync: Any, storage: QueuedStorage
) -> None:
    from django_q.tasks import async_task

    name = storage.save("busy.txt", content())
    expires = timezone.now() + timedelta(minutes=5)
    PendingTransfer.objects.for_name(storage.key, name).update(
        status=Status.TRANSFERRING, lease_token="other", lease_expires_at=expires
    )
    async_task("queued_storage.integrations.django_q.transfer", storage.key, name)
    row = row_of(storage, name)
    assert (row.status, row.lease_token, row.lease_expires_at) == (
        Status.TRANSFERRING,
        "other",
        expires,
    )
    assert not storage.remote.exists(name)


def schedule_command(*args: str) -> str:
    out = io.StringIO()
    call_command("install_transfer_schedule", *args, stdout=out)
    return out.getvalue()


def test_the_schedule_command_is_idempotent(q2: Any) -> None:
    from django_q.models import Schedule

    assert "Installed" in schedule_command()
    first = Schedule.objects.get()
    assert "Kept" in schedule_command()
    assert "Kept" in schedule_command()
    schedule = Schedule.objects.get()
    assert schedule.pk == first.pk
    assert schedule.next_run == first.next_run
    assert (schedule.func, schedule.schedule_type, schedule.minutes) == (
        "queued_storage.integrations.django_q.sweep",
        Schedule.MINUTES,
        1,
    )
    assert schedule.repeats == -1

    schedule_command("--minutes", "5")
    assert Schedule.objects.get().minutes == 5
    assert "Removed" in schedule_command("--remove")
    assert not Schedule.objects.exists()
    assert "No schedule" in schedule_command("--remove")


def test_the_schedule_command_explains_a_missing_app(q2: Any, settings: Any) -> None:
    from django.core.management.base import CommandError

    settings.INSTALLED_APPS = [a for a in settings.INSTALLED_APPS if a != "django_q"]
    with pytest.raises(CommandError, match="INSTALLED_APPS"):
        schedule_command()


def test_a_lost_task_is_transferred_by_the_scheduled_sweep(
    q2: Any,
    storage: QueuedStorage,
    django_capture_on_commit_callbacks: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from django_q.brokers import get_broker
    from django_q.models import OrmQ, Schedule
    from django_q.scheduler import scheduler

    with django_capture_on_commit_callbacks(execute=True):
        name = storage.save("lost.txt", content("still here"))
    assert len(queued_tasks()) == 1
    OrmQ.objects.all().delete()  # the broker lost it
    schedule_command()
    Schedule.objects.update(next_run=timezone.now() - timedelta(seconds=1))

    # What the cluster's scheduler does every 30 s; sync mode runs the task here.
    monkeypatch.setattr(q2, "SYNC", True)
    scheduler(broker=get_broker())

    assert row_of(storage, name).status == Status.DONE
    with storage.remote.open(name) as remote_file:
        assert remote_file.read() == b"still here"
    schedule = Schedule.objects.get()
    assert schedule.next_run > timezone.now()
    from django_q.models import Task

    sweep = Task.objects.get(func="queued_storage.integrations.django_q.sweep")
    assert sweep.success
    assert sweep.result["done"] == 1


def test_the_sweep_takes_over_a_row_whose_worker_died(
    q2: Any, storage: QueuedStorage
) -> None:
    from queued_storage.integrations.django_q import sweep

    name = storage.save("orphan.txt", content("abandoned"))
    PendingTransfer.objects.for_name(storage.key, name).update(
        status=Status.TRANSFERRING,
        lease_token="dead-worker",
        lease_expires_at=timezone.now() - timedelta(seconds=1),
        attempts=1,
    )
    assert sweep()["done"] == 1
    row = row_of(storage, name)
    assert row.status == Status.DONE
    assert row.attempts == 2
    assert storage.remote.exists(name)


def test_the_sweep_leaves_rows_that_are_not_due(
    q2: Any, storage: QueuedStorage
) -> None:
    from queued_storage.integrations.django_q import sweep

    name = storage.save("backoff.txt", content())
    PendingTransfer.objects.for_name(storage.key, name).update(
        next_attempt_at=timezone.now() + timedelta(minutes=10)
    )
    assert sweep()["done"] == 0
    assert row_of(storage, name).status == Status.QUEUED


@pytest.fixture
def qcluster(q2: Any) -> Iterator[subprocess.Popen[str]]:
    """A real ``manage.py qcluster`` on the ORM broker, on this run's database, in
    a process group of its own: whatever happens, none of its processes outlive
    the test."""
    process = start_command(
        "qcluster",
        overrides={"QUEUED_STORAGE_WORKER": "django_q"},
        start_new_session=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            stop_group(process, signal.SIGTERM)
        # Closed here, not left to the garbage collector (a ResourceWarning).
        if process.stdout is not None:
            process.stdout.close()
        assert group_members(process.pid) == []


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_qcluster_process_drains_the_files_saved_here_and_stops_cleanly(
    qcluster: subprocess.Popen[str], fresh_storages: dict[str, Path]
) -> None:
    saved = {}
    for number in range(5):
        body = uuid.uuid4().bytes * (number + 1)
        document = Document.objects.create(
            file=ContentFile(body, name=f"cluster-{number}.bin")
        )
        saved[saved_name(document.file)] = body
    from django_q.models import Task

    rows = PendingTransfer.objects.filter(storage_key="documents")

    def drained() -> bool:
        # A task is acknowledged (its broker row deleted) after its result is saved.
        return (
            not rows.exclude(status=Status.DONE).exists()
            and Task.objects.count() == len(saved)
            and not queued_tasks()
        )

    deadline = time.monotonic() + 60
    while not drained():
        if qcluster.poll() is not None or time.monotonic() > deadline:
            stdout = qcluster.stdout
            output = stdout.read() if stdout and qcluster.poll() is not None else ""
            pytest.fail(
                "qcluster did not drain the ledger: "
                f"{list(rows.values_list('name', 'status', 'last_error'))}\n{output}"
            )
        time.sleep(0.2)

    remote = fresh_storages["remote"]
    for name, body in saved.items():
        assert (remote / name).read_bytes() == body
        assert queued(Document.objects.get(file=name).file.storage).using_remote(name)
    assert sorted(Task.objects.values_list("result", flat=True)) == ["done"] * 5

    qcluster.send_signal(signal.SIGTERM)
    output, _ = qcluster.communicate(timeout=60)
    assert qcluster.returncode == 0, output
    assert "Traceback" not in output, output
    assert "stopped" in output.lower(), output
