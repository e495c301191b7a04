"""A claim on SQLite returns the rows it read, without reading them back: the
read and the UPDATE run in one transaction that holds the database's write lock
from its first statement, so no other connection commits a change between them.

Each test opens that window (after the claim's read, before its UPDATE) and has
another connection write there, in each journal mode and transaction mode a site
may run; the claimed rows must be what the database holds after the claim."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from django.db import OperationalError, connection, connections, transaction

from queued_storage.models import PendingTransfer, PendingTransferQuerySet
from tests.contention import Contender
from tests.fleet import is_sqlite, queue_files

pytestmark = pytest.mark.django_db(transaction=True)

Status = PendingTransfer.Status


@pytest.fixture(params=["delete", "wal"])
def journal(request: pytest.FixtureRequest) -> Iterator[str]:
    """The test database in journal mode ``delete`` (a rollback journal) or
    ``wal``, for this test only."""
    if not is_sqlite():
        pytest.skip("SQLite's transactions: PostgreSQL and MariaDB lock rows")
    connections.close_all()
    with connection.cursor() as cursor:
        cursor.execute(f"PRAGMA journal_mode = {request.param}")
        assert cursor.fetchone()[0] == request.param
    yield request.param
    connections.close_all()
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA journal_mode = delete")


@contextmanager
def transaction_mode(mode: str) -> Iterator[None]:
    """Django's ``transaction_mode`` OPTION on this thread's connection."""
    connection.ensure_connection()
    was = getattr(connection, "transaction_mode")  # noqa: B009 (SQLite's only)
    setattr(connection, "transaction_mode", mode)  # noqa: B010
    try:
        yield
    finally:
        setattr(connection, "transaction_mode", was)  # noqa: B010


@pytest.fixture(params=["DEFERRED", "IMMEDIATE"])
def mode(request: pytest.FixtureRequest, journal: str) -> Iterator[str]:
    """The claiming connection's ``transaction_mode`` (the test settings use
    IMMEDIATE; DEFERRED is SQLite's and Django's default)."""
    with transaction_mode(request.param):
        yield request.param


def fields(row: PendingTransfer) -> dict[str, Any]:
    return {
        field.attname: getattr(row, field.attname)
        for field in PendingTransfer._meta.concrete_fields
    }


def claim_with_a_writer_in_the_window(
    monkeypatch: pytest.MonkeyPatch, write: Any
) -> tuple[list[PendingTransfer], int]:
    """Claim, with ``write`` run by another connection between the claim's read
    and its UPDATE; the claimed rows and the rows ``write`` changed."""
    due_rows = PendingTransferQuerySet._due_rows
    contenders: list[Contender] = []
    changed: list[int] = []

    def read_then_let_a_writer_in(*args: Any) -> list[PendingTransfer]:
        rows = due_rows(*args)
        if not contenders:
            contender = Contender(lambda: changed.append(write()))
            contenders.append(contender.start())
            contender.wait_returned_or_locked()
        return rows

    with monkeypatch.context() as patch:
        patch.setattr(PendingTransferQuerySet, "_due_rows", read_then_let_a_writer_in)
        claimed = PendingTransfer.objects.claim_due(limit=10, lease=300)
    [contender] = contenders
    contender.join()
    return claimed, changed[0]


def test_a_write_between_a_claims_read_and_update_never_lands_unseen(
    fresh_storages: dict[str, Path], monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """Another connection changes a due row while it is queued (as a re-save
    would) in the window. Either the claim sees the change or the change finds the
    row claimed: never a claimed row that the database holds otherwise."""
    queue_files(fresh_storages["local"], 3, size=8)
    first = PendingTransfer.objects.order_by("next_attempt_at", "pk").first()
    assert first is not None

    def resave() -> int:
        return PendingTransfer.objects.filter(pk=first.pk, status=Status.QUEUED).update(
            generation=first.generation + 1, size=999, checksum="changed"
        )

    claimed, changed = claim_with_a_writer_in_the_window(monkeypatch, resave)

    assert len(claimed) == 3
    held = {row.pk: fields(row) for row in PendingTransfer.objects.all()}
    for row in claimed:
        assert fields(row) == held[row.pk]
        assert row.claimed_from == Status.QUEUED
        assert row.was_owned is False
    # The writer waited for the claim's write lock (no retry of the claim): it
    # found the row claimed, not queued.
    assert changed == 0


def test_a_claim_between_a_claims_read_and_update_takes_no_row_twice(
    fresh_storages: dict[str, Path], monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """A second worker's claim in the window: no row is held by both, and every
    claimed row (with its ``claimed_from`` and ``was_owned``) is as the database
    holds it."""
    queue_files(fresh_storages["local"], 4, size=8)
    PendingTransfer.objects.filter(name__endswith="01.bin").update(remote_owned=True)
    rival: list[PendingTransfer] = []

    def claim() -> int:
        rival.extend(PendingTransfer.objects.claim_due(limit=2, lease=300))
        return len(rival)

    mine, _taken = claim_with_a_writer_in_the_window(monkeypatch, claim)

    assert {row.pk for row in mine}.isdisjoint({row.pk for row in rival})
    assert len(mine) + len(rival) == 4
    held = {row.pk: fields(row) for row in PendingTransfer.objects.all()}
    for row in [*mine, *rival]:
        assert fields(row) == held[row.pk]
        assert row.was_owned is row.name.endswith("01.bin")
    # The rival waited for the first claim and took nothing it had read.
    assert len(mine) == 4 and not rival


def test_a_claim_in_the_callers_stale_transaction_fails_there(
    fresh_storages: dict[str, Path], monkeypatch: pytest.MonkeyPatch, journal: str
) -> None:
    """A claim inside the caller's DEFERRED transaction on a WAL database, after
    another connection committed since that transaction's first read: SQLite
    refuses the claim's write, the error reaches the caller (who alone can start
    its transaction again) and nothing is claimed."""
    if journal != "wal":
        pytest.skip("a rollback journal keeps the other writer out instead")
    queue_files(fresh_storages["local"], 2, size=8)
    refused = pytest.raises(OperationalError, match="locked")
    with transaction_mode("DEFERRED"), refused, transaction.atomic():
        assert PendingTransfer.objects.count() == 2  # the snapshot starts
        other = Contender(
            lambda: PendingTransfer.objects.update(checksum="written since")
        )
        other.start().join()
        PendingTransfer.objects.claim_due(limit=10, lease=300)
    assert not PendingTransfer.objects.filter(status=Status.TRANSFERRING).exists()
    assert set(PendingTransfer.objects.values_list("checksum", flat=True)) == {
        "written since"
    }
