"""What the transfer dashboard shows of each storage: its rows by status, the
age of its oldest due row, stuck and long-overdue rows, whether it is paused and
its circuit breaker, and charts (inline SVG) of its throughput and failures over
the last hour and the last day. Its admin page is ``dashboard_admin.py``.

Four queries whatever the ledger's size or the history's minutes (and one more a
250 storages past the first 250): one grouped query over the rows not done (the
status indexes find them), one of the done rows counted up to a limit a storage
(``LIMIT``, :data:`KEYS_A_QUERY` storages a query), one of
the history's last day (:mod:`queued_storage.history`) and one of the storages'
controls; and, for each storage with a serving mirror, one that reads its rows to
count the files verified on the new remote (:mod:`queued_storage.migration`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.db import connections, router
from django.db.models import Count, Min, Q
from django.template.defaultfilters import filesizeformat
from django.utils import timezone
from django.utils.safestring import SafeString
from django.utils.translation import gettext

from queued_storage import destinations, registry
from queued_storage.charts import Bar, bar_chart
from queued_storage.conf import settings as conf
from queued_storage.destinations import Destination
from queued_storage.history import Counts, series
from queued_storage.migration import MigrationProgress, migrations
from queued_storage.models import PendingTransfer
from queued_storage.storage_state import Controls, storage_controls

Status = PendingTransfer.Status

#: The statuses counted exactly (a backlog); done rows are counted up to
#: :data:`DONE_COUNT_LIMIT`, so that a large ledger is never read whole.
NOT_DONE = (Status.HELD, Status.QUEUED, Status.TRANSFERRING, Status.FAILED)
DONE_COUNT_LIMIT = 10_000
#: Storages whose done rows one query counts (a SELECT each, in one UNION ALL):
#: SQLite allows 500 in a compound SELECT.
KEYS_A_QUERY = 250
#: The day chart's bars: this many minutes each.
DAY_BAR_MINUTES = 15
MINUTE = timedelta(minutes=1)

FILES_COLOUR = "#1a7f37"
BYTES_COLOUR = "#1f6feb"
FAILURES_COLOUR = "#cf222e"


@dataclass
class Window:
    """A storage's history over the last hour or day: bars of files, bytes and
    failed attempts per minute, and the window's totals."""

    label: str
    files: list[Bar] = field(default_factory=list)
    bytes: list[Bar] = field(default_factory=list)
    failures: list[Bar] = field(default_factory=list)
    total_files: int = 0
    total_bytes: int = 0
    total_failures: int = 0
    #: (title, SVG) of each chart.
    charts: list[tuple[str, SafeString]] = field(default_factory=list)


@dataclass
class StorageSummary:
    key: str
    counts: dict[str, int] = field(default_factory=dict)
    #: The done count reached :data:`DONE_COUNT_LIMIT`: there are at least as many.
    done_at_least: bool = False
    oldest_due_at: datetime | None = None
    stuck: int = 0
    overdue: int = 0
    controls: Controls | None = None
    hour: Window | None = None
    day: Window | None = None
    #: The copy to its serving mirror, if it has one (a migration under way).
    migration: MigrationProgress | None = None
    #: What the key is: a storage's own remote, or a mirror of one (shown under it).
    destination: Destination | None = None


def _backlog(now: datetime) -> dict[str, dict[str, Any]]:
    """Per storage key and status not done: the rows, when the oldest due one
    became due, and the stuck and long-overdue rows. One query, which the status
    indexes answer from the rows not done, however many are."""
    try:
        timed_out = now - timedelta(seconds=conf.QUEUED_STORAGE_TRANSFER_TIMEOUT)
    except OverflowError:  # a timeout meant as "never"
        timed_out = datetime.min.replace(tzinfo=now.tzinfo)
    try:
        overdue = now - timedelta(seconds=conf.QUEUED_STORAGE_HEALTH_MAX_AGE)
    except OverflowError:
        overdue = datetime.min.replace(tzinfo=now.tzinfo)
    transferring = Q(status=Status.TRANSFERRING)
    expired = transferring & Q(lease_expires_at__lt=now)
    due = Q(status=Status.QUEUED, next_attempt_at__lte=now)
    rows = (
        PendingTransfer.objects.filter(status__in=NOT_DONE)
        .order_by()
        .values("storage_key", "status")
        .annotate(
            number=Count("pk"),
            due_since=Min("next_attempt_at", filter=due),
            expired_since=Min("lease_expires_at", filter=expired),
            stuck=Count(
                "pk", filter=expired | (transferring & Q(updated_at__lt=timed_out))
            ),
            overdue=Count(
                "pk", filter=Q(status=Status.QUEUED, next_attempt_at__lt=overdue)
            ),
        )
    )
    found: dict[str, dict[str, Any]] = {}
    for values in rows:
        found.setdefault(values["storage_key"], {})[values["status"]] = values
    return found


def _done_counts(keys: list[str]) -> dict[str, int]:
    """Done rows of each of ``keys``, counted up to one more than the limit: one
    query a :data:`KEYS_A_QUERY` storages, a ``LIMIT`` a storage, so that a large
    ledger is never read whole."""
    db = router.db_for_read(PendingTransfer)
    found: dict[str, int] = {}
    for first in range(0, len(keys), KEYS_A_QUERY):
        chunk = keys[first : first + KEYS_A_QUERY]
        parts, params = [], []
        for index, key in enumerate(chunk):
            done = PendingTransfer.objects.using(db).filter(
                storage_key=key, status=Status.DONE
            )
            limited = done.order_by().values_list("pk")[: DONE_COUNT_LIMIT + 1]
            inner, inner_params = limited.query.get_compiler(using=db).as_sql()
            parts.append(f"SELECT {index}, COUNT(*) FROM ({inner}) AS done_{index}")
            params.extend(inner_params)
        with connections[db].cursor() as cursor:
            cursor.execute(" UNION ALL ".join(parts), params)
            for index, count in cursor.fetchall():
                found[chunk[int(index)]] = int(count)
    return found


def _window(
    label: str,
    minutes: dict[datetime, Counts],
    starts: list[datetime],
    width: int,
    now_minute: datetime,
) -> Window:
    """Bars from ``minutes`` (the history's, by minute) for the intervals of
    ``width`` minutes that start at ``starts``: per-minute averages, the last
    interval's over the minutes it has had so far."""
    window = Window(label)
    sums = {start: [0, 0, 0] for start in starts}
    first = starts[0]
    for minute, counts in minutes.items():
        if minute < first:
            continue
        index = int((minute - first) / MINUTE) // width
        if index >= len(starts):
            continue
        totals = sums[starts[index]]
        totals[0] += counts.files
        totals[1] += counts.bytes
        totals[2] += counts.failures
    for start in starts:
        files, size, failures = sums[start]
        elapsed = min(width, int((now_minute - start) / MINUTE) + 1)
        window.files.append(Bar(start, files / elapsed))
        window.bytes.append(Bar(start, size / elapsed))
        window.failures.append(Bar(start, failures / elapsed))
        window.total_files += files
        window.total_bytes += size
        window.total_failures += failures
    return window


def _per_minute(value: float) -> str:
    return gettext("%(number)s/min") % {"number": f"{value:.3g}"}


def _bytes_per_minute(value: float) -> str:
    return gettext("%(size)s/min") % {"size": filesizeformat(int(value))}


def _every_six_hours(local: datetime) -> bool:
    """The day chart's axis labels: 00:00, 06:00, 12:00 and 18:00, local time
    (``bar_chart`` hands a tick the bar's start in the current time zone)."""
    return local.minute == 0 and local.hour % 6 == 0


def _charts(
    window: Window, every: int, tick: Callable[[datetime], bool] | None = None
) -> list[tuple[str, SafeString]]:
    """(title, SVG) of the window's charts: files, bytes and failed attempts."""
    charts = []
    for title, bars, colour, text in [
        (gettext("Files done per minute"), window.files, FILES_COLOUR, _per_minute),
        (
            gettext("Bytes done per minute"),
            window.bytes,
            BYTES_COLOUR,
            _bytes_per_minute,
        ),
        (
            gettext("Failed attempts per minute"),
            window.failures,
            FAILURES_COLOUR,
            _per_minute,
        ),
    ]:
        label = f"{title}, {window.label}"
        svg = bar_chart(
            bars, label=label, colour=colour, text=text, every=every, tick=tick
        )
        charts.append((title, svg))
    return charts


def summaries(now: datetime | None = None) -> list[StorageSummary]:
    """What the dashboard shows of each storage: those this process knows
    (settings, models, storages used), and those with rows not done, history of
    the last day or a state (paused, a breaker); by key, each storage's mirrors
    after it."""
    now = now or timezone.now()
    now_minute = now.replace(second=0, microsecond=0)
    hour_starts = [now_minute - (59 - i) * MINUTE for i in range(60)]
    # The day's bars start at quarter hours, so they stay put from one load to
    # the next.
    last = now_minute - (now_minute.minute % DAY_BAR_MINUTES) * MINUTE
    bars = 24 * 60 // DAY_BAR_MINUTES
    day_starts = [last - (bars - 1 - i) * DAY_BAR_MINUTES * MINUTE for i in range(bars)]
    backlog = _backlog(now)
    history = series(day_starts[0])
    controls = storage_controls(now=now)
    keys = sorted(
        set(registry.known_keys()) | set(backlog) | set(history) | set(controls)
    )
    done_counts = _done_counts(keys)
    migrating = migrations(keys)
    found = []
    # Each storage's mirrors after it.
    for destination in destinations.grouped(keys):
        key = destination.key
        summary = StorageSummary(
            key=key,
            controls=controls.get(key) or Controls(key),
            migration=migrating.get(key),
            destination=destination,
        )
        per_status = backlog.get(key, {})
        for status in Status.values:
            summary.counts[status] = per_status.get(status, {}).get("number", 0)
        done = done_counts.get(key, 0)
        summary.done_at_least = done > DONE_COUNT_LIMIT
        summary.counts[Status.DONE] = min(done, DONE_COUNT_LIMIT)
        due = [
            at
            for values in per_status.values()
            for at in (values["due_since"], values["expired_since"])
            if at is not None
        ]
        summary.oldest_due_at = min(due, default=None)
        summary.stuck = sum(values["stuck"] for values in per_status.values())
        summary.overdue = sum(values["overdue"] for values in per_status.values())
        minutes = history.get(key, {})
        summary.hour = _window(
            gettext("last hour"), minutes, hour_starts, 1, now_minute
        )
        summary.hour.charts = _charts(summary.hour, every=15)
        summary.day = _window(
            gettext("last day"), minutes, day_starts, DAY_BAR_MINUTES, now_minute
        )
        summary.day.charts = _charts(
            summary.day, every=6 * 60 // DAY_BAR_MINUTES, tick=_every_six_hours
        )
        found.append(summary)
    return found
