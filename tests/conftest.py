from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import Storage
from django.db import transaction

from queued_storage import adoption, registry
from queued_storage.backends import QueuedStorage
from queued_storage.models import PendingTransfer
from tests.storages import (
    GatedStorage,
    HangingStorage,
    PausingStorage,
    WindowStorage,
)

# The 0.8 site of tests/test_legacy08.py has settings and a test suite of its
# own, run in processes of their own.
collect_ignore = ["legacy08"]

FS = "django.core.files.storage.FileSystemStorage"
_keys = itertools.count()


@pytest.fixture
def tmp_media(tmp_path: Path, settings: Any) -> Path:
    """Point MEDIA_ROOT at a fresh directory for this test."""
    media = tmp_path / "media"
    media.mkdir()
    settings.MEDIA_ROOT = str(media)
    return media


@pytest.fixture(autouse=True)
def fresh_storages(tmp_path: Path, settings: Any) -> dict[str, Path]:
    """Every test gets empty local and remote directories behind the
    ``queued_local``/``queued_remote`` aliases the test models use."""
    local = tmp_path / "local"
    remote = tmp_path / "remote"
    storages = dict(settings.STORAGES)
    storages["queued_local"] = {
        "BACKEND": FS,
        "OPTIONS": {"location": str(local), "base_url": "/media/"},
    }
    storages["queued_remote"] = {
        "BACKEND": "tests.storages.CountingStorage",
        "OPTIONS": {"location": str(remote), "base_url": "https://remote.example/"},
    }
    settings.STORAGES = storages
    return {"local": local, "remote": remote}


@pytest.fixture(autouse=True)
def adopted_storages(request: pytest.FixtureRequest, monkeypatch: Any) -> None:
    """The tests' storages are new sites: each test's remote holds nothing from
    before the ledger, so every storage counts as adopted and no save asks its
    remote. Tests of the storage that is not adopted yet (a 0.8 site's) are marked
    ``not_adopted`` and see what the ledger says."""
    if request.node.get_closest_marker("not_adopted") is None:
        monkeypatch.setattr(adoption, "is_adopted", lambda db, key: True)


@pytest.fixture
def make_storage(tmp_path: Path) -> Iterator[Callable[..., QueuedStorage]]:
    """Build a QueuedStorage on two directories of this test, with a unique key.

    ``remote`` names a storage class (default: the counting FileSystemStorage); the
    test's storages get a directory of their own, any other gets ``remote_options``
    as given. ``local`` names the local storage's class, a FileSystemStorage.
    Other keyword arguments go to QueuedStorage."""
    built: list[str] = []

    def make(
        remote: str = "tests.storages.CountingStorage",
        remote_options: dict[str, Any] | None = None,
        local_options: dict[str, Any] | None = None,
        local: str = FS,
        **kwargs: Any,
    ) -> QueuedStorage:
        number = next(_keys)
        kwargs.setdefault("key", f"test-{number}")
        if remote.startswith("tests.storages.") or remote == FS:
            remote_options = {
                "location": str(tmp_path / f"remote{number}"),
                "base_url": "https://remote.example/",
                **(remote_options or {}),
            }
        storage = QueuedStorage(
            local,
            remote,
            local_options={
                "location": str(tmp_path / f"local{number}"),
                "base_url": "/media/",
                **(local_options or {}),
            },
            remote_options=remote_options,
            **kwargs,
        )
        built.append(storage.key)
        return storage

    yield make
    for key in built:
        registry.forget(key)
        adoption.forget(key)


@pytest.fixture
def storage(make_storage: Callable[..., QueuedStorage]) -> QueuedStorage:
    return make_storage()


@pytest.fixture
def window() -> Iterator[type[WindowStorage]]:
    """The local storage whose deletes a test hooks (``local=`` of make_storage)."""
    WindowStorage.before_delete = WindowStorage.after_delete = None
    yield WindowStorage
    WindowStorage.before_delete = WindowStorage.after_delete = None


@pytest.fixture
def gate() -> Iterator[type[GatedStorage]]:
    """A remote whose uploads wait until ``gate.gate.set()``."""
    GatedStorage.entered.clear()
    GatedStorage.gate.clear()
    yield GatedStorage
    GatedStorage.gate.set()


@pytest.fixture
def pausing() -> Iterator[type[PausingStorage]]:
    """A remote that pauses once in the call named by ``pausing.arm(method)``."""
    PausingStorage.arm("")
    yield PausingStorage
    PausingStorage.pause_in = ""
    PausingStorage.break_write_in = None
    PausingStorage.resume.set()


@pytest.fixture
def hanging() -> Iterator[type[HangingStorage]]:
    """A remote whose first upload of each name in ``hanging.hang`` hangs until
    ``hanging.released.set()``."""
    HangingStorage.hang = set()
    for event in (HangingStorage.entered, HangingStorage.released):
        event.clear()
    HangingStorage.returned.clear()
    HangingStorage.hanging = HangingStorage.most = 0
    yield HangingStorage
    HangingStorage.released.set()


def content(text: str = "hello world") -> ContentFile:
    return ContentFile(text.encode())


def read_bytes(storage: Storage, name: str) -> bytes:
    """The bytes ``storage.open(name)`` reads, the file closed again."""
    with storage.open(name) as opened:
        data: bytes = opened.read()
    return data


def row_of(storage: QueuedStorage, name: str) -> PendingTransfer:
    """The ledger row of ``name``, found as the package finds it: by the unique
    key (storage_key, name_hash), an exact match on the name's bytes."""
    return PendingTransfer.objects.for_name(storage.key, name).get()


def row_by_name_column(storage: QueuedStorage, name: str) -> PendingTransfer:
    """The ledger row whose ``name`` column equals ``name``. Unlike ``row_of`` it
    does not go through name_hash: the database compares the column itself, which
    is exact on every database (a binary collation on MariaDB)."""
    return PendingTransfer.objects.get(storage_key=storage.key, name=name)


def save_rolled_back(storage: QueuedStorage, capture_on_commit: Any) -> None:
    """Save a file in a transaction that the view's error rolls back, with the
    on-commit callbacks run as a request runs them; check that it left no row and
    no remote copy."""
    with (
        capture_on_commit(execute=True),
        pytest.raises(RuntimeError),
        transaction.atomic(),
    ):
        name = storage.save("draft.txt", content())
        raise RuntimeError("the view failed")
    assert not storage.remote.exists(name)
    assert not PendingTransfer.objects.filter(storage_key=storage.key).exists()
