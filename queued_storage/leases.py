"""Leases while transfers run: renew the lease of each row of a claim only
while its transfer runs, and abandon (record as a failed attempt) a transfer
that makes no progress for the timeout."""

from __future__ import annotations

import copy
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from django.db import connections
from django.utils import timezone

from queued_storage import breaker, registry
from queued_storage.conf import settings as conf
from queued_storage.copying import read_progress
from queued_storage.errors import Outcome, TransferTimeout
from queued_storage.failures import (
    NoTask,
    ledger_db,
    log_crash,
    on_commit,
    retry_limits,
    send_failed,
)
from queued_storage.models import PendingTransfer

logger = logging.getLogger("queued_storage")


class Attempt:
    """One row's transfer in flight, as its lease keeper sees it."""

    def __init__(self, row: PendingTransfer, renewed_at: float) -> None:
        self.row = row
        self.thread = threading.current_thread()
        self.renewed_at = renewed_at
        self.progress_at = time.monotonic()
        #: The transfer returned (verified, its row waits to be recorded as done,
        #: or recorded): no more progress to make, its lease still needed.
        self.returned = False
        #: Given up on for making no progress: its lease is no longer renewed, and
        #: whatever the transfer does when it returns is a late worker's.
        self.abandoned = False

    def note_progress(self) -> None:
        self.progress_at = time.monotonic()


class _Starter:
    """One thread a process that starts a lease keeper's own thread once its claim
    has lasted half a renewal period: when that thread would first look at its
    rows (and find nothing to do before a whole period). A claim that ends sooner
    (a few rows to a fast remote: most claims of busy workers) starts no thread;
    one that lasts has its keeper renewing on a thread and a connection of its own,
    as before. This thread makes no database call: a slow renewal or abandon of
    one keeper never delays another's start. Timed on the real clock, as a
    keeper's waits are."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        #: Keepers not started yet, and when each is to be (``_clock()``).
        self.pending: dict[LeaseKeeper, float] = {}
        #: When the thread wakes next (inf: when told); None while it is awake.
        self.until: float | None = None
        self.thread: threading.Thread | None = None

    def add(self, keeper: LeaseKeeper, delay: float) -> None:
        with self.lock:
            due = _clock() + delay
            self.pending[keeper] = due
            if self.thread is None:
                self.thread = threading.Thread(
                    target=self._run, name=STARTER_NAME, daemon=True
                )
                self.thread.start()
            elif self.until is not None and due < self.until:
                self.changed.notify()

    def discard(self, keeper: LeaseKeeper) -> None:
        with self.lock:
            self.pending.pop(keeper, None)

    def _run(self) -> None:
        while True:
            with self.lock:
                while True:
                    now = _clock()
                    due = [k for k, at in self.pending.items() if at <= now]
                    if due:
                        for keeper in due:
                            del self.pending[keeper]
                        break
                    self.until = min(self.pending.values(), default=math.inf)
                    self.changed.wait(
                        None if self.until == math.inf else self.until - now
                    )
                    self.until = None
            for keeper in due:
                try:
                    keeper._start_thread()
                except Exception as exc:
                    # Cannot happen short of the system refusing threads; said, and
                    # the claim's leases run out as if its worker were killed.
                    logger.error(
                        "lease keeper not started token=%s error=%s",
                        keeper.token,
                        type(exc).__name__,
                    )

    def after_fork(self) -> None:
        # The parent's thread does not run in the child, and held its lock maybe.
        self.__init__()  # type: ignore[misc]


#: The real clock, whatever a test puts in this module's ``time``.
_clock = time.monotonic
#: The name of the thread that starts the keepers' threads.
STARTER_NAME = "queued-storage-renewal-starter"
_starter = _Starter()
os.register_at_fork(after_in_child=_starter.after_fork)


class LeaseKeeper:
    """Renews the leases of the rows of one claim whose transfers run, each only
    while it runs, and abandons a transfer that makes no progress for
    ``timeout`` seconds (``on_abandon`` is called with it, in the keeper's thread).

    Its thread is started (by :class:`_Starter`) only once the claim has lasted
    half a period, when it would first look at the rows: :meth:`start` costs no
    thread, and a claim that ends before then never has one. ``start``,
    ``stopped.set()`` and ``join`` as for a thread.

    Rows of the claim not started yet are not renewed: their leases run out, and
    another worker may take them; a row started late checks its claim first."""

    def __init__(
        self,
        token: str,
        lease: float,
        timeout: float | None = None,
        on_abandon: Callable[[Attempt], object] | None = None,
    ) -> None:
        self.name = f"queued-storage-lease-{token[:8]}"
        self.token = token
        self.lease = lease
        self.timeout = (
            conf.QUEUED_STORAGE_TRANSFER_TIMEOUT if timeout is None else timeout
        )
        self.on_abandon = on_abandon or abandon_attempt
        #: A row's lease is renewed this often while its transfer runs: by a third
        #: of the lease, and often enough that a running row never looks stuck
        #: (its ``updated_at`` older than the timeout).
        self.period = min(self.lease, self.timeout) / 3
        #: When the claim took its rows (they were claimed just before this keeper
        #: was made), on the clock the renewals are timed with.
        self.claimed_at = time.monotonic()
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.attempts: dict[int, Attempt] = {}
        #: Made in a transaction still open in the claiming thread (a drain or an
        #: admin "transfer now" in the caller's transaction): nobody else sees the
        #: rows until it commits, and this thread's own connection could only wait
        #: for its row locks while the caller, at the end, waits for this thread.
        self.uncommitted = connections[ledger_db()].in_atomic_block
        self.thread: threading.Thread | None = None
        #: Held while the thread is started, and when ``join`` looks for it.
        self.starting = threading.Lock()

    def start(self) -> None:
        """Have the thread started once the claim lasts half a period (not for a
        claim in an uncommitted transaction: nothing to renew)."""
        if not self.uncommitted:
            _starter.add(self, self.period / 2)

    def _start_thread(self) -> None:
        with self.starting:
            if self.stopped.is_set() or self.thread is not None:
                return
            self.thread = threading.Thread(target=self.run, name=self.name, daemon=True)
            self.thread.start()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread (once ``stopped`` is set), if it was started."""
        _starter.discard(self)
        with self.starting:
            thread = self.thread
        if thread is not None:
            thread.join(timeout)

    def is_alive(self) -> bool:
        thread = self.thread
        return thread is not None and thread.is_alive()

    @contextmanager
    def attempt(self, row: PendingTransfer) -> Iterator[Attempt | None]:
        """Track the transfer of ``row`` in this thread; None if the claim on it
        no longer stands (its lease ran out before it was started, and another
        worker took it or a save changed it)."""
        started = self.start_attempt(row)
        if started is None:
            yield None
            return
        noted = read_progress.set(started.note_progress)
        try:
            yield started
        finally:
            read_progress.reset(noted)

    def start_attempt(self, row: PendingTransfer) -> Attempt | None:
        now = time.monotonic()
        claimed_at = self.claimed_at
        if now - claimed_at >= self.period:
            # Started late: only a renewal that still finds our claim says the row
            # is ours. Early in the lease nobody else can have taken it.
            if not PendingTransfer.objects.renew_lease(
                self.token, self.lease, pks=[row.pk]
            ):
                return None
            claimed_at = now
        attempt = Attempt(row, claimed_at)
        row.attempt_started_at = timezone.now()
        with self.lock:
            self.attempts[row.pk] = attempt
        return attempt

    def returned(self, attempt: Attempt) -> bool:
        """Note that the transfer of ``attempt`` returned; False if it had been
        abandoned by then, and what it did is a late worker's."""
        with self.lock:
            if attempt.abandoned:
                return False
            attempt.returned = True
            return True

    def finish_all(self, rows: list[PendingTransfer]) -> None:
        """Stop tracking ``rows``."""
        with self.lock:
            for row in rows:
                self.attempts.pop(row.pk, None)

    def finish(self, row: PendingTransfer) -> Attempt | None:
        """Stop tracking ``row``; returns its attempt (None if it was never
        tracked, or abandoned)."""
        with self.lock:
            return self.attempts.pop(row.pk, None)

    def run(self) -> None:
        """Started half a period after the claim (which found nothing to do then:
        no renewal due before a period, no transfer hung before the timeout)."""
        if self.uncommitted:
            return  # nothing to renew, and a hung transfer keeps its caller anyway
        try:
            while not self.stopped.wait(self.period / 2):
                self._tick()
        finally:
            connections.close_all()

    def _tick(self) -> None:
        now = time.monotonic()
        with self.lock:
            hung = [
                attempt
                for attempt in self.attempts.values()
                if not attempt.returned and now - attempt.progress_at >= self.timeout
            ]
            for attempt in hung:
                attempt.abandoned = True
                del self.attempts[attempt.row.pk]
            due = any(
                now - attempt.renewed_at >= self.period
                for attempt in self.attempts.values()
            )
            renew = list(self.attempts.values()) if due else []
        if renew:
            try:
                PendingTransfer.objects.renew_lease(
                    self.token, self.lease, pks=[attempt.row.pk for attempt in renew]
                )
                if self.token in breaker.seen.probes:
                    breaker.renew_probe(self.token, self.lease)
            except Exception as exc:
                # Keep renewing: one failed renewal must not cost the lease of a
                # transfer that is still running. A fresh connection next time.
                logger.warning(
                    "lease renewal failed token=%s error=%s: %s",
                    self.token,
                    type(exc).__name__,
                    exc,
                )
                connections.close_all()
            else:
                for attempt in renew:
                    attempt.renewed_at = now
        for attempt in hung:
            try:
                self.on_abandon(attempt)
            except Exception as exc:
                log_crash(attempt.row, exc)

    def __enter__(self) -> LeaseKeeper:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopped.set()
        self.join()


def abandon_attempt(attempt: Attempt) -> Outcome:
    """Record a transfer that made no progress for the timeout as a failed
    attempt, to be retried: a compare-and-set like any other, on a copy of the row,
    since the hung transfer still holds the original and must lose with it."""
    row = copy.copy(attempt.row)
    timeout = conf.QUEUED_STORAGE_TRANSFER_TIMEOUT
    logger.warning(
        "transfer abandoned key=%s name=%s generation=%s timeout=%s",
        row.storage_key,
        row.name,
        row.generation,
        timeout,
    )
    try:
        storage = registry.get(row.storage_key)
    except Exception:
        storage = None
    task = storage.task_class if storage is not None else NoTask
    retries, delay, not_retried = retry_limits(task)
    error = TransferTimeout(
        f"the transfer of {row.name!r} made no progress for {timeout:g} s "
        "(QUEUED_STORAGE_TRANSFER_TIMEOUT) and was abandoned"
    )
    spared = breaker.note_failure(row, error)  # a remote that hangs fails
    status = row.mark_failure(
        error,
        message=str(error) + (breaker.SPARED if spared else "") + not_retried,
        retry=not not_retried,
        max_retries=retries,
        base_delay=0 if spared else delay,
        counted=not spared,
        # A hung upload may have written part of the object, and may still write:
        # the next attempt replaces it rather than fail over it as foreign.
        owned=True if row.upload_sent else None,
    )
    if status is None:
        return Outcome.STALE
    if status == PendingTransfer.Status.FAILED:
        on_commit(send_failed, storage, row, task)
        return Outcome.FAILED
    return Outcome.RETRY


def hand_back(rows: list[PendingTransfer]) -> None:
    """Give back claimed rows that no lane started."""
    try:
        PendingTransfer.objects.release_claim(rows)
    except Exception as exc:
        # Left to their leases, as if the worker had been killed.
        logger.warning(
            "could not hand back %s unstarted row(s) error=%s",
            len(rows),
            type(exc).__name__,
        )
