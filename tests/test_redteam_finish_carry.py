"""Red team: migrate_storage NEW --finish OLD carrying the row of an old worker
taken for dead (out of its lease, not renewed for the transfer timeout), and
that worker waking after all. A host of the old or the switched configuration
is this process with only that configuration's storages registered
(test_redteam_migrate's Hosts); each break is a strict xfail."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.db import connection, transaction
from django.test import override_settings
from django.utils import timezone

from queued_storage import migration_finish, registry, tombstones, transfer
from queued_storage.backends import QueuedStorage
from queued_storage.migration_finish import MigrationFinish, finish_migration
from queued_storage.models import PendingTransfer
from queued_storage.tasks import Transfer
from queued_storage.worker import drain
from tests.helpers import FS, content, in_thread, joined, read_bytes, row_of
from tests.test_redteam_migrate import (  # noqa: F401 (hosts: the fixture)
    NEW_KEY,
    OLD_KEY,
    Hosts,
    Manage,
    hosts,
    migrated,
)

pytestmark = pytest.mark.django_db

BACKUP_KEY = "rt-media-new-backup"


@pytest.fixture
def deploy(hosts: Hosts) -> Hosts:  # noqa: F811 (the fixture imported above)
    """The hosts of a deploy: this process starts as a host of the old one."""
    return hosts


Status = PendingTransfer.Status


def taken_for_dead(name: str) -> None:
    """The old key's row of ``name`` as a worker taken for dead leaves it: its
    lease out and not renewed for a day (a paused worker, or one whose host's
    clock is a day behind the finishing host's)."""
    long_ago = timezone.now() - timedelta(days=1)
    assert PendingTransfer.objects.filter(storage_key=OLD_KEY, name=name).update(
        lease_expires_at=long_ago, updated_at=long_ago
    )


def finish_on_a_switched_host(
    deploy: Hosts, then: Callable[[], object] | None = None
) -> None:
    """Run --finish as a switched host would (``then``: what switched hosts do
    next), and come back to the old host."""
    deploy.run_new()
    finish_migration(NEW_KEY, OLD_KEY)
    if then is not None:
        then()
    deploy.run_old()


def paused_in_upload(
    deploy: Hosts,
    monkeypatch: pytest.MonkeyPatch,
    meanwhile: Callable[[str], None],
) -> list[str]:
    """The old storage's remote upload pauses once, before it writes: the row is
    taken for dead and ``meanwhile(name)`` runs; then the upload carries on."""
    old = deploy.old
    upload = old.remote._save  # type: ignore[attr-defined]
    paused: list[str] = []

    def pause(saved: str, data: Any) -> str:
        if not paused:
            paused.append(saved)
            taken_for_dead(saved)
            meanwhile(saved)
        written: str = upload(saved, data)
        return written

    monkeypatch.setattr(old.remote, "_save", pause)
    return paused


def drain_new(deploy: Hosts) -> None:
    """The switched hosts' workers drain the new key (a row an old worker handed
    back is due at once: the retry delay has passed)."""
    deploy.run_new()
    PendingTransfer.objects.filter(storage_key=NEW_KEY, status=Status.QUEUED).update(
        next_attempt_at=timezone.now()
    )
    drain(keys=[NEW_KEY])


def assert_each_sent_once(deploy: Hosts, names: list[str]) -> None:
    """After a drain on the new configuration: one row of the new key for each
    of ``names`` (``late-<i>.txt``), and its bytes (``late <i>``) on the new remote."""
    drain_new(deploy)
    for i, name in enumerate(names):
        assert (
            PendingTransfer.objects.filter(storage_key=NEW_KEY, name=name).count() == 1
        )
        assert read_bytes(deploy.new.remote, name) == f"late {i}".encode()


def test_a_switched_hosts_re_save_during_a_late_workers_purge_keeps_its_file(
    deploy: Hosts, monkeypatch: pytest.MonkeyPatch
) -> None:
    migrated(deploy)
    old = deploy.run_old()
    name = old.save("late.txt", content("saved just before the deploy"))
    new = deploy.new
    new.local._allow_overwrite = True  # type: ignore[attr-defined]

    # --finish carries the row, and a switched host's worker sends it: done.
    paused = paused_in_upload(
        deploy,
        monkeypatch,
        lambda _name: finish_on_a_switched_host(
            deploy, then=lambda: drain(keys=[NEW_KEY])
        ),
    )
    needed = tombstones._needed_by_another_key
    re_saved: list[str] = []

    def re_saved_after_the_look(storage: Any, row: PendingTransfer) -> bool:
        answer = needed(storage, row)
        if not re_saved:  # a request on a switched host saves the name again
            deploy.run_new()
            re_saved.append(new.save(name, content("saved again after the switch")))
            deploy.run_old()
        return answer

    monkeypatch.setattr(tombstones, "_needed_by_another_key", re_saved_after_the_look)
    drain(keys=[OLD_KEY])  # the old worker wakes, its tombstone is purged
    assert paused and re_saved == [name]
    assert row_of(new, name).status == Status.QUEUED

    drain_new(deploy)
    assert read_bytes(new, name) == b"saved again after the switch"
    assert read_bytes(new.remote, name) == b"saved again after the switch"


@pytest.mark.django_db(transaction=True)
def test_a_late_purge_during_a_switched_hosts_saving_request_keeps_the_file(
    deploy: Hosts,
) -> None:
    if connection.vendor == "sqlite":
        pytest.skip("SQLite serialises writers: the purge waits for the commit")
    migrated(deploy)
    new = deploy.run_new()
    new.local._allow_overwrite = True  # type: ignore[attr-defined]
    name = new.save("carried.txt", content("carried to the new key"))
    drain(keys=[NEW_KEY])
    # The tombstone a late old worker leaves once --finish carried its row.
    assert PendingTransfer.objects.leave_tombstone(
        OLD_KEY, name, row_of(new, name).host
    )

    with transaction.atomic():  # a request on a switched host
        assert new.save(name, content("saved again in a request")) == name
        deploy.run_old()
        purged, result = in_thread(lambda: drain(keys=[OLD_KEY]))
        joined(purged, result)
        deploy.run_new()

    drain_new(deploy)
    assert read_bytes(new, name) == b"saved again in a request"


@pytest.mark.django_db(transaction=True)
def test_a_late_purge_during_a_switched_hosts_first_save_of_the_name_keeps_the_file(
    deploy: Hosts,
) -> None:
    """The same, for a name the new key has no row of: the request's row is not
    committed, and PostgreSQL has no lock on a row it cannot see. The purge
    waits for the request's row (the unique constraint) and then keeps the file
    that row sends; it must not delete the file while the request is open."""
    if connection.vendor != "postgresql":
        pytest.skip("SQLite serialises writers; MariaDB's lock waits: the test above")
    migrated(deploy)
    new = deploy.run_new()
    name = "first-saved-on-a-switched-host.txt"
    assert PendingTransfer.objects.leave_tombstone(
        OLD_KEY, name, PendingTransfer.hosts_here()[0]
    )

    with transaction.atomic():  # a request on a switched host
        assert new.save(name, content("saved first in a request")) == name
        deploy.run_old()
        purged, result = in_thread(lambda: drain(keys=[OLD_KEY]))
        with connection.cursor() as cursor:
            # No sleep: the purge either ends or waits for the request's row.
            while purged.is_alive():
                # pg_locks, not pg_stat_activity: its rows are a snapshot kept
                # for the rest of this transaction.
                cursor.execute("SELECT count(*) FROM pg_locks WHERE NOT granted")
                if cursor.fetchone()[0]:
                    break
    joined(purged, result)
    deploy.run_new()

    drain_new(deploy)
    assert read_bytes(new, name) == b"saved first in a request"
    assert read_bytes(new.remote, name) == b"saved first in a request"


@pytest.mark.parametrize("delete_local", [False, True], ids=["transfer", "and-delete"])
def test_an_old_worker_that_wakes_between_its_upload_and_its_completion_loses_nothing(
    deploy: Hosts, monkeypatch: pytest.MonkeyPatch, delete_local: bool
) -> None:
    """Its upload verified on the old remote, the worker pauses before it records
    done; --finish carries the row meanwhile. Both configurations' hooks may be
    TransferAndDelete's (the local copy goes with the done record)."""
    monkeypatch.setattr(Transfer, "delete_local", delete_local)
    migrated(deploy)
    old = deploy.run_old()
    name = old.save("late.txt", content("saved just before the deploy"))
    verify = transfer._verify
    woke: list[str] = []

    def paused_before_completion(storage: Any, row: Any, *args: Any) -> None:
        verify(storage, row, *args)
        if row.storage_key == OLD_KEY and not woke:
            woke.append(row.name)
            taken_for_dead(row.name)
            finish_on_a_switched_host(deploy)

    monkeypatch.setattr(transfer, "_verify", paused_before_completion)
    drain(keys=[OLD_KEY])
    assert woke == [name]
    assert not PendingTransfer.objects.filter(storage_key=OLD_KEY, deleted=False)

    drain_new(deploy)
    new = deploy.new
    assert row_of(new, name).status == Status.DONE
    assert read_bytes(new.remote, name) == b"saved just before the deploy"
    assert read_bytes(new, name) == b"saved just before the deploy"


@pytest.mark.parametrize("same_size", [False, True], ids=["other-size", "same-size"])
def test_a_switched_hosts_re_save_before_the_old_worker_wakes_is_what_is_served(
    deploy: Hosts, monkeypatch: pytest.MonkeyPatch, same_size: bool
) -> None:
    """Carried, then saved again on a switched host: the old worker wakes and
    uploads the new bytes under the old row (to the old remote)."""
    migrated(deploy)
    old = deploy.run_old()
    name = old.save("late.txt", content("version A"))
    new = deploy.new
    new.local._allow_overwrite = True  # type: ignore[attr-defined]
    newer = b"version B" if same_size else b"version B, longer"

    def re_saved(saved: str) -> None:
        deploy.run_new()
        finish_migration(NEW_KEY, OLD_KEY)
        assert new.save(saved, content(newer.decode())) == saved
        deploy.run_old()

    paused = paused_in_upload(deploy, monkeypatch, re_saved)
    drain(keys=[OLD_KEY])
    assert paused == [name]

    drain_new(deploy)
    assert read_bytes(new, name) == newer
    assert read_bytes(new.remote, name) == newer
    assert row_of(new, name).status == Status.DONE


@pytest.mark.parametrize("saved_again", [False, True], ids=["deleted", "re-saved"])
def test_a_switched_hosts_delete_before_the_old_worker_wakes_stays_deleted(
    deploy: Hosts, monkeypatch: pytest.MonkeyPatch, saved_again: bool
) -> None:
    migrated(deploy)
    old = deploy.run_old()
    name = old.save("late.txt", content("version A"))
    new = deploy.new

    def deleted(saved: str) -> None:
        deploy.run_new()
        finish_migration(NEW_KEY, OLD_KEY)
        drain(keys=[NEW_KEY])
        new.delete(saved)
        drain(keys=[NEW_KEY])
        if saved_again:
            assert new.save(saved, content("reborn")) == saved
        deploy.run_old()

    paused = paused_in_upload(deploy, monkeypatch, deleted)
    drain(keys=[OLD_KEY])
    assert paused == [name]

    drain_new(deploy)
    if saved_again:
        assert read_bytes(new, name) == b"reborn"
        assert read_bytes(new.remote, name) == b"reborn"
    else:
        assert not new.exists(name)
        assert not new.remote.exists(name)


def test_an_old_hosts_re_save_before_the_old_worker_wakes_reaches_the_new_remote(
    deploy: Hosts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host not yet switched (the paused worker's) saves the name again after
    the carry: the old key has a row of the name again when the worker wakes."""
    migrated(deploy)
    old = deploy.run_old()
    old.local._allow_overwrite = True  # type: ignore[attr-defined]
    name = old.save("late.txt", content("version A"))

    def re_saved(saved: str) -> None:
        finish_on_a_switched_host(deploy)
        assert old.save(saved, content("version B on an old host")) == saved

    paused = paused_in_upload(deploy, monkeypatch, re_saved)
    drain(keys=[OLD_KEY])
    assert paused == [name]

    drain_new(deploy)
    new = deploy.new
    assert read_bytes(new, name) == b"version B on an old host"
    assert read_bytes(new.remote, name) == b"version B on an old host"


@pytest.mark.parametrize(
    "wrote",
    [
        pytest.param(True, id="wrote"),
        pytest.param(False, id="never-wrote"),
    ],
)
def test_a_late_workers_purge_leaves_the_old_bucket_as_the_migration_promises(
    deploy: Hosts, monkeypatch: pytest.MonkeyPatch, wrote: bool
) -> None:
    """The file was on both remotes; saved again on an old host just before the
    deploy, its worker is taken for dead and its row carried; the worker wakes.
    ``never-wrote``: it wakes before it opens the local copy, which the switched
    hosts' TransferAndDelete removed once they sent it: its upload never writes
    the old bucket, yet its tombstone owns the object there."""
    monkeypatch.setattr(Transfer, "delete_local", not wrote)
    name = migrated(deploy)
    old = deploy.run_old()
    old.local._allow_overwrite = True  # type: ignore[attr-defined]
    assert old.save(name, content("late version")) == name

    def carried_and_sent(_name: str) -> None:
        finish_on_a_switched_host(deploy, then=lambda: drain(keys=[NEW_KEY]))

    if wrote:
        paused = paused_in_upload(deploy, monkeypatch, carried_and_sent)
    else:
        make_room = getattr(transfer, "make_room")  # noqa: B009 (not exported)
        paused = []

        def paused_before_the_upload(storage: Any, row: Any, *a: Any, **k: Any) -> Any:
            if row.storage_key == OLD_KEY and not paused:
                paused.append(row.name)
                taken_for_dead(row.name)
                carried_and_sent(row.name)
                assert not old.local.exists(row.name)
            return make_room(storage, row, *a, **k)

        monkeypatch.setattr(
            "queued_storage.transfer.make_room", paused_before_the_upload
        )
    drain(keys=[OLD_KEY])
    assert paused == [name]
    drain_new(deploy)

    assert read_bytes(deploy.new.remote, name) == b"late version"
    assert old.remote.exists(name)


def test_a_late_workers_purge_on_an_old_host_leaves_a_new_mirror_its_copy(
    deploy: Hosts, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """The switched configuration has a mirror of its own, a key the old hosts do
    not know: the late worker's purge cannot see its pending row. Both hooks are
    TransferAndDelete's."""
    monkeypatch.setattr(Transfer, "delete_local", True)
    switched = deploy.new
    deploy.new = QueuedStorage(
        FS,
        FS,
        local_options=switched.local_options,
        remote_options=switched.remote_options,
        key=NEW_KEY,
        mirrors={
            "backup": {
                "storage": FS,
                "options": {"location": str(tmp_path / "backup")},
                "key": BACKUP_KEY,
            }
        },
    )
    migrated(deploy)
    old = deploy.run_old()
    name = old.save("late.txt", content("saved just before the deploy"))

    def sent_to_the_new_remote_only() -> None:
        drain(keys=[NEW_KEY])  # done there; the backup's copy is queued
        backup = PendingTransfer.objects.get(storage_key=BACKUP_KEY, name=name)
        assert backup.status == Status.QUEUED
        assert deploy.new.local.exists(name)

    paused = paused_in_upload(
        deploy,
        monkeypatch,
        lambda _name: finish_on_a_switched_host(deploy, sent_to_the_new_remote_only),
    )
    drain(keys=[OLD_KEY])
    assert paused == [name]
    deploy.run_new()
    drain(keys=[NEW_KEY, BACKUP_KEY])
    registry.forget(BACKUP_KEY)

    new = deploy.new
    assert read_bytes(new, name) == b"saved just before the deploy"
    assert read_bytes(new.mirrors["backup"].remote, name) == (
        b"saved just before the deploy"
    )


def test_a_lease_renewed_just_before_finish_locks_the_page_keeps_the_row(
    deploy: Hosts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The page is read unlocked with the lease out for a day; the worker renews
    it before the page is locked: it is read again, alive, and left busy."""
    migrated(deploy)
    old = deploy.run_old()
    name = old.save("late.txt", content("saved just before the deploy"))
    token = "live-worker"
    assert PendingTransfer.objects.filter(storage_key=OLD_KEY, name=name).update(
        status=Status.TRANSFERRING, lease_token=token
    )
    taken_for_dead(name)
    finish_page = MigrationFinish._finish_page
    renewed: list[int] = []

    def renewed_first(self: MigrationFinish, page: list[PendingTransfer]) -> None:
        row = next(row for row in page if row.name == name)
        assert migration_finish._abandoned(row)  # as the unlocked read found it
        renewed.append(PendingTransfer.objects.renew_lease(token, 300, pks=[row.pk]))
        finish_page(self, page)

    monkeypatch.setattr(MigrationFinish, "_finish_page", renewed_first)
    deploy.run_new()
    counts = finish_migration(NEW_KEY, OLD_KEY)

    assert renewed == [1]
    assert (counts.busy, counts.carried) == (1, 0)
    assert not PendingTransfer.objects.filter(storage_key=NEW_KEY, name=name).exists()


@override_settings(QUEUED_STORAGE_TRANSFER_TIMEOUT=36500 * 86400)
def test_with_a_transfer_timeout_of_a_hundred_years_a_dead_workers_row_stays_busy(
    deploy: Hosts,
) -> None:
    migrated(deploy)
    name = deploy.run_old().save("late.txt", content())
    assert PendingTransfer.objects.filter(storage_key=OLD_KEY, name=name).update(
        status=Status.TRANSFERRING, lease_token="dead"
    )
    taken_for_dead(name)
    deploy.run_new()

    counts = finish_migration(NEW_KEY, OLD_KEY)

    assert (counts.busy, counts.carried) == (1, 0)
    assert PendingTransfer.objects.filter(storage_key=OLD_KEY, name=name).exists()


def test_a_second_finish_between_the_first_ones_read_and_lock_carries_once(
    deploy: Hosts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two operators run --finish at once: the second one runs whole between the
    first one's unlocked read of a page and its lock."""
    migrated(deploy)
    old = deploy.run_old()
    names = [old.save(f"late-{i}.txt", content(f"late {i}")) for i in range(3)]
    for name in names[:2]:
        assert PendingTransfer.objects.filter(storage_key=OLD_KEY, name=name).update(
            status=Status.TRANSFERRING, lease_token="dead"
        )
        taken_for_dead(name)
    finish_page = MigrationFinish._finish_page
    second: list[Any] = []

    def raced(self: MigrationFinish, page: list[PendingTransfer]) -> None:
        if not second:
            second.append(None)
            second[0] = finish_migration(NEW_KEY, OLD_KEY, page_size=2)
        finish_page(self, page)

    monkeypatch.setattr(MigrationFinish, "_finish_page", raced)
    deploy.run_new()
    first = finish_migration(NEW_KEY, OLD_KEY, page_size=2)

    assert first.carried + second[0].carried == 3
    assert not PendingTransfer.objects.filter(storage_key=OLD_KEY).exists()
    assert_each_sent_once(deploy, names)


@pytest.mark.parametrize("killed_at", [2, 3], ids=["first-page", "second-page"])
def test_a_finish_killed_mid_page_and_run_again_carries_each_file_once(
    deploy: Hosts, monkeypatch: pytest.MonkeyPatch, killed_at: int
) -> None:
    migrated(deploy)
    old = deploy.run_old()
    names = [old.save(f"late-{i}.txt", content(f"late {i}")) for i in range(3)]
    for name in names:
        assert PendingTransfer.objects.filter(storage_key=OLD_KEY, name=name).update(
            status=Status.TRANSFERRING, lease_token="dead"
        )
        taken_for_dead(name)
    new_row = MigrationFinish._new_row
    made: list[str] = []

    def killed(self: MigrationFinish, row: PendingTransfer) -> PendingTransfer:
        made.append(row.name)
        if len(made) == killed_at:
            raise KeyboardInterrupt  # SIGINT, mid-page
        return new_row(self, row)

    monkeypatch.setattr(MigrationFinish, "_new_row", killed)
    deploy.run_new()
    with pytest.raises(KeyboardInterrupt):
        finish_migration(NEW_KEY, OLD_KEY, page_size=2)
    monkeypatch.setattr(MigrationFinish, "_new_row", new_row)
    finish_migration(NEW_KEY, OLD_KEY, page_size=2)

    assert not PendingTransfer.objects.filter(storage_key=OLD_KEY).exists()
    assert_each_sent_once(deploy, names)


class _ClockAhead:
    """django.utils.timezone as a host whose clock is a day ahead sees it."""

    @staticmethod
    def now() -> Any:
        return timezone.now() + timedelta(days=1)


def test_finish_on_a_host_whose_clock_is_ahead_carries_a_file_that_is_sent_now(
    deploy: Hosts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--finish on a host whose clock is a day ahead carries a dead worker's row:
    the carried row is due by the switched hosts' workers' clocks, not only once
    they catch up with the finishing host's."""
    migrated(deploy)
    old = deploy.run_old()
    name = old.save("late.txt", content("saved just before the deploy"))
    assert PendingTransfer.objects.filter(storage_key=OLD_KEY, name=name).update(
        status=Status.TRANSFERRING, lease_token="dead"
    )
    taken_for_dead(name)
    monkeypatch.setattr(migration_finish, "timezone", _ClockAhead)
    deploy.run_new()
    counts = finish_migration(NEW_KEY, OLD_KEY)
    monkeypatch.undo()
    assert counts.carried == 1

    carried = row_of(deploy.new, name)
    assert carried.next_attempt_at is not None
    assert carried.next_attempt_at <= timezone.now()
    drain(keys=[NEW_KEY])  # the switched hosts' workers, on the right time
    assert read_bytes(deploy.new.remote, name) == b"saved just before the deploy"


def test_finish_on_a_host_whose_clock_is_ahead_leaves_a_live_workers_row_busy(
    deploy: Hosts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker renewed its lease a moment ago by its own (right) clock: a
    finishing host a day ahead does not take it for dead (the database's clock
    judges), and the row is left to it."""
    migrated(deploy)
    old = deploy.run_old()
    name = old.save("late.txt", content("saved just before the deploy"))
    assert PendingTransfer.objects.filter(storage_key=OLD_KEY, name=name).update(
        status=Status.TRANSFERRING,
        lease_token="live",
        lease_expires_at=timezone.now() + timedelta(minutes=5),
        updated_at=timezone.now(),
    )
    monkeypatch.setattr(migration_finish, "timezone", _ClockAhead)
    deploy.run_new()
    counts = finish_migration(NEW_KEY, OLD_KEY)
    monkeypatch.undo()

    assert (counts.busy, counts.carried) == (1, 0)
    assert PendingTransfer.objects.get(storage_key=OLD_KEY, name=name).lease_token == (
        "live"
    )
    assert not PendingTransfer.objects.filter(storage_key=NEW_KEY, name=name).exists()


@pytest.mark.parametrize(
    "command",
    [
        pytest.param("manage", id="manage.py"),
        pytest.param("call_command", id="call_command"),
    ],
)
def test_a_transfer_timeout_of_0_is_refused_before_finish_changes_anything(
    deploy: Hosts, manage: Manage, command: str
) -> None:
    migrated(deploy)
    old = deploy.run_old()
    first = old.save("late-1.txt", content("late 1"))
    dead = old.save("late-2.txt", content("late 2"))
    assert PendingTransfer.objects.filter(storage_key=OLD_KEY, name=dead).update(
        status=Status.TRANSFERRING, lease_token="dead"
    )
    taken_for_dead(dead)
    before = sorted(PendingTransfer.objects.values_list("storage_key", "name"))
    deploy.run_new()
    argv = [NEW_KEY, "--finish", OLD_KEY, "--batch-size", "1"]

    with override_settings(QUEUED_STORAGE_TRANSFER_TIMEOUT=0):
        if command == "manage":
            status, _out, err = manage("migrate_storage", *argv)
            assert status == 1 and "E007" in err, err
        else:
            with pytest.raises(ImproperlyConfigured):
                call_command("migrate_storage", *argv)

    assert sorted(PendingTransfer.objects.values_list("storage_key", "name")) == before
    assert not PendingTransfer.objects.filter(storage_key=NEW_KEY, name=first)
