"""Attacks on batches a drain ends while it works on a newer one: a free lane
claims the next batch while the last rows of the one before still run, and the
lane that ends an older batch's last row records what it verified."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from queued_storage import claim_size, completions
from queued_storage.backends import QueuedStorage
from queued_storage.models import PendingTransfer, PendingTransferQuerySet
from queued_storage.transfer import Verified, complete
from queued_storage.worker import drain
from tests.helpers import (
    KeeperClock,
    content,
    in_thread,
    joined,
    lanes_returned,
    row_of,
    wait_until,
)
from tests.storages import CountingStorage

pytestmark = pytest.mark.django_db(transaction=True)

Status = PendingTransfer.Status

#: Opened by the test: the upload of ``slow.txt`` goes on.
SLOW_GOES_ON = threading.Event()
#: Set when the upload of ``slow.txt`` starts waiting for SLOW_GOES_ON.
SLOW_ENTERED = threading.Event()


class SlowStorage(CountingStorage):
    """Holds the upload of ``slow.txt`` until the test opens SLOW_GOES_ON."""

    def _save(self, name: str, content: Any) -> str:
        if name.startswith("slow"):
            SLOW_ENTERED.set()
        if name.startswith("slow") and not SLOW_GOES_ON.wait(timeout=30):
            raise TimeoutError("the test never let the slow upload go on")
        return super()._save(name, content)


def test_a_row_given_back_at_an_older_batchs_end_is_claimed_again_in_the_drain(
    make_storage: Callable[..., QueuedStorage],
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Two lanes, one batch of two rows: the fast row ends, its lane claims the
    next batch and finds nothing (the slow row still runs). The slow row ends;
    the other lane claims again, finds nothing, and the drain ended there, while
    the slow row's lane was still recording it: the name had been saved again
    since its verification, the record gave the row back queued and due, and the
    drain ended with it due (as a retry without delay would be)."""
    SLOW_GOES_ON.clear()
    settings.QUEUED_STORAGE_LEASE = 60
    storage = make_storage(
        remote=f"{__name__}.SlowStorage",
        remote_options={"location": str(tmp_path / "remote")},
        local_options={"allow_overwrite": True},
    )
    storage.save("slow.txt", content("old"))
    storage.save("fast.txt", content("f"))
    monkeypatch.setattr(claim_size.ClaimSize, "next", lambda self: 2)
    # Recorded only when a batch ends, not by age on the drain's thread.
    monkeypatch.setattr(completions, "COMPLETE_AFTER", float("inf"))
    claims: list[int] = []
    claims_lock = threading.Lock()
    claim_due = PendingTransferQuerySet.claim_due

    def counted_claim_due(self: Any, *args: Any, **kwargs: Any) -> Any:
        rows = claim_due(self, *args, **kwargs)
        with claims_lock:
            claims.append(len(rows))
        return rows

    monkeypatch.setattr(PendingTransferQuerySet, "claim_due", counted_claim_due)
    recording = threading.Event()
    release = threading.Event()

    def gated_complete(batch: list[Verified]) -> Any:
        if any(item.row.name == "slow.txt" for item in batch):
            recording.set()
            if not release.wait(timeout=30):
                raise TimeoutError("the test never released the record")
        return complete(batch)

    monkeypatch.setattr(completions, "complete", gated_complete)
    worker, result = in_thread(lambda: drain(concurrency=2))
    try:
        # The caller's claim (both rows), the fast row's lane's (nothing).
        assert wait_until(lambda: len(claims) >= 2)
        assert claims[:2] == [2, 0]
        SLOW_GOES_ON.set()
        assert recording.wait(timeout=30)
        # The other lane claims once the slow row has ended: nothing due yet.
        assert wait_until(lambda: len(claims) >= 3)
        assert storage.save("slow.txt", content("new")) == "slow.txt"
    finally:
        SLOW_GOES_ON.set()
        release.set()
    stats = joined(worker, result)
    row = row_of(storage, "slow.txt")
    assert row.status == Status.DONE, "the row saved again is left due"
    assert row.lease_token is None or row.lease_expires_at is None
    with storage.remote.open("slow.txt") as remote_file:
        assert remote_file.read() == b"new"
    assert row_of(storage, "fast.txt").status == Status.DONE
    assert (stats.done, stats.stale) == (2, 1)


@pytest.mark.parametrize("concurrency", [1, 2])
def test_a_stop_during_a_claim_hands_its_rows_back(
    make_storage: Callable[..., QueuedStorage],
    monkeypatch: pytest.MonkeyPatch,
    concurrency: int,
) -> None:
    """The stop comes while the second claim's query runs: the rows it took are
    given back unstarted, what the first claim verified is recorded, and no row
    is left leased to the drain that ended."""
    storage = make_storage()
    for name in ("a.txt", "b.txt", "c.txt", "d.txt"):
        storage.save(name, content(name))
    monkeypatch.setattr(claim_size.ClaimSize, "next", lambda self: 2)
    stopping = threading.Event()
    claim_due = PendingTransferQuerySet.claim_due
    claimed: list[list[str]] = []

    def stopped_during_claim(self: Any, *args: Any, **kwargs: Any) -> Any:
        rows = claim_due(self, *args, **kwargs)
        claimed.append([row.name for row in rows])
        if len(claimed) == 2:
            stopping.set()
        return rows

    monkeypatch.setattr(PendingTransferQuerySet, "claim_due", stopped_during_claim)
    stats = drain(concurrency=concurrency, should_stop=stopping.is_set)
    assert len(claimed) == 2 and len(claimed[1]) == 2
    for name in claimed[0]:
        assert row_of(storage, name).status == Status.DONE
    for name in claimed[1]:
        row = row_of(storage, name)
        assert (row.status, row.lease_expires_at, row.attempts) == (
            Status.QUEUED,
            None,
            0,
        )
        assert not storage.remote.exists(name)
    assert (stats.done, stats.processed) == (2, 2)


def test_a_stop_while_an_older_batch_runs_keeps_its_lease_and_hands_back_the_rest(
    make_storage: Callable[..., QueuedStorage],
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The stop comes with the next batch's claim while the older batch's slow
    row still runs: the new batch's rows are given back at once, the slow row's
    lease is renewed until it ends, and it is recorded."""
    SLOW_GOES_ON.clear()
    SLOW_ENTERED.clear()
    # A lease no loaded machine outlasts; a timeout of 1 s has the keeper renew
    # every 1/3 s of its clock, which stands still but for the test's move.
    settings.QUEUED_STORAGE_LEASE = 60
    settings.QUEUED_STORAGE_TRANSFER_TIMEOUT = 1
    clock = KeeperClock(monkeypatch)
    storage = make_storage(
        remote=f"{__name__}.SlowStorage",
        remote_options={"location": str(tmp_path / "remote")},
    )
    for name in ("slow.txt", "fast.txt", "c.txt", "d.txt"):
        storage.save(name, content(name))
    monkeypatch.setattr(claim_size.ClaimSize, "next", lambda self: 2)
    stopping = threading.Event()
    claim_due = PendingTransferQuerySet.claim_due
    claimed: list[list[str]] = []

    def stopped_during_claim(self: Any, *args: Any, **kwargs: Any) -> Any:
        rows = claim_due(self, *args, **kwargs)
        claimed.append([row.name for row in rows])
        if len(claimed) == 2:
            stopping.set()
        return rows

    monkeypatch.setattr(PendingTransferQuerySet, "claim_due", stopped_during_claim)
    worker, result = in_thread(
        lambda: drain(concurrency=2, should_stop=stopping.is_set)
    )
    try:
        assert stopping.wait(timeout=30)
        assert sorted(claimed[0]) == ["fast.txt", "slow.txt"]

        def handed_back() -> bool:
            rows = [row_of(storage, name) for name in claimed[1]]
            return all(row.lease_expires_at is None for row in rows)

        assert wait_until(handed_back), "the new batch's rows stay leased"
        first = row_of(storage, "slow.txt").lease_expires_at
        assert first is not None
        assert SLOW_ENTERED.wait(timeout=30)  # its attempt runs: the move is seen
        clock.advance(0.5)  # a renewal due (1/3 s), the timeout (1 s) not reached

        def renewed() -> bool:
            until = row_of(storage, "slow.txt").lease_expires_at
            return until is not None and until > first

        assert wait_until(renewed), "the running row's lease is not renewed"
    finally:
        SLOW_GOES_ON.set()
    stats = joined(worker, result)
    assert row_of(storage, "slow.txt").status == Status.DONE
    assert row_of(storage, "fast.txt").status == Status.DONE
    for name in claimed[1]:
        row = row_of(storage, name)
        assert (row.status, row.lease_expires_at, row.attempts) == (
            Status.QUEUED,
            None,
            0,
        )
    assert (stats.done, stats.processed) == (2, 2)


class RefusingStorage(CountingStorage):
    """Refuses every upload at once: a fast failure."""

    def _save(self, name: str, content: Any) -> str:
        raise ConnectionError("remote unreachable")


@pytest.mark.parametrize("limit", [1, 3, 5])
def test_a_limit_holds_with_lanes_and_fast_failures_retried_without_delay(
    make_storage: Callable[..., QueuedStorage],
    settings: Any,
    limit: int,
    tmp_path: Path,
) -> None:
    """Every upload fails at once and is due again at once: a drain with a limit
    and two lanes makes exactly ``limit`` attempts, each counted once."""
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    settings.QUEUED_STORAGE_RETRIES = 10
    # Each row's own attempts, as they count without the breaker (which would
    # take every attempt after the fifth failure in a row: test_breaker.py).
    settings.QUEUED_STORAGE_BREAKER_FAILURES = 0
    storage = make_storage(
        remote=f"{__name__}.RefusingStorage",
        # Its own directory: MEDIA_ROOT is shared, and may hold an a.txt.
        remote_options={"location": str(tmp_path / "remote")},
    )
    for name in ("a.txt", "b.txt"):
        storage.save(name, content(name))
    stats = drain(limit=limit, concurrency=2)
    attempts = sum(row_of(storage, name).attempts for name in ("a.txt", "b.txt"))
    assert (stats.retried, stats.processed, attempts) == (limit, limit, limit)
    for name in ("a.txt", "b.txt"):
        row = row_of(storage, name)
        assert (row.status, row.lease_expires_at) == (Status.QUEUED, None)


@pytest.mark.parametrize("concurrency", [1, 2, 3])
def test_fast_failures_retried_without_delay_use_their_attempts_in_one_drain(
    make_storage: Callable[..., QueuedStorage],
    settings: Any,
    concurrency: int,
    tmp_path: Path,
) -> None:
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    settings.QUEUED_STORAGE_RETRIES = 4
    settings.QUEUED_STORAGE_BREAKER_FAILURES = 0  # the rows' own limits
    storage = make_storage(
        remote=f"{__name__}.RefusingStorage",
        # Its own directory: MEDIA_ROOT is shared, and may hold an a.txt.
        remote_options={"location": str(tmp_path / "remote")},
    )
    for name in ("a.txt", "b.txt"):
        storage.save(name, content(name))
    stats = drain(concurrency=concurrency)
    for name in ("a.txt", "b.txt"):
        row = row_of(storage, name)
        assert (row.status, row.attempts) == (Status.FAILED, 5)  # 1 + 4 retries
    assert (stats.retried, stats.failed, stats.processed) == (8, 2, 10)


#: Opened by the test: the first, hung upload of ``hung.txt`` returns.
HUNG_RETURNS = threading.Event()
#: Set when the first upload of ``hung.txt`` starts waiting for HUNG_RETURNS.
HUNG_ENTERED = threading.Event()


class HangingOnceStorage(CountingStorage):
    """The first upload of ``hung.txt`` hangs (no progress) until the test opens
    HUNG_RETURNS, and then writes stale bytes; later uploads go through."""

    hung = 0
    lock = threading.Lock()

    def _save(self, name: str, content: Any) -> str:
        if name.startswith("hung"):
            with HangingOnceStorage.lock:
                HangingOnceStorage.hung += 1
                first = HangingOnceStorage.hung == 1
            if first:
                HUNG_ENTERED.set()
            if first and not HUNG_RETURNS.wait(timeout=30):
                raise TimeoutError("the test never let the hung upload return")
        return super()._save(name, content)


def test_an_older_batchs_abandoned_row_is_retried_in_the_drain_and_its_late_return_loses(
    make_storage: Callable[..., QueuedStorage],
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Two lanes, one batch: the fast row ends and its lane claims on (the batch
    becomes an older one); the hung row is abandoned by the transfer timeout,
    which ends the older batch, is due again at once and is uploaded again in
    the same drain; the hung upload then returns, and loses."""
    HUNG_RETURNS.clear()
    HUNG_ENTERED.clear()
    HangingOnceStorage.hung = 0
    settings.QUEUED_STORAGE_LEASE = 60
    settings.QUEUED_STORAGE_TRANSFER_TIMEOUT = 1
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    # The keeper's clock stands still: only the hung upload, marked stalled by
    # the test, is ever without progress for the timeout; the fast row's upload
    # and the hung row's retry, slowed by a loaded machine, are never abandoned.
    clock = KeeperClock(monkeypatch)
    storage = make_storage(
        remote=f"{__name__}.HangingOnceStorage",
        remote_options={"location": str(tmp_path / "remote")},
    )
    storage.save("hung.txt", content("h"))
    storage.save("fast.txt", content("f"))
    monkeypatch.setattr(claim_size.ClaimSize, "next", lambda self: 2)
    worker, result = in_thread(lambda: drain(concurrency=2))
    try:
        assert HUNG_ENTERED.wait(timeout=30)
        clock.stall("hung.txt")  # its keeper's next look abandons it, and only it
        assert wait_until(lambda: row_of(storage, "hung.txt").status == Status.DONE)
    finally:
        HUNG_RETURNS.set()
    # The drain need not wait for the lane left behind on the hung upload.
    stats = joined(worker, result)

    assert lanes_returned(), "the hung upload's lane never returned"
    with storage.remote.open("hung.txt") as remote_file:
        assert remote_file.read() == b"h"
    row = row_of(storage, "hung.txt")
    assert (row.status, row.attempts, row.lease_expires_at) == (Status.DONE, 2, None)
    assert HangingOnceStorage.hung == 2
    assert (stats.done, stats.retried, stats.processed) == (2, 1, 3)
    assert row_of(storage, "fast.txt").status == Status.DONE
