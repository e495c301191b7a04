"""QueuedGoogleCloudStorage against a GCS JSON-API emulator (gcp-storage-emulator,
from PyPI) on loopback. google-cloud-storage finds it through
``STORAGE_EMULATOR_HOST`` and then uses anonymous credentials."""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.files.base import ContentFile

from queued_storage import registry
from queued_storage.backends import QueuedGoogleCloudStorage
from queued_storage.models import PendingTransfer
from queued_storage.worker import drain
from tests.real_names import check_real_names
from tests.servers import configure_storage, gcs_emulator
from tests.tools import require_module

pytestmark = pytest.mark.django_db

BUCKET = "uploads"
PROJECT = "queued-storage-test"


@pytest.fixture(scope="module")
def emulator() -> Iterator[str]:
    with gcs_emulator() as endpoint:
        yield endpoint


@pytest.fixture
def bucket(emulator: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """google-cloud-storage's own client for a fresh bucket."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator)
    gcs = require_module("google.cloud.storage")
    client = gcs.Client(project=PROJECT)
    found = client.lookup_bucket(BUCKET)
    if found is not None:
        found.delete(force=True)
    return client.create_bucket(BUCKET)


@pytest.fixture
def gcs_storage(
    bucket: Any, tmp_path: Path, settings: Any
) -> Iterator[QueuedGoogleCloudStorage]:
    """The README's STORAGES example, pointed at the emulator."""
    yield configure_storage(
        settings,
        tmp_path,
        QueuedGoogleCloudStorage,
        key="gcs",
        remote_options={
            "bucket_name": BUCKET,
            "project_id": PROJECT,
            "querystring_auth": False,
        },
    )
    registry.forget("gcs")


def blob_bytes(bucket: Any, name: str) -> bytes | None:
    blob = bucket.get_blob(name)
    return None if blob is None else bytes(blob.download_as_bytes())


def test_gcs_round_trip(
    gcs_storage: QueuedGoogleCloudStorage,
    bucket: Any,
    emulator: str,
    django_capture_on_commit_callbacks: Any,
) -> None:
    payload = os.urandom(400_000)
    name = gcs_storage.save("exports/2026/report.csv", ContentFile(payload))

    assert name == "exports/2026/report.csv"
    assert gcs_storage.url(name) == "/media/exports/2026/report.csv"
    assert blob_bytes(bucket, name) is None

    stats = drain(keys=["gcs"])

    row = PendingTransfer.objects.get(storage_key="gcs", name=name)
    assert (stats.done, row.status) == (1, PendingTransfer.Status.DONE), row.last_error
    assert blob_bytes(bucket, name) == payload

    url = gcs_storage.url(name)
    assert url == f"{emulator}/{BUCKET}/exports/2026/report.csv"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == payload
    with gcs_storage.open(name) as opened:
        assert opened.read() == payload

    with django_capture_on_commit_callbacks(execute=True):
        gcs_storage.delete(name)

    assert blob_bytes(bucket, name) is None
    assert not gcs_storage.local.exists(name)
    assert not PendingTransfer.objects.filter(storage_key="gcs").exists()


def test_gcs_real_names(
    gcs_storage: QueuedGoogleCloudStorage,
    bucket: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    check_real_names(
        gcs_storage,
        lambda name: blob_bytes(bucket, name),
        django_capture_on_commit_callbacks,
    )
