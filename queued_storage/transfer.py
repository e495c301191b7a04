"""Transferring one claimed row: run the hook, verify the remote copy, and
record the outcome with a compare-and-set (done together for a batch), so that
a worker that lost its lease never overwrites the ledger; then the signals and
the local copy's removal."""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from django.core.files.storage import Storage
from django.db import transaction

from queued_storage import breaker, conditional, history, mirrors, registry
from queued_storage.checksums import remote_sha256, storage_sha256
from queued_storage.copying import (
    HookCall,
    Refusal,
    Route,
    conditional_remote,
    conflict_message,
    copy_file,
    fence,
    lease_check,
    make_room,
    run_hook,
)
from queued_storage.errors import (
    ChecksumMismatch,
    HookContractError,
    HookDeclined,
    MisspelledName,
    Outcome,
    RemoteChanged,
    RemoteConflict,
    RemoteRenamed,
    SizeMismatch,
    TransferError,
    UnknownStorage,
)
from queued_storage.failures import (
    keep_late_error,
    ledger_db,
    log_crash,
    on_commit,
    record_crash,
)
from queued_storage.models import PendingTransfer, retry_when_locked
from queued_storage.names import misspelling
from queued_storage.signals import file_transferred
from queued_storage.tasks import Transfer
from queued_storage.tombstones import delete_local_copy, fail, purge_claimed, reconcile

if TYPE_CHECKING:
    from queued_storage.storage import MirrorStorage, QueuedStorage

logger = logging.getLogger("queued_storage")


@dataclass
class Verified:
    """A row whose remote copy is verified and not yet recorded as done."""

    row: PendingTransfer
    storage: QueuedStorage
    task: Any
    at: float = field(default_factory=time.monotonic)
    #: The local and remote the copy went between (else the storage's).
    route: Route | None = None
    #: When the attempt's transfer started (``time.monotonic()``), for its duration.
    started: float = field(default_factory=time.monotonic)


def process_row(row: PendingTransfer) -> Outcome:
    """Transfer (or purge) one claimed row and record what happened."""
    try:
        result = transfer_row(row)
    except Exception as exc:
        return record_crash(row, exc)
    if isinstance(result, Outcome):
        return result
    return complete([result])[0]


#: What a hook may raise to stop the worker, and ``except Exception`` lets through.
_STOPS = (KeyboardInterrupt, SystemExit, GeneratorExit)


class Plans(dict[str, "_Plan"]):
    """What the transfers of a batch's rows need of their storages, by key: looked
    up once a storage (its registry entry, local and remote, the remote's kind)
    rather than once a row."""


class _Plan:
    def __init__(self, storage: QueuedStorage) -> None:
        self.storage = storage
        self.route = Route(storage.local, storage.remote)
        self.conditional = conditional_remote(storage)
        self.create_only = conditional.supports_create_only(self.route.remote)
        self._from_primary: Route | None = None

    def route_from(self, source: Storage) -> Route:
        """The route from ``source``: a mirror's copy from the primary's remote."""
        if source is self.route.local:
            return self.route
        if self._from_primary is None or self._from_primary.local is not source:
            self._from_primary = Route(source, self.route.remote)
        return self._from_primary


def transfer_row(
    row: PendingTransfer, plans: Plans | None = None
) -> Outcome | Verified:
    """Transfer and verify one claimed row. A failure (or a purge) is recorded at
    once; a verified copy is returned for :func:`complete` to record. ``plans``:
    the storages' of the rows of the same batch, looked up once."""
    seen = breaker.seen
    if row.storage_key in seen.stopped and row.lease_token not in seen.probes:
        # Paused, or its breaker opened, since the claim: given back unstarted.
        PendingTransfer.objects.release_claim([row])
        return Outcome.STALE
    started = time.monotonic()
    plan = None if plans is None else plans.get(row.storage_key)
    if plan is not None:
        storage = plan.storage
    else:
        try:
            found = registry.get(row.storage_key)
        except registry.KeyConflict as conflict:
            # Either storage's hook could be the wrong one for this row: run none.
            return fail(row, None, conflict)
        if found is None:
            return fail(
                row,
                None,
                UnknownStorage(
                    f"no QueuedStorage with key {row.storage_key!r} in "
                    "settings.STORAGES or the models this worker loaded"
                ),
            )
        storage = found
    wrong = misspelling(row.name)
    if wrong is not None:
        return fail(row, storage, MisspelledName(wrong))
    if row.deleted:
        return purge_claimed(storage, row)
    # Until the hook is built, its class stands for it: what its constructor
    # raises is an attempt's error like any other, under the class's retry limits.
    task: Any = storage.task_class
    upload: conditional.Upload | None = None
    sent = False
    try:
        source = None
        if storage.primary is not None:
            # A mirror's copy: from the local copy or the primary's remote.
            mirror = cast("MirrorStorage", storage)
            source = mirrors.source_of(mirror, row)
            if source is None:
                parked = mirrors.park(mirror, row)
                if parked is not None:
                    return parked
                source = mirrors.copy_source(mirror, row.name)
        task = storage.task
        if plan is None:
            plan = _Plan(storage)
            if plans is not None:
                plans[row.storage_key] = plan
        route = plan.route if source is None else plan.route_from(source)
        # One instance for the hook, its stock copy's conditions and the watch.
        remote = route.remote
        # A custom hook may write other objects, or elsewhere, or the name
        # itself: it is asked first even if it calls the stock copy (which keeps
        # its conditions, see stock_copy()).
        stock = type(task).transfer is Transfer.transfer
        room = make_room(
            storage, row, route, stock=stock, conditional_upload=plan.conditional
        )
        if room.refusal in (Refusal.ASKED, Refusal.IF_MATCH):
            # This upload may replace an object: never once another worker may
            # have taken the row over and written a newer version.
            fence(row, "an upload that may replace the remote object")
        sent = row.upload_sent = True
        checked = lease_check.set(lambda before: fence(row, before))
        try:
            if stock:
                # The stock hook (the base Transfer.transfer()) is its copy, sent
                # with the attempt's conditions, as the hook would send it.
                with (
                    conditional.watch_upload(remote, row.name)
                    if plan.create_only
                    else nullcontext() as upload,
                    conditional.conditional_upload(remote, row.name, room.etag)
                    if room.conditional
                    else nullcontext(),
                ):
                    copy_file(row.name, route)
            else:
                call = HookCall(
                    row.name, remote, conditional=room.conditional, etag=room.etag
                )
                result = run_hook(task, call, route.local)
                if result is False:
                    raise HookDeclined("the transfer hook returned False")
                if result is not True:
                    raise HookContractError(
                        f"{type(task).__name__}.transfer() returned {result!r}; it "
                        "must return True (transferred) or False (retry later)"
                    )
        finally:
            lease_check.reset(checked)
        _verify(storage, row, remote, upload, route.local)
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
        return fail(row, storage, exc, task=task, wrote=True if sent else None)
    except _STOPS as exc:
        # The worker stops as asked (a sys.exit() in a hook), its attempt recorded
        # first: left leased, the row would be claimed again at the end of every
        # lease and stop every worker that takes it, never recorded nor failed.
        try:
            fail(row, storage, exc, task=task, wrote=True if sent else None)
        except Exception as error:
            log_crash(row, error)
        raise
    if breaker.seen.failing:
        # The remote took it: it works again (said before the next claim, which
        # may come before this row's record).
        breaker.note_success([row])
    return Verified(row, storage, task, route=route, started=started)


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
        return fail(row, storage, error, task=task)
    return fail(
        row, storage, RemoteConflict(conflict_message(row.name)), task=task, wrote=False
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
def _complete_together(batch: list[Verified], counted: bool = True) -> bool:
    db = ledger_db()
    try:
        with transaction.atomic(using=db):
            won = PendingTransfer.objects.using(db).mark_done_together(
                [item.row for item in batch]
            )
            if won != len(batch):
                transaction.set_rollback(True, using=db)
                return False
            mirrors.fan_out_batch([(item.storage, item.row) for item in batch], db)
            if counted:
                history.count_done(batch, db)
            for item in batch:
                row = item.row
                logger.info(
                    DONE_LOG,
                    row.storage_key,
                    row.name,
                    row.generation,
                    row.size or 0,
                    row.attempts,
                )
            on_commit(_after_done, batch)
    except history.HistoryUnavailable as error:
        # Rolled back: recorded again without the count (see record_done()).
        keys = [item.row.storage_key for item in batch]
        history.not_counted(error, keys, f"{len(batch)} done transfer(s)")
        return _complete_together(batch, counted=False)
    return True


@retry_when_locked
def record_done(item: Verified, counted: bool = True) -> bool:
    """Record one verified transfer (``mark_done()``) and count it in the
    history, in one transaction; False if its lease or generation is stale. A
    history that cannot be written costs the count, never the done record: the
    transaction is rolled back and done again without it, and the log says so."""
    db = ledger_db()
    try:
        with transaction.atomic(using=db):
            if not item.row.mark_done():
                return False
            if item.storage.mirror_targets:
                mirrors.fan_out(item.storage, [item.row], db)
            if counted:
                history.count_done([item], db)
    except history.HistoryUnavailable as error:
        item.row.status = PendingTransfer.Status.TRANSFERRING  # rolled back
        history.not_counted(error, [item.row.storage_key], "1 done transfer")
        return record_done(item, counted=False)
    return True


def _complete_one(item: Verified) -> Outcome:
    if not record_done(item):
        outcome = reconcile(item.storage, item.row, wrote=True)
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
    row = item.row
    logger.info(
        DONE_LOG, row.storage_key, row.name, row.generation, row.size or 0, row.attempts
    )
    on_commit(_after_done, [item])


DONE_LOG = "transfer done key=%s name=%s generation=%s bytes=%s attempt=%s"


def _verify(
    storage: QueuedStorage,
    row: PendingTransfer,
    remote: Storage,
    upload: conditional.Upload | None = None,
    source: Storage | None = None,
) -> None:
    """Check the remote copy (invariant 4): its size, and its SHA-256 with
    ``verify_checksum``. An S3 upload that S3 validated against a CRC32 and
    returned it is checked by comparing that with the local file's, without a
    request (a copy from a remote source by its size). ``source``: what was copied (a mirror's may be the primary's
    remote); the local storage by default."""
    source = storage.local if source is None else source
    expected = row.size if row.size is not None else source.size(row.name)
    # The CRC32 comparison reads the source again: free from the local disk, a
    # second download of every file from a mirror's source remote (a migration
    # would read the old bucket twice), where one HEAD of the copy checks its size.
    local_source = source is storage.local
    compared = upload.compare(source, row.name) if upload and local_source else None
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
    actual = remote.size(row.name)
    if actual != expected:
        raise SizeMismatch(
            f"the remote copy of {row.name!r} has {actual} bytes, "
            f"{_local_size_text(storage, row)}"
        )
    if storage.verify_checksum:
        local_sum = row.checksum or storage_sha256(source, row.name)
        remote_sum = remote_sha256(remote, row.name)
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


def _after_done(batch: list[Verified]) -> None:
    """``file_transferred`` and the local delete of ``TransferAndDelete`` for each
    row of ``batch``, after the ``DONE`` commit. What they raise is kept on the
    row, which stays done: the remote copy is verified and recorded, and no retry
    of the upload would make a receiver or the local storage behave. One row's
    failure does not stop the others."""
    for item in batch:
        storage, row, task = item.storage, item.row, item.task
        try:
            route = item.route
            sent = file_transferred.send_robust(
                sender=type(task),
                name=row.name,
                local=storage.local if route is None else route.local,
                remote=storage.remote if route is None else route.remote,
                storage=storage,
                key=row.storage_key,
            )
            errors: list[Exception] = []
            for _receiver, error in sent:
                if isinstance(error, Exception):
                    errors.append(error)
            try:
                if not task.delete_local:
                    pass
                elif storage.mirror_targets or storage.primary is not None:
                    # The local copy goes with the last destination's done.
                    mirrors.delete_local_copy(storage, row.name, row.generation)
                else:
                    delete_local_copy(storage, row.name, row.while_done())
            except Exception as exc:
                errors.append(exc)
            for error in errors:
                keep_late_error(storage, row, error, PendingTransfer.Status.DONE)
        except Exception as exc:
            logger.error(
                "after-transfer work failed key=%s name=%s error=%s: %s",
                row.storage_key,
                row.name,
                type(exc).__name__,
                storage.redact(str(exc)),
            )


def late_result(row: PendingTransfer, result: Outcome | Verified) -> None:
    """A transfer that returned after it was abandoned: what it verified loses its
    compare-and-set (the timeout took the lease), alone, outside the batch."""
    if isinstance(result, Verified):
        try:
            result = complete([result])[0]
        except Exception as exc:
            log_crash(row, exc)
            return
    logger.info(
        "abandoned transfer returned key=%s name=%s outcome=%s",
        row.storage_key,
        row.name,
        result.value,
    )
