"""The operations commands, through ``call_command``: what they print, what they
change, and the exit status a cron job or a monitor acts on."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from queued_storage import registry
from queued_storage.backends import QueuedStorage
from queued_storage.backfill import Backfill
from queued_storage.models import PendingTransfer
from tests.factories import pending_row, pending_rows
from tests.helpers import content, read_bytes, row_by_name_column

pytestmark = pytest.mark.django_db

Status = PendingTransfer.Status
COMMANDS = [
    "process_transfers",
    "transfer_status",
    "queue_transfers",
    "verify_transfers",
    "requeue_transfers",
    "clean_local_copies",
    "adopt_remote_files",
    "audit_storage",
]


@pytest.fixture(autouse=True)
def declared(request: pytest.FixtureRequest) -> None:
    """The test's ``storage`` is one the site declares: the commands find it by
    key before it saved anything, as they find those of settings and the models."""
    if "storage" in request.fixturenames:
        registry.register(request.getfixturevalue("storage"))


@dataclass
class Result:
    out: str
    err: str
    code: int

    @property
    def json(self) -> Any:
        return json.loads(self.out)


def run(command: str, *args: str) -> Result:
    """Run a command as cron would see it: output, errors and the exit status."""
    out, err = StringIO(), StringIO()
    try:
        call_command(command, *args, stdout=out, stderr=err)
    except CommandError as exc:
        err.write(str(exc))
        return Result(out.getvalue(), err.getvalue(), exc.returncode)
    return Result(out.getvalue(), err.getvalue(), 0)


def ago(**delta: float) -> Any:
    return timezone.now() - timedelta(**delta)


def transferred(storage: QueuedStorage, *names: str) -> list[str]:
    """Save ``names`` through the storage and move them to the remote."""
    saved = [storage.save(name, content(f"content of {name}")) for name in names]
    assert run("process_transfers", "--storage", storage.key).code == 0
    for name in saved:
        assert row_by_name_column(storage, name).status == Status.DONE
    return saved


# Every command


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_that_names_its_exit_status(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as excinfo:
        call_command(command, "--help")

    assert excinfo.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"usage: {command}" in text
    assert "--json" in text
    assert "exit status" in text.lower()


@pytest.mark.parametrize("command", COMMANDS)
def test_an_unknown_storage_key_is_a_usage_error(command: str) -> None:
    extra = ["--older-than", "1d"] if command == "clean_local_copies" else []

    result = run(command, "--storage", "nope", *extra)

    assert result.code == 2
    assert "Unknown storage key(s): nope. Known keys:" in result.err
    assert "documents" in result.err


# process_transfers


def test_process_transfers_json_summary(storage: QueuedStorage) -> None:
    for i in range(3):
        storage.save(f"f{i}.txt", content("12345"))

    result = run("process_transfers", "--json")

    assert result.code == 0
    summary = result.json
    assert {k: summary[k] for k in ("done", "retried", "failed", "bytes")} == {
        "done": 3,
        "retried": 0,
        "failed": 0,
        "bytes": 15,
    }
    assert summary["bytes_per_second"] > 0
    assert result.out.count("\n") == 1  # one JSON object, nothing else


def test_process_transfers_live_progress_on_a_terminal(storage: QueuedStorage) -> None:
    for i in range(3):
        storage.save(f"f{i}.txt", content("abc"))

    out = run("process_transfers", "--progress").out

    assert "\r1/3 files" in out
    assert "\r3/3 files  9 B" in out
    assert "ETA 0:00:00" in out
    assert "(done 3, retried 0, failed 0)" in out
    assert out.rstrip().splitlines()[-1].startswith("done=3 retried=0 failed=0")


def test_process_transfers_periodic_lines_off_a_terminal(
    storage: QueuedStorage,
) -> None:
    for i in range(2):
        storage.save(f"f{i}.txt", content("abc"))

    # StringIO is no terminal: plain lines, here every millisecond.
    result = run("process_transfers", "--progress-every", "0.000001")

    lines = result.out.splitlines()
    assert "\r" not in result.out
    assert any(line.startswith("progress 2/2 files") for line in lines)
    assert lines[-1].startswith("done=2 ")


def test_process_transfers_json_keeps_progress_off_stdout(
    storage: QueuedStorage,
) -> None:
    storage.save("a.txt", content())

    result = run("process_transfers", "--json", "--progress")

    assert result.json["done"] == 1
    assert "1/1 files" in result.err


def test_process_transfers_logs_key_value_lines(
    storage: QueuedStorage, caplog: pytest.LogCaptureFixture
) -> None:
    name = storage.save("a.txt", content("abc"))

    with caplog.at_level("INFO", logger="queued_storage"):
        run("process_transfers", "--verbosity", "0")

    assert {record.name for record in caplog.records} == {"queued_storage"}
    assert f"transfer done key={storage.key} name={name} generation=" in caplog.text
    assert "drained done=1 retried=0 failed=0 purged=0 stale=0 bytes=3 " in (
        caplog.text
    )


# transfer_status


def test_transfer_status_counts_per_status_and_storage() -> None:
    pending_rows(2, storage_key="photos")
    pending_row(storage_key="photos", status=Status.DONE)
    pending_row(storage_key="videos", status=Status.FAILED, last_error="E")
    pending_row(storage_key="videos", status=Status.HELD, next_attempt_at=None)

    result = run("transfer_status", "--json")

    assert result.code == 0
    assert result.json["storages"] == {
        "photos": {"held": 0, "queued": 2, "transferring": 0, "done": 1, "failed": 0},
        "videos": {"held": 1, "queued": 0, "transferring": 0, "done": 0, "failed": 1},
    }
    assert result.json["totals"] == {
        "held": 1,
        "queued": 2,
        "transferring": 0,
        "done": 1,
        "failed": 1,
    }
    table = run("transfer_status").out.splitlines()
    assert table[0].split() == [
        "storage",
        "held",
        "queued",
        "transferring",
        "done",
        "failed",
    ]
    assert table[1].split() == ["photos", "0", "2", "0", "1", "0"]
    assert table[2].split() == ["videos", "1", "0", "0", "0", "1"]
    assert table[3].split() == ["total", "1", "2", "0", "1", "1"]


def test_transfer_status_reports_the_backlog_age_stuck_rows_and_recent_errors() -> None:
    pending_row(next_attempt_at=ago(minutes=30))
    pending_row(next_attempt_at=ago(minutes=1))
    # Not due: waiting for a retry, held, failed, or leased by a live worker.
    pending_row(next_attempt_at=timezone.now() + timedelta(hours=5))
    pending_row(status=Status.HELD, next_attempt_at=None)
    pending_row(
        status=Status.TRANSFERRING, lease_expires_at=timezone.now() + timedelta(1)
    )
    # Stuck: its worker's lease ran out two hours ago. The oldest due row.
    pending_row(status=Status.TRANSFERRING, attempts=1, lease_expires_at=ago(hours=2))
    pending_row(
        status=Status.FAILED, attempts=6, last_error="E", updated_at=ago(minutes=5)
    )
    pending_row(attempts=2, last_error="E", updated_at=ago(minutes=50))
    pending_row(
        status=Status.FAILED, attempts=6, last_error="E", updated_at=ago(hours=3)
    )

    status = run("transfer_status", "--json").json

    assert 7190 < status["oldest_due_age_seconds"] < 7300
    assert status["stuck"] == 1
    assert status["errors_last_hour"] == 2
    text = run("transfer_status").out
    assert "oldest due: waiting 2:00:0" in text
    assert "stuck (lease expired, or past the transfer timeout): 1" in text
    assert "errors in the last hour: 2" in text


def test_transfer_status_max_age_is_a_monitoring_check() -> None:
    pending_row(next_attempt_at=ago(minutes=30))

    too_old = run("transfer_status", "--max-age", "600", "--verbosity", "0")
    fine = run("transfer_status", "--max-age", "1h", "--verbosity", "0")

    assert too_old.code == 3
    assert "the oldest due transfer has waited 0:30:0" in too_old.err
    assert "more than 0:10:00" in too_old.err
    assert too_old.out == ""
    assert fine.code == 0


def test_transfer_status_max_age_ignores_rows_that_are_not_due() -> None:
    pending_row(next_attempt_at=timezone.now() + timedelta(hours=1))
    pending_row(status=Status.HELD, next_attempt_at=None)
    pending_row(status=Status.FAILED, updated_at=ago(days=3))

    result = run("transfer_status", "--max-age", "1", "--json")

    assert result.code == 0
    assert result.json["oldest_due_age_seconds"] is None


def test_transfer_status_max_failed() -> None:
    pending_rows(3, status=Status.FAILED)

    assert run("transfer_status", "--max-failed", "3").code == 0
    result = run("transfer_status", "--max-failed", "2", "--json")
    assert result.code == 3
    assert result.json["problems"] == ["3 transfers are failed, more than 2"]


def test_transfer_status_of_one_storage(storage: QueuedStorage) -> None:
    storage.save("a.txt", content())
    pending_row(storage_key="other")

    status = run("transfer_status", "--storage", storage.key, "--json").json

    assert list(status["storages"]) == [storage.key]
    assert status["totals"]["queued"] == 1


def test_transfer_status_rejects_a_bad_duration() -> None:
    with pytest.raises(CommandError) as excinfo:
        call_command("transfer_status", "--max-age", "soon")

    assert "'soon' is not a duration" in str(excinfo.value)


# requeue_transfers


def test_requeue_transfers_puts_failed_rows_back_and_nothing_else() -> None:
    failed = pending_rows(
        2, status=Status.FAILED, attempts=6, last_error="E", next_attempt_at=None
    )
    held = pending_row(status=Status.HELD, next_attempt_at=None)
    waiting = pending_row(
        attempts=2, next_attempt_at=timezone.now() + timedelta(hours=1)
    )
    done = pending_row(status=Status.DONE)

    result = run("requeue_transfers")

    assert result.code == 0
    assert "Re-queued 2 transfer(s)" in result.out
    for row in failed:
        row.refresh_from_db()
        assert row.status == Status.QUEUED
        assert row.attempts == 0
        assert row.last_error == ""
        assert PendingTransfer.objects.due().filter(pk=row.pk).exists()
    assert PendingTransfer.objects.get(pk=held.pk).status == Status.HELD
    assert PendingTransfer.objects.get(pk=waiting.pk).attempts == 2
    assert PendingTransfer.objects.get(pk=done.pk).status == Status.DONE


def test_requeue_transfers_filters_by_storage_error_and_age() -> None:
    match = pending_row(
        storage_key="photos",
        status=Status.FAILED,
        last_error="ConnectionError: remote unreachable",
        updated_at=ago(days=2),
    )
    other_storage = pending_row(
        storage_key="videos",
        status=Status.FAILED,
        last_error="ConnectionError: remote unreachable",
        updated_at=ago(days=2),
    )
    other_error = pending_row(
        storage_key="photos",
        status=Status.FAILED,
        last_error="RemoteConflict: the remote already has an object",
        updated_at=ago(days=2),
    )
    too_recent = pending_row(
        storage_key="photos",
        status=Status.FAILED,
        last_error="ConnectionError: remote unreachable",
        updated_at=ago(minutes=5),
    )
    # Storage keys of rows only, not configured here: filtered through the ledger.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            "queued_storage.registry.known_keys", lambda: ["photos", "videos"]
        )
        dry = run(
            "requeue_transfers",
            "--storage=photos",
            "--error=connectionerror",
            "--older-than=1d",
            "--dry-run",
        )
        result = run(
            "requeue_transfers",
            "--storage=photos",
            "--error=connectionerror",
            "--older-than=1d",
            "--json",
        )

    assert dry.out.strip() == "Would re-queue 1 transfer(s) (dry run)."
    assert result.json == {"requeued": 1, "matched": 1}
    statuses = dict(PendingTransfer.objects.values_list("pk", "status"))
    assert statuses == {
        match.pk: Status.QUEUED,
        other_storage.pk: Status.FAILED,
        other_error.pk: Status.FAILED,
        too_recent.pk: Status.FAILED,
    }


def test_requeue_transfers_dry_run_changes_nothing() -> None:
    pending_rows(3, status=Status.FAILED, attempts=6)

    result = run("requeue_transfers", "--dry-run", "--json")

    assert result.json == {"requeued": 0, "matched": 3}
    assert PendingTransfer.objects.failed().count() == 3


def test_requeue_transfers_releases_held_rows_on_request() -> None:
    held = pending_row(status=Status.HELD, next_attempt_at=None)
    failed = pending_row(status=Status.FAILED)

    run("requeue_transfers", "--status", "held")

    assert PendingTransfer.objects.get(pk=held.pk).status == Status.QUEUED
    assert PendingTransfer.objects.get(pk=failed.pk).status == Status.FAILED


# queue_transfers


def put_local(storage: QueuedStorage, name: str, data: bytes = b"old file") -> str:
    """A file in the local storage that the ledger has never seen."""
    path = Path(storage.local.path(name))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return name


def test_queue_transfers_backfills_files_without_rows(
    storage: QueuedStorage, settings: Any
) -> None:
    settings.QUEUED_STORAGE_HOSTNAME = "web-7"
    put_local(storage, "legacy/a.txt", b"a" * 10)
    put_local(storage, "legacy/deep/b.txt", b"b" * 20)
    put_local(storage, "top.txt")
    known = storage.save("known.txt", content())
    PendingTransfer.objects.filter(storage_key=storage.key).update(
        status=Status.FAILED, attempts=6
    )

    result = run("queue_transfers", "--storage", storage.key)

    assert result.code == 0
    assert "Recorded: scanned=4 queued=3 done=0 existing=1 " in result.out
    rows = {
        row.name: row for row in PendingTransfer.objects.filter(storage_key=storage.key)
    }
    assert set(rows) == {"legacy/a.txt", "legacy/deep/b.txt", "top.txt", known}
    assert rows["legacy/a.txt"].status == Status.QUEUED
    assert rows["legacy/a.txt"].size == 10
    assert rows["legacy/deep/b.txt"].size == 20
    assert rows["top.txt"].host == "web-7"
    assert rows[known].status == Status.FAILED  # left as it was
    # The worker moves them like any other row.
    assert run("process_transfers", "--storage", storage.key).code == 0
    assert Path(storage.remote.path("legacy/deep/b.txt")).read_bytes() == b"b" * 20
    assert storage.exists("legacy/a.txt")


def test_queue_transfers_prefix_dry_run_and_json(storage: QueuedStorage) -> None:
    put_local(storage, "2024/a.txt")
    put_local(storage, "2024/b.txt")
    put_local(storage, "2025/c.txt")

    dry = run(
        "queue_transfers", "--storage", storage.key, "--prefix", "2024/", "--dry-run"
    )
    assert dry.out.startswith("Would record: scanned=2 queued=2 ")
    assert not PendingTransfer.objects.filter(storage_key=storage.key).exists()

    result = run(
        "queue_transfers", "--storage", storage.key, "--prefix", "2024", "--json"
    )

    assert result.json["scanned"] == 2
    assert result.json["queued"] == 2
    assert result.json["dry_run"] is False
    assert set(
        PendingTransfer.objects.filter(storage_key=storage.key).values_list(
            "name", flat=True
        )
    ) == {"2024/a.txt", "2024/b.txt"}


def test_queue_transfers_resumes_after_an_interruption(
    storage: QueuedStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(5):
        put_local(storage, f"f{i}.txt")
    original = Backfill.record
    calls: list[int] = []

    def interrupted(self: Backfill, names: list[str]) -> None:
        calls.append(len(names))
        if len(calls) == 2:
            raise KeyboardInterrupt
        original(self, names)

    monkeypatch.setattr(Backfill, "record", interrupted)
    first = run("queue_transfers", "--storage", storage.key, "--batch-size", "2")
    monkeypatch.setattr(Backfill, "record", original)

    assert first.code == 1
    assert "run the same command again to resume" in first.err
    assert PendingTransfer.objects.filter(storage_key=storage.key).count() == 2

    second = run("queue_transfers", "--storage", storage.key, "--batch-size", "2")

    assert "scanned=5 queued=3 done=0 existing=2 " in second.out
    assert sorted(
        PendingTransfer.objects.filter(storage_key=storage.key).values_list(
            "name", flat=True
        )
    ) == [f"f{i}.txt" for i in range(5)]


def test_queue_transfers_check_remote_records_files_already_there_as_done(
    storage: QueuedStorage,
) -> None:
    put_local(storage, "same.txt", b"same bytes")
    put_local(storage, "other.txt", b"local version")
    put_local(storage, "only-local.txt")
    remote = Path(storage.remote.path("x")).parent
    remote.mkdir(parents=True, exist_ok=True)
    (remote / "same.txt").write_bytes(b"same bytes")
    (remote / "other.txt").write_bytes(b"remote")

    result = run("queue_transfers", "--storage", storage.key, "--check-remote")

    assert "queued=2 done=1 existing=0 conflicts=1 " in result.out
    assert row_by_name_column(storage, "same.txt").status == Status.DONE
    assert row_by_name_column(storage, "other.txt").status == Status.QUEUED
    assert row_by_name_column(storage, "only-local.txt").status == Status.QUEUED
    # A different remote object is never overwritten: the worker reports it.
    run("process_transfers", "--storage", storage.key)
    assert (remote / "other.txt").read_bytes() == b"remote"
    assert "RemoteConflict" in row_by_name_column(storage, "other.txt").last_error


def test_queue_transfers_holds_rows_of_a_delayed_storage(
    make_storage: Callable[..., QueuedStorage],
) -> None:
    storage = make_storage(delayed=True)
    registry.register(storage)  # declared by the site
    put_local(storage, "a.txt")

    run("queue_transfers", "--storage", storage.key)

    assert row_by_name_column(storage, "a.txt").status == Status.HELD


def test_queue_transfers_skips_names_the_ledger_refuses(storage: QueuedStorage) -> None:
    put_local(storage, "fine.txt")
    put_local(storage, "bad\x01name.txt")

    result = run("queue_transfers", "--storage", storage.key)

    assert "queued=1 " in result.out
    assert "invalid=1" in result.out
    assert "skipped 'bad\\x01name.txt'" in result.err


def test_queue_transfers_needs_a_storage_when_there_are_several(
    storage: QueuedStorage,
) -> None:
    result = run("queue_transfers")

    assert result.code == 2
    assert "--storage KEY" in result.err
    assert storage.key in result.err


def test_queue_transfers_missing_prefix(storage: QueuedStorage) -> None:
    put_local(storage, "a.txt")

    result = run("queue_transfers", "--storage", storage.key, "--prefix", "nothere")

    assert result.code == 2
    assert "has no directory 'nothere'" in result.err


# verify_transfers


def test_verify_transfers_all_good(storage: QueuedStorage) -> None:
    transferred(storage, "a.txt", "b.txt")

    result = run("verify_transfers", "--checksum")

    assert result.code == 0
    assert result.out.strip().endswith(
        "checked=2 ok=2 missing=0 size=0 checksum=0 errors=0 unverifiable=0 fixed=0"
    )


def test_verify_transfers_reports_missing_and_wrong_sized_remote_copies(
    storage: QueuedStorage,
) -> None:
    gone, short, fine = transferred(storage, "gone.txt", "short.txt", "fine.txt")
    os.remove(storage.remote.path(gone))
    Path(storage.remote.path(short)).write_bytes(b"cut")

    result = run("verify_transfers")

    assert result.code == 3
    assert f"MISSING key={storage.key} name=gone.txt" in result.out
    assert (
        f"SIZE key={storage.key} name=short.txt: the remote copy has 3 bytes, the "
        "ledger 20, the local file 20"
    ) in result.out
    assert "checked=3 ok=1 missing=1 size=1 " in result.out
    assert "2 transfer(s) recorded as done do not match the remote" in result.err
    assert "--fix re-queues" in result.err
    # Reporting changes nothing.
    statuses = {row_by_name_column(storage, n).status for n in (gone, short, fine)}
    assert statuses == {Status.DONE}


def test_verify_transfers_fix_requeues_and_the_worker_sends_again(
    storage: QueuedStorage,
) -> None:
    gone, short = transferred(storage, "gone.txt", "short.txt")
    os.remove(storage.remote.path(gone))
    Path(storage.remote.path(short)).write_bytes(b"cut")

    result = run("verify_transfers", "--fix", "--json")

    assert result.code == 0
    report = result.json
    assert report["missing"] == 1
    assert report["size_mismatches"] == 1
    assert report["fixed"] == 2
    assert report["unfixed"] == 0
    assert {(p["name"], p["problem"], p["fixed"]) for p in report["problems"]} == {
        ("gone.txt", "missing", True),
        ("short.txt", "size", True),
    }
    row = row_by_name_column(storage, short)
    assert row.status == Status.QUEUED
    assert row.attempts == 0
    assert row.remote_owned  # the wrong object is ours to replace
    assert row.last_error.startswith("VerificationFailed: the remote copy has 3 bytes")
    # Served locally meanwhile, and sent again by the next run.
    assert read_bytes(storage, short) == b"content of short.txt"
    assert run("process_transfers").code == 0
    assert Path(storage.remote.path(short)).read_bytes() == b"content of short.txt"
    assert run("verify_transfers").code == 0


def test_verify_transfers_checksum_finds_same_sized_corruption(
    storage: QueuedStorage,
) -> None:
    (name,) = transferred(storage, "a.txt")
    data = Path(storage.remote.path(name)).read_bytes()
    Path(storage.remote.path(name)).write_bytes(data.upper())

    assert run("verify_transfers").code == 0  # same size
    result = run("verify_transfers", "--checksum")

    assert result.code == 3
    assert f"CHECKSUM key={storage.key} name=a.txt: the remote copy has SHA-256" in (
        result.out
    )


def test_verify_transfers_cannot_fix_without_a_local_copy(
    storage: QueuedStorage,
) -> None:
    (name,) = transferred(storage, "a.txt")
    os.remove(storage.local.path(name))  # as TransferAndDelete leaves it
    os.remove(storage.remote.path(name))

    result = run("verify_transfers", "--fix")

    assert result.code == 3
    assert "no local copy to send again" in result.out
    assert row_by_name_column(storage, name).status == Status.DONE


def test_verify_transfers_concurrency(storage: QueuedStorage) -> None:
    names = transferred(storage, *(f"f{i}.txt" for i in range(6)))
    os.remove(storage.remote.path(names[3]))

    result = run(
        "verify_transfers", "--concurrency", "3", "--batch-size", "4", "--json"
    )

    assert result.json["checked"] == 6
    assert result.json["ok"] == 5
    assert [p["name"] for p in result.json["problems"]] == ["f3.txt"]


# clean_local_copies


def age_transfers(storage: QueuedStorage, **delta: float) -> None:
    """Make the storage's transfers ``delta`` old, local files older still."""
    rows = PendingTransfer.objects.filter(storage_key=storage.key)
    rows.update(transferred_at=ago(**delta))
    saved = ago(**delta).timestamp() - 5
    for name in rows.values_list("name", flat=True):
        if storage.local.exists(name):
            os.utime(storage.local.path(name), (saved, saved))


def test_clean_local_copies_removes_old_done_copies_only(
    storage: QueuedStorage,
) -> None:
    old, recent = transferred(storage, "old.txt", "recent.txt")
    age_transfers(storage, days=8)
    PendingTransfer.objects.filter(name=recent).update(transferred_at=ago(hours=1))
    waiting = storage.save("waiting.txt", content())
    failed = storage.save("failed.txt", content())
    PendingTransfer.objects.filter(name=failed).update(
        status=Status.FAILED, transferred_at=ago(days=30)
    )

    result = run("clean_local_copies", "--older-than", "7d")

    assert result.code == 0
    assert result.out.startswith("Removed 1 local copies")
    assert not storage.local.exists(old)
    for name in (recent, waiting, failed):
        assert storage.local.exists(name)
    # The file is still there for the application, from the remote.
    assert read_bytes(storage, old) == b"content of old.txt"
    assert storage.remote.exists(old)


def test_clean_local_copies_dry_run_and_json(storage: QueuedStorage) -> None:
    names = transferred(storage, "a.txt", "b.txt")
    age_transfers(storage, days=2)

    result = run("clean_local_copies", "--older-than", "1d", "--dry-run", "--json")

    assert result.json["removed"] == 2
    assert result.json["dry_run"] is True
    assert result.json["bytes"] == len(b"content of a.txt") * 2
    assert all(storage.local.exists(name) for name in names)


def test_clean_local_copies_and_verify_transfers_keep_to_storage(
    make_storage: Callable[..., QueuedStorage],
) -> None:
    mine, other = make_storage(), make_storage()
    (kept,) = transferred(other, "other.txt")
    (cleaned,) = transferred(mine, "mine.txt")
    os.remove(other.remote.path(kept))  # only a check of other's rows finds this
    age_transfers(mine, days=2)
    age_transfers(other, days=2)

    verified = run("verify_transfers", "--storage", mine.key, "--json")
    removed = run("clean_local_copies", "--older-than", "1d", "--storage", mine.key)

    assert (verified.code, verified.json["checked"], verified.json["missing"]) == (
        0,
        1,
        0,
    )
    assert removed.code == 0
    assert not mine.local.exists(cleaned)
    assert other.local.exists(kept)


def test_clean_local_copies_keeps_a_copy_changed_after_its_transfer(
    storage: QueuedStorage,
) -> None:
    same_size, other_size = transferred(storage, "same.txt", "other.txt")
    age_transfers(storage, days=2)
    # Written again behind the ledger's back after the transfer.
    Path(storage.local.path(same_size)).write_bytes(b"CONTENT OF SAME.TXT")
    Path(storage.local.path(other_size)).write_bytes(b"new")

    result = run("clean_local_copies", "--older-than", "1d", "--json")

    assert result.json["removed"] == 0
    assert result.json["changed"] == 2
    assert storage.local.exists(same_size)
    assert storage.local.exists(other_size)


def test_clean_local_copies_keeps_a_copy_the_remote_lacks(
    storage: QueuedStorage,
) -> None:
    (name,) = transferred(storage, "a.txt")
    age_transfers(storage, days=2)
    os.remove(storage.remote.path(name))

    result = run("clean_local_copies", "--older-than", "1d", "-v", "2")

    assert result.code == 3
    assert f"kept key={storage.key} name=a.txt: the remote copy is missing" in (
        result.out
    )
    assert "1 local copies were kept" in result.err
    assert storage.local.exists(name)


def test_clean_local_copies_needs_older_than() -> None:
    with pytest.raises(CommandError) as excinfo:
        call_command("clean_local_copies")

    assert "--older-than" in str(excinfo.value)
