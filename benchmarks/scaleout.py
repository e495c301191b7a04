"""Scale-out: N ``manage.py process_transfers --loop`` processes already running
drain one backlog on PostgreSQL, against a remote that waits 20 ms per write.

Each measurement starts N workers against an empty ledger and waits until each
has polled it (its connection, named by ``PGAPPNAME``, has queried the ledger
in ``pg_stat_activity``); start-up is not timed. Then one transaction saves the
backlog (local files and their rows), and the clock runs from its commit to the
last row's ``transferred_at``.

The first backlog a fresh worker process sees costs it more than the next (its
first claim, record and history update on a new database backend, its lane and
lease threads, code run for the first time: tens of milliseconds each, which N
workers spend at once on the machine's cores). That backlog is timed and
reported as the "first backlog" figure; the figures with a target are timed on
the backlogs after it, as a worker that has been running a while meets them. A figure is N workers' rate as a multiple of one
worker's, for the same backlog in the same round; rounds alternate the order of
N.

On its own (writes ``benchmarks/results/quick-postgresql-scaleout.json`` and
``.md``; ``--full`` adds the 4,000-row backlog)::

    .venv/bin/python -m benchmarks --db postgresql --only scaleout

``QUEUED_STORAGE_BENCH_SCALEOUT="1,2,4,8;400,4000;1"`` (workers; backlogs;
rounds) runs another plan.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import storages
from django.db import connection, transaction
from django.db.models import Max

from benchmarks.harness import scratch
from queued_storage import adoption
from queued_storage.models import PendingTransfer

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-scaleout"
#: Seconds between a worker's polls of an empty ledger: the most that a worker
#: waits to see the backlog (half of it on average, for every N alike).
INTERVAL = 0.05
#: The size of every file of the backlog.
FILE_SIZE = 1024
#: How long (seconds) the workers may take to start, and one drain to end.
START_TIMEOUT = 120.0
DRAIN_TIMEOUT = 900.0


@dataclass(frozen=True)
class Plan:
    workers: tuple[int, ...]
    backlogs: tuple[int, ...]
    rounds: int


def plan_for(full: bool) -> Plan:
    """The quick and full plans; ``QUEUED_STORAGE_BENCH_SCALEOUT``
    (``WORKERS;BACKLOGS;ROUNDS``) overrides both."""
    override = os.environ.get("QUEUED_STORAGE_BENCH_SCALEOUT")
    if override:
        workers, backlogs, rounds = override.split(";")
        return Plan(
            tuple(int(n) for n in workers.split(",")),
            tuple(int(n) for n in backlogs.split(",")),
            int(rounds),
        )
    if full:
        return Plan((1, 2, 4, 8), (400, 4000), 2)
    return Plan((1, 2, 4, 8), (400,), 2)


def _app_name(number: int) -> str:
    return f"qs-scaleout-{os.getpid()}-{number}"


@contextmanager
def running_workers(count: int, logs: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` workers (``manage.py process_transfers --loop``), each polling
    the ledger by the time this yields; stopped (SIGTERM) at the end."""
    processes = []
    with ExitStack() as stack:
        for number in range(count):
            env = dict(os.environ)
            env["PGAPPNAME"] = _app_name(number)
            env["PYTHONPATH"] = str(ROOT)
            log = stack.enter_context(open(logs / f"worker-{number}.log", "wb"))
            processes.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "manage.py",
                        "process_transfers",
                        "--loop",
                        "--interval",
                        str(INTERVAL),
                        "--storage",
                        KEY,
                    ],
                    cwd=ROOT,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        try:
            names = {_app_name(number) for number in range(count)}
            deadline = time.monotonic() + START_TIMEOUT
            # Seen once each: an idle poll is its claim alone, a transaction
            # whose last statement (what pg_stat_activity shows) is its COMMIT.
            seen: set[str] = set()
            while True:
                with connection.cursor() as cursor:
                    cursor.execute(
                        "SELECT DISTINCT application_name FROM pg_stat_activity "
                        "WHERE datname = current_database() AND query LIKE %s",
                        ["%queued_storage_pendingtransfer%"],
                    )
                    seen |= {row[0] for row in cursor.fetchall()} & names
                polling = seen
                if polling == names:
                    break
                dead = [p.returncode for p in processes if p.poll() is not None]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{len(polling)} of {count} workers polling, exits {dead}; "
                        f"see {logs}"
                    )
                time.sleep(0.05)
            yield processes
        finally:
            for process in processes:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            for process in processes:
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def drain_seconds(backlog: int, prefix: str) -> float:
    """Save ``backlog`` files in one transaction; seconds from its commit until
    the workers have transferred the last."""
    storage = storages["scaleout"]
    data = b"x" * FILE_SIZE
    with transaction.atomic():
        for i in range(backlog):
            storage.save(f"{prefix}/{i}.bin", ContentFile(data))
    committed = time.time()
    rows = PendingTransfer.objects.filter(storage_key=KEY)
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while rows.exclude(status=PendingTransfer.Status.DONE).exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the workers left rows after {DRAIN_TIMEOUT} s")
        time.sleep(0.02)
    last = rows.aggregate(last=Max("transferred_at"))["last"]
    assert rows.count() == backlog
    return float(last.timestamp() - committed)


def cpu_seconds(processes: list[subprocess.Popen[bytes]]) -> float:
    """The CPU time (user and system, all threads) the processes have used."""
    total = 0
    for process in processes:
        with open(f"/proc/{process.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def _clear() -> None:
    PendingTransfer.objects.filter(storage_key=KEY).delete()
    entry = cast("dict[str, Any]", settings.STORAGES["scaleout"])
    options: dict[str, Any] = entry["OPTIONS"]
    for side in ("local_options", "remote_options"):
        shutil.rmtree(options[side]["location"], ignore_errors=True)


def case_scaleout(full: bool) -> list[dict[str, Any]]:
    if connection.vendor != "postgresql":
        return []
    plan = plan_for(full)
    adoption.mark_adopted(KEY)  # a new site: no save asks the remote first
    seconds: dict[tuple[int, int], list[float]] = {}
    cpu_ms: dict[tuple[int, int], list[float]] = {}
    load: dict[tuple[int, int], list[float]] = {}
    with scratch("scaleout-logs") as logs:
        for number in range(plan.rounds):
            order = plan.workers if number % 2 == 0 else plan.workers[::-1]
            for workers in order:
                _clear()
                with running_workers(workers, logs) as processes:
                    first = drain_seconds(plan.backlogs[0], f"r{number}-first")
                    seconds.setdefault((workers, -plan.backlogs[0]), []).append(first)
                    _clear()
                    for backlog in plan.backlogs:
                        before = cpu_seconds(processes)
                        taken = drain_seconds(backlog, f"r{number}-{backlog}")
                        cpu = cpu_seconds(processes) - before
                        seconds.setdefault((workers, backlog), []).append(taken)
                        # What the workers spent (their database server's share
                        # not counted) against the machine's cores: where N
                        # workers' rate times this nears the cores free for them,
                        # the figure measures the CPU, not the claims.
                        cpu_ms.setdefault((workers, backlog), []).append(
                            cpu / backlog * 1000
                        )
                        load.setdefault((workers, backlog), []).append(
                            os.getloadavg()[0]
                        )
                        print(
                            f"    scaleout: {workers} worker(s), {backlog} rows: "
                            f"{taken:.2f} s ({backlog / taken:.1f} rows/s), worker "
                            f"CPU {cpu / backlog * 1000:.2f} ms/row, load "
                            f"{os.getloadavg()[0]:.1f}",
                            flush=True,
                        )
                        _clear()
    _clear()
    results = []
    first = plan.backlogs[0]
    one = seconds.get((1, -first))
    for workers in plan.workers:
        if one is None:
            break
        ratios = [
            base / taken
            for base, taken in zip(one, seconds[(workers, -first)], strict=True)
        ]
        results.append(
            {
                "figure": f"{workers} --loop worker(s) just started, their first "
                f"backlog ({first} rows), remote waiting 20 ms per write",
                "target": "reported",
                "measured": round(statistics.median(ratios), 4),
                "unit": "x one worker's rate",
                "passed": None,
                "seconds": [round(t, 3) for t in seconds[(workers, -first)]],
                "ratios": [round(r, 4) for r in ratios],
            }
        )
    for backlog in plan.backlogs:
        one = seconds[(1, backlog)]
        for workers in plan.workers:
            # Per round: one worker's time over N workers' (higher is better).
            ratios = [
                base / taken
                for base, taken in zip(one, seconds[(workers, backlog)], strict=True)
            ]
            ratio = statistics.median(ratios)
            applies = workers > 1 and backlog >= 4 * workers
            limit = 0.85 * workers
            results.append(
                {
                    "figure": f"{workers} running --loop worker(s), backlog of "
                    f"{backlog} rows (after their first), remote waiting 20 ms per "
                    "write",
                    "target": f">= {limit:.2f}" if applies else "reported",
                    "measured": round(ratio, 4),
                    "unit": "x one worker's rate",
                    "passed": ratio >= limit if applies else None,
                    "rows_per_second": [
                        round(backlog / taken, 1)
                        for taken in seconds[(workers, backlog)]
                    ],
                    "seconds": [round(t, 3) for t in seconds[(workers, backlog)]],
                    "ratios": [round(r, 4) for r in ratios],
                    "interval": INTERVAL,
                    "worker_cpu_ms_per_row": [
                        round(ms, 3) for ms in cpu_ms[(workers, backlog)]
                    ],
                    "load_average": [round(x, 2) for x in load[(workers, backlog)]],
                }
            )
    return results
