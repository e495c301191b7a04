"""The transfer history (``queued_storage.history``): each done row and each failed
attempt counted exactly once, in its storage's minute, by the transaction that
records it; concurrent workers lose no increment; pruning folds old minutes into
one carry row a storage, so that a storage's totals never go down."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connections, transaction
from django.db.models import F
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from queued_storage import completions, history
from queued_storage.backends import QueuedStorage
from queued_storage.checks import check_settings
from queued_storage.conf import settings as conf
from queued_storage.errors import Outcome
from queued_storage.failures import ledger_db
from queued_storage.history import (
    BOUNDS,
    BUCKETS,
    Counts,
    TransferMinute,
    carry_minute,
    count_done,
    count_failure,
    cumulative,
    prune,
    series,
    totals,
)
from queued_storage.models import PendingTransfer
from queued_storage.transfer import Verified, complete, transfer_row
from queued_storage.worker import drain
from tests.helpers import ALWAYS_FAILING, FLAKY, add_history, content, in_thread, joined

Status = PendingTransfer.Status
DAY = timedelta(days=1)


def history_upserts(captured: CaptureQueriesContext) -> list[str]:
    table = TransferMinute._meta.db_table
    return [
        query["sql"]
        for query in captured.captured_queries
        if query["sql"].lstrip().upper().startswith("INSERT") and table in query["sql"]
    ]


def done_updates(captured: CaptureQueriesContext) -> list[str]:
    return [
        query["sql"]
        for query in captured.captured_queries
        if query["sql"].lstrip().upper().startswith("UPDATE")
        and "transferred_at" in query["sql"]
        and "'done'" in query["sql"]
    ]


@dataclass
class FakeDone:
    row: Any
    at: float
    started: float


@dataclass
class FakeRow:
    storage_key: str
    size: int | None


# Counting


@pytest.mark.django_db
def test_a_drain_counts_each_done_row_once_with_its_bytes_and_duration(
    storage: QueuedStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(completions, "COMPLETE_AFTER", 3600.0)
    sizes = [1, 10, 100, 1000, 10000]
    for i, size in enumerate(sizes):
        storage.save(f"f{i}.bin", content("x" * size))

    with CaptureQueriesContext(connections[ledger_db()]) as captured:
        started = timezone.now()
        stats = drain(keys=[storage.key])
        elapsed = (timezone.now() - started).total_seconds()

    assert stats.done == 5
    counts = totals([storage.key])[storage.key]
    assert (counts.files, counts.bytes, counts.failures) == (5, sum(sizes), 0)
    assert sum(counts.buckets) == 5
    assert 0 < counts.duration_sum <= elapsed
    # One upsert for each group recorded done together, none per row.
    assert len(history_upserts(captured)) == len(done_updates(captured)) == 1
    minutes = series(started - timedelta(minutes=1), keys=[storage.key])[storage.key]
    assert sum(c.files for c in minutes.values()) == 5
    assert all(minute.second == minute.microsecond == 0 for minute in minutes)


@pytest.mark.django_db
def test_a_group_of_two_storages_is_one_upsert_each_and_a_stale_row_is_not_counted(
    make_storage: Callable[..., QueuedStorage],
) -> None:
    first, second = make_storage(), make_storage()
    for storage in (first, second):
        for i in range(3):
            storage.save(f"f{i}.txt", content("abcd"))
    rows = PendingTransfer.objects.filter(
        storage_key__in=[first.key, second.key]
    ).claim_due(limit=6, lease=60)
    verified = [transfer_row(row) for row in rows]
    assert all(isinstance(item, Verified) for item in verified)

    with CaptureQueriesContext(connections[ledger_db()]) as captured:
        assert complete(verified) == [Outcome.DONE] * 6  # type: ignore[arg-type]
    assert len(history_upserts(captured)) == 2
    found = totals([first.key, second.key])
    assert (found[first.key].files, found[first.key].bytes) == (3, 12)
    assert (found[second.key].files, found[second.key].bytes) == (3, 12)

    # A re-save of a name while a worker held it: its done record loses, uncounted.
    first.save("late.txt", content("late"))
    (row,) = PendingTransfer.objects.for_name(first.key, "late.txt").claim_due(
        limit=1, lease=60
    )
    late = transfer_row(row)
    PendingTransfer.objects.filter(pk=row.pk).update(generation=F("generation") + 1)
    assert complete([late]) == [Outcome.STALE]  # type: ignore[list-item]
    assert totals([first.key])[first.key].files == 3


@pytest.mark.django_db
def test_each_failed_attempt_is_counted_once(
    make_storage: Callable[..., QueuedStorage], settings: Any
) -> None:
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    settings.QUEUED_STORAGE_RETRIES = 3
    flaky = make_storage(remote=FLAKY, remote_options={"failures": 2})
    failing = make_storage(remote=FLAKY, remote_options=ALWAYS_FAILING)
    flaky.save("a.txt", content("abc"))
    failing.save("b.txt", content("abc"))

    drain(keys=[flaky.key, failing.key])

    found = totals([flaky.key, failing.key])
    assert PendingTransfer.objects.get(storage_key=flaky.key).status == Status.DONE
    assert (found[flaky.key].files, found[flaky.key].failures) == (1, 2)
    gave_up = PendingTransfer.objects.get(storage_key=failing.key)
    assert gave_up.status == Status.FAILED
    assert (found[failing.key].files, found[failing.key].failures) == (
        0,
        gave_up.attempts,
    )
    assert gave_up.attempts == 4


@pytest.mark.django_db
def test_the_count_and_the_ledger_write_commit_or_roll_back_together(
    storage: QueuedStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(3):
        storage.save(f"f{i}.txt", content("abc"))
    rows = PendingTransfer.objects.filter(storage_key=storage.key).claim_due(
        limit=3, lease=60
    )
    verified = [transfer_row(row) for row in rows]

    def broken(*args: Any) -> None:
        raise RuntimeError("history unavailable")

    monkeypatch.setattr(history, "_add", broken)
    with pytest.raises(RuntimeError):
        complete(verified)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError):
        complete(verified[:1])  # type: ignore[arg-type]
    with pytest.raises(RuntimeError):
        rows[2].mark_failure("boom", retry=True, max_retries=5, base_delay=0)

    # No row recorded done or failed without its count: each is as the claim
    # left it, still leased, its attempt still to be recorded.
    for row in PendingTransfer.objects.filter(storage_key=storage.key):
        assert (row.status, row.last_error) == (Status.TRANSFERRING, "")
    monkeypatch.undo()
    assert totals([storage.key]) == {}
    assert complete(verified) == [Outcome.DONE] * 3  # type: ignore[arg-type]
    assert totals([storage.key])[storage.key].files == 3


def test_durations_go_to_the_bucket_of_their_upper_bound() -> None:
    key = "bounds"
    durations = [-1.0, 0.0, 0.05, 0.0500001, 1.0, 299.9, 300.0, 300.1, 1e9]
    per_key: dict[str, list[Any]] = {}

    def add(found: dict[str, list[Any]], minute: datetime, db: str) -> None:
        per_key.update(found)

    items = [FakeDone(FakeRow(key, 7), at=100.0 + d, started=100.0) for d in durations]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(history, "_add", add)
        count_done(items, "default")

    counts = dict(zip(history.COUNTED, per_key[key], strict=True))
    assert (counts["files"], counts["bytes"]) == (9, 63)
    assert counts["duration_sum"] == pytest.approx(sum(max(d, 0) for d in durations))
    assert [counts[name] for name in BUCKETS] == [3, 1, 0, 0, 1, 0, 0, 0, 0, 0, 2, 2]
    assert len(BUCKETS) == len(BOUNDS) == 12 and BUCKETS[-1] == "le_inf"
    assert cumulative([3, 1, 0, 2]) == [3, 4, 4, 6]


@pytest.mark.django_db(transaction=True)
def test_concurrent_workers_lose_no_increment(
    make_storage: Callable[..., QueuedStorage],
) -> None:
    key = "concurrent"
    workers, each = 4, 25
    start = threading.Barrier(workers)

    def worker() -> None:
        start.wait(timeout=30)
        for _ in range(each):
            with transaction.atomic(using=ledger_db()):
                count_failure(key, ledger_db())

    threads = [in_thread(worker) for _ in range(workers)]
    for thread, result in threads:
        joined(thread, result)
    assert totals([key])[key].failures == workers * each
    assert TransferMinute.objects.filter(storage_key=key).count() <= 2

    storage = make_storage()
    for i in range(40):
        storage.save(f"f{i}.txt", content("abcde"))
    stats = drain(keys=[storage.key], concurrency=4)
    assert stats.done == 40
    assert (totals([storage.key])[storage.key].files, totals()[storage.key].bytes) == (
        40,
        200,
    )
    TransferMinute.objects.filter(storage_key=key).delete()


# Pruning


def old_and_new_minutes(key: str, now: datetime) -> None:
    """Minutes at 3, 2.5 and 2 days and a second old, and one an hour old."""
    for age in (timedelta(days=3), timedelta(days=2.5), 2 * DAY + timedelta(minutes=1)):
        add_history(key, history.this_minute(now - age), files=2, bytes=20, le_1=2)
    add_history(key, history.this_minute(now - timedelta(hours=1)), files=1, failures=3)


@pytest.mark.django_db
def test_pruning_folds_old_minutes_into_one_carry_row_and_totals_stay(
    settings: Any,
) -> None:
    now = timezone.now()
    for key in ("a", "b"):
        old_and_new_minutes(key, now)
    before = totals(["a", "b"])
    assert before["a"] == Counts(
        files=7, bytes=60, failures=3, buckets=(0, 0, 0, 0, 6, *[0] * 7)
    )

    assert prune(now) == 6
    assert totals(["a", "b"]) == before
    for key in ("a", "b"):
        left = TransferMinute.objects.filter(storage_key=key)
        assert sorted(left.values_list("minute", flat=True)) == [
            carry_minute(),
            history.this_minute(now - timedelta(hours=1)),
        ]
    # The window's minutes leave the carry row out.
    window = series(now - 7 * DAY, keys=["a"])["a"]
    assert list(window) == [history.this_minute(now - timedelta(hours=1))]

    # Pruned again later: the same carry row grows, totals only grow.
    assert prune(now) == 0
    add_history("a", history.this_minute(now - 4 * DAY), files=5)
    assert prune(now) == 1
    assert totals(["a"])["a"].files == 12
    assert TransferMinute.objects.filter(storage_key="a").count() == 2

    # A longer retention keeps more.
    settings.QUEUED_STORAGE_HISTORY_RETENTION = 10 * DAY.total_seconds()
    add_history("a", history.this_minute(now - 4 * DAY), files=5)
    assert prune(now) == 0


@pytest.mark.django_db(transaction=True)
def test_pruners_running_at_once_fold_each_minute_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(history, "PRUNE_ROWS", 7)  # several folds each
    now = timezone.now()
    keys = ["p1", "p2", "p3"]
    for key in keys:
        for minutes in range(20):
            add_history(
                key,
                history.this_minute(now - 3 * DAY - timedelta(minutes=minutes)),
                files=1,
                bytes=minutes,
            )
    before = totals(keys)
    pruners = 4
    start = threading.Barrier(pruners)

    def pruner() -> int:
        start.wait(timeout=30)
        return prune(now)

    threads = [in_thread(pruner) for _ in range(pruners)]
    folded = [joined(thread, result) for thread, result in threads]

    assert sum(folded) == 60
    assert totals(keys) == before
    assert TransferMinute.objects.filter(storage_key__in=keys).count() == 3
    TransferMinute.objects.filter(storage_key__in=keys).delete()


@pytest.mark.django_db
def test_a_drain_prunes_at_most_every_ten_minutes(
    storage: QueuedStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(history, "_pruned", {})
    old = history.this_minute(timezone.now() - 3 * DAY)
    add_history(storage.key, old, files=1)

    drain(keys=[storage.key])  # nothing due: no pruning
    assert TransferMinute.objects.filter(minute=old).exists()

    storage.save("a.txt", content("a"))
    drain(keys=[storage.key])
    assert not TransferMinute.objects.filter(minute=old).exists()

    add_history(storage.key, old, files=1)
    storage.save("b.txt", content("b"))
    drain(keys=[storage.key])
    assert TransferMinute.objects.filter(minute=old).exists()  # pruned just now

    history._pruned["at"] -= history.PRUNE_EVERY + 1  # ten minutes later
    storage.save("c.txt", content("c"))
    drain(keys=[storage.key])
    assert not TransferMinute.objects.filter(minute=old).exists()
    assert totals([storage.key])[storage.key].files == 5


# The retention setting


@pytest.mark.parametrize("value", [3600, 86399, "2d", float("nan"), True, None])
def test_e015_a_retention_shorter_than_the_dashboards_day(
    settings: Any, value: Any
) -> None:
    settings.QUEUED_STORAGE_HISTORY_RETENTION = value

    (error,) = [e for e in check_settings() if e.id == "queued_storage.E015"]
    assert "QUEUED_STORAGE_HISTORY_RETENTION" in error.msg
    assert error.hint and "86400" in error.hint
    with pytest.raises(ImproperlyConfigured, match="QUEUED_STORAGE_HISTORY_RETENTION"):
        _ = conf.QUEUED_STORAGE_HISTORY_RETENTION


@pytest.mark.parametrize("value", [86400, 7 * 86400.5])
def test_a_retention_of_a_day_or_more_passes(settings: Any, value: Any) -> None:
    settings.QUEUED_STORAGE_HISTORY_RETENTION = value

    assert not [e for e in check_settings() if e.id == "queued_storage.E015"]
    assert value == conf.QUEUED_STORAGE_HISTORY_RETENTION


def test_the_default_retention_is_two_days() -> None:
    assert conf.QUEUED_STORAGE_HISTORY_RETENTION == 2 * 86400
