"""The circuit breaker's promise against a real S3 API on loopback: an outage
longer than the retry horizon (QUEUED_STORAGE_RETRIES x RETRY_DELAY) leaves the
rows queued, not failed, with the attempts made meanwhile bounded by the
breaker (not every row's), and they all drain once the server is back on the
same port. Without the breaker the same outage fails them."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from botocore.config import Config
from django.utils import timezone

from queued_storage import breaker, registry
from queued_storage.backends import QueuedStorage
from queued_storage.models import PendingTransfer
from queued_storage.storage_state import BREAKER_CLOSED, BREAKER_OPEN, storage_controls
from queued_storage.worker import drain
from tests.helpers import FS, Clock, content
from tests.s3 import S3_OPTIONS, make_bucket, s3_client
from tests.s3_outage import RestartableS3Server

pytestmark = pytest.mark.django_db(transaction=True)

Status = PendingTransfer.Status
FILES = 12
RETRIES = 2
THRESHOLD = 3
CONCURRENCY = 2


@pytest.fixture
def server() -> Iterator[RestartableS3Server]:
    s3 = RestartableS3Server()
    s3.start()
    yield s3
    s3.stop()


@pytest.fixture
def outage_storage(
    server: RestartableS3Server, tmp_path: Path, settings: Any
) -> Iterator[QueuedStorage]:
    settings.QUEUED_STORAGE_RETRIES = RETRIES
    settings.QUEUED_STORAGE_RETRY_DELAY = 1
    storage = QueuedStorage(
        FS,
        "storages.backends.s3.S3Storage",
        local_options={"location": str(tmp_path / "local")},
        remote_options={
            **S3_OPTIONS,
            "endpoint_url": server.endpoint,
            "bucket_name": make_bucket(server.endpoint),
            # One try per request, quickly refused: the ledger retries, not boto.
            "client_config": Config(
                retries={"total_max_attempts": 1, "mode": "standard"},
                connect_timeout=2,
                read_timeout=10,
            ),
        },
        key="outage-s3",
    )
    registry.register(storage)
    yield storage
    registry.forget(storage.key)


def rows(storage: QueuedStorage) -> Any:
    return PendingTransfer.objects.filter(storage_key=storage.key)


def attempts_made(storage: QueuedStorage) -> int:
    return sum(
        len(history)
        for history in rows(storage).values_list("error_history", flat=True)
    )


def an_hour_later(storage: QueuedStorage, clock: Clock) -> None:
    """An hour of outage: the breaker's backoff and every row's own are over."""
    clock.now += timedelta(hours=1)
    rows(storage).filter(status=Status.QUEUED).update(next_attempt_at=timezone.now())


def test_an_outage_longer_than_the_retry_horizon_leaves_rows_queued_until_s3_returns(
    outage_storage: QueuedStorage,
    server: RestartableS3Server,
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings.QUEUED_STORAGE_BREAKER_FAILURES = THRESHOLD
    clock = Clock()
    monkeypatch.setattr(breaker, "clock", clock)
    names = [
        outage_storage.save(f"docs/{i}.txt", content(f"file {i}")) for i in range(FILES)
    ]
    port = server.port
    server.stop()

    drain(concurrency=CONCURRENCY)

    state = storage_controls([outage_storage.key], now=clock())[outage_storage.key]
    assert state.breaker == BREAKER_OPEN
    # The breaker opened at the third failure: at most the lanes' other upload in
    # hand failed after it; every other row was left alone.
    first = attempts_made(outage_storage)
    assert THRESHOLD <= first <= THRESHOLD + CONCURRENCY - 1
    assert (
        "EndpointConnectionError"
        in rows(outage_storage).exclude(last_error="").first().last_error
    )

    # Six hours down: without the breaker each row would have made its
    # RETRIES + 1 attempts within the first minutes and failed.
    for hour in range(6):
        an_hour_later(outage_storage, clock)
        drain(concurrency=CONCURRENCY)
        assert attempts_made(outage_storage) == first + hour + 1  # one probe an hour
    assert set(rows(outage_storage).values_list("status", flat=True)) == {Status.QUEUED}
    assert max(rows(outage_storage).values_list("attempts", flat=True)) <= RETRIES

    server.start()
    assert server.port == port
    an_hour_later(outage_storage, clock)
    stats = drain(concurrency=CONCURRENCY)

    assert stats.done == FILES
    assert set(rows(outage_storage).values_list("status", flat=True)) == {Status.DONE}
    listed = s3_client(server.endpoint).list_objects_v2(
        Bucket=outage_storage.remote.bucket_name  # type: ignore[attr-defined]
    )
    assert sorted(item["Key"] for item in listed["Contents"]) == sorted(names)
    state = storage_controls([outage_storage.key], now=clock())[outage_storage.key]
    assert (state.breaker, state.consecutive_failures) == (BREAKER_CLOSED, 0)


def test_without_the_breaker_the_same_outage_fails_every_row(
    outage_storage: QueuedStorage, server: RestartableS3Server, settings: Any
) -> None:
    settings.QUEUED_STORAGE_BREAKER_FAILURES = 0
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    for i in range(FILES):
        outage_storage.save(f"docs/{i}.txt", content(f"file {i}"))
    server.stop()

    drain(concurrency=CONCURRENCY)

    assert set(rows(outage_storage).values_list("status", flat=True)) == {Status.FAILED}
    assert attempts_made(outage_storage) == FILES * (RETRIES + 1)
