"""Reading many ledger rows in primary-key batches, for sweeps over a whole
storage (verification, local copy cleaning)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from queued_storage.models import PendingTransfer, PendingTransferQuerySet


def in_batches(
    rows: PendingTransferQuerySet, *, size: int, fields: Sequence[str]
) -> Iterator[list[PendingTransfer]]:
    """``rows`` in primary key order, ``size`` at a time, with only ``fields`` loaded.

    Each batch starts after the last key of the one before, so a row that an
    earlier batch changed neither shifts nor repeats the next one."""
    last_pk = 0
    while True:
        batch = list(rows.filter(pk__gt=last_pk).order_by("pk").only(*fields)[:size])
        if not batch:
            return
        last_pk = batch[-1].pk
        yield batch
