from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from queued_storage import adoption, registry
from queued_storage.backends import QueuedStorage
from queued_storage.worker import DrainStats, drain
from tests.helpers import FS, S3, storages_for
from tests.s3 import S3_OPTIONS, make_bucket, moto_s3_server
from tests.storages import (
    GatedStorage,
    HangingStorage,
    PausingStorage,
    WindowStorage,
)

# The 0.8 site of tests/test_legacy08.py has settings and a test suite of its
# own, run in processes of their own.
collect_ignore = ["legacy08"]

_keys = itertools.count()


@pytest.fixture
def tmp_media(tmp_path: Path, settings: Any) -> Path:
    """Point MEDIA_ROOT at a fresh directory for this test."""
    media = tmp_path / "media"
    media.mkdir()
    settings.MEDIA_ROOT = str(media)
    return media


@pytest.fixture(autouse=True)
def fresh_storages(
    request: pytest.FixtureRequest, tmp_path: Path, settings: Any
) -> dict[str, Path]:
    """Every test gets empty local and remote directories behind the
    ``queued_local``/``queued_remote`` aliases the test models use. A module
    whose worker process runs for the whole module (tests/test_celery.py) asks
    for a module-scoped ``shared_dirs`` fixture: its directories are used."""
    if "shared_dirs" in request.fixturenames:
        dirs: dict[str, Path] = request.getfixturevalue("shared_dirs")
    else:
        dirs = {"local": tmp_path / "local", "remote": tmp_path / "remote"}
    settings.STORAGES = storages_for(dirs, settings.STORAGES)
    return dirs


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


@pytest.fixture
def forget_keys() -> Iterator[list[str]]:
    """Keys of storages a test builds by hand; dropped from the registry after."""
    keys: list[str] = []
    yield keys
    for key in keys:
        registry.forget(key)


@pytest.fixture
def run_drain(django_capture_on_commit_callbacks: Any) -> Callable[..., DrainStats]:
    """drain(), with the after-commit work (signals, local delete) run as it
    would be outside the test's transaction."""

    def run(**kwargs: Any) -> DrainStats:
        with django_capture_on_commit_callbacks(execute=True):
            return drain(**kwargs)

    return run


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """An S3 API over HTTP on loopback (moto), one for each test module."""
    with moto_s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def make_s3_storage(
    s3_endpoint: str, make_storage: Callable[..., QueuedStorage]
) -> Callable[..., QueuedStorage]:
    """make_storage() with an S3Storage remote on a new bucket of ``s3_endpoint``;
    ``remote_options`` are added to the bucket's."""

    def make(**kwargs: Any) -> QueuedStorage:
        remote_options = {
            **S3_OPTIONS,
            "bucket_name": make_bucket(s3_endpoint),
            "endpoint_url": s3_endpoint,
            **kwargs.pop("remote_options", {}),
        }
        return make_storage(remote=S3, remote_options=remote_options, **kwargs)

    return make
