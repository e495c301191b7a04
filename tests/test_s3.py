"""The whole path against a real S3 API over HTTP: moto's server on loopback."""

from __future__ import annotations

import hashlib
import os
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.core.files.base import ContentFile

from queued_storage.backends import QueuedS3Storage, QueuedStorage
from queued_storage.models import PendingTransfer
from queued_storage.transfer import drain
from tests.s3 import S3_OPTIONS, make_bucket, moto_s3_server, s3_client

pytestmark = pytest.mark.django_db


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_storage(
    s3_endpoint: str, make_storage: Callable[..., QueuedStorage]
) -> QueuedStorage:
    return make_storage(
        remote="storages.backends.s3.S3Storage",
        remote_options={
            **S3_OPTIONS,
            "bucket_name": make_bucket(s3_endpoint),
            "endpoint_url": s3_endpoint,
        },
    )


def test_s3_end_to_end(
    s3_storage: QueuedStorage,
    s3_endpoint: str,
    django_capture_on_commit_callbacks: Any,
) -> None:
    payload = os.urandom(300_000)
    name = s3_storage.save("photos/cat.jpg", ContentFile(payload))

    assert s3_storage.url(name) == "/media/photos/cat.jpg"
    bucket = s3_storage.remote.bucket_name
    client = s3_client(s3_endpoint)
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount") == 0

    stats = drain()

    assert stats.done == 1
    row = PendingTransfer.objects.get(name=name)
    assert row.status == PendingTransfer.Status.DONE, row.last_error
    stored = client.get_object(Bucket=bucket, Key="photos/cat.jpg")["Body"].read()
    assert hashlib.sha256(stored).digest() == hashlib.sha256(payload).digest()

    url = s3_storage.url(name)
    assert url.startswith(f"{s3_endpoint}/{bucket}/photos/cat.jpg")
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == payload
    with s3_storage.open(name) as opened:
        assert opened.read() == payload

    with django_capture_on_commit_callbacks(execute=True):
        s3_storage.delete(name)
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    assert not PendingTransfer.objects.filter(name=name).exists()
    assert not s3_storage.local.exists(name)


def test_s3_retry_after_outage(
    make_storage: Callable[..., QueuedStorage], settings: Any
) -> None:
    """The remote is down for the first attempt and back for the second."""
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    with moto_s3_server() as endpoint:
        bucket = make_bucket(endpoint)
        storage = make_storage(
            remote="storages.backends.s3.S3Storage",
            remote_options={
                **S3_OPTIONS,
                "bucket_name": bucket,
                "endpoint_url": endpoint,
            },
        )
    # The server is stopped: the first drain records a connection error.
    storage.remote.connection.meta.client.meta.config.retries = {"max_attempts": 1}
    name = storage.save("doc.txt", ContentFile(b"x" * 1000))
    settings.QUEUED_STORAGE_RETRY_DELAY = 60
    drain()
    row = PendingTransfer.objects.get(name=name)
    assert row.status == PendingTransfer.Status.QUEUED
    assert row.attempts == 1
    assert row.last_error
    assert storage.url(name) == "/media/doc.txt"


def test_queued_s3_storage_class_defaults() -> None:
    storage = QueuedS3Storage(key="s3-defaults", remote_options={"bucket_name": "b"})
    assert storage.local_path == "django.core.files.storage.FileSystemStorage"
    assert storage.remote_path == "storages.backends.s3.S3Storage"
