"""One test per bug of django-queued-storage 0.8, each named for the bug."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.cache import caches
from django.core.management import call_command
from django.db import transaction
from django.db.migrations.autodetector import MigrationAutodetector
from django.db.migrations.state import ProjectState
from django.db.migrations.writer import MigrationWriter
from django.utils import timezone

from queued_storage.backends import QueuedStorage
from queued_storage.copying import copy_to_remote
from queued_storage.models import PendingTransfer
from queued_storage.worker import drain
from tests.helpers import content, drained, read_bytes, row_by_name_column
from tests.testapp.models import Document

pytestmark = pytest.mark.django_db

Status = PendingTransfer.Status
MakeStorage = Callable[..., QueuedStorage]


def assert_gone(storage: QueuedStorage, name: str) -> None:
    assert not storage.exists(name)
    with pytest.raises(FileNotFoundError):
        storage.open(name)
    with pytest.raises(FileNotFoundError):
        storage.size(name)
    assert name.rpartition("/")[2] not in storage.listdir(name.rpartition("/")[0])[1]


def test_deleted_file_never_comes_back_from_a_leftover_local_copy(
    storage: QueuedStorage, django_capture_on_commit_callbacks: Any
) -> None:
    name = storage.save("a.txt", content())
    drained(storage)
    assert storage.local.exists(name)  # Transfer keeps the local copy

    with django_capture_on_commit_callbacks(execute=True):
        storage.delete(name)

    assert_gone(storage, name)
    assert not storage.local.exists(name)
    assert not storage.remote.exists(name)
    drained(storage)
    assert_gone(storage, name)


def test_deleted_file_stays_gone_when_its_cleanup_failed(
    storage: QueuedStorage,
    django_capture_on_commit_callbacks: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = storage.save("a.txt", content())
    drained(storage)

    def disk_error(name: str) -> None:
        raise OSError("disk unavailable")

    with monkeypatch.context() as patch:
        patch.setattr(storage.local, "delete", disk_error)
        with django_capture_on_commit_callbacks(execute=True) as callbacks:
            storage.delete(name)
        assert callbacks  # the cleanup ran after commit, and failed

    assert storage.local.exists(name)  # the leftover copy
    assert_gone(storage, name)

    drained(storage)

    assert not storage.local.exists(name)
    assert not storage.remote.exists(name)
    assert not PendingTransfer.objects.filter(storage_key=storage.key).exists()
    assert_gone(storage, name)


def test_second_upload_under_a_taken_name_does_not_move_the_first(
    storage: QueuedStorage,
) -> None:
    first = storage.save("a.txt", content("first"))
    drained(storage)
    url = storage.url(first)
    assert url == "https://remote.example/a.txt"

    second = storage.save("a.txt", content("second"))

    assert second != first
    assert row_by_name_column(storage, first).status == Status.DONE
    assert storage.using_remote(first)
    assert storage.url(first) == url
    assert read_bytes(storage, first) == b"first"
    drained(storage)
    assert storage.url(first) == url
    assert read_bytes(storage, first) == b"first"
    assert read_bytes(storage, second) == b"second"


def test_repeated_transfer_does_not_create_a_random_name_on_the_remote(
    make_storage: MakeStorage,
) -> None:
    storage = make_storage(local_options={"allow_overwrite": True})
    name = storage.save("a.txt", content("one"))
    drained(storage)
    storage.transfer(name)
    drained(storage)

    storage.save("a.txt", content("two"))  # the same name, transferred again
    drained(storage)

    assert storage.remote.listdir("") == ([], ["a.txt"])
    assert read_bytes(storage.remote, name) == b"two"
    assert row_by_name_column(storage, name).status == Status.DONE


def test_transfer_retried_after_a_crash_does_not_create_a_random_name(
    storage: QueuedStorage,
) -> None:
    name = storage.save("a.txt", content())
    (claimed,) = PendingTransfer.objects.filter(storage_key=storage.key).claim_due(
        limit=1, lease=60
    )
    copy_to_remote(name, storage.local, storage.remote)  # then the worker dies
    PendingTransfer.objects.filter(pk=claimed.pk).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1)
    )

    drained(storage)

    assert storage.remote.listdir("") == ([], ["a.txt"])
    assert row_by_name_column(storage, name).status == Status.DONE


def test_transfer_and_delete_repeated_does_not_fail(
    make_storage: MakeStorage, django_capture_on_commit_callbacks: Any
) -> None:
    storage = make_storage(task="queued_storage.tasks.TransferAndDelete")
    name = storage.save("a.txt", content())
    with django_capture_on_commit_callbacks(execute=True):
        drained(storage)
    assert not storage.local.exists(name)

    with django_capture_on_commit_callbacks(execute=True):
        assert storage.transfer(name) is False
        stats = drain(keys=[storage.key])

    assert stats.failed == stats.retried == 0
    row = row_by_name_column(storage, name)
    assert row.status == Status.DONE
    assert row.last_error == ""
    assert read_bytes(storage, name) == b"hello world"


def test_transfer_and_delete_of_a_held_file_transferred_twice_does_not_fail(
    make_storage: MakeStorage, django_capture_on_commit_callbacks: Any
) -> None:
    storage = make_storage(task="queued_storage.tasks.TransferAndDelete", delayed=True)
    name = storage.save("a.txt", content())

    with django_capture_on_commit_callbacks(execute=True):
        assert storage.transfer(name) is True
        storage.transfer(name)
        drained(storage)
        storage.transfer(name)
        drained(storage)

    assert row_by_name_column(storage, name).status == Status.DONE
    assert not storage.local.exists(name)
    assert read_bytes(storage, name) == b"hello world"


def test_listdir_shows_pending_files_beside_transferred_ones(
    make_storage: MakeStorage, django_capture_on_commit_callbacks: Any
) -> None:
    storage = make_storage(task="queued_storage.tasks.TransferAndDelete")
    storage.save("d/transferred.txt", content())
    with django_capture_on_commit_callbacks(execute=True):
        drained(storage)
    storage.save("d/pending.txt", content())

    assert storage.listdir("d") == ([], ["pending.txt", "transferred.txt"])


def test_makemigrations_serialises_the_storage() -> None:
    field = Document._meta.get_field("file")

    source, imports = MigrationWriter.serialize(field)
    namespace: dict[str, Any] = {}
    exec("\n".join(sorted(imports)), namespace)
    rebuilt = eval(source, namespace)

    autodetector = MigrationAutodetector(ProjectState(), ProjectState())
    assert autodetector.deep_deconstruct(rebuilt) == autodetector.deep_deconstruct(
        field
    )
    assert rebuilt.storage.key == "documents"
    call_command(
        "makemigrations", "--check", "--dry-run", stdout=StringIO(), stderr=StringIO()
    )


def test_no_state_lives_in_a_cache(
    storage: QueuedStorage,
    settings: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    settings.CACHES = {"default": {"BACKEND": "tests.caches.ExplodingCache"}}
    with pytest.raises(AssertionError, match="cache"):
        caches["default"].get(storage.get_cache_key("a.txt"))

    name = storage.save("a.txt", content())
    assert storage.url(name) == "/media/a.txt"
    drained(storage)
    assert storage.url(name) == "https://remote.example/a.txt"
    with django_capture_on_commit_callbacks(execute=True):
        storage.delete(name)

    assert not storage.exists(name)
    assert not storage.remote.exists(name)


@pytest.mark.django_db(transaction=True)
def test_rolled_back_transaction_leaves_no_row_and_transfers_nothing(
    storage: QueuedStorage, settings: Any
) -> None:
    settings.QUEUED_STORAGE_WORKER = "immediate"
    remote: Any = storage.remote

    with contextlib.suppress(RuntimeError), transaction.atomic():
        storage.save("rolled-back.txt", content())
        raise RuntimeError("the view failed")

    assert not PendingTransfer.objects.filter(storage_key=storage.key).exists()
    assert not remote.exists("rolled-back.txt")
    assert remote.calls("save") == 0

    # The same save, committed, is transferred at once by the immediate worker.
    with transaction.atomic():
        name = storage.save("committed.txt", content())
    assert row_by_name_column(storage, name).status == Status.DONE
    assert read_bytes(remote, name) == b"hello world"
    assert remote.calls("save") == 1
