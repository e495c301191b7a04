from __future__ import annotations

import factory
from django.utils import timezone

from queued_storage.models import PendingTransfer, name_hash


class PendingTransferFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = PendingTransfer

    storage_key = "factory"
    name = factory.Sequence(lambda n: f"files/{n}.txt")
    name_hash = factory.LazyAttribute(lambda row: name_hash(row.name))
    status = PendingTransfer.Status.QUEUED
    next_attempt_at = factory.LazyFunction(timezone.now)
    size = 11
