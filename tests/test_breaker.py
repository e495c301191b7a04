"""A storage's circuit breaker: after QUEUED_STORAGE_BREAKER_FAILURES remote
failures in a row no row of the storage is claimed until its backoff ends; then
one probe row (one worker's) decides: a success closes it and the storage
drains, a failure reopens it with twice the backoff, capped. The attempts the
breaker takes never fail a row; a file's own problems never count."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.core.checks import run_checks
from django.core.exceptions import ImproperlyConfigured, SuspiciousFileOperation
from django.utils import timezone

from queued_storage import breaker, controls
from queued_storage.backends import QueuedStorage
from queued_storage.conf import settings as conf
from queued_storage.errors import (
    ChecksumMismatch,
    HookContractError,
    HookDeclined,
    LeaseLost,
    LocalFileMissing,
    RemoteConflict,
    TransferError,
    TransferTimeout,
)
from queued_storage.models import PendingTransfer
from queued_storage.storage_state import (
    BREAKER_CLOSED,
    BREAKER_HALF_OPEN,
    BREAKER_OPEN,
    Controls,
    StorageState,
    storage_controls,
)
from queued_storage.tasks import Transfer
from queued_storage.worker import drain
from tests.helpers import (
    ALWAYS_FAILING,
    FLAKY,
    Clock,
    KeeperClock,
    content,
    in_thread,
    joined,
    lanes_returned,
    row_of,
)
from tests.storages import HangingStorage

Make = Callable[..., QueuedStorage]
Status = PendingTransfer.Status


@pytest.fixture
def limits(settings: Any) -> None:
    settings.QUEUED_STORAGE_RETRIES = 1
    settings.QUEUED_STORAGE_RETRY_DELAY = 1  # backoff 1 s, doubled up to 32 s
    settings.QUEUED_STORAGE_BREAKER_FAILURES = 3


def controls_of(storage: QueuedStorage, clock: Clock) -> Controls:
    return storage_controls([storage.key], now=clock())[storage.key]


def all_due(storage: QueuedStorage) -> None:
    """Make every queued row of the storage due now (their own backoff over)."""
    PendingTransfer.objects.filter(
        storage_key=storage.key, status=Status.QUEUED
    ).update(next_attempt_at=timezone.now())


def attempts_made(storage: QueuedStorage) -> int:
    """Every attempt that failed, as the rows' error histories keep them."""
    return sum(
        len(history)
        for history in PendingTransfer.objects.filter(
            storage_key=storage.key
        ).values_list("error_history", flat=True)
    )


def statuses(storage: QueuedStorage) -> set[str]:
    return set(
        PendingTransfer.objects.filter(storage_key=storage.key).values_list(
            "status", flat=True
        )
    )


@pytest.mark.django_db(transaction=True)
def test_open_half_open_closed_and_reopened_with_a_doubled_capped_backoff(
    make_storage: Make, breaker_clock: Clock, limits: None
) -> None:
    storage = make_storage(remote=FLAKY, remote_options=ALWAYS_FAILING)
    names = [storage.save(f"f{i}.txt", content()) for i in range(6)]

    drain(keys=[storage.key])

    opened = controls_of(storage, breaker_clock)
    assert (opened.breaker, opened.consecutive_failures, opened.backoff) == (
        BREAKER_OPEN,
        3,
        1.0,
    )
    assert opened.since == breaker_clock.now
    assert opened.next_probe_at == breaker_clock.now + timedelta(seconds=1)
    assert attempts_made(storage) == 3
    assert statuses(storage) == {Status.QUEUED}
    # While open, nothing is claimed: no attempt.
    all_due(storage)
    assert drain(keys=[storage.key]).processed == 0

    backoffs = []
    for _probe in range(7):
        breaker_clock.advance(controls_of(storage, breaker_clock).backoff)
        assert controls_of(storage, breaker_clock).breaker == BREAKER_HALF_OPEN
        all_due(storage)
        made = attempts_made(storage)

        assert drain(keys=[storage.key]).processed == 1  # the probe alone

        assert attempts_made(storage) == made + 1
        reopened = controls_of(storage, breaker_clock)
        assert reopened.breaker == BREAKER_OPEN
        assert reopened.since == opened.since
        assert reopened.next_probe_at == breaker_clock.now + timedelta(
            seconds=reopened.backoff
        )
        backoffs.append(reopened.backoff)
    assert backoffs == [2.0, 4.0, 8.0, 16.0, 32.0, 32.0, 32.0]
    # Ten failed attempts of six rows that may each make two: none failed, and
    # none spent its second attempt on the outage.
    assert statuses(storage) == {Status.QUEUED}
    assert max(row_of(storage, name).attempts for name in names) <= 1
    last = row_of(storage, names[0]).error_history[-1]
    assert "circuit breaker is open" in last["message"]

    storage.remote.failures = 0  # type: ignore[attr-defined]
    breaker_clock.advance(32)
    all_due(storage)
    stats = drain(keys=[storage.key])

    assert stats.done == 6
    assert statuses(storage) == {Status.DONE}
    closed = controls_of(storage, breaker_clock)
    assert (closed.breaker, closed.consecutive_failures, closed.since) == (
        BREAKER_CLOSED,
        0,
        None,
    )


@pytest.mark.django_db(transaction=True)
def test_two_workers_racing_for_the_probe_one_takes_it(
    make_storage: Make,
    breaker_clock: Clock,
    limits: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both read the probe as due; their compare-and-sets meet at a barrier: the
    first takes one row, the other gets the turn no more and claims nothing of
    the storage."""
    storage = make_storage()
    for i in range(4):
        storage.save(f"f{i}.txt", content())
    StorageState.objects.create(
        storage_key=storage.key,
        breaker_failures=3,
        breaker_opened_at=breaker_clock.now - timedelta(minutes=1),
        breaker_probe_at=breaker_clock.now - timedelta(seconds=1),
        breaker_backoff=4,
    )
    both_read = threading.Barrier(2, timeout=30)
    probe_claimed = threading.Event()
    take_probe = controls._take_probe

    def meeting(*args: Any) -> PendingTransfer | None:
        both_read.wait()
        taken = take_probe(*args)
        if taken is None:
            # The loser's own claim comes after the winner's probe claim: on
            # MariaDB its scan (FOR UPDATE SKIP LOCKED) locks the rows it reads
            # for a moment, and a probe claim meeting them then finds nothing
            # and hands the turn back (the probe slips one poll).
            probe_claimed.wait(timeout=30)
        else:
            probe_claimed.set()
        return taken

    monkeypatch.setattr(controls, "_take_probe", meeting)

    def worker() -> list[PendingTransfer]:
        return controls.claim(PendingTransfer.objects.all(), limit=10, lease=60)

    first, second = in_thread(worker), in_thread(worker)
    claims = [joined(*first), joined(*second)]

    assert sorted(len(rows) for rows in claims) == [0, 1]
    (probe,) = claims[0] or claims[1]
    state = StorageState.objects.get(storage_key=storage.key)
    assert state.breaker_probe_token == probe.lease_token
    assert state.breaker_probe_at == breaker_clock.now + timedelta(seconds=60)
    assert controls_of(storage, breaker_clock).breaker == BREAKER_HALF_OPEN
    assert PendingTransfer.objects.filter(status=Status.TRANSFERRING).count() == 1


@pytest.mark.django_db(transaction=True)
def test_a_probe_that_ends_on_its_own_files_problem_passes_the_turn_on(
    make_storage: Make, breaker_clock: Clock, limits: None, settings: Any
) -> None:
    # Not due again within this drain however slow the machine (a retry 1 s
    # later was, on a loaded CI runner: a second attempt, and the row failed).
    settings.QUEUED_STORAGE_RETRY_DELAY = 3600
    storage = make_storage()
    missing = storage.save("a-missing.txt", content())
    storage.save("b-fine.txt", content())
    StorageState.objects.create(
        storage_key=storage.key,
        breaker_failures=3,
        breaker_opened_at=breaker_clock.now,
        breaker_probe_at=breaker_clock.now,
        breaker_backoff=1,
    )
    storage.local.delete(missing)

    stats = drain(keys=[storage.key])

    # The first probe's local file is gone (its own problem, counted against its
    # attempts as ever): the next claim probes with the other row, which closes
    # the breaker.
    assert stats.done == 1
    assert "LocalFileMissing" in row_of(storage, missing).last_error
    assert row_of(storage, missing).attempts == 1
    assert controls_of(storage, breaker_clock).breaker == BREAKER_CLOSED


@pytest.mark.django_db(transaction=True)
def test_a_success_resets_the_failures_in_a_row(
    make_storage: Make, breaker_clock: Clock, settings: Any
) -> None:
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    settings.QUEUED_STORAGE_BREAKER_FAILURES = 3
    storage = make_storage(remote=FLAKY, remote_options={"failures": 2})
    storage.save("f.txt", content())

    stats = drain(keys=[storage.key])

    assert (stats.retried, stats.done) == (2, 1)
    assert controls_of(storage, breaker_clock).consecutive_failures == 0
    assert controls_of(storage, breaker_clock).breaker == BREAKER_CLOSED


class DecliningTransfer(Transfer):
    def transfer(self, name: str, local: Any, remote: Any, **kwargs: Any) -> bool:
        return False


class BuggyTransfer(Transfer):
    def transfer(self, name: str, local: Any, remote: Any, **kwargs: Any) -> bool:
        raise TypeError("a bug in the hook")


@pytest.mark.django_db(transaction=True)
def test_a_hook_that_returns_false_trips_the_breaker_and_a_buggy_one_does_not(
    make_storage: Make, breaker_clock: Clock, settings: Any
) -> None:
    settings.QUEUED_STORAGE_RETRIES = 1
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    settings.QUEUED_STORAGE_BREAKER_FAILURES = 2
    declining = make_storage(task=f"{__name__}.DecliningTransfer")
    buggy = make_storage(task=f"{__name__}.BuggyTransfer")
    for storage in (declining, buggy):
        for i in range(3):
            storage.save(f"f{i}.txt", content())

    drain()

    assert controls_of(declining, breaker_clock).breaker == BREAKER_OPEN
    assert statuses(declining) == {Status.QUEUED}
    # Out of attempts after two each, for their own reasons.
    assert statuses(buggy) == {Status.FAILED}
    assert controls_of(buggy, breaker_clock) == Controls(buggy.key)


@pytest.mark.django_db(transaction=True)
def test_missing_local_files_never_trip_the_breaker(
    make_storage: Make, breaker_clock: Clock, settings: Any
) -> None:
    settings.QUEUED_STORAGE_RETRIES = 0
    settings.QUEUED_STORAGE_BREAKER_FAILURES = 2
    storage = make_storage()
    for i in range(4):
        storage.local.delete(storage.save(f"f{i}.txt", content()))

    drain(keys=[storage.key])

    assert statuses(storage) == {Status.FAILED}
    assert not StorageState.objects.filter(storage_key=storage.key).exists()


@pytest.mark.django_db(transaction=True)
def test_zero_disables_the_breaker(make_storage: Make, settings: Any) -> None:
    settings.QUEUED_STORAGE_RETRIES = 1
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    settings.QUEUED_STORAGE_BREAKER_FAILURES = 0
    storage = make_storage(remote=FLAKY, remote_options=ALWAYS_FAILING)
    for i in range(5):
        storage.save(f"f{i}.txt", content())

    assert drain(keys=[storage.key]).failed == 5
    assert not StorageState.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_an_upload_that_hangs_past_the_timeout_counts_as_the_remotes_failure(
    make_storage: Make,
    breaker_clock: Clock,
    settings: Any,
    hanging: type[HangingStorage],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Abandoned after the transfer timeout: a remote failure, which here opens
    the breaker (threshold 1); counted against the row, as the failure that opens
    the breaker is, and the row waits for the probe."""
    settings.QUEUED_STORAGE_LEASE = 30
    settings.QUEUED_STORAGE_TRANSFER_TIMEOUT = 1
    settings.QUEUED_STORAGE_RETRIES = 1
    settings.QUEUED_STORAGE_BREAKER_FAILURES = 1
    clock = KeeperClock(monkeypatch)  # stands still but for the move below
    storage = make_storage(remote="tests.storages.HangingStorage")
    name = storage.save("hung.txt", content())
    hanging.hang = {name}
    try:
        worker, result = in_thread(lambda: drain(keys=[storage.key]))
        assert hanging.entered.wait(timeout=30)
        clock.advance(10)  # hung for ten times the timeout, as the keeper sees it
        joined(worker, result)  # ends with the hung upload left behind

        row = row_of(storage, name)
        assert (row.status, row.attempts) == (Status.QUEUED, 1)
        assert [entry["error"] for entry in row.error_history] == ["TransferTimeout"]
        assert controls_of(storage, breaker_clock).breaker == BREAKER_OPEN
    finally:
        hanging.released.set()
    assert hanging.returned.wait(timeout=30)
    assert lanes_returned()
    # Its late return loses its record, but the remote took the file: it works.
    assert row_of(storage, name).status == Status.QUEUED
    assert controls_of(storage, breaker_clock).breaker == BREAKER_CLOSED


@pytest.mark.parametrize(
    ("error", "remote"),
    [
        (ConnectionRefusedError("refused"), True),
        (TimeoutError("timed out"), True),
        (OSError(5, "I/O error"), True),
        (PermissionError("denied by the remote"), True),
        (HookDeclined("the transfer hook returned False"), True),
        (TransferTimeout("no progress"), True),
        (RuntimeError("an SDK's own error"), True),
        (LocalFileMissing("gone"), False),
        (ChecksumMismatch("mismatch"), False),
        (RemoteConflict("taken"), False),
        (LeaseLost("lost"), False),
        (HookContractError("returned None"), False),
        (TransferError("the local file changed while it was opened"), False),
        (TypeError("a bug"), False),
        (AttributeError("a bug"), False),
        (KeyError("a bug"), False),
        (ValueError("a bug"), False),
        (FileNotFoundError("the file"), False),
        (ImproperlyConfigured("settings"), False),
        (SuspiciousFileOperation("name"), False),
        (KeyboardInterrupt(), False),
    ],
)
def test_what_counts_as_a_remote_failure(error: BaseException, remote: bool) -> None:
    assert breaker.is_remote_failure(error) is remote


@pytest.mark.parametrize(
    ("delay", "expected"),
    [
        (60, [60, 120, 240, 480, 960, 1920, 1920]),
        (0, [1, 1, 1]),
        (1, [1, 2, 4, 8, 16, 32, 32]),
        (600, [600, 1200, 2400, 3600, 3600]),
        (7200, [3600, 3600]),
    ],
)
def test_the_backoff_doubles_from_the_retry_delay_up_to_its_cap(
    settings: Any, delay: float, expected: list[float]
) -> None:
    settings.QUEUED_STORAGE_RETRY_DELAY = delay
    backoffs = [conf.breaker_backoff()]
    while len(backoffs) < len(expected):
        backoffs.append(conf.breaker_backoff(backoffs[-1]))
    assert backoffs == expected


@pytest.mark.parametrize("value", [-1, 1.5, "5", None, True, 2**31, float("nan")])
def test_a_bad_threshold_is_e018_and_refused_at_first_use(
    settings: Any, value: Any
) -> None:
    settings.QUEUED_STORAGE_BREAKER_FAILURES = value

    found = [m for m in run_checks() if m.id == "queued_storage.E018"]

    assert len(found) == 1
    assert "QUEUED_STORAGE_BREAKER_FAILURES" in found[0].msg
    assert found[0].hint
    with pytest.raises(ImproperlyConfigured, match="QUEUED_STORAGE_BREAKER_FAILURES"):
        controls.claim(PendingTransfer.objects.none(), limit=1, lease=60)
