"""Attacks on verified rows carried from one claimed batch into the next, to be
recorded with its first group: their leases stay renewed until that group is
recorded, whatever the next batch reports first."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from queued_storage import claim_size, completions, transfer
from queued_storage.backends import QueuedStorage
from queued_storage.models import PendingTransfer
from queued_storage.transfer import Verified
from queued_storage.worker import drain
from tests.helpers import KeeperClock, content, in_thread, joined, row_of, wait_until
from tests.storages import CountingStorage

pytestmark = pytest.mark.django_db(transaction=True)

Status = PendingTransfer.Status


class RefusingStorage(CountingStorage):
    """Refuses every upload of a name that starts with ``refused``."""

    def _save(self, name: str, content: Any) -> str:
        if name.startswith("refused"):
            raise ConnectionError("remote unreachable")
        return super()._save(name, content)


def test_a_carried_rows_lease_is_renewed_until_its_group_is_recorded(
    make_storage: Callable[..., QueuedStorage],
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The next batch's first report was a failure of its own row: that stopped
    the keeper renewing the carried row, whose group was not recorded yet. Its
    lease then ran out while this worker still held the verified copy, and
    another worker would take it over and upload it again."""
    # A lease no loaded machine outlasts; a timeout of 1 s has the keeper renew
    # every 1/3 s of its clock, which stands still but for the test's move.
    settings.QUEUED_STORAGE_LEASE = 60
    settings.QUEUED_STORAGE_TRANSFER_TIMEOUT = 1
    clock = KeeperClock(monkeypatch)
    storage = make_storage(
        remote=f"{__name__}.RefusingStorage",
        remote_options={"location": str(tmp_path / "remote")},
    )
    carried = storage.save("carried.txt", content("c"))
    storage.save("refused.txt", content("r"))
    # One row a claim: the carried row's batch, then the refused row's.
    monkeypatch.setattr(claim_size.ClaimSize, "next", lambda self: 1)
    # Nothing recorded by age: the carried row waits for the second batch's end.
    monkeypatch.setattr(completions, "COMPLETE_AFTER", float("inf"))
    recording = threading.Event()
    release = threading.Event()
    record_done = transfer.record_done

    def gated_record_done(item: Verified) -> bool:
        if item.row.name == carried:
            recording.set()
            if not release.wait(timeout=30):
                raise TimeoutError("the test never released the record")
        return record_done(item)

    monkeypatch.setattr(transfer, "record_done", gated_record_done)
    worker, result = in_thread(drain)
    try:
        assert recording.wait(timeout=30)
        # The second batch's row was reported before the carried row's record.
        assert row_of(storage, "refused.txt").status == Status.QUEUED
        held_until = row_of(storage, carried).lease_expires_at
        assert held_until is not None
        clock.advance(0.5)  # a renewal due (1/3 s), the timeout (1 s) not reached

        def renewed() -> bool:
            until = row_of(storage, carried).lease_expires_at
            return until is not None and until > held_until

        assert wait_until(renewed, timeout=10), (
            "the carried row's lease was not renewed while it waited for its record"
        )
    finally:
        release.set()
    stats = joined(worker, result)
    assert row_of(storage, carried).status == Status.DONE
    assert (stats.done, stats.retried) == (1, 1)


@pytest.mark.parametrize("change", ["taken-over", "deleted", "saved-again"])
def test_a_carried_row_changed_before_its_group_is_recorded_loses_alone(
    make_storage: Callable[..., QueuedStorage],
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    change: str,
) -> None:
    """Between a carried row's verification and its group's record (the next
    batch's end), another worker takes the row over, or the name is deleted or
    saved again: the record's compare-and-set loses, the TransferAndDelete local
    delete leaves the file alone, and what the ledger then says is served."""
    settings.QUEUED_STORAGE_LEASE = 60
    storage = make_storage(
        remote=f"{__name__}.RefusingStorage",
        remote_options={"location": str(tmp_path / "remote")},
        local_options={"allow_overwrite": True},
        task="queued_storage.tasks.TransferAndDelete",
    )
    carried = storage.save("carried.txt", content("old"))
    storage.save("refused.txt", content("r"))
    monkeypatch.setattr(claim_size.ClaimSize, "next", lambda self: 1)
    monkeypatch.setattr(completions, "COMPLETE_AFTER", float("inf"))
    recording = threading.Event()
    release = threading.Event()
    record_done = transfer.record_done

    def gated_record_done(item: Verified) -> bool:
        if item.row.name == carried and not recording.is_set():
            recording.set()
            if not release.wait(timeout=30):
                raise TimeoutError("the test never released the record")
        return record_done(item)

    monkeypatch.setattr(transfer, "record_done", gated_record_done)
    worker, result = in_thread(drain)
    try:
        assert recording.wait(timeout=30)
        assert storage.remote.exists(carried)
        if change == "taken-over":
            taken = PendingTransfer.objects.for_name(storage.key, carried).update(
                lease_token="another-worker",
                lease_expires_at=timezone.now() + timedelta(seconds=60),
            )
            assert taken == 1
        elif change == "deleted":
            storage.delete(carried)
        else:
            assert storage.save(carried, content("new")) == carried
    finally:
        release.set()
    stats = joined(worker, result)
    local, remote = storage.local, storage.remote
    if change == "taken-over":
        row = row_of(storage, carried)
        assert (row.status, row.lease_token) == (Status.TRANSFERRING, "another-worker")
        assert local.exists(carried), "the local copy of a row another worker holds"
        assert stats.done == 0
    elif change == "deleted":
        assert not storage.exists(carried)
        assert not local.exists(carried)
        assert not remote.exists(carried)
    else:
        row = row_of(storage, carried)
        assert row.status == Status.DONE
        with remote.open(carried) as remote_file:
            assert remote_file.read() == b"new"
        assert not local.exists(carried)
        with storage.open(carried) as served:
            assert served.read() == b"new"


class StoppingStorage(CountingStorage):
    """Asks the drain to stop (``stop``) from the upload of a name that starts
    with ``stop``, which then fails."""

    stop = threading.Event()

    def _save(self, name: str, content: Any) -> str:
        if name.startswith("stop"):
            type(self).stop.set()
            raise ConnectionError("remote unreachable")
        return super()._save(name, content)


def test_a_stop_after_the_next_claim_still_records_the_carried_rows(
    make_storage: Callable[..., QueuedStorage],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A stop (SIGTERM) that comes after the next batch was claimed and before
    the carried rows were recorded: they are recorded, and nothing is left
    leased."""
    StoppingStorage.stop.clear()
    storage = make_storage(
        remote=f"{__name__}.StoppingStorage",
        remote_options={"location": str(tmp_path / "remote")},
    )
    carried = storage.save("carried.txt", content("c"))
    stopping = storage.save("stop.txt", content("s"))
    later = storage.save("later.txt", content("l"))
    monkeypatch.setattr(claim_size.ClaimSize, "next", lambda self: 1)
    monkeypatch.setattr(completions, "COMPLETE_AFTER", float("inf"))

    stats = drain(should_stop=StoppingStorage.stop.is_set)

    assert StoppingStorage.stop.is_set()
    assert row_of(storage, carried).status == Status.DONE
    assert row_of(storage, stopping).status == Status.QUEUED
    row = row_of(storage, later)
    assert (row.status, row.attempts, row.lease_token) == (Status.QUEUED, 0, "")
    assert (stats.done, stats.retried) == (1, 1)
    assert not PendingTransfer.objects.filter(status=Status.TRANSFERRING).exists()


def recorded_groups(
    monkeypatch: pytest.MonkeyPatch, then: Callable[[int], None] | None = None
) -> list[list[str]]:
    """The names of each group of verified rows recorded together, in order;
    ``then(count)`` runs after each group's record."""
    groups: list[list[str]] = []
    complete = transfer.complete

    def noted(batch: list[Verified]) -> Any:
        groups.append([item.row.name for item in batch])
        outcomes = complete(batch)
        if then is not None:
            then(len(groups))
        return outcomes

    monkeypatch.setattr(completions, "complete", noted)
    return groups


def test_verified_rows_are_carried_from_batch_to_batch_until_their_group_is_due(
    make_storage: Callable[..., QueuedStorage],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A batch that carried rows in hands them on, with its own, to the batch
    after it: the lane that claims does not stop to record a group every second
    batch (a commit it waited for), and the drain records them together once
    their group is due, or at its end."""
    storage = make_storage(remote_options={"location": str(tmp_path / "remote")})
    names = [storage.save(f"f{i}.txt", content(str(i))) for i in range(4)]
    monkeypatch.setattr(claim_size.ClaimSize, "next", lambda self: 1)
    monkeypatch.setattr(completions, "COMPLETE_AFTER", float("inf"))
    groups = recorded_groups(monkeypatch)

    stats = drain()

    assert groups == [names]
    assert stats.done == 4
    assert {row_of(storage, name).status for name in names} == {Status.DONE}


def test_rows_carried_twice_keep_their_leases_renewed(
    make_storage: Callable[..., QueuedStorage],
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The keeper of each batch a row was carried from renews its lease until
    its group is recorded: the first row, carried through two batches, is still
    held while the third batch's upload runs long."""
    # A lease no loaded machine outlasts; a timeout of 1 s has the keeper renew
    # every 1/3 s of its clock, which stands still but for the test's move.
    settings.QUEUED_STORAGE_LEASE = 60
    settings.QUEUED_STORAGE_TRANSFER_TIMEOUT = 1
    clock = KeeperClock(monkeypatch)
    storage = make_storage(remote_options={"location": str(tmp_path / "remote")})
    first, second, third = (
        storage.save(f"f{i}.txt", content(str(i))) for i in range(3)
    )
    monkeypatch.setattr(claim_size.ClaimSize, "next", lambda self: 1)
    monkeypatch.setattr(completions, "COMPLETE_AFTER", float("inf"))
    groups = recorded_groups(monkeypatch)
    uploading = threading.Event()
    release = threading.Event()
    remote = storage.remote
    save = remote._save  # type: ignore[attr-defined]

    def slow_third(name: str, data: Any) -> str:
        if name == third:
            uploading.set()
            if not release.wait(timeout=30):
                raise TimeoutError("the test never released the upload")
        written: str = save(name, data)
        return written

    monkeypatch.setattr(remote, "_save", slow_third)
    worker, result = in_thread(drain)
    try:
        assert uploading.wait(timeout=30)
        held = {
            name: row_of(storage, name).lease_expires_at for name in (first, second)
        }
        assert all(until is not None for until in held.values())
        clock.advance(0.5)  # a renewal due (1/3 s), the timeout (1 s) not reached

        def renewed() -> bool:
            for name, until in held.items():
                now = row_of(storage, name).lease_expires_at
                if now is None or until is None or now <= until:
                    return False
            return True

        assert wait_until(renewed, timeout=10), (
            "a row carried through two batches lost its lease before its record"
        )
        assert groups == []
    finally:
        release.set()
    stats = joined(worker, result)
    assert groups == [[first, second, third]]
    assert stats.done == 3


def test_a_group_is_recorded_once_it_reaches_its_most_rows(
    make_storage: Callable[..., QueuedStorage],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """However young, a group of GROUP_MOST rows is recorded: one statement's
    worth, and what one stale row sends row by row. (The drain's own thread
    records it: the fourth and seventh uploads wait for the group before.)"""
    storage = make_storage(remote_options={"location": str(tmp_path / "remote")})
    names = [storage.save(f"f{i}.txt", content(str(i))) for i in range(7)]
    monkeypatch.setattr(completions, "COMPLETE_AFTER", float("inf"))
    monkeypatch.setattr(completions, "GROUP_MOST", 3)
    recorded = [threading.Event(), threading.Event()]

    def noting(count: int) -> None:
        if count <= len(recorded):
            recorded[count - 1].set()

    groups = recorded_groups(monkeypatch, noting)
    remote = storage.remote
    save = remote._save  # type: ignore[attr-defined]

    def after_the_group_before(name: str, data: Any) -> str:
        if name in (names[3], names[6]):
            gate = recorded[0 if name == names[3] else 1]
            if not gate.wait(timeout=30):
                raise TimeoutError("the group before was never recorded")
        written: str = save(name, data)
        return written

    monkeypatch.setattr(remote, "_save", after_the_group_before)

    assert drain().done == 7

    assert groups == [names[:3], names[3:6], names[6:]]
