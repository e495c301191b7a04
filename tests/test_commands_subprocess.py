"""``process_transfers``, ``transfer_status`` and ``adopt_remote_files`` as cron, a
supervisor or an operator run them:
real processes against this test run's database, judged by their exit status and
output."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.core.files.base import ContentFile
from django.db import connection
from django.utils import timezone

from queued_storage.models import PendingTransfer, StorageState
from tests.helpers import saved_name, wait_until
from tests.testapp.models import Document, document_storage
from tests.workers import ROOT, run_command, start_command, worker_env

# The worker processes must see the rows: committed, not in a test transaction.
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

Status = PendingTransfer.Status


#: ``manage.py`` whose claims take up to the batch size and keep their unstarted
#: rows (as before claim_size), for the tests that need rows claimed and not
#: started when the signal comes, whatever the machine's speed.
WHOLE_BATCH_CLAIMS = (
    "import sys\n"
    "from queued_storage import claim_size\n"
    "claim_size.ClaimSize.next = lambda self: self.most\n"
    "claim_size.HAND_BACK_AFTER = float('inf')\n"
    "from django.core.management import execute_from_command_line\n"
    "execute_from_command_line(['django', *sys.argv[1:]])\n"
)


def start_whole_batch_worker(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WHOLE_BATCH_CLAIMS, *args],
        cwd=ROOT,
        env=worker_env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def named(text: str) -> ContentFile[bytes]:
    return ContentFile(text.encode(), name="upload.txt")


def test_the_subprocess_uses_this_runs_test_database() -> None:
    result = run_command(
        "shell",
        "-c",
        "from django.db import connection; print(connection.settings_dict['NAME'])",
    )

    assert result.returncode == 0, result.stderr
    # The last line: Django's shell may first announce its automatic imports.
    assert result.stdout.strip().splitlines()[-1] == connection.settings_dict["NAME"]


def test_process_transfers_from_cron_moves_the_files_and_exits_0(
    fresh_storages: dict[str, Path],
) -> None:
    documents = [Document.objects.create(file=named(f"file {i}")) for i in range(3)]
    assert PendingTransfer.objects.queued().count() == 3

    result = run_command("process_transfers", "--json")

    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["done"] == 3
    assert summary["failed"] == 0
    assert summary["bytes"] == sum(len(f"file {i}") for i in range(3))
    assert PendingTransfer.objects.done().count() == 3
    for i, document in enumerate(documents):
        remote = fresh_storages["remote"] / saved_name(document.file)
        assert remote.read_bytes() == f"file {i}".encode()

    again = run_command("process_transfers")
    assert again.returncode == 0
    assert again.stdout.strip() == "No transfers due."


def test_process_transfers_exits_3_when_a_transfer_fails_for_good(
    fresh_storages: dict[str, Path], settings: Any
) -> None:
    Document.objects.create(file=named("x"))
    storages = dict(settings.STORAGES)
    storages["queued_remote"] = {
        "BACKEND": "tests.storages.FlakyStorage",
        "OPTIONS": {"location": str(fresh_storages["remote"]), "failures": 100},
    }

    result = run_command(
        "process_transfers",
        overrides={
            "QUEUED_STORAGE_RETRIES": 1,
            "QUEUED_STORAGE_RETRY_DELAY": 0,
            "STORAGES": storages,
        },
    )

    assert result.returncode == 3, result.stdout + result.stderr
    assert "done=0 retried=1 failed=1" in result.stdout
    assert "1 transfer(s) failed for good" in result.stderr
    assert PendingTransfer.objects.failed().count() == 1


def test_transfer_status_max_age_exit_status(fresh_storages: dict[str, Path]) -> None:
    Document.objects.create(file=named("x"))
    PendingTransfer.objects.update(next_attempt_at=timezone.now() - timedelta(hours=2))

    late = run_command("transfer_status", "--max-age", "1h", "--verbosity", "0")
    unknown = run_command("transfer_status", "--storage", "nope")

    assert late.returncode == 3
    assert "the oldest due transfer has waited" in late.stderr
    assert unknown.returncode == 2


def test_process_transfers_loop_stops_on_sigterm_after_the_file_in_hand(
    fresh_storages: dict[str, Path],
) -> None:
    worker = start_command("process_transfers", "--loop", "--interval", "0.2", "--json")
    try:
        documents = []
        # The second file is saved once the first is done: the loop polls again
        # for work that arrived after it finished its last.
        for text in ("late arrival", "later still"):
            documents.append(Document.objects.create(file=named(text)))
            assert wait_until(
                lambda: (
                    worker.poll() is not None
                    or PendingTransfer.objects.done().count() == len(documents)
                )
            ), "the loop never took the new row"
            assert worker.poll() is None, worker.communicate()
        worker.send_signal(signal.SIGTERM)
        output, _ = worker.communicate(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()

    assert worker.returncode == 0, output
    summary = json.loads(output.strip().splitlines()[-1])
    assert summary["done"] == 2
    assert summary["polls"] >= 1
    for document, text in zip(documents, ("late arrival", "later still"), strict=True):
        remote = fresh_storages["remote"] / saved_name(document.file)
        assert remote.read_bytes() == text.encode()


def wait_for_file(path: Path, worker: Any, what: str) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        assert worker.poll() is None, worker.communicate()
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_sigterm_hands_back_rows_re_saved_or_deleted_since_the_claim_and_exits_0(
    fresh_storages: dict[str, Path], settings: Any, tmp_path: Path
) -> None:
    entered, gate = tmp_path / "entered", tmp_path / "gate"
    storages = dict(settings.STORAGES)
    # Local overwrites, so that a re-save keeps the name (and the row).
    storages["queued_local"] = {
        **storages["queued_local"],
        "OPTIONS": {**storages["queued_local"]["OPTIONS"], "allow_overwrite": True},
    }
    storages["queued_remote"] = {
        "BACKEND": "tests.storages.FileGatedStorage",
        "OPTIONS": {
            "location": str(fresh_storages["remote"]),
            "entered": str(entered),
            "gate": str(gate),
        },
    }
    settings.STORAGES = storages
    uploading, resaved, deleted = (
        saved_name(
            Document.objects.create(
                file=ContentFile(f"file {i}".encode(), name=f"{i}.txt")
            ).file
        )
        for i in range(3)
    )
    worker = start_whole_batch_worker(
        "process_transfers", "--loop", "--interval", "0.2", "--json"
    )
    try:
        # The worker claimed all three and is uploading the first.
        wait_for_file(entered, worker, "the worker never started an upload")
        claimed = {row.name: row for row in PendingTransfer.objects.all()}
        assert {row.status for row in claimed.values()} == {Status.TRANSFERRING}
        assert document_storage.save(resaved, named("saved again")) == resaved
        document_storage.delete(deleted)
        worker.send_signal(signal.SIGTERM)
        gate.touch()
        output, _ = worker.communicate(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()

    assert worker.returncode == 0, output
    assert json.loads(output.strip().splitlines()[-1])["done"] == 1, output
    rows = {row.name: row for row in PendingTransfer.objects.all()}
    assert rows[uploading].status == Status.DONE
    again = rows[resaved]
    assert again.status == Status.QUEUED
    assert again.generation != claimed[resaved].generation
    assert again.attempts == 0
    assert (again.lease_token, again.lease_expires_at) == ("", None)
    assert again.next_attempt_at is not None
    assert again.next_attempt_at <= timezone.now()
    tombstone = rows[deleted]
    assert tombstone.deleted
    assert tombstone.status == Status.QUEUED
    assert tombstone.lease_token == ""
    assert PendingTransfer.objects.due().filter(pk=tombstone.pk).exists()


def test_sigterm_hands_back_the_unstarted_rows_before_the_upload_in_hand_ends(
    fresh_storages: dict[str, Path], settings: Any, tmp_path: Path
) -> None:
    """A supervisor sends SIGTERM, then SIGKILL when the worker takes too long:
    the rows the worker never started are queued again while its upload still
    runs, not left leased to a process about to be killed."""
    entered, gate = tmp_path / "entered", tmp_path / "gate"
    settings.STORAGES = {
        **settings.STORAGES,
        "queued_remote": {
            "BACKEND": "tests.storages.FileGatedStorage",
            "OPTIONS": {
                "location": str(fresh_storages["remote"]),
                "entered": str(entered),
                "gate": str(gate),
            },
        },
    }
    uploading, *waiting = (
        saved_name(
            Document.objects.create(
                file=ContentFile(f"file {i}".encode(), name=f"{i}.txt")
            ).file
        )
        for i in range(3)
    )
    worker = start_whole_batch_worker(
        "process_transfers", "--loop", "--interval", "0.2", "--json"
    )
    try:
        wait_for_file(entered, worker, "the worker never started an upload")
        leased = PendingTransfer.objects.filter(status=Status.TRANSFERRING)
        assert leased.count() == 3, "the rows behind the upload were not claimed"
        worker.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while PendingTransfer.objects.filter(
            name__in=waiting, status=Status.QUEUED, lease_token=""
        ).count() < len(waiting):
            assert worker.poll() is None, worker.communicate()
            assert time.monotonic() < deadline, "the rows waited for the upload"
            time.sleep(0.05)
        gate.touch()
        output, _ = worker.communicate(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()

    assert worker.returncode == 0, output
    assert json.loads(output.strip().splitlines()[-1])["done"] == 1, output
    assert PendingTransfer.objects.get(name=uploading).status == Status.DONE
    for row in PendingTransfer.objects.filter(name__in=waiting):
        assert (row.status, row.attempts) == (Status.QUEUED, 0)


def test_adopt_remote_files_killed_mid_run_resumes_when_run_again(
    fresh_storages: dict[str, Path], settings: Any, tmp_path: Path
) -> None:
    remote = fresh_storages["remote"]
    remote.mkdir(exist_ok=True)
    files = {f"f{i}.txt": b"x" * i for i in range(1, 8)}
    for name, data in files.items():
        (remote / name).write_bytes(data)
    entered, gate = tmp_path / "entered", tmp_path / "gate"
    storages = dict(settings.STORAGES)
    storages["queued_remote"] = {
        "BACKEND": "tests.storages.SizeGatedStorage",
        "OPTIONS": {
            "location": str(remote),
            "stop_at": "f5.txt",
            "entered": str(entered),
            "gate": str(gate),
        },
    }
    # Batches f1 f2 | f3 f4 | f5 f6 | f7: killed in the third.
    adopting = start_command(
        "adopt_remote_files",
        "--storage",
        "documents",
        "--batch-size",
        "2",
        overrides={"STORAGES": storages},
    )
    deadline = time.monotonic() + 60
    while not entered.exists():
        assert adopting.poll() is None, adopting.communicate()[0]
        assert time.monotonic() < deadline, "the adoption never reached f5.txt"
        time.sleep(0.02)
    adopting.send_signal(signal.SIGKILL)
    adopting.communicate(timeout=10)  # reaps it and closes its pipe
    state = StorageState.objects.get(storage_key="documents")
    assert (state.adopted_at, state.adoption_cursor) == (None, "f4.txt")

    result = run_command("adopt_remote_files", "--storage", "documents", "--json")

    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["resumed_after"] == "f4.txt"
    assert (summary["scanned"], summary["recorded"]) == (7, 7)
    rows = PendingTransfer.objects.filter(storage_key="documents")
    assert {row.name: (row.status, row.size) for row in rows} == {
        name: (Status.DONE, len(data)) for name, data in files.items()
    }
    assert StorageState.objects.get(storage_key="documents").adopted_at is not None
