"""A Prometheus scrape on a 1,000,000-row ledger (PostgreSQL): the database time
of what it reads (``queued_storage.integrations.prometheus.read_ledger()``), with
a day of per-minute history, against the same on a 1,000-row ledger."""

from __future__ import annotations

import statistics
import time
from typing import Any

from django.db import connections

from benchmarks.dashboard_case import _fill_history, unbounded_seq_scans
from benchmarks.harness import ledger_database, scratch
from queued_storage import registry
from queued_storage.history import TransferMinute
from queued_storage.integrations.prometheus import read_ledger
from queued_storage.models import PendingTransfer

KEY = "bench-metrics"
#: The target: database time of one scrape, on PostgreSQL (a scrape every 15 s
#: should cost the database next to nothing).
TARGET_MS = 50


def _every_status(alias: str) -> float:
    """Database time (seconds) of counting every status, done rows included: what
    a scrape would cost if it counted them."""
    with ledger_database(alias):
        start = time.perf_counter()
        PendingTransfer.objects.using(alias).status_counts_per_storage()
        return time.perf_counter() - start


def _scrape(alias: str) -> tuple[float, list[tuple[str, float]]]:
    """Database time (seconds) of one scrape's queries, and each query's."""
    statements: list[tuple[str, float]] = []

    def timed(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        start = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            statements.append((sql, time.perf_counter() - start))

    with ledger_database(alias), connections[alias].execute_wrapper(timed):
        reading = read_ledger()
    assert reading.rows[KEY]["queued"] > 0
    return sum(seconds for _sql, seconds in statements), statements


def case_metrics(sizes: Any) -> list[dict[str, Any]]:
    from benchmarks.cases import _explain, _fill_ledger, figure, queued_storage

    if connections["default"].vendor != "postgresql" or "large" not in connections:
        return []
    with scratch("metrics") as root:
        queued_storage(root, key=KEY)  # known to the registry, as a site's are
        for alias, rows in [("default", 1000), ("large", sizes.scale_rows)]:
            PendingTransfer.objects.using(alias).filter(storage_key=KEY).delete()
            _fill_ledger(alias, KEY, rows, due=100 if rows == 1000 else 1000)
            _fill_history(alias, KEY)
        rounds = max(sizes.scale_rounds, 6)
        timings: dict[str, list[float]] = {"large": [], "default": []}
        counting_done: list[float] = []
        per_query: list[list[tuple[str, float]]] = []
        _scrape("large")
        _scrape("default")  # warm: the plans, the caches
        for number in range(rounds):
            for alias in ("large", "default") if number % 2 else ("default", "large"):
                seconds, statements = _scrape(alias)
                timings[alias].append(seconds * 1000)
                if alias == "large":
                    per_query.append(statements)
                    counting_done.append(_every_status(alias) * 1000)
        with ledger_database("large"):
            plans = _explain("large", read_ledger)
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
                statistics.median(scrape[index][1] for scrape in per_query) * 1000, 3
            ),
        }
        for index, (sql, _seconds) in enumerate(per_query[0])
    ]
    return [
        figure(
            f"Prometheus scrape: database time of its queries, {sizes.scale_rows:,}-row "
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
        ),
        figure(
            "for comparison: counting every status of the same ledger, done rows "
            "included (status_counts_per_storage), which the scrape leaves out",
            target="none (why queued_storage_rows has no done series)",
            measured=statistics.median(counting_done),
            unit="ms (median of rounds)",
            passed=None,
            rounds_ms=[round(value, 3) for value in counting_done],
        ),
    ]
