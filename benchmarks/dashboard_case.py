"""The dashboard on a 1,000,000-row ledger (PostgreSQL): the database time of what
its page asks the ledger (``queued_storage.dashboard.summaries()``), with a day
of per-minute history, against the same on a 1,000-row ledger."""

from __future__ import annotations

import statistics
import time
from datetime import timedelta
from typing import Any

from django.db import connections
from django.utils import timezone

from benchmarks.harness import ledger_database, scratch
from queued_storage import registry
from queued_storage.dashboard import summaries
from queued_storage.history import TransferMinute, this_minute
from queued_storage.models import PendingTransfer

KEY = "bench-dashboard"
#: The target: database time of one dashboard page, on PostgreSQL.
TARGET_MS = 100


def _fill_history(alias: str, key: str) -> None:
    """A minute row for each minute of the last day, as a busy storage has."""
    now = this_minute(timezone.now())
    TransferMinute.objects.using(alias).filter(storage_key=key).delete()
    TransferMinute.objects.using(alias).bulk_create(
        [
            TransferMinute(
                storage_key=key,
                minute=now - timedelta(minutes=minutes),
                files=100 + minutes % 7,
                bytes=(100 + minutes % 7) * 10240,
                failures=minutes % 3,
                duration_sum=2.5,
                le_0_05=100,
                le_0_1=minutes % 7,
            )
            for minutes in range(24 * 60)
        ],
        batch_size=1000,
    )
    with connections[alias].cursor() as cursor:
        cursor.execute(f"ANALYZE {TransferMinute._meta.db_table}")


def _page(alias: str) -> tuple[float, list[tuple[str, float]]]:
    """Database time (seconds) of one dashboard's queries, and each query's."""
    statements: list[tuple[str, float]] = []

    def timed(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        start = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            statements.append((sql, time.perf_counter() - start))

    with ledger_database(alias), connections[alias].execute_wrapper(timed):
        found = summaries()
    assert any(summary.key == KEY for summary in found)
    return sum(seconds for _sql, seconds in statements), statements


def unbounded_seq_scans(plan: str, table: str) -> list[str]:
    """The sequential scans of ``table`` in an EXPLAIN's text that no ``Limit``
    above them stops (a scan under a Limit reads at most that many rows)."""
    lines = plan.splitlines()
    found = []
    for index, line in enumerate(lines):
        if f"Seq Scan on {table}" not in line:
            continue
        indent = len(line) - len(line.lstrip(" ->"))
        bounded = False
        for above in reversed(lines[:index]):
            depth = len(above) - len(above.lstrip(" ->"))
            if depth < indent and above.strip(" ->")[:1].isalpha():
                indent = depth
                if above.strip(" ->").startswith("Limit"):
                    bounded = True
                    break
        if not bounded:
            found.append(line.strip())
    return found


def case_dashboard(sizes: Any) -> list[dict[str, Any]]:
    from benchmarks.cases import _explain, _fill_ledger, figure, queued_storage

    if connections["default"].vendor != "postgresql" or "large" not in connections:
        return []
    with scratch("dashboard") as root:
        queued_storage(root, key=KEY)  # known to the registry, as a site's are
        for alias, rows in [("default", 1000), ("large", sizes.scale_rows)]:
            PendingTransfer.objects.using(alias).filter(storage_key=KEY).delete()
            _fill_ledger(alias, KEY, rows, due=100 if rows == 1000 else 1000)
            _fill_history(alias, KEY)
        rounds = max(sizes.scale_rounds, 6)
        timings: dict[str, list[float]] = {"large": [], "default": []}
        per_query: list[list[tuple[str, float]]] = []
        _page("large")
        _page("default")  # warm: the plans, the caches
        for number in range(rounds):
            for alias in ("large", "default") if number % 2 else ("default", "large"):
                seconds, statements = _page(alias)
                timings[alias].append(seconds * 1000)
                if alias == "large":
                    per_query.append(statements)
        with ledger_database("large"):
            plans = _explain("large", summaries)
        for alias in ("default", "large"):
            PendingTransfer.objects.using(alias).filter(storage_key=KEY).delete()
            TransferMinute.objects.using(alias).filter(storage_key=KEY).delete()
        registry.forget(KEY)
    measured = statistics.median(timings["large"])
    no_seq_scan = not any(
        unbounded_seq_scans(plan["plan"], PendingTransfer._meta.db_table)
        for plan in plans
    )
    queries = [
        {
            "sql": sql[:160],
            "median_ms": round(
                statistics.median(page[index][1] for page in per_query) * 1000, 3
            ),
        }
        for index, (sql, _seconds) in enumerate(per_query[0])
    ]
    return [
        figure(
            f"dashboard page: database time of its queries, {sizes.scale_rows:,}-row "
            "ledger (999 of 1000 done, 1,000 due) and a day of per-minute history",
            target=f"< {TARGET_MS} ms, no unbounded sequential scan of the ledger",
            measured=measured,
            unit="ms database time (median of rounds)",
            passed=measured < TARGET_MS and no_seq_scan,
            milliseconds={
                "large": [round(value, 3) for value in timings["large"]],
                "small": [round(value, 3) for value in timings["default"]],
                "small_median": round(statistics.median(timings["default"]), 3),
            },
            queries=queries,
            no_unbounded_seq_scan_of_the_ledger=no_seq_scan,
            plans=plans,
        )
    ]
