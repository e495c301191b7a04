"""A stale attempt's reconcile and the purge of deleted names: each removal
fenced with the lease and generation, the tombstone removed with a
compare-and-set, and the locked removal of a local copy (invariant 5)."""

from __future__ import annotations

import logging
from functools import reduce
from operator import or_
from typing import TYPE_CHECKING, Any

from django.db import connections, transaction
from django.db.models import Q

from queued_storage import conditional, registry
from queued_storage.conf import settings as conf
from queued_storage.copying import conditional_remote, delete_remote_fenced
from queued_storage.errors import LeaseLost, Outcome, RemoteChanged
from queued_storage.failures import ledger_db, record_failure
from queued_storage.models import (
    PendingTransfer,
    PendingTransferQuerySet,
    retry_when_locked,
)
from queued_storage.places import Place, place

if TYPE_CHECKING:
    from queued_storage.storage import QueuedStorage

logger = logging.getLogger("queued_storage")


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
    db = ledger_db()
    with transaction.atomic(using=db):
        if not still.using(db).lock():
            return False
        storage.local.delete(name)
    return True


def fail(
    row: PendingTransfer,
    storage: QueuedStorage | None,
    error: BaseException,
    task: Any = None,
    wrote: bool | None = None,
) -> Outcome:
    """Record ``error`` as the attempt's (:func:`record_failure`); an attempt that
    went stale meanwhile reconciles."""
    outcome = record_failure(row, storage, error, task=task, wrote=wrote)
    if outcome is not None:
        return outcome
    return reconcile(storage, row, wrote=bool(wrote)) if storage else Outcome.STALE


def reconcile(
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
            row.storage_key,
            row.name,
            row.host,
            remote_owned=not _carried(storage, row),
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
            return purge_claimed(storage, current)
        # Whoever holds the tombstone now purges it, or the next worker to claim it.
        return Outcome.STALE
    if current.lease_token == row.lease_token:
        current.release(held=storage.delayed)
    return Outcome.STALE


def _carried(storage: QueuedStorage, row: PendingTransfer) -> bool:
    """Whether the vanished ``row`` was carried to the key the storage moves to
    (``migrate_storage --finish`` dropped it, and its serving mirror's key has a
    live row of the name): then the object a late upload left on this key's
    remote, the old bucket, is left there, as the migration never deletes from
    it. A name deleted has no live row of that key: the late object goes."""
    if storage.serving_mirror is None:
        return False
    key = storage.mirror_key(storage.serving_mirror)
    if not (
        PendingTransfer.objects.for_name(key, row.name).filter(deleted=False).exists()
    ):
        return False
    logger.info(
        "late upload left on the old remote key=%s name=%s: carried to %s",
        row.storage_key,
        row.name,
        key,
    )
    return True


def purge_claimed(storage: QueuedStorage, row: PendingTransfer) -> Outcome:
    """Remove the files of a tombstone this worker holds a lease on, each removal
    checked against the lease and generation just before it, then the tombstone
    with a compare-and-set. A save of the name meanwhile keeps the lease and
    bumps the generation: the checks fail, and the row goes back to the new
    version."""
    try:
        # A mirror's tombstone leaves the local copy to the primary's, whose row
        # a re-save of the name locks (a mirror's is not locked by it).
        if (
            storage.primary is None
            and not _needed_by_another_key(storage, row)
            and not _purge_local_copy(storage, row)
        ):
            return reconcile(storage, row)
        unconditional = row.was_owned and not conditional_remote(storage)
        if row.was_owned:
            delete_remote_fenced(storage, row)
    except LeaseLost:
        return reconcile(storage, row)
    except Exception as exc:
        if conditional.refused(exc):
            exc = RemoteChanged(
                f"the remote object at {row.name!r} changed since the purge looked; "
                "retried"
            )
        return fail(row, storage, exc)
    if row.delete_tombstone():
        logger.info("purged key=%s name=%s", row.storage_key, row.name)
        return Outcome.PURGED
    if unconditional:
        _requeue_overtaken(storage, row)
    return reconcile(storage, row)


@retry_when_locked
def _purge_local_copy(
    storage: QueuedStorage,
    row: PendingTransfer,
    still: PendingTransferQuerySet | None = None,
) -> bool:
    """Delete the local copy of the tombstone ``row`` unless another key's row
    needs it, both decided under locks; False when the tombstone is no longer
    as ``still`` selects it (by default: this claim's; the purge reconciles).

    The tombstone's lock serialises the delete with a save of this key; another
    key's save writes its row first and locks only that. So the other keys'
    rows of the name are locked here and looked at again (one a save holds
    keeps the file), and where a key that saves to this directory has no row
    of the name, an uncommitted slot of it is taken: a save's row going in
    meanwhile is waited for and seen, and one that comes after waits for the
    delete, then writes its file. A file kept is at worst an orphan for
    ``clean_local_copies``; a file deleted under a save would be lost."""
    db = ledger_db()
    with transaction.atomic(using=db):
        if still is None:
            still = row.while_claimed().filter(deleted=True)
        if not still.using(db).lock():
            return False
        slots = _take_slots(storage, row, db)
        try:
            if not _needed_by_another_key(storage, row, db=db, slots=slots):
                storage.local.delete(row.name)
        finally:
            if slots:
                PendingTransfer.objects.using(db).filter(
                    pk__in=[slot.pk for slot in slots]
                ).delete()
    return True


def _take_slots(
    storage: QueuedStorage, row: PendingTransfer, db: str
) -> list[PendingTransfer]:
    """Rows of ``row``'s name, inserted in the purge's transaction (and removed
    before it commits) for the keys that save to this storage's directory and
    have none: the unique constraint makes a save's row of the name wait for
    the purge, or the purge for the save's (PostgreSQL has no lock on a row
    that is not there)."""
    keys = _saving_keys(_other_keys(storage, row))
    manager = PendingTransfer.objects.using(db)
    if keys:
        # A key with a row of the name is locked by its row (skipped when a
        # save holds it): the insert would wait for that save.
        keys -= set(
            manager.filter(
                storage_key__in=sorted(keys), name_hash=row.name_hash
            ).values_list("storage_key", flat=True)
        )
    if not keys:
        return []
    slots = [
        PendingTransfer(
            storage_key=key,
            name=row.name,
            name_hash=row.name_hash,
            deleted=True,
            host=row.host,
        )
        for key in sorted(keys)
    ]
    manager.bulk_create(slots, ignore_conflicts=True)
    taken = set(
        manager.filter(
            reduce(
                or_,
                (Q(storage_key=s.storage_key, generation=s.generation) for s in slots),
            ),
            name_hash=row.name_hash,
        ).values_list("pk", "storage_key")
    )
    by_key = {key: pk for pk, key in taken}
    found = []
    for slot in slots:
        if slot.storage_key in by_key:
            slot.pk = by_key[slot.storage_key]
            found.append(slot)
    return found


def _other_keys(storage: QueuedStorage, row: PendingTransfer) -> set[str]:
    """The keys this host knows whose local copies are where ``storage``'s are
    (a migration's new key is the serving mirror's): each is an index lookup,
    where a look at every key would scan the ledger."""
    return {
        key
        for key in set(registry.known_keys()) | set(registry.mirror_keys())
        if key != row.storage_key and _same_local(storage, key)
    }


def _needed_by_another_key(
    storage: QueuedStorage,
    row: PendingTransfer,
    *,
    db: str | None = None,
    slots: list[PendingTransfer] | None = None,
) -> bool:
    """Whether a live row of another key still has to send the local copy of
    ``row``'s name from this host: a tombstone left by a late worker whose row
    ``migrate_storage --finish`` carried to the new key (and any tombstone of a
    name two keys share a local copy of) leaves that copy to the live row; the
    purge then removes only what this key put on its own remote. ``db``: in the
    purge's transaction, with the tombstone locked (:func:`_purge_local_copy`):
    the other keys' rows are locked too, and one a save holds keeps the copy;
    ``slots``: the rows it inserted, which are no one's."""
    keys = _other_keys(storage, row)
    if not keys:
        return False
    rows = PendingTransfer.objects.using(db or ledger_db()).filter(
        storage_key__in=sorted(keys), name_hash=row.name_hash
    )
    if slots:
        rows = rows.exclude(pk__in=[slot.pk for slot in slots])
    if db is not None and connections[db].features.has_select_for_update:
        seen = set(rows.values_list("pk", flat=True))
        # Skipped, not waited for: the save that holds a row may be a request
        # whose transaction waits for this very purge.
        skip = connections[db].features.has_select_for_update_skip_locked
        locked = set(
            rows.order_by("pk")
            .select_for_update(skip_locked=skip)
            .values_list("pk", flat=True)
        )
        if seen - locked:
            return _kept(row, "another key's save holds its row")
    others = rows.filter(deleted=False).exclude(status=PendingTransfer.Status.DONE)
    if not storage.local_shared:
        others = others.filter(host__in=PendingTransfer.hosts_here())
    if others.exists():
        return _kept(row, "another key's row sends it")
    return False


def _saving_keys(keys: set[str]) -> set[str]:
    """Those of ``keys`` that a save writes rows of: a storage's own key, or a
    serving mirror's (the key the storage switches to, which switched hosts
    save to while this host runs the old configuration)."""
    found = set()
    for key in keys:
        try:
            other = registry.get(key)
        except registry.KeyConflict:  # a key two storages claim: cannot tell
            other = None
        if (
            other is None
            or other.primary is None
            or other.primary.serving_mirror == other.mirror_name
        ):
            found.add(key)
    return found


def _kept(row: PendingTransfer, why: str) -> bool:
    logger.info(
        "purge keeps the local copy key=%s name=%s: %s",
        row.storage_key,
        row.name,
        why,
    )
    return True


def _same_local(storage: QueuedStorage, key: str) -> bool:
    """Whether the storage of ``key`` keeps its local copies where ``storage``
    does (a mirror's are its primary's); True when that cannot be told, which
    keeps a copy (a leftover file, never a lost one)."""
    try:
        other = registry.get(key)
    except Exception:  # a key two storages claim: cannot tell
        return True
    return other is None or _local_place(other) == _local_place(storage)


def _local_place(storage: QueuedStorage) -> Place:
    return place(storage.local_alias or storage.local_path, storage.local_options)


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


def purge(storage: QueuedStorage, pk: int, generation: int) -> None:
    """Remove the files of a name deleted in a committed transaction.

    The purge claims the tombstone as a worker would, and fences each removal
    like a worker's (invariant 3), so a save of the name since the delete keeps
    its files; a worker holding the row's lease removes the remote copy itself. A
    purge that fails here is recorded on the tombstone, due for a worker to
    retry."""
    # A local copy on another host: that host's worker purges the row.
    row = PendingTransfer.objects.claim_tombstone(
        pk,
        generation,
        lease=conf.QUEUED_STORAGE_LEASE,
        local_shared=storage.local_shared,
    )
    if row is not None:
        if purge_claimed(storage, row) is Outcome.RETRY:
            # Failed here, the purge is a worker's at once, as if it had never run.
            row.retry_now()
        return
    tombstone = PendingTransfer.objects.filter(
        pk=pk, generation=generation, deleted=True
    ).first()
    if (
        tombstone is not None
        and storage.primary is None
        and tombstone.local_copy_here(local_shared=storage.local_shared)
    ):
        # A worker holds the row: the remote copy is its to remove. The local copy
        # is the deleted version's and goes now, so that the name is free at once.
        _purge_local_copy(storage, tombstone, tombstone.while_deleted())
