"""A mirror added to a storage in use: backfill_mirror queues a copy of each
file the storage has transferred (from its remote when the local copy is gone),
paced, resumable, and waits for the copies if asked; bad options change
nothing."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from queued_storage import mirror_backfill, registry
from queued_storage.backends import QueuedStorage
from queued_storage.conf import MAX_SECONDS
from queued_storage.management.cli import MIN_RATE
from queued_storage.mirror_backfill import MirrorBackfill
from queued_storage.models import PendingTransfer
from queued_storage.worker import drain
from tests.helpers import (
    FS,
    Status,
    content,
    files_under,
    local_files,
    remote_files,
    root_of,
)

pytestmark = pytest.mark.django_db

DELETE = "queued_storage.tasks.TransferAndDelete"
COUNTING = "tests.storages.CountingStorage"
KEY = "media-in-use"


def site(tmp_path: Path, **mirrors: str) -> QueuedStorage:
    """The storage of a site, on this test's directories; ``mirrors``: each
    mirror's storage class (on a directory of its own)."""
    return QueuedStorage(
        FS,
        COUNTING,
        local_options={"location": str(tmp_path / "local")},
        remote_options={"location": str(tmp_path / "remote")},
        key=KEY,
        task=DELETE,
        mirrors={
            name: {"storage": path, "options": {"location": str(tmp_path / name)}}
            for name, path in mirrors.items()
        },
    )


@pytest.fixture
def in_use(
    tmp_path: Path, django_capture_on_commit_callbacks: Any
) -> Iterator[Callable[..., QueuedStorage]]:
    """Files saved and transferred (their local copies removed) by the site
    before it had mirrors; then the site with ``mirrors``."""

    def make(files: int = 3, **mirrors: str) -> QueuedStorage:
        before = site(tmp_path)
        for number in range(files):
            before.save(f"f{number}.txt", content(f"file number {number}"))
        with django_capture_on_commit_callbacks(execute=True):
            assert drain(keys=[KEY]).done == files
        assert local_files(before) == []
        registry.forget(KEY)
        return site(tmp_path, **mirrors)

    yield make
    registry.forget(KEY)


def copies(storage: QueuedStorage, name: str = "backup") -> list[PendingTransfer]:
    return list(
        PendingTransfer.objects.filter(storage_key=storage.mirror_key(name)).order_by(
            "name"
        )
    )


def test_a_backfill_copies_transferred_files_from_the_remote(
    in_use: Callable[..., QueuedStorage],
    django_capture_on_commit_callbacks: Any,
    no_waits: list[float],
) -> None:
    storage = in_use(backup=COUNTING)
    assert copies(storage) == []

    counts = MirrorBackfill(storage).run()

    assert (counts.total, counts.scanned, counts.queued, counts.current) == (3, 3, 3, 0)
    assert counts.bytes == sum(len(f"file number {n}") for n in range(3))
    primary = {row.name: row for row in PendingTransfer.objects.filter(storage_key=KEY)}
    assert [(c.status, c.generation) for c in copies(storage)] == [
        (Status.QUEUED, primary[c.name].generation) for c in copies(storage)
    ]
    with django_capture_on_commit_callbacks(execute=True):
        assert drain().done == 3
    assert files_under(root_of(storage.mirrors["backup"].remote)) == remote_files(
        storage
    )
    assert {c.status for c in copies(storage)} == {Status.DONE}
    assert no_waits == []

    again = MirrorBackfill(storage).run()  # idempotent

    assert (again.queued, again.current) == (0, 3)


def test_a_backfill_stopped_midway_resumes_where_it_stopped(
    in_use: Callable[..., QueuedStorage], no_waits: list[float]
) -> None:
    storage = in_use(files=5, backup=COUNTING)
    first = MirrorBackfill(storage, page_size=2)

    def stop() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        first.run(after_chunk=stop)
    assert first.counts.queued == 2

    rest = MirrorBackfill(storage, page_size=2).run()

    assert (rest.queued, rest.current) == (3, 2)
    assert len(copies(storage)) == 5


def test_a_backfill_queues_what_is_missing_of_another_version_or_parked(
    in_use: Callable[..., QueuedStorage], no_waits: list[float]
) -> None:
    storage = in_use(backup=COUNTING, offsite=COUNTING)
    MirrorBackfill(storage, ["backup"]).run()
    assert copies(storage, "offsite") == []
    old = copies(storage)[0]
    PendingTransfer.objects.filter(pk=old.pk).update(generation=1, status=Status.DONE)

    parked = copies(storage)[1]
    PendingTransfer.objects.filter(pk=parked.pk).update(status=Status.HELD)

    counts = MirrorBackfill(storage).run()

    assert (counts.queued, counts.current) == (5, 0)  # 3 offsite, 2 backup
    assert [c.status for c in copies(storage)] == [Status.QUEUED] * 3
    assert copies(storage)[0].generation != 1
    assert len(copies(storage, "offsite")) == 3


@pytest.mark.parametrize(
    ("limits", "paused"),
    [
        ({"max_files": 2.0}, [1.0] * 5),
        ({"max_rate": 1000.0}, [1.0] * 10),
        ({"max_files": 2.0, "max_rate": 500.0}, [2.0] * 10),
    ],
    ids=["files", "bytes", "both"],
)
def test_a_backfill_is_paced_in_files_and_bytes_a_second(
    in_use: Callable[..., QueuedStorage],
    no_waits: list[float],
    limits: dict[str, float],
    paused: list[float],
) -> None:
    storage = in_use(files=10, backup=COUNTING)
    PendingTransfer.objects.filter(storage_key=KEY).update(size=1000)

    counts = MirrorBackfill(storage, **limits).run()  # type: ignore[arg-type]

    assert counts.queued == 10
    assert no_waits == pytest.approx(paused)
    assert counts.paced == pytest.approx(sum(paused))


def test_the_slowest_pace_waits_at_most_a_hundred_years_for_a_big_file(
    in_use: Callable[..., QueuedStorage], no_waits: list[float]
) -> None:
    """A byte a hundred years, and a file of a gigabyte: due in 3e18 seconds,
    more than time.sleep takes (OverflowError)."""
    storage = in_use(files=1, backup=COUNTING)
    PendingTransfer.objects.filter(storage_key=KEY).update(size=10**9)

    counts = MirrorBackfill(storage, max_rate=MIN_RATE).run()

    assert counts.queued == 1
    assert no_waits == [MAX_SECONDS]


# The command


@pytest.mark.parametrize(
    "argv",
    [
        ["--max-rate", "nan"],
        ["--max-rate", "inf"],
        ["--max-rate", "-5MB"],
        ["--max-rate", "0"],
        ["--max-rate", "1" + "0" * 400],
        ["--max-rate", "20 parsecs"],
        ["--max-rate", "0.0000000000000000001B"],
        ["--max-files", "nan"],
        ["--max-files", "inf"],
        ["--max-files", "-1"],
        ["--max-files", "0"],
        ["--max-files", "1e-300"],
        ["--batch-size", "0"],
        ["--wait-every", "nan"],
        ["--mirror", "nowhere"],
    ],
)
def test_bad_options_exit_2_and_change_nothing(
    in_use: Callable[..., QueuedStorage],
    manage: Callable[..., tuple[int, str, str]],
    argv: list[str],
) -> None:
    storage = in_use(backup=COUNTING)
    storage.save("warm.txt", content())  # registered, as a site's storage is

    status, _out, err = manage("backfill_mirror", KEY, *argv)

    assert status == 2
    assert argv[0] in err or "nowhere" in err
    assert "Traceback" not in err
    assert copies(storage) == []


@pytest.mark.parametrize("key", ["no-such-key", f"{KEY}@backup", "plain"])
def test_a_key_of_no_storage_with_mirrors_exits_2(
    in_use: Callable[..., QueuedStorage],
    make_storage: Callable[..., QueuedStorage],
    manage: Callable[..., tuple[int, str, str]],
    key: str,
) -> None:
    in_use(backup=COUNTING).save("warm.txt", content())
    make_storage(key="plain").save("warm.txt", content())

    status, _out, err = manage("backfill_mirror", key)

    assert status == 2
    assert {
        "no-such-key": "Unknown storage key",
        f"{KEY}@backup": f"pass '{KEY}'",
        "plain": "has no mirrors",
    }[key] in err


def test_the_command_waits_for_the_copies_and_reports_them_in_json(
    in_use: Callable[..., QueuedStorage],
    manage: Callable[..., tuple[int, str, str]],
    django_capture_on_commit_callbacks: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage = in_use(backup=COUNTING)
    storage.save("warm.txt", content())
    drain(keys=[KEY])

    def worker_runs(seconds: float) -> None:  # while the command waits
        with django_capture_on_commit_callbacks(execute=True):
            drain()

    monkeypatch.setattr(mirror_backfill, "pause", worker_runs)

    status, out, err = manage(
        "backfill_mirror", KEY, "--max-files", "200", "--wait", "--json"
    )

    assert status == 0, err
    result = json.loads(out)
    assert (result["storage"], result["mirrors"]) == (KEY, ["backup"])
    assert (result["total"], result["queued"], result["current"]) == (4, 3, 1)
    assert result["copies"] == {"backup": {"done": 4, "failed": 0, "pending": 0}}
    assert {c.status for c in copies(storage)} == {Status.DONE}


def test_the_command_shows_progress_and_exits_3_for_failed_copies(
    in_use: Callable[..., QueuedStorage],
    manage: Callable[..., tuple[int, str, str]],
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings.QUEUED_STORAGE_RETRIES = 0
    storage = in_use(backup="tests.storages.FlakyStorage")
    storage.mirrors["backup"].remote.failures = 10_000  # type: ignore[attr-defined]
    storage.save("warm.txt", content())
    drain(keys=[KEY])
    monkeypatch.setattr(mirror_backfill, "pause", lambda seconds: drain())

    status, out, err = manage(
        "backfill_mirror", KEY, "--wait", "--progress", "--max-rate", "1GiB"
    )

    assert status == 3
    assert "4/4 files" in out and "queued=3" in out and "current=1" in out
    assert "backup: done=0 failed=4 pending=0" in out
    assert "4 copies failed" in err
    assert local_files(storage) == ["warm.txt"]  # kept: its mirror has no copy
