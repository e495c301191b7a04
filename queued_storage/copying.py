"""The stock copy and its guards: stream a file from local to remote under the
same name, run the transfer hook for an attempt, fence destructive remote calls
with the lease (invariant 3), and make room so that no upload overwrites what it
must not (invariant 4)."""

from __future__ import annotations

import contextvars
import enum
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, cast

from django.core.files.base import File
from django.core.files.storage import FileSystemStorage, Storage
from django.core.files.utils import validate_file_name

from queued_storage import conditional
from queued_storage.errors import (
    LeaseLost,
    LocalFileMissing,
    LocalFileRefused,
    RemoteConflict,
    RemoteRenamed,
    TransferError,
)

if TYPE_CHECKING:
    from queued_storage.models import PendingTransfer
    from queued_storage.storage import QueuedStorage

logger = logging.getLogger("queued_storage")


class Route:
    """Where :func:`copy_file` streams to and what it checks there, looked up once
    for the files of one local and one remote storage (for the rows of a claimed
    batch, rather than once a file)."""

    def __init__(self, local: Storage, remote: Storage) -> None:
        self.local = local
        self.remote = remote
        #: The real path of a ``FileSystemStorage`` local's root, which only
        #: regular files inside are uploaded from; None for other storages.
        self.local_root = (
            os.path.realpath(local.location)
            if isinstance(local, FileSystemStorage)
            else None
        )
        #: Django's ``FileSystemStorage`` as it comes: its ``_save`` writes through
        #: this view of it, which finds a taken name a conflict.
        self.keeping_name = (
            _keeping_name(remote) if _renames_taken_names(remote) else None
        )


def copy_to_remote(name: str, local: Storage, remote: Storage) -> None:
    """Stream ``name`` from ``local`` to ``remote`` in chunks, under the same name.

    A local storage on disk gives only a regular file inside its root. Django's
    ``FileSystemStorage`` as it comes gets the file created exclusively at that
    name, a taken name being a :class:`RemoteConflict`; a remote that saves
    under another name is reported, and nothing is deleted under the name it
    returned: what is there may be another file."""
    copy_file(name, Route(local, remote))


def copy_file(name: str, route: Route) -> None:
    """:func:`copy_to_remote` along ``route``."""
    local = route.local
    found = _regular_file_inside_root(name, route)
    try:
        source = local.open(name, "rb")
    except Exception as exc:
        if not local.exists(name):
            raise LocalFileMissing(f"local file missing: {name!r}") from exc
        raise
    with source:
        if found is not None:
            # Refuse what is not the file that was checked: a symlink swapped in
            # between would otherwise be followed by the open.
            try:
                opened = os.fstat(source.fileno())
            except (AttributeError, OSError, ValueError):
                pass
            else:
                if (opened.st_dev, opened.st_ino) != (found.st_dev, found.st_ino):
                    # Retried: the next attempt checks what is there then.
                    raise TransferError(
                        f"the local file {name!r} changed while it was opened for "
                        "the upload"
                    )
        keeping_name = route.keeping_name
        if (
            keeping_name is None
            or found is None
            or found.st_size > getattr(source, "DEFAULT_CHUNK_SIZE", 0)
        ):
            # Noted but for a file that Django's own FileSystemStorage._save reads
            # in one chunk (content.chunks()) as the transfer starts.
            note = read_progress.get()
            if note is not None:
                source = File(
                    cast(IO[Any], _ReadsNoted(source, note)), name=source.name
                )
        if keeping_name is not None:
            # O_CREAT | O_EXCL, with Django's own directory and file modes: a taken
            # name is a conflict, decided by the file system, and no copy is made
            # under another name.
            validate_file_name(name, allow_relative_path=True)
            keeping_name._save(name, source)  # type: ignore[attr-defined]
            return
        saved = route.remote.save(name, source)
    if saved != name:
        raise RemoteRenamed(
            f"the remote saved {name!r} as {saved!r}; the remote storage must keep "
            f"the name it is given (whatever is at {saved!r} was left alone)"
        )


@dataclass(eq=False)
class HookCall:
    """The attempt a transfer hook runs for, as the stock copy (the base
    ``Transfer.transfer()``) sees it when a hook calls it for the attempt's name
    and remote."""

    name: str
    remote: Storage
    #: Sent with S3 conditional requests: ``If-Match: etag``, or with ``etag``
    #: None ``If-None-Match: *``.
    conditional: bool = False
    etag: str | None = None
    copied: bool = False
    #: What the stock copy raised: the attempt's error, whatever the hook then
    #: returns or raises (a refusal must not pass for another error).
    failure: Exception | None = None

    def covers(self, name: str, remote: Storage) -> bool:
        return name == self.name and remote is self.remote


_hook_call: contextvars.ContextVar[HookCall | None] = contextvars.ContextVar(
    "queued_storage_hook_call", default=None
)


_hook_calls_lock = threading.Lock()


#: The attempts whose hooks run in this process, by remote and name: for a hook
#: that runs the stock copy on a thread of its own (with a timeout of its own, say),
#: which does not see the context of the worker's thread.
_hook_calls: dict[tuple[int, str], list[HookCall]] = {}


def _attempt_copying(name: str, remote: Storage) -> HookCall | None:
    """The attempt that a stock copy of ``name`` to ``remote`` is for, if any."""
    call = _hook_call.get()
    if call is not None:
        # In the worker's thread: another name is the hook's own business.
        return call if call.covers(name, remote) else None
    with _hook_calls_lock:
        calls = _hook_calls.get((id(remote), name), [])
        # Two attempts of the name on this remote (two storages that share it, a
        # hung attempt and the next): whose copy this is cannot be told.
        return calls[0] if len(calls) == 1 and calls[0].covers(name, remote) else None


def stock_copy(name: str, local: Storage, remote: Storage) -> bool:
    """The base ``Transfer.transfer()``: :func:`copy_to_remote`, ``False`` if it
    raised (0.8's contract). For the name of the attempt a worker runs the hook
    for, the copy is sent with the attempt's conditions and runs once (the
    worker retries, with its backoff and what it knows of the remote object): its
    error is kept for the worker, which records it and handles it as if the hook
    had raised it. Another copy's error is the hook's to handle, and logged."""
    call = _attempt_copying(name, remote)
    if call is None:
        try:
            copy_to_remote(name, local, remote)
        except Exception as exc:
            # Warnings are redacted by the package's log filter.
            logger.warning(
                "copy failed name=%s error=%s: %s", name, type(exc).__name__, exc
            )
            return False
        return True
    with _hook_calls_lock:
        copied, call.copied = call.copied, True
    if copied:
        return call.failure is None
    try:
        with (
            conditional.conditional_upload(remote, name, call.etag)
            if call.conditional
            else nullcontext()
        ):
            copy_to_remote(name, local, remote)
    except Exception as exc:
        call.failure = exc
        return False
    return True


@contextmanager
def _calling_hook(call: HookCall) -> Iterator[HookCall]:
    token = _hook_call.set(call)
    running = (id(call.remote), call.name)
    with _hook_calls_lock:
        _hook_calls.setdefault(running, []).append(call)
    try:
        yield call
    finally:
        _hook_call.reset(token)
        with _hook_calls_lock:
            _hook_calls[running].remove(call)
            if not _hook_calls[running]:
                del _hook_calls[running]


def run_hook(task: Any, call: HookCall, local: Storage) -> Any:
    """Call the hook for ``call``'s name; raise what the stock copy raised in it,
    if it did (instead of a ``False``, or what the hook did after it)."""
    with _calling_hook(call):
        try:
            result = task.transfer(call.name, local, call.remote)
        except Exception:
            if call.failure is None:
                raise
            result = None
    if call.failure is not None:
        raise call.failure
    return result


def _regular_file_inside_root(name: str, route: Route) -> os.stat_result | None:
    """The status of the file ``name`` resolves to, if the local storage is a
    ``FileSystemStorage`` (``path()`` of others, such as ``InMemoryStorage``, need
    not be where the file is). A symlink may point anywhere and ``path()`` does
    not resolve it: what resolves outside the root, or is not a regular file (a
    FIFO would block the read for ever), is refused."""
    root = route.local_root
    if root is None:
        return None
    # Each part of the name looked at as it is under the real root: the file's
    # own status when none is a symlink (or ".", "..", empty), else the path
    # resolved in full.
    real = root
    found: os.stat_result | None = None
    try:
        for part in name.split("/"):
            if part in ("", ".", ".."):
                found = None
                break
            real = os.path.join(real, part)
            found = os.lstat(real)
            if stat.S_ISLNK(found.st_mode):
                found = None
                break
    except FileNotFoundError as exc:
        raise LocalFileMissing(f"local file missing: {name!r}") from exc
    if found is None:
        real = os.path.realpath(route.local.path(name))
        if os.path.commonpath([root, real]) != root:
            raise LocalFileRefused(
                f"the local file {name!r} resolves to {real!r}, outside the local "
                f"storage's root {root!r}: only regular files inside it are uploaded"
            )
        try:
            found = os.stat(real)
        except FileNotFoundError as exc:
            raise LocalFileMissing(f"local file missing: {name!r}") from exc
    if not stat.S_ISREG(found.st_mode):
        raise LocalFileRefused(
            f"the local file {name!r} is not a regular file: only regular files are "
            "uploaded"
        )
    return found


#: What a read of the local file calls in the thread that runs a transfer: the
#: lease keeper's note that the transfer makes progress.
read_progress: contextvars.ContextVar[Callable[[], None] | None] = (
    contextvars.ContextVar("queued_storage_progress", default=None)
)


class _ReadsNoted:
    """A file whose reads are noted as progress (in whichever thread the remote's
    client reads it); everything else goes to the file."""

    def __init__(self, file: File[Any], note: Callable[[], None]) -> None:
        self._file = file
        self._note = note

    def read(self, *args: Any) -> Any:
        data = self._file.read(*args)
        self._note()
        return data

    def readinto(self, buffer: Any) -> Any:
        count = self._file.readinto(buffer)
        self._note()
        return count

    def __iter__(self) -> Iterator[Any]:
        for line in self._file:
            self._note()
            yield line

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


def fence(row: PendingTransfer, before: str) -> None:
    """Raise :class:`LeaseLost` unless this worker still holds a live lease on the
    generation of ``row`` that it claimed. Called immediately before every
    destructive remote call (a delete, an overwrite; invariant 3): a worker whose
    lease ran out, or whose name was deleted or saved again, must not remove or
    replace what the ledger now gives to someone else. ``before`` says what the
    call was, for the error."""
    if not row.holds_lease():
        raise LeaseLost(
            f"the lease on {row.name!r} (generation {row.generation}) ran out or the "
            f"name changed before {before}; another worker or a newer save has it"
        )


#: The lease check of the transfer that this thread runs, for a remote storage's
#: own destructive calls (see :func:`check_lease`).
lease_check: contextvars.ContextVar[Callable[[str], None] | None] = (
    contextvars.ContextVar("queued_storage_lease_check", default=None)
)


def check_lease(before: str) -> None:
    """Raise :class:`LeaseLost` unless the worker whose transfer calls this still
    holds its lease; outside a transfer, do nothing. A remote storage calls it
    immediately before a destructive call of its own, such as removing what its
    failed upload left (invariant 3): by then another worker may have taken the
    row over and written the name."""
    check = lease_check.get()
    if check is not None:
        check(before)


def _refuse_taken_name(
    storage: Storage, name: str, max_length: int | None = None
) -> str:
    raise RemoteConflict(conflict_message(name))


_keeping_classes: dict[type, type] = {}


def _keeping_name(remote: Storage) -> FileSystemStorage:
    """``remote`` seen through a subclass of its class whose ``get_available_name``
    finds a taken name a conflict: its ``_save`` (Django's own) asks it only when
    ``O_CREAT | O_EXCL`` found the name taken. The view shares the remote's
    attributes, so that it sees what the remote sees (its cached location, a
    changed setting)."""
    cls = type(remote)
    keeping = _keeping_classes.get(cls)
    if keeping is None:
        keeping = type(
            f"KeepingName{cls.__name__}",
            (cls,),
            {"get_available_name": _refuse_taken_name, "__module__": __name__},
        )
        _keeping_classes[cls] = keeping
    view = cast(FileSystemStorage, object.__new__(keeping))
    view.__dict__ = remote.__dict__
    return view


def conflict_message(name: str) -> str:
    return (
        f"the remote already has an object at {name!r} that the ledger did not put "
        "there; move or delete it, then re-queue this transfer"
    )


class Refusal(enum.Enum):
    """How an upload is kept from overwriting a remote object the ledger does not
    know (invariant 4), or a newer version (invariant 3)."""

    #: The remote was asked first, or the object is ours to replace: the upload
    #: is an overwrite, made only after the lease is checked.
    ASKED = "asked"
    #: The upload is create-only: S3 refuses it with ``If-None-Match: *``.
    IF_NONE_MATCH = "if-none-match"
    #: The upload replaces the row's object: S3 refuses it with ``If-Match`` when
    #: the object is no longer the one seen before the lease was checked.
    IF_MATCH = "if-match"
    #: Django's ``FileSystemStorage`` as it comes: the file is created exclusively
    #: at the name, and a taken name is a conflict.
    EXCLUSIVE = "exclusive"


@dataclass
class Room:
    """How an attempt's upload is kept from overwriting what it must not."""

    refusal: Refusal
    #: The stock copy of the name is sent with S3 conditional requests: with
    #: ``If-Match: etag``, or with ``etag`` None ``If-None-Match: *``.
    conditional: bool = False
    etag: str | None = None


def make_room(
    storage: QueuedStorage,
    row: PendingTransfer,
    route: Route,
    *,
    stock: bool,
    conditional_upload: bool,
) -> Room:
    """Check that the upload may write the name, asking the remote only when the
    upload itself cannot refuse to overwrite.

    A custom hook may write the name itself, or not call the stock copy at all:
    it is asked first (and fenced) as if its upload were unconditional. The stock
    copy it calls is conditional all the same where the remote is, which closes
    the window between the check and the upload. ``stock``: the hook is the
    stock one (the base ``Transfer.transfer()``); ``conditional_upload``: what
    :func:`conditional_remote` says of the storage."""
    remote = route.remote
    exclusive = stock and route.keeping_name is not None
    if not row.was_owned and not storage.overwrite_remote:
        if stock and conditional_upload and _keeps_name(remote, row.name):
            return Room(Refusal.IF_NONE_MATCH, conditional=True)
        if exclusive:
            return Room(Refusal.EXCLUSIVE)
        if remote.exists(row.name):
            raise RemoteConflict(conflict_message(row.name))
        return Room(Refusal.ASKED, conditional=conditional_upload)
    keeps_name = _keeps_name(remote, row.name)
    if stock and conditional_upload and keeps_name:
        # Read before the lease check: an object written after it is refused.
        return Room(
            Refusal.IF_MATCH,
            conditional=True,
            etag=conditional.etag_of(remote, row.name),
        )
    deleted = False
    if not keeps_name:
        # An earlier attempt's object: ours to replace, on a remote that renames.
        # Not once our lease ran out: it may be the copy that the worker which
        # took the row over finished, and the only one left.
        delete_remote_fenced(storage, row, "deleting its earlier upload")
        deleted = True
    if exclusive:
        return Room(Refusal.EXCLUSIVE)
    if conditional_upload:
        # A custom hook's stock copy, after its lease check: what it replaces
        # must be the object seen before that check.
        etag = None if deleted else conditional.etag_of(remote, row.name)
        return Room(Refusal.ASKED, conditional=True, etag=etag)
    return Room(Refusal.ASKED)


def _keeps_name(remote: Storage, name: str) -> bool:
    """Whether ``remote`` saves ``name`` under that name. S3Storage with
    ``file_overwrite=False`` saves a taken one under another (it asks S3 first), and
    no conditional request refuses that upload: the object there is deleted first,
    or is a conflict."""
    return remote.get_available_name(name) == name


def _renames_taken_names(remote: Storage) -> bool:
    """Whether ``remote`` is Django's ``FileSystemStorage`` as it comes, which
    opens a new file with ``O_EXCL`` (and would save a taken name under another
    one): then creating the file is the existence check, without a race. A
    subclass that changes how names are chosen or files written is asked first
    instead."""
    cls = type(remote)
    return (
        isinstance(remote, FileSystemStorage)
        and getattr(remote, "_allow_overwrite", True) is False
        and cls.save is Storage.save
        and cls.path is FileSystemStorage.path
        and cls.get_available_name is FileSystemStorage.get_available_name
        and cls.is_name_available is FileSystemStorage.is_name_available
        and cls.exists is FileSystemStorage.exists
        and getattr(cls, "_save", None) is getattr(FileSystemStorage, "_save", 0)
    )


def conditional_remote(storage: QueuedStorage) -> bool:
    """Whether the remote is sent conditional requests (S3, where the service is
    known to honour them or ``create_only_uploads`` says so)."""
    if storage.create_only_uploads is False:
        return False
    if not conditional.supports_create_only(storage.remote):
        return False
    return bool(
        storage.create_only_uploads or conditional.honours_create_only(storage.remote)
    )


def delete_remote_fenced(
    storage: QueuedStorage,
    row: PendingTransfer,
    before: str = "deleting the remote copy of a deleted name",
) -> None:
    """Delete the remote object of ``row`` (a tombstone's, or an earlier attempt's
    that a remote which renames taken names would not replace), the lease checked
    just before. Where the remote refuses a conditional delete (S3's
    ``If-Match``), the object must be the one seen before the check: a worker
    paused after it, whose lease ran out meanwhile, cannot remove a newer version
    written since."""
    remote = storage.remote
    if not conditional_remote(storage):
        fence(row, before)
        remote.delete(row.name)
        return
    etag = conditional.etag_of(remote, row.name)
    fence(row, before)
    if etag is not None:
        conditional.delete_if_match(remote, row.name, etag)
