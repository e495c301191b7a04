"""The ledger: one row per (storage key, file name), the job and the record of where
the file lives. Every state change is one short transaction with a compare-and-set."""

from __future__ import annotations

import functools
import hashlib
import logging
import random
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, ParamSpec, TypeVar

from django.db import (
    IntegrityError,
    OperationalError,
    connections,
    models,
    router,
    transaction,
)
from django.db.models import Case, F, Min, Q, Value, When
from django.db.models.constants import OnConflict
from django.db.models.functions import Coalesce
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from queued_storage import redaction
from queued_storage.conf import MAX_HOST_LENGTH
from queued_storage.conf import settings as conf
from queued_storage.names import MAX_NAME_LENGTH as MAX_NAME_LENGTH
from queued_storage.storage_state import StorageState as StorageState

#: How many entries of the error history a row keeps.
ERROR_HISTORY_LENGTH = 10
#: Error messages are cut to this length before they are stored.
ERROR_MESSAGE_LENGTH = 2000
#: Longest retry delay, whatever the attempt number.
MAX_RETRY_DELAY = 24 * 60 * 60
#: Times a claim reads the due rows again after other workers took all it read.
CLAIM_TRIES = 10
#: Tries of a worker's ledger statement that the database aborted over a lock.
LOCKED_TRIES = 5

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _lost_a_lock(error: OperationalError) -> bool:
    """A deadlock victim (MariaDB 1213, PostgreSQL), a lock wait that timed out
    (MariaDB 1205), or SQLite's busy timeout: the statement changed nothing."""
    code = error.args[0] if error.args else None
    text = str(error).lower()
    return code in (1205, 1213) or any(
        words in text
        for words in ("deadlock", "database is locked", "could not serialize")
    )


def retry_when_locked(func: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run a short ledger statement again, after a short random pause, when the
    database aborted it over a lock. Never inside the caller's transaction: the
    database rolled all of it back, and only the caller can start it again."""

    @functools.wraps(func)
    def retrying(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        for attempt in range(1, LOCKED_TRIES + 1):
            try:
                return func(*args, **kwargs)
            except OperationalError as error:
                db = router.db_for_write(PendingTransfer)
                if (
                    attempt == LOCKED_TRIES
                    or not _lost_a_lock(error)
                    or connections[db].in_atomic_block
                ):
                    raise
                logging.getLogger("queued_storage").info(
                    "ledger statement retried call=%s attempt=%s error=%s",
                    func.__name__,
                    attempt,
                    error,
                )
                time.sleep(random.uniform(0.01, 0.03) * 2**attempt)
        raise AssertionError("unreachable")

    return retrying


def name_hash(name: str) -> str:
    """The SHA-256 of a name: the unique key, since MariaDB cannot index 1024 chars."""
    return hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()


def new_generation() -> int:
    """A fresh generation number: later saves get larger numbers."""
    return time.time_ns()


@retry_when_locked
def reserve(
    db: str,
    key: str,
    name: str,
    *,
    size: int | None,
    host: str,
    held: bool,
    checksum: str = "",
) -> int | None:
    """Insert the row of a name the ledger has never seen into database ``db``;
    returns its generation, or None (and writes nothing) when the name has a row.
    One statement, on the save path: the unique index makes a save of the same
    name in another transaction wait for this one, then find the row."""
    now = timezone.now()
    generation = new_generation()
    status = PendingTransfer.Status.HELD if held else PendingTransfer.Status.QUEUED
    values = {
        "storage_key": key,
        "name": name,
        "name_hash": name_hash(name),
        "status": status.value,
        "generation": generation,
        "next_attempt_at": None if held else now,
        "size": size,
        "checksum": checksum,
        "host": host,
        "created_at": now,
        "updated_at": now,
    }
    statement = _RESERVE.get(db) or _reserve_statement(db)
    if statement is None:
        return generation if _insert_with_orm(values, None, db) else None
    sql, template, slot, when = statement
    connection = connections[db]
    sent_now = when(now, connection)
    params = list(template)
    for column, value in values.items():
        params[slot[column]] = sent_now if value is now else value
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return generation if cursor.rowcount else None


def retry_delay(attempt: int, base: float) -> float:
    """Exponential backoff with +-10 % jitter, capped at a day."""
    if base <= 0:
        return 0.0
    # The exponent is capped: 2**1024 and up overflows a float (huge retry limits).
    delay = min(base * 2 ** min(max(attempt - 1, 0), 64), MAX_RETRY_DELAY)
    return float(min(delay * random.uniform(0.9, 1.1), MAX_RETRY_DELAY))


class PendingTransferQuerySet(models.QuerySet["PendingTransfer"]):
    def for_name(self, key: str, name: str) -> PendingTransferQuerySet:
        return self.filter(storage_key=key, name_hash=name_hash(name))

    def live(self) -> PendingTransferQuerySet:
        return self.filter(deleted=False)

    def held(self) -> PendingTransferQuerySet:
        return self.filter(status=PendingTransfer.Status.HELD)

    def queued(self) -> PendingTransferQuerySet:
        return self.filter(status=PendingTransfer.Status.QUEUED)

    def transferring(self) -> PendingTransferQuerySet:
        return self.filter(status=PendingTransfer.Status.TRANSFERRING)

    def done(self) -> PendingTransferQuerySet:
        return self.filter(status=PendingTransfer.Status.DONE)

    def failed(self) -> PendingTransferQuerySet:
        return self.filter(status=PendingTransfer.Status.FAILED)

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
            .exclude(status=PendingTransfer.Status.DONE)
            .exclude(last_error="")
        )

    def errors_since(self, since: datetime) -> PendingTransferQuerySet:
        """Rows whose latest attempt failed at or after ``since`` (retrying or failed)."""
        return self.filter(
            status__in=[PendingTransfer.Status.QUEUED, PendingTransfer.Status.FAILED],
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
            Q(status=PendingTransfer.Status.QUEUED, next_attempt_at__lte=now)
            | Q(status=PendingTransfer.Status.TRANSFERRING, lease_expires_at__lt=now)
        )

    @retry_when_locked
    def claim_due(
        self,
        *,
        limit: int,
        lease: float,
        now: datetime | None = None,
    ) -> list[PendingTransfer]:
        """Take a lease on up to ``limit`` due rows of this queryset and return them.

        Each returned row carries ``claimed_from`` (its status before the claim) and
        ``was_owned`` (whether an earlier attempt may have written the remote object:
        one recorded an upload, or one whose lease ran out is taken over, which may
        have been writing when its worker died).
        """
        now = now or timezone.now()
        token = uuid.uuid4().hex
        db = router.db_for_write(PendingTransfer)
        locks = connections[db].features.has_select_for_update_skip_locked
        candidates: list[tuple[int, str, bool]] = []
        for _try in range(CLAIM_TRIES):
            if locks:
                with transaction.atomic(using=db):
                    rows = self._due_rows(now, limit, db)
                    candidates = [
                        (row.pk, row.status, row.remote_owned) for row in rows
                    ]
                    taken = self._take(candidates, token, now, lease, db)
                if taken == len(rows):
                    # Locked rows cannot change between the read and the UPDATE:
                    # its changes are applied here rather than read back.
                    return self._as_claimed(rows, token, now, lease)
            else:
                # Without SKIP LOCKED (SQLite) the conditional UPDATE in _take() is
                # what keeps two workers off one row: the database serialises it.
                candidates = self._candidates(now, limit, db)
                taken = self._take(candidates, token, now, lease, db)
            # Another worker took every row we read before our UPDATE ran: look
            # again, since "nothing claimed" ends a cron run with rows still due.
            if taken or not candidates:
                break
        if not candidates:
            return []
        return self._claimed(candidates, token, db)

    @staticmethod
    def _as_claimed(
        rows: list[PendingTransfer], token: str, now: datetime, lease: float
    ) -> list[PendingTransfer]:
        """``rows`` as read just before :meth:`_take` took them all, with its
        changes made here too."""
        expires = now + timedelta(seconds=lease)
        for row in rows:
            row.claimed_from = row.status
            row.was_owned = _owned_after_claim(row.status, row.remote_owned)
            row.status = PendingTransfer.Status.TRANSFERRING
            row.lease_token = token
            row.lease_expires_at = expires
            row.attempts += 1
            row.remote_owned = row.was_owned
            row.updated_at = now
        return rows

    def _claimed(
        self, candidates: list[tuple[int, str, bool]], token: str, db: str
    ) -> list[PendingTransfer]:
        """Read back the rows of ``candidates`` that the claim under ``token`` took."""
        before = {pk: (status, owned) for pk, status, owned in candidates}
        # By primary key: lease_token has no index, and a large ledger would be
        # read whole to find the batch.
        rows = list(
            PendingTransfer.objects.using(db)
            .filter(pk__in=list(before), lease_token=token)
            .order_by("next_attempt_at", "pk")
        )
        for row in rows:
            row.claimed_from, owned = before[row.pk]
            row.was_owned = _owned_after_claim(row.claimed_from, owned)
        return rows

    def _due_rows(self, now: datetime, limit: int, db: str) -> list[PendingTransfer]:
        """Up to ``limit`` due rows, locked, in the order they became due."""
        rows = self.using(db).select_for_update(skip_locked=True)
        if connections[db].vendor != "mysql":
            return list(rows.due(now).order_by("next_attempt_at", "pk")[:limit])
        # InnoDB sorts the rows of due()'s OR after reading, and locks every row it
        # reads: one claim locked the whole queue and a second worker's SKIP LOCKED
        # found nothing due. Each half alone is read in its index's order.
        expired = rows.filter(
            status=PendingTransfer.Status.TRANSFERRING, lease_expires_at__lt=now
        ).order_by("lease_expires_at", "pk")
        found = list(expired[:limit])
        if len(found) < limit:
            queued = rows.filter(
                status=PendingTransfer.Status.QUEUED, next_attempt_at__lte=now
            ).order_by("next_attempt_at", "pk")
            found += queued[: limit - len(found)]
        # One batch in the order the other databases read theirs in, NULLs first
        # as MariaDB sorts them.
        found.sort(
            key=lambda row: (
                row.next_attempt_at is not None,
                row.next_attempt_at or now,
                row.pk,
            )
        )
        return found

    def _candidates(
        self, now: datetime, limit: int, db: str
    ) -> list[tuple[int, str, bool]]:
        """Up to ``limit`` due rows, as (pk, status, remote_owned), unlocked."""
        due = self.using(db).due(now).order_by("next_attempt_at", "pk")
        return list(due.values_list("pk", "status", "remote_owned")[:limit])

    @staticmethod
    def _take(
        candidates: list[tuple[int, str, bool]],
        token: str,
        now: datetime,
        lease: float,
        db: str,
    ) -> int:
        # Each row is taken only in the state it was read in, so that ``was_owned``
        # is true: without row locks another worker may have claimed it since, and
        # recorded an upload, or died uploading, before its lease ran out.
        seen: dict[tuple[str, bool], list[int]] = {}
        for pk, status, owned in candidates:
            seen.setdefault((status, bool(owned)), []).append(pk)
        taken = 0
        for (status, owned), pks in seen.items():
            taken += (
                PendingTransfer.objects.using(db)
                .filter(pk__in=pks, status=status, remote_owned=owned)
                .due(now)
                .update(
                    status=PendingTransfer.Status.TRANSFERRING,
                    lease_token=token,
                    lease_expires_at=now + timedelta(seconds=lease),
                    attempts=F("attempts") + 1,
                    remote_owned=_owned_after_claim(status, owned),
                    updated_at=now,
                )
            )
        return taken

    @retry_when_locked
    def renew_lease(self, token: str, lease: float, *, pks: list[int]) -> int:
        """Push out the lease of the rows ``pks`` that are still held under
        ``token``: those whose transfers run, not the whole claim."""
        now = timezone.now()
        return self.filter(
            pk__in=pks, lease_token=token, status=PendingTransfer.Status.TRANSFERRING
        ).update(lease_expires_at=now + timedelta(seconds=lease), updated_at=now)

    @retry_when_locked
    def release_claim(self, rows: list[PendingTransfer]) -> int:
        """Give back claimed rows that were never started, each as it stands now.

        A row still in the generation it was claimed in is queued again with the
        claim's attempt taken back. One saved again or deleted since has a new
        generation whose save reset its attempts: it gets that generation's state
        (held, queued, or a tombstone due for its purge) and keeps its attempts. A
        row another worker took over has another token and is not ours."""
        if not rows:
            return 0
        now = timezone.now()
        db = getattr(self, "_db", None) or router.db_for_write(PendingTransfer)
        ours = Q()
        claimed = Q()
        for row in rows:
            ours |= Q(pk=row.pk, lease_token=row.lease_token)
            claimed |= Q(pk=row.pk, generation=row.generation)
        leased = self.using(db).filter(ours, status=PendingTransfer.Status.TRANSFERRING)
        released = {
            "lease_token": "",
            "lease_expires_at": None,
            "updated_at": now,
        }
        # A save with held=True leaves no next attempt; a tombstone is never held.
        held = Q(deleted=False, next_attempt_at__isnull=True)
        when = models.DateTimeField()
        with transaction.atomic(using=db):
            given = leased.filter(claimed).update(
                status=PendingTransfer.Status.QUEUED,
                next_attempt_at=now,
                attempts=F("attempts") - 1,
                **released,
            )
            given += leased.update(
                status=Case(
                    When(held, then=Value(PendingTransfer.Status.HELD.value)),
                    default=Value(PendingTransfer.Status.QUEUED.value),
                ),
                next_attempt_at=Case(
                    When(held, then=Value(None, output_field=when)),
                    default=Coalesce(
                        F("next_attempt_at"), Value(now, output_field=when)
                    ),
                ),
                **released,
            )
        return given

    def lock(self) -> bool:
        """Lock this queryset's rows until the end of the transaction it runs in;
        whether there were any. SQLite has no row locks: there an UPDATE that
        changes nothing takes the database's write lock, which serialises writers
        whatever the transaction mode (a read would not, in DEFERRED mode)."""
        if connections[self.db].features.has_select_for_update:
            locked = self.order_by().select_for_update().values_list("pk", flat=True)
            return bool(list(locked))
        return bool(self.update(updated_at=F("updated_at")))

    @retry_when_locked
    def claim_tombstone(
        self, pk: int, generation: int, *, lease: float, host: str | None = None
    ) -> PendingTransfer | None:
        """Take a lease on the tombstone ``(pk, generation)``, as a worker's claim
        does, unless a worker holds a live lease on the row (it finishes the purge
        then) or the name was saved again. ``host``: only a row that host wrote.
        Returns the claimed row, or None."""
        now = timezone.now()
        token = uuid.uuid4().hex
        rows = self.filter(pk=pk, generation=generation, deleted=True).filter(
            ~Q(status=PendingTransfer.Status.TRANSFERRING)
            | Q(lease_expires_at__isnull=True)
            | Q(lease_expires_at__lte=now)
        )
        if host is not None:
            rows = rows.filter(host=host)
        taken = rows.update(
            # As _owned_after_claim(): taken over from a worker whose lease ran out.
            # Before status: MariaDB and MySQL assign an UPDATE's columns left to
            # right, each seeing the values assigned before it, and would read the
            # status set here (every claimed tombstone owning the object there).
            remote_owned=Case(
                When(status=PendingTransfer.Status.TRANSFERRING, then=Value(True)),
                default=F("remote_owned"),
            ),
            status=PendingTransfer.Status.TRANSFERRING,
            lease_token=token,
            lease_expires_at=now + timedelta(seconds=lease),
            attempts=F("attempts") + 1,
            updated_at=now,
        )
        if not taken:
            return None
        row = self.filter(pk=pk, lease_token=token).first()
        if row is not None:
            row.claimed_from = PendingTransfer.Status.QUEUED
            row.was_owned = row.remote_owned
        return row

    @retry_when_locked
    def mark_done_together(self, rows: list[PendingTransfer]) -> int:
        """Record the verified transfers of ``rows`` in one statement, each row under
        its own compare-and-set on (row, generation, lease token); returns how many
        rows won. The caller decides what to do when that is not all of them."""
        if not rows:
            return 0
        now = timezone.now()
        changes = done_changes(now)
        db = getattr(self, "_db", None) or router.db_for_write(PendingTransfer)
        connection = connections[db]
        quote = connection.ops.quote_name
        # Plain SQL with a row-value IN: the ORM takes longer to build an OR of
        # fifty (pk, generation, token) conditions than the database to run it.
        # PostgreSQL gets the keys as three arrays: a client-side cursor parses
        # every placeholder of a statement, and three per row were a quarter of the
        # completion's cost.
        table = quote(PendingTransfer._meta.db_table)
        keys = (
            f"({quote(_column('id'))}, {quote(_column('generation'))},"
            f" {quote(_column('lease_token'))})"
        )
        key_params: list[Any]
        if connection.vendor == "postgresql":
            pks = [row.pk for row in rows]
            match = (
                f"{quote(_column('id'))} = ANY(%s) AND {keys} IN"
                " (SELECT * FROM unnest(%s::bigint[], %s::bigint[], %s::text[]))"
            )
            key_params = [
                pks,
                pks,
                [row.generation for row in rows],
                [row.lease_token for row in rows],
            ]
        else:
            match = f"{keys} IN (" + ", ".join(["(%s, %s, %s)"] * len(rows)) + ")"
            key_params = [
                value
                for row in rows
                for value in (row.pk, row.generation, row.lease_token)
            ]
        sql = (
            f"UPDATE {table} SET "
            + ", ".join(f"{quote(_column(name))} = %s" for name in changes)
            + f" WHERE {quote(_column('status'))} = %s"
            f" AND {quote(_column('deleted'))} = %s AND {match}"
        )
        params = [
            _db_value(PendingTransfer._meta.get_field(name), value, connection)  # type: ignore[arg-type]
            for name, value in changes.items()
        ]
        params += [PendingTransfer.Status.TRANSFERRING.value, False, *key_params]
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            won = int(cursor.rowcount)
        if won == len(rows):
            for row in rows:
                row.status = PendingTransfer.Status.DONE
                row.transferred_at = now
        return won

    @retry_when_locked
    def requeue(self, now: datetime | None = None) -> int:
        """Make held, failed and waiting rows due now, with their attempts reset."""
        now = now or timezone.now()
        return self.filter(
            status__in=[
                PendingTransfer.Status.HELD,
                PendingTransfer.Status.QUEUED,
                PendingTransfer.Status.FAILED,
            ]
        ).update(
            status=PendingTransfer.Status.QUEUED,
            attempts=0,
            next_attempt_at=now,
            last_error="",
            updated_at=now,
        )

    def hold(self, now: datetime | None = None) -> int:
        """Park queued and failed rows until they are queued again; tombstones and
        rows a worker holds are left alone."""
        now = now or timezone.now()
        return self.filter(
            status__in=[PendingTransfer.Status.QUEUED, PendingTransfer.Status.FAILED],
            deleted=False,
        ).update(
            status=PendingTransfer.Status.HELD,
            next_attempt_at=None,
            updated_at=now,
        )

    def _fresh(
        self, *, size: int | None, host: str, held: bool, checksum: str, now: datetime
    ) -> dict[str, Any]:
        """The columns every save writes: a new generation, nothing tried yet."""
        return {
            "generation": new_generation(),
            "deleted": False,
            "attempts": 0,
            "next_attempt_at": None if held else now,
            "size": size,
            "checksum": checksum,
            "last_error": "",
            "error_history": [],
            "host": host,
            "transferred_at": None,
            "updated_at": now,
        }

    def _new_row(
        self, key: str, name: str, held: bool, fresh: dict[str, Any], now: datetime
    ) -> dict[str, Any]:
        status = PendingTransfer.Status.HELD if held else PendingTransfer.Status.QUEUED
        return {
            "storage_key": key,
            "name": name,
            "name_hash": name_hash(name),
            "status": status,
            "lease_token": "",
            "lease_expires_at": None,
            "created_at": now,
            **fresh,
        }

    def leave_tombstone(self, key: str, name: str, host: str) -> bool:
        """Insert a due tombstone for ``name``, which has no row, so that a worker
        holding its lease removes an object a late upload left at the name; True
        if inserted, False (nothing written) when the name has a row again."""
        now = timezone.now()
        row = PendingTransfer(
            storage_key=key,
            name=name,
            name_hash=name_hash(name),
            deleted=True,
            remote_owned=True,
            next_attempt_at=now,
            host=host,
            created_at=now,
            updated_at=now,
        )
        db = getattr(self, "_db", None) or router.db_for_write(PendingTransfer)
        PendingTransfer.objects.using(db).bulk_create([row], ignore_conflicts=True)
        return (
            PendingTransfer.objects.using(db)
            .filter(storage_key=key, name_hash=row.name_hash, generation=row.generation)
            .exists()
        )

    @retry_when_locked
    def unreserve(self, key: str, name: str, generation: int) -> int:
        """Remove a row :func:`reserve` wrote whose file was not saved under its
        name (the local storage failed, or chose another name)."""
        deleted, _counts = (
            self.for_name(key, name).filter(generation=generation).delete()
        )
        return deleted

    @retry_when_locked
    def record_file(
        self, key: str, name: str, generation: int, size: int, checksum: str
    ) -> int:
        """Correct the size and checksum of a reserved row to the saved file's."""
        return (
            self.for_name(key, name)
            .filter(generation=generation)
            .update(size=size, checksum=checksum)
        )

    @retry_when_locked
    def record_save(
        self,
        *,
        key: str,
        name: str,
        size: int | None,
        host: str,
        held: bool,
        checksum: str = "",
        existing: bool,
    ) -> int:
        """Write the row for a file just saved locally; returns its generation.

        A re-save of a name whose worker still holds a lease keeps that lease: the
        worker finds the new generation when it completes, and hands the row back.
        """
        now = timezone.now()
        fresh = self._fresh(size=size, host=host, held=held, checksum=checksum, now=now)
        generation = int(fresh["generation"])
        status = PendingTransfer.Status.HELD if held else PendingTransfer.Status.QUEUED
        if existing:
            leased = Q(
                status=PendingTransfer.Status.TRANSFERRING, lease_expires_at__gt=now
            )
            updated = self.for_name(key, name).update(
                status=Case(When(leased, then=F("status")), default=Value(status)),
                lease_token=Case(
                    When(leased, then=F("lease_token")), default=Value("")
                ),
                lease_expires_at=Case(
                    When(leased, then=F("lease_expires_at")), default=Value(None)
                ),
                **fresh,
            )
            if updated:
                return generation
        db = getattr(self, "_db", None) or router.db_for_write(PendingTransfer)
        _insert(
            self._new_row(key, name, held, fresh, now),
            ["status", "lease_token", "lease_expires_at", *fresh],
            db,
        )
        return generation

    def state_of(self, key: str, name: str) -> tuple[str, bool, int | None] | None:
        """``(status, deleted, size)`` of the row of ``name``, or None: one query on
        the unique index, sent as plain SQL (building it with the ORM costs several
        times the query on the request path). Ignores this queryset's filters."""
        db = self.db
        connection = connections[db]
        sql = _SQL.get((db, "state"))
        if sql is None:
            quote = connection.ops.quote_name
            status, deleted, size, key_column, hash_column = (
                quote(_column(field))
                for field in ("status", "deleted", "size", "storage_key", "name_hash")
            )
            table = quote(PendingTransfer._meta.db_table)
            sql = _SQL[(db, "state")] = (
                f"SELECT {status}, {deleted}, {size} FROM {table} "
                f"WHERE {key_column} = %s AND {hash_column} = %s"
            )
        with connection.cursor() as cursor:
            cursor.execute(sql, [key, name_hash(name)])
            found = cursor.fetchone()
        if found is None:
            return None
        return str(found[0]), bool(found[1]), found[2]

    @retry_when_locked
    def record_delete(self, key: str, name: str) -> PendingTransfer:
        """Turn the row of ``name`` into a tombstone (creating one if needed).

        A tombstone hides the name at once; the files go after commit, and a worker
        that holds a lease on the row finishes the job when it sees it.
        """
        try:
            return self._tombstone(key, name)
        except IntegrityError:
            # A save of the name inserted its row (still uncommitted when we looked)
            # while ours waited for it: PostgreSQL reports the duplicate where
            # MariaDB's locking read waits and finds the row. That row is ours now.
            return self._tombstone(key, name)

    def _tombstone(self, key: str, name: str) -> PendingTransfer:
        now = timezone.now()
        with transaction.atomic(using=router.db_for_write(PendingTransfer)):
            row = self.select_for_update().for_name(key, name).first()
            if row is None:
                # A file that predates the ledger: it may be on either side.
                row = PendingTransfer(
                    storage_key=key,
                    name=name,
                    name_hash=name_hash(name),
                    remote_owned=True,
                    host=conf.QUEUED_STORAGE_HOSTNAME,
                    created_at=now,
                )
            row.deleted = True
            row.generation = new_generation()
            row.updated_at = now
            if not row.has_live_lease(now):
                row.status = PendingTransfer.Status.QUEUED
                row.next_attempt_at = now
                row.lease_token = ""
                row.lease_expires_at = None
                row.attempts = 0
            row.save()
        return row


class PendingTransfer(models.Model):
    """A file saved locally, and where it is on its way to the remote."""

    class Status(models.TextChoices):
        HELD = "held", _("held")
        QUEUED = "queued", _("queued")
        TRANSFERRING = "transferring", _("transferring")
        DONE = "done", _("done")
        FAILED = "failed", _("failed")

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

    class Meta:
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
        sql = _SQL.get((db, "leased"))
        if sql is None:
            quote = connection.ops.quote_name
            pk, generation, token, status, expires = (
                quote(_column(field))
                for field in (
                    "id",
                    "generation",
                    "lease_token",
                    "status",
                    "lease_expires_at",
                )
            )
            sql = _SQL[(db, "leased")] = (
                f"SELECT 1 FROM {quote(PendingTransfer._meta.db_table)} "
                f"WHERE {pk} = %s AND {generation} = %s AND {token} = %s "
                f"AND {status} = %s AND {expires} > %s"
            )
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
        won = self._leased().filter(deleted=False).update(**done_changes(now))
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
    ) -> str | None:
        """Record an attempt's error; back off or give up. ``owned``: True when the
        attempt's upload was sent (it may have written the remote object), False
        when the object there is not the ledger's, None when the attempt did not
        get as far as an upload. Returns the new status, or None when the lease or
        generation is stale."""
        now = timezone.now()
        entry = error_entry(error, self.attempts, now, message=message)
        history = [*list(self.error_history or []), entry][-ERROR_HISTORY_LENGTH:]
        gives_up = not retry or self.attempts > max_retries
        changes: dict[str, Any] = {
            "lease_token": "",
            "lease_expires_at": None,
            "last_error": entry["text"],
            "error_history": history,
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
            "error_history": [*list(history or []), entry][-ERROR_HISTORY_LENGTH:],
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

    def requeue_unverified(self, error: BaseException | str) -> bool:
        """Queue a done row again whose remote copy failed a later check, keeping
        the error; the remote object is ours to replace. False if the row changed."""
        now = timezone.now()
        entry = error_entry(error, self.attempts, now)
        history = [*list(self.error_history or []), entry][-ERROR_HISTORY_LENGTH:]
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


#: SQL text of the hot statements, built once per database alias.
_SQL: dict[tuple[str, str], str] = {}
#: Per database alias, what :func:`_insert` writes (see :func:`_insert_plan`).
_Plan = list[tuple[str, "models.Field[Any, Any]", bool, Any]]
#: Per database alias: what :func:`reserve` sends (see :func:`_reserve_statement`).
_Reserve = tuple[str, list[Any], dict[str, int], Callable[[datetime, Any], Any]]
_RESERVE: dict[str, _Reserve | None] = {}
#: In a plan: the default is computed by each insert (a callable such as now()).
_CALL_DEFAULT = object()
_PLANS: dict[str, _Plan | None] = {}


#: Field types whose Python values (str, int, bool, None) go to every database
#: driver unchanged.
_PLAIN_TYPES = frozenset(
    [
        "BigIntegerField",
        "BooleanField",
        "CharField",
        "IntegerField",
        "PositiveBigIntegerField",
        "PositiveIntegerField",
        "PositiveSmallIntegerField",
        "SmallIntegerField",
        "TextField",
    ]
)


def _db_value(field: models.Field[Any, Any], value: Any, connection: Any) -> Any:
    if value is None or (
        type(value) in (str, int, bool) and field.get_internal_type() in _PLAIN_TYPES
    ):
        return value
    return field.get_db_prep_save(value, connection)


def _insert_plan(connection: Any) -> _Plan | None:
    """(name, field, whether its plain values go to the driver unchanged) of each
    column an insert writes, in order; None if a field needs SQL of its own."""
    if connection.alias not in _PLANS:
        fields = [
            field
            for field in PendingTransfer._meta.concrete_fields
            if not field.primary_key
        ]
        _PLANS[connection.alias] = (
            None
            if any(hasattr(field, "get_placeholder") for field in fields)
            else [
                (
                    field.name,
                    field,
                    field.get_internal_type() in _PLAIN_TYPES,
                    _prepared_default(field, connection),
                )
                for field in fields
            ]
        )
    return _PLANS[connection.alias]


def _prepared_default(field: models.Field[Any, Any], connection: Any) -> Any:
    """The database value of ``field``'s default, when it is the same every time
    (``list`` makes a new empty list each time, an equal one)."""
    default = field.default
    if default is models.NOT_PROVIDED or default is list or not callable(default):
        return _db_value(field, field.get_default(), connection)
    return _CALL_DEFAULT


def _insert_sql(connection: Any, plan: _Plan, update_fields: list[str] | None) -> str:
    """``INSERT`` of every column of ``plan``; when the name has a row, update
    ``update_fields`` of it, or with None, leave it alone."""
    on_conflict = OnConflict.IGNORE if update_fields is None else OnConflict.UPDATE
    ops = connection.ops
    fields = [field for _name, field, _plain, _default in plan]
    suffix = ops.on_conflict_suffix_sql(
        fields,
        on_conflict,
        [_column(name) for name in update_fields or ()],
        [_column(name) for name in _conflict_target(connection) or ()],
    )
    columns = ", ".join(ops.quote_name(_column(field.name)) for field in fields)
    return (
        f"{ops.insert_statement(on_conflict=on_conflict)} "
        f"{ops.quote_name(PendingTransfer._meta.db_table)} ({columns}) "
        f"VALUES ({', '.join(['%s'] * len(fields))}) {suffix}"
    ).rstrip()


def _insert(values: dict[str, Any], update_fields: list[str], db: str) -> None:
    """Insert a row of ``values`` (defaults for the fields not given), or update
    ``update_fields`` of the row that has its name: what
    ``bulk_create(update_conflicts=True)`` sends, with the SQL built once (the
    ORM's per-call cost was most of a save's)."""
    connection = connections[db]
    plan = _insert_plan(connection)
    if plan is None:
        _insert_with_orm(values, update_fields, db)
        return
    cache_key = (db, "upsert:" + ",".join(update_fields))
    sql = _SQL.get(cache_key)
    if sql is None:
        sql = _SQL[cache_key] = _insert_sql(connection, plan, update_fields)
    params = []
    # The same datetime goes to several columns: prepared once per field type.
    prepared: dict[tuple[int, type], Any] = {}
    for name, field, plain, default in plan:
        if name in values:
            value = values[name]
        elif default is not _CALL_DEFAULT:
            params.append(default)
            continue
        else:
            value = field.get_default()
        if value is None or (plain and type(value) in (str, int, bool)):
            params.append(value)
            continue
        seen = (id(value), type(field))
        if seen not in prepared:
            prepared[seen] = field.get_db_prep_save(value, connection)
        params.append(prepared[seen])
    with connection.cursor() as cursor:
        cursor.execute(sql, params)


def _insert_with_orm(
    values: dict[str, Any], update_fields: list[str] | None, db: str
) -> int:
    """:func:`_insert` (or :func:`reserve`, ``update_fields=None``) for a database
    whose fields need placeholders of their own. Returns the rows written."""
    manager = PendingTransfer.objects.using(db)
    row = PendingTransfer(**values)
    if update_fields is None:
        manager.bulk_create([row], ignore_conflicts=True)
        return int(manager.filter(generation=row.generation).exists())
    manager.bulk_create(
        [row],
        update_conflicts=True,
        unique_fields=_conflict_target(connections[db]),
        update_fields=update_fields,
    )
    return 1


def _reserve_statement(db: str) -> _Reserve | None:
    """The INSERT of :func:`reserve` for database ``db``, its parameters with the
    columns a new row always has filled in, where the others go, and how a
    datetime is sent; None where the ORM must build it."""
    connection = connections[db]
    plan = _insert_plan(connection)
    if plan is None:
        return None
    sql = _insert_sql(connection, plan, None)
    # reserve() fills the columns whose default is computed per row.
    template = [
        None if default is _CALL_DEFAULT else default
        for _name, _field, _plain, default in plan
    ]
    slot = {name: index for index, (name, *_rest) in enumerate(plan)}
    created = PendingTransfer._meta.get_field("created_at")
    assert isinstance(created, models.DateTimeField)

    def when(now: datetime, connection: Any) -> Any:
        return created.get_db_prep_save(now, connection)

    _RESERVE[db] = (sql, template, slot, when)
    return _RESERVE[db]


def _column(field_name: str) -> str:
    field = PendingTransfer._meta.get_field(field_name)
    assert isinstance(field, models.Field) and field.column
    return str(field.column)


def _conflict_target(connection: Any) -> list[str] | None:
    # MySQL/MariaDB's ON DUPLICATE KEY UPDATE takes no target.
    if connection.features.supports_update_conflicts_with_target:
        return ["storage_key", "name_hash"]
    return None


def _owned_after_claim(status: str, owned: bool) -> bool:
    """Whether a claimed row owns its remote object: an earlier attempt recorded
    an upload, or the row is taken over from a worker whose lease ran out, which
    may have been writing it when it died."""
    return bool(owned) or status == PendingTransfer.Status.TRANSFERRING


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


def error_entry(
    error: BaseException | str,
    attempt: int,
    now: datetime,
    message: str | None = None,
) -> dict[str, Any]:
    """What the ledger keeps of an error: class, message, attempt and time.
    ``message`` replaces the error's own text; either is kept without the
    secrets of any storage this process built."""
    if isinstance(error, BaseException):
        kind = type(error).__name__
        text = str(error)
    else:
        kind, text = "TransferError", error
    if message is None:
        message = text
    message = redaction.redact(None, message)[:ERROR_MESSAGE_LENGTH]
    return {
        "attempt": attempt,
        "at": now.isoformat(),
        "error": kind,
        "message": message,
        "text": f"{kind}: {message}" if message else kind,
    }
