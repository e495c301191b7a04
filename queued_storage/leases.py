"""Leases while transfers run: renew the lease of each row of a claim only
while its transfer runs, and abandon (record as a failed attempt) a transfer
that makes no progress for the timeout."""

from __future__ import annotations

import copy
import logging
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


class LeaseKeeper(threading.Thread):
    """Renews the leases of the rows of one claim whose transfers run, each only
    while it runs, and abandons a transfer that makes no progress for
    ``timeout`` seconds (``on_abandon`` is called with it, in this thread).

    Rows of the claim not started yet are not renewed: their leases run out, and
    another worker may take them; a row started late checks its claim first."""

    def __init__(
        self,
        token: str,
        lease: float,
        timeout: float | None = None,
        on_abandon: Callable[[Attempt], object] | None = None,
    ) -> None:
        super().__init__(name=f"queued-storage-lease-{token[:8]}", daemon=True)
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
