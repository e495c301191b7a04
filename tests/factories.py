from __future__ import annotations

from typing import Any

from django.utils import timezone
from factory.declarations import LazyAttribute, LazyFunction, Sequence
from factory.django import DjangoModelFactory

from queued_storage.models import PendingTransfer, name_hash


class PendingTransferFactory(DjangoModelFactory[PendingTransfer]):
    class Meta:
        model = PendingTransfer

    storage_key = "factory"
    name = Sequence(lambda n: f"files/{n}.txt")
    name_hash = LazyAttribute(lambda row: name_hash(row.name))
    status = PendingTransfer.Status.QUEUED
    next_attempt_at = LazyFunction(timezone.now)
    size = 11


def pending_row(**fields: Any) -> PendingTransfer:
    """A saved ledger row: the factory's values for what ``fields`` leaves out."""
    row: PendingTransfer = PendingTransferFactory.create(**fields)
    return row


def pending_rows(count: int, **fields: Any) -> list[PendingTransfer]:
    """``count`` saved ledger rows, as :func:`pending_row` makes them."""
    rows: list[PendingTransfer] = PendingTransferFactory.create_batch(count, **fields)
    return rows
