"""audit_storage against S3 (moto on loopback): the paged listing with sizes and
MD5 ETags merged with the ledger, in the same name order as a file system's
walk; an orphan deleted with S3's conditional delete."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import FileSystemStorage

from queued_storage.audit import Audit, AuditOptions
from queued_storage.audit_findings import Finding
from queued_storage.backends import QueuedStorage
from queued_storage.remote_listing import remote_entries
from tests.helpers import Status, drained, row_of
from tests.s3 import s3_client
from tests.testapp.models import Document

pytestmark = pytest.mark.django_db

#: Names whose code point order differs from a directory walk's.
TRICKY = ["a b.txt", "a.txt", "a/b.txt", "a0.txt", "b", "d/e/f.txt", "é.txt"]


def test_s3_lists_in_the_order_of_a_file_system_walk(
    make_s3_storage: Callable[..., QueuedStorage], s3_endpoint: str, tmp_path: str
) -> None:
    storage = make_s3_storage(remote_options={"location": "media"})
    client = s3_client(s3_endpoint)
    bucket = storage.remote.bucket_name  # type: ignore[attr-defined]
    walked = FileSystemStorage(location=str(tmp_path) + "/walk")
    for name in reversed(TRICKY):
        client.put_object(Bucket=bucket, Key=f"media/{name}", Body=b"12345")
        walked.save(name, ContentFile(b"12345"))
    on_s3 = list(remote_entries(storage.remote))
    assert [e.name for e in on_s3] == sorted(TRICKY)
    assert [e.name for e in remote_entries(walked)] == sorted(TRICKY)
    assert {(e.size, e.md5) for e in on_s3} == {(5, "827ccb0eea8a706c4c34a16891f84e7b")}
    assert all(e.modified is not None for e in on_s3)
    assert [e.name for e in remote_entries(storage.remote, after="a/b.txt")] == (
        sorted(TRICKY)[3:]
    )
    assert [e.name for e in remote_entries(walked, after="a/b.txt")] == (
        sorted(TRICKY)[3:]
    )


def test_an_audit_of_an_s3_remote(
    make_s3_storage: Callable[..., QueuedStorage], s3_endpoint: str
) -> None:
    storage = make_s3_storage()
    client = s3_client(s3_endpoint)
    bucket = storage.remote.bucket_name  # type: ignore[attr-defined]
    names = [
        storage.save(f"f{n}.txt", ContentFile(b"content %d" % n)) for n in range(3)
    ]
    drained(storage)
    for name in names:
        Document.objects.create(file=name)
    client.put_object(Bucket=bucket, Key="f1.txt", Body=b"CONTENT 1")  # same size
    client.put_object(Bucket=bucket, Key="f2.txt", Body=b"shorter")
    client.put_object(Bucket=bucket, Key="stray.bin", Body=b"nobody's")
    fields = [(Document, "file")]
    found: list[Finding] = []
    options = AuditOptions(checksum=True, batch_size=2)
    Audit(storage, options, fields=fields, found=found.append).run()
    assert [(f.kind, f.name) for f in found] == [
        ("checksum_mismatch", "f1.txt"),
        ("size_mismatch", "f2.txt"),
        ("orphan", "stray.bin"),
    ]
    assert "MD5" in found[0].detail
    found.clear()
    options = AuditOptions(
        fix=True, delete_orphans=True, grace=AuditOptions().grace * 0, checksum=True
    )
    Audit(storage, options, fields=fields, found=found.append).run()
    assert [(f.name, f.action) for f in found] == [
        ("f1.txt", "requeued"),
        ("f2.txt", "requeued"),
        ("stray.bin", "deleted"),
    ]
    listed = client.list_objects_v2(Bucket=bucket)["Contents"]
    assert sorted(item["Key"] for item in listed) == names
    drained(storage)
    assert row_of(storage, "f2.txt").status == Status.DONE
    found.clear()
    Audit(storage, AuditOptions(checksum=True), fields=fields, found=found.append).run()
    assert found == []
