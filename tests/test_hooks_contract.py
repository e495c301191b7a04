"""The hook contract as the 0.8 docs describe it: ``Transfer.max_retries`` and
``Transfer.default_retry_delay`` are the settings' values, the base
``Transfer.transfer()`` answers ``False`` when it cannot copy (the worker still
records, and handles, what the copy raised), and the docs' ``TransferAndNotify``
works unchanged, keeping the stock copy's protections."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.files.storage import FileSystemStorage, Storage
from django.db import connections
from django.test import override_settings
from django.utils import timezone

from queued_storage.backends import QueuedStorage
from queued_storage.errors import Outcome
from queued_storage.models import PendingTransfer
from queued_storage.stats import DrainStats
from queued_storage.tasks import Transfer, TransferAndDelete
from queued_storage.transfer import process_row
from queued_storage.worker import drain
from tests.helpers import ALWAYS_FAILING, FLAKY, FS, content, read_bytes, row_of
from tests.hooks import RecordingTransfer
from tests.s3 import late_worker_outcome, s3_client

pytestmark = pytest.mark.django_db

Status = PendingTransfer.Status


# The 0.8 docs' example, verbatim (only the noqa added).

notified: list[Any] = []


def notify(result: Any) -> None:
    notified.append(result)


class TransferAndNotify(Transfer):
    def transfer(self, *args, **kwargs):
        result = super(TransferAndNotify, self).transfer(*args, **kwargs)  # noqa: UP008
        if result:
            # call the (imaginary) notify function with the result
            notify(result)
        return result


class IgnoringTransfer(RecordingTransfer):
    """Claims success whatever the base copy answered."""

    def transfer(
        self, name: str, local: Storage, remote: Storage, **kwargs: Any
    ) -> bool:
        super().transfer(name, local, remote, **kwargs)
        return True


class RaisingAfterFalseTransfer(Transfer):
    """Raises its own error when the base copy fails, however it says so."""

    def transfer(
        self, name: str, local: Storage, remote: Storage, **kwargs: Any
    ) -> bool:
        try:
            copied = super().transfer(name, local, remote, **kwargs)
        except Exception:
            copied = False
        if not copied:
            raise RuntimeError("the copy did not work")
        return True


class RecordedNotify(TransferAndNotify):
    """The docs' example, with what it answered kept."""

    answers: ClassVar[list[Any]] = []

    def transfer(self, *args: Any, **kwargs: Any) -> Any:
        answer = super().transfer(*args, **kwargs)
        self.answers.append(answer)
        return answer


class RecordingTransferAndDelete(TransferAndDelete):
    answers: ClassVar[list[bool]] = []

    def transfer(
        self, name: str, local: Storage, remote: Storage, **kwargs: Any
    ) -> bool:
        answer = super().transfer(name, local, remote, **kwargs)
        self.answers.append(answer)
        return answer


class RetryingTransfer(RecordingTransfer):
    """Calls the base copy up to three times in one attempt."""

    def transfer(
        self, name: str, local: Storage, remote: Storage, **kwargs: Any
    ) -> bool:
        for _ in range(3):
            answer = Transfer.transfer(self, name, local, remote, **kwargs)
            self.answers.append(answer)
            if answer:
                return True
        return False


class CopiesThenFalseTransfer(RecordingTransfer):
    """Copies, then asks to be retried anyway."""

    def transfer(
        self, name: str, local: Storage, remote: Storage, **kwargs: Any
    ) -> bool:
        super().transfer(name, local, remote, **kwargs)
        return False


class NotifyingTwice(TransferAndNotify):
    """The docs' example with its own retry limits."""

    max_retries = 1
    default_retry_delay = 0


class FailsOnceWhenReleased(FileSystemStorage):
    """Its first upload waits for ``release`` and then fails; ``entered`` is set
    when it starts waiting. Later uploads go through."""

    entered = threading.Event()
    release = threading.Event()
    armed = True

    def _save(self, name: str, content: Any) -> str:
        cls = type(self)
        if cls.armed:
            cls.armed = False
            cls.entered.set()
            if not cls.release.wait(timeout=30):
                raise TimeoutError("the test never released the upload")
            raise ConnectionError("the upload failed after the lease ran out")
        return super()._save(name, content)  # type: ignore[misc, no-any-return]


@pytest.fixture(autouse=True)
def fresh_records() -> Iterator[None]:
    notified.clear()
    for hook in (RecordingTransfer, RecordedNotify, RecordingTransferAndDelete):
        hook.answers.clear()
    FailsOnceWhenReleased.entered = threading.Event()
    FailsOnceWhenReleased.release = threading.Event()
    FailsOnceWhenReleased.armed = True
    yield
    FailsOnceWhenReleased.release.set()


def if_none_match_headers(storage: QueuedStorage) -> list[str | None]:
    """The ``If-None-Match`` header of each PutObject the storage's uploads send
    from now on (None: not sent)."""
    sent: list[str | None] = []

    def record(params: dict[str, Any], **kwargs: Any) -> None:
        sent.append(params["headers"].get("If-None-Match"))

    events = storage.remote.bucket.meta.client.meta.events  # type: ignore[attr-defined]
    events.register("before-call.s3.PutObject", record)
    return sent


# max_retries and default_retry_delay: the settings, unless a subclass sets them


@override_settings(QUEUED_STORAGE_RETRIES=7, QUEUED_STORAGE_RETRY_DELAY=12.5)
def test_retry_attributes_are_the_settings_on_the_class_and_an_instance() -> None:
    assert Transfer.max_retries == 7
    assert Transfer().max_retries == 7
    assert Transfer.default_retry_delay == 12.5
    assert TransferAndDelete().default_retry_delay == 12.5
    assert TransferAndNotify.max_retries == 7
    with override_settings(QUEUED_STORAGE_RETRIES=2, QUEUED_STORAGE_RETRY_DELAY=0):
        # Read when they are read, not when the class was made.
        assert (Transfer.max_retries, Transfer().default_retry_delay) == (2, 0)


def test_retry_attributes_default_to_the_settings_defaults(settings: Any) -> None:
    del settings.QUEUED_STORAGE_RETRIES
    del settings.QUEUED_STORAGE_RETRY_DELAY
    assert (Transfer.max_retries, Transfer.default_retry_delay) == (5, 60)


@override_settings(QUEUED_STORAGE_RETRIES=7, QUEUED_STORAGE_RETRY_DELAY=12.5)
def test_a_subclass_or_an_instance_that_sets_them_overrides_the_settings() -> None:
    assert (NotifyingTwice.max_retries, NotifyingTwice.default_retry_delay) == (1, 0)
    assert NotifyingTwice().max_retries == 1
    hook = Transfer()
    hook.max_retries = 3  # type: ignore[misc]
    assert hook.max_retries == 3
    assert Transfer.max_retries == 7  # the class is left alone


@pytest.mark.parametrize("value", ["5", -1, float("nan"), 2.5, None])
def test_a_bad_retries_setting_raises_when_read(settings: Any, value: Any) -> None:
    settings.QUEUED_STORAGE_RETRIES = value
    with pytest.raises(ImproperlyConfigured, match="QUEUED_STORAGE_RETRIES"):
        Transfer.max_retries  # noqa: B018


@pytest.mark.parametrize("value", ["60", -1, float("inf"), None])
def test_a_bad_retry_delay_setting_raises_when_read(settings: Any, value: Any) -> None:
    settings.QUEUED_STORAGE_RETRY_DELAY = value
    with pytest.raises(ImproperlyConfigured, match="QUEUED_STORAGE_RETRY_DELAY"):
        Transfer().default_retry_delay  # noqa: B018


def test_the_engine_retries_as_the_settings_say_for_a_hook_that_sets_nothing(
    make_storage: Callable[..., QueuedStorage],
    settings: Any,
    run_drain: Callable[..., DrainStats],
) -> None:
    settings.QUEUED_STORAGE_RETRIES = 2
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    storage = make_storage(
        remote=FLAKY, remote_options=ALWAYS_FAILING, task=TransferAndNotify
    )
    name = storage.save("a.txt", content())

    run_drain()

    row = row_of(storage, name)
    assert (row.status, row.attempts) == (Status.FAILED, 3)


def test_the_engine_honours_a_subclass_override_of_both(
    make_storage: Callable[..., QueuedStorage],
    settings: Any,
    run_drain: Callable[..., DrainStats],
) -> None:
    settings.QUEUED_STORAGE_RETRIES = 5
    settings.QUEUED_STORAGE_RETRY_DELAY = 600
    storage = make_storage(
        remote=FLAKY, remote_options=ALWAYS_FAILING, task=NotifyingTwice
    )
    name = storage.save("a.txt", content())

    run_drain()  # one retry, at once: both beat the settings

    row = row_of(storage, name)
    assert (row.status, row.attempts) == (Status.FAILED, 2)
    assert notified == []


def test_the_engine_honours_a_subclass_that_derives_its_limits_from_the_base(
    make_storage: Callable[..., QueuedStorage],
    settings: Any,
    run_drain: Callable[..., DrainStats],
) -> None:
    """As 0.8 sites could: the base's attributes are numbers to compute with."""
    settings.QUEUED_STORAGE_RETRIES = 1
    settings.QUEUED_STORAGE_RETRY_DELAY = 30

    class Patient(Transfer):
        max_retries = Transfer.max_retries + 1  # type: ignore[operator]
        default_retry_delay = Transfer.default_retry_delay * 20  # type: ignore[operator]

    settings.QUEUED_STORAGE_RETRIES = 5  # the subclass keeps what it computed
    storage = make_storage(remote=FLAKY, remote_options=ALWAYS_FAILING, task=Patient)
    name = storage.save("a.txt", content())
    before = timezone.now()

    run_drain()

    row = row_of(storage, name)
    assert (row.status, row.attempts) == (Status.QUEUED, 1)
    assert row.next_attempt_at is not None
    assert row.next_attempt_at >= before + timedelta(seconds=540)  # 600 s, -10 %
    for _ in range(2):
        PendingTransfer.objects.filter(pk=row.pk).update(next_attempt_at=timezone.now())
        run_drain()
    row = row_of(storage, name)
    assert (row.status, row.attempts) == (Status.FAILED, 3)  # two retries


# The base transfer(): False when it cannot copy, the cause kept on the row


def test_the_base_transfer_answers_false_when_it_cannot_copy(
    make_storage: Callable[..., QueuedStorage],
) -> None:
    storage = make_storage(remote=FLAKY, remote_options=ALWAYS_FAILING)
    name = storage.save("a.txt", content())

    assert Transfer().transfer(name, storage.local, storage.remote) is False
    assert TransferAndNotify().transfer(name, storage.local, storage.remote) is False
    assert notified == []


def test_a_failing_copy_answers_false_and_the_row_names_the_real_error(
    make_storage: Callable[..., QueuedStorage],
    settings: Any,
    run_drain: Callable[..., DrainStats],
) -> None:
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    storage = make_storage(
        remote=FLAKY, remote_options={"failures": 1}, task=RecordingTransfer
    )
    name = storage.save("a.txt", content("second try"))

    run_drain()

    assert RecordingTransfer.answers == [False, True]
    row = row_of(storage, name)
    assert (row.status, row.attempts) == (Status.DONE, 2)
    first = row.error_history[0]
    assert (first["error"], first["message"]) == (
        "ConnectionError",
        "remote unreachable",
    )


def test_the_error_of_a_failing_copy_is_redacted(
    make_storage: Callable[..., QueuedStorage],
    settings: Any,
    run_drain: Callable[..., DrainStats],
) -> None:
    settings.QUEUED_STORAGE_RETRIES = 0
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    storage = make_storage(
        remote="tests.storages.KeyedRemote",
        remote_options={"secret_key": secret},
        task=RecordingTransfer,
    )
    name = storage.save("a.txt", content())

    run_drain()

    assert RecordingTransfer.answers == [False]
    row = row_of(storage, name)
    assert row.status == Status.FAILED
    assert row.last_error.startswith("PermissionError: access denied")
    assert secret not in row.last_error
    assert secret not in str(row.error_history)


def test_a_hook_that_raises_after_a_failed_copy_has_the_copys_error_recorded(
    make_storage: Callable[..., QueuedStorage],
    settings: Any,
    run_drain: Callable[..., DrainStats],
) -> None:
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    storage = make_storage(
        remote=FLAKY, remote_options={"failures": 1}, task=RaisingAfterFalseTransfer
    )
    name = storage.save("a.txt", content())

    run_drain()

    row = row_of(storage, name)
    assert row.status == Status.DONE
    assert row.error_history[0]["error"] == "ConnectionError"


def test_the_stock_copy_runs_once_per_attempt(
    make_storage: Callable[..., QueuedStorage],
    settings: Any,
    run_drain: Callable[..., DrainStats],
) -> None:
    """The worker retries, with its backoff and what it knows of the remote
    object: a hook that calls the base copy again in the same attempt gets the
    first answer back."""
    settings.QUEUED_STORAGE_RETRY_DELAY = 600
    storage = make_storage(
        remote=FLAKY, remote_options={"failures": 2}, task=RetryingTransfer
    )
    name = storage.save("a.txt", content())

    run_drain()

    assert RecordingTransfer.answers == [False, False, False]
    assert storage.remote.failures == 1  # type: ignore[attr-defined]
    row = row_of(storage, name)
    assert (row.status, row.attempts) == (Status.QUEUED, 1)
    assert row.last_error == "ConnectionError: remote unreachable"


def test_a_hook_returning_false_after_a_good_copy_is_retried_as_such(
    make_storage: Callable[..., QueuedStorage],
    settings: Any,
    run_drain: Callable[..., DrainStats],
) -> None:
    settings.QUEUED_STORAGE_RETRIES = 0
    storage = make_storage(remote=FS, task=CopiesThenFalseTransfer)
    name = storage.save("a.txt", content())

    run_drain()

    row = row_of(storage, name)
    assert row.status == Status.FAILED
    assert row.last_error == "HookDeclined: the transfer hook returned False"


# The docs' TransferAndNotify


def test_transfer_and_notify_from_the_docs_transfers_and_notifies_once(
    make_storage: Callable[..., QueuedStorage],
    settings: Any,
    run_drain: Callable[..., DrainStats],
) -> None:
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    storage = make_storage(
        remote=FLAKY, remote_options={"failures": 1}, task=RecordedNotify
    )
    name = storage.save("a.txt", content("notified"))

    run_drain()

    assert RecordedNotify.answers == [False, True]  # positional, as the worker calls
    assert notified == [True]
    row = row_of(storage, name)
    assert (row.status, row.attempts) == (Status.DONE, 2)
    assert row.error_history[0]["error"] == "ConnectionError"
    assert read_bytes(storage.remote, name) == b"notified"


def test_transfer_and_notify_keeps_the_create_only_upload(
    make_s3_storage: Callable[..., QueuedStorage],
) -> None:
    storage = make_s3_storage(create_only_uploads=True, task=TransferAndNotify)
    name = storage.save("a.txt", content("hello"))
    sent = if_none_match_headers(storage)

    assert drain(keys=[storage.key]).done == 1

    assert sent == ["*"]
    assert notified == [True]
    with storage.open(name) as opened:
        assert opened.read() == b"hello"


# The engine's special paths, when the failure passes through the base copy


def test_a_conflict_found_by_the_exclusive_create_fails_the_row(
    make_storage: Callable[..., QueuedStorage],
    settings: Any,
    run_drain: Callable[..., DrainStats],
) -> None:
    """Another writer creates the name between the worker's check and the copy."""
    settings.QUEUED_STORAGE_RETRIES = 5
    storage = make_storage(remote=FS, task=RecordingTransfer)
    name = storage.save("a.txt", content("ours"))
    remote = storage.remote
    assert isinstance(remote, FileSystemStorage)

    def theirs_appears(checked: str) -> bool:
        found = FileSystemStorage.exists(remote, checked)
        path = Path(remote.path(checked))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"theirs")
        return found

    remote.exists = theirs_appears  # type: ignore[assignment, method-assign]

    run_drain()

    assert RecordingTransfer.answers == [False]
    row = row_of(storage, name)
    assert (row.status, row.attempts) == (Status.FAILED, 1)
    assert row.last_error.startswith("RemoteConflict: the remote already has")
    assert row.remote_owned is False
    assert read_bytes(storage.remote, name) == b"theirs"


@pytest.mark.parametrize("hook", [RecordingTransfer, IgnoringTransfer])
def test_a_refused_create_only_upload_fails_the_row_with_a_conflict(
    make_s3_storage: Callable[..., QueuedStorage],
    s3_endpoint: str,
    hook: type[Transfer],
) -> None:
    """Another writer puts an object at the name between the worker's check and
    its upload: S3 refuses the delegating hook's copy, whatever the hook answers,
    and the other object stays."""
    storage = make_s3_storage(create_only_uploads=True, task=hook)
    name = storage.save("a.txt", content("ours"))
    bucket = storage.remote.bucket_name  # type: ignore[attr-defined]
    other = s3_client(s3_endpoint)

    def theirs_appears(**kwargs: Any) -> None:
        other.put_object(Bucket=bucket, Key=name, Body=b"theirs")

    events = storage.remote.bucket.meta.client.meta.events  # type: ignore[attr-defined]
    events.register_first("before-call.s3.PutObject", theirs_appears)

    stats = drain(keys=[storage.key])

    assert stats.failed == 1
    assert RecordingTransfer.answers == [False]
    row = row_of(storage, name)
    assert row.status == Status.FAILED
    assert "already has an object" in row.last_error
    assert row.remote_owned is False
    assert other.get_object(Bucket=bucket, Key=name)["Body"].read() == b"theirs"


def test_a_remote_that_renames_fails_the_row_at_once_without_ownership(
    make_storage: Callable[..., QueuedStorage],
    settings: Any,
    run_drain: Callable[..., DrainStats],
) -> None:
    """A permanent error passed through the base copy stays permanent, and an
    upload the remote saved elsewhere gives the row no claim on the name."""
    settings.QUEUED_STORAGE_RETRIES = 5
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    storage = make_storage(
        remote="tests.storages.RenamingStorage", task=RecordingTransfer
    )
    name = storage.save("a.txt", content())

    run_drain()

    row = row_of(storage, name)
    assert (row.status, row.attempts) == (Status.FAILED, 1)
    assert row.last_error.startswith("RemoteRenamed: ")
    assert row.remote_owned is False
    assert RecordingTransfer.answers == [False]


def test_a_retryable_error_after_the_upload_was_sent_makes_the_row_own_the_name(
    make_storage: Callable[..., QueuedStorage],
    settings: Any,
    run_drain: Callable[..., DrainStats],
) -> None:
    settings.QUEUED_STORAGE_RETRY_DELAY = 600
    storage = make_storage(
        remote=FLAKY, remote_options={"failures": 1}, task=RecordingTransfer
    )
    name = storage.save("a.txt", content())

    run_drain()

    assert RecordingTransfer.answers == [False]
    row = row_of(storage, name)
    assert (row.status, row.attempts) == (Status.QUEUED, 1)
    assert row.remote_owned is True  # the next attempt replaces what it may have left


def test_a_size_mismatch_after_a_delegating_hook_is_retried(
    make_storage: Callable[..., QueuedStorage],
    settings: Any,
    run_drain: Callable[..., DrainStats],
) -> None:
    settings.QUEUED_STORAGE_RETRY_DELAY = 600
    storage = make_storage(
        remote="tests.storages.TruncatingStorage", task=TransferAndNotify
    )
    name = storage.save("a.txt", content("twelve bytes"))

    run_drain()

    row = row_of(storage, name)
    assert (row.status, row.attempts) == (Status.QUEUED, 1)
    assert row.last_error.startswith("SizeMismatch: the remote copy of 'a.txt' has 11")
    assert row.remote_owned is True  # its own upload: the retry replaces it
    assert notified == [True]  # the copy answered True; the check came after


@pytest.mark.django_db(transaction=True)
def test_a_late_worker_whose_copy_fails_leaves_the_row_to_the_new_owner(
    make_storage: Callable[..., QueuedStorage], tmp_path: Path
) -> None:
    """A worker's upload stalls; its lease runs out and another worker finishes
    the row; then the stalled copy fails. The late worker records nothing."""
    storage = make_storage(
        remote=f"{__name__}.FailsOnceWhenReleased",
        remote_options={"location": str(tmp_path / "remote")},
        task=RecordingTransfer,
    )
    name = storage.save("a.txt", content("done by the other"))
    [late] = PendingTransfer.objects.claim_due(limit=1, lease=300)

    def late_worker() -> Outcome:
        try:
            return process_row(late)
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=1) as pool:
        outcome = pool.submit(late_worker)
        assert FailsOnceWhenReleased.entered.wait(timeout=10)
        PendingTransfer.objects.filter(pk=late.pk).update(
            lease_expires_at=timezone.now() - timedelta(seconds=1)
        )
        assert drain(keys=[storage.key]).done == 1
        FailsOnceWhenReleased.release.set()
        assert outcome.result(timeout=30) is Outcome.STALE

    assert RecordingTransfer.answers == [True, False]
    row = row_of(storage, name)
    assert (row.status, row.last_error) == (Status.DONE, "")
    assert read_bytes(storage.remote, name) == b"done by the other"


@pytest.mark.django_db(transaction=True)
def test_s3_refuses_a_late_overwrite_by_a_delegating_hook(
    s3_endpoint: str, make_s3_storage: Callable[..., QueuedStorage]
) -> None:
    """As for the stock hook: a worker checks its lease, then stops before its
    upload reaches S3; its lease runs out, another worker finishes the row, and
    the name is saved and transferred again. The late upload, made by the base
    copy inside ``TransferAndNotify``, carries If-Match and is refused."""
    storage = make_s3_storage(
        local_options={"allow_overwrite": True},
        create_only_uploads=True,
        task=TransferAndNotify,
    )

    assert late_worker_outcome(storage, ("PutObject",)) is Outcome.STALE

    bucket = storage.remote.bucket_name  # type: ignore[attr-defined]
    stored = s3_client(s3_endpoint).get_object(Bucket=bucket, Key="doc.txt")
    assert stored["Body"].read() == b"the newest"
    assert row_of(storage, "doc.txt").status == Status.DONE
    assert notified == [True, True, True]  # not the late copy, which answered False


# TransferAndDelete


def test_transfer_and_delete_still_deletes_only_after_the_done_commit(
    make_storage: Callable[..., QueuedStorage],
    settings: Any,
    run_drain: Callable[..., DrainStats],
) -> None:
    settings.QUEUED_STORAGE_RETRY_DELAY = 600
    storage = make_storage(
        remote=FLAKY,
        remote_options={"failures": 1},
        task=RecordingTransferAndDelete,
    )
    name = storage.save("a.txt", content())

    run_drain()  # the copy fails: the local copy stays

    assert RecordingTransferAndDelete.answers == [False]
    row = row_of(storage, name)
    assert (row.status, row.last_error) == (
        Status.QUEUED,
        "ConnectionError: remote unreachable",
    )
    assert storage.local.exists(name)
    PendingTransfer.objects.filter(pk=row.pk).update(next_attempt_at=timezone.now())

    run_drain()

    assert row_of(storage, name).status == Status.DONE
    assert not storage.local.exists(name)
    assert read_bytes(storage.remote, name) == b"hello world"
