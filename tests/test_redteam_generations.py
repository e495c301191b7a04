"""Red-team attacks on generations, mirror places and reads racing a worker (see
REDTEAM.md). Each break is kept as a strict xfail that names it; each window
between a check and an act is opened with a monkeypatched function, never a
sleep."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.files.base import ContentFile

from queued_storage.backends import QueuedStorage
from queued_storage.models import PendingTransfer
from queued_storage.worker import drain
from tests.helpers import NEW_URL, GenerationClock, read_bytes, row_of

Status = PendingTransfer.Status
Pair = tuple[QueuedStorage, QueuedStorage]
FS = "django.core.files.storage.FileSystemStorage"
S3 = "storages.backends.s3.S3Storage"
HOUR = 3600 * 10**9


def with_mirror(
    tmp_path: Path, remote: dict[str, Any], mirror: dict[str, Any], **kwargs: Any
) -> QueuedStorage:
    return QueuedStorage(
        local=FS,
        remote=kwargs.pop("remote_class", FS),
        local_options={"location": str(tmp_path / "local")},
        remote_options=remote,
        key=kwargs.pop("key", "redteam-places"),
        mirrors={
            "same": {"storage": kwargs.pop("mirror_class", FS), "options": mirror}
        },
        **kwargs,
    )


# Places: a mirror that writes where the remote writes.


def test_a_mirror_in_the_remotes_directory_under_another_url_is_refused(
    tmp_path: Path,
) -> None:
    remote = str(tmp_path / "remote")
    with pytest.raises(ImproperlyConfigured, match="is the remote storage itself"):
        with_mirror(
            tmp_path,
            {"location": remote, "base_url": "https://old.example/"},
            {"location": remote, "base_url": "https://cdn.example/"},
        )


def test_a_mirror_of_the_remotes_bucket_under_another_domain_is_refused(
    tmp_path: Path,
) -> None:
    bucket = {"bucket_name": "media-bucket", "location": "media"}
    with pytest.raises(ImproperlyConfigured, match="is the remote storage itself"):
        with_mirror(
            tmp_path,
            bucket,
            {**bucket, "custom_domain": "cdn.example"},
            remote_class=S3,
            mirror_class=S3,
        )


def test_a_mirror_naming_the_bucket_the_remote_takes_from_settings_is_refused(
    tmp_path: Path, settings: Any
) -> None:
    settings.AWS_STORAGE_BUCKET_NAME = "media-bucket"
    with pytest.raises(ImproperlyConfigured, match="is the remote storage itself"):
        with_mirror(
            tmp_path,
            {},
            {"bucket_name": "media-bucket"},
            remote_class=S3,
            mirror_class=S3,
        )


def test_a_mirror_of_the_remotes_bucket_with_a_trailing_slash_is_refused(
    tmp_path: Path,
) -> None:
    """Held: ``media/`` and ``media//`` are ``media``."""
    bucket = {"bucket_name": "media-bucket", "location": "media"}
    with pytest.raises(ImproperlyConfigured, match="is the remote storage itself"):
        with_mirror(
            tmp_path,
            bucket,
            {**bucket, "location": "media//"},
            remote_class=S3,
            mirror_class=S3,
        )


def test_a_mirror_of_an_empty_location_is_the_working_directory(
    tmp_path: Path, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.MEDIA_ROOT = str(tmp_path / "media")
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    with pytest.raises(ImproperlyConfigured, match="is the remote storage itself"):
        with_mirror(tmp_path, {"location": ""}, {"location": str(here)})


def test_a_mirror_in_the_directory_of_a_file_system_subclass_is_refused(
    tmp_path: Path,
) -> None:
    remote = str(tmp_path / "remote")
    with pytest.raises(ImproperlyConfigured, match="is the remote storage itself"):
        with_mirror(
            tmp_path,
            {"location": remote},
            {"location": remote},
            remote_class="tests.storages.CountingStorage",
        )


# Generations: transfer() sees no row, a save inserts one, transfer() upserts.


def race_transfer(
    storage: QueuedStorage,
    name: str,
    monkeypatch: pytest.MonkeyPatch,
    meanwhile: Any,
) -> bool:
    """``transfer(name)`` of a local file the ledger never saw, with
    ``meanwhile()`` run after it found no row and before it writes its own;
    whether it queued."""
    storage.local.save(name, ContentFile(b"left by 0.8"))
    checked = storage._local_file

    def window(name: str) -> bool:
        found = checked(name)
        meanwhile()
        return found

    monkeypatch.setattr(storage, "_local_file", window)
    return storage.transfer(name)


@pytest.mark.django_db
def test_transfer_racing_a_save_keeps_the_lease_and_raises_the_generation(
    make_storage: Any,
    generation_clock: GenerationClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage = make_storage(local_options={"allow_overwrite": True})
    name = "a.txt"
    claimed: list[PendingTransfer] = []

    def another_host_saves_and_its_worker_claims() -> None:
        generation_clock.another_host(behind=-HOUR)  # its clock is an hour ahead
        assert storage.save(name, ContentFile(b"another host's")) == name
        claimed.extend(
            PendingTransfer.objects.filter(storage_key=storage.key).claim_due(
                limit=1, lease=300
            )
        )
        generation_clock.another_host(behind=0)

    assert race_transfer(
        storage, name, monkeypatch, another_host_saves_and_its_worker_claims
    )
    [lease] = claimed
    row = row_of(storage, name)
    assert row.generation > lease.generation
    assert (row.status, row.lease_token) == (Status.TRANSFERRING, lease.lease_token)


@pytest.mark.django_db
def test_transfer_racing_saves_in_one_tick_never_serves_the_mirrors_old_copy(
    migrating: Pair,
    generation_clock: GenerationClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage, mirror = migrating
    name = "b.txt"
    generation_clock.freeze()  # a coarse tick: every process reads one value

    def another_process_saves_twice() -> None:
        generation_clock.another_host(behind=0)
        assert storage.save(name, ContentFile(b"first")) == name
        drain(keys=[storage.key])
        drain(keys=[mirror.key])
        assert row_of(mirror, name).status == Status.DONE
        assert storage.save(name, ContentFile(b"second!")) == name
        # This process's generations start again from the tick.
        generation_clock.another_host(behind=0)

    assert race_transfer(storage, name, monkeypatch, another_process_saves_twice)
    assert read_bytes(storage, name) == b"second!"
    assert not storage.url(name).startswith(NEW_URL)
    assert row_of(storage, name).generation != row_of(mirror, name).generation


@pytest.mark.django_db
def test_transfer_racing_a_delete_leaves_the_name_deleted(
    make_storage: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = make_storage()
    name = "c.txt"
    # The delete came first: its tombstone stays, and nothing is queued.
    assert not race_transfer(storage, name, monkeypatch, lambda: storage.delete(name))
    assert row_of(storage, name).deleted
    assert not storage.exists(name)
