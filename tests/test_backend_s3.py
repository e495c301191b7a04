"""QueuedS3Storage against moto's S3 API on loopback: the README's STORAGES
example, multipart uploads in bounded memory, and botocore's checksums."""

from __future__ import annotations

import hashlib
import os
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.files import File
from django.core.files.base import ContentFile
from django.core.files.storage import storages

from queued_storage import registry
from queued_storage.backends import QueuedS3Storage
from queued_storage.models import PendingTransfer
from queued_storage.worker import drain
from tests.s3 import make_bucket, moto_s3_server, s3_client
from tests.servers import moto_s3_process
from tests.tools import require_module

pytestmark = pytest.mark.django_db

MiB = 1024 * 1024
#: S3's smallest part (moto enforces it too).
PART = 5 * MiB
LARGE = 50 * MiB


def configure(
    settings: Any,
    tmp_path: Path,
    endpoint: str,
    bucket: str,
    *,
    verify_checksum: bool = False,
    **s3_options: Any,
) -> QueuedS3Storage:
    """The README's STORAGES example, pointed at the test server."""
    settings.STORAGES = {
        **settings.STORAGES,
        "s3_queued": {
            "BACKEND": "queued_storage.backends.QueuedS3Storage",
            "OPTIONS": {
                "local_options": {
                    "location": str(tmp_path / "media"),
                    "base_url": "/media/",
                },
                "remote_options": {
                    "bucket_name": bucket,
                    "endpoint_url": endpoint,
                    "access_key": "testing",
                    "secret_key": "testing",
                    "region_name": "us-east-1",
                    "addressing_style": "path",
                    "querystring_auth": False,
                    **s3_options,
                },
                "key": "s3",
                "verify_checksum": verify_checksum,
            },
        },
    }
    storage = storages["s3_queued"]
    assert isinstance(storage, QueuedS3Storage)
    return storage


@pytest.fixture(autouse=True)
def forget_s3_key() -> Iterator[None]:
    yield
    registry.forget("s3")


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    with moto_s3_server() as endpoint:
        yield endpoint


def write_random_file(path: Path, size: int) -> str:
    """Write ``size`` random bytes in 1 MiB pieces; return their SHA-256."""
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for _ in range(size // MiB):
            piece = os.urandom(MiB)
            digest.update(piece)
            out.write(piece)
    return digest.hexdigest()


def streamed_sha256(body: Any) -> str:
    digest = hashlib.sha256()
    for piece in body.iter_chunks(MiB):
        digest.update(piece)
    return digest.hexdigest()


@pytest.mark.slow
def test_s3_large_file_goes_multipart_in_bounded_memory(
    tmp_path: Path, settings: Any, django_capture_on_commit_callbacks: Any
) -> None:
    """A 50 MiB file is uploaded in 5 MiB parts and read back for its checksum
    while this process holds less than half of it in memory. moto runs in a
    child process, so that its copy of the bytes does not count."""
    transfer = require_module("boto3.s3.transfer")
    config = transfer.TransferConfig(
        multipart_threshold=PART, multipart_chunksize=PART, max_concurrency=2
    )
    # s3transfer buffers up to this many parts (default 10) ahead of the upload.
    config.max_in_memory_upload_chunks = 2
    source = tmp_path / "video.bin"
    expected = write_random_file(source, LARGE)

    with moto_s3_process() as endpoint:
        bucket = make_bucket(endpoint)
        storage = configure(
            settings,
            tmp_path,
            endpoint,
            bucket,
            verify_checksum=True,
            transfer_config=config,
        )
        with source.open("rb") as handle:
            name = storage.save("videos/launch.bin", File(handle))
        assert storage.url(name) == "/media/videos/launch.bin"
        # The first call builds boto3's client and loads botocore's S3 model
        # (about 14 MiB, once per process): not the upload's memory.
        assert not storage.remote.exists("warm-up")

        tracemalloc.start()
        try:
            before, _peak = tracemalloc.get_traced_memory()
            stats = drain(keys=["s3"])
            _current, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()

        row = PendingTransfer.objects.get(storage_key="s3", name=name)
        assert (stats.done, row.status) == (1, PendingTransfer.Status.DONE), (
            row.last_error
        )
        assert row.checksum == expected  # verified against the copy read back
        # Two parts in flight and two buffered, each read once: about 19 MiB.
        assert peak - before < LARGE // 2, f"peak {(peak - before) / MiB:.1f} MiB"
        client = s3_client(endpoint)
        head = client.head_object(Bucket=bucket, Key=name)
        assert head["ContentLength"] == LARGE
        # A multipart object's ETag is "<md5 of the part md5s>-<number of parts>".
        assert head["ETag"].strip('"').endswith(f"-{LARGE // PART}")
        body = client.get_object(Bucket=bucket, Key=name)["Body"]
        assert streamed_sha256(body) == expected
        assert storage.url(name) == f"{endpoint}/{bucket}/videos/launch.bin"

        with django_capture_on_commit_callbacks(execute=True):
            storage.delete(name)

        assert client.list_objects_v2(Bucket=bucket).get("KeyCount") == 0
        assert not PendingTransfer.objects.filter(storage_key="s3").exists()


def checksums(endpoint: str, bucket: str, name: str) -> dict[str, str]:
    head = s3_client(endpoint).head_object(
        Bucket=bucket, Key=name, ChecksumMode="ENABLED"
    )
    return {k: v for k, v in head.items() if k.startswith("Checksum")}


def test_s3_uploads_carry_botocore_default_crc32(
    moto_endpoint: str, tmp_path: Path, settings: Any
) -> None:
    bucket = make_bucket(moto_endpoint)
    storage = configure(settings, tmp_path, moto_endpoint, bucket)
    name = storage.save("a.txt", ContentFile(b"checked on the way in"))

    drain(keys=["s3"])

    assert PendingTransfer.objects.get(name=name).status == "done"
    assert "ChecksumCRC32" in checksums(moto_endpoint, bucket, name)


def test_s3_when_required_sends_no_checksum(
    moto_endpoint: str, tmp_path: Path, settings: Any
) -> None:
    """The README's setting for S3-compatible services that reject botocore's
    default checksum headers."""
    botocore_config = require_module("botocore.config")
    bucket = make_bucket(moto_endpoint)
    storage = configure(
        settings,
        tmp_path,
        moto_endpoint,
        bucket,
        client_config=botocore_config.Config(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )
    name = storage.save("a.txt", ContentFile(b"no checksum header"))

    drain(keys=["s3"])

    assert PendingTransfer.objects.get(name=name).status == "done"
    assert checksums(moto_endpoint, bucket, name) == {}
    body = s3_client(moto_endpoint).get_object(Bucket=bucket, Key=name)["Body"]
    assert body.read() == b"no checksum header"


def test_s3_if_none_match_is_not_reachable_through_s3storage(
    moto_endpoint: str, tmp_path: Path, settings: Any
) -> None:
    """The README's claim: S3Storage uploads with boto3's upload_fileobj, which
    refuses IfNoneMatch, so it cannot go in object_parameters. When a release
    accepts it, this test fails: then document how to turn it on."""
    settings.QUEUED_STORAGE_RETRIES = 0
    bucket = make_bucket(moto_endpoint)
    storage = configure(
        settings,
        tmp_path,
        moto_endpoint,
        bucket,
        object_parameters={"IfNoneMatch": "*"},
    )
    name = storage.save("a.txt", ContentFile(b"write once"))

    drain(keys=["s3"])

    row = PendingTransfer.objects.get(name=name)
    assert row.status == PendingTransfer.Status.FAILED
    assert "IfNoneMatch" in row.last_error
    assert s3_client(moto_endpoint).list_objects_v2(Bucket=bucket)["KeyCount"] == 0
