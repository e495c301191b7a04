"""The threads of a drain's lanes outlive the drain (queued_storage/lanes.py): a
remote's per-thread client (S3Storage builds one per thread) is built once, not
once per drain, and a parked thread holds no database connection."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import connections

from queued_storage import lanes
from queued_storage.backends import QueuedStorage
from queued_storage.models import PendingTransfer
from queued_storage.worker import drain
from tests.helpers import content, row_of
from tests.storages import CLIENTS_BUILT, UPLOAD_THREADS

Status = PendingTransfer.Status


@pytest.fixture(autouse=True)
def _fresh_records() -> Iterator[None]:
    # Threads parked by an earlier test have a client already (ThreadClientStorage's
    # per-thread client is the class's): a test would find none built.
    lanes.retire_parked(timeout=30)
    UPLOAD_THREADS.clear()
    CLIENTS_BUILT.clear()
    yield


@pytest.mark.django_db(transaction=True)
def test_drains_one_after_another_run_on_the_same_thread_and_client(
    make_storage: Callable[..., QueuedStorage],
) -> None:
    """As ``process_transfers --loop`` polls: each drain's lane runs where the one
    before ran, with the client it built, instead of a new thread and client a
    drain."""
    storage = make_storage(remote="tests.storages.ThreadClientStorage")
    for number in range(3):
        name = storage.save(f"f{number}.txt", content(str(number)))
        assert drain().done == 1
        assert row_of(storage, name).status == Status.DONE
    assert len(set(UPLOAD_THREADS.values())) == 1, UPLOAD_THREADS
    assert len(CLIENTS_BUILT) == 1
    assert threading.get_ident() not in UPLOAD_THREADS.values()


@pytest.mark.django_db(transaction=True)
def test_a_parked_lane_thread_holds_no_database_connection(
    make_storage: Callable[..., QueuedStorage],
) -> None:
    storage = make_storage(remote="tests.storages.ThreadClientStorage")
    storage.save("a.txt", content("a"))
    assert drain().done == 1
    assert lanes.parked() >= 1
    seen: dict[str, Any] = {}

    def look() -> None:
        seen["thread"] = threading.get_ident()
        seen["open"] = [
            alias for alias in connections if connections[alias].connection is not None
        ]

    # The pool hands out the thread parked last: the drain's lane.
    lanes.start(look, "queued-storage-test-look").join(timeout=30)
    assert seen["thread"] == UPLOAD_THREADS["a.txt"]
    assert seen["open"] == []


def test_a_thread_parked_too_long_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lanes, "IDLE_SECONDS", 0.01)
    ran = threading.Event()
    lane = lanes.start(ran.set, "queued-storage-test-idle")
    assert lane.join(timeout=30)
    lane.thread.join(timeout=30)
    assert not lane.thread.is_alive()
    assert ran.is_set()


def test_no_more_than_max_idle_threads_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()

    def hold() -> None:
        gate.wait(timeout=30)

    held = [lanes.start(hold, f"queued-storage-test-cap-{n}") for n in range(3)]
    assert len({lane.thread for lane in held}) == 3
    # Room for one more parked thread: one of the three parks, two end.
    monkeypatch.setattr(lanes, "MAX_IDLE", lanes.parked() + 1)
    gate.set()
    for lane in held:
        assert lane.join(timeout=30)
    ended = [lane.thread for lane in held if lane.thread.name != lanes.IDLE_NAME]
    for thread in ended:
        thread.join(timeout=30)
        assert not thread.is_alive()
    assert len(ended) == 2
    assert lanes.parked() == lanes.MAX_IDLE


def test_a_lane_that_raises_ends_its_thread_which_is_not_handed_another(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    raised: list[BaseException | None] = []
    monkeypatch.setattr(
        threading, "excepthook", lambda hook: raised.append(hook.exc_value)
    )

    def boom() -> None:
        raise RuntimeError("lane failed")

    lane = lanes.start(boom, "queued-storage-test-raise")
    assert lane.join(timeout=30)
    lane.thread.join(timeout=30)
    assert not lane.thread.is_alive()
    assert [type(error) for error in raised] == [RuntimeError]
    again = lanes.start(lambda: None, "queued-storage-test-after")
    assert again.join(timeout=30)
    assert again.thread is not lane.thread


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_runs_lanes_on_threads_of_its_own() -> None:
    """Threads do not survive fork(): a child (a Celery prefork worker, say) must
    not hand its lane to the parent's parked thread and wait for ever."""
    assert lanes.start(lambda: None, "queued-storage-test-fork").join(timeout=30)
    assert lanes.parked() >= 1
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child reports through the pipe)
        status = 1
        try:
            parked = lanes.parked()
            ran = threading.Event()
            ended = lanes.start(ran.set, "queued-storage-test-child").join(timeout=10)
            status = 0 if (parked == 0 and ended and ran.is_set()) else 3
        finally:
            os.write(write, bytes([status]))
            os._exit(status)
    os.close(write)
    try:
        reported = os.read(read, 1)
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    assert reported == bytes([0])


def test_retire_parked_ends_every_parked_thread() -> None:
    runs = [lanes.start(lambda: None, f"queued-storage-test-retire-{n}") for n in "ab"]
    for lane in runs:
        assert lane.join(timeout=30)
    assert lanes.parked() >= 1
    lanes.retire_parked(timeout=30)
    assert lanes.parked() == 0
    assert not any(lane.thread.is_alive() for lane in runs)
