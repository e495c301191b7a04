"""QueuedLibCloudStorage through Apache Libcloud's own ``LOCAL`` storage driver,
which keeps containers as directories: no server, but libcloud's real driver
code moves the bytes. (Libcloud's cloud drivers are the ones the S3, Azure and
GCS tests cover through django-storages' native backends.)"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.files.base import ContentFile

from queued_storage import registry
from queued_storage.backends import QueuedLibCloudStorage
from queued_storage.models import PendingTransfer
from queued_storage.worker import drain
from tests.real_names import check_real_names
from tests.servers import configure_storage
from tests.tools import require_module

pytestmark = pytest.mark.django_db

CONTAINER = "uploads"


@pytest.fixture
def driver_root(tmp_path: Path) -> Path:
    require_module("fasteners")  # the LOCAL driver's locking
    root = tmp_path / "libcloud"
    (root / CONTAINER).mkdir(parents=True)
    return root


@pytest.fixture
def libcloud_storage(
    driver_root: Path, tmp_path: Path, settings: Any
) -> Iterator[QueuedLibCloudStorage]:
    """The README's example: providers in LIBCLOUD_PROVIDERS, the name in
    remote_options."""
    settings.LIBCLOUD_PROVIDERS = {
        "local": {
            "type": "libcloud.storage.types.Provider.LOCAL",
            "user": str(driver_root),
            "key": None,
            "bucket": CONTAINER,
        }
    }
    yield configure_storage(
        settings,
        tmp_path,
        QueuedLibCloudStorage,
        key="libcloud",
        remote_options={"provider_name": "local"},
    )
    registry.forget("libcloud")


def test_libcloud_round_trip(
    libcloud_storage: QueuedLibCloudStorage,
    driver_root: Path,
    django_capture_on_commit_callbacks: Any,
) -> None:
    from libcloud.storage.providers import Provider, get_driver

    driver = get_driver(Provider.LOCAL)(str(driver_root))
    payload = os.urandom(100_000)
    name = libcloud_storage.save("docs/manual.bin", ContentFile(payload))

    assert libcloud_storage.url(name) == "/media/docs/manual.bin"
    assert driver.list_container_objects(driver.get_container(CONTAINER)) == []

    stats = drain(keys=["libcloud"])

    row = PendingTransfer.objects.get(storage_key="libcloud", name=name)
    assert (stats.done, row.status) == (1, PendingTransfer.Status.DONE), row.last_error
    stored = driver.get_object(CONTAINER, name)
    assert b"".join(driver.download_object_as_stream(stored)) == payload
    # The LOCAL driver's "CDN URL" is the object's path on disk.
    assert libcloud_storage.url(name) == str(driver_root / CONTAINER / name)
    with libcloud_storage.open(name) as opened:
        assert opened.read() == payload

    with django_capture_on_commit_callbacks(execute=True):
        libcloud_storage.delete(name)

    assert driver.list_container_objects(driver.get_container(CONTAINER)) == []
    assert not libcloud_storage.local.exists(name)
    assert not PendingTransfer.objects.filter(storage_key="libcloud").exists()


def test_libcloud_real_names(
    libcloud_storage: QueuedLibCloudStorage,
    driver_root: Path,
    django_capture_on_commit_callbacks: Any,
) -> None:
    from libcloud.storage.providers import Provider, get_driver
    from libcloud.storage.types import ObjectDoesNotExistError

    driver = get_driver(Provider.LOCAL)(str(driver_root))

    def read_remote(name: str) -> bytes | None:
        try:
            stored = driver.get_object(CONTAINER, name)
        except ObjectDoesNotExistError:
            return None
        return b"".join(driver.download_object_as_stream(stored))

    check_real_names(libcloud_storage, read_remote, django_capture_on_commit_callbacks)
