"""Which rows a claim may take: none of a storage whose transfers are paused or
whose circuit breaker is open, and one probe row of a storage whose breaker's
backoff has ended, for one worker (a compare-and-set on its state row). One
small query a claim reads the storages that are not simply running."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Collection
from datetime import datetime, timedelta
from typing import Any

from django.db.models import Q, QuerySet

from queued_storage import breaker
from queued_storage.conf import settings as conf
from queued_storage.models import PendingTransfer, PendingTransferQuerySet
from queued_storage.prepared import Prepared
from queued_storage.storage_state import StorageState

logger = logging.getLogger("queued_storage")


def _not_running(db: str, now: datetime, key: object) -> QuerySet[StorageState, Any]:
    """The states of the storages that are not simply running."""
    return (
        StorageState.objects.using(db)
        .filter(
            Q(paused_at__isnull=False)
            | Q(breaker_failures__gt=0)
            | Q(breaker_opened_at__isnull=False)
        )
        .values_list(
            "storage_key",
            "paused_at",
            "breaker_failures",
            "breaker_opened_at",
            "breaker_probe_at",
        )
    )


#: Read by every claim: compiled once per connection.
_NOT_RUNNING = Prepared(_not_running, StorageState._meta.get_field("paused_at"), 0)


def claim(
    rows: PendingTransferQuerySet,
    *,
    limit: int,
    lease: float,
    keys: Collection[str] | None = None,
) -> list[PendingTransfer]:
    """``rows.claim_due()``, without the rows of paused storages and of storages
    whose breaker is open; when a breaker's probe is due (of a storage of
    ``keys``, if given), that storage's probe row alone instead."""
    threshold = conf.QUEUED_STORAGE_BREAKER_FAILURES
    now = breaker.clock()
    stopped: set[str] = set()
    failing: set[str] = set()
    probes: list[tuple[str, datetime | None]] = []
    for key, paused_at, failures, opened_at, probe_at in _NOT_RUNNING.values(
        breaker._db(), now
    ):
        if failures or opened_at is not None:
            failing.add(key)
        if paused_at is not None:
            stopped.add(key)
        elif threshold and opened_at is not None:
            stopped.add(key)
            if probe_at is None or probe_at <= now:
                probes.append((key, probe_at))
    breaker.seen.update(frozenset(stopped), failing)
    for key, probe_at in probes:
        if keys is None or key in keys:
            probe = _take_probe(rows, key, probe_at, lease, now)
            if probe is not None:
                return [probe]
    if stopped:
        rows = rows.exclude(storage_key__in=sorted(stopped))
    return rows.claim_due(limit=limit, lease=lease)


def _take_probe(
    rows: PendingTransferQuerySet,
    key: str,
    probe_at: datetime | None,
    lease: float,
    now: datetime,
) -> PendingTransfer | None:
    """Claim one due row of ``key`` as its breaker's probe, unless another worker
    took the probe first: the probe's turn passes to the first compare-and-set
    (the row lock orders two workers' on PostgreSQL and MariaDB, the database's
    write lock on SQLite), which pushes the next probe out by a lease."""
    token = uuid.uuid4().hex
    states = StorageState.objects.using(breaker._db()).filter(storage_key=key)
    due = Q(breaker_probe_at__isnull=True) | Q(breaker_probe_at__lte=now)
    taken = states.filter(
        due, breaker_opened_at__isnull=False, paused_at__isnull=True
    ).update(
        breaker_probe_at=now + timedelta(seconds=lease),
        breaker_probe_token=token,
        updated_at=now,
    )
    if not taken:
        return None
    mine = states.filter(breaker_probe_token=token)
    try:
        found = rows.filter(storage_key=key, deleted=False).claim_due(
            limit=1, lease=lease
        )
    except BaseException:
        mine.update(breaker_probe_at=probe_at, breaker_probe_token="")
        raise
    if not found:
        # Nothing of it due here: the turn is the next claim's, as it was.
        mine.update(breaker_probe_at=probe_at, breaker_probe_token="")
        return None
    row = found[0]
    breaker.seen.probes.add(row.lease_token)
    mine.update(breaker_probe_token=row.lease_token)
    logger.warning(
        "circuit breaker probe key=%s name=%s generation=%s",
        key,
        row.name,
        row.generation,
    )
    return row
