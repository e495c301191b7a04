"""Any Django ``Storage`` as local or remote: ``InMemoryStorage`` as the local
side, ``STORAGES`` aliases for both, and a remote that cannot make URLs. (The
round trip through an ``InMemoryStorage`` or ``FileSystemStorage`` remote is
tests/test_backends.py's, with the other backends'.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import (
    FileSystemStorage,
    InMemoryStorage,
    Storage,
    storages,
)

from queued_storage import registry
from queued_storage.backends import QueuedFileSystemStorage, QueuedStorage
from queued_storage.models import PendingTransfer
from queued_storage.worker import drain
from tests.helpers import FS, deconstructed

pytestmark = pytest.mark.django_db

MEMORY = "django.core.files.storage.InMemoryStorage"


class NoURLStorage(FileSystemStorage):
    """A remote that cannot make URLs, like any ``Storage`` without ``url()``."""

    def url(self, name: str | None) -> str:
        return Storage.url(self, name)  # raises NotImplementedError


@pytest.fixture
def keys() -> Iterator[list[str]]:
    built: list[str] = []
    yield built
    for key in built:
        registry.forget(key)


def build(keys: list[str], key: str, **kwargs: Any) -> QueuedStorage:
    storage = QueuedStorage(key=key, **kwargs)
    keys.append(key)
    return storage


def status(storage: QueuedStorage, name: str) -> str:
    return PendingTransfer.objects.get(storage_key=storage.key, name=name).status


def test_in_memory_storage_as_local(
    keys: list[str], tmp_path: Path, django_capture_on_commit_callbacks: Any
) -> None:
    storage = build(
        keys,
        "memory-to-fs",
        local=MEMORY,
        remote=FS,
        local_options={"base_url": "/pending/"},
        remote_options={"location": str(tmp_path), "base_url": "https://cdn.example/"},
        task="queued_storage.tasks.TransferAndDelete",
    )
    name = storage.save("c.txt", ContentFile(b"from memory"))
    assert storage.url(name) == "/pending/c.txt"
    assert storage.local.exists(name)

    with django_capture_on_commit_callbacks(execute=True):
        drain(keys=[storage.key])

    assert status(storage, name) == "done"
    assert (tmp_path / name).read_bytes() == b"from memory"
    assert not storage.local.exists(name)  # TransferAndDelete, after the commit
    assert storage.url(name) == "https://cdn.example/c.txt"
    with storage.open(name) as opened:
        assert opened.read() == b"from memory"


def test_storages_aliases_on_both_sides(
    keys: list[str], settings: Any, django_capture_on_commit_callbacks: Any
) -> None:
    """local= and remote= name STORAGES entries, and the queued storage uses the
    very instances the rest of the site gets from ``storages[alias]``."""
    settings.STORAGES = {
        **settings.STORAGES,
        "scratch": {"BACKEND": MEMORY, "OPTIONS": {"base_url": "/scratch/"}},
        "archive": {
            "BACKEND": MEMORY,
            "OPTIONS": {"base_url": "https://archive.example/"},
        },
        "queued_archive": {
            "BACKEND": "queued_storage.backends.QueuedStorage",
            "OPTIONS": {"local": "scratch", "remote": "archive", "key": "aliases"},
        },
    }
    keys.append("aliases")
    storage = storages["queued_archive"]
    assert isinstance(storage, QueuedStorage)

    name = storage.save("d.txt", ContentFile(b"aliased"))

    assert isinstance(storages["scratch"], InMemoryStorage)
    with storages["scratch"].open(name) as local_copy:
        assert local_copy.read() == b"aliased"
    assert storage.url(name) == "/scratch/d.txt"

    drain(keys=["aliases"])

    with storages["archive"].open(name) as remote_copy:
        assert remote_copy.read() == b"aliased"
    assert storage.url(name) == "https://archive.example/d.txt"
    assert deconstructed(storage)[2] == {
        "local": "scratch",
        "remote": "archive",
        "key": "aliases",
    }

    with django_capture_on_commit_callbacks(execute=True):
        storage.delete(name)
    assert not storages["archive"].exists(name)
    assert not storages["scratch"].exists(name)


def test_remote_without_url_support(keys: list[str], tmp_path: Path) -> None:
    """url() is the local URL until the transfer is done, then whatever the
    remote's url() does: here the NotImplementedError of a Storage without
    one. Every other method keeps working."""
    storage = build(
        keys,
        "no-url",
        local=FS,
        remote="tests.test_backend_generic.NoURLStorage",
        local_options={"location": str(tmp_path / "local"), "base_url": "/media/"},
        remote_options={"location": str(tmp_path / "remote")},
    )
    name = storage.save("e.txt", ContentFile(b"no url"))
    assert storage.url(name) == "/media/e.txt"

    drain(keys=[storage.key])

    assert status(storage, name) == "done"
    with pytest.raises(NotImplementedError):
        storage.url(name)
    assert storage.exists(name)
    assert storage.size(name) == 6
    with storage.open(name) as opened:
        assert opened.read() == b"no url"


def test_migrations_freeze_the_public_paths(keys: list[str], tmp_path: Path) -> None:
    # A migration that froze a field's storage names the class where users import
    # it (queued_storage.backends), whichever module defines it: a path into the
    # package's insides would break those migrations when the insides move.
    local = {"location": str(tmp_path / "local")}
    remote = {"location": str(tmp_path / "remote")}
    plain = build(
        keys, "frozen", local=FS, remote=FS, local_options=local, remote_options=remote
    )
    convenience = QueuedFileSystemStorage(
        remote=FS, key="frozen-fs", local_options=local, remote_options=remote
    )
    keys.append(convenience.key)

    assert deconstructed(plain)[0] == "queued_storage.backends.QueuedStorage"
    assert deconstructed(convenience)[0] == (
        "queued_storage.backends.QueuedFileSystemStorage"
    )
