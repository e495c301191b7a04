"""The benchmark cases. Each returns one or more figures: a dict with the figure's
name, its target, the measured value and the raw timings behind it.

A case compares the package with the physical floor, the same work without it,
in alternating rounds in one process, and reports the median of the per-round
ratios, so a noisy machine moves both sides alike.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.core.files.base import ContentFile
from django.core.files.storage import FileSystemStorage, Storage
from django.core.management import call_command
from django.db import connections, router, transaction
from django.template import Context, Template
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from benchmarks.audit_case import case_audit
from benchmarks.dashboard_case import case_dashboard
from benchmarks.harness import (
    ROOT,
    latency_proxy,
    ledger_database,
    make_bucket,
    moto_server,
    s3_options,
    scratch,
    settle,
    side_by_side,
    timed,
)
from benchmarks.metrics_case import case_metrics
from benchmarks.scaleout import case_scaleout
from queued_storage import adoption, registry
from queued_storage.backends import QueuedStorage
from queued_storage.ledger_sql import name_hash, new_generation
from queued_storage.models import PendingTransfer, StorageState
from queued_storage.worker import drain

FS = "django.core.files.storage.FileSystemStorage"
S3 = "storages.backends.s3.S3Storage"
KIB = 1024
MIB = 1024 * KIB


@dataclass(frozen=True)
class Sizes:
    """How much work each case does: the issue's sizes in full mode; fewer
    rounds (and fewer files where a round is slow) in quick mode. Side-by-side
    rounds come in pairs, one of each order (see ``SideBySide.paired_ratios``)."""

    save_files: int
    save_autocommit_files: int
    save_rounds: int
    #: Rounds of the autocommit save, a figure without a target.
    save_reported_rounds: int
    drain_files: int
    drain_rounds: int
    #: Rounds of the ledger floor against the raw loop (a figure without a target).
    drain_floor_rounds: int
    s3_files: int
    s3_rounds: int
    latency_files: int
    latency_rounds: int
    lookup_rounds: int
    overhead_files: int
    overhead_rounds: int
    scale_rows: int
    scale_rounds: int
    memory_bytes: int
    #: Rounds of the memory case, queued and raw interleaved (medians reported).
    memory_rounds: int
    #: Also drain to S3 with a HEAD before each upload (create-only off).
    s3_head_first: bool


QUICK = Sizes(
    save_files=1000,
    save_autocommit_files=200,
    save_rounds=6,
    save_reported_rounds=4,
    drain_files=2000,
    drain_rounds=10,
    drain_floor_rounds=6,
    s3_files=100,
    s3_rounds=2,
    latency_files=150,
    latency_rounds=2,
    lookup_rounds=6,
    overhead_files=1000,
    overhead_rounds=3,
    scale_rows=1_000_000,
    scale_rounds=6,
    memory_bytes=256 * MIB,
    memory_rounds=5,
    s3_head_first=False,
)
FULL = Sizes(
    save_files=1000,
    save_autocommit_files=1000,
    save_rounds=12,
    save_reported_rounds=12,
    drain_files=2000,
    drain_rounds=12,
    drain_floor_rounds=8,
    s3_files=2000,
    s3_rounds=4,
    latency_files=2000,
    latency_rounds=4,
    lookup_rounds=12,
    overhead_files=2000,
    overhead_rounds=5,
    scale_rows=1_000_000,
    scale_rounds=12,
    memory_bytes=1024 * MIB,
    memory_rounds=5,
    s3_head_first=True,
)


def figure(
    name: str,
    *,
    target: str,
    measured: float,
    unit: str,
    passed: bool | None,
    **details: Any,
) -> dict[str, Any]:
    return {
        "figure": name,
        "target": target,
        "measured": round(measured, 4),
        "unit": unit,
        "passed": passed,
        **details,
    }


def new_key(prefix: str) -> str:
    return f"bench-{prefix}-{uuid.uuid4().hex[:8]}"


def queued_storage(
    root: Path,
    *,
    remote: str = FS,
    remote_options: dict[str, Any] | None = None,
    key: str,
    **kwargs: Any,
) -> QueuedStorage:
    if remote_options is None:
        remote_options = {"location": str(root / "remote")}
    storage = QueuedStorage(
        FS,
        remote,
        local_options={"location": str(root / "local"), "base_url": "/media/"},
        remote_options=remote_options,
        key=key,
        **kwargs,
    )
    # A new site: its remote holds nothing from before the ledger, so it is
    # declared adopted (adopt_remote_files --new) and no save asks the remote.
    adoption.mark_adopted(storage.key)
    return storage


def forget(storage: QueuedStorage) -> None:
    PendingTransfer.objects.filter(storage_key=storage.key).delete()
    StorageState.objects.filter(storage_key=storage.key).delete()
    registry.forget(storage.key)
    adoption.forget(storage.key)


# 1. Save path ------------------------------------------------------------------


#: Saves of each side before the timed rounds (imports, caches, the first files).
WARM_UP_FILES = 200


def case_save(sizes: Sizes) -> list[dict[str, Any]]:
    return [
        _save_against_ledger_floor(sizes, orm=True),
        _save_against_ledger_floor(sizes, orm=False),
        *_save_against_file_field(sizes),
    ]


def _twin_insert(connection: Any) -> tuple[str, list[Any], dict[str, int]]:
    """The plain ``INSERT`` of one :class:`LedgerTwin` row, built once: its SQL,
    its parameters with every default filled in, and where the columns a save
    sets go."""
    from benchmarks.benchapp.models import LedgerTwin

    fields = [f for f in LedgerTwin._meta.concrete_fields if not f.primary_key]
    quote = connection.ops.quote_name
    sql = (
        f"INSERT INTO {quote(LedgerTwin._meta.db_table)} "
        f"({', '.join(quote(f.column) for f in fields)}) "
        f"VALUES ({', '.join(['%s'] * len(fields))})"
    )
    template = [f.get_db_prep_save(f.get_default(), connection) for f in fields]
    return sql, template, {f.name: i for i, f in enumerate(fields)}


def _save_against_ledger_floor(sizes: Sizes, *, orm: bool) -> dict[str, Any]:
    """``QueuedStorage.save()`` against the issue's floor: a plain
    ``FileSystemStorage.save()`` plus one ``INSERT`` of a row shaped like the
    ledger's (:class:`LedgerTwin`: the same columns, unique constraint and
    indexes), each side ``n`` saves of a 10 KiB file in one
    ``transaction.atomic()``. A save must write its file and its row in the
    caller's transaction (DESIGN invariant 2): no save can cost less.

    ``orm``: the row is written with ``objects.create()`` (the issue's floor);
    else with plain SQL built once, parameters and all (the database's own cost
    only, what the package's save sends too)."""
    from benchmarks.benchapp.models import LedgerTwin

    data = os.urandom(10 * KIB)
    host = "bench"
    connection = connections[router.db_for_write(LedgerTwin)]
    sql, template, slot = _twin_insert(connection)
    when = LedgerTwin._meta.get_field("created_at")

    def contents(n: int) -> list[tuple[str, ContentFile[bytes]]]:
        return [(f"docs/{i}.bin", ContentFile(data)) for i in range(n)]

    def queued(n: int) -> Callable[[int], float]:
        def run(_round: int) -> float:
            with scratch("save") as root:
                storage = queued_storage(root, key=new_key("save"))
                files = contents(n)

                def saves() -> None:
                    with transaction.atomic():
                        for name, content in files:
                            storage.save(name, content)

                seconds, _ = timed(saves)
                rows = PendingTransfer.objects.filter(storage_key=storage.key)
                assert rows.queued().count() == n, "every save must leave a row"
                forget(storage)
            return seconds

        return run

    def insert_orm(key: str, name: str, size: int) -> None:
        LedgerTwin.objects.create(
            storage_key=key,
            name=name,
            name_hash=name_hash(name),
            size=size,
            host=host,
            next_attempt_at=timezone.now(),
        )

    def insert_sql(key: str, name: str, size: int) -> None:
        now = when.get_db_prep_save(timezone.now(), connection)
        params = list(template)
        for column_name, value in (
            ("storage_key", key),
            ("name", name),
            ("name_hash", name_hash(name)),
            ("generation", new_generation()),
            ("size", size),
            ("host", host),
            ("next_attempt_at", now),
            ("created_at", now),
            ("updated_at", now),
        ):
            params[slot[column_name]] = value
        with connection.cursor() as cursor:
            cursor.execute(sql, params)

    insert = insert_orm if orm else insert_sql

    def floor(n: int) -> Callable[[int], float]:
        def run(_round: int) -> float:
            with scratch("save") as root:
                plain = FileSystemStorage(
                    location=str(root / "plain"), base_url="/media/"
                )
                key = new_key("floor")
                files = contents(n)

                def saves() -> None:
                    with transaction.atomic():
                        for name, content in files:
                            insert(key, plain.save(name, content), content.size)

                seconds, _ = timed(saves)
                assert LedgerTwin.objects.filter(storage_key=key).count() == n
                LedgerTwin.objects.all().delete()
            return seconds

        return run

    n = sizes.save_files
    queued(WARM_UP_FILES)(0)  # warm-up, untimed
    floor(WARM_UP_FILES)(0)
    rounds = sizes.save_rounds if orm else sizes.save_reported_rounds
    timing = side_by_side(rounds, queued(n), floor(n))
    ratio = timing.median_ratio()
    how = "ORM INSERT" if orm else "INSERT as SQL built once"
    return figure(
        f"save, {n} QueuedStorage.save() of a 10 KiB file in transaction.atomic(), "
        f"floor: FileSystemStorage.save() + one ledger-shaped {how}",
        target="<= 1.05" if orm else "reported",
        measured=ratio,
        unit=f"x FileSystemStorage.save() + one ledger-shaped {how}",
        passed=ratio <= 1.05 if orm else None,
        per_file_ms={
            "queued": round(statistics.median(timing.subject) / n * 1000, 4),
            "plain": round(statistics.median(timing.floor) / n * 1000, 4),
        },
        **timing.as_dict(),
    )


def _save_against_file_field(sizes: Sizes) -> list[dict[str, Any]]:
    """``Model.objects.create(file=...)`` with a ``QueuedFileField`` against the
    same with a ``FileField`` and ``FileSystemStorage`` (no ledger row), in
    ``transaction.atomic()`` and in autocommit."""
    from benchmarks.benchapp.models import PlainDoc, QueuedDoc

    data = os.urandom(10 * KIB)
    queued_field = QueuedDoc._meta.get_field("file")
    plain_field = PlainDoc._meta.get_field("file")

    def create_all(model: Any, atomic: bool, n: int) -> Callable[[], None]:
        files = [ContentFile(data, name=f"{i}.bin") for i in range(n)]

        def run() -> None:
            if atomic:
                with transaction.atomic():
                    for file in files:
                        model.objects.create(file=file)
            else:
                for file in files:
                    model.objects.create(file=file)

        return run

    def files_for(atomic: bool) -> int:
        return sizes.save_files if atomic else sizes.save_autocommit_files

    def queued(atomic: bool, n: int) -> Callable[[int], float]:
        def run(_round: int) -> float:
            with scratch("save") as root:
                storage = queued_storage(root, key=new_key("save"))
                queued_field.storage = storage  # type: ignore[attr-defined]
                seconds, _ = timed(create_all(QueuedDoc, atomic, n))
                rows = PendingTransfer.objects.filter(storage_key=storage.key)
                assert rows.queued().count() == n, "every save must leave a row"
                QueuedDoc.objects.all().delete()
                forget(storage)
            return seconds

        return run

    def plain(atomic: bool, n: int) -> Callable[[int], float]:
        def run(_round: int) -> float:
            with scratch("save") as root:
                plain_field.storage = FileSystemStorage(  # type: ignore[attr-defined]
                    location=str(root / "plain"), base_url="/media/"
                )
                seconds, _ = timed(create_all(PlainDoc, atomic, n))
                assert PlainDoc.objects.count() == n
                PlainDoc.objects.all().delete()
            return seconds

        return run

    results = []
    # Reported, not a target: the floor writes one row, a queued save two (the
    # model's and the ledger's, in the caller's transaction: DESIGN invariant 2).
    # Issue 7 found its 1.15x beyond that limit on PostgreSQL; the save case
    # above holds the target against the floor with both rows.
    for atomic in (True, False):
        n = files_for(atomic)
        queued(atomic, WARM_UP_FILES)(0)  # warm-up, untimed
        plain(atomic, WARM_UP_FILES)(0)
        rounds = sizes.save_rounds if atomic else sizes.save_reported_rounds
        timing = side_by_side(rounds, queued(atomic, n), plain(atomic, n))
        ratio = timing.median_ratio()
        mode = "transaction.atomic()" if atomic else "autocommit"
        results.append(
            figure(
                f"save path, {n} model creations with a 10 KiB file, {mode}, "
                "floor: FileField + FileSystemStorage",
                target="reported",
                measured=ratio,
                unit="x FileField+FileSystemStorage time",
                passed=None,
                per_file_ms={
                    "queued": round(statistics.median(timing.subject) / n * 1000, 4),
                    "plain": round(statistics.median(timing.floor) / n * 1000, 4),
                },
                **timing.as_dict(),
            )
        )
    return results


# 2. Drain throughput -----------------------------------------------------------


def _prepare_rows(storage: QueuedStorage, n: int, data: bytes) -> list[str]:
    with transaction.atomic():
        return [storage.save(f"f/{i}.bin", ContentFile(data)) for i in range(n)]


def _drain_command(concurrency: int) -> float:
    settle()
    start = time.perf_counter()
    call_command(
        "process_transfers",
        verbosity=0,
        concurrency=concurrency,
        progress=False,
    )
    settle()
    return time.perf_counter() - start


def _raw_loop(names: list[str], local: Storage, remote: Storage) -> float:
    settle()
    start = time.perf_counter()
    for name in names:
        with local.open(name, "rb") as source:
            remote.save(name, source)
    settle()
    return time.perf_counter() - start


def drain_side_by_side(
    *,
    files: int,
    rounds: int,
    concurrency: int,
    make_remote: Callable[[Path, int, str], tuple[str, dict[str, Any]]],
    warm: Callable[[Storage], None] = lambda storage: None,
    **storage_options: Any,
) -> Any:
    """Rounds of: ``process_transfers`` over ``files`` fresh rows, and the raw loop
    over the same local files into another place of the same remote."""
    data = os.urandom(10 * KIB)
    state: dict[int, Any] = {}

    def setup(number: int) -> dict[str, Any]:
        if number not in state:
            root_cm = scratch("drain")
            root = root_cm.__enter__()
            remote, options = make_remote(root, number, "queued")
            storage = queued_storage(
                root,
                remote=remote,
                remote_options=options,
                key=new_key("drain"),
                **storage_options,
            )
            names = _prepare_rows(storage, files, data)
            raw_path, raw_options = make_remote(root, number, "raw")
            raw = import_storage(raw_path)(**raw_options)
            warm(storage.remote)
            warm(raw)
            state[number] = {
                "cm": root_cm,
                "storage": storage,
                "names": names,
                "raw": raw,
                "done": 0,
            }
        return state[number]

    def finish(number: int) -> None:
        entry = state[number]
        entry["done"] += 1
        if entry["done"] == 2:
            storage = entry["storage"]
            transferred = PendingTransfer.objects.filter(storage_key=storage.key).done()
            assert transferred.count() == files, "process_transfers left rows behind"
            forget(storage)
            del state[number]

    def subject(number: int) -> float:
        setup(number)
        seconds = _drain_command(concurrency)
        finish(number)
        return seconds

    def floor(number: int) -> float:
        entry = setup(number)
        seconds = _raw_loop(entry["names"], entry["storage"].local, entry["raw"])
        finish(number)
        return seconds

    return side_by_side(rounds, subject, floor)


def import_storage(path: str) -> Any:
    from django.utils.module_loading import import_string

    return import_string(path)


def drain_processes_side_by_side(
    *, files: int, rounds: int, keep: ExitStack, ledger_floor: bool = False
) -> Any:
    """Rounds of: ``manage.py process_transfers`` as cron runs it (a process of its
    own, start-up and system checks included, default verbosity) over ``files``
    fresh rows, and ``benchmarks/raw_copy.py``, a process of the same site that
    sets Django up and runs ``remote.save(name, local.open(name))`` over the same
    local files into another directory. Neither flushes its files; each is timed
    from its start to its exit plus ``settle()`` (``os.sync()``), which writes
    out what it left dirty. With ``ledger_floor``, ``benchmarks/ledger_floor.py``
    (the raw loop with plain-SQL claims and done records) stands in for the
    command.

    Each round's files stay until ``keep`` is closed, after the last round: on
    ext4 mounted with ``discard`` (this machine's), deleting 2,000 files made the
    next 2,000 creations several times slower, and the side that ran first in the
    round after a deletion paid for it."""
    data = os.urandom(10 * KIB)
    state: dict[int, Any] = {}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def setup(number: int) -> dict[str, Any]:
        if number not in state:
            root = keep.enter_context(scratch("drain"))
            options = {
                "local": FS,
                "remote": FS,
                "local_options": {
                    "location": str(root / "local"),
                    "base_url": "/media/",
                },
                "remote_options": {"location": str(root / "remote-queued")},
                "key": new_key("drain"),
            }
            storage = QueuedStorage(**options)
            adoption.mark_adopted(storage.key)
            names = _prepare_rows(storage, files, data)
            names_file = root / "names.txt"
            names_file.write_text("\n".join(names))
            state[number] = {
                "storage": storage,
                "options": json.dumps(options),
                "local": str(root / "local"),
                "raw": str(root / "remote-raw"),
                "names_file": str(names_file),
                "done": 0,
            }
        connections.close_all()
        return state[number]

    def finish(number: int) -> None:
        entry = state[number]
        entry["done"] += 1
        if entry["done"] == 2:
            storage = entry["storage"]
            transferred = PendingTransfer.objects.filter(storage_key=storage.key).done()
            assert transferred.count() == files, "process_transfers left rows behind"
            copied = sum(1 for path in Path(entry["raw"]).rglob("*") if path.is_file())
            assert copied == files, "the raw loop left files behind"
            forget(storage)
            del state[number]

    def run(argv: list[str], extra: dict[str, str]) -> float:
        settle()
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, *argv],
            cwd=ROOT,
            env={**env, **extra},
            stdout=subprocess.DEVNULL,
            check=True,
        )
        settle()
        return time.perf_counter() - start

    def subject(number: int) -> float:
        entry = setup(number)
        if ledger_floor:
            key = json.loads(entry["options"])["key"]
            remote = str(Path(entry["raw"]).with_name("remote-floor"))
            argv = ["benchmarks/ledger_floor.py", entry["local"], remote, key]
            seconds = run(argv, {})
        else:
            seconds = run(
                ["manage.py", "process_transfers"],
                {"QUEUED_STORAGE_BENCH_STORAGE": entry["options"]},
            )
        finish(number)
        return seconds

    def floor(number: int) -> float:
        entry = setup(number)
        seconds = run(
            [
                "benchmarks/raw_copy.py",
                entry["local"],
                entry["raw"],
                entry["names_file"],
            ],
            {},
        )
        finish(number)
        return seconds

    return side_by_side(rounds, subject, floor)


def case_drain_fs(sizes: Sizes) -> list[dict[str, Any]]:
    with ExitStack() as keep:  # every round's files deleted at the end
        drain_processes_side_by_side(files=200, rounds=2, keep=keep)  # untimed
        timing = drain_processes_side_by_side(
            files=sizes.drain_files, rounds=sizes.drain_rounds, keep=keep
        )
        # What the ledger alone costs on the day's disk, read beside the target.
        floor_timing = drain_processes_side_by_side(
            files=sizes.drain_files,
            rounds=sizes.drain_floor_rounds,
            keep=keep,
            ledger_floor=True,
        )
    throughput = timing.median_throughput()
    floor_throughput = floor_timing.median_throughput()
    n = sizes.drain_files
    return [
        figure(
            f"drain {n} x 10 KiB to FileSystemStorage: manage.py process_transfers, "
            "start-up included, sequential",
            target=">= 0.8",
            measured=throughput,
            unit="x raw remote.save() loop throughput (a process of the same site)",
            passed=throughput >= 0.8,
            files_per_second={
                "process_transfers": round(n / statistics.median(timing.subject), 1),
                "raw": round(n / statistics.median(timing.floor), 1),
            },
            **timing.as_dict(),
        ),
        figure(
            f"drain {n} x 10 KiB to FileSystemStorage: the ledger floor "
            "(benchmarks/ledger_floor.py: the raw loop with plain-SQL claims of "
            "200 rows, a size check a file, one done UPDATE a claim)",
            target="reported",
            measured=floor_throughput,
            unit="x raw remote.save() loop throughput (a process of the same site)",
            passed=None,
            files_per_second={
                "ledger_floor": round(n / statistics.median(floor_timing.subject), 1),
                "raw": round(n / statistics.median(floor_timing.floor), 1),
            },
            command_against_floor=round(throughput / floor_throughput, 3),
            **floor_timing.as_dict(),
        ),
    ]


def _cold(storage: Storage) -> None:
    # Nothing is warmed: each side builds its boto3 clients on its own time, one
    # for the raw loop, one per worker thread for --concurrency (S3Storage keeps a
    # session per thread), as a cron run of process_transfers does.
    return None


def case_drain_s3(sizes: Sizes) -> list[dict[str, Any]]:
    results = []
    n = sizes.s3_files
    with moto_server() as endpoint:
        bucket = make_bucket(endpoint)

        def remote(root: Path, number: int, side: str) -> tuple[str, dict[str, Any]]:
            return S3, s3_options(endpoint, bucket, location=f"{root.name}-{side}")

        drain_side_by_side(
            files=50, rounds=1, concurrency=1, make_remote=remote, warm=_cold
        )
        # create_only_uploads=True: moto honours If-None-Match, as AWS S3 does
        # (where it is the default); without it a HEAD asks first.
        variants = [(1, True, ">= 0.9", 0.9), (8, True, "reported", None)]
        if sizes.s3_head_first:
            variants.append((1, False, "reported", None))
        for concurrency, create_only, target, limit in variants:
            timing = drain_side_by_side(
                files=n,
                rounds=sizes.s3_rounds,
                concurrency=concurrency,
                make_remote=remote,
                warm=_cold,
                create_only_uploads=create_only,
            )
            throughput = timing.median_throughput()
            how = "create-only uploads" if create_only else "HEAD before each upload"
            # moto runs on this machine's cores: threads that wait on it only
            # help while a core is free for it, so this figure measures the CPU.
            bound = (
                f"; CPU-bound on this machine ({os.cpu_count()} cores shared with moto)"
                if concurrency > 1
                else ""
            )
            results.append(
                figure(
                    f"drain {n} x 10 KiB to S3 (moto on loopback, {how}), "
                    f"--concurrency {concurrency} vs raw sequential{bound}",
                    target=target,
                    measured=throughput,
                    unit="x raw sequential throughput",
                    passed=None if limit is None else throughput >= limit,
                    files_per_second={
                        "process_transfers": round(
                            n / statistics.median(timing.subject), 1
                        ),
                        "raw": round(n / statistics.median(timing.floor), 1),
                    },
                    **timing.as_dict(),
                )
            )
    return results


def case_drain_s3_latency(sizes: Sizes) -> list[dict[str, Any]]:
    n = sizes.latency_files
    with moto_server() as endpoint:
        bucket = make_bucket(endpoint)
        with latency_proxy(endpoint, 0.010) as slow:

            def remote(
                root: Path, number: int, side: str
            ) -> tuple[str, dict[str, Any]]:
                return S3, s3_options(slow, bucket, location=f"{root.name}-{side}")

            timing = drain_side_by_side(
                files=n,
                rounds=sizes.latency_rounds,
                concurrency=8,
                make_remote=remote,
                warm=_cold,
                create_only_uploads=True,
            )
    throughput = timing.median_throughput()
    return [
        figure(
            f"drain {n} x 10 KiB to S3 with 20 ms added round trip (create-only "
            "uploads), --concurrency 8 vs raw sequential",
            target=">= 4",
            measured=throughput,
            unit="x raw sequential throughput",
            passed=throughput >= 4,
            files_per_second={
                "process_transfers": round(n / statistics.median(timing.subject), 1),
                "raw": round(n / statistics.median(timing.floor), 1),
            },
            **timing.as_dict(),
        )
    ]


#: Rows of each side of the lanes case: at 20 ms a write, 8 s sequential.
LANES_FILES = 400


def _drain_slow(concurrency: int) -> float:
    """``process_transfers --concurrency`` over fresh rows to a remote that waits
    :data:`benchmarks.noop.WRITE_WAIT` a write and spends no CPU."""
    with scratch("lanes") as root:
        storage = queued_storage(
            root,
            remote="benchmarks.noop.SlowStorage",
            remote_options={"location": str(root / "remote")},
            key=new_key("lanes"),
        )
        _prepare_rows(storage, LANES_FILES, os.urandom(KIB))
        try:
            seconds = _drain_command(concurrency)
            done = PendingTransfer.objects.filter(storage_key=storage.key).done()
            assert done.count() == LANES_FILES, "process_transfers left rows behind"
        finally:
            forget(storage)
    return seconds


def case_drain_lanes(sizes: Sizes) -> list[dict[str, Any]]:
    from benchmarks.noop import WRITE_WAIT

    timing = side_by_side(
        sizes.latency_rounds + 1,
        lambda number: _drain_slow(8),
        lambda number: _drain_slow(1),
    )
    speedup = timing.median_throughput()
    return [
        figure(
            f"drain {LANES_FILES} x 1 KiB to a remote that waits "
            f"{WRITE_WAIT * 1000:.0f} ms a write (no CPU): --concurrency 8 vs 1",
            target=">= 7",
            measured=speedup,
            unit="x --concurrency 1 throughput (8 at most)",
            passed=speedup >= 7,
            **timing.as_dict(),
        )
    ]


# 3. Lookups ------------------------------------------------------------------------

TEMPLATE = Template(
    '{% for doc in docs %}<a href="{{ doc.file.url }}">{{ doc.file.name }}</a>\n'
    "{% endfor %}"
)


def _ledger_queries(captured: CaptureQueriesContext) -> int:
    return sum(
        "queued_storage_pendingtransfer" in query["sql"]
        for query in captured.captured_queries
    )


def _lookups(
    sizes: Sizes, root: Path, label: str, remote: str, options: dict[str, Any]
) -> list[dict[str, Any]]:
    from benchmarks.benchapp.models import PlainDoc, QueuedDoc
    from queued_storage import prefetch_files

    results = []
    data = os.urandom(KIB)
    storage = queued_storage(
        root, remote=remote, remote_options=options, key=new_key("url")
    )
    names = _prepare_rows(storage, 100, data)
    drain(keys=[storage.key])
    assert storage.using_remote(names[0])
    queued_field = QueuedDoc._meta.get_field("file")
    plain_field = PlainDoc._meta.get_field("file")
    queued_field.storage = storage  # type: ignore[attr-defined]
    plain_field.storage = storage.remote  # type: ignore[attr-defined]
    queued_docs = [QueuedDoc(file=name) for name in names]
    plain_docs = [PlainDoc(file=name) for name in names]
    connection = connections["default"]

    with CaptureQueriesContext(connection) as without:
        TEMPLATE.render(Context({"docs": queued_docs}))
    with CaptureQueriesContext(connection) as captured, prefetch_files(queued_docs):
        html = TEMPLATE.render(Context({"docs": queued_docs}))
    assert html == TEMPLATE.render(Context({"docs": plain_docs})) or (remote == S3), (
        "prefetched URLs must be the remote's URLs"
    )
    prefetched_queries = _ledger_queries(captured)

    def render_prefetched(_round: int) -> float:
        start = time.perf_counter()
        with prefetch_files(queued_docs):
            TEMPLATE.render(Context({"docs": queued_docs}))
        return time.perf_counter() - start

    def render_plain(_round: int) -> float:
        start = time.perf_counter()
        TEMPLATE.render(Context({"docs": plain_docs}))
        return time.perf_counter() - start

    def repeat(func: Callable[[int], float], times: int) -> Callable[[int], float]:
        return lambda number: sum(func(number) for _ in range(times))

    render = side_by_side(
        sizes.lookup_rounds, repeat(render_prefetched, 20), repeat(render_plain, 20)
    )
    results.append(
        figure(
            f"url() of 100 transferred files in one template, remote "
            f"{label}, with prefetch_files()",
            target="<= 1 ledger query",
            measured=prefetched_queries,
            unit="ledger queries",
            passed=prefetched_queries <= 1,
            queries_without_prefetch=_ledger_queries(without),
            render_time_ratio=round(render.median_ratio(), 4),
            render_ms={
                "prefetched": round(statistics.median(render.subject) / 20 * 1000, 3),
                "remote_only": round(statistics.median(render.floor) / 20 * 1000, 3),
            },
            **render.as_dict(),
        )
    )

    sample = [random.choice(names) for _ in range(500)]
    with CaptureQueriesContext(connection) as one:
        storage.url(names[0])
    pks = dict(
        PendingTransfer.objects.filter(storage_key=storage.key).values_list(
            "name", "pk"
        )
    )
    sample_pks = [(name, pks[name]) for name in sample]

    def queued_urls(_round: int) -> float:
        start = time.perf_counter()
        for name in sample:
            storage.url(name)
        return time.perf_counter() - start

    remote_storage = storage.remote
    rows = PendingTransfer.objects.all()

    def floor_urls(_round: int) -> float:
        # The floor: the remote's own url() and one query on the primary key, as
        # an application would write it with the ORM (the three columns url()
        # needs, no model instance).
        start = time.perf_counter()
        for name, pk in sample_pks:
            rows.filter(pk=pk).values_list("status", "deleted", "size").get()
            remote_storage.url(name)
        return time.perf_counter() - start

    def remote_urls(_round: int) -> float:
        start = time.perf_counter()
        for name in sample:
            remote_storage.url(name)
        return time.perf_counter() - start

    table = connection.ops.quote_name(PendingTransfer._meta.db_table)
    by_pk = f"SELECT status, deleted, size FROM {table} WHERE id = %s"

    def raw_floor_urls(_round: int) -> float:
        # A stricter floor, reported: the same query as plain SQL (no ORM).
        start = time.perf_counter()
        for name, pk in sample_pks:
            with connection.cursor() as cursor:
                cursor.execute(by_pk, [pk])
                cursor.fetchone()
            remote_storage.url(name)
        return time.perf_counter() - start

    queued_urls(0)
    floor_urls(0)
    single = side_by_side(sizes.lookup_rounds, queued_urls, floor_urls)
    remote_only = side_by_side(sizes.lookup_rounds, queued_urls, remote_urls)
    raw_floor = side_by_side(sizes.lookup_rounds, queued_urls, raw_floor_urls)
    ratio = single.median_ratio()
    queries = _ledger_queries(one)
    results.append(
        figure(
            f"a single url() of a transferred file, remote {label}",
            target="<= 1.1x, 1 query",
            measured=ratio,
            unit="x (remote.url() + one primary-key ORM query) time",
            passed=queries <= 1 and ratio <= 1.1,
            ledger_queries=queries,
            x_remote_url_alone=round(remote_only.median_ratio(), 4),
            x_raw_sql_floor=round(raw_floor.median_ratio(), 4),
            microseconds={
                "queued": round(
                    statistics.median(single.subject) / len(sample) * 1e6, 2
                ),
                "remote": round(statistics.median(single.floor) / len(sample) * 1e6, 2),
            },
            **single.as_dict(),
        )
    )
    forget(storage)
    return results


def case_lookups(sizes: Sizes) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    with moto_server() as endpoint, scratch("lookups") as root:
        bucket = make_bucket(endpoint)
        for label, remote, options in [
            ("S3Storage (presigned URLs)", S3, s3_options(endpoint, bucket)),
            ("FileSystemStorage", FS, {"location": str(root / "remote-fs")}),
        ]:
            results += _lookups(sizes, root, label, remote, options)
    return results


# 4. Memory --------------------------------------------------------------------------


#: glibc's malloc with a fixed mmap threshold: every buffer of a part is mapped and
#: unmapped on its own, instead of the threshold rising to a part's size after the
#: first one is freed (after which freed parts may stay resident in an arena).
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def _memory_run(
    target: str,
    side: str,
    endpoint: str,
    bucket: str,
    size: int,
    env_extra: dict[str, str] | None = None,
) -> dict[str, Any]:
    with scratch("memory") as root:
        local = root / "local"
        local.mkdir()
        big = local / "big.bin"
        with open(big, "wb") as handle:
            handle.truncate(size)  # sparse: made at once, read back as zeros
        (local / "small.bin").write_bytes(b"x" * 1024)
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT)
        env.update(env_extra or {})
        output = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.memory_worker",
                target,
                side,
                str(root),
                endpoint,
                bucket,
            ],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=1800,
        )
        if output.returncode != 0:
            raise RuntimeError(f"memory worker failed: {output.stderr[-3000:]}")
        import json

        return dict(json.loads(output.stdout.strip().splitlines()[-1]))


def case_memory(sizes: Sizes) -> list[dict[str, Any]]:
    results = []
    size = sizes.memory_bytes
    with moto_server() as endpoint:
        bucket = make_bucket(endpoint)
        for target, label in [
            ("fs", "FileSystemStorage"),
            ("s3", "S3 (multipart, boto3's default TransferConfig)"),
            ("s3-tuned", "S3 (multipart, the README's TransferConfig)"),
        ]:
            # Interleaved rounds, each in a process of its own: the peak of a
            # multipart upload moves by a part or so from run to run with the
            # timing of boto3's threads, on either side.
            queued_runs, raw_runs = [], []
            for _ in range(sizes.memory_rounds):
                queued_runs.append(
                    _memory_run(target, "queued", endpoint, bucket, size)
                )
                raw_runs.append(_memory_run(target, "raw", endpoint, bucket, size))
            # The same with glibc's mmap threshold fixed: what the worker itself
            # holds, without the allocator's keeping of a freed part or not.
            fixed: dict[str, list[float]] = {"queued": [], "raw": []}
            if target != "fs":
                for _ in range(sizes.memory_rounds):
                    for side in fixed:
                        run = _memory_run(
                            target, side, endpoint, bucket, size, FIXED_MMAP_THRESHOLD
                        )
                        fixed[side].append(run["rise_bytes"] / MIB)
            queued_rise = statistics.median(r["rise_bytes"] for r in queued_runs)
            raw_rise = statistics.median(r["rise_bytes"] for r in raw_runs)
            # What the worker adds to the remote's own save() of the same file
            # with the same TransferConfig: the peak itself is the remote's (boto3
            # holds max_concurrency parts in memory by design).
            difference = (queued_rise - raw_rise) / MIB
            results.append(
                figure(
                    f"peak RSS rise of a worker transferring a {size // MIB} MiB file "
                    f"to {label}, over remote.save()'s own (median of "
                    f"{sizes.memory_rounds} rounds each)",
                    target="<= 8 MiB",
                    measured=difference,
                    unit="MiB more than the raw remote.save()",
                    passed=difference <= 8,
                    worker_rise_mib=round(queued_rise / MIB, 2),
                    raw_save_rise_mib=round(raw_rise / MIB, 2),
                    worker_rises_mib=[
                        round(r["rise_bytes"] / MIB, 2) for r in queued_runs
                    ],
                    raw_save_rises_mib=[
                        round(r["rise_bytes"] / MIB, 2) for r in raw_runs
                    ],
                    fixed_mmap_threshold_difference_mib=(
                        round(
                            statistics.median(fixed["queued"])
                            - statistics.median(fixed["raw"]),
                            2,
                        )
                        if fixed["queued"]
                        else None
                    ),
                    fixed_mmap_threshold_worker_rises_mib=[
                        round(r, 2) for r in fixed["queued"]
                    ],
                    fixed_mmap_threshold_raw_save_rises_mib=[
                        round(r, 2) for r in fixed["raw"]
                    ],
                    queued=queued_runs[0],
                    raw=raw_runs[0],
                )
            )
    return results


# 5. Scale (PostgreSQL) --------------------------------------------------------------


def _fill_ledger(alias: str, key: str, rows: int, due: int) -> None:
    """``rows`` ledger rows of ``key`` made by the database (generate_series), of
    which the last ``due`` are queued and due, the others done."""
    done = rows - due
    columns = {
        "storage_key": "%(key)s",
        "name": "'f/' || g",
        "name_hash": "encode(sha256(convert_to('f/' || g, 'UTF8')), 'hex')",
        "status": f"CASE WHEN g <= {done} THEN 'done' ELSE 'queued' END",
        "generation": "g",
        "deleted": "false",
        "remote_owned": "true",
        "attempts": f"CASE WHEN g <= {done} THEN 1 ELSE 0 END",
        "next_attempt_at": f"CASE WHEN g <= {done} THEN NULL "
        "ELSE now() - interval '1 hour' + g * interval '1 microsecond' END",
        "lease_token": "''",
        "lease_expires_at": "NULL",
        "size": "10240",
        "checksum": "''",
        "last_error": "''",
        "error_history": "'[]'::jsonb",
        "host": "'bench'",
        "created_at": "now()",
        "updated_at": "now()",
        "transferred_at": f"CASE WHEN g <= {done} THEN now() ELSE NULL END",
    }
    fields = [f for f in PendingTransfer._meta.concrete_fields if f.column != "id"]
    missing = [f.column for f in fields if f.column not in columns]
    if missing:
        raise RuntimeError(f"the scale benchmark does not know columns {missing}")
    names = [f.column for f in fields]
    sql = (
        f"INSERT INTO {PendingTransfer._meta.db_table} ({', '.join(names)}) "
        f"SELECT {', '.join(columns[n] for n in names)} "
        f"FROM generate_series(1, {rows}) AS g"
    )
    with connections[alias].cursor() as cursor:
        cursor.execute(sql, {"key": key})
        cursor.execute(f"ANALYZE {PendingTransfer._meta.db_table}")


def _explain(alias: str, func: Callable[[], Any]) -> list[dict[str, Any]]:
    """Run ``func`` once, then EXPLAIN ANALYZE each statement it sent (writes in a
    transaction that is rolled back)."""
    statements: list[tuple[str, Any]] = []

    def capture(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        statements.append((sql, params))
        return execute(sql, params, many, context)

    connection = connections[alias]
    with connection.execute_wrapper(capture):
        func()
    plans = []
    for sql, params in statements:
        if not sql.lstrip().upper().startswith(("SELECT", "UPDATE")):
            continue
        with transaction.atomic(using=alias), connection.cursor() as cursor:
            cursor.execute(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", params)
            plan = "\n".join(row[0] for row in cursor.fetchall())
            transaction.set_rollback(True, using=alias)
        plans.append(
            {
                "sql": sql,
                "params": [str(param) for param in params or ()],
                "plan": plan,
                "seq_scan": "Seq Scan" in plan,
            }
        )
    return plans


def case_scale(sizes: Sizes) -> list[dict[str, Any]]:
    if connections["default"].vendor != "postgresql" or "large" not in connections:
        return []
    key = "bench-scale"
    with scratch("scale") as root:
        storage = queued_storage(root, key=key)
        for alias, rows in [("default", 1000), ("large", sizes.scale_rows)]:
            PendingTransfer.objects.using(alias).filter(storage_key=key).delete()
            _fill_ledger(alias, key, rows, due=100 if rows == 1000 else 1000)
        done_names = [f"f/{g}" for g in random.sample(range(1, 900), 200)]
        big_names = [
            f"f/{g}" for g in random.sample(range(1, sizes.scale_rows - 1000), 200)
        ]

        def claim(alias: str) -> Callable[[int], float]:
            def run(_round: int) -> float:
                with ledger_database(alias):
                    start = time.perf_counter()
                    rows = PendingTransfer.objects.filter(storage_key=key).claim_due(
                        limit=100, lease=300
                    )
                    seconds = time.perf_counter() - start
                    assert len(rows) == 100, f"claimed {len(rows)} rows, not 100"
                    PendingTransfer.objects.filter(pk__in=[r.pk for r in rows]).update(
                        status=PendingTransfer.Status.QUEUED,
                        lease_token="",
                        lease_expires_at=None,
                        attempts=0,
                    )
                return seconds

            return run

        def lookup(alias: str, names: list[str]) -> Callable[[int], float]:
            def run(_round: int) -> float:
                with ledger_database(alias):
                    start = time.perf_counter()
                    for name in names:
                        storage.url(name)
                    seconds = time.perf_counter() - start
                    assert storage.using_remote(names[0])
                return seconds

            return run

        claim("large")(0)
        claim("default")(0)
        claims = side_by_side(sizes.scale_rounds, claim("large"), claim("default"))
        lookups = side_by_side(
            sizes.scale_rounds,
            lookup("large", big_names),
            lookup("default", done_names),
        )
        with ledger_database("large"):
            claim_plans = _explain(
                "large",
                lambda: PendingTransfer.objects.filter(storage_key=key).claim_due(
                    limit=100, lease=300
                ),
            )
            lookup_plans = _explain("large", lambda: storage.url(big_names[0]))
        for alias in ("default", "large"):
            PendingTransfer.objects.using(alias).filter(storage_key=key).delete()
        registry.forget(key)
    results = []
    for label, timing, plans, per in [
        ("claim a batch of 100 due rows", claims, claim_plans, 1),
        ("url() of a transferred file", lookups, lookup_plans, len(big_names)),
    ]:
        ratio = timing.median_ratio()
        no_seq_scan = not any(plan["seq_scan"] for plan in plans)
        results.append(
            figure(
                f"{label}: {sizes.scale_rows:,}-row ledger (999 of 1000 done) vs "
                "1,000-row ledger",
                target="<= 2x, index scans",
                measured=ratio,
                unit="x time on the 1,000-row ledger",
                passed=ratio <= 2 and no_seq_scan,
                milliseconds={
                    "large": round(statistics.median(timing.subject) / per * 1000, 4),
                    "small": round(statistics.median(timing.floor) / per * 1000, 4),
                },
                index_scans_only=no_seq_scan,
                plans=plans,
                **timing.as_dict(),
            )
        )
    return results


# 6. Per-file ledger overhead ------------------------------------------------------


def case_overhead(sizes: Sizes) -> list[dict[str, Any]]:
    from benchmarks.noop import FILE_SIZE

    n = sizes.overhead_files
    data = b"x" * FILE_SIZE
    per_file = []
    for number in range(sizes.overhead_rounds + 1):
        with scratch("overhead") as root:
            storage = queued_storage(
                root,
                remote="benchmarks.noop.NoopStorage",
                remote_options={},
                task="benchmarks.noop.NoopTransfer",
                key=new_key("overhead"),
            )
            _prepare_rows(storage, n, data)
            settle()
            start = time.perf_counter()
            stats = drain(keys=[storage.key])
            seconds = time.perf_counter() - start
            assert stats.done == n, f"drained {stats.done} of {n}"
            forget(storage)
        if number:  # the first round warms up
            per_file.append(seconds / n * 1000)
    measured = statistics.median(per_file)
    vendor = connections["default"].vendor
    return [
        figure(
            f"ledger overhead per file (claim + complete, no-op remote), {n} files",
            target="<= 1 ms" if vendor == "postgresql" else "reported",
            measured=measured,
            unit="ms per file",
            passed=measured <= 1 if vendor == "postgresql" else None,
            per_round_ms=[round(value, 4) for value in per_file],
        )
    ]


CASES: dict[str, Callable[[Sizes], list[dict[str, Any]]]] = {
    "save": case_save,
    "drain": case_drain_fs,
    "s3": case_drain_s3,
    "latency": case_drain_s3_latency,
    "lanes": case_drain_lanes,
    "lookups": case_lookups,
    "memory": case_memory,
    "scale": case_scale,
    "overhead": case_overhead,
    "scaleout": lambda sizes: case_scaleout(sizes is FULL),
    "dashboard": case_dashboard,
    "metrics": case_metrics,
    "audit": case_audit,
}


def now_iso() -> str:
    return timezone.now().isoformat(timespec="seconds")
