"""The worker runtime: handing back a claim, per-row leases, the transfer timeout,
failures wherever they are raised, and lock aborts on the caller's side."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.db import OperationalError, connection, transaction
from django.utils import timezone

from queued_storage.backends import QueuedStorage
from queued_storage.models import PendingTransfer
from tests.conftest import content, row_of

pytestmark = pytest.mark.django_db

Status = PendingTransfer.Status


# A graceful stop hands back what it never started, as it stands now


def claim_one(storage: QueuedStorage, name: str) -> PendingTransfer:
    [claimed] = PendingTransfer.objects.for_name(storage.key, name).claim_due(
        limit=1, lease=300
    )
    return claimed


def test_release_claim_queues_an_unchanged_row_with_the_attempt_taken_back(
    storage: QueuedStorage,
) -> None:
    name = storage.save("a.txt", content())
    claimed = claim_one(storage, name)

    assert PendingTransfer.objects.release_claim([claimed]) == 1

    row = row_of(storage, name)
    assert row.status == Status.QUEUED
    assert row.attempts == 0
    assert row.generation == claimed.generation
    assert (row.lease_token, row.lease_expires_at) == ("", None)
    assert PendingTransfer.objects.due().filter(pk=row.pk).exists()


def test_release_claim_gives_a_row_saved_again_its_new_generations_state(
    make_storage: Callable[..., QueuedStorage],
) -> None:
    storage = make_storage(local_options={"allow_overwrite": True})
    name = storage.save("a.txt", content("old"))
    claimed = claim_one(storage, name)
    assert storage.save(name, content("new")) == name

    assert PendingTransfer.objects.release_claim([claimed]) == 1

    row = row_of(storage, name)
    assert row.status == Status.QUEUED
    assert row.generation != claimed.generation
    assert row.attempts == 0
    assert (row.lease_token, row.lease_expires_at) == ("", None)
    assert PendingTransfer.objects.due().filter(pk=row.pk).exists()


def test_release_claim_holds_a_row_saved_again_on_a_delayed_storage(
    make_storage: Callable[..., QueuedStorage],
) -> None:
    storage = make_storage(local_options={"allow_overwrite": True}, delayed=True)
    name = storage.save("a.txt", content("old"))
    assert storage.transfer(name)
    claimed = claim_one(storage, name)
    assert storage.save(name, content("new")) == name

    assert PendingTransfer.objects.release_claim([claimed]) == 1

    row = row_of(storage, name)
    assert row.status == Status.HELD
    assert row.next_attempt_at is None
    assert row.attempts == 0
    assert row.lease_token == ""


def test_release_claim_leaves_a_deleted_row_a_tombstone_due_for_its_purge(
    storage: QueuedStorage,
) -> None:
    name = storage.save("a.txt", content())
    claimed = claim_one(storage, name)
    storage.delete(name)

    assert PendingTransfer.objects.release_claim([claimed]) == 1

    row = PendingTransfer.objects.get(pk=claimed.pk)
    assert row.deleted
    assert row.status == Status.QUEUED
    assert (row.lease_token, row.lease_expires_at) == ("", None)
    assert PendingTransfer.objects.due().filter(pk=row.pk).exists()


def test_release_claim_skips_a_row_gone_from_the_ledger(storage: QueuedStorage) -> None:
    name = storage.save("a.txt", content())
    claimed = claim_one(storage, name)
    PendingTransfer.objects.filter(pk=claimed.pk).delete()

    assert PendingTransfer.objects.release_claim([claimed]) == 0


def test_release_claim_leaves_a_row_another_worker_took_over_alone(
    storage: QueuedStorage,
) -> None:
    name = storage.save("a.txt", content())
    claimed = claim_one(storage, name)
    later = timezone.now() + timedelta(seconds=301)
    [rival] = PendingTransfer.objects.claim_due(limit=1, lease=300, now=later)

    assert PendingTransfer.objects.release_claim([claimed]) == 0

    row = row_of(storage, name)
    assert row.status == Status.TRANSFERRING
    assert row.lease_token == rival.lease_token
    assert row.attempts == 2


def test_release_claim_leaves_a_finished_row_alone(storage: QueuedStorage) -> None:
    name = storage.save("a.txt", content())
    claimed = claim_one(storage, name)
    assert claimed.mark_done()

    assert PendingTransfer.objects.release_claim([claimed]) == 0
    assert row_of(storage, name).status == Status.DONE


# A lock abort is retried for callers outside a transaction, raised inside one


class DeadlockOnce:
    """An execute wrapper: the first statement that writes (or locks) ledger rows
    fails as MariaDB's deadlock victim does, without running."""

    def __init__(self) -> None:
        self.raised: list[OperationalError] = []

    def __call__(
        self,
        execute: Callable[..., Any],
        sql: str,
        params: Any,
        many: bool,
        context: Any,
    ) -> Any:
        text = sql.lstrip().upper()
        writes = text.startswith(("INSERT", "UPDATE", "DELETE")) or "FOR UPDATE" in text
        if (
            not self.raised
            and writes
            and PendingTransfer._meta.db_table.upper() in text
        ):
            error = OperationalError(
                1213,
                "Deadlock found when trying to get lock; try restarting transaction",
            )
            self.raised.append(error)
            raise error
        return execute(sql, params, many, context)


def _save_new(storage: QueuedStorage) -> None:
    assert storage.save("new.txt", content()) == "new.txt"
    assert row_of(storage, "new.txt").status == Status.QUEUED


def _save_again(storage: QueuedStorage) -> None:
    before = row_of(storage, "old.txt").generation
    assert storage.save("old.txt", content("newer")) == "old.txt"
    assert row_of(storage, "old.txt").generation != before


def _delete(storage: QueuedStorage) -> None:
    storage.delete("old.txt")
    assert not storage.exists("old.txt")


def _transfer(storage: QueuedStorage) -> None:
    assert storage.transfer("held.txt")
    assert row_of(storage, "held.txt").status == Status.QUEUED


CALLS = {
    "save": _save_new,
    "save-again": _save_again,
    "delete": _delete,
    "transfer": _transfer,
}


@pytest.fixture
def lockable(make_storage: Callable[..., QueuedStorage]) -> QueuedStorage:
    storage = make_storage(local_options={"allow_overwrite": True})
    storage.save("old.txt", content("old"))
    storage.save("held.txt", content("held"))
    assert PendingTransfer.objects.for_name(storage.key, "held.txt").hold() == 1
    return storage


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("call", list(CALLS), ids=list(CALLS))
def test_a_call_outside_a_transaction_retries_a_deadlock(
    lockable: QueuedStorage, call: str
) -> None:
    deadlock = DeadlockOnce()

    with connection.execute_wrapper(deadlock):
        CALLS[call](lockable)

    assert len(deadlock.raised) == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("call", list(CALLS), ids=list(CALLS))
def test_a_call_inside_the_callers_transaction_raises_a_deadlock_unchanged(
    lockable: QueuedStorage, call: str
) -> None:
    deadlock = DeadlockOnce()

    with (
        pytest.raises(OperationalError) as raised,
        connection.execute_wrapper(deadlock),
        transaction.atomic(),
    ):
        CALLS[call](lockable)

    assert [raised.value] == deadlock.raised
