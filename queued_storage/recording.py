"""The request side of the ledger: the rows a save, a re-save and a delete write
(reserving a new name in one statement, recording a save, leaving a tombstone),
and the one-query state of a name that serving it reads."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.db import IntegrityError, connections, models, router, transaction
from django.db.models import BigIntegerField, Case, F, Q, Value, When
from django.db.models.functions import Greatest
from django.utils import timezone

from queued_storage.conf import settings as conf
from queued_storage.ledger_sql import (
    STATEMENTS,
    column,
    insert_new,
    insert_with_orm,
    name_hash,
    new_generation,
    reserve_statement,
    retry_when_locked,
)

#: Tries of a save's insert and update when the name's row comes and goes.
NEW_ROW_TRIES = 5

if TYPE_CHECKING:
    from queued_storage.models import PendingTransfer, PendingTransferQuerySet

    class _LedgerQuerySet(models.QuerySet["PendingTransfer"]):
        # Defined on the model's QuerySet, which mixes this class in.
        def for_name(self, key: str, name: str) -> PendingTransferQuerySet: ...
        def due(self, now: datetime | None = None) -> PendingTransferQuerySet: ...

else:
    _LedgerQuerySet = models.QuerySet


@retry_when_locked
def reserve(
    model: type[PendingTransfer],
    db: str,
    key: str,
    name: str,
    *,
    size: int | None,
    host: str,
    held: bool,
    checksum: str = "",
) -> int | None:
    """Insert the row of a name the ledger has never seen into ``model``'s table
    in database ``db``;
    returns its generation, or None (and writes nothing) when the name has a row.
    One statement, on the save path: the unique index makes a save of the same
    name in another transaction wait for this one, then find the row."""
    now = timezone.now()
    generation = new_generation()
    status = model.Status.HELD if held else model.Status.QUEUED
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
    statement = reserve_statement(model, db)
    if statement is None:
        return generation if insert_with_orm(model, values, db) else None
    sql, template, slot, when = statement
    connection = connections[db]
    sent_now = when(now, connection)
    params = list(template)
    for name_of, value in values.items():
        params[slot[name_of]] = sent_now if value is now else value
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return generation if cursor.rowcount else None


class RecordingQuerySet(_LedgerQuerySet):
    """The request side of the ledger's QuerySet."""

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
        status = self.model.Status.HELD if held else self.model.Status.QUEUED
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

    def leave_tombstone(
        self, key: str, name: str, host: str, *, remote_owned: bool = True
    ) -> bool:
        """Insert a due tombstone for ``name``, which has no row, so that a worker
        holding its lease removes an object a late upload left at the name
        (``remote_owned=False``: the object is left there); True if inserted,
        False (nothing written) when the name has a row again."""
        now = timezone.now()
        row = self.model(
            storage_key=key,
            name=name,
            name_hash=name_hash(name),
            deleted=True,
            remote_owned=remote_owned,
            next_attempt_at=now,
            host=host,
            created_at=now,
            updated_at=now,
        )
        db = getattr(self, "_db", None) or router.db_for_write(self.model)
        self.model.objects.using(db).bulk_create([row], ignore_conflicts=True)
        return (
            self.model.objects.using(db)
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
        self,
        key: str,
        name: str,
        generation: int,
        size: int,
        checksum: str,
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
        over_delete: bool = True,
    ) -> bool:
        """Write the row for a file just saved locally; whether it did.

        A re-save of a name whose worker still holds a lease keeps that lease: the
        worker finds the new generation when it completes, and hands the row back.
        A re-save's generation is larger than the row's, whatever the saving
        host's clock says (in the same statement: it may be behind another's).
        ``existing``: whether the caller found a row. ``over_delete``: whether the
        file is saved over a delete of the name that came first (a save's is), or
        leaves the tombstone alone and writes nothing (``transfer()``'s).
        """
        now = timezone.now()
        fresh = self._fresh(size=size, host=host, held=held, checksum=checksum, now=now)
        status = self.model.Status.HELD if held else self.model.Status.QUEUED
        if existing and self._resave(key, name, fresh, status, now):
            return True
        db = getattr(self, "_db", None) or router.db_for_write(self.model)
        values = self._new_row(key, name, held, fresh, now)
        for _try in range(NEW_ROW_TRIES):
            if insert_new(self.model, values, db):
                return True
            # The name got its row since the caller looked (a save's, a delete's
            # tombstone): this one is a re-save of it. Locked, since MariaDB's
            # snapshot may not show the row that refused the insert.
            with transaction.atomic(using=db):
                deleted = (
                    self.model.objects.using(db)
                    .for_name(key, name)
                    .select_for_update()
                    .values_list("deleted", flat=True)
                    .first()
                )
                if deleted is not None:
                    if deleted and not over_delete:
                        return False
                    if self._resave(key, name, fresh, status, now):
                        return True
        raise IntegrityError(
            f"The ledger row of {name!r} kept appearing and going; save it again."
        )

    def _resave(
        self,
        key: str,
        name: str,
        fresh: dict[str, Any],
        status: str,
        now: datetime,
    ) -> int:
        """Update the row of ``name`` with ``fresh``, at a generation larger than
        its own; a worker's live lease is kept. Returns the rows updated."""
        leased = Q(status=self.model.Status.TRANSFERRING, lease_expires_at__gt=now)
        later = Greatest(
            F("generation") + 1,
            Value(fresh["generation"]),
            output_field=BigIntegerField(),
        )
        return self.for_name(key, name).update(
            status=Case(When(leased, then=F("status")), default=Value(status)),
            lease_token=Case(When(leased, then=F("lease_token")), default=Value("")),
            lease_expires_at=Case(
                When(leased, then=F("lease_expires_at")), default=Value(None)
            ),
            **(fresh | {"generation": later}),
        )

    def state_of(self, key: str, name: str) -> tuple[str, bool, int | None] | None:
        """``(status, deleted, size)`` of the row of ``name``, or None: one query on
        the unique index, sent as plain SQL (building it with the ORM costs several
        times the query on the request path). Ignores this queryset's filters."""
        db = self.db
        connection = connections[db]
        sql = STATEMENTS.get((db, "state"))
        if sql is None:
            quote = connection.ops.quote_name
            status, deleted, size, key_column, hash_column = (
                quote(column(self.model, field))
                for field in ("status", "deleted", "size", "storage_key", "name_hash")
            )
            table = quote(self.model._meta.db_table)
            sql = STATEMENTS[(db, "state")] = (
                f"SELECT {status}, {deleted}, {size} FROM {table} "
                f"WHERE {key_column} = %s AND {hash_column} = %s"
            )
        with connection.cursor() as cursor:
            cursor.execute(sql, [key, name_hash(name)])
            found = cursor.fetchone()
        if found is None:
            return None
        return str(found[0]), bool(found[1]), found[2]

    def states_with_mirror(
        self, key: str, mirror_key: str, name: str
    ) -> tuple[
        tuple[str, bool, int | None, int] | None,
        tuple[str, bool, int | None, int] | None,
    ]:
        """``(status, deleted, size, generation)`` of the row of ``name`` under
        ``key`` and under ``mirror_key`` (None where there is none): one query on
        the unique index, as plain SQL like :meth:`state_of`."""
        db = self.db
        connection = connections[db]
        sql = STATEMENTS.get((db, "mirrored state"))
        if sql is None:
            quote = connection.ops.quote_name
            key_column, status, deleted, size, generation, hash_column = (
                quote(column(self.model, field))
                for field in (
                    "storage_key",
                    "status",
                    "deleted",
                    "size",
                    "generation",
                    "name_hash",
                )
            )
            table = quote(self.model._meta.db_table)
            sql = STATEMENTS[(db, "mirrored state")] = (
                f"SELECT {key_column}, {status}, {deleted}, {size}, {generation} "
                f"FROM {table} WHERE {key_column} IN (%s, %s) AND {hash_column} = %s"
            )
        with connection.cursor() as cursor:
            cursor.execute(sql, [key, mirror_key, name_hash(name)])
            found = cursor.fetchall()
        primary = mirror = None
        for row_key, status, deleted, size, generation in found:
            state = (str(status), bool(deleted), size, int(generation))
            if row_key == key:
                primary = state
            else:
                mirror = state
        return primary, mirror

    @retry_when_locked
    def record_delete(
        self, key: str, name: str, mirror_keys: Sequence[str] = ()
    ) -> PendingTransfer:
        """Turn the row of ``name`` into a tombstone (creating one if needed), and
        each row of it that the mirrors ``mirror_keys`` have (none is created), at
        the same generation.

        A tombstone hides the name at once; the files go after commit, and a worker
        that holds a lease on the row finishes the job when it sees it.
        """
        try:
            return self._tombstone(key, name, mirror_keys)
        except IntegrityError:
            # A save of the name inserted its row (still uncommitted when we looked)
            # while ours waited for it: PostgreSQL reports the duplicate where
            # MariaDB's locking read waits and finds the row. That row is ours now.
            return self._tombstone(key, name, mirror_keys)

    def _tombstone(
        self, key: str, name: str, mirror_keys: Sequence[str]
    ) -> PendingTransfer:
        now = timezone.now()
        with transaction.atomic(using=router.db_for_write(self.model)):
            row = self.select_for_update().for_name(key, name).first()
            if row is None:
                # A file that predates the ledger: it may be on either side.
                row = self.model(
                    storage_key=key,
                    name=name,
                    name_hash=name_hash(name),
                    remote_owned=True,
                    host=conf.QUEUED_STORAGE_HOSTNAME,
                    created_at=now,
                )
            row.deleted = True
            # Larger than the row's, whatever this host's clock says.
            row.generation = max(row.generation + 1, new_generation())
            row.updated_at = now
            if not row.has_live_lease(now):
                row.status = self.model.Status.QUEUED
                row.next_attempt_at = now
                row.lease_token = ""
                row.lease_expires_at = None
                row.attempts = 0
            row.save()
            if mirror_keys:
                # Under the primary row's lock, which a mirror's fan-out holds too.
                self._tombstone_copies(mirror_keys, name, row.generation, now)
        return row

    def _tombstone_copies(
        self, keys: Sequence[str], name: str, generation: int, now: datetime
    ) -> int:
        """Tombstone the mirrors' rows of ``name``, as :meth:`_tombstone` does the
        primary's: a worker's live lease is kept, for it to purge."""
        leased = Q(status=self.model.Status.TRANSFERRING, lease_expires_at__gt=now)

        def unless_leased(value: Any, field: str) -> Case:
            return Case(When(leased, then=F(field)), default=Value(value))

        # Status first: MariaDB assigns left to right, and ``leased`` reads it.
        return (
            self.model.objects.using(router.db_for_write(self.model))
            .filter(storage_key__in=list(keys), name_hash=name_hash(name))
            .update(
                status=unless_leased(self.model.Status.QUEUED.value, "status"),
                lease_token=unless_leased("", "lease_token"),
                next_attempt_at=unless_leased(now, "next_attempt_at"),
                attempts=unless_leased(0, "attempts"),
                lease_expires_at=unless_leased(None, "lease_expires_at"),
                deleted=True,
                generation=generation,
                updated_at=now,
            )
        )
