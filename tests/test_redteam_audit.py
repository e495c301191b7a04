"""Red team: audit_storage --delete-orphans against a remote whose keys are other
spellings of a live file's name. Each test fails on the code it was written
against and passes once the break is fixed."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from django.core.files.base import ContentFile

from queued_storage.audit import Audit, AuditOptions
from queued_storage.audit_findings import Finding
from queued_storage.backends import QueuedStorage
from tests.helpers import Status, drained, row_of
from tests.s3 import s3_client
from tests.testapp.models import Document

pytestmark = pytest.mark.django_db

LIVE = "docs/live.txt"
#: An S3 key that is not the live name but that django-storages' S3Storage reads
#: as it: its ``clean_name`` turns ``\`` into ``/`` before every call (delete and
#: HEAD included).
STRAY = "docs\\live.txt"


def test_deleting_a_misspelled_s3_orphan_keeps_the_live_file(
    make_s3_storage: Callable[..., QueuedStorage], s3_endpoint: str
) -> None:
    storage = make_s3_storage()
    client = s3_client(s3_endpoint)
    bucket = storage.remote.bucket_name  # type: ignore[attr-defined]
    name = storage.save(LIVE, ContentFile(b"the live document"))
    drained(storage)
    assert row_of(storage, name).status == Status.DONE
    Document.objects.create(file=name)
    client.put_object(Bucket=bucket, Key=STRAY, Body=b"a stray key")
    keys = {item["Key"] for item in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert keys == {name, STRAY}
    found: list[Finding] = []
    options = AuditOptions(delete_orphans=True, grace=timedelta(0))
    Audit(storage, options, fields=[(Document, "file")], found=found.append).run()
    assert [(f.kind, f.name) for f in found] == [("misspelled", STRAY)]
    assert "kept: the remote reads it as another name" in found[0].detail
    listed = client.list_objects_v2(Bucket=bucket).get("Contents", [])
    assert name in {item["Key"] for item in listed}, found[0].line()
    with storage.open(name) as opened:
        assert opened.read() == b"the live document"
