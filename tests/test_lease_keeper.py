"""Lease keepers start their thread only once their claim lasts half a renewal
period: a claim of a few rows to a fast remote costs no thread, and one that
lasts is renewed as before."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from queued_storage import claim_size, leases
from queued_storage.backends import QueuedStorage
from queued_storage.leases import LeaseKeeper
from queued_storage.worker import drain
from tests.helpers import (
    KeeperClock,
    content,
    in_thread,
    joined,
    row_of,
    thread_starts,
    wait_until,
)
from tests.storages import CountingStorage

pytestmark = pytest.mark.django_db(transaction=True)


class GatedStorage(CountingStorage):
    """Holds every upload until :attr:`release` is set."""

    entered = threading.Event()
    release = threading.Event()

    def _save(self, name: str, content: Any) -> str:
        type(self).entered.set()
        if not type(self).release.wait(timeout=30):
            raise TimeoutError("the test never released the upload")
        return super()._save(name, content)


def test_claims_that_end_within_half_a_period_start_no_keeper_thread(
    make_storage: Callable[..., QueuedStorage],
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A thread started and joined for every claim of one to three rows was a
    worker's CPU a row (issue 14): none is needed before its first renewal."""
    settings.QUEUED_STORAGE_LEASE = 300
    settings.QUEUED_STORAGE_TRANSFER_TIMEOUT = 600
    storage = make_storage()
    for i in range(4):
        storage.save(f"f{i}.txt", content(str(i)))
    monkeypatch.setattr(claim_size.ClaimSize, "next", lambda self: 1)
    started = thread_starts(monkeypatch)

    stats = drain()

    assert stats.done == 4
    assert [n for n in started if n.startswith("queued-storage-lease")] == []


def test_a_claim_that_lasts_is_renewed_by_a_keeper_started_for_it(
    make_storage: Callable[..., QueuedStorage],
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A lease no loaded machine outlasts; the keeper, started after 1/6 s, renews
    # every 1/3 s of its clock (the timeout's third), which stands still but for
    # the test's move.
    settings.QUEUED_STORAGE_LEASE = 60
    settings.QUEUED_STORAGE_TRANSFER_TIMEOUT = 1
    clock = KeeperClock(monkeypatch)
    GatedStorage.entered.clear()
    GatedStorage.release.clear()
    storage = make_storage(remote=f"{__name__}.GatedStorage")
    name = storage.save("slow.txt", content("s"))
    worker, result = in_thread(drain)
    try:
        assert GatedStorage.entered.wait(timeout=30)
        claimed_until = row_of(storage, name).lease_expires_at
        assert claimed_until is not None
        clock.advance(0.5)  # a renewal due (1/3 s), the timeout (1 s) not reached

        def renewed() -> bool:
            until = row_of(storage, name).lease_expires_at
            return until is not None and until > claimed_until

        assert wait_until(renewed, timeout=10), "the running row was not renewed"
    finally:
        GatedStorage.release.set()
    assert joined(worker, result).done == 1


def test_a_keeper_stopped_before_its_turn_never_starts() -> None:
    """``join`` may come while the starter takes the keeper up: the starter then
    starts no thread for it (one would renew rows recorded already)."""
    keeper = LeaseKeeper("t" * 32, 300, timeout=600)
    keeper.start()
    keeper.stopped.set()
    keeper._start_thread()  # what the starter does once the keeper is due
    keeper.join()
    assert keeper.thread is None
    assert keeper not in leases._starter.pending


def test_a_keeper_due_sooner_than_those_waiting_starts_on_time() -> None:
    """The starter, waiting for a keeper of a long lease, is woken for one added
    with a shorter one."""
    slow = LeaseKeeper("s" * 32, 600, timeout=3600)
    fast = LeaseKeeper("f" * 32, 0.3, timeout=3600)  # started after 0.05 s
    slow.start()
    try:
        # The starter is waiting for the slow keeper's turn.
        assert wait_until(lambda: leases._starter.until is not None, timeout=10)
        fast.start()
        assert wait_until(fast.is_alive, timeout=10)
        assert not slow.is_alive()
    finally:
        for keeper in (slow, fast):
            keeper.stopped.set()
            keeper.join()
    assert not fast.is_alive()
    assert slow.thread is None
