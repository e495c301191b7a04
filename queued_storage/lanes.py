"""The threads a drain runs its lanes on, kept from one drain to the next.

A remote may keep a client per thread (django-storages' S3Storage builds a boto3
session and client for each thread that uses it: about 10 MiB and tens of
milliseconds). A lane on a new thread for every drain would build one for every
poll of ``process_transfers --loop``, and a worker would hold two while the old
one is collected. So a lane's thread is parked when its drain is done with it,
and the next drain in the process runs its lane there, with the clients it built.

A lane runs as on a new thread: in a context of its own, with database
connections of its own, closed when it ends. A parked thread holds no connection
and nothing of the drain it ran for, ends after :data:`IDLE_SECONDS` without work,
and is forgotten in a child process after ``fork()`` (threads do not survive a
fork).
"""

from __future__ import annotations

import contextvars
import os
import threading
from collections.abc import Callable

from django.db import connections

#: A thread parked this long (seconds) without a lane to run ends.
IDLE_SECONDS = 300.0

#: At most this many threads wait parked; one more ends when its lane does.
MAX_IDLE = 64

#: The name of a parked thread (a running lane has its drain's name for it).
IDLE_NAME = "queued-storage-idle"


class _Thread(threading.Thread):
    """A pooled thread: runs the lanes handed to it, one at a time."""

    def __init__(self, pool: _Pool, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.pool = pool
        #: The lane to run next and the event to set when it has ended.
        self.work: tuple[Callable[[], None], threading.Event] | None = None
        self.handed = threading.Condition(pool.lock)

    def run(self) -> None:
        pool = self.pool
        work = self.work
        while work is not None:
            target, ended = work
            # Not kept while parked: the drain (its rows, stats, callbacks)
            # would live as long as the thread.
            work = None
            raised: BaseException | None = None
            # As on a new thread: in a context of its own (not with the language
            # or time zone the last lane activated), and with new database
            # connections (not one closed in a transaction, never reopened).
            try:
                contextvars.Context().run(target)
            except BaseException as exc:
                raised = exc
            del target
            try:
                _close_connections()
            except BaseException as exc:
                raised = raised or exc
            # Parked before its drain hears that the lane ended: a drain that
            # starts next in this process finds the thread, and its clients.
            with pool.lock:
                self.work = None
                parked = raised is None and pool.park(self)
            ended.set()
            if raised is not None:
                # Not parked: the thread ends with what the lane raised.
                raise raised
            if not parked:
                return
            with pool.lock:
                # Not when retired since it parked: no lane could come.
                if self.work is None and self in pool.idle:
                    self.handed.wait(IDLE_SECONDS)
                if self.work is None:
                    pool.unpark(self)
                work = self.work


def _close_connections() -> None:
    """Close this thread's database connections and forget them."""
    for connection in connections.all(initialized_only=True):
        try:
            connection.close()
        finally:
            del connections[connection.alias]


class _Pool:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.idle: list[_Thread] = []

    def start(self, target: Callable[[], None], name: str) -> Lane:
        """Run ``target`` on a parked thread (the one parked last), or a new one."""
        ended = threading.Event()
        with self.lock:
            if self.idle:
                thread = self.idle.pop()
                thread.name = name
                thread.work = (target, ended)
                thread.handed.notify()
                return Lane(thread, ended)
            thread = _Thread(self, name)
            thread.work = (target, ended)
        thread.start()
        return Lane(thread, ended)

    def park(self, thread: _Thread) -> bool:
        """(With ``lock`` held.) Whether ``thread`` waits for another lane."""
        if len(self.idle) >= MAX_IDLE:
            return False
        thread.name = IDLE_NAME
        self.idle.append(thread)
        return True

    def unpark(self, thread: _Thread) -> None:
        """(With ``lock`` held.) ``thread`` waited long enough and ends."""
        if thread in self.idle:
            self.idle.remove(thread)

    def parked(self) -> int:
        with self.lock:
            return len(self.idle)

    def retire(self) -> list[_Thread]:
        """End the parked threads (each wakes, finds no lane, and ends)."""
        with self.lock:
            idle, self.idle = self.idle, []
            for thread in idle:
                thread.handed.notify()
        return idle

    def after_fork(self) -> None:
        # The parked threads are the parent's: none runs in the child, and the
        # lock may have been held by one of them when the process forked.
        self.lock = threading.Lock()
        self.idle = []


class Lane:
    """One lane's run on a pooled thread."""

    def __init__(self, thread: threading.Thread, ended: threading.Event) -> None:
        self.thread = thread
        self.ended = ended

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the lane (not its thread, which may run another) to end."""
        return self.ended.wait(timeout)


_pool = _Pool()
os.register_at_fork(after_in_child=_pool.after_fork)


def start(target: Callable[[], None], name: str) -> Lane:
    """Run ``target`` (a lane) on a thread of the pool."""
    return _pool.start(target, name)


def parked() -> int:
    """How many threads wait parked for a lane."""
    return _pool.parked()


def retire_parked(timeout: float | None = None) -> None:
    """End the threads parked now and wait for them (up to ``timeout`` seconds
    each): the next lanes start on new threads, which pick up what a new thread
    starts with (a profiler set with ``threading.setprofile``, say)."""
    for thread in _pool.retire():
        thread.join(timeout)
