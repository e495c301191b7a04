"""Red team: the purge of a tombstone's local copy (tombstones._purge_local_copy)
that locks the other same-place keys' rows of the name and takes an uncommitted
slot row for a saving key with none. Hosts of the old and the switched
configuration share one local directory (test_redteam_migrate's Hosts); each
break is a strict xfail."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.files.base import ContentFile

from queued_storage import saving
from queued_storage.models import PendingTransfer
from queued_storage.worker import drain
from tests.helpers import read_bytes, row_of
from tests.test_redteam_finish_carry import drain_new
from tests.test_redteam_migrate import (  # noqa: F401 (hosts: the fixture)
    NEW_KEY,
    OLD_KEY,
    Hosts,
    hosts,
    migrated,
)

pytestmark = pytest.mark.django_db

Status = PendingTransfer.Status
LARGE = saving.SMALL_FILE + 1


def late_tombstone(name: str) -> None:
    """The tombstone a late old worker leaves for ``name`` (no row of it)."""
    assert PendingTransfer.objects.leave_tombstone(
        OLD_KEY, name, PendingTransfer.hosts_here()[0]
    )


def purge_on_an_old_host(hosts: Hosts) -> None:  # noqa: F811
    """An old host's worker purges the old key's tombstones, then this process
    is a switched host again."""
    hosts.run_old()
    drain(keys=[OLD_KEY])
    hosts.run_new()


@pytest.mark.xfail(
    strict=True,
    reason="a large save writes its file before its row: the purge's slot is "
    "taken after the write and before the insert, the purge deletes the file "
    "and the save raises FileNotFoundError (local.size) to the user",
)
def test_a_late_purge_just_after_a_large_first_saves_write_keeps_the_file(
    hosts: Hosts,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    migrated(hosts)
    new = hosts.run_new()
    name = "large-first-save.bin"
    late_tombstone(name)
    data = b"L" * LARGE
    write = new.local._save  # type: ignore[attr-defined]
    purged: list[str] = []

    def written_then_purged(saved: str, body: Any) -> str:
        stored: str = write(saved, body)
        if not purged:  # the old worker purges between the file and the row
            purged.append(stored)
            purge_on_an_old_host(hosts)
        return stored

    monkeypatch.setattr(new.local, "_save", written_then_purged)
    assert new.save(name, ContentFile(data)) == name
    assert purged == [name]
    assert not PendingTransfer.objects.filter(storage_key=OLD_KEY, name=name)
    assert new.exists(name)
    assert read_bytes(new, name) == data
    drain_new(hosts)
    assert read_bytes(new.remote, name) == data


@pytest.mark.xfail(
    strict=True,
    reason="a large save writes its file before its row: a purge between the "
    "save's size read and its insert deletes the file; the save returns, its "
    "row is queued and its file is gone (lost; the transfer cannot send it)",
)
def test_a_late_purge_just_before_a_large_first_saves_row_keeps_the_file(
    hosts: Hosts,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    migrated(hosts)
    new = hosts.run_new()
    name = "large-first-save-returned.bin"
    late_tombstone(name)
    data = b"R" * LARGE
    checksum = saving._checksum
    purged: list[str] = []

    def purged_before_the_row(
        storage: Any, hashing: Any, stored: str, size: int
    ) -> str:
        if not purged:  # the file is written and sized; its row is next
            purged.append(stored)
            purge_on_an_old_host(hosts)
        return checksum(storage, hashing, stored, size)

    monkeypatch.setattr(saving, "_checksum", purged_before_the_row)
    assert new.save(name, ContentFile(data)) == name
    assert purged == [name]
    assert row_of(new, name).status == Status.QUEUED
    assert new.exists(name)  # the row serves the local copy
    assert read_bytes(new, name) == data
    drain_new(hosts)
    assert read_bytes(new.remote, name) == data
