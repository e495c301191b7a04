"""The ledger's history: what each storage transferred, minute by minute, kept for
``QUEUED_STORAGE_HISTORY_RETENTION`` (two days by default) for the dashboard's
charts and the Prometheus counters.

:class:`TransferMinute` is one row per (storage key, minute, in UTC):

- ``files`` and ``bytes``: transfers recorded as done (each verified row once,
  by the same transaction as its ``DONE`` write, whose compare-and-set it won);
- ``failures``: failed attempts (each once, with the ledger write that kept its
  error: retried or given up, a crash, an abandoned transfer, a failed purge);
- ``le_0_05`` ... ``le_inf`` and ``duration_sum``: a histogram of the durations
  (seconds, from the start of the attempt's transfer to its verified copy) of
  the transfers done. Each column counts the durations above the bound before
  it and at most its own (:data:`BOUNDS`): not cumulative, add them up for
  Prometheus' ``le`` buckets (:func:`cumulative`).

Workers add to the row of the current minute with one upsert a storage and a
group of rows recorded done together (one a failed attempt), so concurrent
workers never lose an increment. A drain that transferred rows prunes at most
every :data:`PRUNE_EVERY` seconds (no cron needed): the minutes older than the
retention are deleted and added, in the same transaction, to the storage's one
carry row (``minute`` = :data:`CARRY_MINUTE`, 1970-01-01), so that the sum of a
storage's rows only ever grows, for counters that never go down.

Read with :func:`totals` (per storage: everything since the history began) and
:func:`series` (per storage and minute, within a window; the carry row left
out)."""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from typing import Any, Protocol

from django.conf import settings as django_settings
from django.db import (
    DatabaseError,
    OperationalError,
    connections,
    models,
    router,
    transaction,
)
from django.db.models import F, Sum
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from queued_storage.conf import settings as conf
from queued_storage.ledger_sql import lost_a_lock, retry_when_locked

logger = logging.getLogger("queued_storage")

#: Upper bounds (seconds) of the duration buckets, the last one unbounded.
BOUNDS: tuple[float, ...] = (
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
    float("inf"),
)
#: The bucket columns, in the order of :data:`BOUNDS`.
BUCKETS: tuple[str, ...] = tuple(
    "le_inf" if bound == float("inf") else "le_" + f"{bound:g}".replace(".", "_")
    for bound in BOUNDS
)
#: Every column an increment adds to, in the order :func:`_add` sends them.
COUNTED: tuple[str, ...] = ("files", "bytes", "failures", "duration_sum", *BUCKETS)
#: A drain prunes at most this often (seconds), per process.
PRUNE_EVERY = 600.0
#: Most rows one pruning transaction folds into the carry rows.
PRUNE_ROWS = 5000


class TransferMinute(models.Model):
    """What one storage transferred in one minute (UTC); see the module."""

    # Compares exactly, as PendingTransfer.storage_key does (see migration 0004).
    storage_key = models.CharField(_("storage key"), max_length=255)
    minute = models.DateTimeField(_("minute"))
    files = models.BigIntegerField(_("files done"), default=0)
    bytes = models.BigIntegerField(_("bytes done"), default=0)
    failures = models.BigIntegerField(_("failed attempts"), default=0)
    duration_sum = models.FloatField(_("seconds of the transfers done"), default=0)
    le_0_05 = models.BigIntegerField(_("done in up to 0.05 s"), default=0)
    le_0_1 = models.BigIntegerField(_("done in up to 0.1 s"), default=0)
    le_0_25 = models.BigIntegerField(_("done in up to 0.25 s"), default=0)
    le_0_5 = models.BigIntegerField(_("done in up to 0.5 s"), default=0)
    le_1 = models.BigIntegerField(_("done in up to 1 s"), default=0)
    le_2_5 = models.BigIntegerField(_("done in up to 2.5 s"), default=0)
    le_5 = models.BigIntegerField(_("done in up to 5 s"), default=0)
    le_10 = models.BigIntegerField(_("done in up to 10 s"), default=0)
    le_30 = models.BigIntegerField(_("done in up to 30 s"), default=0)
    le_60 = models.BigIntegerField(_("done in up to 60 s"), default=0)
    le_300 = models.BigIntegerField(_("done in up to 300 s"), default=0)
    le_inf = models.BigIntegerField(_("done in over 300 s"), default=0)

    class Meta:
        app_label = "queued_storage"  # see PendingTransfer.Meta
        verbose_name = _("transfer minute")
        verbose_name_plural = _("transfer minutes")
        ordering = ["storage_key", "minute"]
        constraints = [
            models.UniqueConstraint(
                fields=["storage_key", "minute"], name="queued_storage_history_minute"
            )
        ]
        indexes = [models.Index(fields=["minute"], name="queued_storage_history_age")]

    def __str__(self) -> str:
        return f"{self.storage_key} {self.minute:%Y-%m-%d %H:%M}"


class TransferDashboard(TransferMinute):
    """The admin index's entry for the transfer dashboard (``dashboard.py``): a
    proxy, no table of its own; its page needs the view permission on the ledger."""

    class Meta:
        app_label = "queued_storage"  # see PendingTransfer.Meta
        proxy = True
        verbose_name = _("transfer dashboard")
        verbose_name_plural = _("transfer dashboard")


@dataclass(frozen=True)
class Counts:
    """Files and bytes done, failed attempts, and the durations of the transfers
    done: per bucket of :data:`BOUNDS` (not cumulative) and their sum."""

    files: int = 0
    bytes: int = 0
    failures: int = 0
    duration_sum: float = 0.0
    buckets: tuple[int, ...] = (0,) * len(BOUNDS)

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> Counts:
        # Sums come back as Decimal on MariaDB/MySQL.
        return cls(
            files=int(values["files"] or 0),
            bytes=int(values["bytes"] or 0),
            failures=int(values["failures"] or 0),
            duration_sum=float(values["duration_sum"] or 0),
            buckets=tuple(int(values[name] or 0) for name in BUCKETS),
        )


def cumulative(buckets: Iterable[int]) -> list[int]:
    """Prometheus' ``le`` buckets: each count with all those below it."""
    total, out = 0, []
    for count in buckets:
        total += count
        out.append(total)
    return out


def carry_minute() -> datetime:
    """The ``minute`` of a storage's carry row: what pruning folded in."""
    carry = datetime(1970, 1, 1, tzinfo=dt_timezone.utc)
    return carry if django_settings.USE_TZ else carry.replace(tzinfo=None)


def this_minute(now: datetime | None = None) -> datetime:
    return (now or timezone.now()).replace(second=0, microsecond=0)


def history_db() -> str:
    return router.db_for_write(TransferMinute)


def totals(keys: Collection[str] | None = None) -> dict[str, Counts]:
    """Per storage key, everything its history holds (the carry row included): a
    total that only grows. One grouped query."""
    rows = TransferMinute.objects.using(history_db()).order_by()
    if keys is not None:
        rows = rows.filter(storage_key__in=list(keys))
    sums = rows.values("storage_key").annotate(**{n: Sum(n) for n in COUNTED})
    return {values["storage_key"]: Counts.of(values) for values in sums}


def series(
    since: datetime,
    until: datetime | None = None,
    keys: Collection[str] | None = None,
) -> dict[str, dict[datetime, Counts]]:
    """Per storage key, the minutes from ``since`` (included) to ``until``
    (excluded) that had transfers or failures, by their start (UTC). One query,
    on the ``(storage_key, minute)`` index."""
    rows = TransferMinute.objects.using(history_db()).filter(
        minute__gte=max(since, carry_minute() + timedelta(minutes=1))
    )
    if until is not None:
        rows = rows.filter(minute__lt=until)
    if keys is not None:
        rows = rows.filter(storage_key__in=list(keys))
    found: dict[str, dict[datetime, Counts]] = {}
    for values in rows.order_by("storage_key", "minute").values(
        "storage_key", "minute", *COUNTED
    ):
        found.setdefault(values["storage_key"], {})[values["minute"]] = Counts.of(
            values
        )
    return found


class _Done(Protocol):
    """A verified transfer (``transfer.Verified``): its row, and when its attempt
    started and ended (``time.monotonic()``)."""

    @property
    def row(self) -> Any: ...
    @property
    def at(self) -> float: ...
    @property
    def started(self) -> float: ...


def count_done(transfers: Iterable[_Done], db: str) -> None:
    """Add the transfers just recorded done to their storages' current minute, in
    the caller's transaction (the one of their ``DONE`` write): one upsert a
    storage."""
    per_key: dict[str, list[Any]] = {}
    for item in transfers:
        row = item.row
        counts = per_key.get(row.storage_key)
        if counts is None:
            counts = per_key[row.storage_key] = [0, 0, 0, 0.0] + [0] * len(BOUNDS)
        seconds = max(item.at - item.started, 0.0)
        counts[0] += 1
        counts[1] += row.size or 0
        counts[3] += seconds
        counts[4 + bisect_left(BOUNDS, seconds)] += 1
    _add(per_key, this_minute(), db)


def count_failure(key: str, db: str) -> None:
    """Add one failed attempt of storage ``key`` to its current minute, in the
    caller's transaction (the one of the attempt's error)."""
    _add({key: [0, 0, 1, 0.0] + [0] * len(BOUNDS)}, this_minute(), db)


class HistoryUnavailable(Exception):
    """The history could not be written (its table or a column missing: a worker
    deployed before ``migrate``, say). The caller's transaction is rolled back,
    and the caller records the transfer or the error again without its count:
    the ledger is the truth, the history only counts it."""


def not_counted(error: HistoryUnavailable, keys: Iterable[str], what: str) -> None:
    """Say in the log that ``what`` of storages ``keys`` went uncounted."""
    logger.error(
        "transfer history not written, %s not counted keys=%s error=%s",
        what,
        ",".join(sorted(set(keys))),
        error,
    )


#: Per database alias, the upsert that adds to a minute's row.
_UPSERTS: dict[str, str] = {}


def _upsert_sql(connection: Any) -> str:
    sql = _UPSERTS.get(connection.alias)
    if sql is not None:
        return sql
    quote = connection.ops.quote_name
    table = quote(TransferMinute._meta.db_table)
    columns = ["storage_key", "minute", *COUNTED]
    head = (
        f"INSERT INTO {table} ({', '.join(quote(name) for name in columns)}) "
        f"VALUES ({', '.join(['%s'] * len(columns))})"
    )
    counted = [quote(name) for name in COUNTED]
    if connection.vendor != "mysql":
        # PostgreSQL and SQLite (3.24+): the row's own column needs its table's
        # name, EXCLUDED is the row the INSERT would have written.
        sets = ", ".join(f"{c} = {table}.{c} + EXCLUDED.{c}" for c in counted)
        target = f"{quote('storage_key')}, {quote('minute')}"
        sql = f"{head} ON CONFLICT ({target}) DO UPDATE SET {sets}"
    elif connection.mysql_is_mariadb:
        sets = ", ".join(f"{c} = {c} + VALUES({c})" for c in counted)
        sql = f"{head} ON DUPLICATE KEY UPDATE {sets}"
    else:
        # MySQL 8.0.20+ deprecates VALUES() here for a row alias.
        sets = ", ".join(f"{c} = {table}.{c} + new.{c}" for c in counted)
        sql = f"{head} AS new ON DUPLICATE KEY UPDATE {sets}"
    _UPSERTS[connection.alias] = sql
    return sql


def _add(per_key: dict[str, list[Any]], minute: datetime, db: str) -> None:
    """Add each key's counts (in :data:`COUNTED` order) to its row of ``minute``;
    in key order, so that two transactions never wait for each other's rows."""
    if not per_key:
        return
    connection = connections[db]
    sql = _upsert_sql(connection)
    field = TransferMinute._meta.get_field("minute")
    assert isinstance(field, models.DateTimeField)
    when = field.get_db_prep_save(minute, connection)
    try:
        with connection.cursor() as cursor:
            for key in sorted(per_key):
                cursor.execute(sql, [key, when, *per_key[key]])
    except DatabaseError as error:
        if isinstance(error, OperationalError) and lost_a_lock(error):
            raise  # the whole transaction is done again, with its count
        first_line = str(error).strip().splitlines()[:1]
        raise HistoryUnavailable(
            f"{type(error).__name__}: {''.join(first_line)}"
        ) from error


#: When this process last pruned (``time.monotonic()``), if it has.
_pruned: dict[str, float] = {}


def prune_now_and_then() -> None:
    """:func:`prune`, unless this process did less than :data:`PRUNE_EVERY`
    seconds ago; what it raises is logged (a drain's work is done by then)."""
    now = time.monotonic()
    last = _pruned.get("at")
    if last is not None and now - last < PRUNE_EVERY:
        return
    _pruned["at"] = now
    try:
        prune()
    except Exception as exc:
        logger.warning("history pruning failed error=%s: %s", type(exc).__name__, exc)


def prune(now: datetime | None = None) -> int:
    """Fold the minutes older than the retention into their storages' carry rows;
    returns how many minutes were folded. One query when there are none."""
    cutoff = (now or timezone.now()) - timedelta(
        seconds=conf.QUEUED_STORAGE_HISTORY_RETENTION
    )
    db = history_db()
    old = TransferMinute.objects.using(db).filter(
        minute__lt=cutoff, minute__gt=carry_minute()
    )
    if not old.exists():
        return 0
    folded = 0
    while True:
        pruned = _fold(old, db)
        folded += pruned
        if pruned < PRUNE_ROWS:
            return folded


@retry_when_locked
def _fold(old: models.QuerySet[TransferMinute], db: str) -> int:
    """Delete up to :data:`PRUNE_ROWS` of the ``old`` minutes, and add them to the
    carry rows, in one transaction: what is deleted is exactly what was read
    (locked), so two processes pruning at once never fold a minute twice."""
    with transaction.atomic(using=db):
        if not connections[db].features.has_select_for_update:
            # SQLite: an UPDATE takes the database's write lock before the read,
            # which another pruner then waits for.
            old.update(files=F("files"))
        rows = list(
            old.select_for_update()
            .order_by("minute", "pk")
            .values("pk", "storage_key", *COUNTED)[:PRUNE_ROWS]
        )
        if not rows:
            return 0
        per_key: dict[str, list[Any]] = {}
        for values in rows:
            counts = per_key.setdefault(
                values["storage_key"], [0, 0, 0, 0.0] + [0] * len(BOUNDS)
            )
            for index, name in enumerate(COUNTED):
                counts[index] += values[name]
        TransferMinute.objects.using(db).filter(
            pk__in=[values["pk"] for values in rows]
        ).delete()
        _add(per_key, carry_minute(), db)
    logger.info("history pruned minutes=%s storages=%s", len(rows), len(per_key))
    return len(rows)
