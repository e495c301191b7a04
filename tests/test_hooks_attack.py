"""Attacks on the hook contract: a hook whose retry limits no worker can use, a
hook that stops the worker, a hook whose stock copy is for another name, and
delegating hooks on S3 with several worker threads."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import unquote

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import Storage

from queued_storage.backends import QueuedStorage
from queued_storage.errors import Outcome
from queued_storage.models import PendingTransfer
from queued_storage.stats import DrainStats
from queued_storage.tasks import Transfer
from queued_storage.transfer import process_row
from queued_storage.worker import drain
from tests.helpers import ALWAYS_FAILING, FLAKY, content, read_bytes, row_of
from tests.hooks import RecordingTransfer
from tests.s3 import S3_OPTIONS, late_worker_outcome, make_bucket, s3_client

pytestmark = pytest.mark.django_db

Status = PendingTransfer.Status


def limited(**limits: Any) -> type[Transfer]:
    return type("Limited", (Transfer,), dict(limits))


# Retry limits no worker can use: the attempt's error is recorded, not retried


@pytest.mark.parametrize(
    ("limits", "problem"),
    [
        ({"max_retries": "three"}, "Limited.max_retries is 'three'"),
        ({"max_retries": float("nan")}, "Limited.max_retries is nan"),
        ({"max_retries": float("inf")}, "Limited.max_retries is inf"),
        ({"max_retries": -1}, "Limited.max_retries is -1"),
        ({"max_retries": 2.5}, "Limited.max_retries is 2.5"),
        ({"default_retry_delay": "soon"}, "Limited.default_retry_delay is 'soon'"),
        ({"default_retry_delay": float("nan")}, "Limited.default_retry_delay is nan"),
        ({"default_retry_delay": float("inf")}, "Limited.default_retry_delay is inf"),
    ],
)
def test_a_failure_under_unusable_hook_limits_is_recorded_and_not_retried(
    make_storage: Callable[..., QueuedStorage],
    run_drain: Callable[..., DrainStats],
    limits: dict[str, Any],
    problem: str,
) -> None:
    """It was a crash that could not be recorded either: the row stayed
    transferring, to be claimed again at the end of every lease, for ever, its
    error only in the log."""
    storage = make_storage(
        remote=FLAKY, remote_options=ALWAYS_FAILING, task=limited(**limits)
    )
    name = storage.save("a.txt", content())

    assert run_drain().failed == 1

    row = row_of(storage, name)
    assert (row.status, row.attempts, row.lease_token) == (Status.FAILED, 1, "")
    assert row.last_error.startswith(
        f"ConnectionError: remote unreachable (not retried: {problem}"
    )


def test_usable_limits_of_odd_types_still_work(
    make_storage: Callable[..., QueuedStorage],
    run_drain: Callable[..., DrainStats],
) -> None:
    storage = make_storage(
        remote=FLAKY,
        remote_options={"failures": 2},
        task=limited(max_retries=2.0, default_retry_delay=0),
    )
    name = storage.save("a.txt", content())

    run_drain()

    row = row_of(storage, name)
    assert (row.status, row.attempts) == (Status.DONE, 3)


def test_a_setting_made_unusable_after_the_claim_still_records_the_failure(
    make_storage: Callable[..., QueuedStorage],
    settings: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    storage = make_storage(remote=FLAKY, remote_options=ALWAYS_FAILING)
    name = storage.save("a.txt", content())
    [row] = PendingTransfer.objects.claim_due(limit=1, lease=300)
    settings.QUEUED_STORAGE_RETRY_DELAY = "60"

    with django_capture_on_commit_callbacks(execute=True):
        process_row(row)

    row = row_of(storage, name)
    assert (row.status, row.lease_token) == (Status.FAILED, "")
    assert "(not retried: QUEUED_STORAGE_RETRY_DELAY is '60'" in row.last_error


# A hook that stops the worker: the attempt is recorded first


class Stopping(Transfer):
    raised: type[BaseException] = SystemExit

    def transfer(
        self, name: str, local: Storage, remote: Storage, **kwargs: Any
    ) -> bool:
        raise self.raised("the hook stops the worker")


class StoppingWhenBuilt(Transfer):
    def __init__(self) -> None:
        raise SystemExit("the hook's constructor stops the worker")


@pytest.mark.parametrize("raised", [SystemExit, KeyboardInterrupt, GeneratorExit])
def test_a_hook_that_stops_the_worker_has_its_attempt_recorded(
    make_storage: Callable[..., QueuedStorage],
    run_drain: Callable[..., DrainStats],
    settings: Any,
    raised: type[BaseException],
) -> None:
    """The drain stops, as the hook asked; the row was left transferring before,
    unrecorded, to stop every worker that claimed it after its lease, for ever."""
    settings.QUEUED_STORAGE_RETRIES = 1
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    hook = type("Stop", (Stopping,), {"raised": raised})
    storage = make_storage(task=hook)
    name = storage.save("a.txt", content())

    with pytest.raises(raised):
        run_drain()

    row = row_of(storage, name)
    assert (row.status, row.attempts, row.lease_token) == (Status.QUEUED, 1, "")
    assert row.last_error == f"{raised.__name__}: the hook stops the worker"
    with pytest.raises(raised):
        run_drain()
    row = row_of(storage, name)
    assert (row.status, row.attempts) == (Status.FAILED, 2)  # out of attempts


def test_a_hook_constructor_that_stops_the_worker_has_its_attempt_recorded(
    make_storage: Callable[..., QueuedStorage],
    run_drain: Callable[..., DrainStats],
) -> None:
    storage = make_storage(task=StoppingWhenBuilt)
    name = storage.save("a.txt", content())

    with pytest.raises(SystemExit):
        run_drain()

    row = row_of(storage, name)
    assert (row.status, row.lease_token) == (Status.QUEUED, "")
    assert row.last_error.startswith("SystemExit: the hook's constructor stops")
    assert row.remote_owned is False  # stopped before any upload


# A stock copy of another name is the hook's own business


class CopiesAnotherNameFirst(Transfer):
    """Copies a file that is not the attempt's (it fails), then its own."""

    answers: list[bool] = []

    def transfer(
        self, name: str, local: Storage, remote: Storage, **kwargs: Any
    ) -> bool:
        self.answers.append(super().transfer("missing.txt", local, remote))
        self.answers.append(super().transfer(name, local, remote))
        return self.answers[-1]


def test_a_failed_stock_copy_of_another_name_is_not_the_attempts_error(
    make_storage: Callable[..., QueuedStorage],
    run_drain: Callable[..., DrainStats],
) -> None:
    CopiesAnotherNameFirst.answers = []
    storage = make_storage(task=CopiesAnotherNameFirst)
    name = storage.save("a.txt", content("mine"))

    assert run_drain().done == 1

    assert CopiesAnotherNameFirst.answers == [False, True]
    row = row_of(storage, name)
    assert (row.status, row.last_error) == (Status.DONE, "")
    assert read_bytes(storage.remote, name) == b"mine"


# S3: a delegating hook's side objects, on several worker threads


class WithThumbnail(Transfer):
    """Writes a thumbnail beside each file, then delegates; the two attempts of a
    drain with two threads meet first, so that their uploads overlap."""

    met = threading.Barrier(2, timeout=30)

    def transfer(
        self, name: str, local: Storage, remote: Storage, **kwargs: Any
    ) -> bool:
        self.met.wait()
        remote.save(f"thumbs/{name}", ContentFile(b"small"))
        return super().transfer(name, local, remote, **kwargs)


@pytest.mark.django_db(transaction=True)
def test_if_none_match_goes_with_the_attempts_key_only_on_two_threads(
    s3_endpoint: str, make_storage: Callable[..., QueuedStorage]
) -> None:
    WithThumbnail.met = threading.Barrier(2, timeout=30)
    storage = make_storage(
        remote="storages.backends.s3.S3Storage",
        remote_options={
            **S3_OPTIONS,
            "bucket_name": make_bucket(s3_endpoint),
            "endpoint_url": s3_endpoint,
        },
        create_only_uploads=True,
        task=WithThumbnail,
    )
    sent: dict[str, str | None] = {}
    lock = threading.Lock()

    def record(params: dict[str, Any], **kwargs: Any) -> None:
        key = unquote(params["url_path"].lstrip("/"))
        with lock:
            sent[key] = params["headers"].get("If-None-Match")

    storage.remote.save("made-the-bucket.txt", ContentFile(b"client"))
    events = storage.remote.bucket.meta.client.meta.events  # type: ignore[attr-defined]
    events.register("before-call.s3.PutObject", record)
    for name in ("a.txt", "b.txt"):
        storage.save(name, ContentFile(b"original"))

    assert drain(keys=[storage.key], concurrency=2).done == 2

    assert sent == {
        "a.txt": "*",
        "b.txt": "*",
        "thumbs/a.txt": None,
        "thumbs/b.txt": None,
    }


# The stock copy's error belongs to its attempt only


@pytest.mark.parametrize(
    "concurrency",
    [1, pytest.param(2, marks=pytest.mark.django_db(transaction=True))],
)
def test_a_failed_copy_of_one_row_is_not_the_next_rows_error(
    make_storage: Callable[..., QueuedStorage],
    settings: Any,
    concurrency: int,
) -> None:
    """The same thread (or another) runs the next row's hook after a stock copy
    failed: that row's copy runs, and succeeds, on its own."""
    settings.QUEUED_STORAGE_RETRY_DELAY = 600
    RecordingTransfer.answers = []
    storage = make_storage(
        remote=FLAKY, remote_options={"failures": 1}, task=RecordingTransfer
    )
    names = [storage.save(n, content(n)) for n in ("a.txt", "b.txt", "c.txt")]

    stats = drain(keys=[storage.key], concurrency=concurrency)

    assert (stats.done, stats.retried) == (2, 1)
    assert sorted(RecordingTransfer.answers) == [False, True, True]
    rows = [row_of(storage, name) for name in names]
    assert sorted(row.last_error for row in rows) == [
        "",
        "",
        "ConnectionError: remote unreachable",
    ]


class CopiesOnAnotherThread(RecordingTransfer):
    """Runs the base copy on a thread of its own, as a hook with its own timeout
    might."""

    def transfer(
        self, name: str, local: Storage, remote: Storage, **kwargs: Any
    ) -> bool:
        with ThreadPoolExecutor(max_workers=1) as pool:
            copy = pool.submit(Transfer.transfer, self, name, local, remote)
            answer = copy.result(timeout=30)
        self.answers.append(answer)
        return answer


def test_a_copy_on_another_thread_of_the_hook_is_the_attempts(
    make_storage: Callable[..., QueuedStorage],
    run_drain: Callable[..., DrainStats],
    settings: Any,
) -> None:
    settings.QUEUED_STORAGE_RETRY_DELAY = 600
    RecordingTransfer.answers = []
    storage = make_storage(
        remote=FLAKY, remote_options={"failures": 1}, task=CopiesOnAnotherThread
    )
    name = storage.save("a.txt", content())

    run_drain()

    assert RecordingTransfer.answers == [False]
    row = row_of(storage, name)
    assert row.last_error == "ConnectionError: remote unreachable"


def test_a_copy_on_another_thread_of_the_hook_keeps_if_none_match(
    s3_endpoint: str, make_storage: Callable[..., QueuedStorage]
) -> None:
    storage = make_storage(
        remote="storages.backends.s3.S3Storage",
        remote_options={
            **S3_OPTIONS,
            "bucket_name": make_bucket(s3_endpoint),
            "endpoint_url": s3_endpoint,
        },
        create_only_uploads=True,
        task=CopiesOnAnotherThread,
    )
    sent: list[str | None] = []

    def record(params: dict[str, Any], **kwargs: Any) -> None:
        sent.append(params["headers"].get("If-None-Match"))

    storage.remote.save("made-the-bucket.txt", ContentFile(b"client"))
    events = storage.remote.bucket.meta.client.meta.events  # type: ignore[attr-defined]
    events.register("before-call.s3.PutObject", record)
    storage.save("a.txt", ContentFile(b"original"))

    assert drain(keys=[storage.key]).done == 1

    assert sent == ["*"]


# S3 that renames taken names: a delegating hook's delete of its earlier upload


@pytest.mark.django_db(transaction=True)
def test_s3_refuses_a_late_delete_of_the_earlier_upload_by_a_delegating_hook(
    s3_endpoint: str, make_s3_storage: Callable[..., QueuedStorage]
) -> None:
    """With ``file_overwrite=False`` S3Storage renames a taken name, so a custom
    hook's attempt deletes its row's earlier upload first. A worker checks its
    lease for that delete, then stops before it reaches S3; its lease runs out,
    another worker finishes the row, and the name is saved and transferred again.
    The late delete carries If-Match with the ETag seen before the check, and S3
    refuses it: the newest version stays."""
    storage = make_s3_storage(
        remote_options={"file_overwrite": False},
        local_options={"allow_overwrite": True},
        create_only_uploads=True,
        task=RecordingTransfer,
    )

    outcome = late_worker_outcome(storage, ("DeleteObject", "DeleteObjects"))

    assert outcome is Outcome.STALE
    bucket = storage.remote.bucket_name  # type: ignore[attr-defined]
    stored = s3_client(s3_endpoint).get_object(Bucket=bucket, Key="doc.txt")
    assert stored["Body"].read() == b"the newest"
    assert row_of(storage, "doc.txt").status == Status.DONE


@pytest.mark.parametrize("hook", [Transfer, RecordingTransfer])
@pytest.mark.parametrize("create_only", [True, False])
def test_a_new_version_replaces_the_old_on_s3_that_renames_taken_names(
    make_s3_renaming: Callable[..., QueuedStorage],
    hook: type[Transfer],
    create_only: bool,
) -> None:
    storage = make_s3_renaming(task=hook, create_only_uploads=create_only)
    name = storage.save("doc.txt", ContentFile(b"first"))
    assert drain(keys=[storage.key]).done == 1
    storage.save("doc.txt", ContentFile(b"second, longer"))

    assert drain(keys=[storage.key]).done == 1

    row = row_of(storage, name)
    assert (row.status, row.last_error) == (Status.DONE, "")
    assert read_bytes(storage.remote, name) == b"second, longer"
    assert storage.remote.listdir("")[1] == ["doc.txt"]


@pytest.fixture
def make_s3_renaming(
    s3_endpoint: str, make_storage: Callable[..., QueuedStorage]
) -> Callable[..., QueuedStorage]:
    def make(**kwargs: Any) -> QueuedStorage:
        return make_storage(
            remote="storages.backends.s3.S3Storage",
            remote_options={
                **S3_OPTIONS,
                "bucket_name": make_bucket(s3_endpoint),
                "endpoint_url": s3_endpoint,
                "file_overwrite": False,
            },
            local_options={"allow_overwrite": True},
            **kwargs,
        )

    return make


@pytest.mark.parametrize("hook", [Transfer, RecordingTransfer])
def test_a_foreign_object_on_s3_that_renames_taken_names_is_a_conflict(
    make_s3_renaming: Callable[..., QueuedStorage],
    s3_endpoint: str,
    hook: type[Transfer],
) -> None:
    """Not a copy under another name, which the ledger would not know."""
    storage = make_s3_renaming(task=hook, create_only_uploads=True)
    bucket = storage.remote.bucket_name  # type: ignore[attr-defined]
    other = s3_client(s3_endpoint)
    other.put_object(Bucket=bucket, Key="doc.txt", Body=b"theirs")
    name = storage.save("doc.txt", ContentFile(b"ours"))

    assert drain(keys=[storage.key]).failed == 1

    row = row_of(storage, name)
    assert row.last_error.startswith("RemoteConflict: the remote already has")
    assert row.remote_owned is False
    keys = [item["Key"] for item in other.list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["doc.txt"]
    assert other.get_object(Bucket=bucket, Key="doc.txt")["Body"].read() == b"theirs"
