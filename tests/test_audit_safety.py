"""audit_storage --delete-orphans never deletes what it cannot be sure is an
orphan: a remote name the remote reads as another one, a name whose tombstone
an audit that died left behind (no worker purges it without the audit's check
of the references), and any orphan while a model's references cannot be read."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.core.exceptions import SuspiciousOperation
from django.core.files.base import ContentFile
from django.core.files.storage import FileSystemStorage
from django.db import models
from django.test.utils import isolate_apps
from django.utils import timezone

from queued_storage import audit_orphans
from queued_storage.audit import Audit, AuditOptions
from queued_storage.audit_findings import Finding
from queued_storage.audit_references import referenced
from queued_storage.backends import QueuedStorage
from queued_storage.fields import QueuedFileField
from queued_storage.management.commands import audit_storage as audit_command
from queued_storage.models import PendingTransfer
from queued_storage.registry import referencing_fields
from queued_storage.remote_listing import read_as_another
from tests.helpers import (
    Status,
    audit_storage,
    drained,
    put_remote,
    row_of,
    transferred_document,
)
from tests.testapp.models import Document, document_storage

pytestmark = pytest.mark.django_db

KEY = document_storage.key
DAY = 24 * 3600
#: A name a file system on POSIX keeps as it is, and that the ledger (and S3)
#: read as ``docs/live.txt``.
STRAY = "docs\\live.txt"


def test_a_misspelled_remote_name_is_reported_and_neither_deleted_nor_adopted() -> None:
    live = transferred_document("live.txt")
    stray = put_remote(document_storage, STRAY, b"a stray file", age=2 * DAY)
    referenced = put_remote(document_storage, "docs\\used.txt", b"0.8", age=2 * DAY)
    Document.objects.create(file="docs\\used.txt")
    result = audit_storage(
        "--storage", KEY, "--json", "--fix", "--delete-orphans", "--grace", "0"
    )
    assert result.code == 3
    assert result.kinds() == {"misspelled": sorted([STRAY, "docs\\used.txt"])}
    assert result.actions() == {STRAY: "", "docs\\used.txt": ""}
    assert result.json["counts"]["misspelled"] == 2
    for finding in result.json["findings"]:
        assert "kept: the remote reads it as another name" in finding["detail"]
    assert stray.exists() and referenced.exists()
    assert not PendingTransfer.objects.filter(deleted=True).exists()
    assert row_of(document_storage, live).status == Status.DONE
    text = audit_storage("--storage", KEY, "--delete-orphans", "--grace", "0")
    assert f"MISSPELLED key={KEY} name={STRAY}: " in text.out


class RefusingStorage(FileSystemStorage):
    """A remote that, as django-storages' backends do, checks every name it is
    given before its call: here it refuses those under ``private/``."""

    def _normalize_name(self, name: str) -> str:
        if name.startswith("private/"):
            raise SuspiciousOperation(f"Attempted access to {name!r} denied.")
        return name


def test_a_name_the_remote_reads_otherwise_is_read_as_another(
    make_s3_storage: Callable[..., QueuedStorage], tmp_path: Any
) -> None:
    s3 = make_s3_storage(remote_options={"location": "media"}).remote
    assert read_as_another(s3, "docs/a b.txt") is None
    assert "another spelling" in str(read_as_another(s3, "docs\\a.txt"))
    assert read_as_another(s3, "docs/./a.txt") is not None
    assert read_as_another(s3, "docs/e\u0301.txt") is not None  # NFD
    refusing = RefusingStorage(location=str(tmp_path))
    assert read_as_another(refusing, "docs/a.txt") is None
    assert "refuses" in str(read_as_another(refusing, "private/a.txt"))
    assert read_as_another(FileSystemStorage(location=str(tmp_path)), "D/A") is None


class AuditDied(BaseException):
    """The audit's process dies: nothing of the audit runs after it."""


def test_a_tombstone_an_audit_died_with_is_no_workers_to_purge(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    orphan = put_remote(document_storage, "docs/orphan.txt", b"nobody", age=2 * DAY)
    held = audit_orphans._tombstone_held

    def died_after_the_insert(key: str, name: str) -> Any:
        held(key, name)
        raise AuditDied

    with monkeypatch.context() as patched:
        patched.setattr(audit_orphans, "_tombstone_held", died_after_the_insert)
        options = AuditOptions(delete_orphans=True, grace=timedelta(0))
        with pytest.raises(AuditDied):
            Audit(document_storage, options, fields=[(Document, "file")]).run()
    (tombstone,) = PendingTransfer.objects.filter(storage_key=KEY)
    assert tombstone.deleted
    # Long after any lease it may have had ran out, a worker drains, and an
    # operator queues every waiting row again: none takes the audit's purge.
    long_ago = timezone.now() - timedelta(days=1)
    PendingTransfer.objects.filter(pk=tombstone.pk).update(
        lease_expires_at=long_ago, updated_at=long_ago
    )
    drained(document_storage)
    assert PendingTransfer.objects.filter(storage_key=KEY).requeue() == 0
    drained(document_storage)
    assert orphan.exists()
    # Referenced meanwhile: the next audit gives the name back, as found.
    Document.objects.create(file="docs/orphan.txt")
    result = audit_storage("--storage", KEY, "--json", "--delete-orphans")
    assert result.kinds() == {"unrecorded": ["docs/orphan.txt"]}
    assert orphan.exists()
    assert not PendingTransfer.objects.filter(storage_key=KEY).exists()


def test_an_audit_after_one_that_died_deletes_the_orphan(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    orphan = put_remote(document_storage, "docs/orphan.txt", b"nobody", age=2 * DAY)
    held = audit_orphans._tombstone_held

    def died_after_the_insert(key: str, name: str) -> Any:
        held(key, name)
        raise AuditDied

    with monkeypatch.context() as patched:
        patched.setattr(audit_orphans, "_tombstone_held", died_after_the_insert)
        with pytest.raises(AuditDied):
            audit_storage("--storage", KEY, "--json", "--delete-orphans")
    assert PendingTransfer.objects.filter(storage_key=KEY, deleted=True).exists()
    result = audit_storage("--storage", KEY, "--json", "--delete-orphans")
    assert result.actions() == {"docs/orphan.txt": "deleted"}
    assert result.code == 0
    assert not orphan.exists()
    assert not PendingTransfer.objects.filter(storage_key=KEY).exists()


@pytest.fixture
def proxy_and_child() -> Iterator[tuple[type[Any], type[Any]]]:
    """A proxy of Document and a multi-table child of it, in their own registry."""
    with isolate_apps("tests.testapp"):

        class DocumentProxy(Document):
            class Meta:
                app_label = "testapp"
                proxy = True

        class ChildDocument(Document):
            class Meta:
                app_label = "testapp"

        yield DocumentProxy, ChildDocument


def test_a_proxy_or_child_models_table_is_read_once(
    proxy_and_child: tuple[type[Any], type[Any]],
) -> None:
    fields = referencing_fields(KEY, models=[Document, *proxy_and_child])
    assert fields == [(Document, "file")]
    Document.objects.create(file="docs/ghost.txt")
    found: list[Finding] = []
    Audit(document_storage, fields=fields, found=found.append).run()
    assert [(f.kind, f.name) for f in found] == [("missing_file", "docs/ghost.txt")]


class HidingManager(models.Manager[Any]):
    """A default manager that hides every row, as a soft delete's might."""

    def get_queryset(self) -> models.QuerySet[Any]:
        return super().get_queryset().none()


def test_references_a_default_manager_hides_still_count() -> None:
    with isolate_apps("tests.testapp"):

        class ShownDocument(Document):
            objects = HidingManager()

            class Meta:
                app_label = "testapp"
                proxy = True

    remote = put_remote(document_storage, "docs/hidden.txt", b"in use", age=2 * DAY)
    Document.objects.create(file="docs/hidden.txt")
    found: list[Finding] = []
    options = AuditOptions(delete_orphans=True, grace=timedelta(0))
    fields = [(ShownDocument, "file")]
    Audit(document_storage, options, fields=fields, found=found.append).run()
    assert [(f.kind, f.name) for f in found] == [("unrecorded", "docs/hidden.txt")]
    assert remote.exists()


@pytest.fixture
def tableless() -> Iterator[type[Any]]:
    """An unmanaged model using the documents storage, whose table is missing."""
    with isolate_apps("tests.testapp"):

        class Tableless(models.Model):
            file = QueuedFileField(storage=document_storage)

            class Meta:
                app_label = "testapp"
                managed = False
                db_table = "testapp_no_such_table"

            def __str__(self) -> str:
                return str(self.file)

        yield Tableless


def test_a_model_without_a_table_stops_no_audit_and_keeps_every_orphan(
    monkeypatch: pytest.MonkeyPatch, tableless: type[Any]
) -> None:
    live = transferred_document("live.txt")
    orphans = [
        put_remote(document_storage, f"docs/orphan{n}.txt", b"nobody", age=2 * DAY)
        for n in range(3)
    ]
    Document.objects.create(file="docs/ghost.txt")
    # Perhaps the missing table's: no "unreferenced row" while it is unknown.
    document_storage.save("docs/lonely.txt", ContentFile(b"whose?"))
    drained(document_storage)
    fields = [(Document, "file"), (tableless, "file")]
    monkeypatch.setattr(audit_command, "fields_of", lambda key: fields)
    result = audit_storage(
        "--storage", KEY, "--json", "--delete-orphans", "--grace", "0",
        "--batch-size", "1",
    )  # fmt: skip
    assert result.code == 3
    assert result.kinds() == {
        "missing_file": ["docs/ghost.txt"],
        "orphan": [f"docs/orphan{n}.txt" for n in range(3)],
        "unreadable_field": [""],
    }
    (unreadable,) = [
        f for f in result.json["findings"] if f["kind"] == "unreadable_field"
    ]
    assert unreadable["reference"] == "testapp.Tableless.file"
    assert "deletes no orphan" in unreadable["detail"]
    for finding in result.json["findings"]:
        if finding["kind"] == "orphan":
            assert "testapp.Tableless.file could not be read" in finding["detail"]
    assert all(orphan.exists() for orphan in orphans)
    assert row_of(document_storage, live).status == Status.DONE
    text = audit_storage("--storage", KEY, "--delete-orphans", "--grace", "0")
    assert f"UNREADABLE_FIELD key={KEY} reference=testapp.Tableless.file: " in text.out


def test_a_file_saved_while_the_audit_holds_the_name_is_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The gate: the name is saved after the held tombstone went in, while the
    audit asks the references again, before it leases the tombstone."""
    remote = put_remote(document_storage, "docs/late.txt", b"old", age=2 * DAY)
    asked = referenced

    def saved_meanwhile(fields: Any, names: Any) -> set[str]:
        document_storage.save("docs/late.txt", ContentFile(b"the new version"))
        return asked(fields, names)

    monkeypatch.setattr(audit_orphans, "referenced", saved_meanwhile)
    result = audit_storage("--storage", KEY, "--json", "--delete-orphans")
    assert "changed in the ledger" in result.json["findings"][0]["detail"]
    assert remote.exists()
    row = row_of(document_storage, "docs/late.txt")
    assert (row.deleted, row.status) == (False, Status.QUEUED)
    drained(document_storage)
    assert remote.read_bytes() == b"the new version"
