"""Deleting a remote orphan (a file with no row and no reference) once it is older
than a grace period, as the purge of a deleted name deletes: the name is taken
in the ledger first (a tombstone inserted held, which no worker claims), so that
a save of the name meanwhile takes the row over and the fenced delete refuses;
the references are asked again, and only then does the audit lease the
tombstone and purge it. An audit that dies between the two leaves a held
tombstone, harmless (the name has no live row), which the next audit removes."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from django.utils import timezone

from queued_storage import tombstones
from queued_storage.audit_references import FieldRef, referenced
from queued_storage.conf import settings as conf
from queued_storage.errors import Outcome
from queued_storage.models import PendingTransfer, name_hash
from queued_storage.remote_listing import RemoteEntry, read_as_another

if TYPE_CHECKING:
    from queued_storage.storage import QueuedStorage

logger = logging.getLogger("queued_storage")

#: Why an orphan was kept (the detail of its finding), or DELETED.
DELETED = ""


def delete_orphan(
    storage: QueuedStorage,
    entry: RemoteEntry,
    *,
    fields: Sequence[FieldRef],
    grace: timedelta,
    now: datetime,
) -> str:
    """Delete the orphan ``entry`` of ``storage``'s remote; returns DELETED, or
    why it was kept. Kept: a file without a modified time, one younger than
    ``grace``, one the remote reads as another name, one with a local file of
    its name, and one that got a row or a reference since the listing."""
    if entry.modified is None:
        return "kept: the remote gives no modified time, so its age is unknown"
    if now - entry.modified < grace:
        return f"kept: younger than the grace period ({grace})"
    name = entry.name
    wrong = read_as_another(storage.remote, name)
    if wrong is not None:
        # Its delete would be sent to the other name: a live file's, maybe.
        return f"kept: the remote reads it as another name ({wrong})"
    if storage.primary is None and storage.local.exists(name):
        return "kept: a local file has this name"
    row = _tombstone_held(storage.key, name)
    if row is None:
        return "kept: the name got a row since the listing"
    try:
        still_referenced = bool(referenced(fields, [name]))
    except Exception:
        remove_held_tombstone(row)
        raise
    if still_referenced:
        remove_held_tombstone(row)
        return "kept: the name got a reference since the listing"
    if not _lease_held(row):
        return "kept: the name changed in the ledger before the delete"
    # Fenced like a purge: a save of the name since the tombstone went in took
    # the row over (new generation), and the delete finds the lease gone.
    outcome = tombstones.purge_claimed(storage, row)
    if outcome is Outcome.PURGED:
        logger.warning("audit deleted orphan key=%s name=%s", storage.key, name)
        return DELETED
    if outcome in (Outcome.RETRY, Outcome.FAILED):
        return "the delete failed: its tombstone is left for a worker to retry"
    return "kept: the name changed in the ledger before the delete"


def is_held_tombstone(row: PendingTransfer) -> bool:
    """Whether ``row`` is an audit's tombstone not yet leased for its delete (no
    other tombstone is held): one left by an audit that stopped before it."""
    return bool(row.deleted) and row.status == PendingTransfer.Status.HELD


def remove_held_tombstone(row: PendingTransfer) -> bool:
    """Remove the held tombstone ``row`` unless a save or delete of the name took
    the row over since (a new generation, or no longer held)."""
    removed, _counts = PendingTransfer.objects.filter(
        pk=row.pk,
        generation=row.generation,
        status=PendingTransfer.Status.HELD,
        deleted=True,
    ).delete()
    return bool(removed)


def _tombstone_held(key: str, name: str) -> PendingTransfer | None:
    """Insert a held tombstone of ``name``, which has no row: no worker claims it
    (neither a due row nor a requeue's), so none purges it without the check of
    the references that follows; None when the name has a row."""
    now = timezone.now()
    token = uuid.uuid4().hex
    hashed = name_hash(name)
    PendingTransfer.objects.bulk_create(
        [
            PendingTransfer(
                storage_key=key,
                name=name,
                name_hash=hashed,
                status=PendingTransfer.Status.HELD,
                deleted=True,
                # The operator's decision makes the object the ledger's to remove.
                remote_owned=True,
                attempts=0,
                # Which row is ours; no lease until the references are checked.
                lease_token=token,
                lease_expires_at=None,
                next_attempt_at=None,
                host="",
                created_at=now,
                updated_at=now,
            )
        ],
        ignore_conflicts=True,
    )
    return PendingTransfer.objects.filter(
        storage_key=key, name_hash=hashed, lease_token=token
    ).first()


def _lease_held(row: PendingTransfer) -> bool:
    """Lease the held tombstone ``row`` for its purge, as a worker's claim of a
    tombstone would; False when a save or delete took the row over meanwhile."""
    now = timezone.now()
    token = uuid.uuid4().hex
    expires = now + timedelta(seconds=conf.QUEUED_STORAGE_LEASE)
    taken = PendingTransfer.objects.filter(
        pk=row.pk,
        generation=row.generation,
        lease_token=row.lease_token,
        status=PendingTransfer.Status.HELD,
        deleted=True,
    ).update(
        status=PendingTransfer.Status.TRANSFERRING,
        lease_token=token,
        lease_expires_at=expires,
        attempts=1,
        updated_at=now,
    )
    if not taken:
        return False
    row.status = PendingTransfer.Status.TRANSFERRING
    row.lease_token = token
    row.lease_expires_at = expires
    row.attempts = 1
    row.updated_at = now
    # As a claim of a tombstone sets them (claims.claim_tombstone).
    row.claimed_from = PendingTransfer.Status.QUEUED
    row.was_owned = True
    return True
