"""Deleting a remote orphan (a file with no row and no reference) once it is older
than a grace period, as the purge of a deleted name deletes: the name is taken
in the ledger first (a tombstone inserted under this process's lease), so that
a save of the name meanwhile takes the row over and the fenced delete refuses;
the references are asked again under that lease, just before the delete."""

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
from queued_storage.remote_listing import RemoteEntry

if TYPE_CHECKING:
    from queued_storage.backends import QueuedStorage

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
    ``grace``, one with a local file of its name, and one that got a row or a
    reference since the listing."""
    if entry.modified is None:
        return "kept: the remote gives no modified time, so its age is unknown"
    if now - entry.modified < grace:
        return f"kept: younger than the grace period ({grace})"
    name = entry.name
    if storage.primary is None and storage.local.exists(name):
        return "kept: a local file has this name"
    row = _tombstone_held(storage.key, name)
    if row is None:
        return "kept: the name got a row since the listing"
    if referenced(fields, [name]):
        row.delete_tombstone()
        return "kept: the name got a reference since the listing"
    # Fenced like a purge: a save of the name since the tombstone went in took
    # the row over (new generation), and the delete finds the lease gone.
    outcome = tombstones.purge_claimed(storage, row)
    if outcome is Outcome.PURGED:
        logger.warning("audit deleted orphan key=%s name=%s", storage.key, name)
        return DELETED
    if outcome in (Outcome.RETRY, Outcome.FAILED):
        return "the delete failed: its tombstone is left for a worker to retry"
    return "kept: the name changed in the ledger before the delete"


def _tombstone_held(key: str, name: str) -> PendingTransfer | None:
    """Insert a tombstone of ``name``, which has no row, leased by this process
    from the start (no worker may purge it meanwhile, skipping the check of the
    references); None when the name has a row. A crash leaves it to a worker
    once the lease runs out: the purge the audit decided on."""
    now = timezone.now()
    token = uuid.uuid4().hex
    hashed = name_hash(name)
    PendingTransfer.objects.bulk_create(
        [
            PendingTransfer(
                storage_key=key,
                name=name,
                name_hash=hashed,
                status=PendingTransfer.Status.TRANSFERRING,
                deleted=True,
                # The operator's decision makes the object the ledger's to remove.
                remote_owned=True,
                attempts=1,
                lease_token=token,
                lease_expires_at=now + timedelta(seconds=conf.QUEUED_STORAGE_LEASE),
                next_attempt_at=None,
                host="",
                created_at=now,
                updated_at=now,
            )
        ],
        ignore_conflicts=True,
    )
    row = PendingTransfer.objects.filter(
        storage_key=key, name_hash=hashed, lease_token=token
    ).first()
    if row is not None:
        # As a claim of a tombstone sets them (claims.claim_tombstone).
        row.claimed_from = PendingTransfer.Status.QUEUED
        row.was_owned = True
    return row
