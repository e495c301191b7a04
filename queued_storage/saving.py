"""The local write path of a queued storage: the name a save stores, the file
written to the local storage and its ledger row, in the caller's transaction.
No call reaches the remote, except to ask whether a name the ledger has never
seen is taken there (until the storage is adopted)."""

from __future__ import annotations

import contextlib
import pathlib
import posixpath
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from django.core.exceptions import SuspiciousFileOperation
from django.core.files import File
from django.core.files.storage import FileSystemStorage, Storage
from django.db import DatabaseError, connections, router, transaction

from queued_storage import adoption, prefetch, recording
from queued_storage.checksums import CountingFile, HashingFile, storage_sha256
from queued_storage.conf import settings as conf
from queued_storage.integrations import wake_after_commit
from queued_storage.models import PendingTransfer, retry_when_locked
from queued_storage.names import clean_name
from queued_storage.prefetch import RowState, state_of
from queued_storage.rollback import (
    RemovedUnlessCommitted,
    file_being_written,
    overwrites_names,
    remove_local,
)

if TYPE_CHECKING:
    from queued_storage.storage import QueuedStorage

#: Give up looking for a free name after this many tries.
MAX_NAME_TRIES = 100
#: Files up to this size get their ledger row before they are written (one
#: statement); larger ones after, so that no write lock waits for a long copy.
SMALL_FILE = 4 * 1024 * 1024


def _rereadable(content: Any) -> bool:
    """Whether ``content`` can be read again from its start."""
    seekable = getattr(content, "seekable", None)
    try:
        return bool(seekable()) if callable(seekable) else False
    except (OSError, ValueError):
        return False


def _known_size(content: Any) -> int | None:
    """The size of upload content, if it can tell without being read."""
    try:
        return int(content.size)
    except (AttributeError, OSError, TypeError, ValueError):
        return None


def _local_verbatim(storage: QueuedStorage) -> bool:
    """Whether the local storage is Django's ``FileSystemStorage`` as it comes,
    which stores exactly the bytes of the content it saves."""
    cls = type(storage.local)
    return (
        isinstance(storage.local, FileSystemStorage)
        and cls.save is Storage.save
        and getattr(cls, "_save", None) is getattr(FileSystemStorage, "_save", 0)
    )


def free(
    storage: QueuedStorage, name: str, max_length: int | None
) -> tuple[bool] | None:
    """None if ``name`` is taken; else whether the ledger has a row for it."""
    if not storage.local.is_name_available(name, max_length=max_length):
        return None
    state = state_of(storage.key, name) or _asked_of_remote(storage, name)
    if state is None:
        return (False,)
    if state.deleted or overwrites_names(storage.local):
        return (True,)
    return None


def _asked_of_remote(storage: QueuedStorage, name: str) -> RowState | None:
    """Until the storage is adopted, a name the ledger has no row for (and the
    local storage no file at) is asked of the remote before it is handed out:
    a file there (one from before the ledger) is recorded as done, so that the
    name is taken from then on without asking again. Returns that row's state;
    None when the name is free."""
    db = router.db_for_write(PendingTransfer)
    if adoption.is_adopted(db, storage.key):
        return None
    return _ask_remote(storage, name, db)


def _ask_remote(storage: QueuedStorage, name: str, db: str) -> RowState | None:
    """:func:`_asked_of_remote` of a storage known not to be adopted."""
    if not storage.remote.exists(name):
        return None
    storage._registered()  # a ledger write, also from get_available_name()
    prefetch.forget(storage.key, name)
    try:
        recorded = adoption.record_remote_file(db, storage.key, name, storage.remote)
    except FileNotFoundError:
        return None  # deleted (and purged) since it answered: the name is free
    if recorded is not None:
        return RowState(PendingTransfer.Status.DONE, False, recorded)
    # A save of the name got its row in first: that row answers.
    return state_of(storage.key, name) or RowState(
        PendingTransfer.Status.DONE, False, None
    )


def available_name(
    storage: QueuedStorage,
    name: str,
    max_length: int | None,
    reserve: Callable[[str], int | None] | None = None,
    *,
    cleaned: bool = False,
    refused: str | None = None,
) -> tuple[str, bool, int | None]:
    """The name a save stores, whether the ledger has a row for it, and, with
    ``reserve``, the generation of the row ``reserve`` wrote for a name the
    ledger did not have (one statement instead of a read and a write).
    ``refused``: a name ``reserve`` was just refused (it has a row)."""
    if not cleaned:
        # What clean_name lets through passes Django's validate_file_name too.
        name = clean_name(str(name))
    dir_name, file_name = posixpath.split(name)
    file_root = file_ext = ""
    for _try in range(MAX_NAME_TRIES):
        if storage.local.is_name_available(name, max_length=max_length):
            if reserve is not None and name != refused:
                generation = reserve(name)
                if generation is not None:
                    return name, False, generation
            # Not adopted, a name asked of the remote by ``reserve`` has the row
            # that recorded it; one whose row another transaction's snapshot
            # hides (MariaDB) is asked again rather than reserved for ever.
            state = state_of(storage.key, name) or _asked_of_remote(storage, name)
            if state is None:
                if reserve is None:
                    return name, False, None
                if refused == name:
                    refused = None
                    continue  # its row went in between: reserve it again
                # Refused again by a row this transaction cannot see (a snapshot
                # of MariaDB's REPEATABLE READ taken before it): the name is taken.
            elif state.deleted or overwrites_names(storage.local):
                return name, True, None
        if not file_root:
            file_ext = "".join(pathlib.PurePath(file_name).suffixes)
            file_root = file_name.removesuffix(file_ext)
        name = posixpath.join(
            dir_name, storage.get_alternative_name(file_root, file_ext)
        )
        if max_length and len(name) > max_length:
            file_root = file_root[: -(len(name) - max_length)]
            if not file_root:
                break
            name = posixpath.join(
                dir_name, storage.get_alternative_name(file_root, file_ext)
            )
        name = clean_name(name)  # the local storage's invention
    raise SuspiciousFileOperation(
        f"Storage can not find an available filename for {name!r}. Make sure the "
        "file field allows a sufficient max_length."
    )


def save(
    storage: QueuedStorage,
    name: str | None,
    content: Any,
    max_length: int | None = None,
) -> str:
    """Write ``content`` locally and record it in the ledger, in the caller's
    transaction. No call reaches the remote."""
    storage._registered()
    if name is None:
        name = content.name
    if not hasattr(content, "chunks"):
        content = File(content, name)
    name = clean_name(name)
    size = _known_size(content)
    if (size is None or size > SMALL_FILE) and not overwrites_names(storage.local):
        # The local storage creates a new file exclusively: nothing another
        # save, purge or TransferAndDelete does to the name can touch it. One
        # that overwrites names gets the row first, whatever the size: a row
        # written after the copy would leave the copy unlocked, and the
        # removal of a version whose row appeared meanwhile would remove it.
        name, existing, _ = available_name(storage, name, max_length, cleaned=True)
        return store(storage, name, content, existing, max_length)
    db = router.db_for_write(PendingTransfer)
    if connections[db].in_atomic_block:
        return _save_small(storage, name, content, max_length, size, db)
    return _save_small_atomically(storage, name, content, max_length, size, db)


@retry_when_locked
def _save_small_atomically(
    storage: QueuedStorage,
    name: str,
    content: Any,
    max_length: int | None,
    size: int | None,
    db: str,
) -> str:
    # Outside a transaction the row would be seen before its file is written.
    # The transaction is ours: one the database aborted over a lock is tried
    # again as a whole, as the ledger's own statements are.
    with transaction.atomic(using=db):
        return _save_small(storage, name, content, max_length, size, db)


def _save_small(
    storage: QueuedStorage,
    name: str,
    content: Any,
    max_length: int | None,
    size: int | None,
    db: str,
) -> str:
    """Save a small file: its row first (reserving a new name costs one
    statement), then the file, then the row mended if the file differs."""
    host = conf.QUEUED_STORAGE_HOSTNAME
    adopted = adoption.is_adopted(db, storage.key)

    def reserve(candidate: str) -> int | None:
        if (
            not adopted
            and state_of(storage.key, candidate) is None
            and _ask_remote(storage, candidate, db) is not None
        ):
            return None  # the remote's file: available_name finds its row
        return recording.reserve(
            PendingTransfer,
            db,
            storage.key,
            candidate,
            size=size,
            host=host,
            held=storage.delayed,
        )

    # A name the ledger has never seen: its row, then the file (the local
    # storage's own save checks that the name is free there).
    generation = None
    if not max_length or len(name) <= max_length:
        generation = reserve(name)
    existing = False
    if generation is None:
        name, existing, generation = available_name(
            storage, name, max_length, reserve, cleaned=True, refused=name
        )
    if generation is None:
        return store(storage, name, content, existing, max_length)
    counting = _counting(storage, content)
    hashing = counting if isinstance(counting, HashingFile) else None
    owned = _owns_what_it_writes(storage, existing)
    try:
        stored = _write_local(
            storage, name, content if counting is None else counting, max_length, owned
        )
    except BaseException:
        # A database error here leaves a transaction that rolls back anyway:
        # the error to raise is the local storage's.
        with contextlib.suppress(DatabaseError):
            PendingTransfer.objects.unreserve(storage.key, name, generation)
        raise
    with _removed_unless_committed(storage, stored, owned, db):
        if stored != name:
            # The local storage found the name taken after all and chose another.
            PendingTransfer.objects.unreserve(storage.key, name, generation)
            existing = state_of(storage.key, stored) is not None
            return _record(storage, stored, hashing, existing)
        prefetch.forget(storage.key, stored)
        # Django's FileSystemStorage writes every byte it reads: what was
        # counted is on disk. Text is encoded as the local storage chose, and
        # another local storage may change the bytes: ask it.
        written = (
            counting.counted
            if counting is not None and not counting.text and _local_verbatim(storage)
            else storage.local.size(stored)
        )
        checksum = _checksum(storage, hashing, stored, written)
        if written != size or checksum:
            PendingTransfer.objects.record_file(
                storage.key, stored, generation, written, checksum
            )
    if not storage.delayed:
        _wake(storage, stored)
    return str(stored)


def _owns_what_it_writes(storage: QueuedStorage, existing: bool) -> bool:
    """Whether the file a save writes is its own to remove if the save fails: a
    new file, unless the local storage overwrote one the ledger has a row for
    (the row decides what becomes of that one)."""
    return not existing or not overwrites_names(storage.local)


def _write_local(
    storage: QueuedStorage, name: str, content: Any, max_length: int | None, owned: bool
) -> str:
    """Save ``content`` to the local storage; a write that fails midway (a full
    disk) leaves no partial file for the no-row fallback to serve."""
    try:
        return str(storage.local.save(name, content, max_length=max_length))
    except BaseException as exc:
        partial = file_being_written(exc, storage.local) if owned else None
        if partial is not None:
            remove_local(storage.local, partial)
        raise


@contextlib.contextmanager
def _removed_unless_committed(
    storage: QueuedStorage, name: str, owned: bool, db: str
) -> Iterator[None]:
    """Around the ledger writes that follow a local write: if they raise, or
    the transaction that holds them rolls back, the file ``name`` is removed."""
    if not owned:
        yield
        return
    try:
        yield
    except BaseException:
        remove_local(storage.local, name)
        raise
    connection = connections[db]
    if connection.in_atomic_block:
        transaction.on_commit(
            RemovedUnlessCommitted(
                connection,
                storage.local,
                name,
                key=storage.key,
            ),
            using=db,
        )


def _counting(storage: QueuedStorage, content: Any) -> CountingFile | None:
    """``content`` wrapped to count (and with ``verify_checksum`` hash) the bytes
    the local storage reads; None for a temporary upload, which Django's
    FileSystemStorage moves instead of reading."""
    if storage.verify_checksum:
        return HashingFile(content)
    if hasattr(content, "temporary_file_path"):
        return None
    return CountingFile(content)


def store(
    storage: QueuedStorage,
    name: str,
    content: Any,
    existing: bool,
    max_length: int | None,
) -> str:
    """Save the file, then write its row. The file of a name that has a row is
    written under that row's lock, held until the row is written (and the
    caller's transaction ends): a purge, ``TransferAndDelete`` or
    ``clean_local_copies`` deletes an older generation's local copy under the
    same lock after checking the row, so it never deletes this file."""
    if not existing:
        return _write(storage, name, content, existing, max_length)
    if _rereadable(content):
        return _store_locked_retrying(storage, name, content, max_length)
    return _store_locked(storage, name, content, max_length)


def _store_locked(
    storage: QueuedStorage, name: str, content: Any, max_length: int | None
) -> str:
    db = router.db_for_write(PendingTransfer)
    with transaction.atomic(using=db):
        PendingTransfer.objects.using(db).for_name(storage.key, name).lock()
        return _write(storage, name, content, True, max_length)


# Outside the caller's transaction this one is ours: one the database aborted
# over a lock is tried again as a whole, its content read again from the start
# (as every save reads it). Content that cannot be read twice is not retried.
_store_locked_retrying = retry_when_locked(_store_locked)


def _write(
    storage: QueuedStorage,
    name: str,
    content: Any,
    existing: bool,
    max_length: int | None,
) -> str:
    hashing = HashingFile(content) if storage.verify_checksum else None
    owned = _owns_what_it_writes(storage, existing)
    stored = _write_local(
        storage, name, content if hashing is None else hashing, max_length, owned
    )
    with _removed_unless_committed(
        storage, stored, owned, router.db_for_write(PendingTransfer)
    ):
        if stored != name:
            existing = state_of(storage.key, stored) is not None
        return _record(storage, stored, hashing, existing)


def _checksum(
    storage: QueuedStorage, hashing: HashingFile | None, name: str, size: int
) -> str:
    if hashing is None:
        return ""
    # A local storage that moved a temporary file instead of reading it leaves
    # the hash incomplete: then read the saved copy once.
    if hashing.hashed == size:
        return hashing.hexdigest()
    return storage_sha256(storage.local, name)


def _record(
    storage: QueuedStorage, stored: str, hashing: HashingFile | None, existing: bool
) -> str:
    """Write the row of a file saved locally."""
    prefetch.forget(storage.key, stored)
    size = storage.local.size(stored)
    PendingTransfer.objects.record_save(
        key=storage.key,
        name=stored,
        size=size,
        host=conf.QUEUED_STORAGE_HOSTNAME,
        held=storage.delayed,
        checksum=_checksum(storage, hashing, stored, size),
        existing=existing,
    )
    if not storage.delayed:
        _wake(storage, stored)
    return str(stored)


def _wake(storage: QueuedStorage, name: str) -> None:
    wake_after_commit(router.db_for_write(PendingTransfer), storage.key, name)
