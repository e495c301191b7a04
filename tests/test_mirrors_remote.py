"""Mirrors on real remotes over loopback: S3 (moto) as the primary and an FTP
server (pyftpdlib) as the mirror. A file is served from S3 once verified there,
copied to FTP after, its local copy removed once both have it; a delete removes
every copy; a mirror added later is backfilled from S3; a mirror that cannot be
reached fails alone, its error without the mirror's password."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from queued_storage import registry
from queued_storage.backends import QueuedStorage
from queued_storage.mirror_backfill import MirrorBackfill
from queued_storage.models import PendingTransfer
from queued_storage.stats import DrainStats
from tests.helpers import S3, Status, content, local_files, read_bytes
from tests.s3 import S3_OPTIONS, make_bucket, s3_client
from tests.servers import FTPServerInfo, ftp_read

pytestmark = pytest.mark.django_db

DELETE = "queued_storage.tasks.TransferAndDelete"
FTP = "queued_storage.ftp.FTPStorage"


def ftp_mirror(location: str) -> dict[str, Any]:
    return {
        "ftp": {
            "storage": FTP,
            "options": {"location": location, "base_url": "https://ftp.example/"},
        }
    }


def bucket_keys(storage: QueuedStorage, endpoint: str) -> list[str]:
    bucket = storage.remote.bucket_name  # type: ignore[attr-defined]
    listed = s3_client(endpoint).list_objects_v2(Bucket=bucket)
    return sorted(item["Key"] for item in listed.get("Contents", []))


@pytest.fixture
def closing() -> Iterator[list[QueuedStorage]]:
    """Storages whose FTP remotes are logged out after the test."""
    storages: list[QueuedStorage] = []
    yield storages
    for storage in storages:
        remote: Any = storage.remote
        if getattr(remote, "_connection", None) is not None:
            remote.disconnect()


@pytest.fixture
def s3_with_ftp_mirror(
    make_s3_storage: Callable[..., QueuedStorage],
    ftp: FTPServerInfo,
    closing: list[QueuedStorage],
) -> Callable[..., QueuedStorage]:
    def make(location: str = ftp.location, **kwargs: Any) -> QueuedStorage:
        storage = make_s3_storage(mirrors=ftp_mirror(location), **kwargs)
        closing.append(storage.mirrors["ftp"])
        return storage

    return make


def test_s3_serves_once_verified_ftp_copies_after_and_the_local_copy_goes_last(
    s3_with_ftp_mirror: Callable[..., QueuedStorage],
    run_drain: Callable[..., DrainStats],
    s3_endpoint: str,
    ftp: FTPServerInfo,
) -> None:
    storage = s3_with_ftp_mirror(task=DELETE)
    mirror = storage.mirrors["ftp"]
    names = [storage.save(f"docs/ü {i}.txt", content(f"copy {i}")) for i in range(3)]

    run_drain(keys=[storage.key])

    assert bucket_keys(storage, s3_endpoint) == sorted(names)
    assert all(storage.url(name).startswith(s3_endpoint) for name in names)
    assert local_files(storage) == sorted(names)  # FTP has no copy yet
    assert [ftp_read(ftp, name) for name in names] == [None] * 3

    run_drain(keys=[mirror.key])

    assert [ftp_read(ftp, name) for name in names] == [
        f"copy {i}".encode() for i in range(3)
    ]
    assert local_files(storage) == []
    assert read_bytes(storage, names[0]) == b"copy 0"
    statuses = PendingTransfer.objects.values_list("status", flat=True)
    assert set(statuses) == {Status.DONE}


def test_a_delete_removes_the_s3_object_and_the_ftp_file(
    s3_with_ftp_mirror: Callable[..., QueuedStorage],
    run_drain: Callable[..., DrainStats],
    django_capture_on_commit_callbacks: Any,
    s3_endpoint: str,
    ftp: FTPServerInfo,
) -> None:
    storage = s3_with_ftp_mirror()
    name = storage.save("a.txt", content("gone soon"))
    run_drain()
    assert ftp_read(ftp, name) == b"gone soon"

    with django_capture_on_commit_callbacks(execute=True):
        storage.delete(name)

    assert bucket_keys(storage, s3_endpoint) == []
    assert ftp_read(ftp, name) is None
    assert not PendingTransfer.objects.exists()
    assert local_files(storage) == []


def test_a_mirror_added_later_is_backfilled_from_s3(
    make_s3_storage: Callable[..., QueuedStorage],
    run_drain: Callable[..., DrainStats],
    ftp: FTPServerInfo,
    closing: list[QueuedStorage],
) -> None:
    before = make_s3_storage(task=DELETE)
    names = [before.save(f"old-{i}.txt", content(f"old {i}")) for i in range(3)]
    run_drain()
    assert local_files(before) == []
    registry.forget(before.key)
    storage = QueuedStorage(
        before.local_path,
        before.remote_path,
        local_options=before.local_options,
        remote_options=before.remote_options,
        key=before.key,
        task=DELETE,
        mirrors=ftp_mirror(ftp.location),
    )
    closing.append(storage.mirrors["ftp"])

    counts = MirrorBackfill(storage).run()
    run_drain()

    assert (counts.queued, counts.current) == (3, 0)
    assert [ftp_read(ftp, name) for name in names] == [
        f"old {i}".encode() for i in range(3)
    ]
    mirror_rows = PendingTransfer.objects.filter(storage_key=storage.mirror_key("ftp"))
    assert {row.status for row in mirror_rows} == {Status.DONE}
    registry.forget(storage.key)


def test_an_unreachable_ftp_mirror_fails_alone_without_its_password(
    s3_with_ftp_mirror: Callable[..., QueuedStorage],
    run_drain: Callable[..., DrainStats],
    settings: Any,
    s3_endpoint: str,
) -> None:
    settings.QUEUED_STORAGE_RETRIES = 0
    storage = s3_with_ftp_mirror(
        location="ftp://uploader:n0t-th3-passw0rd@127.0.0.1:1/", task=DELETE
    )
    name = storage.save("a.txt", content("still served"))

    stats = run_drain()

    assert (stats.done, stats.failed) == (1, 1)
    assert storage.url(name).startswith(s3_endpoint)
    assert read_bytes(storage, name) == b"still served"
    copy = PendingTransfer.objects.get(storage_key=storage.mirror_key("ftp"))
    assert copy.status == Status.FAILED and copy.last_error
    assert "n0t-th3-passw0rd" not in copy.last_error + str(copy.error_history)
    assert local_files(storage) == [name]


def test_a_mirror_copied_from_the_primarys_bucket_reads_each_file_once(
    make_s3_storage: Callable[..., QueuedStorage],
    run_drain: Callable[..., DrainStats],
    s3_endpoint: str,
) -> None:
    """A copy from the primary's remote (the local copy gone) downloads the file
    once: S3's CRC32 of the upload is not checked against a second download (a
    migration would read the old bucket twice), the copy's size is checked."""
    new = {**S3_OPTIONS, "bucket_name": make_bucket(s3_endpoint)}
    storage = make_s3_storage(
        mirrors={"s3": {"storage": S3, "options": {**new, "endpoint_url": s3_endpoint}}}
    )
    names = [storage.save(f"f{i}.txt", content(f"file {i}")) for i in range(3)]
    run_drain(keys=[storage.key])
    for name in names:
        storage.local.delete(name)
    downloads: list[str] = []

    def count(params: dict[str, Any], **kwargs: Any) -> None:
        downloads.append(params["Key"])

    events = storage.remote.bucket.meta.client.meta.events  # type: ignore[attr-defined]
    events.register("before-parameter-build.s3.GetObject", count)
    try:
        assert run_drain(keys=[storage.mirror_key("s3")]).done == 3
    finally:
        events.unregister("before-parameter-build.s3.GetObject", count)

    assert sorted(downloads) == names
    mirror = storage.mirrors["s3"]
    assert [read_bytes(mirror.remote, name) for name in names] == [
        f"file {i}".encode() for i in range(3)
    ]
