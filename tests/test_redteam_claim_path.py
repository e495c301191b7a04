"""Red team: the claim path of commit a167b54 (claims.py ``claim_due``: the due
rows read and taken in one transaction, returned as read with the UPDATE's
changes made in memory; on SQLite the write lock taken first).

Each test opens its window with events, never a sleep. Three breaks were found
and fixed (an idle SQLite poll took the write lock; an empty claim wrote in the
caller's stale transaction; a server without SKIP LOCKED could not claim, and
rows returned as read would miss a re-save there); the rest held."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.core.files.base import ContentFile
from django.db import (
    DatabaseError,
    OperationalError,
    connection,
    transaction,
)
from django.utils import timezone

from queued_storage.models import PendingTransfer, PendingTransferQuerySet
from tests.contention import TIMEOUT, Contender
from tests.fleet import DOCUMENTS, is_sqlite, queue_files
from tests.test_claim_snapshot import (  # noqa: F401 (journal: the fixture)
    fields,
    journal,
    transaction_mode,
)
from tests.testapp.models import Document

pytestmark = pytest.mark.django_db(transaction=True)

Status = PendingTransfer.Status


class PollHeldAfterItsFirstStatement:
    """A worker's poll (``claim_due``) in a thread of its own, stopped just after
    the first statement it sends that reads or writes (or takes a lock: a BEGIN
    IMMEDIATE), until :meth:`finish`."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.reached = threading.Event()
        self.go = threading.Event()
        self.claimed: list[PendingTransfer] = []
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> PollHeldAfterItsFirstStatement:
        self.thread.start()
        assert self.reached.wait(TIMEOUT), "the poll sent no statement"
        return self

    def _run(self) -> None:
        try:
            with transaction_mode(self.mode), connection.execute_wrapper(self._hold):
                self.claimed = PendingTransfer.objects.claim_due(limit=10, lease=300)
        except BaseException as error:
            self.errors.append(error)
        finally:
            self.reached.set()
            connection.close()

    def _hold(self, execute: Callable[..., Any], sql: str, *args: Any) -> Any:
        result = execute(sql, *args)
        opens = sql.strip().upper()
        if opens in ("BEGIN", "BEGIN DEFERRED") or opens.startswith("SAVEPOINT"):
            return result
        if not self.reached.is_set():
            self.reached.set()
            assert self.go.wait(TIMEOUT), "the poll was never let go"
        return result

    def finish(self) -> list[PendingTransfer]:
        self.go.set()
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "the poll never returned"
        if self.errors:
            raise self.errors[0]
        return self.claimed


@pytest.mark.usefixtures("journal")
@pytest.mark.parametrize("worker_mode", ["DEFERRED", "IMMEDIATE"])
def test_an_idle_poll_never_refuses_a_deferred_requests_save(worker_mode: str) -> None:
    """Django's default transaction mode (DEFERRED) in a request that reads and then
    saves a file (ATOMIC_REQUESTS), while ``process_transfers --loop`` polls an
    empty queue: the save goes through."""
    poll: PollHeldAfterItsFirstStatement | None = None
    try:
        with transaction_mode("DEFERRED"), transaction.atomic():
            assert not Document.objects.exists()  # the request reads first
            poll = PollHeldAfterItsFirstStatement(worker_mode).start()
            Document.objects.create(file=ContentFile(b"hello", name="a.txt"))
    finally:
        if poll is not None:
            assert poll.finish() == []
    assert PendingTransfer.objects.filter(status=Status.QUEUED).count() == 1


@pytest.mark.usefixtures("journal")
def test_an_empty_claim_in_the_callers_stale_transaction_returns_nothing() -> None:
    """As tests/test_claim_snapshot.py's stale transaction, with nothing due: the
    claim has nothing to take and returns no rows, as it did before."""
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA journal_mode")
        journal = cursor.fetchone()[0]
    if journal != "wal":
        pytest.skip("a rollback journal keeps the other writer out instead")
    with transaction_mode("DEFERRED"), transaction.atomic():
        assert not PendingTransfer.objects.exists()  # the snapshot starts
        Contender(
            lambda: PendingTransfer.objects.create(
                storage_key=DOCUMENTS,
                name="held.bin",
                status=Status.HELD,
                next_attempt_at=None,
            )
        ).start().join()
        assert PendingTransfer.objects.claim_due(limit=10, lease=300) == []


def without_skip_locked(monkeypatch: pytest.MonkeyPatch) -> None:
    """This thread's connection as a server without SKIP LOCKED (MariaDB 10.5,
    which Django 5.2 supports; MySQL 5.7)."""
    if is_sqlite():
        pytest.skip("SQLite has no row locks at all")
    monkeypatch.setattr(connection.features, "has_select_for_update_skip_locked", False)


def test_a_claim_without_skip_locked_claims(
    fresh_storages: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README: ``SELECT ... FOR UPDATE SKIP LOCKED`` *where the database has
    it*. A server without it still claims the due rows."""
    queue_files(fresh_storages["local"], 3, size=8)
    without_skip_locked(monkeypatch)
    claimed = PendingTransfer.objects.claim_due(limit=10, lease=300)
    assert len(claimed) == 3


def resave_unless_locked(row: PendingTransfer) -> Callable[[], None]:
    """A re-save of the queued ``row`` (new generation, size, checksum) by whoever
    calls it; NOWAIT: a claim that locked the row keeps it out at once (the
    window is closed), an unlocked read lets it in. What it was refused with."""
    refused: list[DatabaseError] = []

    def resave() -> None:
        rows = PendingTransfer.objects.filter(pk=row.pk, status=Status.QUEUED)
        try:
            with transaction.atomic():
                list(rows.select_for_update(nowait=True))
                rows.update(generation=row.generation + 1, size=999, checksum="new")
        except DatabaseError as error:
            refused.append(error)

    return resave


def claimed_as_held(claimed: list[PendingTransfer]) -> None:
    held = {row.pk: fields(row) for row in PendingTransfer.objects.all()}
    assert claimed
    for row in claimed:
        assert fields(row) == held[row.pk], row.name


def test_a_claim_without_skip_locked_returns_what_the_database_holds(
    fresh_storages: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A re-save of a queued row between the claim's read and its UPDATE, on a
    server without SKIP LOCKED: each claimed row is as the database holds it."""
    queue_files(fresh_storages["local"], 3, size=8)
    first = PendingTransfer.objects.order_by("next_attempt_at", "pk").first()
    assert first is not None
    without_skip_locked(monkeypatch)
    claimed_as_held(claim_with_a_writer_before_its_update(resave_unless_locked(first)))


def test_a_resave_before_the_claims_update_is_kept_out(
    fresh_storages: dict[str, Path],
) -> None:
    """Held (PostgreSQL, MariaDB): the same re-save with SKIP LOCKED finds the row
    locked, and the claimed rows are as the database holds them."""
    if is_sqlite():
        pytest.skip("SQLite: tests/test_claim_snapshot.py, under the write lock")
    queue_files(fresh_storages["local"], 3, size=8)
    first = PendingTransfer.objects.order_by("next_attempt_at", "pk").first()
    assert first is not None
    claimed_as_held(claim_with_a_writer_before_its_update(resave_unless_locked(first)))
    assert PendingTransfer.objects.get(pk=first.pk).generation == first.generation


def claim_with_a_writer_before_its_update(
    write: Callable[[], Any],
) -> list[PendingTransfer]:
    """``claim_due``, with ``write`` run to its end by another connection between
    the claim's reads of the ledger and its first UPDATE after them (whichever
    statements the claim sends; ``write`` must not wait for a lock): the claimed
    rows."""
    table = PendingTransfer._meta.db_table
    read: list[str] = []
    contenders: list[Contender] = []

    def before_the_update(execute: Callable[..., Any], sql: str, *args: Any) -> Any:
        verb = sql.lstrip().upper()
        if read and not contenders and verb.startswith("UPDATE"):
            contenders.append(Contender(write).start())
            contenders[0].join()
        if verb.startswith("SELECT") and table in sql:
            read.append(sql)
        return execute(sql, *args)

    with connection.execute_wrapper(before_the_update):
        claimed = PendingTransfer.objects.claim_due(limit=10, lease=300)
    assert contenders, "the claim sent no UPDATE after its read"
    return claimed


def four_kinds_of_due_row(local: Path) -> dict[str, tuple[str, bool]]:
    """Due rows in each (status, remote_owned) a claim takes from, with attempts
    made and errors kept: queued, queued after an upload, and a transferring row
    whose lease ran out, with and without a recorded upload. By name."""
    queue_files(local, 4, size=8)
    past = timezone.now() - timedelta(minutes=5)
    kinds: dict[str, tuple[str, bool]] = {
        "docs/00000.bin": (Status.QUEUED, False),
        "docs/00001.bin": (Status.QUEUED, True),
        "docs/00002.bin": (Status.TRANSFERRING, False),
        "docs/00003.bin": (Status.TRANSFERRING, True),
    }
    for number, (name, (status, owned)) in enumerate(kinds.items()):
        PendingTransfer.objects.filter(name=name).update(
            status=status,
            remote_owned=owned,
            attempts=number + 1,
            lease_token="dead" if status == Status.TRANSFERRING else "",
            lease_expires_at=past if status == Status.TRANSFERRING else None,
            last_error=f"error {number}",
            error_history=[{"error": f"error {number}"}],
            updated_at=past,
        )
    return kinds


def test_claimed_rows_equal_a_fresh_read_field_by_field(
    fresh_storages: dict[str, Path],
) -> None:
    """Held: each (status, owned) group, expired transferring rows taken over
    included; the rows returned without a read-back equal a fresh read."""
    kinds = four_kinds_of_due_row(fresh_storages["local"])
    claimed = PendingTransfer.objects.claim_due(limit=10, lease=300)
    assert sorted(row.name for row in claimed) == sorted(kinds)
    held = {row.pk: fields(row) for row in PendingTransfer.objects.all()}
    for row in claimed:
        status, owned = kinds[row.name]
        assert fields(row) == held[row.pk], row.name
        assert row.claimed_from == status
        assert row.was_owned is (owned or status == Status.TRANSFERRING)
        assert row.remote_owned is row.was_owned


def test_a_lock_error_after_the_update_is_retried_without_doubles(
    fresh_storages: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held: the database aborts the claim over a lock after its UPDATE ran (its
    transaction rolls back): the retried claim takes each row once, one attempt
    counted, and what it returns is what the database holds."""
    kinds = four_kinds_of_due_row(fresh_storages["local"])
    attempts = dict(PendingTransfer.objects.values_list("pk", "attempts"))
    take = PendingTransferQuerySet._take
    failed: list[int] = []

    def take_then_lose_a_lock(self: Any, *args: Any) -> int:
        taken = take(self, *args)
        if not failed:
            failed.append(taken)
            raise OperationalError("database is locked")
        return taken

    monkeypatch.setattr(PendingTransferQuerySet, "_take", take_then_lose_a_lock)
    claimed = PendingTransfer.objects.claim_due(limit=10, lease=300)
    assert failed == [4]
    assert len({row.pk for row in claimed}) == len(claimed) == len(kinds)
    held = {row.pk: fields(row) for row in PendingTransfer.objects.all()}
    for row in claimed:
        assert fields(row) == held[row.pk]
        assert row.attempts == attempts[row.pk] + 1
        assert row.claimed_from == kinds[row.name][0]
