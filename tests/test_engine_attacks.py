"""Attacks on the per-row path's copy: Django's own FileSystemStorage remote
written through its exclusive-create view without progress notes for a small
file, a subclass that overrides the write, a directory of the name that is a
symlink out of the local root."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.core.files import locks
from django.core.files.storage import FileSystemStorage

from queued_storage.backends import QueuedStorage
from queued_storage.copying import Route
from queued_storage.models import PendingTransfer
from queued_storage.worker import drain
from tests.helpers import FS, content, in_thread, joined, read_bytes, row_of, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

Status = PendingTransfer.Status


def test_a_small_file_whose_exclusive_write_hangs_is_abandoned_after_the_timeout(
    make_storage: Callable[..., QueuedStorage],
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A file of one read chunk to Django's own FileSystemStorage notes no
    progress: a write that hangs (a lock on a network file system) is still
    abandoned after QUEUED_STORAGE_TRANSFER_TIMEOUT, and its late return loses."""
    settings.QUEUED_STORAGE_TRANSFER_TIMEOUT = 1
    settings.QUEUED_STORAGE_LEASE = 60
    storage = make_storage(remote=FS)
    name = storage.save("small.txt", content("small"))
    assert Route(storage.local, storage.remote).keeping_name is not None
    entered = threading.Event()
    release = threading.Event()
    lock = locks.lock

    def hanging_lock(fd: Any, flags: int) -> bool:
        entered.set()
        if not release.wait(timeout=30):
            raise TimeoutError("the test never released the write")
        return lock(fd, flags)

    monkeypatch.setattr(locks, "lock", hanging_lock)
    worker, result = in_thread(drain)
    try:
        assert entered.wait(timeout=30)

        def abandoned() -> bool:
            return "made no progress" in (row_of(storage, name).last_error or "")

        assert wait_until(abandoned, timeout=20), "the hung write was never abandoned"
        assert row_of(storage, name).status == Status.QUEUED
    finally:
        release.set()
    joined(worker, result)
    row = row_of(storage, name)
    # The late copy lost its compare-and-set: the retry is the row's to make.
    assert (row.status, row.lease_token) == (Status.QUEUED, "")
    assert row.remote_owned


class OwnWriteStorage(FileSystemStorage):
    """A FileSystemStorage subclass whose write is its own."""

    written: list[str] = []

    def _save(self, name: str, content: Any) -> str:
        type(self).written.append(name)
        return super()._save(name, content)  # type: ignore[misc, no-any-return]


def test_a_file_system_remote_that_overrides_its_write_is_written_through_it(
    make_storage: Callable[..., QueuedStorage], tmp_path: Path
) -> None:
    OwnWriteStorage.written = []
    storage = make_storage(
        remote=f"{__name__}.OwnWriteStorage",
        remote_options={"location": str(tmp_path / "remote")},
    )
    assert Route(storage.local, storage.remote).keeping_name is None
    name = storage.save("own.txt", content("own"))
    drain()
    assert row_of(storage, name).status == Status.DONE
    assert OwnWriteStorage.written == [name]
    assert read_bytes(storage.remote, name) == b"own"


@pytest.mark.parametrize("remote", [FS, "tests.storages.CountingStorage"])
def test_a_directory_of_the_name_linked_out_of_the_local_root_is_never_uploaded(
    make_storage: Callable[..., QueuedStorage], tmp_path: Path, remote: str
) -> None:
    storage = make_storage(remote=remote)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"not for the remote")
    name = storage.save("d/secret.txt", content("mine"))
    directory = Path(storage.local.path("d"))
    (directory / "secret.txt").unlink()
    directory.rmdir()
    directory.symlink_to(outside, target_is_directory=True)

    drain()

    row = row_of(storage, name)
    assert row.status == Status.FAILED
    assert "outside the local storage's root" in row.last_error
    assert not storage.remote.exists(name)
