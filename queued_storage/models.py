"""The ledger: one row per (storage key, file name), the job and the record of where
the file lives. Every state change is one short transaction with a compare-and-set.

This module holds the model and the verbs of one row; its states and the
queries named after them are in :mod:`queued_storage.states`, the worker's
claims in :mod:`queued_storage.claims`, the request side's writes in
:mod:`queued_storage.recording`, the SQL built once per database in
:mod:`queued_storage.ledger_sql`."""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from typing import Any

from django.db import connections, models, router, transaction
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from queued_storage import history, states
from queued_storage.conf import MAX_HOST_LENGTH
from queued_storage.conf import settings as conf
from queued_storage.error_history import ERROR_HISTORY_LENGTH as ERROR_HISTORY_LENGTH
from queued_storage.error_history import ERROR_MESSAGE_LENGTH as ERROR_MESSAGE_LENGTH
from queued_storage.error_history import entries, error_entry
from queued_storage.ledger_sql import lease_check_sql
from queued_storage.ledger_sql import name_hash as name_hash
from queued_storage.ledger_sql import new_generation as new_generation
from queued_storage.ledger_sql import retry_when_locked as retry_when_locked
from queued_storage.names import MAX_NAME_LENGTH as MAX_NAME_LENGTH
from queued_storage.states import REQUEUEABLE as REQUEUEABLE
from queued_storage.states import PendingTransferQuerySet as PendingTransferQuerySet
from queued_storage.storage_state import StorageState as StorageState

#: Longest retry delay, whatever the attempt number.
MAX_RETRY_DELAY = 24 * 60 * 60


def retry_delay(attempt: int, base: float) -> float:
    """Exponential backoff with +-10 % jitter, capped at a day."""
    if base <= 0:
        return 0.0
    # The exponent is capped: 2**1024 and up overflows a float (huge retry limits).
    delay = min(base * 2 ** min(max(attempt - 1, 0), 64), MAX_RETRY_DELAY)
    return float(min(delay * random.uniform(0.9, 1.1), MAX_RETRY_DELAY))


class PendingTransfer(models.Model):
    """A file saved locally, and where it is on its way to the remote."""

    Status = states.Status

    # storage_key, name and host compare exactly: on MariaDB/MySQL migration 0002
    # gives them a binary collation, which a migration altering them must keep.
    storage_key = models.CharField(_("storage key"), max_length=255)
    name = models.CharField(_("name"), max_length=MAX_NAME_LENGTH)
    name_hash = models.CharField(_("name hash"), max_length=64, editable=False)
    status = models.CharField(
        _("status"), max_length=16, choices=Status.choices, default=Status.QUEUED
    )
    generation = models.BigIntegerField(_("generation"), default=new_generation)
    deleted = models.BooleanField(
        _("deleted"),
        default=False,
        help_text=_("Deleted by the application; the files are being removed."),
    )
    remote_owned = models.BooleanField(
        _("remote object is ours"),
        default=False,
        help_text=_("An attempt may have written the remote object at this name."),
    )
    attempts = models.PositiveIntegerField(_("attempts"), default=0)
    next_attempt_at = models.DateTimeField(_("next attempt at"), null=True, blank=True)
    lease_token = models.CharField(_("lease token"), max_length=32, blank=True)
    lease_expires_at = models.DateTimeField(
        _("lease expires at"), null=True, blank=True
    )
    size = models.BigIntegerField(_("size"), null=True, blank=True)
    checksum = models.CharField(_("SHA-256"), max_length=64, blank=True)
    last_error = models.TextField(_("last error"), blank=True)
    error_history = models.JSONField(_("error history"), default=list, blank=True)
    host = models.CharField(_("host"), max_length=MAX_HOST_LENGTH, blank=True)
    created_at = models.DateTimeField(_("created at"), default=timezone.now)
    updated_at = models.DateTimeField(_("updated at"), default=timezone.now)
    transferred_at = models.DateTimeField(_("transferred at"), null=True, blank=True)

    objects = PendingTransferQuerySet.as_manager()

    #: Set on claimed rows: the status before the claim.
    claimed_from: str = ""
    #: Set on claimed rows: whether an earlier attempt may have written the remote.
    was_owned: bool = False
    #: Set by the worker on the row it transfers: this attempt's upload was sent,
    #: and may write the remote object whenever it returns.
    upload_sent: bool = False
    #: Set by the worker when this row's attempt starts: a failure records how
    #: long the attempt ran.
    attempt_started_at: datetime | None = None

    class Meta:
        # Declared, so that a site without the app imports this and hears why.
        app_label = "queued_storage"
        verbose_name = _("pending transfer")
        verbose_name_plural = _("pending transfers")
        ordering = ["-created_at", "-pk"]
        constraints = [
            models.UniqueConstraint(
                fields=["storage_key", "name_hash"],
                name="queued_storage_unique_name",
            )
        ]
        indexes = [
            models.Index(
                fields=["status", "next_attempt_at"], name="queued_storage_due"
            ),
            models.Index(
                fields=["status", "lease_expires_at"], name="queued_storage_lease"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.storage_key}, {self.status})"

    def save(self, *args: Any, **kwargs: Any) -> None:
        self.name_hash = name_hash(self.name)
        super().save(*args, **kwargs)

    @staticmethod
    def done_changes(now: datetime) -> dict[str, Any]:
        """What a verified transfer writes on its row."""
        return {
            "status": PendingTransfer.Status.DONE,
            "remote_owned": True,
            "lease_token": "",
            "lease_expires_at": None,
            "next_attempt_at": None,
            "last_error": "",
            "transferred_at": now,
            "updated_at": now,
        }

    @staticmethod
    def hosts_here() -> tuple[str, str]:
        """The host rule: the ``host`` values of the rows whose local copy this host
        can reach when the storage keeps local copies on each host's own disk
        (``local_shared=False``). Only this host's processes read, transfer and
        remove the local copies of the rows it wrote. A row with no host (``""``)
        was written by no host's save (adoption records remote files, which have
        no local copy): no host's disk is the wrong one, so every host may take
        it, or nothing would transfer or purge it. With a shared local storage
        every host reaches every row."""
        return ("", conf.QUEUED_STORAGE_HOSTNAME)

    def local_copy_here(self, *, local_shared: bool) -> bool:
        """Whether this host can reach this row's local copy (see :meth:`hosts_here`)."""
        return local_shared or self.host in self.hosts_here()

    def has_live_lease(self, now: datetime | None = None) -> bool:
        now = now or timezone.now()
        return (
            self.status == self.Status.TRANSFERRING
            and self.lease_expires_at is not None
            and self.lease_expires_at > now
        )

    # Compare-and-set state changes for a worker holding this row's lease.

    def _leased(self) -> PendingTransferQuerySet:
        return PendingTransfer.objects.filter(
            pk=self.pk,
            generation=self.generation,
            lease_token=self.lease_token,
            status=self.Status.TRANSFERRING,
        )

    def holds_lease(self) -> bool:
        """Whether this worker's claim still stands: same generation and token, and
        the lease has not run out (then another worker may have taken the row).

        One query on the primary key, sent as plain SQL: it is made before every
        upload that may replace a remote object, and the ORM took longer to build
        it than the database to answer."""
        db = router.db_for_write(PendingTransfer)
        connection = connections[db]
        sql = lease_check_sql(PendingTransfer, db)
        expires_at = PendingTransfer._meta.get_field("lease_expires_at")
        assert isinstance(expires_at, models.DateTimeField)
        now = expires_at.get_db_prep_save(timezone.now(), connection)
        status = self.Status.TRANSFERRING.value
        params = [self.pk, self.generation, self.lease_token, status, now]
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchone() is not None

    def while_claimed(self) -> PendingTransferQuerySet:
        """This row, as long as this worker's claim on its generation stands."""
        return self._leased().filter(lease_expires_at__gt=timezone.now())

    def while_deleted(self) -> PendingTransferQuerySet:
        """This row, as long as it is the tombstone of this generation."""
        return PendingTransfer.objects.filter(
            pk=self.pk, generation=self.generation, deleted=True
        )

    def while_done(self) -> PendingTransferQuerySet:
        """This row, as long as its generation is the one recorded as done."""
        return PendingTransfer.objects.filter(
            pk=self.pk,
            generation=self.generation,
            status=self.Status.DONE,
            deleted=False,
        )

    @retry_when_locked
    def mark_done(self) -> bool:
        """Record the verified transfer; False if the lease or generation is stale."""
        now = timezone.now()
        won = self._leased().filter(deleted=False).update(**self.done_changes(now))
        if won:
            self.status = self.Status.DONE
            self.transferred_at = now
        return bool(won)

    @retry_when_locked
    def mark_failure(
        self,
        error: BaseException | str,
        *,
        retry: bool,
        max_retries: int,
        base_delay: float,
        owned: bool | None = None,
        message: str | None = None,
        counted: bool = True,
    ) -> str | None:
        """Record an attempt's error; back off or give up. ``owned``: True when the
        attempt's upload was sent (it may have written the remote object), False
        when the object there is not the ledger's, None when the attempt did not
        get as far as an upload. Returns the new status, or None when the lease or
        generation is stale. ``counted=False``: taken back, never the last."""
        now = timezone.now()
        entry = error_entry(
            error, self.attempts, now, message, started=self.attempt_started_at
        )
        errors = [*entries(self.error_history), entry][-ERROR_HISTORY_LENGTH:]
        gives_up = not retry or (counted and self.attempts > max_retries)
        changes: dict[str, Any] = {
            "lease_token": "",
            "lease_expires_at": None,
            "last_error": entry["text"],
            "error_history": errors,
            "updated_at": now,
        }
        if gives_up:
            changes.update(status=self.Status.FAILED, next_attempt_at=None)
        else:
            delay = retry_delay(self.attempts, base_delay)
            changes.update(
                status=self.Status.QUEUED,
                next_attempt_at=now + timedelta(seconds=delay),
            )
        if owned is not None:
            changes["remote_owned"] = owned
        if not counted:
            changes["attempts"] = max(self.attempts - 1, 0)
        db = router.db_for_write(PendingTransfer)
        try:
            with transaction.atomic(using=db):
                if not self._leased().update(**changes):
                    return None
                history.count_failure(self.storage_key, db)
        except history.HistoryUnavailable as error:
            # Rolled back: the error is kept without its count (see record_done()).
            history.not_counted(error, [self.storage_key], "1 failed attempt")
            with transaction.atomic(using=db):
                if not self._leased().update(**changes):
                    return None
        for field, value in changes.items():
            setattr(self, field, value)
        return str(changes["status"])

    @retry_when_locked
    def keep_error(
        self, error: BaseException | str, *, status: str, message: str | None = None
    ) -> bool:
        """Keep an error raised after this row's outcome was committed (a signal
        receiver, the local copy's removal) in its error history, and as its last
        error unless it has one: the outcome, ``status``, stands. False if the row
        has changed since."""
        now = timezone.now()
        mine = PendingTransfer.objects.filter(
            pk=self.pk, generation=self.generation, status=status
        )
        found = mine.values_list("error_history", "last_error").first()
        if found is None:
            return False
        history, last_error = found
        entry = error_entry(error, self.attempts, now, message=message)
        changes: dict[str, Any] = {
            "error_history": [*entries(history), entry][-ERROR_HISTORY_LENGTH:],
            "last_error": last_error or entry["text"],
        }
        if not mine.update(**changes):
            return False
        for field, value in changes.items():
            setattr(self, field, value)
        return True

    @retry_when_locked
    def release(self, *, held: bool) -> bool:
        """Hand a row back that a newer save changed under this worker's lease."""
        now = timezone.now()
        status = self.Status.HELD if held else self.Status.QUEUED
        return bool(
            PendingTransfer.objects.filter(
                pk=self.pk, lease_token=self.lease_token, deleted=False
            ).update(
                status=status,
                lease_token="",
                lease_expires_at=None,
                next_attempt_at=None if held else now,
                updated_at=now,
            )
        )

    def requeue_unverified(
        self, error: BaseException | str, *, host: str | None = None
    ) -> bool:
        """Queue a done row again whose remote copy failed a later check, keeping
        the error; the remote object is ours to replace. ``host``: the host whose
        disk holds the local copy to send (a row with no host would be any host's
        to take). False if the row changed."""
        now = timezone.now()
        hosted = {} if host is None else {"host": host}
        entry = error_entry(error, self.attempts, now)
        history = [*entries(self.error_history), entry][-ERROR_HISTORY_LENGTH:]
        return bool(
            PendingTransfer.objects.filter(
                pk=self.pk,
                generation=self.generation,
                status=self.Status.DONE,
                deleted=False,
            ).update(
                status=self.Status.QUEUED,
                attempts=0,
                next_attempt_at=now,
                remote_owned=True,
                transferred_at=None,
                last_error=entry["text"],
                error_history=history,
                updated_at=now,
                **hosted,
            )
        )

    @retry_when_locked
    def retry_now(self) -> bool:
        """Make this row, queued after a failed attempt, due at once (its error is
        kept). False if the row changed."""
        return bool(
            PendingTransfer.objects.filter(
                pk=self.pk, generation=self.generation, status=self.Status.QUEUED
            ).update(next_attempt_at=timezone.now())
        )

    @retry_when_locked
    def delete_tombstone(self) -> bool:
        """Remove this tombstone that this worker purged, unless a newer save took
        the name over (it keeps the lease: the row is then handed back) or another
        worker took the row over."""
        deleted, _counts = self._leased().filter(deleted=True).delete()
        return bool(deleted)
