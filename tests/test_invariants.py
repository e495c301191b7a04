"""One test per invariant of DESIGN.md, named after it: each fails if it breaks."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.exceptions import SuspiciousFileOperation
from django.core.files.base import ContentFile
from django.db import connections, transaction
from django.test import Client
from django.utils import timezone

from queued_storage.backends import QueuedStorage
from queued_storage.models import PendingTransfer
from queued_storage.signals import file_transferred
from queued_storage.transfer import process_row
from queued_storage.worker import drain
from tests.factories import pending_row
from tests.helpers import content, remote_calls
from tests.storages import GatedStorage

pytestmark = pytest.mark.django_db

Make = Callable[..., QueuedStorage]


def _readable(storage: QueuedStorage, name: str, payload: bytes) -> None:
    assert storage.exists(name)
    assert storage.size(name) == len(payload)
    assert storage.url(name)
    with storage.open(name) as opened:
        assert opened.read() == payload


def _drain_and_disconnect() -> None:
    """A drain in a thread of its own, which closes the connections it opened."""
    try:
        drain()
    finally:
        connections.close_all()


@pytest.mark.django_db(transaction=True)
def test_invariant_1_nothing_lost(make_storage: Make, gate: type[GatedStorage]) -> None:
    """Queued, mid-upload, after a failed attempt, done, and done with the local copy
    removed: the file opens at every step."""
    payload = b"precious bytes" * 100
    storage = make_storage(remote="tests.storages.GatedStorage")
    name = storage.save("keep.bin", ContentFile(payload))
    _readable(storage, name, payload)

    worker = threading.Thread(target=_drain_and_disconnect)
    worker.start()
    assert gate.entered.wait(10)
    assert PendingTransfer.objects.get(name=name).status == "transferring"
    _readable(storage, name, payload)
    gate.gate.set()
    worker.join(10)
    assert PendingTransfer.objects.get(name=name).status == "done"
    _readable(storage, name, payload)

    flaky = make_storage(
        remote="tests.storages.FlakyStorage",
        remote_options={"failures": 1},
        task="queued_storage.tasks.TransferAndDelete",
    )
    name = flaky.save("flaky.bin", ContentFile(payload))
    drain()
    assert PendingTransfer.objects.get(storage_key=flaky.key).status == "queued"
    _readable(flaky, name, payload)
    PendingTransfer.objects.filter(storage_key=flaky.key).update(
        next_attempt_at=timezone.now()
    )
    drain()
    assert not flaky.local.exists(name)
    _readable(flaky, name, payload)


def test_invariant_2_ledger_is_the_truth(
    make_storage: Make,
    django_assert_num_queries: Any,
    django_capture_on_commit_callbacks: Any,
    settings: Any,
) -> None:
    """The row decides, with one query and no remote call; it commits or rolls back
    with the caller, and the wake-up comes only after commit."""
    storage = make_storage(remote="tests.storages.ExplodingStorage")
    name = storage.save("a.txt", content())
    with django_assert_num_queries(1):
        assert storage.url(name) == "/media/a.txt"
    with django_assert_num_queries(1):
        assert storage.exists(name)

    settings.QUEUED_STORAGE_WORKER = "immediate"
    counting = make_storage()
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        with transaction.atomic():
            name = counting.save("b.txt", content())
        assert remote_calls(counting, "save") == 0
    for callback in callbacks:  # the wake-up, and what keeps the file it wrote
        callback()
    assert remote_calls(counting, "save") == 1
    assert PendingTransfer.objects.get(storage_key=counting.key).status == "done"

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        try:
            with transaction.atomic():
                counting.save("rolled-back.txt", content())
                raise RuntimeError("the view failed")
        except RuntimeError:
            pass
    assert callbacks == []
    assert not PendingTransfer.objects.filter(name="rolled-back.txt").exists()
    assert remote_calls(counting, "save") == 1
    # A failed save leaves nothing served: not even through the no-row fallback.
    assert not counting.exists("rolled-back.txt")


def test_invariant_3_one_worker_per_file_and_late_workers_lose(
    storage: QueuedStorage,
) -> None:
    name = storage.save("race.txt", content())
    (late,) = PendingTransfer.objects.claim_due(limit=10, lease=60)
    assert PendingTransfer.objects.claim_due(limit=10, lease=60) == []

    # The late worker stalls past its lease; another takes the row and finishes.
    PendingTransfer.objects.filter(pk=late.pk).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1)
    )
    stats = drain()
    assert stats.done == 1
    finished = PendingTransfer.objects.get(pk=late.pk)
    assert finished.status == "done"

    # The late worker wakes up: it must not write the ledger.
    assert late.mark_done() is False
    process_row(late)
    after = PendingTransfer.objects.get(pk=late.pk)
    assert after.status == "done"
    assert after.transferred_at == finished.transferred_at
    assert after.lease_token == ""
    assert storage.remote.exists(name)


def test_invariant_3_resave_during_upload_is_handed_back(make_storage: Make) -> None:
    storage = make_storage(local_options={"allow_overwrite": True})
    name = storage.save("doc.txt", content("first"))
    (claimed,) = PendingTransfer.objects.claim_due(limit=1, lease=60)
    assert storage.save("doc.txt", content("second version")) == name
    process_row(claimed)
    row = PendingTransfer.objects.get(pk=claimed.pk)
    assert row.status == "queued"
    assert row.generation != claimed.generation
    drain()
    assert PendingTransfer.objects.get(pk=claimed.pk).status == "done"
    with storage.remote.open(name) as remote_copy:
        assert remote_copy.read() == b"second version"


def test_invariant_3_delete_during_upload_is_finished_by_the_worker(
    storage: QueuedStorage, django_capture_on_commit_callbacks: Any
) -> None:
    name = storage.save("gone.txt", content())
    (claimed,) = PendingTransfer.objects.claim_due(limit=1, lease=60)
    with django_capture_on_commit_callbacks(execute=True):
        storage.delete(name)
    assert not storage.exists(name)
    # The worker was mid-upload: its object lands after the delete's cleanup.
    process_row(claimed)
    assert not storage.remote.exists(name)
    assert not storage.local.exists(name)
    assert not PendingTransfer.objects.filter(pk=claimed.pk).exists()


def test_invariant_4_verified_before_done(make_storage: Make) -> None:
    truncating = make_storage(remote="tests.storages.TruncatingStorage")
    name = truncating.save("short.txt", content())
    drain()
    row = PendingTransfer.objects.get(storage_key=truncating.key)
    assert row.status != "done"
    assert "bytes" in row.last_error
    assert truncating.url(name) == "/media/short.txt"

    storage = make_storage()
    storage.remote.save("theirs.txt", ContentFile(b"not ours"))
    storage.save("theirs.txt", content("ours"))
    drain()
    row = PendingTransfer.objects.get(storage_key=storage.key)
    assert row.status == "failed"
    assert "did not put there" in row.last_error
    with storage.remote.open("theirs.txt") as foreign:
        assert foreign.read() == b"not ours"


def test_invariant_5_local_copy_last(
    make_storage: Make, django_capture_on_commit_callbacks: Any
) -> None:
    failing = make_storage(
        remote="tests.storages.TruncatingStorage",
        task="queued_storage.tasks.TransferAndDelete",
    )
    name = failing.save("keep.txt", content())
    drain()
    assert failing.local.exists(name)

    storage = make_storage(task="queued_storage.tasks.TransferAndDelete")
    name = storage.save("move.txt", content())
    seen: list[tuple[str, bool]] = []

    def receiver(sender: Any, name: str, local: Any, **kwargs: Any) -> None:
        row = PendingTransfer.objects.get(storage_key=storage.key, name=name)
        seen.append((row.status, local.exists(name)))

    file_transferred.connect(receiver)
    try:
        with django_capture_on_commit_callbacks(execute=True):
            drain()
    finally:
        file_transferred.disconnect(receiver)
    assert seen == [("done", True)]
    assert not storage.local.exists(name)
    assert storage.remote.exists(name)


def test_invariant_6_no_secrets_in_the_ledger(
    make_storage: Make, caplog: pytest.LogCaptureFixture, admin_client: Client
) -> None:
    secret = "sk-SUPERSECRET-123"
    storage = make_storage(
        remote="tests.storages.FlakyStorage",
        remote_options={"failures": 10},
        local_options={"file_permissions_mode": 0o600},
    )
    storage.remote_options["api_token"] = secret  # as if the remote took one
    name = storage.save("a.txt", content())
    with caplog.at_level(logging.DEBUG, logger="queued_storage"):
        drain()
    row = PendingTransfer.objects.get(storage_key=storage.key)
    assert row.last_error
    for value in PendingTransfer.objects.filter(pk=row.pk).values().get().values():
        assert secret not in str(value)
    assert secret not in caplog.text
    assert secret not in storage.describe()
    page = admin_client.get(f"/admin/queued_storage/pendingtransfer/{row.pk}/change/")
    assert page.status_code == 200
    assert name in page.content.decode()
    assert secret not in page.content.decode()

    # A key read from the database is never imported as a path.
    pending_row(storage_key="os.system", name="evil.txt")
    drain()
    evil = PendingTransfer.objects.get(name="evil.txt")
    assert "no QueuedStorage with key 'os.system'" in evil.last_error


def test_invariant_7_every_failure_is_visible(
    make_storage: Make, settings: Any, admin_client: Client
) -> None:
    settings.QUEUED_STORAGE_RETRIES = 2
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    storage = make_storage(
        remote="tests.storages.FlakyStorage", remote_options={"failures": 3}
    )
    name = storage.save("a.txt", content())
    drain()
    row = PendingTransfer.objects.get(storage_key=storage.key)
    assert row.status == "failed"
    assert row.attempts == 3
    assert [entry["attempt"] for entry in row.error_history] == [1, 2, 3]
    assert {entry["error"] for entry in row.error_history} == {"ConnectionError"}
    assert all(entry["at"] and entry["message"] for entry in row.error_history)

    response = admin_client.post(
        "/admin/queued_storage/pendingtransfer/",
        {"action": "retry_now", "_selected_action": [row.pk]},
    )
    assert response.status_code == 302
    row.refresh_from_db()
    assert (row.status, row.attempts) == ("queued", 0)
    drain()
    assert PendingTransfer.objects.get(pk=row.pk).status == "done"
    assert storage.using_remote(name)


def test_invariant_7_view_only_staff_cannot_requeue(make_storage: Make) -> None:
    from django.contrib.auth.models import Permission

    storage = make_storage()
    storage.save("a.txt", content())
    PendingTransfer.objects.update(status="failed")
    viewer = User.objects.create_user("viewer", password="x", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_pendingtransfer"))
    client = Client()
    client.force_login(viewer)
    listing = client.get("/admin/queued_storage/pendingtransfer/")
    assert listing.status_code == 200
    client.post(
        "/admin/queued_storage/pendingtransfer/",
        {
            "action": "retry_now",
            "_selected_action": list(
                PendingTransfer.objects.values_list("pk", flat=True)
            ),
        },
    )
    assert PendingTransfer.objects.get().status == "failed"


@pytest.mark.parametrize(
    "name",
    [
        "../escape.txt",
        "a/../../escape.txt",
        "/etc/passwd",
        "nul\x00byte.txt",
        "bell\x07.txt",
        "new\nline.txt",
        "x" * 1025,
        "",
    ],
)
def test_invariant_8_bad_input_changes_nothing(
    storage: QueuedStorage, name: str
) -> None:
    with pytest.raises((SuspiciousFileOperation, ValueError)):
        storage.save(name, content())
    assert not PendingTransfer.objects.exists()
    assert not storage.local.listdir("")[1] if storage.local.exists("") else True
