"""The worker runtime: handing back a claim, per-row leases, the transfer timeout,
failures wherever they are raised, and lock aborts on the caller's side."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from io import StringIO
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from django.core.files.base import ContentFile
from django.core.management import call_command
from django.db import OperationalError, connection, transaction
from django.utils import timezone

from queued_storage import claim_size, completions, leases, registry, stats, transfer
from queued_storage import worker as runtime
from queued_storage.backends import QueuedStorage
from queued_storage.conf import MAX_SECONDS
from queued_storage.errors import Outcome
from queued_storage.models import PendingTransfer
from queued_storage.saving import SMALL_FILE
from queued_storage.signals import file_transferred, transfer_failed
from queued_storage.stats import DrainStats
from queued_storage.worker import drain
from tests.helpers import (
    FS,
    KeeperClock,
    content,
    in_thread,
    joined,
    lanes_returned,
    read_bytes,
    remote_calls,
    row_of,
    wait_until,
)
from tests.storages import (
    HangingStorage,
    ReadThenHangStorage,
    StallingStorage,
    SteppedStorage,
)

pytestmark = pytest.mark.django_db

Status = PendingTransfer.Status


# A graceful stop hands back what it never started, as it stands now


def claim_one(storage: QueuedStorage, name: str) -> PendingTransfer:
    [claimed] = PendingTransfer.objects.for_name(storage.key, name).claim_due(
        limit=1, lease=300
    )
    return claimed


def test_release_claim_queues_an_unchanged_row_with_the_attempt_taken_back(
    storage: QueuedStorage,
) -> None:
    name = storage.save("a.txt", content())
    claimed = claim_one(storage, name)

    assert PendingTransfer.objects.release_claim([claimed]) == 1

    row = row_of(storage, name)
    assert row.status == Status.QUEUED
    assert row.attempts == 0
    assert row.generation == claimed.generation
    assert (row.lease_token, row.lease_expires_at) == ("", None)
    assert PendingTransfer.objects.due().filter(pk=row.pk).exists()


def test_release_claim_gives_a_row_saved_again_its_new_generations_state(
    make_storage: Callable[..., QueuedStorage],
) -> None:
    storage = make_storage(local_options={"allow_overwrite": True})
    name = storage.save("a.txt", content("old"))
    claimed = claim_one(storage, name)
    assert storage.save(name, content("new")) == name

    assert PendingTransfer.objects.release_claim([claimed]) == 1

    row = row_of(storage, name)
    assert row.status == Status.QUEUED
    assert row.generation != claimed.generation
    assert row.attempts == 0
    assert (row.lease_token, row.lease_expires_at) == ("", None)
    assert PendingTransfer.objects.due().filter(pk=row.pk).exists()


def test_release_claim_holds_a_row_saved_again_on_a_delayed_storage(
    make_storage: Callable[..., QueuedStorage],
) -> None:
    storage = make_storage(local_options={"allow_overwrite": True}, delayed=True)
    name = storage.save("a.txt", content("old"))
    assert storage.transfer(name)
    claimed = claim_one(storage, name)
    assert storage.save(name, content("new")) == name

    assert PendingTransfer.objects.release_claim([claimed]) == 1

    row = row_of(storage, name)
    assert row.status == Status.HELD
    assert row.next_attempt_at is None
    assert row.attempts == 0
    assert row.lease_token == ""


def test_release_claim_leaves_a_deleted_row_a_tombstone_due_for_its_purge(
    storage: QueuedStorage,
) -> None:
    name = storage.save("a.txt", content())
    claimed = claim_one(storage, name)
    storage.delete(name)

    assert PendingTransfer.objects.release_claim([claimed]) == 1

    row = PendingTransfer.objects.get(pk=claimed.pk)
    assert row.deleted
    assert row.status == Status.QUEUED
    assert (row.lease_token, row.lease_expires_at) == ("", None)
    assert PendingTransfer.objects.due().filter(pk=row.pk).exists()


def test_release_claim_skips_a_row_gone_from_the_ledger(storage: QueuedStorage) -> None:
    name = storage.save("a.txt", content())
    claimed = claim_one(storage, name)
    PendingTransfer.objects.filter(pk=claimed.pk).delete()

    assert PendingTransfer.objects.release_claim([claimed]) == 0


def test_release_claim_leaves_a_row_another_worker_took_over_alone(
    storage: QueuedStorage,
) -> None:
    name = storage.save("a.txt", content())
    claimed = claim_one(storage, name)
    later = timezone.now() + timedelta(seconds=301)
    [rival] = PendingTransfer.objects.claim_due(limit=1, lease=300, now=later)

    assert PendingTransfer.objects.release_claim([claimed]) == 0

    row = row_of(storage, name)
    assert row.status == Status.TRANSFERRING
    assert row.lease_token == rival.lease_token
    assert row.attempts == 2


def test_release_claim_leaves_a_finished_row_alone(storage: QueuedStorage) -> None:
    name = storage.save("a.txt", content())
    claimed = claim_one(storage, name)
    assert claimed.mark_done()

    assert PendingTransfer.objects.release_claim([claimed]) == 0
    assert row_of(storage, name).status == Status.DONE


# One hung upload holds only itself


HANGING = "tests.storages.HangingStorage"


def join_left_behind_workers() -> None:
    assert lanes_returned(), "a lane left behind on a hung transfer never returned"


@pytest.mark.django_db(transaction=True)
def test_a_hung_upload_renews_only_its_own_lease_and_another_worker_takes_the_rest(
    make_storage: Callable[..., QueuedStorage],
    hanging: type[HangingStorage],
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings.QUEUED_STORAGE_LEASE = 2
    settings.QUEUED_STORAGE_TRANSFER_TIMEOUT = 60
    storage = make_storage(remote=HANGING)
    first, hung, *others = (storage.save(f"{n}.txt", content(n)) for n in "xabc")
    hanging.hang = {hung}
    # Rows that take no time, as the claims see them: a claim of the first row,
    # then of four, which takes the hung row and two behind it.
    monkeypatch.setattr(claim_size, "clock", lambda: 0.0)
    worker, result = in_thread(drain)
    assert hanging.entered.wait(timeout=30)
    claimed_until = row_of(storage, others[0]).lease_expires_at
    assert claimed_until is not None

    def renewed() -> bool:
        until = row_of(storage, hung).lease_expires_at
        return until is not None and until > claimed_until

    assert wait_until(renewed), "the hung upload's lease was never renewed"
    renewed_until = row_of(storage, hung).lease_expires_at
    assert renewed_until is not None
    # A moment after the claim's leases ran out and before the renewed one does:
    # another worker there takes the rows this one never started, not the hung one.
    then = claimed_until + (renewed_until - claimed_until) / 2
    rival = PendingTransfer.objects.claim_due(limit=10, lease=300, now=then)

    hanging.released.set()
    stats = joined(worker, result)
    assert sorted(row.name for row in rival) == sorted(others)
    assert row_of(storage, hung).status == Status.DONE
    # The worker found its claim on the others gone and left them to the rival.
    assert (stats.done, stats.stale) == (2, 2)
    assert row_of(storage, first).status == Status.DONE
    for name in others:
        row = row_of(storage, name)
        assert row.status == Status.TRANSFERRING
        assert row.lease_token == rival[0].lease_token
    assert remote_calls(storage, "save") == 2


@pytest.mark.django_db(transaction=True)
def test_an_upload_without_progress_is_abandoned_recorded_and_retried(
    make_storage: Callable[..., QueuedStorage],
    hanging: type[HangingStorage],
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings.QUEUED_STORAGE_LEASE = 30
    settings.QUEUED_STORAGE_TRANSFER_TIMEOUT = 1
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    # The keeper's clock stands still but for the test's one move: a healthy
    # upload slowed by a loaded machine is never "without progress".
    clock = KeeperClock(monkeypatch)
    storage = make_storage(remote=HANGING)
    hung = storage.save("a.txt", content("first"))
    other = storage.save("b.txt", content("second"))
    hanging.hang = {hung}

    # One worker thread: the drain moves on without the hung upload.
    worker, result = in_thread(lambda: drain(concurrency=1))
    assert hanging.entered.wait(timeout=30)
    # The hung upload is the one in flight: it makes no progress for ten times
    # the timeout, as the keeper sees it.
    clock.advance(10)
    stats = joined(worker, result)

    assert hanging.entered.is_set()
    assert not hanging.returned.is_set()
    assert (stats.done, stats.retried) == (2, 1)
    row = row_of(storage, hung)
    assert row.status == Status.DONE
    assert row.attempts == 2
    assert [entry["error"] for entry in row.error_history] == ["TransferTimeout"]
    assert "QUEUED_STORAGE_TRANSFER_TIMEOUT" in row.error_history[0]["message"]
    assert row_of(storage, other).status == Status.DONE

    # The hung upload returns at last: a late worker, it changes nothing.
    hanging.released.set()
    assert hanging.returned.wait(timeout=30)
    join_left_behind_workers()
    after = row_of(storage, hung)
    assert (after.status, after.generation) == (Status.DONE, row.generation)
    assert read_bytes(storage.remote, hung) == b"first"


@pytest.mark.django_db(transaction=True)
def test_an_abandoned_upload_that_wrote_part_of_the_file_is_replaced_not_a_conflict(
    make_storage: Callable[..., QueuedStorage],
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An upload that wrote half the file and stalled is abandoned: what it wrote
    is the row's (ownership is earned by the upload that was sent), so the retry
    replaces it instead of failing for ever with a conflict over its own copy."""
    settings.QUEUED_STORAGE_LEASE = 30
    settings.QUEUED_STORAGE_TRANSFER_TIMEOUT = 1
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    clock = KeeperClock(monkeypatch)  # stands still but for the move below
    for event in (
        StallingStorage.entered,
        StallingStorage.released,
        StallingStorage.returned,
    ):
        event.clear()
    storage = make_storage(remote="tests.storages.StallingStorage")
    name = storage.save("a.txt", content("the whole file"))
    StallingStorage.stall = {name}
    try:
        worker, result = in_thread(lambda: drain(concurrency=1))
        assert StallingStorage.entered.wait(timeout=30)
        clock.advance(10)  # stalled for ten times the timeout, as the keeper sees it
        stats = joined(worker, result)
    finally:
        StallingStorage.released.set()
    assert StallingStorage.returned.wait(timeout=30)
    join_left_behind_workers()

    row = row_of(storage, name)
    assert (stats.done, stats.retried) == (1, 1)
    assert row.status == Status.DONE, row.last_error
    assert [entry["error"] for entry in row.error_history] == ["TransferTimeout"]
    assert read_bytes(storage.remote, name) == b"the whole file"


@pytest.mark.django_db(transaction=True)
def test_a_slow_upload_that_keeps_reading_is_not_abandoned(
    make_storage: Callable[..., QueuedStorage],
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings.QUEUED_STORAGE_TRANSFER_TIMEOUT = 1
    clock = KeeperClock(monkeypatch)

    def step() -> None:
        # Before each read of the local file: 0.6 of the timeout passes for the
        # keeper, which looks at the upload then.
        if not clock.advance_and_look(0.6):
            raise TimeoutError("the lease keeper never looked at the upload")

    monkeypatch.setattr(SteppedStorage, "step", step)
    monkeypatch.setattr(SteppedStorage, "chunk_size", 10)
    storage = make_storage(remote="tests.storages.SteppedStorage")
    # Ten chunks (and the read that finds the end) 0.6 s apart on the keeper's
    # clock: over six times the timeout in all, never a second without a read.
    name = storage.save("slow.txt", content("x" * 100))

    stats = drain()

    assert (stats.done, stats.retried) == (1, 0)
    assert row_of(storage, name).error_history == []


def test_stuck_includes_a_row_whose_attempt_ran_past_the_transfer_timeout(
    storage: QueuedStorage, settings: Any, admin_client: Any
) -> None:
    settings.QUEUED_STORAGE_TRANSFER_TIMEOUT = 60
    late, fresh = (storage.save(name, content()) for name in ("late.txt", "new.txt"))
    PendingTransfer.objects.claim_due(limit=10, lease=300)
    # Claimed a while ago, its lease still running, never renewed since.
    PendingTransfer.objects.for_name(storage.key, late).update(
        updated_at=timezone.now() - timedelta(seconds=61)
    )

    assert [row.name for row in PendingTransfer.objects.stuck()] == [late]
    out = StringIO()
    call_command("transfer_status", "--json", stdout=out)
    assert json.loads(out.getvalue())["stuck"] == 1
    page = admin_client.get(
        "/admin/queued_storage/pendingtransfer/", {"stuck": "yes"}
    ).content.decode()
    assert late in page
    assert fresh not in page


# Every failure is recorded on the row, wherever it was raised


@pytest.fixture
def raising_receiver() -> Iterator[Callable[..., None]]:
    """Connects a receiver that raises; a second one, connected after it, notes
    that it still ran."""
    connected: list[tuple[Any, Callable[..., None]]] = []
    ran: list[str] = []

    def connect(signal: Any) -> list[str]:
        def broken(**kwargs: Any) -> None:
            raise ValueError("receiver broke")

        def after(name: str, **kwargs: Any) -> None:
            ran.append(name)

        for receiver in (broken, after):
            signal.connect(receiver, weak=False)
            connected.append((signal, receiver))
        return ran

    yield connect  # type: ignore[misc]
    for signal, receiver in connected:
        signal.disconnect(receiver)


def errors_of(row: PendingTransfer) -> list[str]:
    return [entry["error"] for entry in row.error_history]


def test_a_hook_whose_constructor_raises_records_each_attempt_and_fails_at_its_limit(
    make_storage: Callable[..., QueuedStorage], run_drain: Callable[..., DrainStats]
) -> None:
    storage = make_storage(task="tests.hooks.BrokenInitTransfer")
    name = storage.save("a.txt", content())

    stats = run_drain()

    row = row_of(storage, name)
    assert row.status == Status.FAILED
    assert row.attempts == 2  # the hook's max_retries = 1, no delay
    assert row.last_error == "RuntimeError: hook constructor exploded"
    assert errors_of(row) == ["RuntimeError", "RuntimeError"]
    assert (stats.retried, stats.failed) == (1, 1)


def test_a_hook_whose_transfer_raises_records_the_attempt(
    make_storage: Callable[..., QueuedStorage],
    run_drain: Callable[..., DrainStats],
    settings: Any,
) -> None:
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    storage = make_storage(task="tests.hooks.RaisesOnceTransfer")
    name = storage.save("a.txt", content())

    run_drain()

    row = row_of(storage, name)
    assert row.status == Status.DONE
    assert row.attempts == 2
    assert errors_of(row) == ["RuntimeError"]


def test_a_crash_outside_the_transfer_steps_is_an_attempt_on_the_row(
    storage: QueuedStorage,
    run_drain: Callable[..., DrainStats],
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings.QUEUED_STORAGE_RETRIES = 1
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    name = storage.save("a.txt", content())
    from django.core.exceptions import ImproperlyConfigured

    get = registry.get

    def unbuildable(key: str) -> QueuedStorage | None:
        if key == storage.key:
            raise ImproperlyConfigured("the storage cannot be built")
        return get(key)

    monkeypatch.setattr(registry, "get", unbuildable)
    # The claim itself asks the registry only about host-local storages.
    monkeypatch.setattr(runtime, "_claimable", lambda rows: rows)

    stats = run_drain()

    row = row_of(storage, name)
    assert row.status == Status.FAILED
    assert row.attempts == 2
    assert errors_of(row) == ["ImproperlyConfigured", "ImproperlyConfigured"]
    assert stats.failed == 1


def test_a_file_transferred_receiver_that_raises_is_kept_on_the_done_row(
    storage: QueuedStorage,
    run_drain: Callable[..., DrainStats],
    raising_receiver: Callable[..., list[str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    ran = raising_receiver(file_transferred)
    name = storage.save("a.txt", content())

    with caplog.at_level(logging.ERROR, logger="queued_storage"):
        stats = run_drain()

    row = row_of(storage, name)
    assert stats.done == 1
    # The file is safe on the remote: the row stays done, the error is kept.
    assert row.status == Status.DONE
    assert row.last_error == "ValueError: receiver broke"
    assert errors_of(row) == ["ValueError"]
    assert ran == [name]
    assert "receiver broke" in caplog.text


def test_a_transfer_failed_receiver_that_raises_is_kept_beside_the_transfer_error(
    make_storage: Callable[..., QueuedStorage],
    run_drain: Callable[..., DrainStats],
    raising_receiver: Callable[..., list[str]],
    settings: Any,
) -> None:
    settings.QUEUED_STORAGE_RETRIES = 0
    ran = raising_receiver(transfer_failed)
    storage = make_storage(
        remote="tests.storages.FlakyStorage", remote_options={"failures": 10}
    )
    name = storage.save("a.txt", content())

    run_drain()

    row = row_of(storage, name)
    assert row.status == Status.FAILED
    assert row.last_error == "ConnectionError: remote unreachable"
    assert errors_of(row) == ["ConnectionError", "ValueError"]
    assert ran == [name]


def test_a_local_delete_that_fails_after_the_transfer_is_kept_on_the_done_row(
    tmp_path: Path, run_drain: Callable[..., DrainStats]
) -> None:
    storage = QueuedStorage(
        "tests.storages.UndeletableStorage",
        FS,
        local_options={"location": str(tmp_path / "local")},
        remote_options={"location": str(tmp_path / "remote")},
        task="queued_storage.tasks.TransferAndDelete",
        key="undeletable",
    )
    try:
        name = storage.save("a.txt", content())

        run_drain()

        row = row_of(storage, name)
        assert row.status == Status.DONE
        assert row.last_error == "PermissionError: cannot delete a.txt"
        assert errors_of(row) == ["PermissionError"]
    finally:
        registry.forget(storage.key)


# A lock abort is retried for callers outside a transaction, raised inside one


class DeadlockOnce:
    """An execute wrapper: the first statement that writes (or locks) ledger rows
    fails as MariaDB's deadlock victim does, without running."""

    def __init__(self, skip: int = 0) -> None:
        #: Ledger writes let through before the one that fails.
        self.skip = skip
        self.raised: list[OperationalError] = []

    def __call__(
        self,
        execute: Callable[..., Any],
        sql: str,
        params: Any,
        many: bool,
        context: Any,
    ) -> Any:
        text = sql.lstrip().upper()
        writes = text.startswith(("INSERT", "UPDATE", "DELETE")) or "FOR UPDATE" in text
        ledger = writes and PendingTransfer._meta.db_table.upper() in text
        if ledger and self.skip:
            self.skip -= 1
        elif ledger and not self.raised:
            error = OperationalError(
                1213,
                "Deadlock found when trying to get lock; try restarting transaction",
            )
            self.raised.append(error)
            raise error
        return execute(sql, params, many, context)


def _save_new(storage: QueuedStorage) -> None:
    assert storage.save("new.txt", content()) == "new.txt"
    assert row_of(storage, "new.txt").status == Status.QUEUED


def _save_again(storage: QueuedStorage) -> None:
    before = row_of(storage, "old.txt").generation
    assert storage.save("old.txt", content("newer")) == "old.txt"
    assert row_of(storage, "old.txt").generation != before


def _save_large_again(storage: QueuedStorage) -> None:
    # Over SMALL_FILE, or of unknown size: saved under the row's lock.
    data = b"x" * (SMALL_FILE + 1)
    before = row_of(storage, "old.txt").generation
    assert storage.save("old.txt", ContentFile(data)) == "old.txt"
    row = row_of(storage, "old.txt")
    assert (row.generation != before, row.size) == (True, len(data))
    assert storage.local.size("old.txt") == len(data)


def _delete(storage: QueuedStorage) -> None:
    storage.delete("old.txt")
    assert not storage.exists("old.txt")


def _transfer(storage: QueuedStorage) -> None:
    assert storage.transfer("held.txt")
    assert row_of(storage, "held.txt").status == Status.QUEUED


CALLS = {
    "save": _save_new,
    "save-again": _save_again,
    "save-large-again": _save_large_again,
    "delete": _delete,
    "transfer": _transfer,
}


@pytest.fixture
def lockable(make_storage: Callable[..., QueuedStorage]) -> QueuedStorage:
    storage = make_storage(local_options={"allow_overwrite": True})
    storage.save("old.txt", content("old"))
    storage.save("held.txt", content("held"))
    assert PendingTransfer.objects.for_name(storage.key, "held.txt").hold() == 1
    return storage


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("call", list(CALLS), ids=list(CALLS))
def test_a_call_outside_a_transaction_retries_a_deadlock(
    lockable: QueuedStorage, call: str
) -> None:
    deadlock = DeadlockOnce()

    with connection.execute_wrapper(deadlock):
        CALLS[call](lockable)

    assert len(deadlock.raised) == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("call", list(CALLS), ids=list(CALLS))
def test_a_call_inside_the_callers_transaction_raises_a_deadlock_unchanged(
    lockable: QueuedStorage, call: str
) -> None:
    deadlock = DeadlockOnce()

    with (
        pytest.raises(OperationalError) as raised,
        connection.execute_wrapper(deadlock),
        transaction.atomic(),
    ):
        CALLS[call](lockable)

    assert [raised.value] == deadlock.raised


def test_stuck_transfer_status_and_the_admin_work_with_the_longest_transfer_timeout(
    storage: QueuedStorage, settings: Any, admin_client: Any
) -> None:
    """A timeout meant as "never" (the longest accepted: a hundred years; longer
    is refused, see tests/test_checks.py): nothing has run past it, and the
    status command and the admin still report."""
    settings.QUEUED_STORAGE_TRANSFER_TIMEOUT = MAX_SECONDS
    storage.save("a.txt", content())
    PendingTransfer.objects.claim_due(limit=10, lease=300)

    assert list(PendingTransfer.objects.stuck()) == []
    out = StringIO()
    call_command("transfer_status", "--json", stdout=out)
    assert json.loads(out.getvalue())["stuck"] == 0
    page = admin_client.get("/admin/queued_storage/pendingtransfer/")
    assert page.status_code == 200
    assert "lease for" in page.content.decode()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("concurrency", [1, 2])
@pytest.mark.usefixtures("whole_batch_claims")  # rows claimed and not started
def test_a_stop_hands_back_the_unstarted_rows_at_once_while_an_upload_is_in_hand(
    make_storage: Callable[..., QueuedStorage],
    hanging: type[HangingStorage],
    concurrency: int,
) -> None:
    """A supervisor kills a worker that takes long to stop: the rows it claimed
    and never started must be back in the queue before the upload in hand ends,
    not left leased to a process about to die."""
    storage = make_storage(remote=HANGING)
    hung, *others = (storage.save(f"{n}.txt", content(n)) for n in "abcd")
    hanging.hang = {hung}
    stop = threading.Event()
    worker, result = in_thread(
        lambda: drain(concurrency=concurrency, should_stop=stop.is_set)
    )
    try:
        assert hanging.entered.wait(timeout=30)
        if concurrency == 1:
            # The claim took all four: the rows behind the hung one are leased.
            assert row_of(storage, others[-1]).status == Status.TRANSFERRING
        stop.set()

        def handed_back() -> bool:
            rows = [row_of(storage, name) for name in others]
            return all(row.status != Status.TRANSFERRING for row in rows)

        assert wait_until(handed_back), (
            "the unstarted rows waited for the upload in hand"
        )
        assert not hanging.returned.is_set()
    finally:
        hanging.released.set()
    stats = joined(worker, result)

    assert row_of(storage, hung).status == Status.DONE
    # What a second lane had started before the stop finished too.
    rows = [row_of(storage, name) for name in others]
    assert stats.done == 1 + sum(row.status == Status.DONE for row in rows)
    for row in rows:
        assert row.status in (Status.QUEUED, Status.DONE)
        if row.status == Status.QUEUED:
            assert (row.lease_token, row.attempts) == ("", 0)


@pytest.mark.django_db(transaction=True)
def test_a_verified_row_is_recorded_done_while_an_upload_of_its_batch_hangs(
    make_storage: Callable[..., QueuedStorage], hanging: type[HangingStorage]
) -> None:
    """A copy verified beside a hung upload is recorded at once: waiting for the
    batch to end, it would stay leased (and uploaded again after a kill) for as
    long as the other upload hangs."""
    storage = make_storage(remote=HANGING)
    hung, other = (storage.save(f"{n}.txt", content(n)) for n in "ab")
    hanging.hang = {hung}
    worker, result = in_thread(lambda: drain(concurrency=2))
    try:
        assert hanging.entered.wait(timeout=30)
        assert wait_until(lambda: row_of(storage, other).status == Status.DONE), (
            "the verified row waited for the hung upload"
        )
        assert not hanging.returned.is_set()
    finally:
        hanging.released.set()
    stats = joined(worker, result)
    assert stats.done == 2


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("call", ["save-again", "save-large-again"])
def test_a_save_whose_row_write_deadlocks_after_the_local_write_is_retried_whole(
    lockable: QueuedStorage, call: str
) -> None:
    """The lock taken, the file written, then the row's write is the deadlock's
    victim: the retry writes the file and its row again, and the two agree."""
    deadlock = DeadlockOnce(skip=1)

    with connection.execute_wrapper(deadlock):
        CALLS[call](lockable)

    assert len(deadlock.raised) == 1
    row = row_of(lockable, "old.txt")
    assert row.size == lockable.local.size("old.txt")
    assert row.status == Status.QUEUED


@pytest.mark.django_db(transaction=True)
def test_hung_uploads_keep_at_most_twice_the_concurrency_in_threads(
    make_storage: Callable[..., QueuedStorage],
    hanging: type[HangingStorage],
    settings: Any,
) -> None:
    """A remote where every upload hangs: each abandoned upload keeps its thread
    and its database connection. A lane is replaced while no more lanes than the
    drain has are left behind; then the drain waits, holding no more."""
    settings.QUEUED_STORAGE_LEASE = 30
    settings.QUEUED_STORAGE_TRANSFER_TIMEOUT = 1
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    storage = make_storage(remote=HANGING)
    names = [storage.save(f"{n}.txt", content(n)) for n in "abcd"]
    hanging.hang = set(names)
    kept = threading.Event()

    class Kept(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "its thread kept" in record.getMessage():
                kept.set()

    handler = Kept()
    logging.getLogger("queued_storage").addHandler(handler)
    worker, result = in_thread(lambda: drain(concurrency=1))
    try:
        assert wait_until(lambda: kept.is_set() or hanging.most > 2), (
            "the drain neither kept a lane nor hung a third upload"
        )
        assert hanging.most == 2
    finally:
        logging.getLogger("queued_storage").removeHandler(handler)
        hanging.released.set()
    stats = joined(worker, result)
    join_left_behind_workers()

    assert stats.done == 4
    for name in names:
        row = row_of(storage, name)
        assert row.status == Status.DONE
        assert read_bytes(storage.remote, name) == name[0].encode()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("how", ["drain", "transfer_name"])
def test_a_transfer_in_the_callers_transaction_never_waits_for_its_own_row_locks(
    make_storage: Callable[..., QueuedStorage],
    hanging: type[HangingStorage],
    monkeypatch: pytest.MonkeyPatch,
    how: str,
) -> None:
    """drain() or the admin's "transfer now" inside the caller's transaction (an
    ATOMIC_REQUESTS site) with a transfer that outlasts a renewal, or the timeout:
    the claim is not committed, so a lease keeper on a connection of its own
    could only wait for the caller's row locks (SQLite's write lock), while the
    caller waits for it at the end."""
    storage = make_storage(remote=HANGING)
    name = storage.save("a.txt", content("a"))
    hanging.hang = {name}

    def run() -> object:
        with transaction.atomic():
            if how == "drain":
                return drain().done
            return runtime.transfer_name(storage.key, name)

    worker, result = in_thread(run)
    try:
        assert hanging.entered.wait(timeout=30)
        # Past every renewal and the transfer timeout, for the keeper's clock.
        later = time.monotonic() + 10 * 600
        clock = SimpleNamespace(monotonic=lambda: later)
        for module in (leases, transfer, completions, stats):
            monkeypatch.setattr(module, "time", clock)

        def keepers() -> list[threading.Thread]:
            return [
                thread
                for thread in threading.enumerate()
                if thread.name.startswith("queued-storage-lease") and thread.is_alive()
            ]

        assert wait_until(lambda: not keepers()), (
            "a keeper works beside the caller's claim"
        )
    finally:
        hanging.released.set()
    outcome = joined(worker, result)

    assert outcome in (1, Outcome.DONE)
    row = row_of(storage, name)
    assert (row.status, row.error_history) == (Status.DONE, [])


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("files", [1, 3])
@pytest.mark.usefixtures("whole_batch_claims")  # the record of a batch fails
def test_a_verified_upload_whose_done_record_fails_stays_the_rows_own(
    make_storage: Callable[..., QueuedStorage],
    monkeypatch: pytest.MonkeyPatch,
    settings: Any,
    files: int,
) -> None:
    """The database fails the DONE record of a verified upload (an error other
    than a lock abort, or a lock abort past its tries): the attempt is kept on the
    row, and the object its upload wrote is the row's, so the retry replaces it
    instead of failing for good over a conflict with its own copy."""
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    storage = make_storage()
    names = [storage.save(f"{i}.txt", content(f"file {i}")) for i in range(files)]
    gone = OperationalError(2006, "MySQL server has gone away")
    failures = {"left": 2}  # the batch's record, and a single row's

    def failing(original: Callable[..., Any]) -> Callable[..., Any]:
        def record(*args: Any, **kwargs: Any) -> Any:
            if failures["left"]:
                failures["left"] -= 1
                raise gone
            return original(*args, **kwargs)

        return record

    queryset = type(PendingTransfer.objects.all())
    monkeypatch.setattr(
        queryset, "mark_done_together", failing(queryset.mark_done_together)
    )
    monkeypatch.setattr(
        PendingTransfer, "mark_done", failing(PendingTransfer.mark_done)
    )

    stats = drain()

    assert stats.done == files
    for i, name in enumerate(names):
        row = row_of(storage, name)
        assert row.status == Status.DONE, row.last_error
        assert "gone away" in row.error_history[0]["message"]
        assert read_bytes(storage.remote, name) == f"file {i}".encode()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("task", ["Transfer", "TransferAndDelete"])
def test_a_late_upload_that_overwrote_a_newer_version_has_the_newer_one_sent_again(
    make_storage: Callable[..., QueuedStorage],
    settings: Any,
    task: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An upload abandoned after it sent the old version's bytes returns once the
    name was saved again and the new version transferred: on a remote that
    overwrites, the late write replaced the new version's object. The late worker
    knows it wrote, and queues the newer version again, so that what the remote
    serves becomes the ledger's version again."""
    settings.QUEUED_STORAGE_LEASE = 30
    settings.QUEUED_STORAGE_TRANSFER_TIMEOUT = 1
    settings.QUEUED_STORAGE_RETRY_DELAY = 3600
    # The keeper's clock stands still but for the move below: the new version's
    # healthy upload is never "without progress" on a loaded machine.
    clock = KeeperClock(monkeypatch)
    hung = ReadThenHangStorage
    hung.hang = set()
    for event in (hung.entered, hung.released, hung.returned):
        event.clear()
    storage = make_storage(
        remote="tests.storages.ReadThenHangStorage",
        local_options={"allow_overwrite": True},
        remote_options={"allow_overwrite": True},
        task=f"queued_storage.tasks.{task}",
    )
    name = storage.save("a.txt", content("old version"))
    hung.hang = {name}
    try:
        worker, result = in_thread(drain)
        assert hung.entered.wait(timeout=30)
        # Its bytes read, the upload hangs for ten times the timeout.
        clock.advance(10)
        assert joined(worker, result).retried == 1  # abandoned, in flight
        assert hung.entered.is_set()
        assert storage.save(name, content("the new version")) == name
        assert drain().done == 1
        assert read_bytes(storage.remote, name) == b"the new version"
    finally:
        hung.released.set()
    assert hung.returned.wait(timeout=30)
    join_left_behind_workers()

    drain()

    row = row_of(storage, name)
    assert row.status == Status.DONE
    if task == "TransferAndDelete":
        # The new version's only copy was the remote's: the row says it may be
        # gone, instead of staying silent.
        assert "late upload of an older version" in row.last_error
        return
    assert read_bytes(storage.remote, name) == b"the new version"
    with storage.open(name) as served:
        assert served.read() == b"the new version"
