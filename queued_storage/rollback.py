"""Removing the local file of a save that failed or rolled back: a partial file
left by a failed write, the file of a save whose transaction rolled back, and
never a file that another save has written since."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from types import FrameType, TracebackType

from django.core.files.move import file_move_safe
from django.core.files.storage import FileSystemStorage, Storage
from django.db import DatabaseError, connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper

from queued_storage import recording
from queued_storage.conf import settings as conf
from queued_storage.models import PendingTransfer

logger = logging.getLogger("queued_storage")


def remove_local(local: Storage, name: str) -> None:
    """Remove a file a failed save wrote; a failure to do so is logged, not raised
    (the save's own error, or the rollback, is what the caller must see)."""
    try:
        local.delete(name)
    except Exception as exc:
        logger.warning("failed save cleanup error name=%s error=%r", name, exc)


_FILE_SYSTEM_SAVE = FileSystemStorage._save.__code__  # type: ignore[attr-defined]
_FILE_MOVE_SAFE = file_move_safe.__code__


def file_being_written(exc: BaseException, local: Storage) -> str | None:
    """The name of the file that ``FileSystemStorage._save`` of ``local`` had
    created (or truncated) when ``exc`` went through it, which it leaves behind.
    Only its frame knows the name: it may have given up the one it was asked for
    when another writer created that first, and that file is not ours."""
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code is _FILE_SYSTEM_SAVE and frame.f_locals.get("self") is local:
            name = frame.f_locals.get("name")
            # ``fd`` is bound once os.open() created or truncated the file: in
            # _save for a stream, in file_move_safe for a temporary upload copied
            # to another file system.
            created = "fd" in frame.f_locals or any(
                inner.f_code is _FILE_MOVE_SAFE and "fd" in inner.f_locals
                for inner in _inner_frames(tb)
            )
            return name if created and isinstance(name, str) else None
        tb = tb.tb_next
    return None


def _inner_frames(tb: TracebackType) -> Iterator[FrameType]:
    inner = tb.tb_next
    while inner is not None:
        yield inner.tb_frame
        inner = inner.tb_next


def overwrites_names(storage: Storage) -> bool:
    # Django's FileSystemStorage(allow_overwrite=True) keeps a taken name instead
    # of inventing another one: then a save of a taken name is a re-save.
    return bool(storage.get_alternative_name("x", ".y") == "x.y")


class RemovedUnlessCommitted:
    """Removes the local file a save wrote if the save's transaction rolls back.

    It waits in ``transaction.on_commit``: Django drops the callbacks of a
    transaction or savepoint that rolls back without calling them, and CPython
    frees this object at once (elsewhere: when the garbage collector runs). Freed
    while its connection is still in the transaction, it was rolled back; freed
    after the commit without a call (an earlier callback raised), it keeps the
    file, which its committed row owns.

    On a local storage that overwrites names (asked of the storage the file was
    saved to, and only on a rollback: it costs a random name), the database has
    released the name a moment before Django drops the callbacks: another save
    may have taken it and written its file since. The file is then removed only
    while the ledger holds the name for the removal (:func:`_remove_if_unclaimed`),
    on a connection of its own."""

    __slots__ = ("connection", "key", "local", "name", "pending")

    def __init__(
        self,
        connection: BaseDatabaseWrapper,
        local: Storage,
        name: str,
        *,
        key: str,
    ):
        self.connection = connection
        self.local = local
        self.name = name
        self.key = key
        self.pending = True

    def __call__(self) -> None:
        self.pending = False

    def __del__(self) -> None:
        if not self.pending:
            return
        connection = self.connection
        if not (connection.in_atomic_block or not connection.autocommit):
            return
        if connection.in_atomic_block and (
            connection.vendor == "sqlite" or not overwrites_names(self.local)
        ):
            # In a live transaction: after a savepoint's rollback, or freed late
            # (an earlier callback's traceback kept it) during a later transaction.
            # A row seen here is this save's, committed before: the file is its
            # own. No other save can have taken the name since a savepoint's
            # rollback on SQLite (the outer transaction holds the write lock; a
            # removal on another connection would wait for it, leaving the file
            # served until the outer transaction ends, for good on a shared-cache
            # in-memory database), nor on a local storage that keeps taken names.
            try:
                claimed = (
                    PendingTransfer.objects.using(connection.alias)
                    .for_name(self.key, self.name)
                    .exists()
                )
            except DatabaseError:
                claimed = True
            if not claimed:
                remove_local(self.local, self.name)
            return
        if not overwrites_names(self.local):
            remove_local(self.local, self.name)
            return
        remover = threading.Thread(
            target=_remove_if_unclaimed,
            args=(connection.alias, self.key, self.local, self.name),
            name="queued-storage-rollback-cleanup",
            daemon=True,
        )
        remover.start()
        if not connection.in_atomic_block:
            # The whole transaction rolled back: it holds no lock the removal could
            # wait for. After a savepoint's rollback the outer transaction may (a
            # row lock): the removal runs when it can.
            remover.join()


def _remove_if_unclaimed(db: str, key: str, local: Storage, name: str) -> None:
    """Remove the file a rolled-back save left at ``name``, unless a save of the
    name has a row for it by now (committed or not: the insert waits for it)."""
    try:
        with transaction.atomic(using=db):
            generation = recording.reserve(
                PendingTransfer,
                db,
                key,
                name,
                size=None,
                host=conf.QUEUED_STORAGE_HOSTNAME,
                held=True,
            )
            if generation is None:
                return  # another save took the name: the file there is its own
            remove_local(local, name)
            PendingTransfer.objects.using(db).unreserve(key, name, generation)
    except Exception as exc:
        # Left in place, the file is served as one from before the ledger: never
        # another save's file removed.
        logger.warning(
            "rolled-back save cleanup failed name=%s error=%s",
            name,
            type(exc).__name__,
        )
    finally:
        connections.close_all()
