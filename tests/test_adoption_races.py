"""Attacks on adoption (DESIGN "Adoption", invariants 1, 2 and 4): a name deleted
while the remote is asked about it, a save in a snapshot that cannot see another
transaction's row, a remote that cannot answer, a run stopped between its steps."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection, transaction

from queued_storage.adoption import Adoption
from queued_storage.backends import QueuedStorage
from queued_storage.models import PendingTransfer
from queued_storage.worker import drain
from tests.helpers import content, read_bytes, row_of
from tests.storages import PausingStorage, SizeOutageStorage
from tests.test_adoption import UnsizedFile, adopt, ledger, legacy_site
from tests.test_commands import age_transfers
from tests.test_commands import run as run_command

pytestmark = pytest.mark.django_db

Make = Callable[..., QueuedStorage]
Status = PendingTransfer.Status


def in_thread(work: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """A thread (not started) that runs ``work`` on a connection of its own; the
    dict gets its ``result`` or ``error``."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = work()
        except Exception as exc:
            outcome["error"] = exc
        finally:
            connection.close()

    return threading.Thread(target=run), outcome


def wait_for_a_lock_wait() -> None:
    """Return once another session of this test's database waits for a row lock."""
    if connection.vendor == "postgresql":
        sql = (
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'"
        )
    else:
        # innodb_trx needs the PROCESS privilege: a locking read in flight, which
        # cannot end before the lock it asks for is free.
        sql = (
            "SELECT count(*) FROM information_schema.processlist WHERE db = "
            "DATABASE() AND command = 'Query' AND info LIKE '%FOR UPDATE' AND id <> CONNECTION_ID()"
        )
    deadline = time.monotonic() + 10
    with connection.cursor() as cursor:
        while True:
            cursor.execute(sql)
            if cursor.fetchone()[0]:
                return
            assert time.monotonic() < deadline, "nothing waited for a lock"
            time.sleep(0.01)


@pytest.mark.django_db(transaction=True)
def test_a_save_whose_snapshot_hides_the_names_row_gets_another_name(
    make_storage: Make,
) -> None:
    """MariaDB's REPEATABLE READ: a transaction that read the ledger before another
    committed the row of a name cannot see that row, yet reserve() is refused by
    it. The save takes another name instead of asking for the same one again."""
    if connection.vendor == "sqlite":
        pytest.skip("SQLite's IMMEDIATE transactions serialise writers: no snapshot")
    storage = make_storage(task="queued_storage.tasks.TransferAndDelete")
    in_snapshot, committed = threading.Event(), threading.Event()

    def view() -> str:
        if connection.vendor == "mysql":
            # Django's default is READ COMMITTED; a site may choose InnoDB's own.
            with connection.cursor() as cursor:
                cursor.execute(
                    "SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ"
                )
        with transaction.atomic():
            # The snapshot starts at the transaction's first read.
            PendingTransfer.objects.filter(storage_key=storage.key).exists()
            in_snapshot.set()
            assert committed.wait(10)
            return storage.save("a.txt", content("second"))

    thread, outcome = in_thread(view)
    thread.start()
    assert in_snapshot.wait(10)
    # Saved and transferred meanwhile; TransferAndDelete removed its local copy.
    assert storage.save("a.txt", content("first")) == "a.txt"
    drain()
    assert not storage.local.exists("a.txt")
    committed.set()
    thread.join(30)

    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"] != "a.txt"
    assert read_bytes(storage, "a.txt") == b"first"
    assert read_bytes(storage, outcome["result"]) == b"second"


@pytest.mark.not_adopted
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("how", ["save", "get_available_name"])
def test_a_name_deleted_while_a_save_asks_the_remote_is_not_brought_back(
    make_storage: Make, pausing: type[PausingStorage], how: str
) -> None:
    """A save finds a 0.8 file on the remote; before it records the file, the file
    is deleted and purged. The row the save writes must not serve the deleted
    name (a done row for a file that is gone)."""
    if how == "save" and connection.vendor == "sqlite":
        pytest.skip("SQLite: the save's IMMEDIATE transaction holds off the delete")
    storage = legacy_site(
        make_storage, {"a.txt": b"old a"}, remote="tests.storages.PausingStorage"
    )

    def asking() -> str:
        if how == "save":
            return storage.save("a.txt", content("new"))
        return storage.get_available_name("a.txt")

    thread, outcome = in_thread(asking)
    pausing.arm("exists", thread=thread)
    thread.start()
    assert pausing.paused.wait(10), "the save never asked the remote"
    storage.delete("a.txt")  # autocommit: purged at once
    assert not storage.remote.exists("a.txt")
    assert "a.txt" not in ledger(storage)
    pausing.resume.set()
    thread.join(30)

    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"] == "a.txt"  # deleted: the name is free
    if how == "save":
        assert read_bytes(storage, "a.txt") == b"new"
        drain()
        assert read_bytes(storage.remote, "a.txt") == b"new"
        return
    assert not storage.exists("a.txt")
    with pytest.raises(FileNotFoundError):
        storage.open("a.txt")
    assert "a.txt" not in ledger(storage)
    assert storage.save("a.txt", content("newer")) == "a.txt"


@pytest.mark.not_adopted
def test_a_file_deleted_before_a_stopped_batch_went_in_is_not_brought_back(
    make_storage: Make, django_capture_on_commit_callbacks: Any
) -> None:
    """A batch listed ``b.txt``; the file is deleted and purged; the batch inserts
    its rows and the run stops before it reads their sizes. The run that resumes
    lists the remote without ``b.txt``: its row must not stay to serve it."""
    storage = legacy_site(
        make_storage,
        {"a.txt": b"a", "b.txt": b"bb", "c.txt": b"ccc"},
        remote="tests.storages.SizeOutageStorage",
    )
    run = Adoption(storage)
    listed = list(run.names())
    with django_capture_on_commit_callbacks(execute=True):
        storage.delete("b.txt")
    assert not storage.remote.exists("b.txt")
    SizeOutageStorage.down = True
    try:
        with pytest.raises(ConnectionError):
            run.record(listed)
    finally:
        SizeOutageStorage.down = False
    assert storage.exists("b.txt")  # the stopped batch's row, for now

    summary, _err = adopt(storage)

    assert summary["adopted"] is True
    assert not storage.exists("b.txt")
    assert "b.txt" not in ledger(storage)
    assert ledger(storage)["a.txt"] == (Status.DONE, False, 1, True)
    assert read_bytes(storage, "c.txt") == b"ccc"


@pytest.mark.not_adopted
@pytest.mark.parametrize("how", ["small", "unsized", "in a transaction"])
def test_a_remote_that_cannot_answer_fails_the_save_and_leaves_nothing(
    make_storage: Make, how: str
) -> None:
    """Not adopted, a name the ledger has never seen may be a 0.8 file's: when the
    remote cannot say, the save fails (as 0.8's did) rather than hand the name
    out, and leaves no row and no file; the caller's transaction stays usable."""
    storage = make_storage(remote="tests.storages.FailingExistsStorage")

    with pytest.raises(TimeoutError):
        if how == "in a transaction":
            with transaction.atomic():
                try:
                    storage.save("a.txt", content("new"))
                finally:
                    # The transaction is not broken: the caller may go on.
                    assert not PendingTransfer.objects.filter(
                        storage_key=storage.key
                    ).exists()
        elif how == "unsized":
            storage.save("a.txt", UnsizedFile(io.BytesIO(b"new")))
        else:
            storage.save("a.txt", content("new"))

    assert ledger(storage) == {}
    assert not storage.local.exists("a.txt")
    assert not storage.exists("a.txt")
    # The remote answers again: the name is free.
    assert storage.save("a.txt", content("new")) == "a.txt"


@pytest.mark.not_adopted
@pytest.mark.django_db(transaction=True)
def test_a_delete_while_a_save_records_the_remote_file_deletes_it(
    make_storage: Make,
) -> None:
    """A save that found a 0.8 file on the remote recorded it in its transaction,
    which is still open, when the application deletes that file: the delete
    waits for the save and then deletes it, rather than failing."""
    if connection.vendor == "sqlite":
        pytest.skip("SQLite: the save's IMMEDIATE transaction holds off the delete")
    storage = legacy_site(make_storage, {"a.txt": b"old a"})
    recorded, finish = threading.Event(), threading.Event()

    def view() -> str:
        with transaction.atomic():
            name = storage.save("a.txt", content("new"))
            recorded.set()
            assert finish.wait(10)
            return name

    saver, saved = in_thread(view)
    saver.start()
    assert recorded.wait(10)
    deleter, deleted = in_thread(lambda: storage.delete("a.txt"))
    deleter.start()
    wait_for_a_lock_wait()  # the delete waits for the save's row
    finish.set()
    saver.join(30)
    deleter.join(30)

    assert "error" not in saved, saved.get("error")
    assert "error" not in deleted, deleted.get("error")
    assert not storage.exists("a.txt")
    assert not storage.remote.exists("a.txt")
    assert read_bytes(storage, saved["result"]) == b"new"


@pytest.mark.not_adopted
def test_listed_names_the_ledger_would_spell_otherwise_never_reach_another_row(
    make_storage: Make,
) -> None:
    """Invariant 1: a remote file listed as ``d\\x.txt`` or in NFD is another file
    than ``d/x.txt`` or the NFC name for the remote, but the same for the
    ledger: it is skipped, and the file the ledger means keeps its own size."""
    nfd = "cafe\u0301.txt"
    storage = legacy_site(
        make_storage, {"d\\x.txt": b"backslash", nfd: b"nfd", "d/x.txt": b"real"}
    )

    summary, _err = adopt(storage)

    assert (summary["recorded"], summary["invalid"]) == (1, 2)
    assert ledger(storage) == {"d/x.txt": (Status.DONE, False, 4, True)}
    assert read_bytes(storage, "d/x.txt") == b"real"
    assert storage.save("café.txt", content("new")) == "café.txt"
    assert read_bytes(storage, "café.txt") == b"new"


@pytest.mark.not_adopted
def test_a_rolled_back_save_that_found_a_remote_file_leaves_no_file(
    make_storage: Make,
) -> None:
    storage = legacy_site(make_storage, {"a.txt": b"old a"})

    with pytest.raises(RuntimeError), transaction.atomic():
        name = storage.save("a.txt", content("new"))
        raise RuntimeError("the view failed")

    assert name != "a.txt"
    assert ledger(storage) == {}
    assert not storage.local.exists(name)
    assert read_bytes(storage, "a.txt") == b"old a"


@pytest.mark.not_adopted
def test_clean_local_copies_keeps_the_local_copy_of_a_file_not_sized_yet(
    make_storage: Make,
) -> None:
    """Invariant 5: a 0.8 ``Transfer`` site kept local copies; one upload of it was
    cut short. A stopped adoption left the file's row done without a size: until
    the adoption reads it, nothing has checked the remote copy, so the local
    copy stays, even when the cleaning is told not to ask the remote."""
    storage = legacy_site(
        make_storage,
        {"a.txt": b"old"},  # the upload that was cut short
        remote="tests.storages.SizeOutageStorage",
    )
    storage.local.save("a.txt", content("old a"))
    run = Adoption(storage)
    SizeOutageStorage.down = True
    try:
        with pytest.raises(ConnectionError):
            run.record(list(run.names()))
    finally:
        SizeOutageStorage.down = False
    assert ledger(storage)["a.txt"] == (Status.DONE, False, None, True)
    age_transfers(storage, days=2)

    cleaned = run_command(
        "clean_local_copies", "--older-than", "1d", "--no-check-remote", "--json"
    )

    assert (cleaned.json["removed"], cleaned.json["unverified"]) == (0, 1)
    assert read_bytes(storage.local, "a.txt") == b"old a"
    adopt(storage)
    cleaned = run_command(
        "clean_local_copies", "--older-than", "1d", "--no-check-remote", "--json"
    )
    assert (cleaned.json["removed"], cleaned.json["changed"]) == (0, 1)
    assert read_bytes(storage.local, "a.txt") == b"old a"


@pytest.mark.not_adopted
def test_a_remote_that_says_a_0_8_file_is_not_there_never_loses_it(
    make_storage: Make,
) -> None:
    """Invariant 4 under a lying ``exists()`` (a replica that lags): the save gets
    the old file's name, but the worker never overwrites the object the ledger
    did not write; the row fails with a conflict that says what to do."""
    storage = legacy_site(
        make_storage, {"a.txt": b"old a"}, remote="tests.storages.BlindStorage"
    )

    assert storage.save("a.txt", content("new")) == "a.txt"
    drain()

    row = row_of(storage, "a.txt")
    assert row.status == Status.FAILED
    assert "RemoteConflict" in row.last_error and "re-queue" in row.last_error
    assert read_bytes(storage.remote, "a.txt") == b"old a"
    assert read_bytes(storage, "a.txt") == b"new"
