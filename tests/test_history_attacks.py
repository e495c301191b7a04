"""Attacks on the transfer history (``queued_storage.history``): a history that
cannot be written never costs a transfer its done record or its error; pruning
that races the workers' increments never makes a total go down."""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import OperationalError, connections, transaction
from django.db.models import F
from django.utils import timezone

from queued_storage import completions, history
from queued_storage.backends import QueuedStorage
from queued_storage.conf import settings as conf
from queued_storage.dashboard import summaries
from queued_storage.errors import Outcome
from queued_storage.failures import ledger_db
from queued_storage.history import TransferMinute, prune, totals
from queued_storage.ledger_sql import retry_when_locked
from queued_storage.models import PendingTransfer
from queued_storage.transfer import Verified, complete, transfer_row
from queued_storage.worker import drain
from tests.helpers import (
    ALWAYS_FAILING,
    FLAKY,
    content,
    in_thread,
    joined,
    lanes_returned,
)
from tests.storages import HangingStorage

Status = PendingTransfer.Status


@pytest.fixture
def history_table_missing() -> Iterator[None]:
    """The history's upsert sent to a table that does not exist, as on a worker
    deployed before ``migrate`` created it: a real error of the database (which
    aborts the transaction on PostgreSQL), not a Python stub."""
    db = ledger_db()
    connection = connections[db]
    real = history._upsert_sql(connection)
    table = connection.ops.quote_name(TransferMinute._meta.db_table)
    missing = connection.ops.quote_name("queued_storage_no_such_history")
    history._UPSERTS[connection.alias] = real.replace(table, missing)
    try:
        yield
    finally:
        history._UPSERTS.pop(connection.alias, None)


@pytest.mark.django_db
def test_a_history_that_cannot_be_written_costs_no_done_record(
    storage: QueuedStorage,
    history_table_missing: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(completions, "COMPLETE_AFTER", 3600.0)  # one group
    for i in range(3):
        storage.save(f"f{i}.txt", content("abc"))
    with caplog.at_level(logging.ERROR, logger="queued_storage"):
        stats = drain(keys=[storage.key])

    # Recorded done together (and each alone), uploaded once; the lost counts are
    # said in the log.
    assert stats.done == 3
    rows = PendingTransfer.objects.filter(storage_key=storage.key)
    assert {row.status for row in rows} == {Status.DONE}
    assert all(row.attempts == 1 and row.last_error == "" for row in rows)
    lost = [r for r in caplog.records if "history" in r.getMessage()]
    assert lost and "not counted" in lost[0].getMessage()
    assert storage.key in lost[0].getMessage()

    storage.save("alone.txt", content("abc"))
    (row,) = PendingTransfer.objects.for_name(storage.key, "alone.txt").claim_due(
        limit=1, lease=60
    )
    verified = transfer_row(row)
    assert isinstance(verified, Verified)
    assert complete([verified]) == [Outcome.DONE]
    assert PendingTransfer.objects.get(pk=row.pk).status == Status.DONE


@pytest.mark.django_db
def test_a_history_that_cannot_be_written_costs_no_error_record(
    make_storage: Callable[..., QueuedStorage],
    history_table_missing: None,
    settings: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    settings.QUEUED_STORAGE_RETRIES = 2
    settings.QUEUED_STORAGE_BREAKER_FAILURES = 0
    failing = make_storage(remote=FLAKY, remote_options=ALWAYS_FAILING)
    failing.save("b.txt", content("abc"))
    with caplog.at_level(logging.ERROR, logger="queued_storage"):
        drain(keys=[failing.key])

    gave_up = PendingTransfer.objects.get(storage_key=failing.key)
    assert gave_up.status == Status.FAILED
    assert gave_up.attempts == 3 and len(gave_up.error_history) == 3
    assert any("not counted" in r.getMessage() for r in caplog.records)


@pytest.mark.django_db(transaction=True)
def test_a_lost_lock_in_the_history_write_is_retried_with_its_count(
    storage: QueuedStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deadlock on a minute's row rolls the whole transaction back (MariaDB):
    done again, counted, not recorded uncounted."""
    for i in range(2):
        storage.save(f"f{i}.txt", content("abc"))
    rows = PendingTransfer.objects.filter(storage_key=storage.key).claim_due(
        limit=2, lease=60
    )
    verified = [transfer_row(row) for row in rows]
    real = history._add
    calls = []

    def deadlocked_once(*args: Any) -> None:
        calls.append(args)
        if len(calls) == 1:
            raise OperationalError(1213, "Deadlock found when trying to get lock")
        real(*args)

    monkeypatch.setattr(history, "_add", deadlocked_once)
    assert complete(verified) == [Outcome.DONE] * 2  # type: ignore[arg-type]
    assert len(calls) == 2
    assert totals([storage.key])[storage.key].files == 2
    TransferMinute.objects.filter(storage_key=storage.key).delete()


# Pruning against the workers


def scrape_totals(keys: list[str]) -> dict[str, tuple[int, ...]]:
    found = totals(keys)
    return {key: (c.files, c.bytes, c.failures, *c.buckets) for key, c in found.items()}


@pytest.mark.django_db(transaction=True)
def test_pruning_the_minutes_workers_add_to_never_lowers_a_total() -> None:
    """Pruners fold every minute (the current one included: ``now`` three days
    ahead) while workers add to it and a scraper reads the totals: every total
    read is at least the one before, and at the end each is every increment."""
    keys = ["prune-race-a", "prune-race-b"]
    workers, each = 3, 30
    future = timezone.now() + timedelta(days=3)
    done = threading.Event()
    start = threading.Barrier(workers + 2)

    @retry_when_locked
    def add_one(number: int) -> None:
        with transaction.atomic(using=ledger_db()):
            for key in keys:
                history._add(
                    {key: [1, number, 1, 0.0] + [0] * (len(history.BOUNDS) - 1) + [1]},
                    history.this_minute(),
                    ledger_db(),
                )

    def worker() -> None:
        start.wait(timeout=30)
        for number in range(each):
            add_one(number)

    def pruner() -> int:
        start.wait(timeout=30)
        folded = 0
        while not done.is_set():
            folded += retry_when_locked(prune)(future)
        return folded + retry_when_locked(prune)(future)

    reads: list[dict[str, tuple[int, ...]]] = []

    def scraper() -> None:
        start.wait(timeout=30)
        while not done.is_set():
            reads.append(scrape_totals(keys))

    threads = [in_thread(worker) for _ in range(workers)]
    background = [in_thread(pruner), in_thread(scraper)]
    try:
        for thread, result in threads:
            joined(thread, result)
    finally:
        done.set()
    folded = joined(*background[0])
    joined(*background[1])
    reads.append(scrape_totals(keys))

    for before, after in itertools.pairwise(reads):
        for key, numbers in before.items():
            assert all(b <= a for b, a in zip(numbers, after[key], strict=True)), (
                key,
                numbers,
                after[key],
            )
    expected_bytes = workers * sum(range(each))
    for key in keys:
        files, size, failures, *buckets = reads[-1][key]
        assert (files, size, failures) == (
            workers * each,
            expected_bytes,
            workers * each,
        )
        assert buckets[-1] == workers * each
        # Everything folded into the one carry row (the last prune ran after all).
        assert list(
            TransferMinute.objects.filter(storage_key=key).values_list(
                "minute", flat=True
            )
        ) == [history.carry_minute()]
    assert folded >= 2
    TransferMinute.objects.filter(storage_key__in=keys).delete()


@pytest.mark.django_db(transaction=True)
def test_the_first_insert_of_a_minute_racing_on_every_worker_loses_nothing() -> None:
    """Every worker's first increment of a new minute at once (a gate opens them
    together): no unique violation, no lost update."""
    key = "first-insert-race"
    workers = 6
    start = threading.Barrier(workers)
    minute = history.this_minute(timezone.now() + timedelta(hours=5))

    @retry_when_locked
    def first() -> None:
        with transaction.atomic(using=ledger_db()):
            history._add(
                {key: [0, 0, 1, 0.0] + [0] * len(history.BOUNDS)}, minute, ledger_db()
            )

    def worker() -> None:
        start.wait(timeout=30)
        first()

    threads = [in_thread(worker) for _ in range(workers)]
    for thread, result in threads:
        joined(thread, result)
    assert totals([key])[key].failures == workers
    assert TransferMinute.objects.filter(storage_key=key).count() == 1
    TransferMinute.objects.filter(storage_key=key).delete()


# The retention setting


@pytest.mark.parametrize("value", [0, -1, -86400, float("inf"), 10**30, "86400"])
def test_a_retention_out_of_range_is_refused(settings: Any, value: Any) -> None:
    settings.QUEUED_STORAGE_HISTORY_RETENTION = value
    with pytest.raises(ImproperlyConfigured, match="QUEUED_STORAGE_HISTORY_RETENTION"):
        _ = conf.QUEUED_STORAGE_HISTORY_RETENTION


@pytest.mark.django_db
def test_a_century_of_retention_prunes_nothing_and_raises_nothing(
    settings: Any,
) -> None:
    settings.QUEUED_STORAGE_HISTORY_RETENTION = 100 * 365 * 86400
    history._add(
        {"old": [1, 1, 0, 0.0] + [0] * len(history.BOUNDS)},
        history.this_minute(timezone.now() - timedelta(days=40)),
        ledger_db(),
    )
    assert prune() == 0


# Exactly once


@pytest.mark.django_db
def test_a_group_that_loses_some_rows_counts_only_the_winners(
    storage: QueuedStorage,
) -> None:
    for i in range(4):
        storage.save(f"f{i}.txt", content("abcde"))
    rows = list(
        PendingTransfer.objects.filter(storage_key=storage.key).claim_due(
            limit=4, lease=60
        )
    )
    verified = [transfer_row(row) for row in rows]
    # One re-saved meanwhile (a new generation), one taken over (another lease).
    PendingTransfer.objects.filter(pk=rows[1].pk).update(generation=F("generation") + 1)
    PendingTransfer.objects.filter(pk=rows[3].pk).update(lease_token="another-worker")

    outcomes = complete(verified)  # type: ignore[arg-type]

    assert outcomes[0] == outcomes[2] == Outcome.DONE
    assert Outcome.DONE not in (outcomes[1], outcomes[3])
    found = totals([storage.key])[storage.key]
    assert (found.files, found.bytes, sum(found.buckets)) == (2, 10, 2)


@pytest.mark.django_db
def test_a_hostile_keys_minutes_fold_into_its_own_carry_row() -> None:
    keys = ["a b", "a\\b", "a'b\"", "a%b_", "ä/<b>", "A B"]
    old = history.this_minute(timezone.now() - timedelta(days=5))
    for number, key in enumerate(keys):
        history._add(
            {key: [number + 1, 0, 0, 0.0] + [0] * len(history.BOUNDS)},
            old,
            ledger_db(),
        )
    before = totals(keys)
    assert prune() == len(keys)
    assert totals(keys) == before
    assert {key: before[key].files for key in keys} == {
        key: number + 1 for number, key in enumerate(keys)
    }
    carried = TransferMinute.objects.filter(storage_key__in=keys)
    assert set(carried.values_list("minute", flat=True)) == {history.carry_minute()}


@pytest.mark.django_db
def test_local_naive_times_count_chart_and_prune_as_utc_does(
    storage: QueuedStorage, settings: Any
) -> None:
    """USE_TZ = False and a zone 5:45 ahead of UTC: minutes are local wall-clock
    times, read back as written, charted in the last hour, pruned by their age."""
    settings.USE_TZ = False
    settings.TIME_ZONE = "Asia/Kathmandu"
    storage.save("a.txt", content("abc"))
    drain(keys=[storage.key])

    (summary,) = [s for s in summaries() if s.key == storage.key]
    assert summary.hour is not None and summary.hour.total_files == 1
    assert prune() == 0
    assert prune(timezone.now() + timedelta(days=3)) == 1
    assert totals([storage.key])[storage.key].files == 1
    assert list(
        TransferMinute.objects.filter(storage_key=storage.key).values_list(
            "minute", flat=True
        )
    ) == [history.carry_minute()]


@pytest.mark.django_db(transaction=True)
def test_an_abandoned_upload_is_one_failure_and_its_late_return_counts_nothing(
    make_storage: Callable[..., QueuedStorage],
    hanging: type[HangingStorage],
    settings: Any,
) -> None:
    settings.QUEUED_STORAGE_LEASE = 30
    settings.QUEUED_STORAGE_TRANSFER_TIMEOUT = 1
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    settings.QUEUED_STORAGE_BREAKER_FAILURES = 0
    storage = make_storage(remote="tests.storages.HangingStorage")
    hung = storage.save("a.txt", content("first"))
    storage.save("b.txt", content("second"))
    hanging.hang = {hung}

    stats = drain(concurrency=1)  # abandons the hung upload, retries it at once

    assert (stats.done, stats.retried) == (2, 1)
    counted = totals([storage.key])[storage.key]
    assert (counted.files, counted.failures, sum(counted.buckets)) == (2, 1, 2)

    # The hung upload returns at last: a late worker, counted nowhere.
    hanging.released.set()
    assert hanging.returned.wait(timeout=30)
    assert lanes_returned(), "the lane left behind on the hung upload never returned"
    assert totals([storage.key])[storage.key] == counted
    TransferMinute.objects.filter(storage_key=storage.key).delete()
