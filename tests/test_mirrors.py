"""Mirrors: each file goes to the primary remote, which serves it once verified
there, and then to every mirror, each destination with a row of its own; the
local copy goes last, and a delete removes every copy. FileSystemStorage
remotes on this test's directories."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
from django.core.files.storage import Storage
from django.db import connection
from django.test.utils import CaptureQueriesContext

from queued_storage import mirrors
from queued_storage.backends import MirrorStorage, QueuedStorage
from queued_storage.errors import Outcome
from queued_storage.local_copies import clean_local_copies
from queued_storage.models import PendingTransfer
from queued_storage.signals import file_transferred
from queued_storage.stats import DrainStats
from queued_storage.transfer import (
    Verified,
    _complete_together,
    process_row,
    transfer_row,
)
from tests.helpers import (
    Status,
    content,
    files_under,
    local_files,
    read_bytes,
    remote_files,
    root_of,
)

DELETE = "queued_storage.tasks.TransferAndDelete"
pytestmark = pytest.mark.django_db


def mirror_of(storage: QueuedStorage, name: str = "backup") -> MirrorStorage:
    return storage.mirrors[name]


def row_in(storage: QueuedStorage, name: str) -> PendingTransfer | None:
    return PendingTransfer.objects.for_name(storage.key, name).first()


def mirrored_files(storage: QueuedStorage, name: str = "backup") -> list[str]:
    return files_under(root_of(mirror_of(storage, name).remote))


def test_served_from_the_primary_once_done_then_copied_to_the_mirror(
    make_mirrored: Callable[..., QueuedStorage], run_drain: Callable[..., DrainStats]
) -> None:
    storage = make_mirrored()
    mirror = mirror_of(storage)
    name = storage.save("docs/a.txt", content("mirrored"))
    assert row_in(mirror, name) is None  # nothing more on the save path

    run_drain(keys=[storage.key])

    primary = row_in(storage, name)
    copy = row_in(mirror, name)
    assert primary is not None and primary.status == Status.DONE
    assert storage.url(name) == f"https://remote.example/{name}"
    assert copy is not None and copy.status == Status.QUEUED
    assert (copy.generation, copy.size, copy.checksum, copy.host) == (
        primary.generation,
        primary.size,
        primary.checksum,
        primary.host,
    )
    assert (copy.attempts, copy.deleted, copy.remote_owned) == (0, False, False)
    assert mirrored_files(storage) == []

    run_drain(keys=[mirror.key])

    copy = row_in(mirror, name)
    assert copy is not None and copy.status == Status.DONE
    assert read_bytes(mirror.remote, name) == b"mirrored"
    assert storage.url(name) == f"https://remote.example/{name}"


def test_one_drain_copies_to_the_primary_and_then_every_mirror(
    make_mirrored: Callable[..., QueuedStorage], run_drain: Callable[..., DrainStats]
) -> None:
    storage = make_mirrored(names=("backup", "offsite"))
    names = [storage.save(f"f{i}.txt", content(f"file {i}")) for i in range(3)]

    stats = run_drain()

    assert stats.done == 9
    for _mirror, _key, destination in storage.destinations:
        assert [row_in(destination, n).status for n in names] == [Status.DONE] * 3  # type: ignore[union-attr]
        assert files_under(root_of(destination.remote)) == names


def test_the_save_path_costs_no_query_more_with_mirrors(
    make_storage: Callable[..., QueuedStorage],
    make_mirrored: Callable[..., QueuedStorage],
) -> None:
    counted = []
    for storage in (make_storage(), make_mirrored()):
        storage.save("warm.txt", content())  # registers it
        with CaptureQueriesContext(connection) as queries:
            storage.save("a.txt", content())
        counted.append(len(queries))

    assert counted[0] == counted[1] > 0


@pytest.mark.parametrize("order", ["primary-then-mirror", "mirror-before-after-done"])
def test_transfer_and_delete_keeps_the_local_copy_until_the_mirror_is_done(
    make_mirrored: Callable[..., QueuedStorage],
    run_drain: Callable[..., DrainStats],
    order: str,
) -> None:
    storage = make_mirrored(task=DELETE)
    mirror = mirror_of(storage)
    name = storage.save("a.txt", content("keep me"))

    if order == "primary-then-mirror":
        run_drain(keys=[storage.key])
        assert local_files(storage) == [name]  # the mirror has no copy yet
        run_drain(keys=[mirror.key])
    else:
        # The mirror's done commits between the primary's and the primary's
        # after-commit work (its signal, then its local delete).
        def mirror_first(sender: Any, key: str, **kwargs: Any) -> None:
            if key == storage.key:
                assert local_files(storage) == [name]
                run_drain(keys=[mirror.key])

        file_transferred.connect(mirror_first)
        try:
            run_drain(keys=[storage.key])
        finally:
            file_transferred.disconnect(mirror_first)

    assert local_files(storage) == []
    assert remote_files(storage) == mirrored_files(storage) == [name]
    assert read_bytes(storage, name) == b"keep me"
    for destination in (storage, mirror):
        row = row_in(destination, name)
        assert row is not None and (row.status, row.last_error) == (Status.DONE, "")


@pytest.mark.parametrize("first", ["backup", "offsite"])
def test_the_local_copy_goes_with_the_last_mirror_whichever_it_is(
    make_mirrored: Callable[..., QueuedStorage],
    run_drain: Callable[..., DrainStats],
    first: str,
) -> None:
    storage = make_mirrored(names=("backup", "offsite"), task=DELETE)
    name = storage.save("a.txt", content())
    run_drain(keys=[storage.key])
    last = "offsite" if first == "backup" else "backup"

    run_drain(keys=[mirror_of(storage, first).key])
    assert local_files(storage) == [name]
    run_drain(keys=[mirror_of(storage, last).key])

    assert local_files(storage) == []
    assert mirrored_files(storage, first) == mirrored_files(storage, last) == [name]


@pytest.mark.parametrize("when", ["after-every-copy", "before-the-mirror-copied"])
def test_delete_removes_every_copy(
    make_mirrored: Callable[..., QueuedStorage],
    run_drain: Callable[..., DrainStats],
    django_capture_on_commit_callbacks: Any,
    when: str,
) -> None:
    storage = make_mirrored(names=("backup", "offsite"))
    name = storage.save("a.txt", content())
    run_drain(keys=[storage.key, mirror_of(storage).key])
    if when == "after-every-copy":
        run_drain()

    with django_capture_on_commit_callbacks(execute=True):
        storage.delete(name)
        assert not storage.exists(name)
        assert PendingTransfer.objects.filter(deleted=False).count() == 0

    assert not PendingTransfer.objects.exists()
    assert local_files(storage) == remote_files(storage) == []
    assert mirrored_files(storage, "backup") == mirrored_files(storage, "offsite") == []


def test_delete_before_any_copy_leaves_no_mirror_tombstone(
    make_mirrored: Callable[..., QueuedStorage], run_drain: Callable[..., DrainStats]
) -> None:
    storage = make_mirrored()
    name = storage.save("a.txt", content())

    storage.delete(name)

    assert row_in(mirror_of(storage), name) is None
    run_drain()
    assert not PendingTransfer.objects.exists()


def test_a_mirror_at_an_old_generation_waits_and_copies_the_new_version(
    make_mirrored: Callable[..., QueuedStorage], run_drain: Callable[..., DrainStats]
) -> None:
    storage = make_mirrored(local_options={"allow_overwrite": True})
    mirror = mirror_of(storage)
    name = storage.save("a.txt", content("version one"))
    run_drain(keys=[storage.key])
    old = row_in(mirror, name)
    assert old is not None

    assert storage.save(name, content("version two!")) == name
    run_drain(keys=[mirror.key])

    parked = row_in(mirror, name)
    assert parked is not None
    assert (parked.status, parked.attempts) == (Status.HELD, 0)
    assert parked.generation == old.generation
    assert mirrored_files(storage) == []
    assert read_bytes(storage, name) == b"version two!"

    run_drain()

    copy = row_in(mirror, name)
    primary = row_in(storage, name)
    assert copy is not None and primary is not None
    assert (copy.status, copy.generation) == (Status.DONE, primary.generation)
    assert read_bytes(mirror.remote, name) == b"version two!"


def test_a_resave_of_a_mirrored_file_copies_it_again_after_the_primary(
    make_mirrored: Callable[..., QueuedStorage], run_drain: Callable[..., DrainStats]
) -> None:
    storage = make_mirrored(local_options={"allow_overwrite": True})
    mirror = mirror_of(storage)
    name = storage.save("a.txt", content("one"))
    run_drain()

    storage.save(name, content("two"))
    copy = row_in(mirror, name)
    assert copy is not None and copy.status == Status.DONE  # the old version's
    run_drain()

    assert read_bytes(mirror.remote, name) == b"two"
    assert read_bytes(storage.remote, name) == b"two"


def test_a_mirror_copy_in_flight_keeps_its_lease_and_hands_the_row_back(
    make_mirrored: Callable[..., QueuedStorage],
    run_drain: Callable[..., DrainStats],
    django_capture_on_commit_callbacks: Any,
) -> None:
    storage = make_mirrored(local_options={"allow_overwrite": True})
    mirror = mirror_of(storage)
    name = storage.save("a.txt", content("one"))
    run_drain(keys=[storage.key])
    [claimed] = PendingTransfer.objects.filter(storage_key=mirror.key).claim_due(
        limit=1, lease=300
    )
    storage.save(name, content("two"))

    run_drain(keys=[storage.key])  # queues the mirror's copy of "two"

    leased = row_in(mirror, name)
    assert leased is not None
    assert (leased.status, leased.lease_token) == (
        Status.TRANSFERRING,
        claimed.lease_token,
    )
    assert leased.generation == row_in(storage, name).generation  # type: ignore[union-attr]
    with django_capture_on_commit_callbacks(execute=True):
        assert process_row(claimed) is Outcome.STALE
    handed_back = row_in(mirror, name)
    assert handed_back is not None and handed_back.status == Status.QUEUED

    run_drain()

    assert read_bytes(mirror.remote, name) == b"two"
    assert row_in(mirror, name).status == Status.DONE  # type: ignore[union-attr]


@pytest.fixture
def no_retries(settings: Any) -> None:
    settings.QUEUED_STORAGE_RETRIES = 0


def test_a_failing_mirror_fails_alone_and_keeps_the_local_copy(
    make_mirrored: Callable[..., QueuedStorage],
    run_drain: Callable[..., DrainStats],
    no_retries: None,
) -> None:
    storage = make_mirrored(
        mirror="tests.storages.FlakyStorage",
        mirror_options={"failures": 10_000},
        task=DELETE,
    )
    mirror = mirror_of(storage)
    name = storage.save("a.txt", content("safe"))

    stats = run_drain()

    assert (stats.done, stats.failed) == (1, 1)
    assert storage.url(name) == f"https://remote.example/{name}"
    assert read_bytes(storage, name) == b"safe"
    copy = row_in(mirror, name)
    assert copy is not None and copy.status == Status.FAILED
    assert (
        "ConnectionError" in copy.last_error and "remote unreachable" in copy.last_error
    )
    assert local_files(storage) == [name]

    # The mirror is back; its failed row is queued again, as from the admin.
    mirror.remote.failures = 0  # type: ignore[attr-defined]
    assert PendingTransfer.objects.filter(pk=copy.pk).requeue() == 1
    run_drain()

    assert row_in(mirror, name).status == Status.DONE  # type: ignore[union-attr]
    assert local_files(storage) == []


@pytest.mark.parametrize("verify_checksum", [False, True])
def test_a_mirror_copies_from_the_primary_remote_when_the_local_copy_is_gone(
    make_mirrored: Callable[..., QueuedStorage],
    run_drain: Callable[..., DrainStats],
    verify_checksum: bool,
) -> None:
    storage = make_mirrored(verify_checksum=verify_checksum)
    name = storage.save("a.txt", content("from the remote"))
    run_drain(keys=[storage.key])
    os.remove(storage.local.path(name))

    run_drain()

    copy = row_in(mirror_of(storage), name)
    assert copy is not None and copy.status == Status.DONE
    assert read_bytes(mirror_of(storage).remote, name) == b"from the remote"


def test_a_mirror_waits_without_an_attempt_while_its_primary_is_not_done(
    make_mirrored: Callable[..., QueuedStorage], run_drain: Callable[..., DrainStats]
) -> None:
    storage = make_mirrored()
    mirror = mirror_of(storage)
    name = storage.save("a.txt", content())
    run_drain(keys=[storage.key])
    primary = row_in(storage, name)
    assert primary is not None
    assert primary.requeue_unverified("its remote copy was found missing")

    run_drain(keys=[mirror.key])

    parked = row_in(mirror, name)
    assert parked is not None and (parked.status, parked.attempts) == (Status.HELD, 0)
    run_drain(keys=[storage.key])
    assert row_in(mirror, name).status == Status.QUEUED  # type: ignore[union-attr]
    run_drain()
    assert row_in(mirror, name).status == Status.DONE  # type: ignore[union-attr]


def test_a_park_that_finds_the_primary_done_meanwhile_copies_at_once(
    make_mirrored: Callable[..., QueuedStorage],
    run_drain: Callable[..., DrainStats],
    django_capture_on_commit_callbacks: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The primary's completion lands between the mirror's first look at it and
    the park, which reads it again under its lock: no row is parked for ever."""
    storage = make_mirrored()
    mirror = mirror_of(storage)
    name = storage.save("a.txt", content())
    run_drain(keys=[storage.key])
    [claimed] = PendingTransfer.objects.filter(storage_key=mirror.key).claim_due(
        limit=1, lease=300
    )
    first_look = mirrors.source_of

    def stale_look(mirror: MirrorStorage, row: PendingTransfer) -> Storage | None:
        monkeypatch.setattr(mirrors, "source_of", first_look)
        return None  # as if read just before the primary's done committed

    monkeypatch.setattr(mirrors, "source_of", stale_look)
    with django_capture_on_commit_callbacks(execute=True):
        assert process_row(claimed) is Outcome.DONE

    assert read_bytes(mirror.remote, name) == b"hello world"


def test_clean_local_copies_waits_for_every_mirror(
    make_mirrored: Callable[..., QueuedStorage], run_drain: Callable[..., DrainStats]
) -> None:
    storage = make_mirrored()
    name = storage.save("a.txt", content())
    run_drain(keys=[storage.key])
    rows = PendingTransfer.objects.done().filter(storage_key=storage.key)

    waiting = clean_local_copies(rows)

    assert (waiting.removed, waiting.not_mirrored) == (0, 1)
    assert local_files(storage) == [name]
    run_drain()
    cleaned = clean_local_copies(rows)
    assert (cleaned.removed, cleaned.kept_in_doubt) == (1, 0)
    assert local_files(storage) == []
    assert read_bytes(storage, name) == b"hello world"


def test_clean_local_copies_checks_each_mirrors_copy(
    make_mirrored: Callable[..., QueuedStorage], run_drain: Callable[..., DrainStats]
) -> None:
    storage = make_mirrored()
    name = storage.save("a.txt", content())
    run_drain()
    mirror_of(storage).remote.delete(name)

    stats = clean_local_copies(PendingTransfer.objects.done())

    assert (stats.removed, stats.unverified) == (0, 1)
    assert local_files(storage) == [name]


def test_a_mirrors_purge_never_removes_the_local_copy_of_a_name_saved_again(
    make_mirrored: Callable[..., QueuedStorage], run_drain: Callable[..., DrainStats]
) -> None:
    """A re-save locks the primary's row, not the mirrors': the purge of a
    mirror's tombstone leaves the local copy to the primary's."""
    storage = make_mirrored(local_options={"allow_overwrite": True})
    mirror = mirror_of(storage)
    name = storage.save("a.txt", content("deleted"))
    run_drain()
    storage.delete(name)  # its purges never run: no after-commit work here
    assert storage.save(name, content("saved again")) == name
    tombstone = row_in(mirror, name)
    assert tombstone is not None and tombstone.deleted

    run_drain(keys=[mirror.key])

    assert row_in(mirror, name) is None
    assert mirrored_files(storage) == []
    assert read_bytes(storage, name) == b"saved again"
    run_drain()
    assert read_bytes(mirror.remote, name) == b"saved again"
    assert read_bytes(storage.remote, name) == b"saved again"


def test_a_batch_recorded_together_queues_every_mirror_copy_with_it(
    make_mirrored: Callable[..., QueuedStorage],
    django_capture_on_commit_callbacks: Any,
) -> None:
    storage = make_mirrored(names=("backup", "offsite"))
    names = [storage.save(f"f{i}.txt", content()) for i in range(3)]
    claimed = PendingTransfer.objects.filter(storage_key=storage.key).claim_due(
        limit=3, lease=300
    )
    verified = [transfer_row(row) for row in claimed]
    assert all(isinstance(item, Verified) for item in verified)

    with django_capture_on_commit_callbacks(execute=True):
        assert _complete_together(verified)  # type: ignore[arg-type]

    for mirror in storage.mirrors.values():
        copies = [row_in(mirror, name) for name in names]
        assert [c.status for c in copies] == [Status.QUEUED] * 3  # type: ignore[union-attr]
        assert [c.generation for c in copies] == [  # type: ignore[union-attr]
            row_in(storage, name).generation  # type: ignore[union-attr]
            for name in names
        ]
