"""Pausing and resuming the transfers of a storage: a switch in its state row
that every worker's next claim reads (see :mod:`queued_storage.controls`).
Saves go on and queue up while it is set."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from django.db import router, transaction
from django.utils import timezone

from queued_storage.ledger_sql import retry_when_locked
from queued_storage.names import BAD_CHARACTERS
from queued_storage.storage_state import (
    MAX_PAUSED_BY_LENGTH,
    MAX_REASON_LENGTH,
    StorageState,
)

logger = logging.getLogger("queued_storage")


def reason_problem(reason: str) -> str:
    """Why ``reason`` cannot be kept as a pause's reason, or ``""``."""
    if len(reason) > MAX_REASON_LENGTH:
        return (
            f"The reason is {len(reason)} characters long; the ledger keeps "
            f"{MAX_REASON_LENGTH}."
        )
    if BAD_CHARACTERS.search(reason):
        return "The reason contains a line break or another control character."
    return ""


@retry_when_locked
def pause(keys: Iterable[str], *, by: str, reason: str = "") -> list[str]:
    """Pause the transfers of the storages ``keys``; returns those paused now,
    sorted (one paused already keeps its time, who and why). ``ValueError`` for a
    reason the ledger cannot keep, before anything is written."""
    problem = reason_problem(reason)
    if problem:
        raise ValueError(problem)
    wanted = sorted(set(keys))
    now = timezone.now()
    db = router.db_for_write(StorageState)
    with transaction.atomic(using=db):
        StorageState.objects.using(db).bulk_create(
            [
                StorageState(storage_key=key, created_at=now, updated_at=now)
                for key in wanted
            ],
            ignore_conflicts=True,
        )
        running = StorageState.objects.using(db).filter(
            storage_key__in=wanted, paused_at__isnull=True
        )
        paused = sorted(
            running.select_for_update().values_list("storage_key", flat=True)
        )
        StorageState.objects.using(db).filter(storage_key__in=paused).update(
            paused_at=now,
            paused_by=by[:MAX_PAUSED_BY_LENGTH],
            pause_reason=reason,
            updated_at=now,
        )
    for key in paused:
        logger.warning("transfers paused key=%s by=%s reason=%s", key, by, reason)
    return paused


@retry_when_locked
def resume(keys: Iterable[str], *, by: str) -> list[str]:
    """Resume the transfers of the storages ``keys``; returns those that were
    paused, sorted."""
    wanted = sorted(set(keys))
    now = timezone.now()
    db = router.db_for_write(StorageState)
    with transaction.atomic(using=db):
        paused = StorageState.objects.using(db).filter(
            storage_key__in=wanted, paused_at__isnull=False
        )
        resumed = sorted(
            paused.select_for_update().values_list("storage_key", flat=True)
        )
        StorageState.objects.using(db).filter(storage_key__in=resumed).update(
            paused_at=None, paused_by="", pause_reason="", updated_at=now
        )
    for key in resumed:
        logger.warning("transfers resumed key=%s by=%s", key, by)
    return resumed
