"""Attacks on the lane threads kept from one drain to the next (queued_storage/lanes.py):
what a parked thread keeps, what a drain's lane finds of the last one on its thread,
a lane left behind on a hung upload, drains at once, an idle thread's end racing a
drain's start, and the threads and connections of many busy polls."""

from __future__ import annotations

import gc
import os
import select
import signal
import threading
import weakref
from collections.abc import Callable, Iterator
from io import StringIO
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.core.management import call_command
from django.db.backends.signals import connection_created

from queued_storage import lanes
from queued_storage.backends import QueuedStorage
from queued_storage.management.commands.process_transfers import Command
from queued_storage.models import PendingTransfer
from queued_storage.worker import drain
from tests.helpers import content, in_thread, joined, lanes_returned, row_of
from tests.storages import (
    FOUND_AT_UPLOAD,
    HUNG_THREADS,
    UPLOAD_THREADS,
    HangingStorage,
    StateLeakingStorage,
)

Status = PendingTransfer.Status

LEAKING = "tests.storages.StateLeakingStorage"


@pytest.fixture(autouse=True)
def _no_leaks_set() -> Iterator[None]:
    UPLOAD_THREADS.clear()
    FOUND_AT_UPLOAD.clear()
    StateLeakingStorage.leak_activation = set()
    StateLeakingStorage.leak_transaction = set()
    yield
    StateLeakingStorage.leak_activation = set()
    StateLeakingStorage.leak_transaction = set()


class _Progress:
    def __call__(self, *args: Any, **kwargs: Any) -> None:
        pass


@pytest.mark.django_db(transaction=True)
def test_a_parked_thread_keeps_nothing_of_the_drain_it_ran_for(
    make_storage: Callable[..., QueuedStorage],
) -> None:
    """The parked thread held its last lane (a method of the drain) until it ran
    another or ended, 5 minutes later: the drain, its stats and callbacks (the
    command, through ``should_stop``) and what its error referenced lived on."""
    storage = make_storage()
    name = storage.save("a.txt", content("a"))
    progress = _Progress()
    seen = weakref.ref(progress)
    assert drain(progress=progress).done == 1
    assert row_of(storage, name).status == Status.DONE
    assert lanes.parked() >= 1
    del progress
    gc.collect()
    assert seen() is None


@pytest.mark.django_db(transaction=True)
def test_a_drain_starts_without_what_the_last_drain_activated_on_its_thread(
    make_storage: Callable[..., QueuedStorage],
) -> None:
    """A remote or hook that activates a language or time zone (context variables)
    and leaves it: the next drain's lanes on the thread ran in it, as they never
    did on a new thread."""
    storage = make_storage(remote=LEAKING)
    StateLeakingStorage.leak_activation = {"first.txt"}
    storage.save("first.txt", content("1"))
    assert drain().done == 1
    storage.save("second.txt", content("2"))
    assert drain().done == 1
    assert UPLOAD_THREADS["first.txt"] == UPLOAD_THREADS["second.txt"]
    assert (
        FOUND_AT_UPLOAD["second.txt"]
        == FOUND_AT_UPLOAD["first.txt"]
        == {
            "language": django_settings.LANGUAGE_CODE,
            "timezone": django_settings.TIME_ZONE,
        }
    )


@pytest.mark.django_db(transaction=True)
def test_a_drain_starts_without_a_transaction_the_last_drain_left_on_its_thread(
    make_storage: Callable[..., QueuedStorage],
) -> None:
    """A hook that leaves a transaction open: Django closes such a connection at
    the lane's end but never reopens it, so every later drain's lane on the thread
    crashed on "connection closed" (and could not record it on the row), at every
    poll of a --loop worker."""
    storage = make_storage(remote=LEAKING)
    StateLeakingStorage.leak_transaction = {"first.txt"}
    storage.save("first.txt", content("1"))
    drain()
    name = storage.save("second.txt", content("2"))
    stats = drain()
    assert UPLOAD_THREADS.get("second.txt") == UPLOAD_THREADS["first.txt"]
    assert stats.done == 1
    assert row_of(storage, name).status == Status.DONE


HANGING_THREAD = "tests.storages.HangingThreadStorage"


@pytest.mark.django_db(transaction=True)
def test_a_lane_left_behind_on_a_hung_upload_gets_no_lane_until_it_returns(
    make_storage: Callable[..., QueuedStorage],
    hanging: type[HangingStorage],
    settings: Any,
) -> None:
    """Attack that held: the next drain runs beside the hung thread, never on it
    (it would wait for the hung upload); once the upload returns, the thread is
    parked, and the next drain's lane runs there."""
    settings.QUEUED_STORAGE_LEASE = 30
    settings.QUEUED_STORAGE_TRANSFER_TIMEOUT = 1
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    HUNG_THREADS.clear()
    storage = make_storage(remote=HANGING_THREAD)
    hung = storage.save("hung.txt", content("h"))
    hanging.hang = {hung}
    stats = drain(concurrency=1)
    assert (stats.done, stats.retried) == (1, 1)
    hung_thread = HUNG_THREADS[hung]
    assert UPLOAD_THREADS[hung] != hung_thread

    # Two lanes: more than the pool holds parked, none on the hung thread.
    storage.save("beside.txt", content("b"))
    storage.save("beside2.txt", content("c"))
    assert drain(concurrency=2).done == 2
    assert not hanging.returned.is_set()
    assert hung_thread not in {
        UPLOAD_THREADS["beside.txt"],
        UPLOAD_THREADS["beside2.txt"],
    }

    hanging.released.set()
    assert hanging.returned.wait(timeout=30)
    assert lanes_returned()
    after = storage.save("after.txt", content("a"))
    assert drain(concurrency=1).done == 1
    assert UPLOAD_THREADS[after] == hung_thread
    assert row_of(storage, hung).status == Status.DONE


@pytest.mark.django_db(transaction=True)
def test_two_drains_at_once_share_the_pool_and_neither_waits_for_the_other(
    make_storage: Callable[..., QueuedStorage],
    hanging: type[HangingStorage],
) -> None:
    """Attack that held: a wake-up's drain beside a --loop drain in one process."""
    slow = make_storage(remote=HANGING_THREAD)
    fast = make_storage(remote=HANGING_THREAD)
    held = slow.save("held.txt", content("h"))
    hanging.hang = {held}
    worker, result = in_thread(lambda: drain(keys=[slow.key]))
    assert hanging.entered.wait(timeout=30)
    name = fast.save("fast.txt", content("f"))
    assert drain(keys=[fast.key]).done == 1
    assert row_of(fast, name).status == Status.DONE
    assert UPLOAD_THREADS[name] != HUNG_THREADS[held]
    assert row_of(slow, held).status == Status.TRANSFERRING
    hanging.released.set()
    assert joined(worker, result).done == 1
    assert row_of(slow, held).status == Status.DONE


def test_a_lane_handed_to_a_thread_whose_wait_just_timed_out_runs() -> None:
    """Attack that held: start() takes a parked thread after its idle wait timed
    out and before it took the pool's lock again to end: the thread runs the
    lane instead of ending with it (the drain would wait for ever)."""
    timed_out = threading.Event()
    handed = threading.Event()

    class TimesOut:
        """A parked thread's wait that times out, the lock released until
        ``handed``."""

        def __init__(self, condition: threading.Condition) -> None:
            self.condition = condition

        def wait(self, timeout: float | None = None) -> bool:
            lock = lanes._pool.lock
            lock.release()
            try:
                timed_out.set()
                assert handed.wait(timeout=30)
            finally:
                lock.acquire()
            return False

        def notify(self) -> None:
            self.condition.notify()

    def times_out_when_parked() -> None:
        thread = threading.current_thread()
        assert isinstance(thread, lanes._Thread)
        thread.handed = TimesOut(thread.handed)  # type: ignore[assignment]

    first = lanes.start(times_out_when_parked, "queued-storage-test-expiry")
    assert first.join(timeout=30)
    assert timed_out.wait(timeout=30)
    ran = threading.Event()
    # The pool hands out the thread parked last: the one whose wait timed out.
    second = lanes.start(ran.set, "queued-storage-test-expiry-2")
    handed.set()
    assert second.thread is first.thread
    assert second.join(timeout=30)
    assert ran.is_set()


@pytest.mark.django_db(transaction=True)
def test_busy_polls_leave_as_many_threads_and_no_more_connections(
    make_storage: Callable[..., QueuedStorage], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack that held: each of 100 busy polls of ``process_transfers --loop
    --concurrency 3`` finds a file: its lanes park, and the next poll's run on
    them; after the first, no poll adds a thread or leaves a connection open
    (the command's own aside), in any thread."""
    storage = make_storage()
    opened: weakref.WeakSet[Any] = weakref.WeakSet()

    def note(sender: Any, connection: Any, **kwargs: Any) -> None:
        opened.add(connection)

    connection_created.connect(note)
    counts: list[tuple[int, int]] = []
    names: list[str] = []

    def between_polls(self: Command, seconds: float) -> None:
        counts.append(
            (
                threading.active_count(),
                sum(1 for wrapper in opened if wrapper.connection is not None),
            )
        )
        names.append(storage.save(f"poll{len(counts)}.txt", content("x")))

    monkeypatch.setattr(Command, "_sleep", between_polls)
    try:
        storage.save("poll0.txt", content("x"))
        call_command(
            "process_transfers",
            "--loop",
            "--concurrency",
            "3",
            "--max-polls",
            "201",
            "--interval",
            "1",
            stdout=StringIO(),
        )
    finally:
        connection_created.disconnect(note)
    assert len(counts) == 100
    assert len(set(counts)) == 1, counts
    assert counts[0][1] <= 1
    assert all(row_of(storage, name).status == Status.DONE for name in names[:-1])


def test_a_thread_retired_before_it_waits_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    """retire_parked() between a thread's parking and its wait (the drain has
    heard that the lane ended, the thread has not taken the pool's lock again):
    the thread waited its 5 idle minutes for a lane nobody could hand it, and
    retire_parked() for it (for ever, without a timeout)."""
    signalled = threading.Event()
    gate = threading.Event()

    class HeldAfterSet(threading.Event):
        """A lane's end, heard by its drain while its thread is held."""

        def set(self) -> None:
            super().set()
            if isinstance(threading.current_thread(), lanes._Thread):
                signalled.set()
                assert gate.wait(timeout=30)

    class Threading:
        Event = HeldAfterSet

        def __getattr__(self, name: str) -> Any:
            return getattr(threading, name)

    monkeypatch.setattr(lanes, "threading", Threading())
    lane = lanes.start(lambda: None, "queued-storage-test-retired")
    assert lane.join(timeout=30)
    assert signalled.wait(timeout=30)
    assert lane.thread in lanes._pool.retire()
    gate.set()
    lane.thread.join(timeout=30)
    assert not lane.thread.is_alive()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_child_forked_mid_lane_with_the_pools_lock_held_runs_lanes() -> None:
    """Attack that held: fork() while a lane runs and holds the pool's lock (a
    Celery prefork child, say): the child has no parked thread and starts its
    lanes on threads of its own without waiting for the lock; the parent's lane
    ends and parks."""
    inside = threading.Event()
    gate = threading.Event()

    def holds_the_lock() -> None:
        with lanes._pool.lock:
            inside.set()
            assert gate.wait(timeout=30)

    running = lanes.start(holds_the_lock, "queued-storage-test-mid-lane")
    assert inside.wait(timeout=30)
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
        # A child stuck on the lock it inherited never reports: ended, not waited on.
        ready, _, _ = select.select([read], [], [], 30)
        reported = os.read(read, 1) if ready else b"stuck"
    finally:
        os.close(read)
        gate.set()
        if not ready:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert reported == bytes([0])
    assert running.join(timeout=30)
    assert running.thread.name == lanes.IDLE_NAME
