"""The whole path against a real S3 API over HTTP: moto's server on loopback."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.core.files.base import ContentFile
from django.utils import timezone

from queued_storage import conditional
from queued_storage.backends import QueuedS3Storage, QueuedStorage
from queued_storage.errors import Outcome
from queued_storage.models import PendingTransfer
from queued_storage.worker import drain
from tests.s3 import (
    S3_OPTIONS,
    hold_first_request,
    late_worker_outcome,
    make_bucket,
    moto_s3_server,
    s3_client,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def s3_storage(make_s3_storage: Callable[..., QueuedStorage]) -> QueuedStorage:
    return make_s3_storage()


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
    storage.remote.connection.meta.client.meta.config.retries = {"max_attempts": 1}  # type: ignore[attr-defined]
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


@pytest.mark.django_db(transaction=True)
def test_s3_refuses_a_late_overwrite_whose_lease_check_passed(
    s3_endpoint: str, make_s3_storage: Callable[..., QueuedStorage]
) -> None:
    """A worker checks its lease, then stops before its upload reaches S3; its
    lease runs out, another worker takes the row over and finishes it, and the
    name is saved and transferred again. When the late upload arrives, S3 itself
    refuses it: it carries If-Match with the ETag seen before the check."""
    storage = make_s3_storage(
        local_options={"allow_overwrite": True}, create_only_uploads=True
    )

    assert late_worker_outcome(storage, ("PutObject",)) is Outcome.STALE

    bucket = storage.remote.bucket_name  # type: ignore[attr-defined]
    stored = s3_client(s3_endpoint).get_object(Bucket=bucket, Key="doc.txt")
    assert stored["Body"].read() == b"the newest"
    row = PendingTransfer.objects.for_name(storage.key, "doc.txt").get()
    assert row.status == PendingTransfer.Status.DONE
    with storage.open("doc.txt") as opened:
        assert opened.read() == b"the newest"


def test_s3_conditional_delete_spares_an_object_written_since_its_etag_was_read(
    s3_storage: QueuedStorage, s3_endpoint: str
) -> None:
    """conditional.delete_if_match(): S3 refuses to delete an object that is not
    the one whose ETag was read, and deletes the one that is."""
    remote = s3_storage.remote
    bucket = remote.bucket_name  # type: ignore[attr-defined]
    client = s3_client(s3_endpoint)
    client.put_object(Bucket=bucket, Key="a.txt", Body=b"old")
    seen = conditional.etag_of(remote, "a.txt")
    assert seen is not None
    client.put_object(Bucket=bucket, Key="a.txt", Body=b"newer")

    with pytest.raises(Exception) as refused:
        conditional.delete_if_match(remote, "a.txt", seen)

    assert conditional.refused(refused.value)
    assert client.get_object(Bucket=bucket, Key="a.txt")["Body"].read() == b"newer"
    current = conditional.etag_of(remote, "a.txt")
    assert current is not None and current != seen
    conditional.delete_if_match(remote, "a.txt", current)
    assert conditional.etag_of(remote, "a.txt") is None


def test_s3_uploads_of_one_key_wanting_different_conditions_are_not_sent(
    s3_storage: QueuedStorage, s3_endpoint: str
) -> None:
    """The hook cannot tell which of two uploads of one key a request belongs to
    (the transfer manager sends it from its own thread): when they want different
    conditions, the request fails rather than go without one."""
    remote = s3_storage.remote
    bucket = remote.bucket_name  # type: ignore[attr-defined]
    client = s3_client(s3_endpoint)
    client.put_object(Bucket=bucket, Key="a.txt", Body=b"old")
    seen = conditional.etag_of(remote, "a.txt")

    with (
        conditional.conditional_upload(remote, "a.txt", seen),
        conditional.conditional_upload(remote, "a.txt", None),
        pytest.raises(conditional.AmbiguousCondition),
    ):
        remote.save("a.txt", ContentFile(b"late"))

    assert client.get_object(Bucket=bucket, Key="a.txt")["Body"].read() == b"old"
    with conditional.conditional_upload(remote, "a.txt", seen):
        remote.save("a.txt", ContentFile(b"replaced"))
    assert client.get_object(Bucket=bucket, Key="a.txt")["Body"].read() == b"replaced"


@pytest.mark.django_db(transaction=True)
def test_s3_an_upload_held_back_by_an_ambiguous_condition_owns_nothing(
    s3_storage: QueuedStorage, s3_endpoint: str, settings: Any
) -> None:
    """An upload the hook refused to send (another upload of the key in this
    process wanted another condition) wrote nothing: the row must not take the
    name for its own, or its next attempt would overwrite a foreign object."""
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    s3_storage.create_only_uploads = True
    remote = s3_storage.remote
    bucket = remote.bucket_name  # type: ignore[attr-defined]
    client = s3_client(s3_endpoint)
    name = s3_storage.save("a.txt", ContentFile(b"mine"))

    with conditional.conditional_upload(remote, "a.txt", '"another-upload"'):
        assert drain(keys=[s3_storage.key], limit=1).retried == 1

    row = PendingTransfer.objects.for_name(s3_storage.key, name).get()
    assert "AmbiguousCondition" in row.last_error
    assert row.remote_owned is False
    client.put_object(Bucket=bucket, Key="a.txt", Body=b"theirs")
    assert drain(keys=[s3_storage.key]).failed == 1
    row = PendingTransfer.objects.for_name(s3_storage.key, name).get()
    assert "did not put there" in row.last_error
    assert client.get_object(Bucket=bucket, Key="a.txt")["Body"].read() == b"theirs"


@pytest.mark.django_db(transaction=True)
def test_s3_create_only_holds_in_worker_threads_whichever_thread_made_the_bucket(
    s3_storage: QueuedStorage, s3_endpoint: str
) -> None:
    """S3Storage uploads with the client of the thread that first saved (its
    bucket's), not the uploading thread's: the condition must be on that client,
    or a --concurrency drain's create-only uploads go without it."""
    s3_storage.create_only_uploads = True
    remote = s3_storage.remote
    bucket = remote.bucket_name  # type: ignore[attr-defined]
    client = s3_client(s3_endpoint)
    remote.save("made-the-bucket.txt", ContentFile(b"by this thread"))
    client.put_object(Bucket=bucket, Key="a.txt", Body=b"theirs")
    names = [s3_storage.save(n, ContentFile(b"mine")) for n in ("a.txt", "b.txt")]

    stats = drain(keys=[s3_storage.key], concurrency=2)

    assert (stats.done, stats.failed) == (1, 1)
    assert client.get_object(Bucket=bucket, Key="a.txt")["Body"].read() == b"theirs"
    row = PendingTransfer.objects.for_name(s3_storage.key, names[0]).get()
    assert "did not put there" in row.last_error


@pytest.mark.django_db(transaction=True)
def test_s3_purge_spares_a_version_written_after_its_lease_check(
    s3_endpoint: str, make_s3_storage: Callable[..., QueuedStorage]
) -> None:
    """The purge after delete() checks its lease, then stops before its delete
    reaches S3; its lease runs out, the name is saved again and the new version
    transferred. When the late delete arrives, S3 itself refuses it: it carries
    If-Match with the ETag of the deleted version, read before the check."""
    storage = make_s3_storage(create_only_uploads=True)
    bucket = storage.remote.bucket_name  # type: ignore[attr-defined]
    client = s3_client(s3_endpoint)
    name = storage.save("doc.txt", ContentFile(b"old"))
    assert drain(keys=[storage.key]).done == 1

    def saved_again() -> None:
        PendingTransfer.objects.filter(storage_key=storage.key).update(
            lease_expires_at=timezone.now() - timedelta(seconds=1)
        )
        assert storage.save(name, ContentFile(b"new")) == name
        assert drain(keys=[storage.key]).done == 1

    # delete()'s purge runs at once, after the commit.
    hold_first_request(
        storage, ("DeleteObject",), lambda: storage.delete(name), saved_again
    )

    assert client.get_object(Bucket=bucket, Key="doc.txt")["Body"].read() == b"new"
    row = PendingTransfer.objects.for_name(storage.key, name).get()
    assert (row.status, row.deleted) == (PendingTransfer.Status.DONE, False)
    with storage.open(name) as opened:
        assert opened.read() == b"new"


@pytest.mark.django_db(transaction=True)
def test_s3_a_late_multipart_overwrite_completes_only_if_match(
    make_s3_storage: Callable[..., QueuedStorage],
) -> None:
    """As for a single PutObject: a late worker's multipart upload, paused before
    its CompleteMultipartUpload while the row is taken over and a newer version
    transferred, completes with If-Match and the ETag seen before its lease check,
    which AWS S3 refuses then. (moto honours If-None-Match on the completion but
    not If-Match: the test checks the header, and that the late worker loses in
    the ledger.)"""
    from boto3.s3.transfer import TransferConfig

    part = 5 * 1024 * 1024
    storage = make_s3_storage(
        remote_options={
            "transfer_config": TransferConfig(
                multipart_threshold=part, multipart_chunksize=part
            ),
        },
        local_options={"allow_overwrite": True},
        create_only_uploads=True,
    )
    first, second, newest = (os.urandom(part + 1) for _ in range(3))
    seen: list[str | None] = []
    conditions: list[str | None] = []

    late_worker_outcome(
        storage,
        ("CompleteMultipartUpload",),
        name="big.bin",
        versions=(first, second, newest),
        seen=lambda params: conditions.append(params["headers"].get("If-Match")),
        claimed=lambda: seen.append(conditional.etag_of(storage.remote, "big.bin")),
    )

    assert len(seen) == 1 and seen[0] is not None
    assert conditions == seen
    # moto lets the late completion through (AWS S3 refuses it): the late worker,
    # verified, finds a newer version done and has it sent again.
    drain(keys=[storage.key])
    row = PendingTransfer.objects.for_name(storage.key, "big.bin").get()
    assert row.status == PendingTransfer.Status.DONE
    with storage.remote.open("big.bin") as remote_copy:
        assert remote_copy.read() == newest
