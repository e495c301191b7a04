"""Red team: verified rows carried through many batches (e673eba). A batch hands
its waiting rows, its own and those carried in, with the lease keepers of all
the batches they came from, on to the next batch, until their group is due or
the drain ends; done records go in pieces of DONE_PIECE rows off PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.core.files.storage import Storage
from django.db import transaction

from queued_storage import claim_size, claims, completions, leases, transfer
from queued_storage.backends import QueuedStorage
from queued_storage.errors import Outcome
from queued_storage.leases import LeaseKeeper
from queued_storage.models import PendingTransfer
from queued_storage.tasks import Transfer
from queued_storage.transfer import Verified
from queued_storage.worker import drain
from tests.helpers import (
    KeeperClock,
    content,
    in_thread,
    joined,
    lanes_returned,
    row_of,
)
from tests.storages import HangingStorage

pytestmark = pytest.mark.django_db(transaction=True)

Status = PendingTransfer.Status


def live_keepers() -> set[LeaseKeeper]:
    """Lease keepers renewing now or waiting to be started (leases._starter)."""
    with leases._starter.lock:
        pending = set(leases._starter.pending)
    running = {
        thread._target.__self__  # type: ignore[attr-defined]
        for thread in threading.enumerate()
        if thread.name.startswith("queued-storage-lease-") and thread.is_alive()
    }
    return {keeper for keeper in pending | running if not keeper.stopped.is_set()}


@pytest.fixture
def keepers_checked() -> Iterator[set[LeaseKeeper]]:
    """The keepers alive before the test; any the test leaves running are stopped
    after it (a break must not renew leases in the tests that follow)."""
    before = live_keepers()
    yield before
    for keeper in live_keepers() - before:
        keeper.stopped.set()
        keeper.join()


def one_row_a_claim(monkeypatch: pytest.MonkeyPatch) -> None:
    """One row a claim, nothing recorded by age: each verified row is carried
    through every batch after its own, to the drain's end."""
    monkeypatch.setattr(claim_size.ClaimSize, "next", lambda self: 1)
    monkeypatch.setattr(completions, "COMPLETE_AFTER", float("inf"))


def nothing_left_behind(before: set[LeaseKeeper]) -> None:
    assert live_keepers() - before == set(), "a lease keeper still renews"
    leased = PendingTransfer.objects.filter(status=Status.TRANSFERRING)
    assert list(leased.values_list("name", flat=True)) == []


class BeforeCopy(Transfer):
    """Runs ``BeforeCopy.before[name]`` before the copy of ``name`` (once: it is
    popped); copies the others."""

    before: dict[str, Callable[[], None]] = {}

    def transfer(
        self, name: str, local: Storage, remote: Storage, **kwargs: Any
    ) -> bool:
        action = type(self).before.pop(name, None)
        if action is not None:
            action()
        return super().transfer(name, local, remote, **kwargs)


def test_a_hook_that_stops_the_worker_leaves_the_carried_rows_recorded(
    make_storage: Callable[..., QueuedStorage],
    monkeypatch: pytest.MonkeyPatch,
    keepers_checked: set[LeaseKeeper],
) -> None:
    """Three rows verified in three batches and carried; the fourth batch's hook
    stops the worker. The stop is the hook's to ask (test_hooks_attack); the
    three verified copies are this worker's to record first, and no keeper may
    go on renewing them after drain() has returned."""
    storage = make_storage(task=BeforeCopy)
    names = [storage.save(f"f{i}.txt", content(str(i))) for i in range(3)]
    stopping = storage.save("exit.txt", content("x"))
    one_row_a_claim(monkeypatch)

    def exit_the_worker() -> None:  # a sys.exit() in the hook
        raise SystemExit("the hook stops the worker")

    BeforeCopy.before = {stopping: exit_the_worker}

    with pytest.raises(SystemExit):
        drain()

    assert row_of(storage, stopping).status == Status.QUEUED
    assert [row_of(storage, name).status for name in names] == [Status.DONE] * 3
    nothing_left_behind(keepers_checked)


@pytest.mark.parametrize("change", ["saved-again", "deleted", "failed-last"])
def test_a_chain_of_four_with_a_row_changed_in_the_middle(
    make_storage: Callable[..., QueuedStorage],
    monkeypatch: pytest.MonkeyPatch,
    settings: Any,
    keepers_checked: set[LeaseKeeper],
    change: str,
) -> None:
    """Four batches of one row, all carried to the drain's end (one group). The
    second row is saved again or deleted while the fourth uploads (it loses its
    record alone, the others are recorded), or the fourth row's upload fails
    (the three carried rows are still recorded)."""
    # Keepers that start after 1/6 s and look every 1/6 s, as with one-second
    # leases, on a clock that stands still: a lease no loaded machine outlasts,
    # and no upload is without progress for the timeout.
    settings.QUEUED_STORAGE_LEASE = 60
    settings.QUEUED_STORAGE_TRANSFER_TIMEOUT = 1
    settings.QUEUED_STORAGE_RETRY_DELAY = 60
    KeeperClock(monkeypatch)
    storage = make_storage(task=BeforeCopy, local_options={"allow_overwrite": True})
    names = [storage.save(f"f{i}.txt", content(f"old{i}")) for i in range(4)]
    one_row_a_claim(monkeypatch)
    groups: list[list[str]] = []
    complete = transfer.complete

    def noted(batch: list[Verified]) -> Any:
        groups.append([item.row.name for item in batch])
        return complete(batch)

    monkeypatch.setattr(completions, "complete", noted)

    def act() -> None:
        if change == "saved-again":
            storage.save(names[1], content("new"))
        elif change == "deleted":
            storage.delete(names[1])
        else:
            raise ConnectionError("remote unreachable")

    BeforeCopy.before = {names[3]: act}

    stats = drain()

    assert groups[0] == names[: 3 if change == "failed-last" else 4]
    for index in (0, 2):
        assert row_of(storage, names[index]).status == Status.DONE
    if change == "saved-again":
        assert row_of(storage, names[1]).status == Status.DONE
        with storage.open(names[1]) as served:
            assert served.read() == b"new"
    elif change == "deleted":
        assert not storage.exists(names[1])
    else:
        assert row_of(storage, names[1]).status == Status.DONE
        row = row_of(storage, names[3])
        assert (row.status, row.attempts) == (Status.QUEUED, 1)
        assert stats.retried == 1
    nothing_left_behind(keepers_checked)


def test_a_record_that_raises_leaves_the_whole_chain_to_be_retried(
    make_storage: Callable[..., QueuedStorage],
    monkeypatch: pytest.MonkeyPatch,
    settings: Any,
    keepers_checked: set[LeaseKeeper],
) -> None:
    """The group of a chain of three is recorded by a complete() that raises: each
    row's attempt is kept (queued again), none is left leased, no keeper runs."""
    settings.QUEUED_STORAGE_RETRY_DELAY = 60
    storage = make_storage()
    names = [storage.save(f"f{i}.txt", content(str(i))) for i in range(3)]
    one_row_a_claim(monkeypatch)
    sizes: list[int] = []

    def raising(batch: list[Verified]) -> Any:
        sizes.append(len(batch))
        raise RuntimeError("the ledger went away")

    monkeypatch.setattr(completions, "complete", raising)

    stats = drain()

    assert sizes == [3]
    for name in names:
        row = row_of(storage, name)
        assert (row.status, row.attempts) == (Status.QUEUED, 1)
        assert "the ledger went away" in row.last_error
    assert stats.done == 0
    nothing_left_behind(keepers_checked)


def test_a_stop_in_the_third_batch_of_a_chain(
    make_storage: Callable[..., QueuedStorage],
    monkeypatch: pytest.MonkeyPatch,
    keepers_checked: set[LeaseKeeper],
) -> None:
    """SIGTERM (should_stop) during the third batch of a chain: the three verified
    rows are recorded, the fourth is never claimed, nothing stays leased."""
    stop = threading.Event()
    storage = make_storage(task=BeforeCopy)
    names = [storage.save(f"f{i}.txt", content(str(i))) for i in range(2)]
    names.append(storage.save("stop.txt", content("s")))
    later = storage.save("later.txt", content("l"))
    one_row_a_claim(monkeypatch)
    # Asked from the copy of stop.txt, which goes through.
    BeforeCopy.before = {names[2]: stop.set}

    stats = drain(should_stop=stop.is_set)

    assert stats.done == 3
    assert [row_of(storage, name).status for name in names] == [Status.DONE] * 3
    row = row_of(storage, later)
    assert (row.status, row.attempts, row.lease_token) == (Status.QUEUED, 0, "")
    nothing_left_behind(keepers_checked)


def test_an_inline_drain_carries_a_chain_and_records_it_in_the_callers_block(
    make_storage: Callable[..., QueuedStorage],
    monkeypatch: pytest.MonkeyPatch,
    keepers_checked: set[LeaseKeeper],
) -> None:
    """A drain in an atomic block (inline: no lanes, no keeper threads) carries
    its rows through four batches and records them at its end, in the block."""
    storage = make_storage()
    names = [storage.save(f"f{i}.txt", content(str(i))) for i in range(4)]
    one_row_a_claim(monkeypatch)

    with transaction.atomic():
        stats = drain()
        assert stats.done == 4

    assert [row_of(storage, name).status for name in names] == [Status.DONE] * 4
    nothing_left_behind(keepers_checked)


@pytest.mark.parametrize("inline", [False, True])
def test_a_stale_row_in_the_second_piece_leaves_the_first_piece_unrecorded(
    make_storage: Callable[..., QueuedStorage],
    monkeypatch: pytest.MonkeyPatch,
    inline: bool,
) -> None:
    """Pieces of two rows: the fourth row (second piece) lost its lease. The first
    piece's UPDATE ran; the group's rollback undoes it (in a caller's atomic
    block, to the savepoint), and then each row is recorded alone."""
    monkeypatch.setattr(claims, "DONE_PIECE", 2)
    storage = make_storage()
    names = [storage.save(f"f{i}.txt", content(str(i))) for i in range(5)]
    rows = PendingTransfer.objects.claim_due(limit=5, lease=300)
    assert sorted(row.name for row in rows) == sorted(names)
    for row in rows:
        with storage.local.open(row.name) as local_file:
            storage.remote.save(row.name, local_file)
    task = Transfer()
    items = [Verified(row, storage, task) for row in rows]
    taken = PendingTransfer.objects.filter(pk=rows[3].pk).update(
        lease_token="another-worker"
    )
    assert taken == 1

    def together() -> list[str]:
        assert not transfer._complete_together(items)
        return sorted(
            PendingTransfer.objects.filter(status=Status.DONE).values_list(
                "name", flat=True
            )
        )

    if inline:
        with transaction.atomic():
            assert together() == []
    else:
        assert together() == []
    assert all(row.status == Status.TRANSFERRING for row in rows)
    outcomes = transfer.complete(items)
    assert sorted(
        PendingTransfer.objects.filter(status=Status.DONE).values_list(
            "name", flat=True
        )
    ) == sorted(row.name for index, row in enumerate(rows) if index != 3)
    assert outcomes.count(Outcome.DONE) == 4


def test_four_lanes_carry_older_batches_and_abandon_a_hung_upload(
    make_storage: Callable[..., QueuedStorage],
    monkeypatch: pytest.MonkeyPatch,
    settings: Any,
    hanging: type[HangingStorage],
    keepers_checked: set[LeaseKeeper],
) -> None:
    """--concurrency 4, claims of two rows, keepers that look every 1/6 s, one
    upload that hangs past the transfer timeout: the other rows are carried or
    recorded with older batches, the hung one is abandoned and retried later;
    when drain() returns (and the hung upload, released, has lost), no keeper
    runs and no row is leased."""
    # A lease no loaded machine outlasts, and a keeper's clock that stands
    # still: only the hung upload is ever without progress for the timeout.
    settings.QUEUED_STORAGE_LEASE = 60
    settings.QUEUED_STORAGE_TRANSFER_TIMEOUT = 1
    settings.QUEUED_STORAGE_RETRY_DELAY = 60
    clock = KeeperClock(monkeypatch)
    storage = make_storage(remote="tests.storages.HangingStorage")
    names = [storage.save(f"f{i}.txt", content(str(i))) for i in range(12)]
    hung = storage.save("hung.txt", content("h"))
    hanging.hang = {hung}
    monkeypatch.setattr(claim_size.ClaimSize, "next", lambda self: 2)
    monkeypatch.setattr(completions, "COMPLETE_AFTER", float("inf"))

    worker, result = in_thread(lambda: drain(concurrency=4))
    assert hanging.entered.wait(timeout=30)
    clock.stall(hung)  # its keeper's next look abandons it, and only it
    stats = joined(worker, result)

    assert hanging.entered.is_set()
    hanging.released.set()
    assert hanging.returned.wait(timeout=30)
    assert lanes_returned()
    assert stats.done == 12
    assert [row_of(storage, name).status for name in names] == [Status.DONE] * 12
    row = row_of(storage, hung)
    assert (row.status, row.attempts) == (Status.QUEUED, 1)
    nothing_left_behind(keepers_checked)


def test_a_drain_with_a_limit_carries_nothing(
    make_storage: Callable[..., QueuedStorage],
    monkeypatch: pytest.MonkeyPatch,
    keepers_checked: set[LeaseKeeper],
) -> None:
    """With --limit (carry=False) each batch records its rows before the next
    claim, which counts them: three one-row batches, three groups, the fourth row
    never claimed."""
    storage = make_storage()
    names = [storage.save(f"f{i}.txt", content(str(i))) for i in range(4)]
    one_row_a_claim(monkeypatch)
    sizes: list[int] = []
    complete = transfer.complete

    def noted(batch: list[Verified]) -> Any:
        sizes.append(len(batch))
        return complete(batch)

    monkeypatch.setattr(completions, "complete", noted)

    assert drain(limit=3).done == 3

    assert sizes == [1, 1, 1]
    assert row_of(storage, names[3]).status == Status.QUEUED
    nothing_left_behind(keepers_checked)
