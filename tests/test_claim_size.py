"""Claims don't hoard: a worker claims about what it will start soon (a row per
lane), more only while rows finish fast, so that a second worker finds rows to
take while the first is busy. Time here is a clock the test moves; the waits
are events."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.files.storage import FileSystemStorage
from django.db import connections

from queued_storage import claim_size
from queued_storage.backends import QueuedStorage
from queued_storage.claim_size import (
    CLAIM_AHEAD,
    CLAIM_COST_SHARE,
    GROWTH,
    HAND_BACK_AFTER,
    MOST_AHEAD,
    ClaimSize,
)
from queued_storage.models import PendingTransfer, PendingTransferQuerySet
from queued_storage.stats import DrainStats
from queued_storage.worker import drain
from tests.helpers import content

Status = PendingTransfer.Status


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.lock = threading.Lock()

    def __call__(self) -> float:
        with self.lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(claim_size, "clock", fake)
    return fake


def claims_of(
    sizes: ClaimSize, clock: FakeClock, batches: list[tuple[int, float]]
) -> list[int]:
    """The size asked for before each of ``batches`` (rows taken, seconds they
    took), and the one after the last."""
    asked = []
    for rows, seconds in batches:
        asked.append(sizes.next())
        sizes.claimed(rows)
        clock.advance(seconds)
    asked.append(sizes.next())
    return asked


# The rule


def test_the_first_claim_takes_a_row_per_lane(clock: FakeClock) -> None:
    assert ClaimSize(2, 200).next() == 2
    assert ClaimSize(1, 200).next() == 1
    assert ClaimSize(8, 5).next() == 5  # never more than the batch size


def test_slow_rows_keep_claims_at_a_row_per_lane(clock: FakeClock) -> None:
    # Rows of 20 ms on two lanes: 100 rows/s, 5 rows in CLAIM_AHEAD.
    sizes = ClaimSize(2, 200)
    asked = claims_of(sizes, clock, [(2, 0.02)] * 3 + [(2, 1.0)] * 3)

    assert asked[:4] == [2, 5, 5, 5]
    assert asked[4:] == [2, 2, 2]


def test_claims_grow_while_rows_finish_fast_up_to_the_batch_size(
    clock: FakeClock,
) -> None:
    sizes = ClaimSize(1, 200)
    batches = []
    for _ in range(6):
        size = sizes.next()
        sizes.claimed(size)
        batches.append(size)
        clock.advance(size * 0.0001)  # 0.1 ms a row

    assert batches == [1, GROWTH, GROWTH**2, GROWTH**3, 200, 200]


def test_claims_shrink_to_a_row_per_lane_when_rows_turn_slow(
    clock: FakeClock,
) -> None:
    sizes = ClaimSize(4, 200)
    asked = claims_of(sizes, clock, [(4, 0.0004), (16, 0.0016), (64, 0.0064)])
    assert asked == [4, 16, 64, 200]

    sizes.claimed(200)
    clock.advance(60.0)  # those 200 rows took a minute

    assert sizes.next() == 4


def test_an_empty_claim_teaches_nothing(clock: FakeClock) -> None:
    sizes = ClaimSize(2, 200)
    asked = claims_of(sizes, clock, [(2, 0.0002), (0, 30.0)])

    assert asked == [2, 2 * GROWTH, 2 * GROWTH]


def test_what_a_claim_takes_lasts_about_claim_ahead_at_the_last_rate(
    clock: FakeClock,
) -> None:
    sizes = ClaimSize(1, 10_000)
    sizes.next()
    sizes.claimed(100)
    clock.advance(0.5)  # 200 rows/s

    assert sizes.next() == round(200 * CLAIM_AHEAD)


def test_slow_claims_take_more_rows_so_claiming_stays_a_small_share(
    clock: FakeClock,
) -> None:
    # Rows of 20 ms on one lane; each claim's round trip takes 10 ms.
    sizes = ClaimSize(1, 200)
    asked = []
    for _ in range(8):
        size = sizes.next()
        asked.append(size)
        clock.advance(0.01)
        sizes.claimed(size)
        clock.advance(size * 0.02)

    ahead = CLAIM_COST_SHARE * 0.01
    assert sizes.ahead() == pytest.approx(ahead)
    # Growth is bounded by GROWTH a claim; then work for `ahead` seconds at the
    # rate the rows went, claims included: 9 rows (180 ms) a claim of 10 ms.
    assert asked == [1, 4, 9, 9, 9, 9, 9, 9]


def test_however_slow_the_claim_it_takes_at_most_most_ahead_of_work(
    clock: FakeClock,
) -> None:
    sizes = ClaimSize(1, 10_000)
    for _ in range(10):
        size = sizes.next()
        clock.advance(5.0)  # a database that takes seconds to commit
        sizes.claimed(size)
        clock.advance(size * 0.001)

    assert sizes.ahead() == MOST_AHEAD
    assert sizes.next() <= round(MOST_AHEAD / 0.001)


# A drain


class ClockedRemote(FileSystemStorage):
    """Each upload moves the claims' clock on by ``seconds``: rows that are slow
    as the worker sees them, in no time."""

    clock: FakeClock | None = None
    seconds = 1.0

    def _save(self, name: str, content: Any) -> str:
        assert self.clock is not None
        self.clock.advance(self.seconds)
        return str(super()._save(name, content))  # type: ignore[misc]


class GatedRemote(FileSystemStorage):
    """Each upload announces itself on ``entered`` and waits for ``gate``."""

    entered = threading.Semaphore(0)
    gate = threading.Event()

    def _save(self, name: str, content: Any) -> str:
        type(self).entered.release()
        if not type(self).gate.wait(timeout=60):
            raise TimeoutError("the test never opened the gate")
        return str(super()._save(name, content))  # type: ignore[misc]


@pytest.fixture
def claim_limits(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The ``limit`` of every claim_due() call."""
    limits: list[int] = []
    original = PendingTransferQuerySet.claim_due

    def spy(self: PendingTransferQuerySet, **kwargs: Any) -> list[PendingTransfer]:
        limits.append(kwargs["limit"])
        return original(self, **kwargs)

    monkeypatch.setattr(PendingTransferQuerySet, "claim_due", spy)
    yield limits


def storage_on(
    make_storage: Callable[..., QueuedStorage], tmp_path: Path, remote: type
) -> QueuedStorage:
    return make_storage(
        remote=f"{__name__}.{remote.__name__}",
        remote_options={"location": str(tmp_path / "remote")},
    )


@pytest.mark.django_db(transaction=True)
def test_a_worker_with_slow_rows_claims_a_row_per_lane(
    make_storage: Callable[..., QueuedStorage],
    tmp_path: Path,
    clock: FakeClock,
    claim_limits: list[int],
) -> None:
    ClockedRemote.clock = clock
    storage = storage_on(make_storage, tmp_path, ClockedRemote)
    for i in range(10):
        storage.save(f"f{i}.txt", content(f"file {i}"))

    stats = drain(keys=[storage.key], concurrency=2)

    assert stats.done == 10
    # A second a row on two lanes: never more than the two it starts at once
    # (a free lane claims while the other's row runs; the last claims find
    # nothing).
    assert len(claim_limits) >= 6
    assert set(claim_limits) == {2}


@pytest.mark.django_db(transaction=True)
def test_a_second_worker_gets_rows_while_the_first_is_busy(
    make_storage: Callable[..., QueuedStorage],
    tmp_path: Path,
) -> None:
    GatedRemote.entered = threading.Semaphore(0)
    GatedRemote.gate = threading.Event()
    storage = storage_on(make_storage, tmp_path, GatedRemote)
    for i in range(10):
        storage.save(f"f{i}.txt", content(f"file {i}"))
    results: dict[str, DrainStats] = {}
    errors: list[BaseException] = []

    def worker(name: str, concurrency: int) -> None:
        try:
            results[name] = drain(keys=[storage.key], concurrency=concurrency)
        except BaseException as exc:
            errors.append(exc)
        finally:
            GatedRemote.entered.release()  # wakes the test if nothing was uploaded
            connections.close_all()

    first = threading.Thread(target=worker, args=("first", 2))
    second = threading.Thread(target=worker, args=("second", 1))
    try:
        first.start()
        for _ in range(2):
            assert GatedRemote.entered.acquire(timeout=60)
        # Both lanes of the first worker are busy uploading.
        leased = PendingTransfer.objects.filter(
            storage_key=storage.key, status=Status.TRANSFERRING
        )
        assert leased.count() == 2, "the first worker holds rows it has not started"

        second.start()
        assert GatedRemote.entered.acquire(timeout=60)
        assert "second" not in results, "the second worker found nothing to take"
        assert leased.count() == 3
        assert leased.values("lease_token").distinct().count() == 2
    finally:
        GatedRemote.gate.set()
        first.join(timeout=60)
        second.join(timeout=60)

    assert not errors
    assert results["first"].done + results["second"].done == 10
    assert results["second"].done >= 1
    rows = PendingTransfer.objects.filter(storage_key=storage.key)
    assert set(rows.values_list("status", flat=True)) == {Status.DONE}


class NameGatedRemote(FileSystemStorage):
    """The upload of ``held`` announces itself on ``entered`` and waits for
    ``gate``; the others go through."""

    held = ""
    entered = threading.Event()
    gate = threading.Event()

    def _save(self, name: str, content: Any) -> str:
        if name == type(self).held:
            type(self).entered.set()
            if not type(self).gate.wait(timeout=60):
                raise TimeoutError("the test never opened the gate")
        return str(super()._save(name, content))  # type: ignore[misc]


@pytest.mark.django_db(transaction=True)
def test_rows_behind_a_held_up_upload_are_handed_back_to_another_worker(
    make_storage: Callable[..., QueuedStorage],
    tmp_path: Path,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fast row grew the claim; then one upload holds the only lane. The rows
    claimed behind it are given back soon, not left leased while another worker
    could take them."""
    NameGatedRemote.held = "a.txt"
    NameGatedRemote.entered = threading.Event()
    NameGatedRemote.gate = threading.Event()
    storage = storage_on(make_storage, tmp_path, NameGatedRemote)
    x, a, *behind = [storage.save(f"{n}.txt", content(n)) for n in "xabc"]
    handed_back = threading.Event()
    release = PendingTransferQuerySet.release_claim

    def spy(self: PendingTransferQuerySet, rows: list[PendingTransfer]) -> int:
        given = release(self, rows)
        handed_back.set()
        return given

    monkeypatch.setattr(PendingTransferQuerySet, "release_claim", spy)
    results: list[DrainStats] = []

    def worker() -> None:
        try:
            results.append(drain(keys=[storage.key], concurrency=1))
        finally:
            connections.close_all()

    thread = threading.Thread(target=worker)
    thread.start()
    rows = PendingTransfer.objects.filter(storage_key=storage.key)
    try:
        # x alone, in no time (the test's clock stands still); then a claim of
        # four takes a and the two behind it, and a's upload holds the lane.
        assert NameGatedRemote.entered.wait(timeout=60)
        waiting = rows.filter(name__in=behind)
        assert (
            list(waiting.values_list("status", flat=True)) == [Status.TRANSFERRING] * 2
        )
        assert not handed_back.is_set()

        clock.advance(HAND_BACK_AFTER)
        assert handed_back.wait(timeout=60), "the unstarted rows stayed leased"
        rival = rows.claim_due(limit=10, lease=300)
        assert sorted(row.name for row in rival) == sorted(behind)
    finally:
        NameGatedRemote.gate.set()
        thread.join(timeout=60)

    assert results[0].done == 2
    assert rows.get(name=x).status == rows.get(name=a).status == Status.DONE
    assert set(waiting.values_list("lease_token", flat=True)) == {rival[0].lease_token}
