"""migrate_storage: the storage's files moved to its serving mirror's remote. It
backfills the mirror (paced), shows the progress on stderr while the workers
copy, and ends ready to switch with the STORAGES entry to switch to; --check
only reports (0 ready, 1 not); bad usage exits 2 and changes nothing."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.core.files.storage import storages

from queued_storage import mirror_backfill
from queued_storage.backends import QueuedStorage
from queued_storage.models import PendingTransfer
from queued_storage.worker import drain
from tests.factories import pending_row
from tests.helpers import (
    ALWAYS_FAILING,
    FLAKY,
    FS,
    NEW_URL,
    OLD_URL,
    Clock,
    content,
    read_bytes,
)

pytestmark = pytest.mark.django_db

Status = PendingTransfer.Status
Pair = tuple[QueuedStorage, QueuedStorage]
Manage = Callable[..., tuple[int, str, str]]


def transferred_before(pair: Pair, files: int = 3, size: int = 10) -> list[str]:
    """``files`` files on the storage's old remote with no copy on the new one, as
    a site has them when it adds the serving mirror."""
    storage, mirror = pair
    names = [
        storage.save(f"f{number}.txt", content(str(number) * size))
        for number in range(files)
    ]
    assert drain(keys=[storage.key]).done == files
    PendingTransfer.objects.filter(storage_key=mirror.key).delete()
    return names


def copies(pair: Pair) -> dict[str, str]:
    """The new remote's rows: status by name."""
    return dict(
        PendingTransfer.objects.filter(storage_key=pair[1].key).values_list(
            "name", "status"
        )
    )


@pytest.fixture
def worker_while_waiting(
    monkeypatch: pytest.MonkeyPatch, django_capture_on_commit_callbacks: Any
) -> list[float]:
    """Each pause of the command (its pacing, its looks) on a clock that only
    those pauses move, recorded here; a worker drains the ledger during each."""
    clock = Clock()
    paused: list[float] = []

    def pause(seconds: float) -> None:
        paused.append(seconds)
        clock.advance(seconds)
        with django_capture_on_commit_callbacks(execute=True):
            drain()

    monkeypatch.setattr(mirror_backfill, "clock", lambda: clock.now.timestamp())
    monkeypatch.setattr(mirror_backfill, "pause", pause)
    return paused


def test_it_backfills_shows_progress_and_ends_ready_with_the_entry_to_switch_to(
    migrating: Pair, manage: Manage, worker_while_waiting: list[float]
) -> None:
    storage, mirror = migrating
    names = transferred_before(migrating)
    assert {storage.url(name)[: len(OLD_URL)] for name in names} == {OLD_URL}

    status, out, err = manage(
        "migrate_storage", storage.key, "--mirror", "new", "--progress"
    )

    assert status == 0, err
    assert copies(migrating) == dict.fromkeys(names, Status.DONE)
    assert f"3 of 3 files verified on {mirror.key} (30 B of 30 B)." in out
    assert "Ready to switch" in out
    assert f"0 of 3 files verified on {mirror.key}" in err  # the live line
    assert "\r3 of 3 files verified" in err
    assert f'"key": "{mirror.key}",' in out
    assert '"remote": "django.core.files.storage.FileSystemStorage",' in out
    assert '"remote_options": ...,  # the mirror\'s options' in out
    assert {storage.url(name)[: len(NEW_URL)] for name in names} == {NEW_URL}
    assert read_bytes(storage, names[1]) == b"1" * 10


def test_check_exits_1_until_ready_then_0_and_changes_nothing(
    migrating: Pair, manage: Manage, worker_while_waiting: list[float]
) -> None:
    storage, _mirror = migrating
    transferred_before(migrating)

    status, out, err = manage(
        "migrate_storage", storage.key, "--mirror", "new", "--check"
    )

    assert status == 1
    assert "0 of 3 files verified" in out
    assert "missing=3" in out
    assert "Not ready to switch" in err
    assert copies(migrating) == {}  # nothing queued
    assert worker_while_waiting == []  # nor waited for

    assert manage("migrate_storage", storage.key, "--mirror", "new")[0] == 0
    status, out, _err = manage(
        "migrate_storage", storage.key, "--mirror", "new", "--check"
    )

    assert status == 0
    assert "Ready to switch" in out


def test_json_has_the_progress_what_was_queued_and_the_entry(
    migrating: Pair, manage: Manage, worker_while_waiting: list[float]
) -> None:
    storage, mirror = migrating
    transferred_before(migrating, files=4)

    status, out, err = manage(
        "migrate_storage", storage.key, "--mirror", "new", "--json", "--progress"
    )

    assert status == 0, err
    result = json.loads(out)
    assert set(result) == {
        "storage",
        "mirror",
        "mirror_key",
        "ready",
        "progress",
        "queued",
        "switch_to",
    }
    assert (result["storage"], result["mirror"], result["mirror_key"]) == (
        storage.key,
        "new",
        mirror.key,
    )
    assert result["ready"] is True
    assert result["progress"] == {
        "key": storage.key,
        "mirror_key": mirror.key,
        "files": 4,
        "bytes": 40,
        "verified_files": 4,
        "verified_bytes": 40,
        "copying": 0,
        "failed": 0,
        "on_its_way": 0,
        "blocked": 0,
        "missing": 0,
        "ready": True,
    }
    assert (result["queued"]["queued"], result["queued"]["current"]) == (4, 0)
    assert result["switch_to"].startswith(f'"{storage.key}": {{')
    assert "verified" in err  # progress on stderr, stdout is the JSON alone

    status, out, _err = manage(
        "migrate_storage", storage.key, "--mirror", "new", "--check", "--json"
    )

    assert status == 0
    assert "queued" not in json.loads(out)


@pytest.mark.parametrize(
    ("limits", "pacing"),
    [
        (["--max-files", "2"], [1.0] * 3),
        (["--max-rate", "1kB"], [1.0] * 6),
        (["--max-files", "2", "--max-rate", "500"], [2.0] * 6),
    ],
    ids=["files", "bytes", "both"],
)
def test_the_rate_limit_is_honoured(
    migrating: Pair,
    manage: Manage,
    worker_while_waiting: list[float],
    limits: list[str],
    pacing: list[float],
) -> None:
    storage, _mirror = migrating
    transferred_before(migrating, files=6, size=1000)

    status, out, err = manage(
        "migrate_storage", storage.key, "--mirror", "new", "--json", *limits
    )

    assert status == 0, err
    queued = json.loads(out)["queued"]
    assert queued["queued"] == 6
    assert queued["paced"] == pytest.approx(sum(pacing))
    # The pacing's waits, then the looks while the last copies are made.
    assert worker_while_waiting[: len(pacing)] == pytest.approx(pacing)
    assert set(worker_while_waiting[len(pacing) :]) <= {2.0}


def test_interrupted_it_exits_1_and_resumes_when_run_again(
    migrating: Pair, manage: Manage, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage, _mirror = migrating
    names = transferred_before(migrating, files=4)

    pauses: list[float] = []

    def interrupted(seconds: float) -> None:  # at the second pause: Ctrl-C
        pauses.append(seconds)
        if len(pauses) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(mirror_backfill, "clock", lambda: 0.0)  # time stands still
    monkeypatch.setattr(mirror_backfill, "pause", interrupted)
    status, _out, err = manage(
        "migrate_storage", storage.key, "--mirror", "new", "--max-files", "1"
    )

    assert status == 1
    assert "run the same command again" in err
    assert len(copies(migrating)) == 1  # one file a second: the first one

    monkeypatch.setattr(mirror_backfill, "pause", lambda seconds: drain())
    status, _out, err = manage("migrate_storage", storage.key, "--mirror", "new")

    assert status == 0, err
    assert copies(migrating) == dict.fromkeys(names, Status.DONE)


def test_failed_copies_exit_3_with_what_to_do(
    make_storage: Callable[..., QueuedStorage],
    manage: Manage,
    worker_while_waiting: list[float],
    settings: Any,
    tmp_path: Path,
) -> None:
    settings.QUEUED_STORAGE_RETRIES = 0
    failing = {"location": str(tmp_path / "new"), **ALWAYS_FAILING}
    storage = make_storage(
        mirrors={"new": {"storage": FLAKY, "options": failing, "serve": True}}
    )
    transferred_before((storage, storage.mirrors["new"]), files=2)

    status, out, err = manage("migrate_storage", storage.key, "--mirror", "new")

    assert status == 3
    assert "0 of 2 files verified" in out and "failed=2" in out
    assert f"requeue_transfers --storage {storage.key}@new" in err


def test_the_entry_to_switch_to_names_the_storages_alias_and_builds_it(
    manage: Manage,
    worker_while_waiting: list[float],
    settings: Any,
    tmp_path: Path,
) -> None:
    new = {"location": str(tmp_path / "new"), "base_url": NEW_URL}
    settings.STORAGES = {
        **settings.STORAGES,
        "new-remote": {"BACKEND": FS, "OPTIONS": new},
        "media": {
            "BACKEND": "queued_storage.backends.QueuedStorage",
            "OPTIONS": {
                "local": "queued_local",
                "remote": "queued_remote",
                "key": "media",
                "mirrors": {
                    "new": {"storage": "new-remote", "key": "media-new", "serve": True},
                    "backup": FS,
                },
            },
        },
    }
    storage = storages["media"]
    assert isinstance(storage, QueuedStorage)
    transferred_before((storage, storage.mirrors["new"]), files=2)
    PendingTransfer.objects.filter(storage_key="media@backup").delete()

    status, out, err = manage("migrate_storage", "media", "--mirror", "new", "--json")

    assert status == 0, err
    entry = json.loads(out)["switch_to"]
    assert entry.startswith('"media": {\n')
    assert '\n        "key": "media-new",\n' in entry
    assert '"key" as now: "backup": "media@backup"' in entry
    switched = eval("{" + entry + "}")["media"]  # the snippet is Python
    options = dict(switched["OPTIONS"])
    assert options == {
        "local": "queued_local",
        "remote": "new-remote",
        "key": "media-new",
        "mirrors": ...,
    }
    del options["mirrors"]
    after = QueuedStorage(**options)
    assert all(after.url(name).startswith(NEW_URL) for name in ("f0.txt", "f1.txt"))
    assert read_bytes(after, "f1.txt") == b"1" * 10


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["no-such-key", "--mirror", "new"], "Unknown storage key"),
        (["{key}", "--mirror", "nowhere"], "has no mirror nowhere"),
        (["{key}@new", "--mirror", "new"], "pass '{key}'"),
        (["{key}"], "--mirror"),
        (["{key}", "--mirror", "new", "--max-rate", "nan"], "--max-rate"),
        (["{key}", "--mirror", "new", "--max-files", "0"], "--max-files"),
        (["{key}", "--mirror", "new", "--wait-every", "inf"], "--wait-every"),
        (["{key}", "--mirror", "new", "--check", "--batch-size", "0"], "--batch-size"),
    ],
)
def test_bad_usage_exits_2_and_changes_nothing(
    migrating: Pair,
    manage: Manage,
    worker_while_waiting: list[float],
    argv: list[str],
    said: str,
) -> None:
    storage, _mirror = migrating
    transferred_before(migrating)
    before = list(PendingTransfer.objects.order_by("pk").values())

    status, _out, err = manage(
        "migrate_storage", *(arg.format(key=storage.key) for arg in argv)
    )

    assert status == 2
    assert said.format(key=storage.key) in err
    assert "Traceback" not in err
    assert list(PendingTransfer.objects.order_by("pk").values()) == before
    assert worker_while_waiting == []


def test_a_mirror_that_does_not_serve_reads_exits_2(
    make_storage: Callable[..., QueuedStorage], manage: Manage, tmp_path: Path
) -> None:
    storage = make_storage(
        mirrors={
            "backup": {"storage": FS, "options": {"location": str(tmp_path / "b")}}
        }
    )
    storage.save("warm.txt", content())

    status, _out, err = manage("migrate_storage", storage.key, "--mirror", "backup")

    assert status == 2
    assert '"serve": True' in err
    assert not PendingTransfer.objects.filter(storage_key__endswith="@backup").exists()


def test_files_done_on_the_old_remote_since_the_backfill_are_queued_too(
    migrating: Pair,
    manage: Manage,
    worker_while_waiting: list[float],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A file recorded as done on the old remote with no copy queued after the
    backfill read its page (an adoption running meanwhile) is backfilled before
    the command gives up."""
    storage, mirror = migrating
    transferred_before(migrating, files=2)
    storage.remote.save("adopted.txt", content("from before"))
    worker = mirror_backfill.pause

    def adopted_meanwhile(seconds: float) -> None:
        if not PendingTransfer.objects.filter(name="adopted.txt").exists():
            pending_row(
                storage_key=storage.key,
                name="adopted.txt",
                status=Status.DONE,
                size=11,
            )
        worker(seconds)

    monkeypatch.setattr(mirror_backfill, "pause", adopted_meanwhile)

    status, out, err = manage("migrate_storage", storage.key, "--mirror", "new")

    assert status == 0, err
    assert f"3 of 3 files verified on {mirror.key}" in out
    assert copies(migrating)["adopted.txt"] == Status.DONE
