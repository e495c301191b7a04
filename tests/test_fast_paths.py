"""The cheap paths, and that they keep every invariant: verified transfers recorded
in one compare-and-set UPDATE per batch (a stale row still loses alone), worker
threads kept for a whole drain, ledger states read ahead for a page of files, and
create-only S3 uploads instead of a HEAD request per new file."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import Storage
from django.db import connection, connections, transaction
from django.db.models import F
from django.template import Context, Template
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from queued_storage import (
    claim_size,
    completions,
    conditional,
    prefetch_files,
    prefetch_locations,
    registry,
)
from queued_storage.backends import QueuedStorage
from queued_storage.conf import settings as conf
from queued_storage.errors import Outcome
from queued_storage.models import PendingTransfer
from queued_storage.signals import file_transferred
from queued_storage.tasks import Transfer
from queued_storage.transfer import Verified, complete, transfer_row
from queued_storage.worker import drain
from tests.helpers import content, read_bytes
from tests.s3 import s3_client
from tests.testapp.models import Document

pytestmark = pytest.mark.django_db

Status = PendingTransfer.Status


def done_updates(captured: CaptureQueriesContext) -> list[str]:
    """The UPDATE statements that recorded rows as done."""
    return [
        query["sql"]
        for query in captured.captured_queries
        if query["sql"].lstrip().upper().startswith("UPDATE")
        and "'done'" in query["sql"]
        and "transferred_at" in query["sql"]
    ]


@pytest.fixture
def transferred_signals() -> Iterator[list[tuple[str, str]]]:
    """(name, status of its row when the signal came) per file_transferred."""
    seen: list[tuple[str, str]] = []

    def receiver(sender: Any, name: str, storage: QueuedStorage, **kw: Any) -> None:
        row = PendingTransfer.objects.for_name(storage.key, name).get()
        seen.append((name, row.status))

    file_transferred.connect(receiver, weak=False)
    yield seen
    file_transferred.disconnect(receiver)


# Verified transfers recorded together


@pytest.mark.usefixtures("whole_batch_claims")  # one claim of all ten
def test_a_drain_records_a_batch_of_transfers_with_one_update(
    storage: QueuedStorage,
    transferred_signals: list[tuple[str, str]],
    django_capture_on_commit_callbacks: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One claim, recorded at its end: a loaded machine must not stretch the
    # copies over the 50 ms that records a group early, nor shrink the claim.
    monkeypatch.setattr(claim_size, "clock", lambda: 0.0)
    monkeypatch.setattr(completions, "COMPLETE_AFTER", 3600.0)
    names = [storage.save(f"f{i}.txt", content(f"file {i}")) for i in range(10)]

    with (
        django_capture_on_commit_callbacks(execute=True),
        CaptureQueriesContext(connection) as captured,
    ):
        stats = drain(keys=[storage.key])

    assert stats.done == 10
    assert len(done_updates(captured)) == 1
    assert set(
        PendingTransfer.objects.filter(storage_key=storage.key).values_list(
            "status", flat=True
        )
    ) == {Status.DONE}
    assert sorted(transferred_signals) == sorted((n, Status.DONE) for n in names)


def test_a_stale_row_in_a_batch_loses_its_compare_and_set_alone(
    storage: QueuedStorage,
    transferred_signals: list[tuple[str, str]],
    django_capture_on_commit_callbacks: Any,
) -> None:
    names = [storage.save(f"f{i}.txt", content(f"file {i}")) for i in range(3)]
    rows = PendingTransfer.objects.filter(storage_key=storage.key).claim_due(
        limit=3, lease=60
    )
    verified = [transfer_row(row) for row in rows]
    assert all(isinstance(item, Verified) for item in verified)
    stale = rows[1]
    # A re-save of the name while the worker held it: a newer generation.
    PendingTransfer.objects.filter(pk=stale.pk).update(generation=F("generation") + 1)

    with django_capture_on_commit_callbacks(execute=True):
        outcomes = complete(verified)  # type: ignore[arg-type]

    assert outcomes == [Outcome.DONE, Outcome.STALE, Outcome.DONE]
    stale.refresh_from_db()
    assert stale.status == Status.QUEUED  # handed back for the newer content
    assert stale.lease_token == ""
    others = [row for row in rows if row.pk != stale.pk]
    for row in others:
        row.refresh_from_db()
        assert row.status == Status.DONE
    assert sorted(transferred_signals) == sorted(
        (row.name, Status.DONE) for row in others
    )
    assert stale.name in names


def test_transfer_and_delete_removes_local_copies_only_after_the_batch_commit(
    make_storage: Callable[..., QueuedStorage],
    django_capture_on_commit_callbacks: Any,
) -> None:
    storage = make_storage(task="queued_storage.tasks.TransferAndDelete")
    names = [storage.save(f"f{i}.txt", content(f"file {i}")) for i in range(5)]

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        stats = drain(keys=[storage.key])
    assert stats.done == 5
    assert all(storage.local.exists(name) for name in names)  # not committed yet

    for callback in callbacks:
        callback()
    assert not any(storage.local.exists(name) for name in names)
    assert all(storage.remote.exists(name) for name in names)
    assert all(
        read_bytes(storage, name) == f"file {i}".encode()
        for i, name in enumerate(names)
    )


def test_a_failing_receiver_stops_nothing_else_in_its_batch(
    make_storage: Callable[..., QueuedStorage],
    django_capture_on_commit_callbacks: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    storage = make_storage(task="queued_storage.tasks.TransferAndDelete")
    names = [storage.save(f"f{i}.txt", content(f"file {i}")) for i in range(3)]
    seen: list[str] = []

    def receiver(sender: Any, name: str, **kwargs: Any) -> None:
        seen.append(name)
        if name == names[0]:
            raise RuntimeError("a receiver's bug")

    file_transferred.connect(receiver, weak=False)
    try:
        with django_capture_on_commit_callbacks(execute=True):
            stats = drain(keys=[storage.key])
    finally:
        file_transferred.disconnect(receiver)

    assert stats.done == 3
    assert sorted(seen) == sorted(names)
    assert not any(storage.local.exists(name) for name in names)
    assert "after-transfer work failed" in caplog.text
    assert "a receiver's bug" in caplog.text


class ThreadRecordingTransfer(Transfer):
    """Counts the threads that ran transfers (a thread-local, since the ids of
    threads that ended are given to new ones)."""

    seen = threading.local()
    threads: ClassVar[list[str]] = []

    def transfer(
        self, name: str, local: Storage, remote: Storage, **kwargs: Any
    ) -> bool:
        if not getattr(self.seen, "counted", False):
            self.seen.counted = True
            self.threads.append(threading.current_thread().name)
        return super().transfer(name, local, remote, **kwargs)


@pytest.mark.django_db(transaction=True)
def test_worker_threads_last_the_whole_drain(
    make_storage: Callable[..., QueuedStorage],
) -> None:
    storage = make_storage(task=f"{__name__}.ThreadRecordingTransfer")
    for i in range(20):
        storage.save(f"f{i}.txt", content(f"file {i}"))
    ThreadRecordingTransfer.threads.clear()

    stats = drain(keys=[storage.key], concurrency=4, batch_size=5)

    assert stats.done == 20
    # Four batches of five: new threads per batch would have been up to 16.
    assert 1 < len(ThreadRecordingTransfer.threads) <= 4
    assert threading.current_thread().name not in ThreadRecordingTransfer.threads


# The save path


def test_a_save_of_a_new_name_costs_one_ledger_query(
    storage: QueuedStorage,
    make_storage: Callable[..., QueuedStorage],
    django_assert_num_queries: Any,
) -> None:
    with django_assert_num_queries(1):  # the row, inserted unless the name has one
        name = storage.save("a.txt", content())

    row = PendingTransfer.objects.for_name(storage.key, name).get()
    assert (row.status, row.size, row.generation > 0) == (Status.QUEUED, 11, True)
    assert (row.deleted, row.remote_owned, row.attempts) == (False, False, 0)
    assert (row.lease_token, row.lease_expires_at, row.transferred_at) == (
        "",
        None,
        None,
    )
    assert (row.last_error, row.error_history, row.checksum) == ("", [], "")
    assert row.host == conf.QUEUED_STORAGE_HOSTNAME
    assert row.next_attempt_at == row.created_at == row.updated_at
    assert abs((timezone.now() - row.created_at).total_seconds()) < 60
    assert read_bytes(storage.local, name) == b"hello world"
    held = make_storage(delayed=True)
    row = PendingTransfer.objects.for_name(
        held.key, held.save("b.txt", content())
    ).get()
    assert (row.status, row.next_attempt_at) == (Status.HELD, None)


def test_a_taken_name_is_found_by_the_refused_insert(
    storage: QueuedStorage, django_assert_num_queries: Any
) -> None:
    first = storage.save("a.txt", content("first"))
    storage.local.delete(first)  # as after TransferAndDelete: only the row says so

    with django_assert_num_queries(3):  # refused insert, the row's state, insert
        second = storage.save("a.txt", content("second"))

    assert second != first
    rows = PendingTransfer.objects.filter(storage_key=storage.key)
    assert sorted(rows.values_list("name", "size")) == sorted([(first, 5), (second, 6)])


def test_a_large_file_gets_its_row_after_it_is_written(
    storage: QueuedStorage,
    django_assert_num_queries: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("queued_storage.saving.SMALL_FILE", 5)
    written: list[bool] = []
    save = storage.local.save

    def watch(name: str, *args: Any, **kwargs: Any) -> str:
        written.append(PendingTransfer.objects.for_name(storage.key, name).exists())
        return save(name, *args, **kwargs)

    monkeypatch.setattr(storage.local, "save", watch)
    with django_assert_num_queries(3):  # is the name free? + the row (+ the probe)
        name = storage.save("big.bin", content("more than five bytes"))

    assert written == [False]
    assert PendingTransfer.objects.for_name(storage.key, name).get().size == 20


@pytest.fixture
def with_local(
    make_storage: Callable[..., QueuedStorage],
) -> Iterator[Callable[[str], QueuedStorage]]:
    """Build a QueuedStorage whose local storage is the class at a dotted path."""
    built: list[str] = []

    def make(local: str) -> QueuedStorage:
        plain = make_storage()
        storage = QueuedStorage(
            local,
            plain.remote_path,
            local_options=plain.local_options,
            remote_options=plain.remote_options,
            key=f"{plain.key}-{local.rsplit('.', 1)[-1].lower()}",
        )
        built.append(storage.key)
        return storage

    yield make
    for key in built:
        registry.forget(key)


@pytest.mark.parametrize("atomic", [True, False], ids=["in-atomic", "autocommit"])
@pytest.mark.django_db(transaction=True)
def test_a_failed_local_write_leaves_no_row(
    with_local: Callable[[str], QueuedStorage], atomic: bool
) -> None:
    broken = with_local("tests.storages.FullDiskStorage")
    if atomic:
        with transaction.atomic():
            with pytest.raises(OSError, match="No space left"):
                broken.save("a.txt", content())
            # The caller's transaction goes on after the error.
            Document.objects.create(file="kept.txt")
    else:
        with pytest.raises(OSError, match="No space left"):
            broken.save("a.txt", content())

    assert not PendingTransfer.objects.filter(storage_key=broken.key).exists()
    assert Document.objects.filter(file="kept.txt").count() == int(atomic)


@pytest.mark.django_db(transaction=True)
def test_in_autocommit_the_row_is_not_seen_before_its_file(
    storage: QueuedStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bool] = []
    save = storage.local.save

    def look_from_another_connection(name: str, *args: Any, **kwargs: Any) -> str:
        def look() -> None:
            try:
                seen.append(PendingTransfer.objects.filter(name=name).exists())
            finally:
                connections.close_all()

        thread = threading.Thread(target=look)
        thread.start()
        thread.join(10)
        return save(name, *args, **kwargs)

    monkeypatch.setattr(storage.local, "save", look_from_another_connection)
    name = storage.save("a.txt", content())

    assert seen == [False]
    assert PendingTransfer.objects.for_name(storage.key, name).get().size == 11


def test_a_name_the_local_storage_finds_taken_gets_the_row_it_chose(
    with_local: Callable[[str], QueuedStorage],
) -> None:
    storage = with_local("tests.storages.OverlookingStorage")
    # Written by a racing save after the name was checked, without a row yet.
    taken = Path(storage.local.path("a.txt"))
    taken.parent.mkdir(parents=True, exist_ok=True)
    taken.write_bytes(b"another's")

    name = storage.save("a.txt", content("mine"))

    assert name != "a.txt"
    rows = PendingTransfer.objects.filter(storage_key=storage.key)
    assert list(rows.values_list("name", "size")) == [(name, 4)]
    assert read_bytes(storage.local, name) == b"mine"


def test_a_local_storage_that_changes_the_bytes_gets_the_size_it_wrote(
    with_local: Callable[[str], QueuedStorage],
) -> None:
    storage = with_local("tests.storages.TruncatingStorage")

    name = storage.save("a.txt", content("hello world"))

    row = PendingTransfer.objects.for_name(storage.key, name).get()
    assert row.size == storage.local.size(name) == 10


def test_a_checksum_is_recorded_for_a_reserved_row(
    make_storage: Callable[..., QueuedStorage],
) -> None:
    storage = make_storage(verify_checksum=True)

    name = storage.save("a.txt", content())

    row = PendingTransfer.objects.for_name(storage.key, name).get()
    assert row.checksum == hashlib.sha256(b"hello world").hexdigest()


# Reading ahead for a page of files

PAGE = Template("{% for doc in docs %}{{ doc.file.url }}\n{% endfor %}")


@pytest.fixture
def documents(django_capture_on_commit_callbacks: Any) -> list[Document]:
    docs = [
        Document.objects.create(file=ContentFile(b"x", name=f"{i}.txt"))
        for i in range(100)
    ]
    drain()
    for doc in docs[:3]:  # a few still on their way
        PendingTransfer.objects.filter(name=doc.file.name).update(status=Status.QUEUED)
    return docs


def test_prefetch_files_renders_a_page_of_urls_with_one_query(
    documents: list[Document], django_assert_num_queries: Any
) -> None:
    expected = PAGE.render(Context({"docs": documents}))

    with django_assert_num_queries(1), prefetch_files(documents) as docs:
        html = PAGE.render(Context({"docs": docs}))

    assert html == expected
    urls = html.split()
    assert urls[0].startswith("/media/") and urls[99].startswith("https://remote")


def test_prefetch_files_takes_a_queryset(
    documents: list[Document], django_assert_num_queries: Any
) -> None:
    # One query for the documents, one for the ledger.
    with (
        django_assert_num_queries(2),
        prefetch_files(Document.objects.order_by("pk")) as docs,
    ):
        html = PAGE.render(Context({"docs": docs}))
    assert len(html.split()) == 100


def test_prefetch_locations_reads_a_list_of_names_once(
    storage: QueuedStorage, django_assert_num_queries: Any
) -> None:
    names = [storage.save(f"n{i}.txt", content()) for i in range(100)]
    drain(keys=[storage.key])

    with (
        django_assert_num_queries(1),
        prefetch_locations(storage, [*names, "never-saved.txt"]),
    ):
        urls = [storage.url(name) for name in names]
        assert all(storage.exists(name) for name in names)
        assert storage.size(names[0]) == 11

    assert urls == [f"https://remote.example/n{i}.txt" for i in range(100)]


def test_prefetched_states_end_with_their_block(
    storage: QueuedStorage,
) -> None:
    name = storage.save("a.txt", content())
    with prefetch_locations(storage, [name]):
        assert storage.url(name) == "/media/a.txt"
    drain(keys=[storage.key])

    assert storage.url(name) == "https://remote.example/a.txt"
    with prefetch_locations(storage, [name]):
        assert storage.url(name) == "https://remote.example/a.txt"


def test_a_delete_inside_a_prefetch_block_is_seen_at_once(
    storage: QueuedStorage,
) -> None:
    name = storage.save("a.txt", content())
    drain(keys=[storage.key])

    with prefetch_locations(storage, [name]):
        assert storage.exists(name)
        storage.delete(name)
        assert not storage.exists(name)
        with pytest.raises(FileNotFoundError):
            storage.open(name)


def test_prefetched_states_stay_in_their_thread(
    storage: QueuedStorage, django_assert_num_queries: Any
) -> None:
    name = storage.save("a.txt", content())
    seen: list[Any] = []

    def other_thread() -> None:
        from queued_storage import prefetch

        seen.append(prefetch.prefetched(storage.key, name))

    with prefetch_locations(storage, [name]):
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()

    from queued_storage.prefetch import NotRead

    assert len(seen) == 1 and isinstance(seen[0], NotRead)


# Create-only uploads to S3


def record_requests(storage: QueuedStorage) -> list[str]:
    """The S3 operations the storage's client sends from now on, in order."""
    sent: list[str] = []

    def record(model: Any, params: Any, **kwargs: Any) -> None:
        sent.append(model.name)

    events = storage.remote.connection.meta.client.meta.events  # type: ignore[attr-defined]
    events.register("before-call.s3", record)
    return sent


def test_a_create_only_upload_sends_no_head_request_first(
    make_s3_storage: Callable[..., QueuedStorage],
) -> None:
    storage = make_s3_storage(create_only_uploads=True)
    name = storage.save("a.txt", content("hello"))
    sent = record_requests(storage)

    assert drain(keys=[storage.key]).done == 1

    # No size check either: S3 validated the upload against a CRC32 and returned
    # it, and that is the local file's.
    assert sent == ["PutObject"]
    with storage.open(name) as opened:
        assert opened.read() == b"hello"


def test_a_multipart_upload_has_its_size_read_back(
    make_s3_storage: Callable[..., QueuedStorage],
) -> None:
    """The checksum that completes a multipart upload is not the whole file's."""
    from boto3.s3.transfer import TransferConfig

    storage = make_s3_storage(
        create_only_uploads=True,
        remote_options={
            "transfer_config": TransferConfig(
                multipart_threshold=5 * 1024 * 1024, use_threads=False
            )
        },
    )
    name = storage.save("big.bin", ContentFile(os.urandom(6 * 1024 * 1024)))
    sent = record_requests(storage)

    def composite(parsed: dict[str, Any], **kwargs: Any) -> None:
        # What AWS S3 answers for parts sent with CRC32s: a checksum of checksums.
        parsed["ChecksumCRC32"] = "q5cVtA==-2"

    events = storage.remote.connection.meta.client.meta.events  # type: ignore[attr-defined]
    events.register("after-call.s3.CompleteMultipartUpload", composite)

    assert drain(keys=[storage.key]).done == 1

    assert sent[0] == "CreateMultipartUpload"
    assert sent[-2:] == ["CompleteMultipartUpload", "HeadObject"]
    assert storage.size(name) == 6 * 1024 * 1024


def test_without_a_returned_checksum_the_size_is_read_back(
    make_s3_storage: Callable[..., QueuedStorage],
) -> None:
    from botocore.config import Config

    storage = make_s3_storage(
        create_only_uploads=True,
        remote_options={
            "client_config": Config(request_checksum_calculation="when_required")
        },
    )
    storage.save("a.txt", content("hello"))
    sent = record_requests(storage)

    assert drain(keys=[storage.key]).done == 1

    assert sent == ["PutObject", "HeadObject"]  # the upload, then its size check


def test_a_returned_checksum_that_is_not_the_local_files_is_retried(
    make_s3_storage: Callable[..., QueuedStorage], monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = make_s3_storage(create_only_uploads=True)
    name = storage.save("a.txt", content("hello"))
    keep = conditional._keep_checksums

    def garbled(http_response: Any, parsed: dict[str, Any], **kwargs: Any) -> None:
        keep(http_response, {**parsed, "ChecksumCRC32": "AAAAAA=="}, **kwargs)

    monkeypatch.setattr(conditional, "_keep_checksums", garbled)

    stats = drain(keys=[storage.key])

    row = PendingTransfer.objects.for_name(storage.key, name).get()
    assert (stats.done, stats.retried, row.status) == (0, 1, Status.QUEUED)
    assert "ChecksumMismatch" in row.last_error


def test_a_custom_endpoint_asks_before_uploading_unless_told_otherwise(
    make_s3_storage: Callable[..., QueuedStorage],
) -> None:
    storage = make_s3_storage()
    storage.save("a.txt", content("hello"))
    sent = record_requests(storage)

    assert drain(keys=[storage.key]).done == 1

    assert sent == ["HeadObject", "PutObject"]


@pytest.mark.parametrize("size", [5, 6 * 1024 * 1024], ids=["put", "multipart"])
def test_a_create_only_upload_never_overwrites_an_unknown_object(
    make_s3_storage: Callable[..., QueuedStorage], s3_endpoint: str, size: int
) -> None:
    from boto3.s3.transfer import TransferConfig

    storage = make_s3_storage(
        create_only_uploads=True,
        remote_options={
            "transfer_config": TransferConfig(
                multipart_threshold=5 * 1024 * 1024,
                multipart_chunksize=5 * 1024 * 1024,
            )
        },
    )
    bucket = storage.remote.bucket_name  # type: ignore[attr-defined]
    client = s3_client(s3_endpoint)
    client.put_object(Bucket=bucket, Key="a.bin", Body=b"theirs")
    storage.save("a.bin", ContentFile(os.urandom(size)))

    stats = drain(keys=[storage.key])

    assert stats.failed == 1
    row = PendingTransfer.objects.for_name(storage.key, "a.bin").get()
    assert row.status == Status.FAILED
    assert "already has an object" in row.last_error
    assert row.remote_owned is False
    assert client.get_object(Bucket=bucket, Key="a.bin")["Body"].read() == b"theirs"


def test_refused_recognises_s3_conditional_write_errors() -> None:
    from botocore.exceptions import ClientError

    def error(code: str) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": ""}}, "PutObject")

    assert conditional.refused(error("PreconditionFailed"))
    assert conditional.refused(error("ConditionalRequestConflict"))
    assert not conditional.refused(error("AccessDenied"))
    assert not conditional.refused(ValueError("no response"))
    try:
        try:
            raise error("PreconditionFailed")
        except ClientError as exc:
            raise RuntimeError("upload failed") from exc
    except RuntimeError as wrapped:
        assert conditional.refused(wrapped)


def test_create_only_applies_to_the_stock_hook_only(
    make_s3_storage: Callable[..., QueuedStorage], tmp_path: Path
) -> None:
    storage = make_s3_storage(
        create_only_uploads=True, task=f"{__name__}.ThreadRecordingTransfer"
    )
    storage.save("a.txt", content("hello"))
    sent = record_requests(storage)

    assert drain(keys=[storage.key]).done == 1

    assert sent[0] == "HeadObject"  # a custom hook may write anything: ask first
