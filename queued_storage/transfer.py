"""The engine: the only code that moves bytes. Claims due rows, streams each file
from local to remote, verifies the copy and records the outcome with a
compare-and-set, so a worker that lost its lease never overwrites the ledger."""

from __future__ import annotations

import contextvars
import copy
import enum
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, cast

from django.core.exceptions import ImproperlyConfigured
from django.core.files.base import File
from django.core.files.storage import FileSystemStorage, Storage
from django.core.files.utils import validate_file_name
from django.db import connections, router, transaction
from django.db.models import Q

from queued_storage import conditional, redaction, registry
from queued_storage.checksums import remote_sha256, storage_sha256
from queued_storage.conf import settings as conf
from queued_storage.conf import usable_number
from queued_storage.models import (
    PendingTransfer,
    PendingTransferQuerySet,
    retry_when_locked,
)
from queued_storage.names import misspelling
from queued_storage.signals import file_transferred, transfer_failed
from queued_storage.tasks import Transfer

if TYPE_CHECKING:
    from queued_storage.backends import QueuedStorage

logger = logging.getLogger("queued_storage")

#: Rows claimed per round trip to the ledger. Each row's lease is renewed while
#: its own transfer runs; the others' run out, for another worker to take them.
DEFAULT_BATCH_SIZE = 200


class TransferError(Exception):
    """A transfer that did not succeed; retried unless ``retry`` is False."""

    retry = True


class LocalFileMissing(TransferError):
    pass


class LocalFileRefused(TransferError):
    # A symlink out of the local root or a special file stays what it is.
    retry = False


class MisspelledName(TransferError):
    # The row's name is what it is: retrying cannot help.
    retry = False


class RemoteRenamed(TransferError):
    # A remote that renames will rename again: retrying cannot help.
    retry = False


class SizeMismatch(TransferError):
    pass


class ChecksumMismatch(TransferError):
    pass


class LeaseLost(TransferError):
    pass


class RemoteConflict(TransferError):
    retry = False


class RemoteChanged(TransferError):
    """The object at an owned name is not the one this attempt saw: another
    attempt of the row (or a newer version) wrote it meanwhile."""


class HookContractError(TransferError):
    retry = False


class UnknownStorage(TransferError):
    pass


class TransferTimeout(TransferError):
    pass


class Outcome(enum.Enum):
    DONE = "done"
    RETRY = "retry"
    FAILED = "failed"
    PURGED = "purged"
    STALE = "stale"


#: The counts of a drain, by name.
DRAIN_COUNTS = ("done", "retried", "failed", "purged", "stale", "bytes")


@dataclass
class DrainStats:
    """What a drain did, for progress displays and the summary line."""

    done: int = 0
    retried: int = 0
    failed: int = 0
    purged: int = 0
    stale: int = 0
    bytes: int = 0
    started: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def processed(self) -> int:
        return self.done + self.retried + self.failed + self.purged + self.stale

    def counts(self) -> dict[str, int]:
        """The counts by name, as the commands' ``--json`` and the wake-ups'
        sweep tasks report them."""
        return {name: getattr(self, name) for name in DRAIN_COUNTS}

    @property
    def elapsed(self) -> float:
        return max(time.monotonic() - self.started, 1e-9)

    def count(self, outcome: Outcome, size: int) -> None:
        with self._lock:
            if outcome is Outcome.DONE:
                self.done += 1
                self.bytes += size
            elif outcome is Outcome.RETRY:
                self.retried += 1
            elif outcome is Outcome.FAILED:
                self.failed += 1
            elif outcome is Outcome.PURGED:
                self.purged += 1
            else:
                self.stale += 1


ProgressCallback = Callable[[DrainStats, PendingTransfer, Outcome], None]


def copy_to_remote(name: str, local: Storage, remote: Storage) -> None:
    """Stream ``name`` from ``local`` to ``remote`` in chunks, under the same name.

    A local storage on disk gives only a regular file inside its root. Django's
    ``FileSystemStorage`` as it comes gets the file created exclusively at that
    name, a taken name being a :class:`RemoteConflict`; a remote that saves
    under another name is reported, and nothing is deleted under the name it
    returned: what is there may be another file."""
    found = _regular_file_inside_root(name, local)
    try:
        source = local.open(name, "rb")
    except Exception as exc:
        if not local.exists(name):
            raise LocalFileMissing(f"local file missing: {name!r}") from exc
        raise
    with source:
        if found is not None:
            _same_file(name, source, found)
        source = _noting_reads(source)
        if _renames_taken_names(remote):
            _create_exclusively(remote, name, source)
            return
        saved = remote.save(name, source)
    if saved != name:
        raise RemoteRenamed(
            f"the remote saved {name!r} as {saved!r}; the remote storage must keep "
            f"the name it is given (whatever is at {saved!r} was left alone)"
        )


@dataclass(eq=False)
class _HookCall:
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


_hook_call: contextvars.ContextVar[_HookCall | None] = contextvars.ContextVar(
    "queued_storage_hook_call", default=None
)
_hook_calls_lock = threading.Lock()
#: The attempts whose hooks run in this process, by remote and name: for a hook
#: that runs the stock copy on a thread of its own (with a timeout of its own, say),
#: which does not see the context of the worker's thread.
_hook_calls: dict[tuple[int, str], list[_HookCall]] = {}


def _attempt_copying(name: str, remote: Storage) -> _HookCall | None:
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
def _calling_hook(call: _HookCall) -> Iterator[_HookCall]:
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


def _run_hook(task: Any, call: _HookCall, local: Storage) -> Any:
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


def _regular_file_inside_root(name: str, local: Storage) -> os.stat_result | None:
    """The status of the file ``name`` resolves to, if ``local`` is a
    ``FileSystemStorage`` (``path()`` of others, such as ``InMemoryStorage``, need
    not be where the file is). A symlink may point anywhere and ``path()`` does
    not resolve it: what resolves outside the root, or is not a regular file (a
    FIFO would block the read for ever), is refused."""
    if not isinstance(local, FileSystemStorage):
        return None
    real = os.path.realpath(local.path(name))
    root = os.path.realpath(local.location)
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


def _same_file(name: str, source: Any, found: os.stat_result) -> None:
    """Refuse ``source`` unless it is the file that was checked: a symlink swapped
    in between would otherwise be followed by the open."""
    try:
        opened = os.fstat(source.fileno())
    except (AttributeError, OSError, ValueError):
        return
    if (opened.st_dev, opened.st_ino) != (found.st_dev, found.st_ino):
        # Retried: the next attempt checks what is there then.
        raise TransferError(
            f"the local file {name!r} changed while it was opened for the upload"
        )


#: What a read of the local file calls in the thread that runs a transfer: the
#: lease keeper's note that the transfer makes progress.
_progress: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "queued_storage_progress", default=None
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


def _noting_reads(source: File[Any]) -> File[Any]:
    note = _progress.get()
    if note is None:
        return source
    return File(cast(IO[Any], _ReadsNoted(source, note)), name=source.name)


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
_lease_check: contextvars.ContextVar[Callable[[str], None] | None] = (
    contextvars.ContextVar("queued_storage_lease_check", default=None)
)


def check_lease(before: str) -> None:
    """Raise :class:`LeaseLost` unless the worker whose transfer calls this still
    holds its lease; outside a transfer, do nothing. A remote storage calls it
    immediately before a destructive call of its own, such as removing what its
    failed upload left (invariant 3): by then another worker may have taken the
    row over and written the name."""
    check = _lease_check.get()
    if check is not None:
        check(before)


@contextmanager
def _lease_checked(row: PendingTransfer) -> Iterator[None]:
    token = _lease_check.set(lambda before: fence(row, before))
    try:
        yield
    finally:
        _lease_check.reset(token)


class _KeepingName:
    """A ``FileSystemStorage`` seen through, whose ``_save`` finds a taken name a
    conflict instead of asking for another name."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._storage, attribute)

    def get_available_name(self, name: str, max_length: int | None = None) -> str:
        raise RemoteConflict(_conflict(name))


def _create_exclusively(remote: Storage, name: str, content: Any) -> None:
    """Write ``content`` at ``name`` with Django's own ``FileSystemStorage._save``
    (``O_CREAT | O_EXCL``, its directory and file modes), which asks
    ``get_available_name`` only when the name is taken: then it is a conflict,
    decided by the file system, and no copy is made under another name."""
    validate_file_name(name, allow_relative_path=True)
    save = FileSystemStorage._save  # type: ignore[attr-defined]
    save(cast(FileSystemStorage, _KeepingName(remote)), name, content)


def _retry_settings(task: Any) -> tuple[int, float]:
    """The hook's ``max_retries`` and ``default_retry_delay`` (None: the
    settings'); ``ImproperlyConfigured`` for a value no worker can use."""
    hook = _hook_class(task).__name__
    retries = task.max_retries
    delay = task.default_retry_delay
    if retries is None:
        retries = conf.QUEUED_STORAGE_RETRIES
    elif not usable_number(retries) or retries != int(retries):
        raise ImproperlyConfigured(
            f"{hook}.max_retries is {retries!r}; set it to a whole number of "
            "retries, or None for QUEUED_STORAGE_RETRIES."
        )
    if delay is None:
        delay = conf.QUEUED_STORAGE_RETRY_DELAY
    elif not usable_number(delay):
        raise ImproperlyConfigured(
            f"{hook}.default_retry_delay is {delay!r}; set it to a finite number of "
            "seconds, or None for QUEUED_STORAGE_RETRY_DELAY."
        )
    return int(retries), float(delay)


def _retry_limits(task: Any) -> tuple[int, float, str]:
    """:func:`_retry_settings`, and ``""``; when the hook or the settings give no
    limits a worker can use, no retry and why, to add to the attempt's error. The
    error is recorded all the same: a failure that cannot be recorded leaves its
    row to be claimed again at the end of every lease, for ever, unseen."""
    try:
        retries, delay = _retry_settings(task)
    except ImproperlyConfigured as exc:
        return 0, 0.0, f" (not retried: {exc})"
    return retries, delay, ""


def _db() -> str:
    return router.db_for_write(PendingTransfer)


def _on_commit(func: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Call ``func`` after the ledger's transaction commits; a failure is logged,
    redacted."""
    redaction.after_commit(_db(), func, *args, **kwargs)


@dataclass
class Verified:
    """A row whose remote copy is verified and not yet recorded as done."""

    row: PendingTransfer
    storage: QueuedStorage
    task: Any
    at: float = field(default_factory=time.monotonic)


def process_row(row: PendingTransfer) -> Outcome:
    """Transfer (or purge) one claimed row and record what happened."""
    try:
        result = transfer_row(row)
    except Exception as exc:
        return _record_crash(row, exc)
    if isinstance(result, Outcome):
        return result
    return complete([result])[0]


#: What a hook may raise to stop the worker, and ``except Exception`` lets through.
_STOPS = (KeyboardInterrupt, SystemExit, GeneratorExit)


def transfer_row(row: PendingTransfer) -> Outcome | Verified:
    """Transfer and verify one claimed row. A failure (or a purge) is recorded at
    once; a verified copy is returned for :func:`complete` to record."""
    try:
        storage = registry.get(row.storage_key)
    except registry.KeyConflict as conflict:
        # Either storage's hook could be the wrong one for this row: run none.
        return _fail(row, None, conflict)
    if storage is None:
        return _fail(
            row,
            None,
            UnknownStorage(
                f"no QueuedStorage with key {row.storage_key!r} in settings.STORAGES "
                "or the models this worker loaded"
            ),
        )
    wrong = misspelling(row.name)
    if wrong is not None:
        return _fail(row, storage, MisspelledName(wrong))
    if row.deleted:
        return _purge_claimed(storage, row)
    # Until the hook is built, its class stands for it: what its constructor
    # raises is an attempt's error like any other, under the class's retry limits.
    task: Any = storage.task_class
    upload: conditional.Upload | None = None
    sent = False
    try:
        task = storage.task
        room = _make_room(storage, row, task)
        if room.refusal in (Refusal.ASKED, Refusal.IF_MATCH):
            # This upload may replace an object: never once another worker may
            # have taken the row over and written a newer version.
            fence(row, "an upload that may replace the remote object")
        sent = row.upload_sent = True
        # One instance for the hook, its stock copy's conditions and the watch.
        remote = storage.remote
        call = _HookCall(row.name, remote, conditional=room.conditional, etag=room.etag)
        with (
            conditional.watch_upload(remote, row.name)
            if _stock_hook(task) and conditional.supports_create_only(remote)
            else nullcontext() as upload,
            _lease_checked(row),
        ):
            result = _run_hook(task, call, storage.local)
        if result is False:
            raise TransferError("the transfer hook returned False")
        if result is not True:
            raise HookContractError(
                f"{type(task).__name__}.transfer() returned {result!r}; it must return "
                "True (transferred) or False (retry later)"
            )
        _verify(storage, row, upload)
    except Exception as exc:
        if isinstance(exc, RemoteConflict) or conditional.refused(exc):
            return _refused(storage, row, task)
        # Once sent, an upload may have written the object even if it raised (a
        # timeout after the remote stored it): the row owns it, so the next
        # attempt replaces it instead of failing for ever over its own copy, and
        # a delete removes it. Not an upload the remote saved under another name:
        # what is at ours is not known to be its, and may be another's.
        sent = (
            sent
            and not conditional.never_sent(exc)
            and not isinstance(exc, RemoteRenamed)
        )
        return _fail(row, storage, exc, task=task, wrote=True if sent else None)
    except _STOPS as exc:
        # The worker stops as asked (a sys.exit() in a hook), its attempt recorded
        # first: left leased, the row would be claimed again at the end of every
        # lease and stop every worker that takes it, never recorded nor failed.
        try:
            _fail(row, storage, exc, task=task, wrote=True if sent else None)
        except Exception as error:
            _log_crash(row, error)
        raise
    return Verified(row, storage, task)


def _refused(storage: QueuedStorage, row: PendingTransfer, task: Any) -> Outcome:
    """The remote refused the upload (a conditional request, an exclusive create)
    or already has an object at the name."""
    if (
        row.was_owned
        or storage.overwrite_remote
        or PendingTransfer.objects.filter(pk=row.pk, remote_owned=True).exists()
    ):
        # The row's own object changed since this attempt looked (a late attempt
        # of the row wrote it, or a newer version did): look again next time.
        error: TransferError = RemoteChanged(
            f"the remote object at {row.name!r} changed during this attempt; retried"
        )
        return _fail(row, storage, error, task=task)
    return _fail(
        row, storage, RemoteConflict(_conflict(row.name)), task=task, wrote=False
    )


def complete(batch: list[Verified]) -> list[Outcome]:
    """Record verified transfers as done: one compare-and-set UPDATE and one commit
    for the whole batch when every row still holds its lease and generation;
    otherwise row by row, so that a stale row loses alone. ``file_transferred``
    (and a ``TransferAndDelete`` local delete) follows each row's commit."""
    if len(batch) > 1 and _complete_together(batch):
        return [Outcome.DONE] * len(batch)
    return [_complete_one(item) for item in batch]


@retry_when_locked
def _complete_together(batch: list[Verified]) -> bool:
    db = _db()
    with transaction.atomic(using=db):
        won = PendingTransfer.objects.using(db).mark_done_together(
            [item.row for item in batch]
        )
        if won != len(batch):
            transaction.set_rollback(True, using=db)
            return False
        for item in batch:
            _log_done(item.row)
        _on_commit(_after_all_done, batch)
    return True


def _complete_one(item: Verified) -> Outcome:
    if not item.row.mark_done():
        outcome = _reconcile(item.storage, item.row, wrote=True)
        _send_newer_again(item.storage, item.row)
        return outcome
    _done(item)
    return Outcome.DONE


def _send_newer_again(storage: QueuedStorage, row: PendingTransfer) -> None:
    """A late upload of ``row``'s version was written and verified at the name
    after a newer version of it was recorded as done: on a remote without
    conditional writes it replaced that version's object. The newer version is
    queued again while its local copy is there, and otherwise its row says so."""
    newer = (
        PendingTransfer.objects.for_name(row.storage_key, row.name)
        .filter(status=PendingTransfer.Status.DONE, deleted=False)
        .exclude(generation=row.generation)
        .first()
    )
    if newer is None:
        return
    error = RemoteChanged(
        f"a late upload of an older version of {row.name!r} may have replaced its "
        "remote copy"
    )
    logger.warning(
        "late upload replaced a newer version key=%s name=%s generation=%s",
        row.storage_key,
        row.name,
        newer.generation,
    )
    if storage.local.exists(row.name):
        newer.requeue_unverified(error)
    else:
        newer.keep_error(error, status=PendingTransfer.Status.DONE)


def _done(item: Verified) -> None:
    _log_done(item.row)
    _on_commit(_after_done, item.storage, item.row, item.task)


def _after_all_done(batch: list[Verified]) -> None:
    """:func:`_after_done` for each row of a batch, one failure not stopping the
    others."""
    for item in batch:
        try:
            _after_done(item.storage, item.row, item.task)
        except Exception as exc:
            logger.error(
                "after-transfer work failed key=%s name=%s error=%s: %s",
                item.row.storage_key,
                item.row.name,
                type(exc).__name__,
                item.storage.redact(str(exc)),
            )


def _log_done(row: PendingTransfer) -> None:
    logger.info(
        "transfer done key=%s name=%s generation=%s bytes=%s attempt=%s",
        row.storage_key,
        row.name,
        row.generation,
        row.size or 0,
        row.attempts,
    )


def _conflict(name: str) -> str:
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


def _make_room(storage: QueuedStorage, row: PendingTransfer, task: Any) -> Room:
    """Check that the upload may write the name, asking the remote only when the
    upload itself cannot refuse to overwrite.

    A custom hook may write the name itself, or not call the stock copy at all:
    it is asked first (and fenced) as if its upload were unconditional. The stock
    copy it calls is conditional all the same where the remote is, which closes
    the window between the check and the upload."""
    remote = storage.remote
    stock = _stock_hook(task)
    exclusive = stock and _renames_taken_names(remote)
    conditional_remote = _conditional_remote(storage)
    if not row.was_owned and not storage.overwrite_remote:
        if stock and conditional_remote and _keeps_name(remote, row.name):
            return Room(Refusal.IF_NONE_MATCH, conditional=True)
        if exclusive:
            return Room(Refusal.EXCLUSIVE)
        if remote.exists(row.name):
            raise RemoteConflict(_conflict(row.name))
        return Room(Refusal.ASKED, conditional=conditional_remote)
    keeps_name = _keeps_name(remote, row.name)
    if stock and conditional_remote and keeps_name:
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
        _delete_remote_fenced(storage, row, "deleting its earlier upload")
        deleted = True
    if exclusive:
        return Room(Refusal.EXCLUSIVE)
    if conditional_remote:
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


def _stock_hook(task: Any) -> bool:
    # A custom hook may write other objects, or elsewhere, or the name itself:
    # it is asked first even if it calls the stock copy (which keeps its
    # conditions, see stock_copy()).
    return type(task).transfer is Transfer.transfer


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


def _conditional_remote(storage: QueuedStorage) -> bool:
    """Whether the remote is sent conditional requests (S3, where the service is
    known to honour them or ``create_only_uploads`` says so)."""
    if storage.create_only_uploads is False:
        return False
    if not conditional.supports_create_only(storage.remote):
        return False
    return bool(
        storage.create_only_uploads or conditional.honours_create_only(storage.remote)
    )


def _verify(
    storage: QueuedStorage,
    row: PendingTransfer,
    upload: conditional.Upload | None = None,
) -> None:
    """Check the remote copy (invariant 4): its size, and its SHA-256 with
    ``verify_checksum``. An S3 upload that S3 validated against a CRC32 and
    returned it is checked by comparing that with the local file's, without a
    request."""
    expected = row.size if row.size is not None else storage.local.size(row.name)
    compared = upload.compare(storage.local, row.name) if upload else None
    if compared is not None:
        same, size = compared
        if not same:
            raise ChecksumMismatch(
                f"checksum mismatch: S3 stored {row.name!r} with another CRC32 "
                "than the local file's"
            )
        if size != expected:
            raise SizeMismatch(
                f"the remote copy and the local file of {row.name!r} have {size} "
                f"bytes, the ledger recorded {expected}"
            )
        if not storage.verify_checksum:
            return
    actual = storage.remote.size(row.name)
    if actual != expected:
        raise SizeMismatch(
            f"the remote copy of {row.name!r} has {actual} bytes, "
            f"{_local_size_text(storage, row)}"
        )
    if storage.verify_checksum:
        local_sum = row.checksum or storage_sha256(storage.local, row.name)
        remote_sum = remote_sha256(storage.remote, row.name)
        if remote_sum != local_sum:
            raise ChecksumMismatch(
                f"checksum mismatch: the remote copy of {row.name!r} has SHA-256 "
                f"{remote_sum}, the local file {local_sum}"
            )


def _local_size_text(storage: QueuedStorage, row: PendingTransfer) -> str:
    """What the local file really has, and what the ledger recorded if that
    differs: the two disagree when the file changed after its save."""
    try:
        size: int | None = storage.local.size(row.name)
    except Exception:
        size = None
    text = "the local file is gone" if size is None else f"the local file {size}"
    if row.size is not None and row.size != size:
        text += f" (the ledger recorded {row.size})"
    return text


def _after_done(storage: QueuedStorage, row: PendingTransfer, task: Any) -> None:
    """``file_transferred`` and the local delete of ``TransferAndDelete``, after the
    ``DONE`` commit. What they raise is kept on the row, which stays done: the
    remote copy is verified and recorded, and no retry of the upload would make a
    receiver or the local storage behave."""
    sent = file_transferred.send_robust(
        sender=type(task),
        name=row.name,
        local=storage.local,
        remote=storage.remote,
        storage=storage,
        key=row.storage_key,
    )
    errors = [error for _receiver, error in sent if isinstance(error, Exception)]
    try:
        if task.delete_local:
            delete_local_copy(storage, row.name, row.while_done())
    except Exception as exc:
        errors.append(exc)
    for error in errors:
        _keep_late_error(storage, row, error, PendingTransfer.Status.DONE)


@retry_when_locked
def delete_local_copy(
    storage: QueuedStorage, name: str, still: PendingTransferQuerySet
) -> bool:
    """Delete the local copy of ``name`` if its ledger row is still as ``still``
    selects it (``row.while_done()``, ``row.while_claimed()``, ...); returns
    whether it did.

    The row stays locked from the check to the delete, and a save of a name that
    has a row takes that lock before it writes the local file: a re-save lands
    either before the check, which then fails, or after the delete. A check
    without the lock would delete the re-saved file of a local storage that
    overwrites names (invariant 5)."""
    db = _db()
    with transaction.atomic(using=db):
        if not still.using(db).lock():
            return False
        storage.local.delete(name)
    return True


def _send_failed(
    storage: QueuedStorage | None, row: PendingTransfer, task: Any
) -> None:
    """``transfer_failed``, after the ``FAILED`` commit; what a receiver raises is
    kept on the row beside the transfer's own error."""
    sent = transfer_failed.send_robust(
        sender=_hook_class(task),
        name=row.name,
        error=row.last_error,
        storage=storage,
        key=row.storage_key,
        attempts=row.attempts,
    )
    for _receiver, error in sent:
        if isinstance(error, Exception):
            _keep_late_error(storage, row, error, PendingTransfer.Status.FAILED)


def _keep_late_error(
    storage: QueuedStorage | None,
    row: PendingTransfer,
    error: Exception,
    status: str,
) -> None:
    message = storage.redact(str(error)) if storage is not None else str(error)
    logger.error(
        "after-transfer work failed key=%s name=%s status=%s error=%s: %s",
        row.storage_key,
        row.name,
        status,
        type(error).__name__,
        message,
    )
    try:
        row.keep_error(error, status=status, message=message)
    except Exception as exc:
        logger.error(
            "could not keep the error on the row key=%s name=%s error=%s",
            row.storage_key,
            row.name,
            type(exc).__name__,
        )


def _hook_class(task: Any) -> type:
    return task if isinstance(task, type) else type(task)


def _record_crash(row: PendingTransfer, exc: Exception) -> Outcome:
    """An error that no step of the transfer recorded (a bug, the storage's
    registry, the ledger itself): log it, and keep it on the row as an attempt if
    the claim still stands, so that the row is retried and runs out of attempts
    like any other instead of waiting for its lease, claimed again and again."""
    _log_crash(row, exc)
    try:
        storage = registry.get(row.storage_key)
    except Exception:
        storage = None
    try:
        task = storage.task_class if storage is not None else _NoTask
        retries, delay, not_retried = _retry_limits(task)
        message = storage.redact(str(exc)) if storage is not None else str(exc)
        status = row.mark_failure(
            exc,
            message=message + not_retried,
            retry=not not_retried,
            max_retries=retries,
            base_delay=delay,
            # Past the upload (its DONE record failed, say), what it wrote is the
            # row's: the retry replaces it rather than fail over it as foreign.
            owned=True if row.upload_sent else None,
        )
    except Exception as error:
        logger.error(
            "could not record a crash key=%s name=%s error=%s",
            row.storage_key,
            row.name,
            type(error).__name__,
        )
        return Outcome.STALE
    if status == PendingTransfer.Status.FAILED:
        _on_commit(_send_failed, storage, row, task)
        return Outcome.FAILED
    return Outcome.STALE if status is None else Outcome.RETRY


def _fail(
    row: PendingTransfer,
    storage: QueuedStorage | None,
    error: BaseException,
    task: Any = None,
    wrote: bool | None = None,
) -> Outcome:
    """Record ``error`` as the attempt's; ``wrote`` as for ``mark_failure(owned=)``."""
    if task is None:
        task = storage.task_class if storage is not None else _NoTask
    retries, delay, not_retried = _retry_limits(task)
    retry = getattr(error, "retry", True) and not not_retried
    message = storage.redact(str(error)) if storage is not None else str(error)
    status = row.mark_failure(
        error,
        message=message + not_retried,
        retry=retry,
        max_retries=retries,
        base_delay=delay,
        owned=wrote,
    )
    if status is None:
        return _reconcile(storage, row, wrote=bool(wrote)) if storage else Outcome.STALE
    logger.warning(
        "transfer error key=%s name=%s attempt=%s status=%s error=%s",
        row.storage_key,
        row.name,
        row.attempts,
        status,
        row.last_error,
    )
    if status == PendingTransfer.Status.FAILED:
        _on_commit(_send_failed, storage, row, task)
        return Outcome.FAILED
    return Outcome.RETRY


class _NoTask:
    max_retries = None
    default_retry_delay = None


def _reconcile(
    storage: QueuedStorage | None, row: PendingTransfer, *, wrote: bool = False
) -> Outcome:
    """Our lease or generation went stale while we worked: leave the ledger to
    whoever changed it. A worker without a live lease deletes nothing: what its
    upload (``wrote``) may have left at the name is marked as the ledger's, for a
    worker that holds the name's lease to replace or remove."""
    logger.info(
        "transfer stale key=%s name=%s generation=%s",
        row.storage_key,
        row.name,
        row.generation,
    )
    if storage is None:
        return Outcome.STALE
    if wrote:
        # The ledger put the object there, whichever row holds the name now;
        # unmarked, that row would fail with a conflict over it.
        PendingTransfer.objects.for_name(row.storage_key, row.name).update(
            remote_owned=True
        )
    current = PendingTransfer.objects.filter(pk=row.pk).first()
    if current is None:
        if wrote and not PendingTransfer.objects.leave_tombstone(
            row.storage_key, row.name, row.host
        ):
            # Saved again just now: the new row owns what we left.
            PendingTransfer.objects.for_name(row.storage_key, row.name).update(
                remote_owned=True
            )
        return Outcome.STALE
    if current.deleted:
        if (
            current.lease_token == row.lease_token
            and current.generation != row.generation
            and current.has_live_lease()
        ):
            # Deleted while we held the lease: the purge is ours to finish (the
            # purge after delete() found our lease and left it to us).
            current.claimed_from = row.claimed_from
            current.was_owned = current.remote_owned or wrote
            return _purge_claimed(storage, current)
        # Whoever holds the tombstone now purges it, or the next worker to claim it.
        return Outcome.STALE
    if current.lease_token == row.lease_token:
        current.release(held=storage.delayed)
    return Outcome.STALE


def _purge_claimed(storage: QueuedStorage, row: PendingTransfer) -> Outcome:
    """Remove the files of a tombstone this worker holds a lease on, each removal
    checked against the lease and generation just before it, then the tombstone
    with a compare-and-set. A save of the name meanwhile keeps the lease and
    bumps the generation: the checks fail, and the row goes back to the new
    version."""
    try:
        if not delete_local_copy(
            storage, row.name, row.while_claimed().filter(deleted=True)
        ):
            return _reconcile(storage, row)
        unconditional = row.was_owned and not _conditional_remote(storage)
        if row.was_owned:
            _delete_remote_fenced(storage, row)
    except LeaseLost:
        return _reconcile(storage, row)
    except Exception as exc:
        if conditional.refused(exc):
            exc = RemoteChanged(
                f"the remote object at {row.name!r} changed since the purge looked; "
                "retried"
            )
        return _fail(row, storage, exc)
    if row.delete_tombstone():
        logger.info("purged key=%s name=%s", row.storage_key, row.name)
        return Outcome.PURGED
    if unconditional:
        _requeue_overtaken(storage, row)
    return _reconcile(storage, row)


def _requeue_overtaken(storage: QueuedStorage, row: PendingTransfer) -> None:
    """The purge of ``row`` lost its lease after its check, and its unconditional
    remote delete may have removed the copy of a version saved and transferred
    meanwhile (the window a remote without conditional deletes leaves): if that
    version is done and its remote copy is gone, it is queued again, to be
    uploaded from its local copy."""
    current = (
        PendingTransfer.objects.filter(
            pk=row.pk, status=PendingTransfer.Status.DONE, deleted=False
        )
        .exclude(generation=row.generation)
        .first()
    )
    if current is None or storage.remote.exists(current.name):
        return
    logger.warning(
        "remote copy removed by a late purge key=%s name=%s; queued again",
        row.storage_key,
        row.name,
    )
    current.requeue_unverified(
        RemoteChanged(
            f"the remote copy of {row.name!r} was removed by the cleanup of an "
            "earlier deleted version whose lease ran out; uploaded again"
        )
    )


def _delete_remote_fenced(
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
    if not _conditional_remote(storage):
        fence(row, before)
        remote.delete(row.name)
        return
    etag = conditional.etag_of(remote, row.name)
    fence(row, before)
    if etag is not None:
        conditional.delete_if_match(remote, row.name, etag)


def purge(storage: QueuedStorage, pk: int, generation: int) -> None:
    """Remove the files of a name deleted in a committed transaction.

    The purge claims the tombstone as a worker would, and fences each removal
    like a worker's (invariant 3), so a save of the name since the delete keeps
    its files; a worker holding the row's lease removes the remote copy itself. A
    purge that fails here is recorded on the tombstone, due for a worker to
    retry."""
    # A local copy on another host: that host's worker purges the row.
    host = None if storage.local_shared else conf.QUEUED_STORAGE_HOSTNAME
    row = PendingTransfer.objects.claim_tombstone(
        pk, generation, lease=conf.QUEUED_STORAGE_LEASE, host=host
    )
    if row is not None:
        if _purge_claimed(storage, row) is Outcome.RETRY:
            # Failed here, the purge is a worker's at once, as if it had never run.
            row.retry_now()
        return
    tombstone = PendingTransfer.objects.filter(
        pk=pk, generation=generation, deleted=True
    ).first()
    if tombstone is not None and host in (None, tombstone.host):
        # A worker holds the row: the remote copy is its to remove. The local copy
        # is the deleted version's and goes now, so that the name is free at once.
        delete_local_copy(storage, tombstone.name, tombstone.while_deleted())


class _Attempt:
    """One row's transfer in flight, as its lease keeper sees it."""

    def __init__(self, row: PendingTransfer, renewed_at: float) -> None:
        self.row = row
        self.thread = threading.current_thread()
        self.renewed_at = renewed_at
        self.progress_at = time.monotonic()
        #: The transfer returned (verified, its row waits to be recorded as done,
        #: or recorded): no more progress to make, its lease still needed.
        self.returned = False
        #: Given up on for making no progress: its lease is no longer renewed, and
        #: whatever the transfer does when it returns is a late worker's.
        self.abandoned = False

    def note_progress(self) -> None:
        self.progress_at = time.monotonic()


class LeaseKeeper(threading.Thread):
    """Renews the leases of the rows of one claim whose transfers run, each only
    while it runs, and abandons a transfer that makes no progress for
    ``timeout`` seconds (``on_abandon`` is called with it, in this thread).

    Rows of the claim not started yet are not renewed: their leases run out, and
    another worker may take them; a row started late checks its claim first."""

    def __init__(
        self,
        token: str,
        lease: float,
        timeout: float | None = None,
        on_abandon: Callable[[_Attempt], object] | None = None,
    ) -> None:
        super().__init__(name=f"queued-storage-lease-{token[:8]}", daemon=True)
        self.token = token
        self.lease = lease
        self.timeout = (
            conf.QUEUED_STORAGE_TRANSFER_TIMEOUT if timeout is None else timeout
        )
        self.on_abandon = on_abandon or _abandon
        #: A row's lease is renewed this often while its transfer runs: by a third
        #: of the lease, and often enough that a running row never looks stuck
        #: (its ``updated_at`` older than the timeout).
        self.period = min(self.lease, self.timeout) / 3
        #: When the claim took its rows (they were claimed just before this keeper
        #: was made), on the clock the renewals are timed with.
        self.claimed_at = time.monotonic()
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.attempts: dict[int, _Attempt] = {}
        #: Made in a transaction still open in the claiming thread (a drain or an
        #: admin "transfer now" in the caller's transaction): nobody else sees the
        #: rows until it commits, and this thread's own connection could only wait
        #: for its row locks while the caller, at the end, waits for this thread.
        self.uncommitted = connections[_db()].in_atomic_block

    @contextmanager
    def attempt(self, row: PendingTransfer) -> Iterator[_Attempt | None]:
        """Track the transfer of ``row`` in this thread; None if the claim on it
        no longer stands (its lease ran out before it was started, and another
        worker took it or a save changed it)."""
        started = self.start_attempt(row)
        if started is None:
            yield None
            return
        noted = _progress.set(started.note_progress)
        try:
            yield started
        finally:
            _progress.reset(noted)

    def start_attempt(self, row: PendingTransfer) -> _Attempt | None:
        now = time.monotonic()
        claimed_at = self.claimed_at
        if now - claimed_at >= self.period:
            # Started late: only a renewal that still finds our claim says the row
            # is ours. Early in the lease nobody else can have taken it.
            if not PendingTransfer.objects.renew_lease(
                self.token, self.lease, pks=[row.pk]
            ):
                return None
            claimed_at = now
        attempt = _Attempt(row, claimed_at)
        with self.lock:
            self.attempts[row.pk] = attempt
        return attempt

    def returned(self, attempt: _Attempt) -> bool:
        """Note that the transfer of ``attempt`` returned; False if it had been
        abandoned by then, and what it did is a late worker's."""
        with self.lock:
            if attempt.abandoned:
                return False
            attempt.returned = True
            return True

    def finish(self, row: PendingTransfer) -> _Attempt | None:
        """Stop tracking ``row``; returns its attempt (None if it was never
        tracked, or abandoned)."""
        with self.lock:
            return self.attempts.pop(row.pk, None)

    def run(self) -> None:
        if self.uncommitted:
            return  # nothing to renew, and a hung transfer keeps its caller anyway
        try:
            while not self.stopped.wait(self.period / 2):
                self._tick()
        finally:
            connections.close_all()

    def _tick(self) -> None:
        now = time.monotonic()
        with self.lock:
            hung = [
                attempt
                for attempt in self.attempts.values()
                if not attempt.returned and now - attempt.progress_at >= self.timeout
            ]
            for attempt in hung:
                attempt.abandoned = True
                del self.attempts[attempt.row.pk]
            due = any(
                now - attempt.renewed_at >= self.period
                for attempt in self.attempts.values()
            )
            renew = list(self.attempts.values()) if due else []
        if renew:
            try:
                PendingTransfer.objects.renew_lease(
                    self.token, self.lease, pks=[attempt.row.pk for attempt in renew]
                )
            except Exception as exc:
                # Keep renewing: one failed renewal must not cost the lease of a
                # transfer that is still running. A fresh connection next time.
                logger.warning(
                    "lease renewal failed token=%s error=%s: %s",
                    self.token,
                    type(exc).__name__,
                    exc,
                )
                connections.close_all()
            else:
                for attempt in renew:
                    attempt.renewed_at = now
        for attempt in hung:
            try:
                self.on_abandon(attempt)
            except Exception as exc:
                _log_crash(attempt.row, exc)

    def __enter__(self) -> LeaseKeeper:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopped.set()
        self.join()


def _abandon(attempt: _Attempt) -> Outcome:
    """Record a transfer that made no progress for the timeout as a failed
    attempt, to be retried: a compare-and-set like any other, on a copy of the row,
    since the hung transfer still holds the original and must lose with it."""
    row = copy.copy(attempt.row)
    timeout = conf.QUEUED_STORAGE_TRANSFER_TIMEOUT
    logger.warning(
        "transfer abandoned key=%s name=%s generation=%s timeout=%s",
        row.storage_key,
        row.name,
        row.generation,
        timeout,
    )
    try:
        storage = registry.get(row.storage_key)
    except Exception:
        storage = None
    task = storage.task_class if storage is not None else _NoTask
    retries, delay, not_retried = _retry_limits(task)
    error = TransferTimeout(
        f"the transfer of {row.name!r} made no progress for {timeout:g} s "
        "(QUEUED_STORAGE_TRANSFER_TIMEOUT) and was abandoned"
    )
    status = row.mark_failure(
        error,
        message=str(error) + not_retried,
        retry=not not_retried,
        max_retries=retries,
        base_delay=delay,
        # A hung upload may have written part of the object, and may still write:
        # the next attempt replaces it rather than fail over it as foreign.
        owned=True if row.upload_sent else None,
    )
    if status is None:
        return Outcome.STALE
    if status == PendingTransfer.Status.FAILED:
        _on_commit(_send_failed, storage, row, task)
        return Outcome.FAILED
    return Outcome.RETRY


#: How often (seconds) a drain that may be stopped looks whether it was.
STOP_POLL = 0.2


#: A verified transfer waits at most this long (seconds) to be recorded as done
#: together with others; a claimed batch ends with whatever is waiting. What
#: waits when a worker is killed is uploaded again: a second here (fewer commits,
#: a faster drain to a fast remote) made the chaos test's duplicates 25 for 12
#: kills instead of 6 to 13.
COMPLETE_AFTER = 0.05


def _log_crash(row: PendingTransfer, exc: BaseException) -> None:
    # A bug or a dead database: never kill the loop over one row. No traceback:
    # its frames could show a storage's credentials.
    try:
        storage = registry.get(row.storage_key)
    except Exception:
        storage = None
    logger.error(
        "transfer crashed key=%s name=%s error=%s: %s",
        row.storage_key,
        row.name,
        type(exc).__name__,
        storage.redact(str(exc)) if storage is not None else "",
    )


class _Completions:
    """Verified transfers waiting to be recorded as done together (one UPDATE and
    one commit for many rows, where a commit per file would bound the rate)."""

    def __init__(self, report: Callable[[PendingTransfer, Outcome], None]) -> None:
        self.report = report
        self.lock = threading.Lock()
        self.waiting: list[Verified] = []

    def add(self, item: Verified) -> None:
        with self.lock:
            self.waiting.append(item)
            due = time.monotonic() - self.waiting[0].at >= COMPLETE_AFTER
        if due:
            self.flush()

    def flush(self) -> None:
        with self.lock:
            batch, self.waiting = self.waiting, []
        if not batch:
            return
        try:
            outcomes = complete(batch)
        except Exception as exc:
            outcomes = [_record_crash(item.row, exc) for item in batch]
        for item, outcome in zip(batch, outcomes, strict=True):
            self.report(item.row, outcome)


class _Batch:
    """The rows of one claim as a drain works through them: its lease keeper, its
    completions waiting to be recorded together."""

    def __init__(self, drain: _Drain, rows: list[PendingTransfer]) -> None:
        self.drain = drain
        self.rows = iter(rows)
        #: Rows taken and neither reported nor abandoned.
        self.in_flight = 0
        self.completions = _Completions(self.report)
        self.keeper = LeaseKeeper(
            rows[0].lease_token, drain.lease, on_abandon=self.abandon
        )
        self.keeper.start()

    def report(self, row: PendingTransfer, outcome: Outcome) -> None:
        self.keeper.finish(row)
        self.drain.count(row, outcome, row.size or 0)

    def abandon(self, attempt: _Attempt) -> None:
        self.drain.count(attempt.row, _abandon(attempt), 0)
        self.drain.abandon(attempt.thread, attempt.row, self)

    def handle(self, row: PendingTransfer) -> None:
        should_stop = self.drain.should_stop
        if should_stop is not None and should_stop():
            # Given back at once with the rest of the claim, not when the batch
            # ends: the transfers still in hand may take long.
            with self.drain.changed:
                rest = list(self.rows)
            self.drain._hand_back([row, *rest])
            return
        with self.keeper.attempt(row) as attempt:
            if attempt is None:
                self.report(row, Outcome.STALE)
                return
            try:
                result = transfer_row(row)
            except Exception as exc:
                result = _record_crash(row, exc)
        if not self.keeper.returned(attempt):
            _late(row, result)
        elif isinstance(result, Verified):
            self.completions.add(result)
        else:
            self.report(row, result)

    def finish(self) -> None:
        try:
            self.completions.flush()
        finally:
            self.keeper.stopped.set()
            self.keeper.join()


class _Drain:
    """Claims batch after batch and transfers their rows on ``size`` threads (the
    lanes) that live as long as the drain, so that each keeps its connections (the
    database's, and a remote's such as S3's, which are per thread). The lane that
    finds a batch done records it and claims the next, so that a sequential drain
    hands nothing between threads. A lane whose transfer hangs is left behind and
    replaced, so that the drain moves on."""

    def __init__(
        self,
        claim: Callable[[], list[PendingTransfer]],
        *,
        size: int,
        lease: float,
        stats: DrainStats,
        progress: ProgressCallback | None,
        should_stop: Callable[[], bool] | None,
    ) -> None:
        self.claim = claim
        self.size = size
        self.lease = lease
        self.stats = stats
        self.progress = progress
        self.should_stop = should_stop
        self.changed = threading.Condition()
        self.batch: _Batch | None = None
        self.claiming = False
        self.finished = False
        self.error: BaseException | None = None
        self.lanes: list[threading.Thread] = []
        #: The row each lane works on.
        self.current: dict[threading.Thread, PendingTransfer] = {}
        #: Lanes whose transfer was abandoned and that were replaced: each holds a
        #: thread and a database connection until its transfer returns, if ever.
        self.left_behind: list[threading.Thread] = []
        #: Lanes whose transfer was abandoned when ``size`` lanes were left behind
        #: already: not replaced, until one of those returns.
        self.held: dict[threading.Thread, _Batch] = {}
        self.started = 0
        self.inline = False

    def run(self) -> None:
        if connections[_db()].in_atomic_block:
            # The claims are not committed: only this connection sees the rows,
            # and a hung upload keeps this drain until it returns.
            self.inline = True
            self.lanes.append(threading.current_thread())
            self._lane()
        else:
            with self.changed:
                self._add_lanes(self.size)
            while True:
                with self.changed:
                    if self.finished:
                        lanes = list(self.lanes)
                        break
                    self.changed.wait(None if self.should_stop is None else STOP_POLL)
                    rest = self._unstarted_after_stop()
                if rest:
                    self._hand_back(rest)
            for lane in lanes:
                lane.join()
        if self.error is not None:
            raise self.error

    def _unstarted_after_stop(self) -> list[PendingTransfer]:
        """Once asked to stop, the rows of the claim that no lane has taken: given
        back now, not when the transfers in hand end (every lane may be busy with
        a long upload, and a supervisor kills a worker that takes long to stop,
        which would leave them leased for the rest of their lease)."""
        if self.batch is None or self.should_stop is None or not self.should_stop():
            return []
        return list(self.batch.rows)

    @staticmethod
    def _hand_back(rows: list[PendingTransfer]) -> None:
        try:
            PendingTransfer.objects.release_claim(rows)
        except Exception as exc:
            # Left to their leases, as if the worker had been killed.
            logger.warning(
                "could not hand back %s unstarted row(s) error=%s",
                len(rows),
                type(exc).__name__,
            )

    def count(self, row: PendingTransfer, outcome: Outcome, size: int) -> None:
        self.stats.count(outcome, size)
        if self.progress is not None:
            self.progress(self.stats, row, outcome)

    def _add_lanes(self, size: int) -> None:
        while len(self.lanes) < size:
            lane = threading.Thread(
                target=self._run_lane,
                name=f"queued-storage-worker-{self.started}",
                daemon=True,
            )
            self.started += 1
            self.lanes.append(lane)
            lane.start()

    def _run_lane(self) -> None:
        try:
            self._lane()
        except BaseException as exc:
            with self.changed:
                self.error = self.error or exc
                self.finished = True
                self.changed.notify_all()
        finally:
            connections.close_all()

    def _lane(self) -> None:
        me = threading.current_thread()
        while True:
            taken = self._take(me)
            if taken is None:
                return
            batch, row = taken
            try:
                batch.handle(row)
            except Exception as exc:
                # The ledger failed around the transfer (its claim check, a
                # record): the row's lease runs out, and it is retried.
                _log_crash(row, exc)
            finally:
                with self.changed:
                    self.current.pop(me, None)
                    self.held.pop(me, None)
                    left_behind = me not in self.lanes
                    if left_behind:
                        self.left_behind.remove(me)
                        if self.held:
                            # A place is free: a lane held on a hung transfer is
                            # left behind in its turn, and replaced.
                            held = next(iter(self.held))
                            self._leave_behind(held, self.held.pop(held))
                    else:
                        batch.in_flight -= 1
                        if not batch.in_flight:
                            self.changed.notify_all()
            if left_behind:
                return

    def _take(self, me: threading.Thread) -> tuple[_Batch, PendingTransfer] | None:
        """The next row for lane ``me``; None when the drain is over (or ``me``
        was left behind). The lane that finds the batch done moves to the next."""
        while True:
            flushing: _Batch | None = None
            with self.changed:
                while True:
                    if self.finished or me not in self.lanes:
                        return None
                    batch = self.batch
                    if batch is not None:
                        row = next(batch.rows, None)
                        if row is not None:
                            batch.in_flight += 1
                            self.current[me] = row
                            return batch, row
                    if not self.claiming and (batch is None or not batch.in_flight):
                        self.claiming = True
                        break
                    if batch is not None and batch.completions.waiting:
                        # Nothing left to start: record what waits now, rather than
                        # when the transfers still in hand end (a hung one holds
                        # the batch for the transfer timeout).
                        flushing = batch
                        break
                    self.changed.wait()
            if flushing is not None:
                flushing.completions.flush()
                continue
            rows: list[PendingTransfer] = []
            try:
                if batch is not None:
                    batch.finish()
                rows = self.claim()
            except BaseException as exc:
                self.error = exc
            with self.changed:
                self.claiming = False
                self.batch = _Batch(self, rows) if rows else None
                if self.batch is None:
                    self.finished = True
                self.changed.notify_all()

    def abandon(
        self, thread: threading.Thread, row: PendingTransfer, batch: _Batch
    ) -> None:
        """Stop waiting for ``row`` on lane ``thread`` and start a lane in its
        place; ``thread`` ends when the transfer returns, if ever."""
        with self.changed:
            if (
                self.inline
                or self.current.get(thread) is not row
                or thread not in self.lanes
            ):
                return  # it returned meanwhile, and was counted
            if len(self.left_behind) >= self.size:
                # A remote where every upload hangs would otherwise cost a thread
                # and a database connection per file until the database refuses
                # connections: the drain waits for this transfer instead.
                logger.warning(
                    "transfer abandoned and its thread kept: %s thread(s) wait on "
                    "hung transfers already key=%s name=%s",
                    len(self.left_behind),
                    row.storage_key,
                    row.name,
                )
                self.held[thread] = batch
                return
            self._leave_behind(thread, batch)

    def _leave_behind(self, thread: threading.Thread, batch: _Batch) -> None:
        """Stop waiting for the transfer on lane ``thread``, which ends when that
        returns, and start a lane in its place (with ``changed`` held)."""
        self.lanes.remove(thread)
        del self.current[thread]
        batch.in_flight -= 1
        self.left_behind.append(thread)
        self._add_lanes(len(self.lanes) + 1)
        self.changed.notify_all()


def _late(row: PendingTransfer, result: Outcome | Verified) -> None:
    """A transfer that returned after it was abandoned: what it verified loses its
    compare-and-set (the timeout took the lease), alone, outside the batch."""
    if isinstance(result, Verified):
        try:
            result = complete([result])[0]
        except Exception as exc:
            _log_crash(row, exc)
            return
    logger.info(
        "abandoned transfer returned key=%s name=%s outcome=%s",
        row.storage_key,
        row.name,
        result.value,
    )


def _claimable(rows: PendingTransferQuerySet) -> PendingTransferQuerySet:
    """Leave out rows whose local copy lives on another host (storages built with
    ``local_shared=False``)."""
    host_local = [key for key in registry.known_keys() if not _shared_local(key)]
    if not host_local:
        return rows
    return rows.exclude(
        Q(storage_key__in=host_local) & ~Q(host=conf.QUEUED_STORAGE_HOSTNAME)
    )


def _shared_local(key: str) -> bool:
    try:
        storage = registry.get(key)
    except registry.KeyConflict:
        return True  # any worker fails its rows with the conflict, running no hook
    return storage is None or storage.local_shared


def drain(
    *,
    keys: Iterable[str] | None = None,
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    concurrency: int = 1,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> DrainStats:
    """Claim and process due rows until none is due (or ``limit`` rows are done).

    A row retried with no delay is due again at once, so it is retried in the same
    drain, up to its attempt limit."""
    stats = DrainStats()
    rows_qs = _claimable(PendingTransfer.objects.all())
    if keys:
        rows_qs = rows_qs.filter(storage_key__in=list(keys))
    lease = conf.QUEUED_STORAGE_LEASE

    def claim() -> list[PendingTransfer]:
        if should_stop and should_stop():
            return []
        want = batch_size if limit is None else min(batch_size, limit - stats.processed)
        if want <= 0:
            return []
        return rows_qs.claim_due(limit=want, lease=lease)

    _Drain(
        claim,
        size=concurrency,
        lease=lease,
        stats=stats,
        progress=progress,
        should_stop=should_stop,
    ).run()
    return stats


def transfer_name(key: str, name: str) -> Outcome | None:
    """Transfer one name now if its row is due: what a wake-up runs."""
    rows = _claimable(PendingTransfer.objects.for_name(key, name)).claim_due(
        limit=1, lease=conf.QUEUED_STORAGE_LEASE
    )
    if not rows:
        return None
    # Runs in the caller's thread: a hung upload is abandoned (recorded, its lease
    # left to run out) but keeps the caller until it returns, and then loses.
    with (
        LeaseKeeper(rows[0].lease_token, conf.QUEUED_STORAGE_LEASE) as keeper,
        keeper.attempt(rows[0]) as attempt,
    ):
        if attempt is None:
            return Outcome.STALE
        outcome = process_row(rows[0])
        late = not keeper.returned(attempt)
        keeper.finish(rows[0])
    return Outcome.STALE if late else outcome
