"""A save or ``transfer()`` that found no row for its name, and another process
that writes one before it writes its own (invariants 1 and 3): the row it meets
is re-saved as the update of a re-save does it, at a larger generation, a
worker's live lease kept; ``transfer()`` leaves a tombstone alone. The other
process is a contender thread with a connection of its own, and commits."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import connection, transaction

from queued_storage.backends import QueuedStorage
from queued_storage.models import PendingTransfer
from tests.contention import TIMEOUT, Contender
from tests.helpers import GenerationClock, content, read_bytes, row_of

pytestmark = pytest.mark.django_db(transaction=True)

Status = PendingTransfer.Status
HOUR = 3600 * 10**9


@contextlib.contextmanager
def in_a_transaction() -> Iterator[None]:
    """The caller's transaction, whose first read fixes the snapshot before the
    contender commits: on MariaDB at REPEATABLE READ (a site's choice; Django's
    default is READ COMMITTED), whose snapshot hides the contender's row from a
    plain read. SQLite serialises the two: the contender could not commit while
    this one reads."""
    if connection.vendor == "sqlite":
        yield
        return
    mysql = connection.vendor == "mysql"
    if mysql:
        with connection.cursor() as cursor:
            cursor.execute("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    try:
        with transaction.atomic():
            yield
    finally:
        if mysql:
            with connection.cursor() as cursor:
                cursor.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")


@contextlib.contextmanager
def window_before_the_row(
    storage: QueuedStorage,
    monkeypatch: pytest.MonkeyPatch,
    meanwhile: Callable[[], Any],
) -> Iterator[Contender]:
    """Run ``meanwhile`` in a contender when the local storage is asked the size of
    the file whose row is written next (after the ledger was read)."""
    contender = Contender(meanwhile)
    monkeypatch.setattr(storage.local, "size", opened(storage.local.size, contender))
    yield contender
    assert contender.settled.is_set(), "the window never opened"
    assert not contender.errors, contender.errors


def opened(func: Callable[[str], Any], contender: Contender) -> Callable[[str], Any]:
    """``func``, which runs ``contender`` to its end after its first call."""

    def window(name: str) -> Any:
        found = func(name)
        if not contender.connected.is_set():
            contender.start()
            contender.thread.join(TIMEOUT)
            assert not contender.thread.is_alive(), "the contender waited for a lock"
        return found

    return window


def test_a_large_save_racing_another_hosts_keeps_its_lease_and_raises_the_generation(
    make_storage: Callable[..., QueuedStorage],
    generation_clock: GenerationClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("queued_storage.saving.SMALL_FILE", 5)
    storage = make_storage()
    claimed: list[PendingTransfer] = []

    def another_host_saves_and_its_worker_claims() -> None:
        generation_clock.another_host(behind=-HOUR)  # its clock is an hour ahead
        PendingTransfer.objects.record_save(
            key=storage.key,
            name="big.bin",
            size=3,
            host="b",
            held=False,
            existing=False,
        )
        claimed.extend(
            PendingTransfer.objects.filter(storage_key=storage.key).claim_due(
                limit=1, lease=300
            )
        )
        generation_clock.another_host(behind=0)

    with (
        window_before_the_row(
            storage, monkeypatch, another_host_saves_and_its_worker_claims
        ),
        in_a_transaction(),
    ):
        assert storage.save("big.bin", content("more than five bytes")) == "big.bin"

    [lease] = claimed
    row = row_of(storage, "big.bin")
    assert row.generation > lease.generation
    assert (row.status, row.lease_token, row.size) == (
        Status.TRANSFERRING,
        lease.lease_token,
        20,
    )


def test_a_large_save_racing_a_delete_is_saved(
    make_storage: Callable[..., QueuedStorage], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("queued_storage.saving.SMALL_FILE", 5)
    monkeypatch.setattr("queued_storage.storage.purge", lambda *args: None)
    storage = make_storage()

    with (
        window_before_the_row(storage, monkeypatch, lambda: storage.delete("big.bin")),
        in_a_transaction(),
    ):
        assert storage.save("big.bin", content("more than five bytes")) == "big.bin"

    row = row_of(storage, "big.bin")
    assert (row.deleted, row.status, row.size) == (False, Status.QUEUED, 20)
    assert read_bytes(storage, "big.bin") == b"more than five bytes"


def test_transfer_racing_a_committed_delete_leaves_the_tombstone(
    make_storage: Callable[..., QueuedStorage], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The purge after the delete's commit has not run yet (another host's).
    monkeypatch.setattr("queued_storage.storage.purge", lambda *args: None)
    storage = make_storage()
    storage.local.save("c.txt", content("left by 0.8"))

    with (
        window_before_the_row(storage, monkeypatch, lambda: storage.delete("c.txt")),
        in_a_transaction(),
    ):
        assert not storage.transfer("c.txt")

    row = row_of(storage, "c.txt")
    assert (row.deleted, row.status) == (True, Status.QUEUED)
    assert not storage.exists("c.txt")


def test_transfer_racing_a_delete_and_its_purge_queues_nothing(
    make_storage: Callable[..., QueuedStorage], monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = make_storage()
    storage.local.save("d.txt", content("left by 0.8"))
    contender = Contender(lambda: storage.delete("d.txt"))
    monkeypatch.setattr(
        storage.local, "exists", opened(storage.local.exists, contender)
    )

    assert not storage.transfer("d.txt")
    assert contender.settled.is_set() and not contender.errors
    assert not PendingTransfer.objects.for_name(storage.key, "d.txt").live().exists()
    assert not storage.exists("d.txt")
