"""Worker processes: many at once upload each file once; leases keep a slow but
alive upload to its worker and hand a killed worker's row to another.

Every worker here is ``manage.py process_transfers`` in an OS process of its own,
on this test run's database; the remote journals each upload it receives."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.db import OperationalError, connection, connections, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from queued_storage.backends import QueuedStorage
from queued_storage.errors import Outcome
from queued_storage.failures import ledger_db
from queued_storage.models import PendingTransfer, PendingTransferQuerySet
from queued_storage.transfer import process_row
from queued_storage.worker import drain
from tests.fleet import (
    DOCUMENTS,
    Journal,
    Worker,
    is_sqlite,
    queue_files,
    statuses,
)
from tests.helpers import content, thread_starts, wait_until
from tests.workers import run_command

Status = PendingTransfer.Status

pytestmark = pytest.mark.django_db(transaction=True)


def journaling_remote(
    settings: Any, remote: Path, journal: Path, **options: Any
) -> Journal:
    """Point the ``documents`` storage's remote at a journaling FileSystemStorage;
    worker processes started afterwards get the same STORAGES."""
    storages = dict(settings.STORAGES)
    storages["queued_remote"] = {
        "BACKEND": "tests.storages.JournalingStorage",
        "OPTIONS": {"location": str(remote), "journal": str(journal), **options},
    }
    settings.STORAGES = storages
    return Journal(journal)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_many_worker_processes_upload_each_file_exactly_once(
    fresh_storages: dict[str, Path], settings: Any, tmp_path: Path
) -> None:
    """2,000 queued files, four worker processes: one upload per file, every row
    done at its first attempt. On SQLite, whose writers queue on one lock, two
    processes and 500 files: more only adds time spent waiting for the lock."""
    journal = journaling_remote(
        settings, fresh_storages["remote"], tmp_path / "journal.log"
    )
    files, count = (500, 2) if is_sqlite() else (2000, 4)
    digests = queue_files(fresh_storages["local"], files)

    workers = [
        Worker(tmp_path / f"worker{i}.log", ["--batch-size", "20"]).start()
        for i in range(count)
    ]
    codes = [worker.wait(timeout=150) for worker in workers]

    outputs = "\n".join(
        f"--- worker {worker.pid}:\n{worker.output()}" for worker in workers
    )
    assert codes == [0] * count, outputs
    assert "database is locked" not in outputs
    assert "Traceback" not in outputs
    assert "transfer error" not in outputs
    assert "transfer crashed" not in outputs
    once = Counter(dict.fromkeys(digests, 1))
    assert journal.count("begin") == once
    assert journal.count("saved") == once
    assert statuses() == Counter({Status.DONE: files})
    assert set(
        PendingTransfer.objects.filter(storage_key=DOCUMENTS).values_list(
            "attempts", flat=True
        )
    ) == {1}
    for name, digest in digests.items():
        assert sha256(fresh_storages["remote"] / name) == digest, name
    # The workers really ran side by side: more than one of them uploaded.
    uploaders = Counter(e.pid for e in journal.events() if e.kind == "saved")
    assert len(uploaders) >= 2, uploaders
    assert set(uploaders) <= {worker.pid for worker in workers}
    print(f"\nuploads per worker process: {sorted(uploaders.values())}")


@pytest.mark.slow
def test_slow_upload_renews_its_lease_and_is_never_taken_over(
    fresh_storages: dict[str, Path], settings: Any, tmp_path: Path
) -> None:
    """An upload is held (a gate file) until its worker's first lease has run out
    and been renewed; a rival worker that polls then finds nothing due, because
    the uploading worker renews its lease; then the upload finishes. (A 3 s lease,
    renewed every second, leaves room for a busy CI machine.)"""
    lease = 3.0
    gate = tmp_path / "gate"
    journal = journaling_remote(
        settings, fresh_storages["remote"], tmp_path / "journal.log", gate=str(gate)
    )
    overrides = {"QUEUED_STORAGE_LEASE": lease}
    [(name, digest)] = queue_files(fresh_storages["local"], 1, size=64 * 1024).items()
    uploader = Worker(tmp_path / "uploader.log", [], overrides).start()
    try:
        assert wait_until(lambda: journal.count("begin"), timeout=30), uploader.output()
        [begun] = journal.events()
        # The claim came before the upload began: its lease ran out by
        # begun.at + lease, and only a renewal holds the row past that.
        first_lease_over = begun.at + lease

        def renewed_past_the_first_lease() -> bool:
            row = PendingTransfer.objects.get(storage_key=DOCUMENTS, name=name)
            assert row.lease_expires_at is not None
            return (
                time.time() > first_lease_over
                and row.lease_expires_at.timestamp() > time.time()
            )

        assert wait_until(renewed_past_the_first_lease, timeout=lease + 30), (
            uploader.output()
        )
        held = PendingTransfer.objects.get(storage_key=DOCUMENTS, name=name)

        rival = run_command("process_transfers", overrides=overrides)

        assert "No transfers due." in rival.stdout, rival.stdout + rival.stderr
        row = PendingTransfer.objects.get(storage_key=DOCUMENTS, name=name)
        assert (row.status, row.attempts) == (Status.TRANSFERRING, 1)
        assert row.lease_token == held.lease_token
    finally:
        gate.touch()
    assert uploader.wait(timeout=60) == 0, uploader.output()

    [saved] = [event for event in journal.events() if event.kind == "saved"]
    assert journal.count("begin") == Counter({name: 1})
    assert begun.pid == saved.pid == uploader.pid
    row = PendingTransfer.objects.get(storage_key=DOCUMENTS, name=name)
    assert row.status == Status.DONE
    assert row.attempts == 1
    assert sha256(fresh_storages["remote"] / name) == digest


@pytest.mark.slow
def test_worker_killed_mid_upload_leaves_the_row_to_another_after_the_lease(
    fresh_storages: dict[str, Path], settings: Any, tmp_path: Path
) -> None:
    """SIGKILL during a 3 MiB upload: the row stays leased until the lease runs
    out, then another worker process replaces the partial copy and finishes."""
    lease = 2.0
    size = 48 * 64 * 1024  # 3 MiB in 48 chunks, 0.1 s apart
    journal = journaling_remote(
        settings,
        fresh_storages["remote"],
        tmp_path / "journal.log",
        delay=0.1,
        chunk_size=64 * 1024,
    )
    overrides = {"QUEUED_STORAGE_LEASE": lease}
    [(name, digest)] = queue_files(fresh_storages["local"], 1, size=size).items()
    victim = Worker(tmp_path / "victim.log", [], overrides).start()
    remote_file = fresh_storages["remote"] / name
    assert wait_until(
        lambda: remote_file.exists() and remote_file.stat().st_size > 0, timeout=30
    ), victim.output()

    victim.kill()

    killed_at = time.time()
    [begun] = journal.events()
    assert begun.kind == "begin"
    assert begun.pid == victim.pid
    assert 0 < remote_file.stat().st_size < size  # killed mid-upload
    row = PendingTransfer.objects.get(storage_key=DOCUMENTS, name=name)
    assert row.status == Status.TRANSFERRING
    assert row.lease_expires_at is not None
    lease_ends = row.lease_expires_at.timestamp()
    assert lease_ends > killed_at  # the victim's lease still holds the row

    fast = {**settings.STORAGES["queued_remote"]}
    fast["OPTIONS"] = {**fast["OPTIONS"], "delay": 0}
    rescuer = Worker(
        tmp_path / "rescuer.log",
        ["--loop", "--interval", "0.1"],
        {**overrides, "STORAGES": {**settings.STORAGES, "queued_remote": fast}},
    ).start()
    assert wait_until(lambda: journal.count("saved"), timeout=lease + 30), (
        rescuer.output()
    )
    assert rescuer.stop() == 0, rescuer.output()

    events = journal.events()
    assert [(e.kind, e.pid) for e in events] == [
        ("begin", victim.pid),
        ("begin", rescuer.pid),
        ("saved", rescuer.pid),
    ]
    # The rescuer took the row over only once the victim's lease had run out.
    assert events[1].at >= lease_ends
    row = PendingTransfer.objects.get(storage_key=DOCUMENTS, name=name)
    assert row.status == Status.DONE, row.last_error
    assert row.attempts == 2
    assert sha256(remote_file) == digest


# Claims racing each other, made deterministic: what two worker processes do at
# the same moment, replayed on one or two connections.


def claim(limit: int = 20) -> list[PendingTransfer]:
    return PendingTransfer.objects.claim_due(limit=limit, lease=300)


def test_a_claim_in_progress_leaves_the_other_due_rows_to_a_second_worker(
    fresh_storages: dict[str, Path],
) -> None:
    """A worker that finds nothing due ends its cron run: another worker's claim
    must hide only the rows it takes, never the whole queue (MariaDB locked every
    due row while sorting them)."""
    if is_sqlite():
        pytest.skip(
            "SQLite has no row locks: its claims serialise on the database lock, "
            "see test_a_claim_that_loses_its_candidates_to_another_worker_looks_again"
        )
    queue_files(fresh_storages["local"], 100, size=8)
    second: list[PendingTransfer] = []

    def claim_in_another_connection() -> None:
        try:
            second.extend(claim())
        finally:
            connections.close_all()

    with transaction.atomic():
        first = claim()  # its row locks last until this block commits
        rival = threading.Thread(target=claim_in_another_connection)
        rival.start()
        rival.join(timeout=30)

    assert len(first) == 20
    assert len(second) == 20
    assert not {row.pk for row in first} & {row.pk for row in second}


def test_a_claim_that_loses_its_candidates_to_another_worker_looks_again(
    fresh_storages: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without row locks (SQLite) another worker can take every row a claim just
    read before its UPDATE runs; the claim must take the next due rows, not
    report an empty queue."""
    queue_files(fresh_storages["local"], 40, size=8)
    rival: list[PendingTransfer] = []
    take = PendingTransferQuerySet._take

    def take_after_a_rival(*args: Any) -> int:
        if not rival:
            rival.append(PendingTransfer())  # guards against recursion
            rival[:] = claim()  # another worker, between our SELECT and UPDATE
        return take(*args)

    monkeypatch.setattr(PendingTransferQuerySet, "_take", take_after_a_rival)

    mine = claim()

    assert len(rival) == 20
    assert len(mine) == 20
    assert not {row.pk for row in rival} & {row.pk for row in mine}
    assert PendingTransfer.objects.filter(status=Status.TRANSFERRING).count() == 40


def test_a_claim_sees_a_remote_object_written_since_it_read_its_candidates(
    storage: QueuedStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between a claim's SELECT and UPDATE another worker claimed the row, wrote
    the remote object and died; its lease ran out. The claim must know the object
    is the ledger's, or it fails the row with a conflict for ever."""
    name = storage.save("a.txt", content("payload"))
    take = PendingTransferQuerySet._take
    raced: list[bool] = []

    def take_after_a_crashed_rival(*args: Any) -> int:
        if not raced:
            raced.append(True)
            [row] = claim(limit=1)
            assert storage.task.transfer(name, storage.local, storage.remote)
            # ...and the rival dies before recording it; its lease runs out.
            PendingTransfer.objects.filter(pk=row.pk).update(
                lease_expires_at=timezone.now() - timedelta(seconds=1)
            )
        return take(*args)

    monkeypatch.setattr(PendingTransferQuerySet, "_take", take_after_a_crashed_rival)

    [row] = claim(limit=1)

    assert raced
    assert row.was_owned
    monkeypatch.undo()
    assert process_row(row) is Outcome.DONE, row.last_error
    done = PendingTransfer.objects.get(pk=row.pk)
    assert done.status == Status.DONE
    assert done.remote_owned
    with storage.remote.open(name) as uploaded:
        assert uploaded.read() == b"payload"


def test_claimed_rows_are_what_the_ledger_holds_after_the_claim(
    fresh_storages: dict[str, Path],
) -> None:
    """Where row locks let a claim apply its UPDATE's changes to the rows it read
    instead of reading them back, every field must still be what the database
    holds: a worker records from these rows."""
    queue_files(fresh_storages["local"], 6, size=8)
    # Rows in each state a claim takes: queued, queued after a failed attempt,
    # and one whose worker died (an expired lease on an object it may have written).
    PendingTransfer.objects.filter(name__endswith="01.bin").update(
        attempts=2, last_error="timeout", error_history=[{"error": "timeout"}]
    )
    PendingTransfer.objects.filter(name__endswith="02.bin").update(
        status=Status.TRANSFERRING,
        lease_token="dead-worker",
        lease_expires_at=timezone.now() - timedelta(seconds=5),
        remote_owned=True,
        attempts=1,
    )
    before = {row.pk: row for row in PendingTransfer.objects.all()}

    claimed = claim(limit=10)

    assert len(claimed) == 6
    fields = [field.attname for field in PendingTransfer._meta.concrete_fields]
    for row in claimed:
        stored = PendingTransfer.objects.get(pk=row.pk)
        assert {f: getattr(row, f) for f in fields} == {
            f: getattr(stored, f) for f in fields
        }
        assert row.claimed_from == before[row.pk].status
        assert row.was_owned == before[row.pk].remote_owned
        assert row.attempts == before[row.pk].attempts + 1
    assert {row.status for row in claimed} == {Status.TRANSFERRING}


def test_a_claim_returns_its_rows_in_the_order_they_became_due(
    fresh_storages: dict[str, Path],
) -> None:
    """Rows with an expired lease and queued rows come back in one order, by when
    they became due (MariaDB reads the two kinds apart)."""
    queue_files(fresh_storages["local"], 4, size=8)
    now = timezone.now()
    rows = list(PendingTransfer.objects.order_by("name"))
    due = {
        rows[0].pk: now - timedelta(minutes=3),
        rows[1].pk: now - timedelta(minutes=1),
        rows[2].pk: now - timedelta(minutes=2),
        rows[3].pk: now - timedelta(minutes=2, seconds=30),
    }
    for pk, at in due.items():
        PendingTransfer.objects.filter(pk=pk).update(next_attempt_at=at)
    # The worker of rows[3] died: its lease ran out.
    PendingTransfer.objects.filter(pk=rows[3].pk).update(
        status=Status.TRANSFERRING,
        lease_token="dead-worker",
        lease_expires_at=now - timedelta(seconds=5),
    )

    claimed = claim(limit=10)

    assert [row.pk for row in claimed] == sorted(due, key=due.__getitem__)


def test_a_batch_completion_records_only_the_rows_that_still_hold_their_claim(
    fresh_storages: dict[str, Path],
) -> None:
    """One UPDATE records a batch of verified transfers; each row is a
    compare-and-set of its own (row, generation, lease token)."""
    queue_files(fresh_storages["local"], 4, size=8)
    rows = claim(limit=4)
    resaved, taken_over, fine, also_fine = rows
    PendingTransfer.objects.filter(pk=resaved.pk).update(
        generation=resaved.generation + 1
    )
    PendingTransfer.objects.filter(pk=taken_over.pk).update(lease_token="rival")

    assert PendingTransfer.objects.mark_done_together(rows) == 2

    stored = dict(PendingTransfer.objects.values_list("pk", "status"))
    assert stored == {
        resaved.pk: Status.TRANSFERRING,
        taken_over.pk: Status.TRANSFERRING,
        fine.pk: Status.DONE,
        also_fine.pk: Status.DONE,
    }
    # Not all won: the caller rolls back and goes row by row; the rows in memory
    # are left as they were.
    assert {row.status for row in rows} == {Status.TRANSFERRING}
    assert PendingTransfer.objects.mark_done_together([fine, also_fine]) == 0


@pytest.mark.parametrize(
    "error",
    [
        (1213, "Deadlock found when trying to get lock; try restarting transaction"),
        ("database is locked",),
    ],
    ids=["mariadb-deadlock", "sqlite-locked"],
)
def test_a_ledger_update_aborted_over_a_lock_is_tried_again(
    storage: QueuedStorage, error: tuple[Any, ...]
) -> None:
    """MariaDB picks a deadlock victim even among single-row updates, and SQLite
    gives up once its busy timeout runs out; either way the statement changed
    nothing, and the worker must try it again rather than crash the transfer."""
    name = storage.save("a.txt", content("payload"))
    [row] = claim(limit=1)
    aborted: list[str] = []

    def abort_first_update(execute: Any, sql: str, *args: Any) -> Any:
        if sql.lstrip().upper().startswith("UPDATE") and not aborted:
            aborted.append(sql)
            raise OperationalError(*error)
        return execute(sql, *args)

    with connections["default"].execute_wrapper(abort_first_update):
        outcome = process_row(row)

    assert aborted
    assert outcome is Outcome.DONE
    assert PendingTransfer.objects.get(pk=row.pk).status == Status.DONE
    with storage.remote.open(name) as uploaded:
        assert uploaded.read() == b"payload"


def test_an_idle_loop_poll_is_one_query_and_starts_no_thread(
    storage: QueuedStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """8 workers polling an empty ledger pay each poll: no lane (thread, database
    connection) is started for a poll that finds nothing due, and the poll is
    its claim alone."""
    started = thread_starts(monkeypatch)
    with CaptureQueriesContext(connections[ledger_db()]) as queries:
        call_command(
            "process_transfers",
            "--loop",
            "--max-polls",
            "3",
            "--interval",
            "0.01",
            "--concurrency",
            "4",
            verbosity=0,
        )
    assert started == []
    # The claim: the same few statements each poll, none for counting what is due.
    assert not [q for q in queries.captured_queries if "COUNT(" in q["sql"]]
    assert len(queries.captured_queries) % 3 == 0


def test_a_drain_with_rows_due_still_transfers_them_on_its_lanes(
    storage: QueuedStorage,
) -> None:
    """The first claim is the caller's; its rows go to the lanes all the same."""
    names = [storage.save(f"lane{i}.txt", content(f"lane {i}")) for i in range(6)]
    stats = drain(keys=[storage.key], concurrency=3)
    assert stats.done == 6
    assert all(storage.remote.exists(name) for name in names)


def test_many_rows_are_recorded_done_within_sqlites_placeholder_limit(
    fresh_storages: dict[str, Path],
) -> None:
    """Three placeholders a row: 700 rows in one group went over the 999 that
    SQLite before 3.32 allows a statement (set here on the connection)."""
    queue_files(fresh_storages["local"], 700, size=1)
    rows = claim(limit=700)
    assert len(rows) == 700
    connection.ensure_connection()
    if connection.vendor == "sqlite":
        raw = connection.connection
        limit = sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER
        before = raw.setlimit(limit, 999)
    try:
        with transaction.atomic():
            assert PendingTransfer.objects.mark_done_together(rows) == 700
    finally:
        if connection.vendor == "sqlite":
            raw.setlimit(limit, before)
    assert set(PendingTransfer.objects.values_list("status", flat=True)) == {
        Status.DONE
    }
