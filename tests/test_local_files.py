"""The local copy: the bytes a save wrote are the size the ledger records, a save
that fails leaves nothing to serve, and the worker uploads only regular files
inside the local storage's root."""

from __future__ import annotations

import errno
import io
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.files.base import ContentFile
from django.core.files.uploadedfile import TemporaryUploadedFile
from django.db import DatabaseError, connection, transaction
from django.utils import timezone

from queued_storage import registry
from queued_storage.backends import QueuedStorage
from queued_storage.models import PendingTransfer
from queued_storage.worker import drain
from tests.helpers import content, local_files, read_bytes, remote_calls, row_of
from tests.storages import SwappingStorage

pytestmark = pytest.mark.django_db

Make = Callable[..., QueuedStorage]
Status = PendingTransfer.Status


def transferred(storage: QueuedStorage, name: str) -> PendingTransfer:
    drain(keys=[storage.key])
    row = row_of(storage, name)
    assert (row.status, row.last_error) == (Status.DONE, "")
    return row


# Sizes are bytes


class Unsized:
    """A file object that cannot tell its size: no ``size``, no name, no seek."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        return self._data.read(size)


@pytest.mark.parametrize("verify_checksum", [False, True], ids=["size", "checksum"])
def test_str_content_records_its_size_in_bytes(
    make_storage: Make, verify_checksum: bool
) -> None:
    storage = make_storage(verify_checksum=verify_checksum)
    text = "Grüße aus Köln"

    name = storage.save("n.txt", ContentFile(text))

    assert row_of(storage, name).size == len(text.encode()) == 17
    assert storage.local.size(name) == 17
    assert transferred(storage, name).size == storage.remote.size(name) == 17
    assert read_bytes(storage, name) == text.encode()


def test_a_file_whose_size_is_wrong_records_the_bytes_written(
    storage: QueuedStorage,
) -> None:
    wrong = ContentFile(b"twelve bytes", name="w.bin")
    wrong.size = 3

    name = storage.save("w.bin", wrong)

    assert row_of(storage, name).size == 12
    assert transferred(storage, name).size == storage.remote.size(name) == 12


def test_a_moved_temporary_upload_whose_size_is_wrong_records_its_bytes(
    storage: QueuedStorage,
) -> None:
    upload = TemporaryUploadedFile("t.bin", "application/octet-stream", 3, None)
    upload.write(b"not three bytes")
    upload.seek(0)

    name = storage.save("t.bin", upload)
    upload.close()  # as the request does: the file was moved away

    assert row_of(storage, name).size == 15
    assert transferred(storage, name).size == storage.remote.size(name) == 15


def test_a_file_that_cannot_tell_its_size_records_the_bytes_written(
    storage: QueuedStorage,
) -> None:
    name = storage.save("u.bin", Unsized(b"no size known"))

    assert row_of(storage, name).size == 13
    assert transferred(storage, name).size == storage.remote.size(name) == 13


def test_a_file_whose_size_is_right_costs_no_second_statement(
    storage: QueuedStorage, django_assert_num_queries: Any
) -> None:
    with django_assert_num_queries(1):
        name = storage.save("r.bin", ContentFile(b"right size"))

    assert row_of(storage, name).size == 10


# A failed save leaves nothing served


class FillsTheDisk(ContentFile):  # type: ignore[type-arg]
    """Content whose write runs out of disk space after its first bytes."""

    def chunks(self, chunk_size: int | None = None) -> Iterator[bytes]:
        yield b"part"
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture(params=["small", "large"])
def file_size(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test for a file whose row is written before it (small) and after."""
    if request.param == "large":
        monkeypatch.setattr("queued_storage.saving.SMALL_FILE", 5)
    return str(request.param)


def assert_nothing_served(
    storage: QueuedStorage, name: str, others: tuple[str, ...] = ()
) -> None:
    """``name`` is unknown: not there, not readable, its URL the remote's (which
    serves nothing), no local file left but ``others``; and it saves again as
    itself."""
    assert not storage.exists(name)
    with pytest.raises(FileNotFoundError):
        storage.open(name)
    assert storage.url(name) == storage.remote.url(name)
    assert local_files(storage) == sorted(others)
    assert not PendingTransfer.objects.for_name(storage.key, name).exists()
    assert storage.save(name, content("saved again")) == name
    assert read_bytes(storage, name) == b"saved again"
    assert transferred(storage, name).size == 11


def save_and_roll_back(storage: QueuedStorage) -> str:
    """Save in a transaction that the view's error rolls back, reading the file
    back inside it as the view would."""
    with pytest.raises(RuntimeError), transaction.atomic():
        name = storage.save("draft.txt", content())
        assert storage.exists(name)
        assert read_bytes(storage, name) == b"hello world"
        raise RuntimeError("the view failed")
    return name


def test_a_save_rolled_back_to_a_savepoint_leaves_nothing_served(
    storage: QueuedStorage, file_size: str
) -> None:
    kept = storage.save("kept.txt", content("kept"))  # in the enclosing transaction

    name = save_and_roll_back(storage)

    assert read_bytes(storage, kept) == b"kept"
    assert_nothing_served(storage, name, others=(kept,))


@pytest.mark.django_db(transaction=True)
def test_a_rolled_back_transaction_leaves_nothing_served(
    storage: QueuedStorage, file_size: str
) -> None:
    name = save_and_roll_back(storage)

    assert_nothing_served(storage, name)


@pytest.mark.parametrize("atomic", [True, False], ids=["in-atomic", "autocommit"])
@pytest.mark.django_db(transaction=True)
def test_a_local_write_that_fails_midway_leaves_nothing_served(
    storage: QueuedStorage, file_size: str, atomic: bool
) -> None:
    full = FillsTheDisk(b"more than a partial file")
    if atomic:
        with transaction.atomic(), pytest.raises(OSError, match="No space left"):
            storage.save("full.bin", full)
    else:
        with pytest.raises(OSError, match="No space left"):
            storage.save("full.bin", full)

    assert_nothing_served(storage, "full.bin")


@pytest.mark.parametrize("atomic", [True, False], ids=["in-atomic", "autocommit"])
@pytest.mark.django_db(transaction=True)
def test_a_large_file_whose_row_fails_leaves_nothing_served(
    storage: QueuedStorage, monkeypatch: pytest.MonkeyPatch, atomic: bool
) -> None:
    monkeypatch.setattr("queued_storage.saving.SMALL_FILE", 5)
    with connection.execute_wrapper(_refuse_ledger_inserts):
        if atomic:
            with pytest.raises(DatabaseError), transaction.atomic():
                storage.save("big.bin", content("more than five bytes"))
        else:
            with pytest.raises(DatabaseError):
                storage.save("big.bin", content("more than five bytes"))

    assert_nothing_served(storage, "big.bin")


def _refuse_ledger_inserts(
    execute: Any, sql: str, params: Any, many: bool, context: Any
) -> Any:
    """Make every INSERT into the ledger fail in the database, as a full disk or a
    dropped connection would (on PostgreSQL the transaction is then aborted)."""
    if sql.lstrip().upper().startswith("INSERT") and (
        PendingTransfer._meta.db_table in sql
    ):
        return execute("SELECT * FROM queued_storage_no_such_table", (), False, context)
    return execute(sql, params, many, context)


def test_a_failed_save_never_removes_a_file_it_did_not_write(
    storage: QueuedStorage,
) -> None:
    # A file from before the ledger: the local storage writes the failing save
    # under another name.
    old = Path(storage.local.path("old.txt"))
    old.parent.mkdir(parents=True, exist_ok=True)
    old.write_bytes(b"from 0.8")
    kept = storage.save("kept.txt", content("kept"))

    with pytest.raises(OSError, match="No space left"):
        storage.save("old.txt", FillsTheDisk(b"more than a partial file"))
    with pytest.raises(RuntimeError), transaction.atomic():
        assert storage.save("kept.txt", content("draft")) != kept
        raise RuntimeError("the view failed")

    assert local_files(storage) == ["kept.txt", "old.txt"]
    assert read_bytes(storage, "old.txt") == b"from 0.8"
    assert read_bytes(storage, kept) == b"kept"


@pytest.mark.django_db(transaction=True)
def test_a_committed_save_keeps_its_file_when_an_earlier_callback_raises(
    storage: QueuedStorage,
) -> None:
    def fails_after_commit() -> None:
        raise RuntimeError("a receiver of the view failed")

    # Django runs no later callback once one raises: the save's is dropped
    # uncalled, after the commit.
    with pytest.raises(RuntimeError), transaction.atomic():
        transaction.on_commit(fails_after_commit)
        name = storage.save("kept.txt", content())

    assert row_of(storage, name).status == Status.QUEUED
    assert read_bytes(storage, name) == b"hello world"
    assert transferred(storage, name).size == 11


# The worker uploads regular files inside the local root only


def test_a_symlink_to_a_file_outside_the_local_root_is_never_uploaded(
    storage: QueuedStorage, tmp_path: Path
) -> None:
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_bytes(b"not for the remote")
    name = storage.save("avatar.txt", content())
    link = Path(storage.local.path(name))
    link.unlink()
    link.symlink_to(secret)

    drain(keys=[storage.key])

    row = row_of(storage, name)
    assert row.status == Status.FAILED
    assert "outside the local storage's root" in row.last_error
    assert repr(name) in row.last_error
    assert remote_calls(storage, "save") == 0
    assert not storage.remote.exists(name)


def test_a_symlink_swapped_in_after_the_check_is_never_uploaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"not for the remote")
    storage = QueuedStorage(
        "tests.storages.SwappingStorage",
        "tests.storages.CountingStorage",
        local_options={"location": str(tmp_path / "local")},
        remote_options={"location": str(tmp_path / "remote")},
        key="swapping",
    )
    try:
        name = storage.save("avatar.txt", content())
        monkeypatch.setattr(SwappingStorage, "target", str(secret))

        drain(keys=[storage.key])

        row = row_of(storage, name)
        assert row.status == Status.QUEUED
        assert "changed while it was opened" in row.last_error
        # The next attempt finds the symlink the swap left.
        monkeypatch.setattr(SwappingStorage, "target", "")
        row.next_attempt_at = timezone.now()
        row.save(update_fields=["next_attempt_at"])
        drain(keys=[storage.key])
        row = row_of(storage, name)
        assert row.status == Status.FAILED
        assert "outside the local storage's root" in row.last_error
        assert remote_calls(storage, "save") == 0
        assert not storage.remote.exists(name)
    finally:
        registry.forget(storage.key)


def test_a_symlink_inside_the_local_root_is_uploaded(storage: QueuedStorage) -> None:
    target = storage.save("target.txt", content())
    name = storage.save("link.txt", content())
    link = Path(storage.local.path(name))
    link.unlink()
    link.symlink_to(storage.local.path(target))

    assert transferred(storage, name).size == 11
    assert read_bytes(storage.remote, name) == b"hello world"


def test_a_local_name_that_is_not_a_regular_file_is_never_uploaded(
    storage: QueuedStorage,
) -> None:
    name = storage.save("pipe", content())
    path = Path(storage.local.path(name))
    path.unlink()
    os.mkfifo(path)
    # Opening a FIFO to read waits for a writer: one that writes nothing ends a
    # read of it instead of letting it wait for ever.
    writer = threading.Thread(target=path.write_bytes, args=(b"",), daemon=True)
    writer.start()

    drain(keys=[storage.key])

    os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))  # let the writer go
    writer.join(10)

    row = row_of(storage, name)
    assert row.status == Status.FAILED
    assert "is not a regular file" in row.last_error
    assert remote_calls(storage, "save") == 0
    assert not storage.remote.exists(name)


def test_a_size_mismatch_reports_the_real_size_of_both_sides(
    make_storage: Make,
) -> None:
    storage = make_storage(remote="tests.storages.TruncatingStorage")
    name = storage.save("a.txt", content())
    Path(storage.local.path(name)).write_bytes(b"hello world, changed")

    drain(keys=[storage.key])

    error = row_of(storage, name).last_error
    assert (
        "the remote copy of 'a.txt' has 19 bytes, the local file 20 (the ledger "
        "recorded 11)"
    ) in error


def test_a_failed_write_that_lost_a_race_for_its_name_spares_the_winner(
    tmp_path: Path,
) -> None:
    """The local storage finds the name free, then taken when it creates the file
    (another save won it), writes under another name and runs out of space."""
    storage = QueuedStorage(
        "tests.storages.OverlookingStorage",
        "tests.storages.CountingStorage",
        local_options={"location": str(tmp_path / "local")},
        remote_options={"location": str(tmp_path / "remote")},
        key="overlooking",
    )
    try:
        winner = Path(storage.local.path("a.txt"))
        winner.parent.mkdir(parents=True)
        winner.write_bytes(b"the winner's")

        with pytest.raises(OSError, match="No space left"):
            storage.save("a.txt", FillsTheDisk(b"more than a partial file"))

        assert local_files(storage) == ["a.txt"]
        assert winner.read_bytes() == b"the winner's"
    finally:
        registry.forget(storage.key)


class _AcrossFileSystems:
    """``os`` as ``file_move_safe`` sees it when the temporary upload directory is
    on another file system (no rename) that fills up as the copy starts."""

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    @staticmethod
    def rename(source: str, target: str) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    @staticmethod
    def write(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_temporary_upload_whose_copy_fails_leaves_nothing_served(
    storage: QueuedStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload = TemporaryUploadedFile("up.bin", "application/octet-stream", 11, None)
    upload.write(b"hello world")
    upload.seek(0)
    monkeypatch.setattr("django.core.files.move.os", _AcrossFileSystems())

    with pytest.raises(OSError, match="No space left"):
        storage.save("up.bin", upload)
    upload.close()
    monkeypatch.undo()

    assert_nothing_served(storage, "up.bin")


@pytest.mark.django_db(transaction=True)
def test_a_rolled_back_save_spares_the_file_of_a_save_that_took_the_name_since(
    make_storage: Callable[..., QueuedStorage], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save rolled back, on a local storage that overwrites names: once the
    database has rolled its row back, another save may take the name and write
    its file before Django drops the rolled-back save's callbacks, whose removal
    must then leave the other save's file alone."""
    from tests.contention import Contender

    storage = make_storage(local_options={"allow_overwrite": True})
    other = Contender(lambda: storage.save("doc.txt", content("theirs")))
    rollback = connection._rollback  # type: ignore[attr-defined]

    def rolled_back() -> None:
        rollback()
        monkeypatch.undo()
        other.start()
        other.wait_returned_or_locked()

    monkeypatch.setattr(connection, "_rollback", rolled_back)
    with pytest.raises(RuntimeError), transaction.atomic():
        assert storage.save("doc.txt", content("mine")) == "doc.txt"
        raise RuntimeError("the view failed")
    other.join()

    assert read_bytes(storage, "doc.txt") == b"theirs"
    drain()
    assert row_of(storage, "doc.txt").status == PendingTransfer.Status.DONE


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("rollback", ["transaction", "savepoint"])
def test_a_rolled_back_save_on_a_local_storage_that_overwrites_leaves_nothing_served(
    make_storage: Callable[..., QueuedStorage], rollback: str
) -> None:
    """With nobody else after the name, the cleanup that holds the name in the
    ledger removes the rolled-back file: after a transaction's rollback at once,
    after a savepoint's once the outer transaction lets it (on SQLite, which
    keeps the outer transaction's write lock, at once)."""
    storage = make_storage(local_options={"allow_overwrite": True})

    def save_and_fail() -> None:
        with pytest.raises(RuntimeError), transaction.atomic():
            assert storage.save("doc.txt", content("mine")) == "doc.txt"
            raise RuntimeError("the view failed")

    if rollback == "transaction":
        save_and_fail()
    else:
        with transaction.atomic():
            save_and_fail()
    for thread in threading.enumerate():
        if thread.name == "queued-storage-rollback-cleanup":
            thread.join(timeout=30)
    assert_nothing_served(storage, "doc.txt")


@pytest.mark.django_db(transaction=True)
def test_a_save_rolled_back_to_a_savepoint_on_sqlite_leaves_nothing_served_at_once(
    make_storage: Callable[..., QueuedStorage],
) -> None:
    """On SQLite the outer transaction keeps the database's write lock after a
    savepoint's rollback, so no other save can have taken the name: the file of
    a save rolled back there is removed at once, not left served until the outer
    transaction ends (for good on a shared-cache in-memory database, which
    refuses a second connection's write instead of waiting)."""
    if connection.vendor != "sqlite":
        pytest.skip("the outer transaction holds no database-wide write lock")
    storage = make_storage(local_options={"allow_overwrite": True})
    with transaction.atomic():
        with pytest.raises(RuntimeError), transaction.atomic():
            assert storage.save("doc.txt", content("mine")) == "doc.txt"
            raise RuntimeError("the form failed")
        assert not storage.exists("doc.txt")
        assert local_files(storage) == []
        assert storage.save("doc.txt", content("again")) == "doc.txt"
    assert read_bytes(storage, "doc.txt") == b"again"
    assert row_of(storage, "doc.txt").status == Status.QUEUED


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("overwrite", [True, False], ids=["overwrites", "keeps-names"])
def test_a_committed_save_keeps_its_file_when_its_callback_is_freed_in_a_later_transaction(
    make_storage: Callable[..., QueuedStorage], overwrite: bool
) -> None:
    """An earlier callback raised after the commit: the exception's traceback
    keeps the save's cleanup alive, and it may be freed while the connection is
    in another transaction. The committed row is found, and the file stays."""
    storage = make_storage(local_options={"allow_overwrite": overwrite})

    def fails() -> None:
        raise ValueError("an earlier callback failed")

    kept: list[BaseException] = []
    try:
        with transaction.atomic():
            transaction.on_commit(fails)
            assert storage.save("doc.txt", content("mine")) == "doc.txt"
    except ValueError as exc:
        kept.append(exc)
    with transaction.atomic():
        kept.clear()
    for thread in threading.enumerate():
        if thread.name == "queued-storage-rollback-cleanup":
            thread.join(timeout=30)
    assert read_bytes(storage, "doc.txt") == b"mine"
    assert row_of(storage, "doc.txt").status == Status.QUEUED
