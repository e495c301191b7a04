"""A second party for race tests: runs in a thread of its own, with its own
database connection, while the test holds a race window open.

Where the code under test serialises the two with a database lock, the second
party waits for that lock and can only go on once the window closes. So the
window stays open until the contender has returned or waits for a lock, never a
fixed time: the contender's own statements say which. On PostgreSQL and MariaDB
a locking read (``FOR UPDATE``, unless it skips locked rows) waits for a lock
the window's holder may have (MariaDB lists no such wait anywhere while its
optimizer reads a row by a unique key); SQLite tells nothing about waiters, so
each statement is first tried without waiting, and a refusal says it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from django.db import OperationalError, connection

#: How long a contender may take to return or to reach a lock, at most.
TIMEOUT = 30.0


class Contender:
    """Run ``func`` in a thread; :meth:`wait_returned_or_locked` from inside a race
    window, :meth:`join` after it."""

    def __init__(self, func: Callable[[], Any]) -> None:
        self.func = func
        #: Set once ``func`` has returned or waits for a lock.
        self.settled = threading.Event()
        self.connected = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Contender:
        self.thread.start()
        assert self.connected.wait(TIMEOUT), "the contender never connected"
        return self

    def _run(self) -> None:
        try:
            connection.ensure_connection()
            self.connected.set()
            with connection.execute_wrapper(self._watch):
                self.func()
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            connection.close()
            self.connected.set()
            self.settled.set()

    def _watch(
        self,
        execute: Callable[..., Any],
        sql: str,
        params: Any,
        many: bool,
        context: Any,
    ) -> Any:
        if connection.vendor != "sqlite":
            locking = sql.upper()
            if "FOR UPDATE" in locking and "SKIP LOCKED" not in locking:
                self.settled.set()
            return execute(sql, params, many, context)
        raw = context["connection"].connection
        (wait_ms,) = raw.execute("PRAGMA busy_timeout").fetchone()
        raw.execute("PRAGMA busy_timeout = 0")
        try:
            return execute(sql, params, many, context)
        except OperationalError as error:
            if "locked" not in str(error):
                raise
            self.settled.set()
        finally:
            raw.execute(f"PRAGMA busy_timeout = {int(wait_ms)}")
        return execute(sql, params, many, context)

    def wait_returned_or_locked(self) -> None:
        """Return once ``func`` has returned or waits for a database lock (one that
        the calling thread may hold)."""
        assert self.settled.wait(TIMEOUT), "the contender neither ended nor waited"

    def join(self) -> None:
        """Wait for ``func`` to return; raise what it raised."""
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "the contender never returned"
        if self.errors:
            raise self.errors[0]
