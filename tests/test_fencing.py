"""Removing a copy never removes a newer version's (invariants 3 and 5): the purge
after ``delete()``, a worker's purge, ``TransferAndDelete`` and
``clean_local_copies``, each with a re-save of the name landing in the window
between its check and its delete. A contender thread makes the re-save there; the
window stays open until it has returned or waits for a lock."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.core.management import call_command
from django.db import OperationalError, connection, connections, router, transaction
from django.utils import timezone

from queued_storage.backends import QueuedStorage
from queued_storage.models import PendingTransfer
from queued_storage.worker import drain
from tests.contention import TIMEOUT, Contender
from tests.helpers import content, read_bytes, root_of, row_of
from tests.storages import PausingStorage, SaveWindowStorage, WindowStorage

pytestmark = pytest.mark.django_db(transaction=True)

Make = Callable[..., QueuedStorage]
WINDOW = "tests.storages.WindowStorage"
TRANSFER_AND_DELETE = "queued_storage.tasks.TransferAndDelete"


def in_the_window(func: Callable[[], Any]) -> tuple[Contender, Callable[[str], None]]:
    """A contender running ``func``, and the hook that runs it inside a window."""
    contender = Contender(func)

    def hook(name: str) -> None:
        contender.start()
        contender.wait_returned_or_locked()

    return contender, hook


def assert_newer_version_everywhere(storage: QueuedStorage, name: str) -> None:
    drain()
    row = row_of(storage, name)
    assert (row.status, row.deleted) == ("done", False)
    assert read_bytes(storage, name) == b"new"
    assert read_bytes(storage.remote, name) == b"new"


def test_purge_spares_a_version_saved_and_transferred_before_its_remote_delete(
    make_storage: Make, window: type[WindowStorage]
) -> None:
    storage = make_storage(local=WINDOW)
    name = storage.save("doc.txt", content("old"))
    drain()

    def save_again_and_transfer() -> None:
        assert storage.save(name, content("new")) == name
        drain()

    contender, window.after_delete = in_the_window(save_again_and_transfer)
    storage.delete(name)  # its purge removes the local copy, then the remote one
    contender.join()
    assert_newer_version_everywhere(storage, name)


def test_purge_spares_a_local_copy_saved_again_in_its_window(
    make_storage: Make, window: type[WindowStorage]
) -> None:
    storage = make_storage(local=WINDOW, local_options={"allow_overwrite": True})
    name = storage.save("doc.txt", content("old"))
    drain()

    contender, window.before_delete = in_the_window(
        lambda: storage.save(name, content("new"))
    )
    storage.delete(name)
    contender.join()
    assert read_bytes(storage, name) == b"new"
    assert_newer_version_everywhere(storage, name)


def test_worker_purge_spares_a_local_copy_saved_again_in_its_window(
    make_storage: Make, window: type[WindowStorage]
) -> None:
    storage = make_storage(local=WINDOW, local_options={"allow_overwrite": True})
    name = storage.save("doc.txt", content("old"))
    drain()
    # The tombstone that delete() writes, its purge lost (the process stopped at
    # the commit): a worker claims it.
    PendingTransfer.objects.record_delete(storage.key, name)

    contender, window.before_delete = in_the_window(
        lambda: storage.save(name, content("new"))
    )
    drain()
    contender.join()
    assert read_bytes(storage, name) == b"new"
    assert_newer_version_everywhere(storage, name)


def test_transfer_and_delete_spares_a_local_copy_saved_again_in_its_window(
    make_storage: Make, window: type[WindowStorage]
) -> None:
    storage = make_storage(
        local=WINDOW, local_options={"allow_overwrite": True}, task=TRANSFER_AND_DELETE
    )
    name = storage.save("doc.txt", content("old"))

    contender, window.before_delete = in_the_window(
        lambda: storage.save(name, content("new"))
    )
    drain()  # the old version's transfer, then its local copy's delete
    contender.join()
    assert read_bytes(storage, name) == b"new"
    assert_newer_version_everywhere(storage, name)
    assert not storage.local.exists(name)  # the newer one's copy went, after its own


def test_clean_local_copies_spares_a_local_copy_saved_again_in_its_window(
    make_storage: Make, window: type[WindowStorage]
) -> None:
    storage = make_storage(local=WINDOW, local_options={"allow_overwrite": True})
    name = storage.save("doc.txt", content("old"))
    drain()
    transferred = timezone.now() - timedelta(days=2)
    PendingTransfer.objects.filter(pk=row_of(storage, name).pk).update(
        transferred_at=transferred
    )
    saved = transferred.timestamp() - 5
    os.utime(storage.local.path(name), (saved, saved))

    contender, window.before_delete = in_the_window(
        lambda: storage.save(name, content("new"))
    )
    call_command("clean_local_copies", "--older-than", "1d", verbosity=0)
    contender.join()
    assert read_bytes(storage, name) == b"new"
    assert_newer_version_everywhere(storage, name)


@pytest.mark.django_db(transaction=True)
def test_transfer_never_brings_back_a_deleted_name_whose_purge_has_not_run(
    make_storage: Callable[..., QueuedStorage],
) -> None:
    """The deleted version's local copy waits for its purge (a slow commit, a
    purge that failed): transfer() must not queue it as a live file again."""
    storage = make_storage()
    name = storage.save("a.txt", content("deleted"))
    connection = connections[router.db_for_write(PendingTransfer)]
    with transaction.atomic():
        start = len(connection.run_on_commit)
        storage.delete(name)
        del connection.run_on_commit[start:]  # the purge has not run yet
    assert storage.local.exists(name)

    assert storage.transfer(name) is False

    assert not storage.exists(name)
    assert row_of(storage, name).deleted
    drain(keys=[storage.key])
    assert not storage.exists(name)
    assert not storage.local.exists(name)
    assert not storage.remote.exists(name)


def test_purge_spares_a_remote_object_the_ledger_never_wrote(
    make_storage: Make,
) -> None:
    """A row that failed over a remote object the ledger did not write owns
    nothing there: deleting the name removes its local copy and its row, and
    leaves that object alone (on MariaDB, which assigns an UPDATE's columns left
    to right, the purge's claim read back the status it had just set and took
    the object for the row's)."""
    storage = make_storage()
    theirs = str(root_of(storage.remote) / "doc.txt")
    root_of(storage.remote).mkdir(parents=True, exist_ok=True)
    with open(theirs, "wb") as file:
        file.write(b"theirs")
    name = storage.save("doc.txt", content("mine"))
    assert drain().failed == 1
    assert row_of(storage, name).remote_owned is False

    storage.delete(name)  # its purge runs at once, after the commit
    drain()

    assert not PendingTransfer.objects.filter(storage_key=storage.key).exists()
    assert not storage.local.exists(name)
    with open(theirs, "rb") as file:
        assert file.read() == b"theirs"


def test_transfer_and_delete_spares_a_large_save_written_while_the_name_got_its_row(
    make_storage: Make, window: type[WindowStorage]
) -> None:
    """A large save (or one of unknown size) of a name without a row, on a local
    storage that overwrites names, and another save of the name that gets its row
    and is transferred while the large one copies: TransferAndDelete's delete of
    that version's local copy, landing between the large save's write and its
    row, removed the file the large save had just written (its row then said
    queued, with no file anywhere). Whichever save wins, its file is kept."""
    storage = make_storage(
        local="tests.storages.SaveWindowStorage",
        local_options={"allow_overwrite": True},
        task=TRANSFER_AND_DELETE,
    )
    window = SaveWindowStorage
    checked, written, go_write, go_record = (threading.Event() for _ in range(4))
    big = content("the large save")
    big.size = None  # type: ignore[assignment]  # unknown: saved the way of a large file

    def before_save(name: str) -> None:
        checked.set()
        assert go_write.wait(TIMEOUT)

    def after_save(name: str) -> None:
        written.set()
        assert go_record.wait(TIMEOUT)

    def in_delete_window(name: str) -> None:
        go_write.set()
        assert written.wait(TIMEOUT)

    def save_small_and_transfer() -> None:
        # A wait for the large save's row ends in an error here, and the window
        # closes (SQLite's the contender sees itself).
        with connection.cursor() as cursor:
            if connection.vendor == "postgresql":
                cursor.execute("SET lock_timeout = '500ms'")
            elif connection.vendor == "mysql":
                cursor.execute("SET SESSION innodb_lock_wait_timeout = 1")
        try:
            storage.save("doc.txt", content("small"))
        except OperationalError:
            return  # it waited for the large save, which holds the name
        window.before_delete = in_delete_window
        drain()  # its transfer, then its local copy's delete

    window.before_save, window.after_save = before_save, after_save
    saver = Contender(lambda: storage.save("doc.txt", big))
    other = Contender(save_small_and_transfer)
    window.thread = saver.thread
    try:
        saver.start()
        assert checked.wait(TIMEOUT)  # past its look at the ledger
        other.start()
        other.wait_returned_or_locked()
        go_write.set()
        assert written.wait(TIMEOUT)
        go_record.set()
        saver.join()
        other.join()
    finally:
        go_write.set()
        go_record.set()
        window.thread = window.before_save = window.after_save = None
        window.before_delete = None
    drain()
    row = row_of(storage, "doc.txt")
    assert (row.status, row.deleted) == ("done", False), row.last_error
    assert read_bytes(storage, "doc.txt") == read_bytes(storage.remote, "doc.txt")
    assert read_bytes(storage, "doc.txt") in (b"small", b"the large save")


def test_a_late_purge_that_removed_a_newer_remote_copy_queues_it_again(
    make_storage: Make, pausing: type[PausingStorage]
) -> None:
    """On a remote without conditional deletes, the purge after delete() stopped
    between its lease check and its remote delete while its lease ran out and the
    name was saved again and transferred: its delete removes the newer version's
    remote copy. It finds out when it cannot remove the tombstone, and queues
    that version again, so that its local copy is served and uploaded again."""
    storage = make_storage(remote="tests.storages.PausingStorage")
    name = storage.save("doc.txt", content("old"))
    drain()

    def delete() -> None:
        storage.delete(name)  # its purge runs at once, after the commit

    purge = Contender(delete)
    pausing.arm("delete", purge.thread)
    purge.start()
    assert pausing.paused.wait(TIMEOUT)  # its lease checked
    PendingTransfer.objects.filter(storage_key=storage.key).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1)
    )
    assert storage.save(name, content("new")) == name
    drain()
    pausing.resume.set()
    purge.join()

    assert read_bytes(storage, name) == b"new"
    assert_newer_version_everywhere(storage, name)
