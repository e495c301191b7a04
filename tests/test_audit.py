"""audit_storage: the remote's listing, the ledger and the models' references
compared on FileSystemStorage remotes; each finding, --fix, --delete-orphans with
its grace period, a crash and its resume, --json, a mirror's remote, and the
orphan deleted only while nothing takes its name."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.core.files.base import ContentFile
from django.core.management import call_command
from django.db import connections
from django.db.models.functions import Collate

from queued_storage import audit as audit_module
from queued_storage import tombstones
from queued_storage.audit import Audit, AuditOptions
from queued_storage.audit_findings import KINDS, Finding
from queued_storage.audit_merge import keyset_pages
from queued_storage.audit_references import referenced
from queued_storage.backends import QueuedStorage
from queued_storage.copying import delete_remote_fenced
from queued_storage.models import PendingTransfer, StorageState
from queued_storage.remote_listing import RemoteEntry, remote_entries
from tests.helpers import (
    Status,
    audit_storage,
    drained,
    put_remote,
    root_of,
    row_of,
    transferred_document,
)
from tests.testapp.models import Document, document_storage

pytestmark = pytest.mark.django_db

KEY = document_storage.key
DAY = 24 * 3600


@pytest.fixture
def every_finding() -> dict[str, str]:
    """The documents storage with one name of each finding (but the checksum's),
    and one file that is fine; returns the names by kind."""
    fine = transferred_document("fine.txt")
    gone = transferred_document("gone.txt")
    (root_of(document_storage.remote) / gone).unlink()
    resized = transferred_document("resized.txt")
    put_remote(document_storage, resized, b"another size altogether")
    lonely = document_storage.save("docs/lonely.txt", ContentFile(b"no model"))
    drained(document_storage)
    put_remote(document_storage, "docs/orphan.txt", b"nobody", age=2 * DAY)
    put_remote(document_storage, "docs/unrecorded.txt", b"from 0.8")
    Document.objects.create(file="docs/unrecorded.txt")
    Document.objects.create(file="docs/ghost.txt")
    return {
        "fine": fine,
        "missing_remote": gone,
        "size_mismatch": resized,
        "unreferenced_row": lonely,
        "orphan": "docs/orphan.txt",
        "unrecorded": "docs/unrecorded.txt",
        "missing_file": "docs/ghost.txt",
    }


def test_each_finding_is_reported_and_the_exit_status_says_so(
    every_finding: dict[str, str],
) -> None:
    result = audit_storage("--storage", KEY, "--json")
    assert result.code == 3, result.err
    expected = {k: [v] for k, v in every_finding.items() if k != "fine"}
    assert result.kinds() == expected
    counts = result.json["counts"]
    assert counts["unsettled"] == 6
    assert counts["listed"] == 5  # fine, resized, lonely, orphan, unrecorded
    assert counts["references"] == 5
    assert [f["reference"] for f in result.json["findings"] if f["reference"]] == [
        f"testapp.Document.pk={Document.objects.get(file='docs/ghost.txt').pk}"
    ]
    # Nothing changed without --fix.
    assert not PendingTransfer.objects.for_name(KEY, every_finding["unrecorded"])
    assert row_of(document_storage, every_finding["size_mismatch"]).status == "done"
    assert (root_of(document_storage.remote) / "docs/orphan.txt").exists()


def test_json_shape(every_finding: dict[str, str]) -> None:
    payload = audit_storage("--storage", KEY, "--json").json
    assert set(payload) == {
        "storage",
        "destinations",
        "references",
        "resumed_from",
        "findings",
        "counts",
    }
    assert payload["storage"] == KEY
    assert payload["destinations"] == [KEY]
    assert payload["references"] == ["testapp.Document.file"]
    assert payload["resumed_from"] is None
    for finding in payload["findings"]:
        assert set(finding) == {"kind", "key", "name", "detail", "action", "reference"}
        assert finding["kind"] in KINDS
        assert finding["key"] == KEY
    assert set(KINDS) <= set(payload["counts"])


def test_a_clean_storage_exits_0_and_progress_goes_to_stderr() -> None:
    transferred_document("clean.txt")
    result = audit_storage("--storage", KEY, "--progress", "--batch-size", "1")
    assert result.code == 0, result.err
    assert "remote documents: listed=" in result.err
    assert "Audited 'documents': listed=1 rows=1 references=1" in result.out


def test_an_unknown_key_is_a_usage_error_that_changes_nothing() -> None:
    result = audit_storage("--storage", "nope", "--fix", "--delete-orphans")
    assert result.code == 2
    assert "Unknown storage key(s): nope" in result.err
    assert not StorageState.objects.exists()


def test_fix_requeues_wrong_copies_and_adopts_referenced_files(
    every_finding: dict[str, str],
) -> None:
    result = audit_storage("--storage", KEY, "--json", "--fix")
    actions = result.actions()
    assert actions[every_finding["missing_remote"]] == "requeued"
    assert actions[every_finding["size_mismatch"]] == "requeued"
    assert actions[every_finding["unrecorded"]] == "adopted"
    assert actions[every_finding["orphan"]] == ""  # needs --delete-orphans
    adopted = row_of(document_storage, every_finding["unrecorded"])
    assert (adopted.status, adopted.size) == (Status.DONE, len(b"from 0.8"))
    drained(document_storage)
    again = audit_storage("--storage", KEY, "--json").kinds()
    assert again == {
        "orphan": ["docs/orphan.txt"],
        "unreferenced_row": [every_finding["unreferenced_row"]],
        "missing_file": ["docs/ghost.txt"],
    }


def test_fix_leaves_a_wrong_copy_without_a_local_copy_as_found(
    every_finding: dict[str, str],
) -> None:
    (root_of(document_storage.local) / every_finding["size_mismatch"]).unlink()
    result = audit_storage("--storage", KEY, "--json", "--fix")
    found = next(f for f in result.json["findings"] if f["kind"] == "size_mismatch")
    assert found["action"] == ""
    assert "no local copy to send again" in found["detail"]
    assert row_of(document_storage, every_finding["size_mismatch"]).status == "done"


def test_orphans_are_deleted_only_past_the_grace_period_with_a_modified_time() -> None:
    old = put_remote(document_storage, "docs/old.txt", b"old", age=2 * DAY)
    young = put_remote(document_storage, "docs/young.txt", b"young", age=3600)
    result = audit_storage("--storage", KEY, "--json", "--delete-orphans")
    assert result.actions() == {"docs/old.txt": "deleted", "docs/young.txt": ""}
    assert not old.exists()
    assert young.exists()
    assert result.code == 3  # the young orphan is left
    assert not PendingTransfer.objects.filter(storage_key=KEY).exists()
    result = audit_storage(
        "--storage", KEY, "--json", "--delete-orphans", "--grace", "30m"
    )
    assert result.actions() == {"docs/young.txt": "deleted"}
    assert result.code == 0


def test_an_orphan_without_a_modified_time_is_never_deleted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    put_remote(document_storage, "docs/ageless.txt", b"when?", age=30 * DAY)

    def ageless(storage: Any, after: str = "") -> Iterator[RemoteEntry]:
        for entry in remote_entries(storage, after):
            yield RemoteEntry(entry.name, entry.size, None)

    monkeypatch.setattr(audit_module, "remote_entries", ageless)
    result = audit_storage(
        "--storage", KEY, "--json", "--delete-orphans", "--grace", "0"
    )
    (finding,) = result.json["findings"]
    assert finding["action"] == ""
    assert "no modified time" in finding["detail"]
    assert (root_of(document_storage.remote) / "docs/ageless.txt").exists()


def test_delete_orphans_needs_a_model_field_to_know_references(
    make_storage: Callable[..., QueuedStorage],
) -> None:
    storage = make_storage(remote="django.core.files.storage.FileSystemStorage")
    storage.save("x.txt", ContentFile(b"x"))
    result = audit_storage("--storage", storage.key, "--delete-orphans")
    assert result.code == 2
    assert "No model's file field uses the storage" in result.err


def record_elsewhere(name: str) -> str:
    """The name saved on another host: a row, and no local file here."""
    row = PendingTransfer(storage_key=KEY, name=name, host="another-host")
    row.save()
    return name


@pytest.mark.parametrize(
    "take",
    [
        lambda name: document_storage.save(name, ContentFile(b"new")),
        record_elsewhere,
    ],
    ids=["saved-here", "saved-on-another-host"],
)
def test_a_file_saved_between_the_listing_and_the_delete_is_kept(
    monkeypatch: pytest.MonkeyPatch, take: Callable[[str], str]
) -> None:
    """The gate: the listing yields the orphan, then the name is saved (a row,
    no reference yet) before the audit gets to delete it."""
    put_remote(document_storage, "docs/raced.txt", b"old orphan", age=2 * DAY)
    listed = remote_entries
    saved: list[str] = []

    def then_saved(storage: Any, after: str = "") -> Iterator[RemoteEntry]:
        for entry in listed(storage, after):
            yield entry
            if entry.name == "docs/raced.txt":
                saved.append(take(entry.name))

    monkeypatch.setattr(audit_module, "remote_entries", then_saved)
    result = audit_storage("--storage", KEY, "--json", "--delete-orphans")
    assert saved == ["docs/raced.txt"]
    assert result.actions()["docs/raced.txt"] == ""
    assert (root_of(document_storage.remote) / "docs/raced.txt").exists()
    assert row_of(document_storage, "docs/raced.txt").deleted is False


def test_a_file_saved_after_the_tombstone_went_in_is_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The gate is the fenced delete itself: the name is saved once the audit
    holds the name's tombstone, just before the remote delete is sent."""
    remote = put_remote(document_storage, "docs/late.txt", b"old", age=2 * DAY)
    fenced = delete_remote_fenced

    def saved_first(storage: Any, row: Any, *args: Any) -> None:
        document_storage.save("docs/late.txt", ContentFile(b"the new version"))
        fenced(storage, row, *args)

    monkeypatch.setattr(tombstones, "delete_remote_fenced", saved_first)
    result = audit_storage("--storage", KEY, "--json", "--delete-orphans")
    assert result.actions()["docs/late.txt"] == ""
    assert remote.exists()
    row = row_of(document_storage, "docs/late.txt")
    assert (row.deleted, row.status) == (False, Status.QUEUED)
    drained(document_storage)
    assert remote.read_bytes() == b"the new version"


def test_a_reference_made_before_the_delete_keeps_the_orphan(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    remote = put_remote(document_storage, "docs/claimed.txt", b"old", age=2 * DAY)
    asked = referenced
    calls: list[list[str]] = []

    def referenced_later(fields: Any, names: Any) -> set[str]:
        calls.append(list(names))
        found = asked(fields, names)
        Document.objects.get_or_create(file="docs/claimed.txt")
        return found

    monkeypatch.setattr(audit_module, "referenced", referenced_later)
    result = audit_storage("--storage", KEY, "--json", "--delete-orphans")
    (finding,) = [f for f in result.json["findings"] if f["kind"] == "orphan"]
    assert finding["action"] == ""
    assert "got a reference" in finding["detail"]
    assert remote.exists()
    assert not PendingTransfer.objects.filter(storage_key=KEY).exists()


def test_a_crash_mid_audit_resumes_where_it_stopped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for number in range(10):
        put_remote(document_storage, f"docs/{number}.txt", b"orphan")
    listed = remote_entries
    seen: list[str] = []

    def crashing(storage: Any, after: str = "") -> Iterator[RemoteEntry]:
        for entry in listed(storage, after):
            if len(seen) == 6:
                raise RuntimeError("the listing broke at item 6")
            seen.append(entry.name)
            yield entry

    monkeypatch.setattr(audit_module, "remote_entries", crashing)
    with pytest.raises(RuntimeError):
        call_command("audit_storage", "--storage", KEY, "--batch-size", "2")
    # Three batches of two were checked before the seventh name broke.
    stored = StorageState.objects.get(storage_key=KEY).audit_progress
    assert (stored["after"], stored["counts"]["orphan"]) == ("docs/5.txt", 6)
    resumed_after: list[str] = []

    def recorded(storage: Any, after: str = "") -> Iterator[RemoteEntry]:
        resumed_after.append(after)
        return listed(storage, after)

    monkeypatch.setattr(audit_module, "remote_entries", recorded)
    result = audit_storage("--storage", KEY, "--json", "--batch-size", "2")
    assert resumed_after == ["docs/5.txt"]  # not listed from the start again
    assert result.json["resumed_from"]["after"] == "docs/5.txt"
    assert result.kinds() == {"orphan": [f"docs/{n}.txt" for n in range(6, 10)]}
    assert result.json["counts"]["orphan"] == 10  # the whole audit's
    assert result.json["counts"]["listed"] == 10
    assert StorageState.objects.get(storage_key=KEY).audit_progress == {}
    assert audit_storage("--storage", KEY, "--json").json["resumed_from"] is None


def test_restart_forgets_the_interrupted_audit() -> None:
    put_remote(document_storage, "docs/a.txt", b"a")
    StorageState.objects.create(
        storage_key=KEY,
        audit_progress={"destination": 0, "after": "docs/a.txt", "counts": {}},
    )
    assert audit_storage("--storage", KEY, "--json").kinds() == {}
    StorageState.objects.filter(storage_key=KEY).update(
        audit_progress={"destination": 0, "after": "docs/a.txt", "counts": {}}
    )
    restarted = audit_storage("--storage", KEY, "--json", "--restart")
    assert restarted.kinds() == {"orphan": ["docs/a.txt"]}


def test_a_mirrors_remote_is_audited(
    make_mirrored: Callable[..., QueuedStorage],
) -> None:
    storage = make_mirrored(remote="django.core.files.storage.FileSystemStorage")
    mirror = storage.mirrors["backup"]
    field = [(Document, "file")]
    kept = storage.save("docs/kept.txt", ContentFile(b"kept"))
    drained(storage)
    drained(mirror)
    Document.objects.create(file=kept)
    assert row_of(mirror, kept).status == Status.DONE
    put_remote(mirror, "docs/stray.txt", b"only on the backup", age=2 * DAY)
    put_remote(mirror, kept, b"a copy of another size")
    found: list[Finding] = []
    Audit(storage, AuditOptions(fix=True), fields=field, found=found.append).run()
    assert [(f.kind, f.key, f.name, f.action) for f in found] == [
        ("size_mismatch", mirror.key, kept, "requeued"),
        ("orphan", mirror.key, "docs/stray.txt", ""),
    ]
    assert row_of(mirror, kept).status == Status.QUEUED
    assert row_of(storage, kept).status == Status.DONE


def test_a_checksum_mismatch_of_the_same_size(
    make_storage: Callable[..., QueuedStorage],
) -> None:
    storage = make_storage(
        remote="django.core.files.storage.FileSystemStorage", verify_checksum=True
    )
    name = storage.save("same.txt", ContentFile(b"abcdef"))
    drained(storage)
    put_remote(storage, name, b"ABCDEF")
    found: list[Finding] = []
    Audit(storage, AuditOptions(), fields=[], found=found.append).run()
    assert found == []  # sizes only
    Audit(storage, AuditOptions(checksum=True), fields=[], found=found.append).run()
    assert [(f.kind, f.name) for f in found] == [("checksum_mismatch", name)]


def test_the_ledger_is_read_in_the_remotes_name_order(
    make_storage: Callable[..., QueuedStorage],
) -> None:
    """Names whose order depends on the collation (case, accents, spaces,
    punctuation against "/"): a database that sorted them otherwise than the
    remote's listing would make the merge report rows as missing and files as
    orphans."""
    storage = make_storage(remote="django.core.files.storage.FileSystemStorage")
    names = ["a b.txt", "a.txt", "a/b.txt", "a0.txt", "B.txt", "b", "é.txt", "e.txt"]
    for name in names:
        assert storage.save(name, ContentFile(b"x")) == name
    drained(storage)
    found: list[Finding] = []
    counts = Audit(
        storage, AuditOptions(batch_size=3), fields=[], found=found.append
    ).run()
    assert found == []
    assert (counts.listed, counts.rows) == (len(names), len(names))


def test_keyset_pages_read_every_row_once_in_name_order(
    make_storage: Callable[..., QueuedStorage],
) -> None:
    """The pages MySQL and MariaDB read the ledger in (their driver buffers a
    whole result), tried here on every database."""
    storage = make_storage()
    names = ["b", "a/b.txt", "a.txt", "é.txt", "a b.txt", "B.txt"]
    for name in names:
        storage.save(name, ContentFile(b"x"))
    rows = PendingTransfer.objects.filter(storage_key=storage.key).order_by("name")
    if connections[rows.db].vendor == "postgresql":
        rows = rows.alias(ordered=Collate("name", "C")).order_by("ordered")
        order = "ordered"
    else:
        order = "name"
    found = [row.name for row in keyset_pages(rows, order, "", 2)]
    assert found == sorted(names)
    assert [row.name for row in keyset_pages(rows, order, "a/b.txt", 4)] == (
        sorted(names)[4:]
    )
