"""Red team: migrate_storage NEW --finish OLD. Each break was a strict xfail, now a regression test; a
host of the old or the switched configuration is this process with only that
configuration's storages registered (test_redteam_migrate's Hosts)."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from queued_storage import ledger_sql
from queued_storage.migration_finish import MigrationFinish, finish_migration
from queued_storage.models import PendingTransfer
from queued_storage.worker import drain
from tests.helpers import content, read_bytes, row_of
from tests.test_redteam_migrate import (  # noqa: F401 (hosts: the fixture)
    NEW_KEY,
    OLD_KEY,
    Hosts,
    Manage,
    hosts,
    migrated,
)

pytestmark = pytest.mark.django_db

Status = PendingTransfer.Status


@pytest.fixture
def fleet(request: pytest.FixtureRequest) -> Hosts:
    """test_redteam_migrate's ``hosts``: this process a host of the old one."""
    made: Hosts = request.getfixturevalue("hosts")
    return made


def test_an_old_worker_mid_upload_while_finish_runs_loses_nothing(
    fleet: Hosts, monkeypatch: pytest.MonkeyPatch
) -> None:
    migrated(fleet)
    old = fleet.run_old()
    name = old.save("late.txt", content("saved just before the deploy"))
    upload = old.remote._save  # type: ignore[attr-defined]
    finished: list[object] = []

    def finish_meanwhile(saved: str, data: Any) -> str:
        written: str = upload(saved, data)
        if not finished:  # the deploy is done, --finish runs; this worker carries on
            fleet.run_new()
            finished.append(finish_migration(NEW_KEY, OLD_KEY))
            fleet.run_old()
        return written

    monkeypatch.setattr(old.remote, "_save", finish_meanwhile)
    drain(keys=[OLD_KEY, NEW_KEY])
    assert finished

    new = fleet.run_new()
    drain(keys=[NEW_KEY])
    assert read_bytes(new, name) == b"saved just before the deploy"
    assert read_bytes(new.remote, name) == b"saved just before the deploy"


def test_a_re_save_on_an_old_host_while_finish_reads_its_page_is_kept(
    fleet: Hosts, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = migrated(fleet)
    old = fleet.old
    old.local._allow_overwrite = True  # type: ignore[attr-defined]
    finish_page = MigrationFinish._finish_page

    def re_saved_first(self: MigrationFinish, page: list[PendingTransfer]) -> None:
        fleet.run_old()  # a request on a host not yet switched
        assert old.save(name, content("saved again on an old host")) == name
        fleet.run_new()
        finish_page(self, page)

    monkeypatch.setattr(MigrationFinish, "_finish_page", re_saved_first)
    new = fleet.run_new()
    finish_migration(NEW_KEY, OLD_KEY)
    drain(keys=[NEW_KEY])

    assert read_bytes(new, name) == b"saved again on an old host"


def test_finish_keeps_a_switched_hosts_newer_save_whatever_the_old_hosts_clock(
    fleet: Hosts, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = migrated(fleet)
    old = fleet.run_old()
    old.local._allow_overwrite = True  # type: ignore[attr-defined]
    ahead = time.time_ns() + 60 * 10**9  # the old host's clock is a minute ahead
    monkeypatch.setattr(ledger_sql, "last_generation", ahead)
    assert old.save(name, content("late version, a host not yet switched")) == name
    monkeypatch.setattr(ledger_sql, "last_generation", 0)  # a switched host's clock
    new = fleet.run_new()
    new.local._allow_overwrite = True  # type: ignore[attr-defined]
    assert new.save(name, content("newest")) == name

    finish_migration(NEW_KEY, OLD_KEY)
    drain(keys=[NEW_KEY])

    row = row_of(new, name)
    assert (row.status, row.size, row.last_error) == (Status.DONE, 6, "")
    assert read_bytes(new.remote, name) == b"newest"


def test_finish_never_leaves_a_parked_mirror_row_held_for_ever(
    fleet: Hosts, manage: Manage
) -> None:
    migrated(fleet)
    old = fleet.run_old()
    name = old.save("late.txt", content("saved before the check"))
    drain(keys=[OLD_KEY])  # done on the old remote, the mirror's copy queued
    assert row_of(old, name).requeue_unverified("the old remote lost it")
    drain(keys=[NEW_KEY])  # the mirror's copy is parked for its primary
    assert PendingTransfer.objects.get(storage_key=NEW_KEY, name=name).status == (
        Status.HELD
    )
    new = fleet.run_new()

    status, _out, err = manage("migrate_storage", NEW_KEY, "--finish", OLD_KEY)
    drain(keys=[NEW_KEY])

    assert status in (0, 3), err
    row = row_of(new, name)
    assert row.status == Status.DONE or (
        status == 3 and PendingTransfer.objects.filter(storage_key=OLD_KEY).exists()
    ), row.status


def test_a_late_workers_tombstone_keeps_the_local_copy_another_keys_row_sends(
    fleet: Hosts,
) -> None:
    """Defence in depth: an old worker's completion that found its row carried
    away leaves a tombstone of the old key; its purge leaves the local copy to
    the new key's queued row."""
    migrated(fleet)
    new = fleet.run_new()
    name = new.save("carried.txt", content("carried to the new key"))
    old = fleet.run_old()
    assert PendingTransfer.objects.leave_tombstone(
        OLD_KEY, name, row_of(new, name).host
    )

    drain(keys=[OLD_KEY])

    assert not PendingTransfer.objects.filter(storage_key=OLD_KEY, name=name).exists()
    assert old.local.exists(name)
    new = fleet.run_new()
    drain(keys=[NEW_KEY])
    assert read_bytes(new.remote, name) == b"carried to the new key"


def test_finish_keeps_a_row_whose_old_worker_stopped_past_its_lease(
    fleet: Hosts, manage: Manage
) -> None:
    """A worker paused past its lease may still wake and complete: its row is
    busy, as a live one's is, until it is no longer transferring."""
    migrated(fleet)
    name = fleet.run_old().save("late.txt", content("saved just before the deploy"))
    PendingTransfer.objects.filter(storage_key=OLD_KEY, name=name).update(
        status=Status.TRANSFERRING,
        lease_token="paused",
        lease_expires_at=timezone.now() - timedelta(minutes=5),
    )
    fleet.run_new()

    status, out, err = manage("migrate_storage", NEW_KEY, "--finish", OLD_KEY)

    assert status == 3, err
    assert "busy=1" in out and name in err
    assert PendingTransfer.objects.filter(storage_key=OLD_KEY, name=name).exists()
    assert not PendingTransfer.objects.filter(storage_key=NEW_KEY, name=name).exists()


def test_finish_keeps_a_row_whose_local_copy_is_another_version(
    fleet: Hosts, manage: Manage
) -> None:
    migrated(fleet)
    old = fleet.run_old()
    name = old.save("late.txt", content("the version its row records"))
    Path(old.local.path(name)).write_bytes(b"another version")
    fleet.run_new()

    status, out, err = manage("migrate_storage", NEW_KEY, "--finish", OLD_KEY)

    assert status == 3, err
    assert "changed=1" in out and "not the version their row records" in err
    assert PendingTransfer.objects.filter(storage_key=OLD_KEY, name=name).exists()
    assert not PendingTransfer.objects.filter(storage_key=NEW_KEY, name=name).exists()


def test_finish_carries_a_row_whose_old_worker_died_mid_upload(
    fleet: Hosts, manage: Manage
) -> None:
    """Out of its lease and not renewed for the transfer timeout, the worker is
    taken for dead: the row is carried instead of left busy for ever."""
    migrated(fleet)
    name = fleet.run_old().save("late.txt", content("saved just before the deploy"))
    long_ago = timezone.now() - timedelta(days=1)
    PendingTransfer.objects.filter(storage_key=OLD_KEY, name=name).update(
        status=Status.TRANSFERRING,
        lease_token="dead",
        lease_expires_at=long_ago,
        updated_at=long_ago,
    )
    new = fleet.run_new()

    status, out, err = manage("migrate_storage", NEW_KEY, "--finish", OLD_KEY)

    assert status == 0, err
    assert "busy=0" in out
    assert not PendingTransfer.objects.filter(storage_key=OLD_KEY, name=name).exists()
    drain(keys=[NEW_KEY])
    assert read_bytes(new.remote, name) == b"saved just before the deploy"


def test_an_old_worker_taken_for_dead_that_wakes_after_the_finish_loses_nothing(
    fleet: Hosts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker was only paused: it wakes after --finish carried its row, finds
    no row, and leaves a tombstone whose purge keeps the local copy."""
    migrated(fleet)
    old = fleet.run_old()
    name = old.save("late.txt", content("saved just before the deploy"))
    upload = old.remote._save  # type: ignore[attr-defined]
    finished: list[object] = []

    def paused_past_the_timeout(saved: str, data: Any) -> str:
        if not finished:
            long_ago = timezone.now() - timedelta(days=1)
            PendingTransfer.objects.filter(storage_key=OLD_KEY, name=saved).update(
                lease_expires_at=long_ago, updated_at=long_ago
            )
            fleet.run_new()
            finished.append(finish_migration(NEW_KEY, OLD_KEY))
            fleet.run_old()
        written: str = upload(saved, data)
        return written

    monkeypatch.setattr(old.remote, "_save", paused_past_the_timeout)
    drain(keys=[OLD_KEY, NEW_KEY])
    assert finished
    assert not PendingTransfer.objects.filter(storage_key=OLD_KEY, name=name).exists()

    # Its local copy is kept for the new key's row; the old worker, which took
    # that row for a mirror's copy, handed it back due after the retry delay.
    new = fleet.run_new()
    assert new.local.exists(name)
    PendingTransfer.objects.filter(storage_key=NEW_KEY, name=name).update(
        next_attempt_at=timezone.now()
    )
    drain(keys=[NEW_KEY])
    assert read_bytes(new.remote, name) == b"saved just before the deploy"
    assert read_bytes(new, name) == b"saved just before the deploy"


def test_a_purge_removes_the_local_copy_another_storage_of_the_name_does_not_share(
    make_storage: Any,
) -> None:
    """The defence keeps a copy for another key's row only where that key keeps
    its local copies too: a storage in another directory with a pending row of
    the same name does not keep a deleted file's copy here."""
    mine = make_storage()
    other = make_storage()
    name = mine.save("same.txt", content("mine"))
    assert other.save("same.txt", content("other's")) == name
    drain(keys=[mine.key])
    mine.delete(name)

    drain(keys=[mine.key])

    assert not mine.local.exists(name)
    assert other.local.exists(name)
    assert row_of(other, name).status == Status.QUEUED
