"""The ledger's states and the queries named after them: the statuses a row goes
through, those an operator may queue again, and the ledger's QuerySet, which reads
the rows by state and changes many at once (the workers' claims mixed in from
:mod:`queued_storage.claims`, the request side's writes from
:mod:`queued_storage.recording`)."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime, timedelta

from django.db import models
from django.db.models import Count, Min, Q
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from queued_storage.claims import ClaimsQuerySet
from queued_storage.conf import settings as conf
from queued_storage.ledger_sql import name_hash, retry_when_locked
from queued_storage.recording import RecordingQuerySet


class Status(models.TextChoices):
    """The statuses a ledger row goes through (``PendingTransfer.Status``)."""

    HELD = "held", _("held")
    QUEUED = "queued", _("queued")
    TRANSFERRING = "transferring", _("transferring")
    DONE = "done", _("done")
    FAILED = "failed", _("failed")


#: The statuses an operator may queue again (admin, ``requeue_transfers``): rows
#: that wait (held, queued) or gave up (failed). Not transferring (a worker holds
#: the row) nor done (verify_transfers queues a done row whose copy is wrong).
REQUEUEABLE: tuple[str, ...] = (
    Status.HELD.value,
    Status.QUEUED.value,
    Status.FAILED.value,
)


# django-stubs types each QuerySet class's as_manager() with a manager class of its
# own, which it then reports as an incompatible override for a mixed-in one.
class PendingTransferQuerySet(ClaimsQuerySet, RecordingQuerySet):  # type: ignore[override]
    """The ledger's rows by state, and the changes an operator makes to many."""

    def for_name(self, key: str, name: str) -> PendingTransferQuerySet:
        return self.filter(storage_key=key, name_hash=name_hash(name))

    def live(self) -> PendingTransferQuerySet:
        return self.filter(deleted=False)

    def held(self) -> PendingTransferQuerySet:
        return self.filter(status=Status.HELD)

    def queued(self) -> PendingTransferQuerySet:
        return self.filter(status=Status.QUEUED)

    def transferring(self) -> PendingTransferQuerySet:
        return self.filter(status=Status.TRANSFERRING)

    def done(self) -> PendingTransferQuerySet:
        return self.filter(status=Status.DONE)

    def failed(self) -> PendingTransferQuerySet:
        return self.filter(status=Status.FAILED)

    def lease_expired(self, now: datetime | None = None) -> PendingTransferQuerySet:
        """Rows whose worker's lease ran out: the worker is gone, or hung."""
        now = now or timezone.now()
        return self.transferring().filter(lease_expires_at__lt=now)

    def stuck(self, now: datetime | None = None) -> PendingTransferQuerySet:
        """Rows whose lease ran out, or whose attempt has run past the transfer
        timeout without a renewal (a worker renews a running transfer's lease
        more often than that): its worker hangs, is gone, or never started it."""
        now = now or timezone.now()
        try:
            cutoff = now - timedelta(seconds=conf.QUEUED_STORAGE_TRANSFER_TIMEOUT)
        except OverflowError:
            # A timeout meant as "never": no attempt has run that long.
            return self.transferring().filter(lease_expires_at__lt=now)
        return self.transferring().filter(
            Q(lease_expires_at__lt=now) | Q(updated_at__lt=cutoff)
        )

    def failing(self) -> PendingTransferQuerySet:
        """Rows not done whose latest attempt failed (attempts > 0, an error kept)."""
        return (
            self.filter(attempts__gt=0)
            .exclude(status=Status.DONE)
            .exclude(last_error="")
        )

    def errors_since(self, since: datetime) -> PendingTransferQuerySet:
        """Rows whose latest attempt failed at or after ``since`` (retrying or failed)."""
        return self.filter(
            status__in=[Status.QUEUED, Status.FAILED],
            updated_at__gte=since,
        ).exclude(last_error="")

    def oldest_due_at(self, now: datetime | None = None) -> datetime | None:
        """When the longest-waiting due row became due; None when nothing is due.

        Two indexed aggregates: queued rows by ``next_attempt_at``, rows with an
        expired lease by ``lease_expires_at``."""
        now = now or timezone.now()
        queued = (
            self.queued()
            .filter(next_attempt_at__lte=now)
            .aggregate(at=Min("next_attempt_at"))["at"]
        )
        stuck = self.lease_expired(now).aggregate(at=Min("lease_expires_at"))["at"]
        return min((at for at in (queued, stuck) if at is not None), default=None)

    def due(self, now: datetime | None = None) -> PendingTransferQuerySet:
        """Rows a worker may claim now: queued and due, or with an expired lease."""
        now = now or timezone.now()
        return self.filter(
            Q(status=Status.QUEUED, next_attempt_at__lte=now)
            | Q(status=Status.TRANSFERRING, lease_expires_at__lt=now)
        )

    def requeueable(self) -> PendingTransferQuerySet:
        """Rows :meth:`requeue` changes: those in :data:`REQUEUEABLE`, but an
        audit's held tombstone (queued, a worker would delete the remote file
        without the audit's check of the references)."""
        return self.filter(status__in=REQUEUEABLE).exclude(
            status=Status.HELD, deleted=True
        )

    @retry_when_locked
    def requeue(self, now: datetime | None = None) -> int:
        """Make held, failed and waiting rows due now, with their attempts reset."""
        now = now or timezone.now()
        return self.requeueable().update(
            status=Status.QUEUED,
            attempts=0,
            next_attempt_at=now,
            last_error="",
            updated_at=now,
        )

    def status_counts(self) -> dict[str, int]:
        """Rows per status: every status once, in :class:`PendingTransfer.Status`
        order, 0 when it has none. One grouped query, which the status indexes
        answer without reading the rows."""
        found = dict(
            self.order_by()
            .values_list("status")
            .annotate(number=Count("pk"))
            .values_list("status", "number")
        )
        return {status: found.get(status, 0) for status in Status.values}

    def status_counts_per_storage(self) -> dict[str, dict[str, int]]:
        """:meth:`status_counts` of each storage key that has rows, in one query
        (grouped by key too, it reads the rows)."""
        counts: dict[str, dict[str, int]] = {}
        for key, status, number in (
            self.order_by()
            .values_list("storage_key", "status")
            .annotate(number=Count("pk"))
        ):
            per_status = counts.setdefault(key, dict.fromkeys(Status.values, 0))
            per_status[status] = number
        return counts

    def reachable_here(self, host_local: Collection[str]) -> PendingTransferQuerySet:
        """Leave out the rows of the storage keys ``host_local`` (storages built
        with ``local_shared=False``) whose local copy is on another host's disk:
        :meth:`PendingTransfer.hosts_here` says which those are."""
        if not host_local:
            return self
        return self.exclude(
            Q(storage_key__in=host_local) & ~Q(host__in=self.model.hosts_here())
        )

    def hold(self, now: datetime | None = None) -> int:
        """Park queued and failed rows until they are queued again; tombstones and
        rows a worker holds are left alone."""
        now = now or timezone.now()
        return self.filter(
            status__in=[Status.QUEUED, Status.FAILED],
            deleted=False,
        ).update(
            status=Status.HELD,
            next_attempt_at=None,
            updated_at=now,
        )
