"""Deleting a remote orphan (a file with no row and no reference) once it is older
than a grace period, as the purge of a deleted name deletes: the name is taken
in the ledger first (a tombstone this process holds the lease of), so that a
save of the name meanwhile takes the row over and the fenced delete refuses;
the references are asked again under that lease, just before the delete."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from queued_storage import tombstones
from queued_storage.audit_references import FieldRef, referenced
from queued_storage.conf import settings as conf
from queued_storage.errors import Outcome
from queued_storage.models import PendingTransfer
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
    referenced_now: Callable[[Sequence[FieldRef], Sequence[str]], set[str]]
    | None = None,
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
    key = storage.key
    manager = PendingTransfer.objects
    if not manager.leave_tombstone(key, name, host=""):
        return "kept: the name got a row since the listing"
    found = (
        manager.for_name(key, name)
        .filter(deleted=True, status=PendingTransfer.Status.QUEUED)
        .values_list("pk", "generation")
        .first()
    )
    row = None
    if found is not None:
        row = manager.claim_tombstone(*found, lease=conf.QUEUED_STORAGE_LEASE)
    if row is None:
        return "kept: the name got a row since the listing"
    ask = referenced_now or referenced
    if ask(fields, [name]):
        row.delete_tombstone()
        return "kept: the name got a reference since the listing"
    # Fenced like a purge: a save of the name since the tombstone went in took
    # the row over (new generation), and the delete finds the lease gone.
    outcome = tombstones.purge_claimed(storage, row)
    if outcome is Outcome.PURGED:
        logger.warning("audit deleted orphan key=%s name=%s", key, name)
        return DELETED
    if outcome in (Outcome.RETRY, Outcome.FAILED):
        return "the delete failed: its tombstone is left for a worker to retry"
    return "kept: the name changed in the ledger before the delete"
