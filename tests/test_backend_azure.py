"""QueuedAzureStorage against Azurite's blob service (from npm) on loopback."""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.core.files.base import ContentFile

from queued_storage import registry
from queued_storage.backends import QueuedAzureStorage
from queued_storage.models import PendingTransfer
from queued_storage.worker import drain
from tests.real_names import check_real_names
from tests.servers import azurite_blob, configure_storage
from tests.tools import require_module

pytestmark = pytest.mark.django_db

CONTAINER = "uploads"


@pytest.fixture(scope="module")
def connection_string() -> Iterator[str]:
    blob = require_module("azure.storage.blob")
    with azurite_blob() as connection:
        service = blob.BlobServiceClient.from_connection_string(connection)
        service.create_container(CONTAINER)
        yield connection


@pytest.fixture
def container(connection_string: str) -> Any:
    """The Azure SDK's own client for the container."""
    blob = require_module("azure.storage.blob")
    service = blob.BlobServiceClient.from_connection_string(connection_string)
    return service.get_container_client(CONTAINER)


@pytest.fixture
def azure_storage(
    connection_string: str, tmp_path: Path, settings: Any
) -> Iterator[QueuedAzureStorage]:
    """The README's STORAGES example, pointed at Azurite."""
    yield configure_storage(
        settings,
        tmp_path,
        QueuedAzureStorage,
        key="azure",
        remote_options={
            "connection_string": connection_string,
            "azure_container": CONTAINER,
            "expiration_secs": 3600,
        },
    )
    registry.forget("azure")


def blob_bytes(container: Any, name: str) -> bytes | None:
    blob = container.get_blob_client(name)
    if not blob.exists():
        return None
    return bytes(blob.download_blob().readall())


def test_azure_round_trip(
    azure_storage: QueuedAzureStorage,
    container: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    payload = os.urandom(600_000)
    name = azure_storage.save("invoices/2026/0001.pdf", ContentFile(payload))

    assert name == "invoices/2026/0001.pdf"
    assert azure_storage.url(name) == "/media/invoices/2026/0001.pdf"
    assert blob_bytes(container, name) is None

    stats = drain(keys=["azure"])

    row = PendingTransfer.objects.get(storage_key="azure", name=name)
    assert (stats.done, row.status) == (1, PendingTransfer.Status.DONE), row.last_error
    assert blob_bytes(container, name) == payload

    # A SAS URL on the blob endpoint, which Azurite serves without other auth.
    url = azure_storage.url(name)
    endpoint = container.url.rsplit(f"/{CONTAINER}", 1)[0]
    assert url.startswith(f"{endpoint}/{CONTAINER}/invoices/2026/0001.pdf?")
    assert "sig=" in urlsplit(url).query
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == payload
    with azure_storage.open(name) as opened:
        assert opened.read() == payload

    with django_capture_on_commit_callbacks(execute=True):
        azure_storage.delete(name)

    assert blob_bytes(container, name) is None
    assert not azure_storage.local.exists(name)
    assert not PendingTransfer.objects.filter(storage_key="azure").exists()


def test_azure_real_names(
    azure_storage: QueuedAzureStorage,
    container: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    check_real_names(
        azure_storage,
        lambda name: blob_bytes(container, name),
        django_capture_on_commit_callbacks,
    )
