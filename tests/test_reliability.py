"""Integrity, conflicts, hosts, secrets, hostile names and races (the reliability
points that need no worker process; see test_workers.py and test_chaos.py)."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import SuspiciousFileOperation
from django.core.files.base import ContentFile
from django.core.files.uploadedfile import TemporaryUploadedFile
from django.test import Client

from queued_storage.backends import QueuedStorage
from queued_storage.checksums import remote_sha256
from queued_storage.models import PendingTransfer
from queued_storage.transfer import process_row
from queued_storage.worker import drain
from tests.helpers import content, root_of
from tests.s3 import S3_OPTIONS, make_bucket, moto_s3_server
from tests.storages import GatedStorage

pytestmark = pytest.mark.django_db

Make = Callable[..., QueuedStorage]


# Integrity


def test_checksum_is_computed_while_saving(make_storage: Make) -> None:
    storage = make_storage(verify_checksum=True)
    payload = os.urandom(70_000)
    storage.save("a.bin", ContentFile(payload))
    row = PendingTransfer.objects.get(storage_key=storage.key)
    assert row.checksum == hashlib.sha256(payload).hexdigest()


def test_checksum_of_a_moved_temporary_upload(make_storage: Make) -> None:
    """FileSystemStorage moves a temporary upload instead of reading it."""
    storage = make_storage(verify_checksum=True)
    payload = os.urandom(30_000)
    upload = TemporaryUploadedFile("big.bin", "application/octet-stream", 0, None)
    upload.write(payload)
    upload.seek(0)
    upload.size = len(payload)
    storage.save("big.bin", upload)
    row = PendingTransfer.objects.get(storage_key=storage.key)
    assert row.checksum == hashlib.sha256(payload).hexdigest()


def test_a_corrupted_remote_copy_is_never_done(
    make_storage: Make, settings: Any
) -> None:
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    settings.QUEUED_STORAGE_RETRIES = 1
    storage = make_storage(
        remote="tests.storages.CorruptingStorage", verify_checksum=True
    )
    storage.save("a.bin", ContentFile(b"0123456789" * 100))
    drain()
    row = PendingTransfer.objects.get(storage_key=storage.key)
    assert row.status == "failed"
    assert row.attempts == 2  # retried
    assert "checksum mismatch" in row.last_error
    assert storage.using_local("a.bin")


def test_size_alone_misses_a_flipped_byte(make_storage: Make) -> None:
    """Why the option exists: without it the corrupted copy passes."""
    storage = make_storage(remote="tests.storages.CorruptingStorage")
    storage.save("a.bin", ContentFile(b"0123456789" * 100))
    drain()
    assert PendingTransfer.objects.get(storage_key=storage.key).status == "done"


def test_s3_checksum_comes_from_s3_when_it_keeps_sha256(make_storage: Make) -> None:
    with moto_s3_server() as endpoint:
        storage = make_storage(
            remote="storages.backends.s3.S3Storage",
            remote_options={
                **S3_OPTIONS,
                "bucket_name": make_bucket(endpoint),
                "endpoint_url": endpoint,
                "object_parameters": {"ChecksumAlgorithm": "SHA256"},
            },
            verify_checksum=True,
        )
        payload = os.urandom(10_000)
        storage.save("s.bin", ContentFile(payload))
        drain()
        row = PendingTransfer.objects.get(storage_key=storage.key)
        assert row.status == "done", row.last_error
        from queued_storage.checksums import _s3_sha256

        assert (
            _s3_sha256(storage.remote, "s.bin") == hashlib.sha256(payload).hexdigest()
        )
        assert remote_sha256(storage.remote, "s.bin") == row.checksum


# Never overwrite the unknown


def test_overwrite_remote_replaces_a_foreign_object(make_storage: Make) -> None:
    storage = make_storage(overwrite_remote=True)
    storage.remote.save("x.txt", ContentFile(b"stale"))
    storage.save("x.txt", content("fresh"))
    drain()
    assert PendingTransfer.objects.get(storage_key=storage.key).status == "done"
    with storage.remote.open("x.txt") as remote_copy:
        assert remote_copy.read() == b"fresh"


# More than one host


def test_host_local_storage_is_drained_only_by_its_host(
    make_storage: Make, settings: Any
) -> None:
    storage = make_storage(local_shared=False)
    settings.QUEUED_STORAGE_HOSTNAME = "web-1"
    storage.save("one.txt", content())
    settings.QUEUED_STORAGE_HOSTNAME = "web-2"
    storage.save("two.txt", content())
    assert set(PendingTransfer.objects.values_list("name", "host")) == {
        ("one.txt", "web-1"),
        ("two.txt", "web-2"),
    }
    assert drain().done == 1
    assert storage.using_remote("two.txt")
    assert storage.using_local("one.txt")
    settings.QUEUED_STORAGE_HOSTNAME = "web-1"
    assert drain().done == 1
    assert storage.using_remote("one.txt")


def test_host_local_delete_leaves_both_copies_to_the_owning_host(
    make_storage: Make, settings: Any, django_capture_on_commit_callbacks: Any
) -> None:
    """README "More than one host": a name deleted on another host is hidden at
    once, and its local and remote copies wait for its own host's worker."""
    storage = make_storage(local_shared=False)
    settings.QUEUED_STORAGE_HOSTNAME = "web-1"
    storage.save("one.txt", content())
    assert drain().done == 1
    assert storage.remote.exists("one.txt")

    settings.QUEUED_STORAGE_HOSTNAME = "web-2"
    with django_capture_on_commit_callbacks(execute=True):
        storage.delete("one.txt")
    assert not storage.exists("one.txt")
    assert drain().purged == 0
    assert storage.remote.exists("one.txt")
    assert storage.local.exists("one.txt")

    settings.QUEUED_STORAGE_HOSTNAME = "web-1"
    assert drain().purged == 1
    assert not storage.remote.exists("one.txt")
    assert not storage.local.exists("one.txt")


def test_lost_hosts_deleted_names_are_purged_from_another_host(
    make_storage: Make, settings: Any, django_capture_on_commit_callbacks: Any
) -> None:
    """README "More than one host": a drain as the lost host, on a machine
    without its disk, purges its deleted names."""
    storage = make_storage(local_shared=False)
    settings.QUEUED_STORAGE_HOSTNAME = "web-1"
    storage.save("one.txt", content())
    assert drain().done == 1
    storage.local.delete("one.txt")  # web-1's disk, gone with it

    settings.QUEUED_STORAGE_HOSTNAME = "web-2"
    with django_capture_on_commit_callbacks(execute=True):
        storage.delete("one.txt")
    settings.QUEUED_STORAGE_HOSTNAME = "web-1"
    assert drain().purged == 1
    assert not storage.remote.exists("one.txt")
    assert not PendingTransfer.objects.filter(storage_key=storage.key).exists()


def test_shared_local_storage_is_drained_by_any_host(
    make_storage: Make, settings: Any
) -> None:
    storage = make_storage()
    settings.QUEUED_STORAGE_HOSTNAME = "web-1"
    storage.save("one.txt", content())
    settings.QUEUED_STORAGE_HOSTNAME = "worker-1"
    assert drain().done == 1


# No secrets


def test_credentials_never_reach_the_ledger_logs_or_admin(
    make_storage: Make,
    caplog: pytest.LogCaptureFixture,
    admin_client: Client,
    settings: Any,
) -> None:
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    settings.QUEUED_STORAGE_RETRIES = 1
    secret = "AKIA-very-secret-value"
    storage = make_storage(
        remote="tests.storages.KeyedRemote",
        remote_options={
            "secret_key": secret,
            "url": "ftp://deploy:hunter22@files.example",
        },
    )
    storage.save("a.txt", content())
    with caplog.at_level(logging.DEBUG):
        drain()
    row = PendingTransfer.objects.get(storage_key=storage.key)
    assert row.status == "failed"
    assert "access denied" in row.last_error
    stored = str(PendingTransfer.objects.filter(pk=row.pk).values().get())
    for leaked in (secret, "hunter22"):
        assert leaked not in stored
        assert leaked not in caplog.text
    page = admin_client.get(f"/admin/queued_storage/pendingtransfer/{row.pk}/change/")
    assert page.status_code == 200
    assert secret not in page.content.decode()
    assert "[redacted]" in row.last_error


# Bad input

REJECTED = [
    "../escape.txt",
    "a/../../escape.txt",
    "a/b/../../../escape.txt",
    "..",
    ".",
    "/etc/passwd",
    "//server/share.txt",
    "\\\\server\\share.txt",
    "..\\escape.txt",
    "a\\..\\..\\escape.txt",
    "nul\x00byte.txt",
    "\x00",
    "tab\there.txt",
    "new\nline.txt",
    "carriage\rreturn.txt",
    "bell\x07.txt",
    "escape\x1b[31m.txt",
    "del\x7f.txt",
    "x" * 1025,
    "a/" * 600 + "b.txt",
    "",
    "dir/",
    "dir//file.txt",
    "./file.txt",
    "a/./b.txt",
    "trailing.",
    "trailing ",
    "dir./file.txt",
    "CON",
    "con.txt",
    "PRN.log",
    "aux.png",
    "NUL.tar.gz",
    "COM1.txt",
    "lpt9",
    "docs/Com3.txt",
    "evil\u202etxt.exe",
    "next\x85line.txt",  # C1 controls: NEL, CSI, the first and the last
    "csi\x9b31m.txt",
    "c1\x80.txt",
    "c1\x9f.txt",
    "line\u2028separator.txt",
    "paragraph\u2029separator.txt",
    "rtl\u200ffile.txt",
    "isolate\u2066x\u2069.txt",
    "arabic\u061cmark.txt",
]
#: Accepted, and kept inside the storage roots (look-alikes are ordinary letters).
KEPT = [
    "\uff0e\uff0e\uff0fescape.txt",  # fullwidth "../"
    "\u2024\u2024/x.txt",  # one-dot leaders
    "\uff43\uff4f\uff4e.txt",  # fullwidth "con"
    "e\u0301t\u00e9.txt",  # NFD: stored as NFC
    "deep/" * 20 + "file.txt",
    "spaces in name.txt",
    "com10.txt",
]


@pytest.mark.parametrize("name", REJECTED)
def test_hostile_name_is_rejected_and_changes_nothing(
    storage: QueuedStorage, name: str
) -> None:
    with pytest.raises((SuspiciousFileOperation, ValueError)):
        storage.save(name, content())
    assert not PendingTransfer.objects.exists()
    root = root_of(storage.local)
    assert not root.exists() or not any(p.is_file() for p in root.rglob("*"))


@pytest.mark.parametrize("name", KEPT)
def test_odd_name_is_kept_inside_the_roots(storage: QueuedStorage, name: str) -> None:
    saved = storage.save(name, content())
    root = root_of(storage.local).resolve()
    assert Path(storage.local.path(saved)).resolve().is_relative_to(root)
    drain()
    remote_root = root_of(storage.remote).resolve()
    assert Path(storage.remote.path(saved)).resolve().is_relative_to(remote_root)
    with storage.open(saved) as opened:
        assert opened.read() == b"hello world"


def test_nfd_spelling_of_a_taken_nfc_name_is_not_a_second_file(
    storage: QueuedStorage,
) -> None:
    first = storage.save("caf\u00e9.txt", content())
    second = storage.save("cafe\u0301.txt", content())
    assert first == "caf\u00e9.txt"
    assert second != first  # the NFC name was taken
    assert unicodedata.is_normalized("NFC", second)
    assert PendingTransfer.objects.count() == 2


@pytest.mark.parametrize(
    ("uploaded", "stored"),
    [
        ("CON.txt", "docs/_CON.txt"),
        ("report. ", "docs/report"),
        ("a\u202eb.txt", "docs/ab.txt"),
        ("a\x85b\u2028c\u2029d\x7f.txt", "docs/abcd.txt"),
    ],
)
def test_uploaded_names_are_mended_not_refused(
    fresh_storages: Any, uploaded: str, stored: str
) -> None:
    from tests.testapp.models import Document

    document = Document.objects.create(file=ContentFile(b"x", name=uploaded))
    assert document.file.name == stored


def test_local_file_missing_fails_after_retries_and_the_loop_goes_on(
    storage: QueuedStorage, settings: Any
) -> None:
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    settings.QUEUED_STORAGE_RETRIES = 2
    storage.save("lost.txt", content())
    storage.save("fine.txt", content())
    os.remove(storage.local.path("lost.txt"))
    stats = drain()
    lost = PendingTransfer.objects.get(name="lost.txt")
    assert lost.status == "failed"
    assert lost.attempts == 3
    assert "local file missing" in lost.last_error
    assert stats.done == 1
    assert PendingTransfer.objects.get(name="fine.txt").status == "done"


# Races (a remote whose upload waits on an event gives the window)


def _upload_in_background(gate: type[GatedStorage]) -> threading.Thread:
    def upload() -> None:
        from django.db import connection

        try:
            drain()
        finally:
            connection.close()

    worker = threading.Thread(target=upload)
    worker.start()
    assert gate.entered.wait(10), "the worker never started the upload"
    return worker


@pytest.mark.django_db(transaction=True)
def test_delete_then_resave_during_upload(
    make_storage: Make, gate: type[GatedStorage]
) -> None:
    storage = make_storage(remote="tests.storages.GatedStorage")
    name = storage.save("doc.txt", content("old"))
    worker = _upload_in_background(gate)
    storage.delete(name)
    assert not storage.exists(name)
    assert storage.save("doc.txt", content("new")) == name
    gate.gate.set()
    worker.join(10)
    drain()
    row = PendingTransfer.objects.get(storage_key=storage.key)
    assert (row.status, row.deleted) == ("done", False)
    with storage.open(name) as opened:
        assert opened.read() == b"new"
    with storage.remote.open(name) as remote_copy:
        assert remote_copy.read() == b"new"


@pytest.mark.django_db(transaction=True)
def test_readers_never_miss_a_file_moved_by_transfer_and_delete(
    make_storage: Make,
) -> None:
    storage = make_storage(task="queued_storage.tasks.TransferAndDelete")
    names = [storage.save(f"f{i}.txt", content(f"payload {i}")) for i in range(40)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def read_all() -> None:
        from django.db import connection

        try:
            while not stop.is_set():
                for i, name in enumerate(names):
                    with storage.open(name) as opened:
                        assert opened.read() == f"payload {i}".encode()
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    readers = [threading.Thread(target=read_all) for _ in range(2)]
    for reader in readers:
        reader.start()
    try:
        assert drain().done == 40
    finally:
        stop.set()
        for reader in readers:
            reader.join(10)
    assert errors == []
    assert not any(storage.local.exists(name) for name in names)


@pytest.mark.django_db(transaction=True)
def test_two_saves_of_one_name_at_once_keep_both_files(storage: QueuedStorage) -> None:
    barrier = threading.Barrier(2)
    saved: list[str] = []

    def save(text: str) -> None:
        from django.db import connection

        try:
            barrier.wait(5)
            saved.append(storage.save("same.txt", content(text)))
        finally:
            connection.close()

    threads = [threading.Thread(target=save, args=(t,)) for t in ("first", "second")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(set(saved)) == 2
    assert PendingTransfer.objects.filter(storage_key=storage.key).count() == 2
    texts = set()
    for name in saved:
        with storage.open(name) as opened:
            texts.add(opened.read())
    assert texts == {b"first", b"second"}


def test_stale_worker_never_deletes_a_newer_generations_object(
    make_storage: Make,
) -> None:
    storage = make_storage(local_options={"allow_overwrite": True})
    name = storage.save("v.txt", content("one"))
    (stale,) = PendingTransfer.objects.claim_due(limit=1, lease=60)
    storage.save(name, content("two"))
    PendingTransfer.objects.filter(pk=stale.pk).update(
        lease_expires_at=None, status="queued", lease_token=""
    )
    drain()
    assert storage.using_remote(name)
    process_row(stale)
    with storage.remote.open(name) as remote_copy:
        assert remote_copy.read() == b"two"
    assert PendingTransfer.objects.get(pk=stale.pk).status == "done"
