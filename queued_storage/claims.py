"""How workers take rows: claiming due rows under a lease, renewing and giving
back leases, taking a tombstone's purge, and recording a batch done. Mixed into the
ledger's QuerySet; every change is a compare-and-set on the lease token."""

from __future__ import annotations

import uuid
import weakref
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.db import connections, models, router, transaction
from django.db.models import Case, F, Q, Value, When
from django.db.models.functions import Coalesce
from django.utils import timezone

from queued_storage.ledger_sql import (
    STATEMENTS,
    column,
    db_value,
    retry_when_locked,
)
from queued_storage.prepared import Prepared

if TYPE_CHECKING:
    from queued_storage.models import PendingTransfer, PendingTransferQuerySet

    class _LedgerQuerySet(models.QuerySet["PendingTransfer"]):
        # Defined on the model's QuerySet, which mixes this class in.
        def for_name(self, key: str, name: str) -> PendingTransferQuerySet: ...
        def due(self, now: datetime | None = None) -> PendingTransferQuerySet: ...

else:
    _LedgerQuerySet = models.QuerySet

#: The due rows' SELECT of each queryset that claimed (kept out of the
#: queryset, which is pickled and copied with what it holds).
_DUE: weakref.WeakKeyDictionary[Any, Prepared[Any]] = weakref.WeakKeyDictionary()

#: Times a claim reads the due rows again after other workers took all it read.
CLAIM_TRIES = 10
#: Rows given back per statement (see release_claim).
RELEASE_PIECE = 200
#: Rows recorded done per statement where each takes three placeholders (all
#: databases but PostgreSQL, which gets arrays): SQLite before 3.32 allows 999.
DONE_PIECE = 300


class ClaimsQuerySet(_LedgerQuerySet):
    """The worker's side of the ledger's QuerySet."""

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
        db = router.db_for_write(self.model)
        features = connections[db].features
        if not features.has_select_for_update_skip_locked:
            if connections[db].vendor != "sqlite":
                # No SKIP LOCKED (MariaDB before 10.6, MySQL 5.7): unlocked
                # reads, and the rows the UPDATE took are read back.
                return self._claim_unlocked(now, limit, token, lease, db)
            if not self.using(db).due(now).exists():
                # Nothing due: a poll takes no write lock, which would refuse a
                # DEFERRED transaction's write that follows its read, and would
                # raise in the caller's transaction if that one is stale.
                return []
        candidates: list[tuple[int, str, bool]] = []
        for _try in range(CLAIM_TRIES):
            with transaction.atomic(using=db):
                if not features.has_select_for_update:
                    # SQLite has no row locks: the claim holds the database's
                    # write lock from its first statement, so that no other
                    # writer commits between the read and the UPDATE.
                    self._hold_write_lock(db)
                rows = self._due_rows(now, limit, db)
                candidates = [(row.pk, row.status, row.remote_owned) for row in rows]
                taken = self._take(candidates, token, now, lease, db)
            if taken == len(rows):
                # Locked rows (or, on SQLite, a locked database) cannot change
                # between the read and the UPDATE: its changes are applied here
                # rather than read back.
                return self._as_claimed(rows, token, now, lease)
            # Another worker took every row we read before our UPDATE ran: look
            # again, since "nothing claimed" ends a cron run with rows still due.
            if taken or not candidates:
                break
        if not candidates:
            return []
        return self._claimed(candidates, token, db)

    def _claim_unlocked(
        self, now: datetime, limit: int, token: str, lease: float, db: str
    ) -> list[PendingTransfer]:
        """:meth:`claim_due` on a server without SKIP LOCKED: the conditional
        UPDATE is what keeps two workers off one row, and the rows it took are
        read back (one saved again between the read and the UPDATE has changed)."""
        candidates: list[tuple[int, str, bool]] = []
        for _try in range(CLAIM_TRIES):
            due = self.using(db).due(now).order_by("next_attempt_at", "pk")
            candidates = list(due.values_list("pk", "status", "remote_owned")[:limit])
            taken = self._take(candidates, token, now, lease, db)
            if taken or not candidates:
                break
        if not candidates:
            return []
        return self._claimed(candidates, token, db)

    def _as_claimed(
        self, rows: list[PendingTransfer], token: str, now: datetime, lease: float
    ) -> list[PendingTransfer]:
        """``rows`` as read just before :meth:`_take` took them all, with its
        changes made here too."""
        expires = now + timedelta(seconds=lease)
        for row in rows:
            row.claimed_from = row.status
            row.was_owned = self._owned_after_claim(row.status, row.remote_owned)
            row.status = self.model.Status.TRANSFERRING
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
            self.model.objects.using(db)
            .filter(pk__in=list(before), lease_token=token)
            .order_by("next_attempt_at", "pk")
        )
        for row in rows:
            row.claimed_from, owned = before[row.pk]
            row.was_owned = self._owned_after_claim(row.claimed_from, owned)
        return rows

    def _due_rows(self, now: datetime, limit: int, db: str) -> list[PendingTransfer]:
        """Up to ``limit`` due rows, locked, in the order they became due."""
        if connections[db].vendor != "mysql":
            # Compiled once per connection and limit for this queryset (a drain
            # claims with one queryset, batch after batch).
            due = _DUE.get(self)
            if due is None:
                field = self.model._meta.get_field("next_attempt_at")
                due = _DUE[self] = Prepared(self._due_query, field, 2)
            return due.objects(db, now, limit)
        rows = self.using(db).select_for_update(skip_locked=True)
        # InnoDB sorts the rows of due()'s OR after reading, and locks every row it
        # reads: one claim locked the whole queue and a second worker's SKIP LOCKED
        # found nothing due. Each half alone is read in its index's order.
        expired = rows.filter(
            status=self.model.Status.TRANSFERRING, lease_expires_at__lt=now
        ).order_by("lease_expires_at", "pk")
        found = list(expired[:limit])
        if len(found) < limit:
            queued = rows.filter(
                status=self.model.Status.QUEUED, next_attempt_at__lte=now
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

    def _due_query(self, db: str, now: datetime, limit: int) -> PendingTransferQuerySet:
        """The SELECT of :meth:`_due_rows` (``now`` appears twice in it)."""
        rows = self.using(db).select_for_update(skip_locked=True).due(now)
        return rows.order_by("next_attempt_at", "pk")[:limit]

    def _hold_write_lock(self, db: str) -> None:
        """Take SQLite's write lock for the transaction this runs in, unless its
        BEGIN took it (``transaction_mode`` IMMEDIATE or EXCLUSIVE). From here to
        its end no other connection commits a write: in DEFERRED mode a read
        followed by a write would leave a window between them (which SQLite
        reports as "database is locked" at the write, in WAL mode and with a
        rollback journal, once another writer has taken the lock)."""
        connection = connections[db]
        if getattr(connection, "transaction_mode", None) in ("IMMEDIATE", "EXCLUSIVE"):
            return
        sql = STATEMENTS.get((db, "write lock"))
        if sql is None:
            quote = connection.ops.quote_name
            pk = quote(column(self.model, "id"))
            # An UPDATE takes the write lock when it starts, whatever it matches.
            sql = STATEMENTS[(db, "write lock")] = (
                f"UPDATE {quote(self.model._meta.db_table)} SET {pk} = {pk}"
                f" WHERE {pk} = -1"
            )
        with connection.cursor() as cursor:
            cursor.execute(sql)

    def _take(
        self,
        candidates: list[tuple[int, str, bool]],
        token: str,
        now: datetime,
        lease: float,
        db: str,
    ) -> int:
        """Lease ``candidates`` under ``token``: how many rows it took."""
        # Each row is taken only in the state it was read in, so that ``was_owned``
        # is true: without row locks another worker may have claimed it since, and
        # recorded an upload, or died uploading, before its lease ran out.
        seen: dict[tuple[str, bool], list[int]] = {}
        for pk, status, owned in candidates:
            seen.setdefault((status, bool(owned)), []).append(pk)
        if not seen:
            return 0
        connection = connections[db]
        when = self.model._meta.get_field("lease_expires_at")
        expires = db_value(when, now + timedelta(seconds=lease), connection)
        at = db_value(when, now, connection)
        Status = self.model.Status
        taken = 0
        with connection.cursor() as cursor:
            for (status, owned), pks in seen.items():
                # Plain SQL: the ORM took longer to build an IN of 200 keys than
                # the database to run the UPDATE.
                sql, pk_params = self._take_sql(connection, db, status, pks)
                cursor.execute(
                    sql,
                    [
                        Status.TRANSFERRING.value,
                        token,
                        expires,
                        self._owned_after_claim(status, owned),
                        at,
                        status,
                        owned,
                        at,
                        *pk_params,
                    ],
                )
                taken += int(cursor.rowcount)
        return taken

    def _take_sql(
        self, connection: Any, db: str, status: str, pks: list[int]
    ) -> tuple[str, list[Any]]:
        """The UPDATE of :meth:`_take` for rows ``pks`` read in ``status``, and the
        parameters that name the rows. Its condition is due()'s for that status."""
        model = self.model
        postgresql = connection.vendor == "postgresql"
        head = STATEMENTS.get((db, f"take {status}"))
        if head is None:
            quote = connection.ops.quote_name

            def col(name: str) -> str:
                return str(quote(column(model, name)))

            due = (
                f"{col('next_attempt_at')} <= %s"
                if status == model.Status.QUEUED
                else f"{col('lease_expires_at')} < %s"
            )
            head = STATEMENTS[(db, f"take {status}")] = (
                f"UPDATE {quote(model._meta.db_table)} SET {col('status')} = %s,"
                f" {col('lease_token')} = %s, {col('lease_expires_at')} = %s,"
                f" {col('attempts')} = {col('attempts')} + 1,"
                f" {col('remote_owned')} = %s, {col('updated_at')} = %s"
                f" WHERE {col('status')} = %s AND {col('remote_owned')} = %s"
                f" AND {due} AND {col('id')} "
            )
        # The keys go last, as one array on PostgreSQL (see mark_done_together).
        if postgresql:
            return head + "= ANY(%s)", [pks]
        return head + "IN (" + ", ".join(["%s"] * len(pks)) + ")", pks

    @retry_when_locked
    def renew_lease(self, token: str, lease: float, *, pks: list[int]) -> int:
        """Push out the lease of the rows ``pks`` that are still held under
        ``token``: those whose transfers run, not the whole claim."""
        now = timezone.now()
        return self.filter(
            pk__in=pks, lease_token=token, status=self.model.Status.TRANSFERRING
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
        db = getattr(self, "_db", None) or router.db_for_write(self.model)
        given = 0
        with transaction.atomic(using=db):
            # In pieces: SQLite refuses an expression tree deeper than 1,000 (an
            # OR of that many conditions), and a claim may hold more rows.
            for start in range(0, len(rows), RELEASE_PIECE):
                piece = rows[start : start + RELEASE_PIECE]
                given += self._release(piece, now, db)
        return given

    def _release(self, rows: list[PendingTransfer], now: datetime, db: str) -> int:
        """:meth:`release_claim` of up to :data:`RELEASE_PIECE` rows, in its
        transaction."""
        ours = Q()
        claimed = Q()
        for row in rows:
            ours |= Q(pk=row.pk, lease_token=row.lease_token)
            claimed |= Q(pk=row.pk, generation=row.generation)
        leased = self.using(db).filter(ours, status=self.model.Status.TRANSFERRING)
        released = {
            "lease_token": "",
            "lease_expires_at": None,
            "updated_at": now,
        }
        # A save with held=True leaves no next attempt; a tombstone is never held.
        held = Q(deleted=False, next_attempt_at__isnull=True)
        when = models.DateTimeField()
        given = leased.filter(claimed).update(
            status=self.model.Status.QUEUED,
            next_attempt_at=now,
            attempts=F("attempts") - 1,
            **released,
        )
        given += leased.update(
            status=Case(
                When(held, then=Value(self.model.Status.HELD.value)),
                default=Value(self.model.Status.QUEUED.value),
            ),
            next_attempt_at=Case(
                When(held, then=Value(None, output_field=when)),
                default=Coalesce(F("next_attempt_at"), Value(now, output_field=when)),
            ),
            **released,
        )
        return given

    def lock(self) -> bool:
        """Lock this queryset's rows until the end of the transaction it runs in;
        whether there were any. SQLite has no row locks: there an UPDATE that
        changes nothing takes the database's write lock, which serialises writers
        whatever the transaction mode (a read would not, in DEFERRED mode)."""
        return bool(self.locked())

    def locked(self) -> int:
        """:meth:`lock`, returning how many rows it locked."""
        if connections[self.db].features.has_select_for_update:
            locked = self.order_by().select_for_update().values_list("pk", flat=True)
            return len(list(locked))
        return int(self.update(updated_at=F("updated_at")))

    @retry_when_locked
    def claim_tombstone(
        self, pk: int, generation: int, *, lease: float, local_shared: bool = True
    ) -> PendingTransfer | None:
        """Take a lease on the tombstone ``(pk, generation)``, as a worker's claim
        does, unless a worker holds a live lease on the row (it finishes the purge
        then), the name was saved again, or the purge ran out of attempts (failed:
        a late purge must not count one more; a requeue gives it new ones).
        ``local_shared=False``: only a row whose local copy this host reaches
        (``PendingTransfer.hosts_here()``). Returns the claimed row, or None."""
        now = timezone.now()
        token = uuid.uuid4().hex
        rows = (
            self.filter(pk=pk, generation=generation, deleted=True)
            # Held: an audit's tombstone, purged by that audit only.
            .exclude(status__in=[self.model.Status.FAILED, self.model.Status.HELD])
            .filter(
                ~Q(status=self.model.Status.TRANSFERRING)
                | Q(lease_expires_at__isnull=True)
                | Q(lease_expires_at__lte=now)
            )
        )
        if not local_shared:
            rows = rows.filter(host__in=self.model.hosts_here())
        taken = rows.update(
            # As _owned_after_claim(): taken over from a worker whose lease ran out.
            # Before status: MariaDB and MySQL assign an UPDATE's columns left to
            # right, each seeing the values assigned before it, and would read the
            # status set here (every claimed tombstone owning the object there).
            remote_owned=Case(
                When(status=self.model.Status.TRANSFERRING, then=Value(True)),
                default=F("remote_owned"),
            ),
            status=self.model.Status.TRANSFERRING,
            lease_token=token,
            lease_expires_at=now + timedelta(seconds=lease),
            attempts=F("attempts") + 1,
            updated_at=now,
        )
        if not taken:
            return None
        row = self.filter(pk=pk, lease_token=token).first()
        if row is not None:
            row.claimed_from = self.model.Status.QUEUED
            row.was_owned = row.remote_owned
        return row

    @retry_when_locked
    def mark_done_together(self, rows: list[PendingTransfer]) -> int:
        """Record the verified transfers of ``rows`` in one statement (elsewhere
        than on PostgreSQL, one per :data:`DONE_PIECE` rows: run it in a
        transaction), each row under its own compare-and-set on (row, generation,
        lease token); returns how many rows won. The caller decides what to do
        when that is not all of them."""
        if not rows:
            return 0
        now = timezone.now()
        changes = self.model.done_changes(now)
        db = getattr(self, "_db", None) or router.db_for_write(self.model)
        connection = connections[db]
        quote = connection.ops.quote_name
        # Plain SQL with a row-value IN: the ORM takes longer to build an OR of
        # fifty (pk, generation, token) conditions than the database to run it.
        # PostgreSQL gets the keys as three arrays: a client-side cursor parses
        # every placeholder of a statement, and three per row were a quarter of the
        # completion's cost.
        table = quote(self.model._meta.db_table)
        keys = (
            f"({quote(column(self.model, 'id'))}, {quote(column(self.model, 'generation'))},"
            f" {quote(column(self.model, 'lease_token'))})"
        )
        pieces: list[tuple[str, list[Any]]] = []
        if connection.vendor == "postgresql":
            pks = [row.pk for row in rows]
            match = (
                f"{quote(column(self.model, 'id'))} = ANY(%s) AND {keys} IN"
                " (SELECT * FROM unnest(%s::bigint[], %s::bigint[], %s::text[]))"
            )
            pieces.append(
                (
                    match,
                    [
                        pks,
                        pks,
                        [row.generation for row in rows],
                        [row.lease_token for row in rows],
                    ],
                )
            )
        else:
            # Three placeholders a row: in pieces that keep a statement within
            # SQLite's 999 (before 3.32).
            for start in range(0, len(rows), DONE_PIECE):
                piece = rows[start : start + DONE_PIECE]
                pieces.append(
                    (
                        f"{keys} IN (" + ", ".join(["(%s, %s, %s)"] * len(piece)) + ")",
                        [
                            value
                            for row in piece
                            for value in (row.pk, row.generation, row.lease_token)
                        ],
                    )
                )
        params = [
            db_value(self.model._meta.get_field(name), value, connection)  # type: ignore[arg-type]
            for name, value in changes.items()
        ]
        params += [self.model.Status.TRANSFERRING.value, False]
        sets = ", ".join(f"{quote(column(self.model, name))} = %s" for name in changes)
        won = 0
        with connection.cursor() as cursor:
            for match, key_params in pieces:
                cursor.execute(
                    f"UPDATE {table} SET {sets}"
                    f" WHERE {quote(column(self.model, 'status'))} = %s"
                    f" AND {quote(column(self.model, 'deleted'))} = %s AND {match}",
                    [*params, *key_params],
                )
                won += int(cursor.rowcount)
        if won == len(rows):
            for row in rows:
                row.status = self.model.Status.DONE
                row.transferred_at = now
        return won

    def _owned_after_claim(self, status: str, owned: bool) -> bool:
        """Whether a claimed row owns its remote object: an earlier attempt recorded
        an upload, or the row is taken over from a worker whose lease ran out, which
        may have been writing it when it died."""
        return bool(owned) or status == self.model.Status.TRANSFERRING
