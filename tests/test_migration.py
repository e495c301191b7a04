"""A migration's progress, read from the ledger: the storage's live files, those
verified on the new remote (its serving mirror's row done and live at the
storage's generation or a newer one), and why each other one is not yet; ready to
switch only when every live file is verified."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.utils.html import strip_tags

from queued_storage.backends import QueuedStorage
from queued_storage.migration import (
    MigrationProgress,
    progress,
    switch_arguments,
    switch_configuration,
)
from queued_storage.models import PendingTransfer
from queued_storage.worker import drain
from tests.factories import pending_row
from tests.helpers import content, row_of

pytestmark = pytest.mark.django_db

Status = PendingTransfer.Status
KEY, NEW = "media", "media-new"
DASHBOARD = "/admin/queued_storage/transferdashboard/"


def file(
    name: str,
    status: str = Status.DONE,
    *,
    mirror: str | None = None,
    size: int = 100,
    generation: int = 7,
    mirror_generation: int | None = None,
    deleted: bool = False,
    mirror_deleted: bool = False,
) -> None:
    """The storage's row of ``name`` and, with ``mirror`` (its status), its
    mirror's."""
    pending_row(
        storage_key=KEY,
        name=name,
        status=status,
        size=size,
        generation=generation,
        deleted=deleted,
    )
    if mirror is not None:
        pending_row(
            storage_key=NEW,
            name=name,
            status=mirror,
            size=size,
            generation=generation if mirror_generation is None else mirror_generation,
            deleted=mirror_deleted,
        )


def test_each_live_file_counts_as_verified_or_once_for_why_not() -> None:
    file("verified", mirror=Status.DONE, size=1000)
    # A newer generation is another version too (a clock behind, see
    # test_mirror_attacks): the backfill queues the copy again.
    file("newer on the mirror", mirror=Status.DONE, mirror_generation=8, size=24)
    file("queued", mirror=Status.QUEUED)
    file("transferring", mirror=Status.TRANSFERRING)
    file("held", mirror=Status.HELD)
    file("failed", mirror=Status.FAILED)
    file("saved, not on the old remote yet", Status.QUEUED)
    file("failing on the old remote", Status.FAILED)
    file("held by a delayed storage", Status.HELD)
    file("not backfilled")
    file("an older copy", mirror=Status.DONE, mirror_generation=6)
    file("mirror row deleted", mirror=Status.DONE, mirror_deleted=True)
    file("deleted", mirror=Status.DONE, deleted=True)
    file("deleted, no mirror row", Status.QUEUED, deleted=True)
    pending_row(storage_key=NEW, name="only on the mirror", status=Status.DONE)
    pending_row(storage_key="another", name="verified", status=Status.QUEUED)

    found = progress(KEY, NEW)

    assert found == MigrationProgress(
        key=KEY,
        mirror_key=NEW,
        files=12,
        bytes=10 * 100 + 1000 + 24,
        verified_files=1,
        verified_bytes=1000,
        copying=3,
        failed=1,
        on_its_way=1,
        blocked=2,
        missing=4,
    )
    assert not found.ready
    assert found.in_motion
    assert found.attention == 3
    assert found.line() == "1 of 12 files verified on media-new (1000 B of 2.0 KiB)"


def test_ready_when_every_live_file_is_verified() -> None:
    for number in range(3):
        file(f"f{number}", mirror=Status.DONE)
    file("gone", Status.QUEUED, deleted=True)

    found = progress(KEY, NEW)

    assert found.ready and not found.in_motion
    assert (found.files, found.verified_files) == (3, 3)
    assert found.as_dict()["ready"] is True


def test_an_empty_storage_is_ready() -> None:
    found = progress(KEY, NEW)
    assert found.ready
    assert (found.files, found.bytes) == (0, 0)


def test_failed_copies_alone_are_not_in_motion() -> None:
    file("a", mirror=Status.DONE)
    file("b", mirror=Status.FAILED)

    found = progress(KEY, NEW)

    assert not found.ready and not found.in_motion


def test_the_switch_configuration_quotes_no_option(
    make_storage: Callable[..., QueuedStorage],
) -> None:
    storage = make_storage(
        task="queued_storage.tasks.TransferAndDelete", verify_checksum=True
    )
    mirror = make_storage(
        remote="storages.backends.s3.S3Storage",
        remote_options={"bucket_name": "new", "secret_key": "s3cr3t"},
        key="media-new",
    )

    arguments = switch_arguments(storage, mirror)
    text = switch_configuration(storage, mirror)

    assert arguments["remote"] == "'storages.backends.s3.S3Storage'"
    assert arguments["key"] == "'media-new'"
    assert arguments["task"] == "'queued_storage.tasks.TransferAndDelete'"
    assert arguments["verify_checksum"] == "True"
    assert "s3cr3t" not in text and "bucket_name" not in text
    assert text.startswith("queued_storage.backends.QueuedStorage(\n")
    assert "    remote_options=...,  # the mirror's options\n" in text
    assert text.endswith("\n)")


def test_the_dashboard_shows_a_migrations_progress(
    migrating: tuple[QueuedStorage, QueuedStorage], admin_client: Any
) -> None:
    storage, mirror = migrating
    names = [storage.save(f"f{i}.txt", content("x")) for i in range(3)]
    drain(keys=[storage.key])
    # In place of the rows the storage's done queued for the mirror.
    PendingTransfer.objects.filter(storage_key=mirror.key).delete()
    for name in names[:2]:
        pending_row(
            storage_key=mirror.key,
            name=name,
            status=Status.DONE,
            generation=row_of(storage, name).generation,
        )
    pending_row(
        storage_key=mirror.key,
        name=names[2],
        status=Status.FAILED,
        generation=row_of(storage, names[2]).generation,
    )

    html = admin_client.get(DASHBOARD).content.decode()

    text = " ".join(strip_tags(html).split())
    assert f"Migrating to {mirror.key}: 2 of 3 files verified. 1 copy failed." in text
    assert text.count("Migrating to") == 1  # the mirror's own rows are no migration

    PendingTransfer.objects.filter(storage_key=mirror.key).update(status=Status.DONE)
    text = " ".join(strip_tags(admin_client.get(DASHBOARD).content.decode()).split())
    assert f"Migrating to {mirror.key}: 3 of 3 files verified. Ready to switch" in text
