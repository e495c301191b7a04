"""Reads of a storage with a serving mirror (a migration to a new remote): one
query reads the storage's row of a name and its mirror's; the name is served
from the mirror's remote once the mirror row is done and live at the storage's
generation, and from where the storage's own row says until
then. Storages without a serving mirror read as before: one row, one query."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.core.files.base import ContentFile
from django.db import connection
from django.test.utils import CaptureQueriesContext

from queued_storage import prefetch_files, prefetch_locations
from queued_storage.backends import QueuedStorage
from queued_storage.models import PendingTransfer
from queued_storage.worker import drain
from tests.helpers import NEW_URL, OLD_URL, read_bytes, row_of
from tests.testapp.models import Document

pytestmark = pytest.mark.django_db

Status = PendingTransfer.Status
OLD, NEW = OLD_URL, NEW_URL
Pair = tuple[QueuedStorage, QueuedStorage]


def saved_and_done(storage: QueuedStorage, name: str, payload: bytes) -> str:
    """Save ``name`` and transfer it to the storage's own remote."""
    stored = storage.save(name, ContentFile(payload))
    assert drain(keys=[storage.key]).done >= 1
    assert row_of(storage, stored).status == Status.DONE
    return stored


def copied(
    pair: Pair,
    name: str,
    payload: bytes,
    *,
    status: str = Status.DONE,
    generation: int | None = None,
    deleted: bool = False,
) -> None:
    """The mirror's copy of ``name`` and its row, as a backfill and a mirror worker
    leave them: the object on the new remote, the row at the storage's generation
    (or ``generation``)."""
    storage, mirror = pair
    mirror.remote.save(name, ContentFile(payload))
    primary = PendingTransfer.objects.for_name(storage.key, name).first()
    # In place of the row the storage's done queued for the mirror.
    PendingTransfer.objects.for_name(mirror.key, name).delete()
    PendingTransfer.objects.create(
        storage_key=mirror.key,
        name=name,
        status=status,
        generation=generation if generation is not None else primary.generation,  # type: ignore[union-attr]
        size=len(payload),
        deleted=deleted,
    )


def served_by(storage: QueuedStorage, name: str) -> str:
    """Where ``url()`` points: "local", "old" or "new"."""
    url = storage.url(name)
    for label, base in (("local", "/media/"), ("old", OLD), ("new", NEW)):
        if url.startswith(base):
            return label
    raise AssertionError(url)


def test_a_file_is_served_from_the_new_remote_once_its_mirror_row_is_done(
    migrating: Pair, django_assert_num_queries: Any
) -> None:
    storage, mirror = migrating
    name = saved_and_done(storage, "a.txt", b"old bytes")
    assert served_by(storage, name) == "old"

    copied(migrating, name, b"new bytes")  # not the same bytes: where they come from

    with django_assert_num_queries(1):
        assert storage.url(name) == f"{NEW}a.txt"
    with django_assert_num_queries(1), storage.open(name) as handle:
        assert handle.read() == b"new bytes"
    with django_assert_num_queries(1):
        assert storage.exists(name)
    with django_assert_num_queries(1):
        assert storage.size(name) == len(b"new bytes")
    assert storage.path(name) == mirror.remote.path(name)
    assert storage.get_storage(name) is mirror.remote
    assert storage.using_remote(name) and not storage.using_local(name)
    assert storage.get_modified_time(name) == mirror.remote.get_modified_time(name)


@pytest.mark.parametrize(
    "status", [Status.QUEUED, Status.TRANSFERRING, Status.FAILED, Status.HELD]
)
def test_a_mirror_row_not_done_leaves_the_file_where_the_storage_serves_it(
    migrating: Pair, status: str
) -> None:
    storage, _mirror = migrating
    name = saved_and_done(storage, "a.txt", b"old bytes")
    copied(migrating, name, b"new bytes", status=status)

    assert served_by(storage, name) == "old"
    assert read_bytes(storage, name) == b"old bytes"


def test_a_re_saved_file_is_served_locally_until_the_storage_has_it_again(
    migrating: Pair,
) -> None:
    storage, _mirror = migrating
    name = saved_and_done(storage, "a.txt", b"first")
    copied(migrating, name, b"first")
    assert served_by(storage, name) == "new"

    storage.save(name, ContentFile(b"second"))  # a newer generation than the mirror's

    assert served_by(storage, name) == "local"
    assert read_bytes(storage, name) == b"second"
    assert storage.size(name) == len(b"second")
    drain(keys=[storage.key])
    assert served_by(storage, name) == "old"  # the mirror has the first version only
    assert read_bytes(storage, name) == b"second"


def test_a_mirror_row_at_another_generation_does_not_serve(migrating: Pair) -> None:
    # Not even a newer one: a re-save on a host whose clock is behind has a
    # smaller generation than the copy (see test_mirror_attacks).
    storage, _mirror = migrating
    name = saved_and_done(storage, "a.txt", b"bytes")
    copied(migrating, name, b"bytes", generation=row_of(storage, name).generation + 1)

    assert served_by(storage, name) == "old"


def test_a_deleted_mirror_row_does_not_serve(migrating: Pair) -> None:
    storage, _mirror = migrating
    name = saved_and_done(storage, "a.txt", b"old bytes")
    copied(migrating, name, b"new bytes", deleted=True)

    assert served_by(storage, name) == "old"
    assert read_bytes(storage, name) == b"old bytes"


def test_a_tombstone_of_the_storage_hides_the_file_whatever_the_mirror_says(
    migrating: Pair,
) -> None:
    storage, _mirror = migrating
    name = saved_and_done(storage, "a.txt", b"bytes")
    copied(migrating, name, b"bytes")
    # As if the mirror row had escaped the delete's tombstone (it never does):
    # and at a generation newer than the tombstone's.
    PendingTransfer.objects.record_delete(storage.key, name)
    PendingTransfer.objects.filter(storage_key=_mirror.key).update(
        generation=row_of(storage, name).generation + 1
    )

    assert not storage.exists(name)
    with pytest.raises(FileNotFoundError):
        storage.open(name)
    with pytest.raises(FileNotFoundError):
        storage.size(name)


def test_a_mirror_row_without_a_row_of_the_storage_serves(migrating: Pair) -> None:
    storage, mirror = migrating
    mirror.remote.save("only-new.txt", ContentFile(b"new"))
    PendingTransfer.objects.create(
        storage_key=mirror.key, name="only-new.txt", status=Status.DONE, size=3
    )

    assert served_by(storage, "only-new.txt") == "new"
    assert storage.exists("only-new.txt")
    assert read_bytes(storage, "only-new.txt") == b"new"


def test_a_name_without_rows_is_served_as_without_a_mirror(migrating: Pair) -> None:
    storage, _mirror = migrating
    storage.local.save("stray.txt", ContentFile(b"stray"))

    assert served_by(storage, "stray.txt") == "local"
    assert not storage.exists("nothing.txt")


def test_an_open_that_finds_the_local_copy_gone_reads_where_the_rows_say_now(
    migrating: Pair,
) -> None:
    storage, _mirror = migrating
    name = storage.save("a.txt", ContentFile(b"bytes"))
    with prefetch_locations(storage, [name]):  # read while the row was queued
        drain(keys=[storage.key])
        copied(migrating, name, b"new bytes")
        storage.local.delete(name)  # as TransferAndDelete does once both are done

        assert read_bytes(storage, name) == b"new bytes"


def test_one_query_reads_ahead_both_rows_of_a_page_of_names(
    migrating: Pair, django_assert_num_queries: Any
) -> None:
    storage, _mirror = migrating
    names = [saved_and_done(storage, f"f{i}.txt", b"x") for i in range(6)]
    for name in names[:3]:
        copied(migrating, name, b"x")
    storage.save(names[5], ContentFile(b"newer"))  # newer than its mirror copy
    copied(migrating, names[5], b"x", generation=1)
    expected = [served_by(storage, name) for name in names]
    assert expected == ["new", "new", "new", "old", "old", "local"]

    with (
        django_assert_num_queries(1),
        prefetch_locations(storage, [*names, "never-saved.txt"]),
    ):
        assert [served_by(storage, name) for name in names] == expected
        assert all(storage.exists(name) for name in names)
        assert storage.size(names[5]) == len(b"newer")


def test_prefetch_files_reads_both_rows_once(
    migrating: Pair,
    monkeypatch: pytest.MonkeyPatch,
    django_assert_num_queries: Any,
) -> None:
    storage, _mirror = migrating
    field = Document._meta.get_field("file")
    monkeypatch.setattr(field, "storage", storage)
    names = [saved_and_done(storage, f"d{i}.txt", b"x") for i in range(4)]
    copied(migrating, names[0], b"x")
    documents = [Document(file=name) for name in names]

    with django_assert_num_queries(1), prefetch_files(documents):
        urls = [document.file.url for document in documents]

    assert urls == [f"{NEW}d0.txt", f"{OLD}d1.txt", f"{OLD}d2.txt", f"{OLD}d3.txt"]


def test_a_storage_without_a_serving_mirror_reads_its_own_row_only(
    make_storage: Callable[..., QueuedStorage],
) -> None:
    storage = make_storage()
    name = saved_and_done(storage, "a.txt", b"bytes")

    with CaptureQueriesContext(connection) as captured:
        storage.url(name)

    [query] = captured.captured_queries
    assert " IN " not in query["sql"].upper()
    assert "generation" not in query["sql"]
