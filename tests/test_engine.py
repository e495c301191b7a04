"""The transfer engine: what drain(), process_row() and transfer_name() leave behind
on the remote, in the ledger and in the signals, with healthy and faulty remotes."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from django.core.files.base import ContentFile
from django.db import transaction
from django.utils import timezone

from queued_storage import claim_size, completions
from queued_storage.backends import QueuedStorage
from queued_storage.errors import Outcome
from queued_storage.models import MAX_RETRY_DELAY, PendingTransfer, retry_delay
from queued_storage.signals import file_transferred, transfer_failed
from queued_storage.stats import DrainStats
from queued_storage.transfer import process_row
from queued_storage.worker import drain, transfer_name
from tests.factories import pending_row, pending_rows
from tests.helpers import (
    ALWAYS_FAILING,
    FLAKY,
    KeeperClock,
    content,
    in_thread,
    joined,
    local_files,
    read_bytes,
    remote_calls,
    remote_files,
    root_of,
    row_of,
    wait_until,
)
from tests.storages import GatedStorage, PausingStorage

pytestmark = pytest.mark.django_db

Status = PendingTransfer.Status


# Helpers


def remote_bytes(storage: QueuedStorage, name: str) -> bytes:
    return Path(storage.remote.path(name)).read_bytes()


def in_other_connection(function: Callable[[], Any]) -> Any:
    """What another connection sees: only what was committed."""
    thread, result = in_thread(function)
    thread.join(timeout=30)
    if "error" in result:
        raise result["error"]
    return result["value"]


@pytest.fixture
def received() -> Iterator[dict[str, list[dict[str, Any]]]]:
    """Every file_transferred and transfer_failed sent during the test."""
    sent: dict[str, list[dict[str, Any]]] = {"transferred": [], "failed": []}

    def on_transferred(sender: Any, **kwargs: Any) -> None:
        sent["transferred"].append({"sender": sender, **kwargs})

    def on_failed(sender: Any, **kwargs: Any) -> None:
        sent["failed"].append({"sender": sender, **kwargs})

    file_transferred.connect(on_transferred, weak=False)
    transfer_failed.connect(on_failed, weak=False)
    yield sent
    file_transferred.disconnect(on_transferred)
    transfer_failed.disconnect(on_failed)


def _expire_lease(row: PendingTransfer) -> None:
    PendingTransfer.objects.filter(pk=row.pk).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1)
    )


# drain(): the happy path


def test_drain_copies_identical_bytes_and_marks_done(
    storage: QueuedStorage, run_drain: Callable[..., DrainStats]
) -> None:
    payload = os.urandom(200_000)  # several chunks
    name = storage.save("docs/big.bin", ContentFile(payload))
    before = timezone.now()

    stats = run_drain()

    row = row_of(storage, name)
    assert row.status == Status.DONE
    assert row.transferred_at is not None
    assert before <= row.transferred_at <= timezone.now()
    assert row.last_error == ""
    assert remote_bytes(storage, name) == payload
    assert storage.using_remote(name)
    assert read_bytes(storage, name) == payload
    assert (stats.done, stats.retried, stats.failed) == (1, 0, 0)
    assert stats.bytes == len(payload)


def test_drain_with_nothing_due_does_nothing(
    storage: QueuedStorage, run_drain: Callable[..., DrainStats]
) -> None:
    stats = run_drain()

    assert stats.processed == 0
    assert remote_files(storage) == []


@pytest.mark.django_db(transaction=True)
def test_file_transferred_sent_once_after_the_done_commit(
    storage: QueuedStorage, received: dict[str, list[dict[str, Any]]]
) -> None:
    name = storage.save("a.txt", content("signal me"))
    pk = row_of(storage, name).pk
    seen_by_other_connection: list[str] = []

    def check_commit(sender: Any, **kwargs: Any) -> None:
        seen_by_other_connection.append(
            in_other_connection(lambda: PendingTransfer.objects.get(pk=pk).status)
        )

    file_transferred.connect(check_commit, weak=False)
    try:
        drain()
    finally:
        file_transferred.disconnect(check_commit)

    assert seen_by_other_connection == [Status.DONE]
    [sent] = received["transferred"]
    assert sent["name"] == name
    assert sent["local"] is storage.local
    assert sent["remote"] is storage.remote
    assert sent["key"] == storage.key
    assert received["failed"] == []


@pytest.mark.django_db(transaction=True)
def test_failing_file_transferred_receiver_does_not_stop_the_drain(
    storage: QueuedStorage,
) -> None:
    names = [storage.save(f"f{i}.txt", content(f"file {i}")) for i in range(2)]

    def broken_receiver(sender: Any, **kwargs: Any) -> None:
        raise RuntimeError("receiver bug")

    file_transferred.connect(broken_receiver, weak=False)
    try:
        stats = drain()
    finally:
        file_transferred.disconnect(broken_receiver)

    assert (stats.done, stats.stale) == (2, 0)
    for i, name in enumerate(names):
        assert row_of(storage, name).status == Status.DONE
        assert remote_bytes(storage, name) == f"file {i}".encode()


# Retries


def test_retry_without_delay_happens_in_the_same_drain(
    make_storage: Callable[..., QueuedStorage],
    settings: Any,
    run_drain: Callable[..., DrainStats],
    received: dict[str, list[dict[str, Any]]],
) -> None:
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    storage = make_storage(remote=FLAKY, remote_options={"failures": 2})
    name = storage.save("a.txt", content("third time lucky"))

    stats = run_drain()

    row = row_of(storage, name)
    assert row.status == Status.DONE
    assert row.attempts == 3
    assert remote_bytes(storage, name) == b"third time lucky"
    assert [entry["attempt"] for entry in row.error_history] == [1, 2]
    for entry in row.error_history:
        assert entry["error"] == "ConnectionError"
        assert entry["message"] == "remote unreachable"
        assert datetime.fromisoformat(entry["at"]) <= timezone.now()
    assert (stats.done, stats.retried, stats.failed) == (1, 2, 0)
    assert len(received["transferred"]) == 1
    assert received["failed"] == []


def test_retry_with_delay_waits_for_the_backoff(
    make_storage: Callable[..., QueuedStorage],
    settings: Any,
    run_drain: Callable[..., DrainStats],
) -> None:
    settings.QUEUED_STORAGE_RETRY_DELAY = 60
    storage = make_storage(remote=FLAKY, remote_options={"failures": 1})
    name = storage.save("a.txt", content("later"))
    before = timezone.now()

    first = run_drain()

    after = timezone.now()
    row = row_of(storage, name)
    assert (first.retried, first.done) == (1, 0)
    assert row.status == Status.QUEUED
    assert row.attempts == 1
    assert row.last_error == "ConnectionError: remote unreachable"
    assert row.next_attempt_at is not None
    assert before + timedelta(seconds=54) <= row.next_attempt_at
    assert row.next_attempt_at <= after + timedelta(seconds=66)
    assert storage.using_local(name)

    second = run_drain()

    assert second.processed == 0
    assert row_of(storage, name).attempts == 1
    assert remote_files(storage) == []

    # Once the backoff has passed, the row is due again and goes through.
    PendingTransfer.objects.filter(pk=row.pk).update(
        next_attempt_at=timezone.now() - timedelta(seconds=1)
    )
    third = run_drain()

    assert third.done == 1
    assert row_of(storage, name).status == Status.DONE
    assert remote_bytes(storage, name) == b"later"


@pytest.mark.parametrize("attempt", [1, 2, 3, 4, 5, 6])
def test_retry_delay_doubles_per_attempt(attempt: int) -> None:
    expected = 60.0 * 2 ** (attempt - 1)

    delays = [retry_delay(attempt, 60.0) for _ in range(50)]

    assert all(0.9 * expected <= delay <= 1.1 * expected for delay in delays)
    assert len(set(delays)) > 1  # jittered, so that workers do not retry in step


@pytest.mark.parametrize("attempt", [12, 50, 1_100, 10_000])
def test_retry_delay_is_capped_at_a_day(attempt: int) -> None:
    delay = retry_delay(attempt, 60.0)

    assert delay <= MAX_RETRY_DELAY == 24 * 60 * 60
    assert delay >= 0.9 * MAX_RETRY_DELAY


def test_retry_delay_of_zero_means_at_once() -> None:
    assert retry_delay(3, 0) == 0


def test_out_of_attempts_fails_and_sends_transfer_failed(
    make_storage: Callable[..., QueuedStorage],
    settings: Any,
    run_drain: Callable[..., DrainStats],
    received: dict[str, list[dict[str, Any]]],
) -> None:
    settings.QUEUED_STORAGE_RETRIES = 2
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    storage = make_storage(remote=FLAKY, remote_options=ALWAYS_FAILING)
    name = storage.save("a.txt", content("stuck here"))

    stats = run_drain()

    row = row_of(storage, name)
    assert row.status == Status.FAILED
    assert row.attempts == 3
    assert row.next_attempt_at is None
    assert len(row.error_history) == 3
    assert (stats.failed, stats.retried, stats.done) == (1, 2, 0)
    [failed] = received["failed"]
    assert failed["name"] == name
    assert failed["error"] == "ConnectionError: remote unreachable"
    assert received["transferred"] == []
    # Nothing lost: the file is still served from the local copy.
    assert read_bytes(storage, name) == b"stuck here"
    # And a failed row is not due: the next drain leaves it alone.
    assert run_drain().processed == 0


@pytest.mark.parametrize(
    "task",
    ["tests.hooks.OneRetryNoDelayTransfer", "class"],
    ids=["dotted-path", "class"],
)
def test_transfer_class_retry_attributes_override_settings(
    make_storage: Callable[..., QueuedStorage],
    settings: Any,
    run_drain: Callable[..., DrainStats],
    task: str,
) -> None:
    from tests.hooks import OneRetryNoDelayTransfer

    settings.QUEUED_STORAGE_RETRIES = 5
    settings.QUEUED_STORAGE_RETRY_DELAY = 60
    storage = make_storage(
        remote=FLAKY,
        remote_options=ALWAYS_FAILING,
        task=OneRetryNoDelayTransfer if task == "class" else task,
    )
    name = storage.save("a.txt", content())

    run_drain()

    # One retry (max_retries=1), at once (default_retry_delay=0): both beat settings.
    row = row_of(storage, name)
    assert row.status == Status.FAILED
    assert row.attempts == 2


def test_transfer_class_retry_delay_overrides_a_zero_setting(
    make_storage: Callable[..., QueuedStorage],
    settings: Any,
    run_drain: Callable[..., DrainStats],
) -> None:
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    storage = make_storage(
        remote=FLAKY,
        remote_options=ALWAYS_FAILING,
        task="tests.hooks.SlowRetryTransfer",
    )
    name = storage.save("a.txt", content())
    before = timezone.now()

    run_drain()

    row = row_of(storage, name)
    assert row.status == Status.QUEUED
    assert row.attempts == 1
    assert row.next_attempt_at is not None
    assert row.next_attempt_at >= before + timedelta(seconds=540)


# The hook contract: True done, False retry, anything else a programming error


def test_hook_returning_false_is_retried_then_done(
    make_storage: Callable[..., QueuedStorage],
    settings: Any,
    run_drain: Callable[..., DrainStats],
) -> None:
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    storage = make_storage(task="tests.hooks.FalseOnceTransfer")
    name = storage.save("a.txt", content("eventually"))

    run_drain()

    row = row_of(storage, name)
    assert row.status == Status.DONE
    assert row.attempts == 2
    assert "returned False" in row.error_history[0]["message"]
    assert remote_bytes(storage, name) == b"eventually"


def test_hook_returning_none_fails_at_once_with_a_clear_error(
    make_storage: Callable[..., QueuedStorage],
    settings: Any,
    run_drain: Callable[..., DrainStats],
    received: dict[str, list[dict[str, Any]]],
) -> None:
    settings.QUEUED_STORAGE_RETRIES = 5
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    storage = make_storage(task="tests.hooks.ReturnsNoneTransfer")
    name = storage.save("a.txt", content())

    stats = run_drain()

    row = row_of(storage, name)
    assert row.status == Status.FAILED
    assert row.attempts == 1  # not retried, although retries and no delay remain
    assert "ReturnsNoneTransfer" in row.last_error
    assert "None" in row.last_error
    assert "must return True" in row.last_error
    assert "False" in row.last_error
    assert stats.failed == 1
    assert len(received["failed"]) == 1
    assert received["transferred"] == []
    assert storage.using_local(name)


def test_hook_that_raises_is_retried(
    make_storage: Callable[..., QueuedStorage],
    settings: Any,
    run_drain: Callable[..., DrainStats],
) -> None:
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    storage = make_storage(task="tests.hooks.RaisesOnceTransfer")
    name = storage.save("a.txt", content("second try"))

    run_drain()

    row = row_of(storage, name)
    assert row.status == Status.DONE
    assert row.attempts == 2
    assert row.error_history[0]["error"] == "RuntimeError"
    assert row.error_history[0]["message"] == "hook exploded"
    assert remote_bytes(storage, name) == b"second try"


# TransferAndDelete: the local copy goes last


@pytest.mark.django_db(transaction=True)
def test_transfer_and_delete_removes_local_only_after_the_done_commit(
    make_storage: Callable[..., QueuedStorage],
) -> None:
    storage = make_storage(task="queued_storage.tasks.TransferAndDelete")
    name = storage.save("a.txt", content("moved away"))
    pk = row_of(storage, name).pk
    observed: list[tuple[str, bool]] = []

    def on_transferred(sender: Any, **kwargs: Any) -> None:
        # The signal comes after the DONE commit and before the local delete.
        status = in_other_connection(lambda: PendingTransfer.objects.get(pk=pk).status)
        observed.append((status, storage.local.exists(name)))

    file_transferred.connect(on_transferred, weak=False)
    try:
        drain()
    finally:
        file_transferred.disconnect(on_transferred)

    assert observed == [(Status.DONE, True)]
    assert not storage.local.exists(name)
    assert row_of(storage, name).status == Status.DONE
    assert storage.exists(name)
    assert read_bytes(storage, name) == b"moved away"
    assert storage.url(name).startswith("https://remote.example/")
    saves = remote_calls(storage, "save")

    # Asking again for a file already moved is a no-op, not an error.
    assert storage.transfer(name) is False
    stats = drain()

    assert stats.processed == 0
    assert remote_calls(storage, "save") == saves == 1
    row = row_of(storage, name)
    assert row.status == Status.DONE
    assert row.last_error == ""
    assert read_bytes(storage, name) == b"moved away"


def test_transfer_and_delete_keeps_the_local_copy_when_the_transfer_fails(
    make_storage: Callable[..., QueuedStorage],
    settings: Any,
    run_drain: Callable[..., DrainStats],
) -> None:
    settings.QUEUED_STORAGE_RETRIES = 0
    storage = make_storage(
        remote=FLAKY,
        remote_options=ALWAYS_FAILING,
        task="queued_storage.tasks.TransferAndDelete",
    )
    name = storage.save("a.txt", content("keep me"))

    run_drain()

    assert row_of(storage, name).status == Status.FAILED
    assert storage.local.exists(name)
    assert read_bytes(storage, name) == b"keep me"


# Faulty remotes


def test_remote_that_renames_is_not_done_and_is_never_trusted_with_a_delete(
    make_storage: Callable[..., QueuedStorage],
    run_drain: Callable[..., DrainStats],
) -> None:
    """The copy under the name the remote invented is reported, not deleted: the
    engine cannot know what a name it did not choose holds."""
    storage = make_storage(remote="tests.storages.RenamingStorage")
    name = storage.save("a.txt", content("keep my name"))

    stats = run_drain()

    row = row_of(storage, name)
    assert row.status == Status.FAILED
    assert stats.done == 0
    assert "must keep the name" in row.last_error
    assert "'renamed/a.txt' was left alone" in row.last_error
    assert remote_files(storage) == ["renamed/a.txt"]
    assert remote_calls(storage, "delete") == 0
    assert read_bytes(storage, name) == b"keep my name"


def test_a_remote_that_renames_gives_no_ownership_of_the_name(
    make_storage: Callable[..., QueuedStorage],
    run_drain: Callable[..., DrainStats],
    django_capture_on_commit_callbacks: Any,
) -> None:
    """An upload the remote saved under another name wrote nothing at ours: the
    row does not own what is at the name, so neither its next attempt nor a
    delete() removes a file someone else put there since."""
    storage = make_storage(remote="tests.storages.RenamingStorage")
    name = storage.save("a.txt", content("mine"))
    run_drain()
    assert row_of(storage, name).remote_owned is False
    theirs = root_of(storage.remote) / "a.txt"
    theirs.write_bytes(b"someone else's file")

    assert storage.transfer(name)
    run_drain()
    assert theirs.read_bytes() == b"someone else's file"
    with django_capture_on_commit_callbacks(execute=True):
        storage.delete(name)
    run_drain()

    assert theirs.read_bytes() == b"someone else's file"
    assert remote_calls(storage, "delete") == 0


def test_a_name_a_remote_returns_instead_of_ours_keeps_the_file_it_holds(
    make_storage: Callable[..., QueuedStorage],
    run_drain: Callable[..., DrainStats],
) -> None:
    """A remote whose save() answers another name, where another file lives: that
    file survives, and the row fails with the remote's renaming as its error."""
    storage = make_storage(remote="tests.storages.MisreportingStorage")
    theirs = root_of(storage.remote) / "elsewhere" / "a.txt"
    theirs.parent.mkdir(parents=True)
    theirs.write_bytes(b"someone else's file")
    name = storage.save("a.txt", content("mine"))

    stats = run_drain()

    row = row_of(storage, name)
    assert (stats.failed, row.status) == (1, Status.FAILED)
    assert row.last_error.startswith("RemoteRenamed: ")
    assert theirs.read_bytes() == b"someone else's file"
    assert remote_calls(storage, "delete") == 0
    assert read_bytes(storage, name) == b"mine"


def test_size_mismatch_is_not_done_and_is_retried(
    make_storage: Callable[..., QueuedStorage],
    settings: Any,
    run_drain: Callable[..., DrainStats],
) -> None:
    settings.QUEUED_STORAGE_RETRIES = 2
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    storage = make_storage(remote="tests.storages.TruncatingStorage")
    name = storage.save("a.txt", content("hello world"))

    stats = run_drain()

    row = row_of(storage, name)
    assert row.status == Status.FAILED
    assert row.attempts == 3  # retried, not failed for good on the first try
    assert stats.retried == 2
    assert [entry["error"] for entry in row.error_history] == ["SizeMismatch"] * 3
    assert "10 bytes" in row.last_error
    assert "11" in row.last_error
    # The truncated remote copy is never served.
    assert read_bytes(storage, name) == b"hello world"
    assert storage.size(name) == 11


def test_foreign_remote_object_is_a_conflict_and_left_untouched(
    storage: QueuedStorage,
    run_drain: Callable[..., DrainStats],
    received: dict[str, list[dict[str, Any]]],
) -> None:
    foreign = root_of(storage.remote) / "a.txt"
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"not yours")
    name = storage.save("a.txt", content("mine"))
    assert name == "a.txt"

    stats = run_drain()

    row = row_of(storage, name)
    assert row.status == Status.FAILED
    assert row.attempts == 1
    assert stats.failed == 1
    assert "did not put there" in row.last_error
    assert "move or delete it, then re-queue" in row.last_error
    assert foreign.read_bytes() == b"not yours"
    assert remote_calls(storage, "save") == 0
    assert read_bytes(storage, name) == b"mine"
    assert len(received["failed"]) == 1

    # Doing what the error says resolves it.
    foreign.unlink()
    assert storage.transfer(name) is True
    run_drain()

    assert row_of(storage, name).status == Status.DONE
    assert remote_bytes(storage, name) == b"mine"


def test_ownership_is_earned_by_writing_not_by_claiming(
    make_storage: Callable[..., QueuedStorage],
    run_drain: Callable[..., DrainStats],
    settings: Any,
) -> None:
    """The first attempt fails in the existence check, before it writes; then an
    object the ledger did not write appears at the name. The second attempt must
    not take it for its own: a conflict, and the object's bytes intact."""
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    storage = make_storage(remote="tests.storages.FailingExistsStorage")
    name = storage.save("a.txt", content("mine"))

    run_drain(limit=1)

    row = row_of(storage, name)
    assert (row.status, row.attempts) == (Status.QUEUED, 1)
    assert "the existence check timed out" in row.last_error
    assert row.remote_owned is False
    foreign = root_of(storage.remote) / "a.txt"
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"not yours")

    stats = run_drain()

    row = row_of(storage, name)
    assert (stats.failed, row.status, row.attempts) == (1, Status.FAILED, 2)
    assert "did not put there" in row.last_error
    assert row.remote_owned is False
    assert foreign.read_bytes() == b"not yours"
    assert remote_calls(storage, "save") == 0
    assert read_bytes(storage, name) == b"mine"


@pytest.mark.parametrize(
    ("remote", "asks_first"),
    [
        ("django.core.files.storage.FileSystemStorage", False),
        ("tests.storages.OverwritingStorage", True),
    ],
    ids=["file-system-storage", "overwriting-subclass"],
)
def test_a_remote_that_renames_is_its_own_existence_check(
    make_storage: Callable[..., QueuedStorage],
    run_drain: Callable[..., DrainStats],
    monkeypatch: pytest.MonkeyPatch,
    remote: str,
    asks_first: bool,
) -> None:
    """Django's FileSystemStorage creates files exclusively and renames a taken
    name: the upload needs no exists() first, and what it renames is a conflict,
    with no copy left behind. A subclass that may overwrite is asked first."""
    storage = make_storage(remote=remote)
    asked: list[str] = []
    exists = storage.remote.exists

    def noting_exists(name: str) -> bool:
        asked.append(name)
        return exists(name)

    monkeypatch.setattr(storage.remote, "exists", noting_exists)
    foreign = root_of(storage.remote) / "a.txt"
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"not yours")
    taken = storage.save("a.txt", content("mine"))
    free = storage.save("b.txt", content("also mine"))

    stats = run_drain()

    assert (stats.done, stats.failed) == (1, 1)
    assert row_of(storage, free).status == Status.DONE
    row = row_of(storage, taken)
    assert row.status == Status.FAILED
    assert "did not put there" in row.last_error
    assert foreign.read_bytes() == b"not yours"
    assert sorted(os.listdir(foreign.parent)) == ["a.txt", "b.txt"]
    # The stock storage's file is created exclusively, with no question; the
    # subclass's own save asks once, and the engine asking first makes it twice.
    assert asked.count("b.txt") == (2 if asks_first else 0)


# Leases


def test_row_with_expired_lease_is_claimed_again_and_completed(
    storage: QueuedStorage, run_drain: Callable[..., DrainStats]
) -> None:
    name = storage.save("a.txt", content("crash survivor"))
    # A worker claimed the row, wrote half the file, and died.
    PendingTransfer.objects.for_name(storage.key, name).update(
        status=Status.TRANSFERRING,
        lease_token="dead" * 8,
        lease_expires_at=timezone.now() - timedelta(seconds=5),
        attempts=1,
        remote_owned=True,
    )
    partial = root_of(storage.remote) / name
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"crash")

    stats = run_drain()

    row = row_of(storage, name)
    assert stats.done == 1
    assert row.status == Status.DONE
    assert row.attempts == 2
    assert remote_bytes(storage, name) == b"crash survivor"
    assert remote_files(storage) == [name]


def test_row_with_live_lease_is_not_claimed(
    storage: QueuedStorage, run_drain: Callable[..., DrainStats]
) -> None:
    name = storage.save("a.txt", content())
    token = "live" * 8
    PendingTransfer.objects.for_name(storage.key, name).update(
        status=Status.TRANSFERRING,
        lease_token=token,
        lease_expires_at=timezone.now() + timedelta(minutes=5),
        attempts=1,
    )

    stats = run_drain()

    row = row_of(storage, name)
    assert stats.processed == 0
    assert row.status == Status.TRANSFERRING
    assert row.lease_token == token
    assert remote_files(storage) == []


def test_claim_due_never_returns_a_row_twice() -> None:
    rows = pending_rows(5)

    first = PendingTransfer.objects.claim_due(limit=3, lease=300)
    second = PendingTransfer.objects.claim_due(limit=10, lease=300)
    third = PendingTransfer.objects.claim_due(limit=10, lease=300)

    assert len(first) == 3
    assert len(second) == 2
    assert third == []
    assert {row.pk for row in first} | {row.pk for row in second} == {
        row.pk for row in rows
    }
    assert len({row.lease_token for row in first + second}) == 2
    for row in first + second:
        assert row.status == Status.TRANSFERRING
        assert row.attempts == 1
        assert row.claimed_from == Status.QUEUED


def test_claim_due_skips_rows_not_yet_due_held_done_and_failed() -> None:
    pending_row(next_attempt_at=timezone.now() + timedelta(minutes=1))
    pending_row(status=Status.HELD, next_attempt_at=None)
    pending_row(status=Status.DONE, next_attempt_at=None)
    pending_row(status=Status.FAILED, next_attempt_at=None)
    due = pending_row()

    claimed = PendingTransfer.objects.claim_due(limit=10, lease=300)

    assert [row.pk for row in claimed] == [due.pk]


@pytest.mark.django_db(transaction=True)
def test_concurrent_claims_never_share_a_row() -> None:
    rows = pending_rows(40)
    start = threading.Barrier(6)

    def claim_all() -> list[int]:
        start.wait(timeout=10)
        mine: list[int] = []
        while claimed := PendingTransfer.objects.claim_due(limit=3, lease=300):
            mine.extend(row.pk for row in claimed)
        return mine

    workers = [in_thread(claim_all) for _ in range(6)]
    claims = [pk for thread, result in workers for pk in joined(thread, result)]

    assert sorted(claims) == sorted(row.pk for row in rows)


def test_release_claim_gives_unstarted_rows_back() -> None:
    pending_rows(3)
    claimed = PendingTransfer.objects.claim_due(limit=3, lease=300)
    assert claimed[0].mark_done()  # this one was finished: not given back

    released = PendingTransfer.objects.release_claim(claimed)

    assert released == 2
    assert PendingTransfer.objects.done().count() == 1
    back = PendingTransfer.objects.queued()
    assert back.count() == 2
    for row in back:
        assert row.lease_token == ""
        assert row.lease_expires_at is None
        assert row.attempts == 0
    again = PendingTransfer.objects.claim_due(limit=10, lease=300)
    assert {row.pk for row in again} == {row.pk for row in back}


def test_release_claim_gives_back_a_claim_of_a_thousand_rows() -> None:
    # process_transfers --batch-size 1000: SQLite refused the hand-back of such
    # a claim, an OR of 1,000 conditions ("Expression tree is too large").
    pending_rows(1000)
    claimed = PendingTransfer.objects.claim_due(limit=1000, lease=300)
    assert len(claimed) == 1000

    assert PendingTransfer.objects.release_claim(claimed) == 1000

    assert PendingTransfer.objects.due().count() == 1000
    assert not PendingTransfer.objects.transferring().exists()


@pytest.mark.django_db(transaction=True)
def test_lease_is_renewed_while_a_long_transfer_runs(
    make_storage: Callable[..., QueuedStorage],
    gate: type[GatedStorage],
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A lease no loaded machine outlasts; a timeout of 1 s has the keeper renew
    # every 1/3 s of its clock, which stands still but for the test's move.
    settings.QUEUED_STORAGE_LEASE = 60
    settings.QUEUED_STORAGE_TRANSFER_TIMEOUT = 1
    clock = KeeperClock(monkeypatch)
    storage = make_storage(remote="tests.storages.GatedStorage")
    name = storage.save("a.txt", content("slow upload"))
    worker, result = in_thread(drain)
    assert gate.entered.wait(timeout=10)
    first = row_of(storage, name).lease_expires_at
    assert first is not None
    clock.advance(0.5)  # a renewal due (1/3 s), the timeout (1 s) not reached

    def renewed() -> bool:
        expires = row_of(storage, name).lease_expires_at
        return expires is not None and expires > first

    assert wait_until(renewed), "the lease was never renewed"
    renewed_until = row_of(storage, name).lease_expires_at
    assert renewed_until is not None
    # Past the first lease, before the renewed one ends: only renewal keeps
    # another worker off the row.
    then = first + (renewed_until - first) / 2
    rival = PendingTransfer.objects.claim_due(limit=10, lease=300, now=then)
    during = row_of(storage, name)

    gate.gate.set()
    stats = joined(worker, result)
    assert rival == []
    assert during.lease_expires_at is not None
    assert during.lease_expires_at > timezone.now() - timedelta(seconds=1)
    assert stats.done == 1
    assert row_of(storage, name).status == Status.DONE
    assert remote_calls(storage, "save") == 1


# Late workers lose (compare-and-set on generation and lease token)


@pytest.mark.parametrize(
    "new_text", ["new", "brand new content"], ids=["same-size", "other-size"]
)
def test_stale_generation_never_marks_done_and_hands_the_row_back(
    make_storage: Callable[..., QueuedStorage],
    run_drain: Callable[..., DrainStats],
    django_capture_on_commit_callbacks: Any,
    new_text: str,
) -> None:
    storage = make_storage(local_options={"allow_overwrite": True})
    name = storage.save("a.txt", content("old"))
    [claimed] = PendingTransfer.objects.claim_due(limit=1, lease=300)

    assert storage.save("a.txt", content(new_text)) == name

    current = row_of(storage, name)
    assert current.generation != claimed.generation
    assert claimed.mark_done() is False
    assert row_of(storage, name).status != Status.DONE
    with django_capture_on_commit_callbacks(execute=True):
        assert process_row(claimed) is Outcome.STALE

    row = row_of(storage, name)
    assert row.status == Status.QUEUED
    assert row.generation == current.generation
    assert read_bytes(storage, name) == new_text.encode()

    run_drain()

    assert row_of(storage, name).status == Status.DONE
    assert remote_bytes(storage, name) == new_text.encode()
    assert read_bytes(storage, name) == new_text.encode()


def test_worker_whose_lease_was_taken_over_loses(
    storage: QueuedStorage, django_capture_on_commit_callbacks: Any
) -> None:
    name = storage.save("a.txt", content("payload"))
    [late] = PendingTransfer.objects.claim_due(limit=1, lease=300)
    _expire_lease(late)
    [taker] = PendingTransfer.objects.claim_due(limit=1, lease=300)
    assert taker.pk == late.pk
    assert taker.lease_token != late.lease_token

    assert late.mark_done() is False
    assert late.mark_failure("boom", retry=True, max_retries=5, base_delay=0) is None
    with django_capture_on_commit_callbacks(execute=True):
        assert process_row(taker) is Outcome.DONE
        assert process_row(late) is Outcome.STALE

    row = row_of(storage, name)
    assert row.status == Status.DONE
    assert row.last_error == ""
    assert remote_bytes(storage, name) == b"payload"
    assert remote_calls(storage, "save") == 1


def _late_worker(
    row: PendingTransfer, pausing: type[PausingStorage]
) -> tuple[threading.Thread, dict[str, Any]]:
    """process_row(row) in a thread; ``pausing.paused`` is set when it pauses or
    ends, whichever comes first."""

    def work() -> Outcome:
        try:
            return process_row(row)
        finally:
            pausing.paused.set()

    return in_thread(work)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("paused_in", "transferred_before"),
    [("exists", False), ("get_available_name", True)],
    ids=["first-upload", "re-upload"],
)
def test_a_late_worker_paused_before_its_upload_never_overwrites_a_newer_copy(
    make_storage: Callable[..., QueuedStorage],
    pausing: type[PausingStorage],
    paused_in: str,
    transferred_before: bool,
) -> None:
    """A worker stops between looking at the remote and uploading; its lease runs
    out, another worker takes the row over and finishes it, and the name is saved
    again and transferred again. The late worker must check its lease before the
    upload: on a remote that overwrites, its upload (here one that fails half-way)
    would replace the newest copy."""
    storage = make_storage(
        remote="tests.storages.PausingStorage",
        remote_options={"allow_overwrite": True},
        local_options={"allow_overwrite": True},
    )
    name = storage.save("a.txt", content("first"))
    if transferred_before:
        drain(keys=[storage.key])
        storage.save("a.txt", content("second"))
    [late] = PendingTransfer.objects.claim_due(limit=1, lease=300)
    pausing.arm(paused_in)
    worker, result = _late_worker(late, pausing)
    pausing.break_write_in = worker
    assert pausing.paused.wait(timeout=10)
    assert worker.is_alive()

    _expire_lease(late)
    assert drain(keys=[storage.key]).done == 1  # the row taken over and finished
    storage.save("a.txt", content("the newest"))
    assert drain(keys=[storage.key]).done == 1
    pausing.resume.set()

    assert joined(worker, result) is Outcome.STALE
    row = row_of(storage, name)
    assert row.status == Status.DONE
    assert remote_bytes(storage, name) == b"the newest"
    assert read_bytes(storage, name) == b"the newest"


@pytest.mark.django_db(transaction=True)
def test_a_late_worker_whose_name_was_deleted_never_deletes_a_newer_copy(
    make_storage: Callable[..., QueuedStorage],
    pausing: type[PausingStorage],
) -> None:
    """A worker's lease runs out during its upload; the name is deleted (the
    tombstone purged) and the upload lands. The late worker must not remove what
    it left by itself: by the time it would, the name can be saved and transferred
    again, and its delete would take the newer copy."""
    storage = make_storage(remote="tests.storages.PausingStorage")
    name = storage.save("a.txt", content("deleted soon"))
    [late] = PendingTransfer.objects.claim_due(limit=1, lease=300)
    pausing.arm("_save")
    worker, result = _late_worker(late, pausing)
    assert pausing.paused.wait(timeout=10)
    _expire_lease(late)
    storage.delete(name)
    assert not storage.exists(name)

    upload = pausing.resume
    pausing.arm("delete", worker)  # the late worker's own clean-up, if it makes one
    upload.set()
    assert pausing.paused.wait(timeout=10)
    assert not storage.exists(name)  # what the upload left is not served
    storage.save("a.txt", content("saved again"))
    drain(keys=[storage.key])
    pausing.resume.set()
    joined(worker, result)

    row = row_of(storage, name)
    assert row.status == Status.DONE, row.last_error
    assert remote_bytes(storage, name) == b"saved again"
    assert read_bytes(storage, name) == b"saved again"


@pytest.mark.django_db(transaction=True)
def test_resave_during_a_transfer_hands_the_row_back_for_the_new_content(
    make_storage: Callable[..., QueuedStorage], gate: type[GatedStorage]
) -> None:
    storage = make_storage(
        remote="tests.storages.GatedStorage", local_options={"allow_overwrite": True}
    )
    name = storage.save("a.txt", content("old content"))
    old_generation = row_of(storage, name).generation
    worker, result = in_thread(lambda: drain(limit=1))
    assert gate.entered.wait(timeout=10)

    assert storage.save("a.txt", content("the new content")) == name

    during = row_of(storage, name)
    assert during.generation != old_generation
    assert during.status == Status.TRANSFERRING  # the worker still holds it
    gate.gate.set()
    stats = joined(worker, result)

    row = row_of(storage, name)
    assert stats.done == 0
    assert row.status == Status.QUEUED
    assert row.generation == during.generation
    assert read_bytes(storage, name) == b"the new content"

    drain()

    assert row_of(storage, name).status == Status.DONE
    assert remote_bytes(storage, name) == b"the new content"
    assert read_bytes(storage, name) == b"the new content"


@pytest.mark.django_db(transaction=True)
def test_delete_during_a_transfer_leaves_nothing_behind(
    make_storage: Callable[..., QueuedStorage], gate: type[GatedStorage]
) -> None:
    storage = make_storage(remote="tests.storages.GatedStorage")
    name = storage.save("a.txt", content("short-lived"))
    worker, result = in_thread(lambda: drain(limit=1))
    assert gate.entered.wait(timeout=10)

    storage.delete(name)

    assert not storage.exists(name)
    with pytest.raises(FileNotFoundError):
        storage.open(name)
    gate.gate.set()
    stats = joined(worker, result)

    assert stats.done == 0
    assert stats.purged == 1
    assert not PendingTransfer.objects.filter(storage_key=storage.key).exists()
    assert remote_files(storage) == []
    assert local_files(storage) == []
    assert not storage.exists(name)
    assert drain().processed == 0


# Rows the worker cannot handle do not stop the others


def test_unknown_storage_key_is_recorded_and_the_drain_goes_on(
    storage: QueuedStorage, run_drain: Callable[..., DrainStats]
) -> None:
    orphan = pending_row(storage_key="nope", name="lost.txt")
    first = storage.save("a.txt", content("one"))
    second = storage.save("b.txt", content("two"))

    stats = run_drain()

    orphan.refresh_from_db()
    assert orphan.status == Status.QUEUED
    assert orphan.attempts == 1
    assert "UnknownStorage" in orphan.last_error
    assert "'nope'" in orphan.last_error
    assert stats.done == 2
    assert row_of(storage, first).status == Status.DONE
    assert row_of(storage, second).status == Status.DONE
    assert remote_bytes(storage, first) == b"one"
    assert remote_bytes(storage, second) == b"two"


# Waking one name


def test_transfer_name_transfers_only_that_name(
    storage: QueuedStorage, django_capture_on_commit_callbacks: Any
) -> None:
    wanted = storage.save("a.txt", content("a"))
    other = storage.save("b.txt", content("b"))

    with django_capture_on_commit_callbacks(execute=True):
        outcome = transfer_name(storage.key, wanted)

    assert outcome is Outcome.DONE
    assert row_of(storage, wanted).status == Status.DONE
    assert row_of(storage, other).status == Status.QUEUED
    assert remote_files(storage) == [wanted]
    # Not due any more: a second wake-up does nothing.
    assert transfer_name(storage.key, wanted) is None
    assert remote_calls(storage, "save") == 1


def test_immediate_worker_transfers_only_after_commit(
    storage: QueuedStorage, settings: Any, django_capture_on_commit_callbacks: Any
) -> None:
    settings.QUEUED_STORAGE_WORKER = "immediate"

    with django_capture_on_commit_callbacks(execute=True):
        with transaction.atomic():
            name = storage.save("a.txt", content("after commit"))
            assert row_of(storage, name).status == Status.QUEUED
        assert remote_files(storage) == []

    assert row_of(storage, name).status == Status.DONE
    assert remote_bytes(storage, name) == b"after commit"


def test_immediate_worker_does_nothing_for_a_rolled_back_save(
    storage: QueuedStorage, settings: Any, django_capture_on_commit_callbacks: Any
) -> None:
    settings.QUEUED_STORAGE_WORKER = "immediate"

    class Rollback(Exception):
        pass

    with (
        django_capture_on_commit_callbacks(execute=True) as callbacks,
        pytest.raises(Rollback),
        transaction.atomic(),
    ):
        storage.save("a.txt", content("never committed"))
        raise Rollback

    assert callbacks == []
    assert not PendingTransfer.objects.filter(storage_key=storage.key).exists()
    assert remote_files(storage) == []


# Concurrency and cost


@pytest.mark.django_db(transaction=True)
def test_concurrent_drain_transfers_each_file_exactly_once(
    storage: QueuedStorage,
) -> None:
    names = [storage.save(f"f{i:02}.txt", content(f"file {i}")) for i in range(20)]

    stats = drain(concurrency=4, batch_size=8)

    assert stats.done == 20
    assert stats.processed == 20
    assert remote_calls(storage, "save") == 20
    assert PendingTransfer.objects.done().count() == 20
    for i, name in enumerate(names):
        assert remote_bytes(storage, name) == f"file {i}".encode()


def test_drain_claims_in_batches_not_per_file(
    storage: QueuedStorage,
    django_assert_max_num_queries: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for i in range(10):
        storage.save(f"f{i}.txt", content())
    # Rows that take no time, as the claims see them: claims of 1, 4 and 5 rows
    # (claim_size's growth from one row per lane), then an empty one.
    monkeypatch.setattr(claim_size, "clock", lambda: 0.0)
    # And verified rows wait for their claim's end to be recorded: on a loaded
    # machine a row waiting COMPLETE_AFTER (50 ms) would be recorded on its own,
    # one UPDATE (three queries on MariaDB) more, and the count would say nothing.
    monkeypatch.setattr(completions, "time", SimpleNamespace(monotonic=lambda: 0.0))

    # Measured: 33 on SQLite (per claim: the storages' pause and breaker state,
    # select, update, re-read, and one UPDATE recording its files as done with
    # one upsert of the transfer history; the empty claim; the history's prune
    # when this is the process's first drain), 38 on PostgreSQL, 42 on MariaDB
    # (savepoint pairs), each with one lease check per file: this remote is asked
    # before an upload, which could overwrite a newer copy once the lease is gone.
    # Per-file claiming would need 60 and more.
    with django_assert_max_num_queries(42):
        stats = drain()

    assert stats.done == 10
