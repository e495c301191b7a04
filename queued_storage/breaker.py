"""A storage's circuit breaker, as attempts end: count its remote's failures in a
row, open after ``QUEUED_STORAGE_BREAKER_FAILURES`` of them (no row of the
storage is claimed until a probe), reopen with twice the backoff when the probe
fails, close at the first success. What counts is a failure of the remote (it
raised, hung, or the hook returned False), never a file's own problem.

While a storage's breaker is open, the failures of its attempts (the rows
already in hand, the probe; not the one that opened it) do not use up the rows'
attempts: an outage longer than the retry horizon leaves rows queued, not
failed. Their errors are kept on the rows all the same (invariant 7)."""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from django.core.exceptions import ImproperlyConfigured, SuspiciousOperation
from django.db import router, transaction
from django.db.models import F, Q
from django.utils import timezone

from queued_storage.conf import settings as conf
from queued_storage.errors import HookDeclined, TransferError, TransferTimeout
from queued_storage.ledger_sql import retry_when_locked
from queued_storage.storage_state import StorageState

if TYPE_CHECKING:
    from queued_storage.models import PendingTransfer

logger = logging.getLogger("queued_storage")

#: What the remote did: the hook's ``False``, a transfer that made no progress
#: for the timeout. Every other error of the package's own is about the file or
#: the ledger (the local file missing or changed, a name the remote renamed, a
#: copy of another size, a lost lease), and never counts.
REMOTE_ERRORS: tuple[type[BaseException], ...] = (HookDeclined, TransferTimeout)

#: Errors that are a programming error (in a hook, a storage class) or one
#: file's own problem, whoever raised them: they never count. Anything else an
#: attempt raises (OSError and its ConnectionError and TimeoutError, botocore's
#: and the other SDKs' errors) is the remote's.
NOT_REMOTE_ERRORS: tuple[type[BaseException], ...] = (
    TypeError,
    AttributeError,
    NameError,
    LookupError,
    ValueError,
    AssertionError,
    ImportError,
    NotImplementedError,
    ArithmeticError,
    RecursionError,
    MemoryError,
    ImproperlyConfigured,
    SuspiciousOperation,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
)


#: Added to the error kept on a row whose attempt the breaker took.
SPARED = (
    " (not counted against this file's retries: its storage's circuit breaker is open)"
)


def is_remote_failure(error: BaseException) -> bool:
    """Whether ``error``, an attempt's, is its remote failing (see
    :data:`REMOTE_ERRORS` and :data:`NOT_REMOTE_ERRORS`)."""
    if isinstance(error, TransferError):
        return isinstance(error, REMOTE_ERRORS)
    return isinstance(error, Exception) and not isinstance(error, NOT_REMOTE_ERRORS)


class Seen:
    """What this process knows of the storages' controls, as its latest claim
    read them (every thread's): read where a row's path must not query."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        #: Storage keys whose rows no lane starts now (paused, or the breaker
        #: open): a row of one claimed before is given back unstarted.
        self.stopped: frozenset[str] = frozenset()
        #: Storage keys with remote failures in a row (or an open breaker): the
        #: next success of one resets them. A success of any other key costs no
        #: query.
        self.failing: set[str] = set()
        #: Lease tokens of the probe rows this process claimed.
        self.probes: set[str] = set()

    def update(self, stopped: frozenset[str], failing: set[str]) -> None:
        with self.lock:
            self.stopped = stopped
            self.failing = failing

    def stop(self, key: str) -> None:
        """The breaker of ``key`` opened here: the rows of it in hand wait."""
        with self.lock:
            self.stopped = self.stopped | {key}


seen = Seen()


def _now() -> datetime:
    return timezone.now()


#: The breaker's clock (tests put one of their own here).
clock = _now


def _db() -> str:
    return router.db_for_write(StorageState)


def note_failure(row: PendingTransfer, error: BaseException) -> bool:
    """Count the failed attempt of ``row`` against its storage if ``error`` is its
    remote's; whether the storage's breaker was open already (the attempt was
    in hand, or the probe): that attempt is then not counted against the row's
    retries."""
    probe = row.lease_token in seen.probes
    seen.probes.discard(row.lease_token)
    threshold = conf.QUEUED_STORAGE_BREAKER_FAILURES
    if not threshold or not is_remote_failure(error):
        if probe:
            end_probe(row)
        return False
    return _count_failure(row.storage_key, row.lease_token, threshold)


@retry_when_locked
def _count_failure(key: str, token: str, threshold: int) -> bool:
    now = clock()
    db = _db()
    with transaction.atomic(using=db):
        rows = StorageState.objects.using(db).filter(storage_key=key)
        counted = {"breaker_failures": F("breaker_failures") + 1, "updated_at": now}
        # The UPDATE first: it locks the row (SQLite: the database) before it is
        # read, so that two workers' failures are both counted, and one opens.
        if not rows.update(**counted):
            StorageState.objects.using(db).bulk_create(
                [StorageState(storage_key=key, created_at=now, updated_at=now)],
                ignore_conflicts=True,
            )
            rows.update(**counted)
        state = rows.get()
        if state.breaker_opened_at is None:
            if state.breaker_failures < threshold:
                seen.failing.add(key)
                return False
            backoff = conf.breaker_backoff()
            rows.update(
                breaker_opened_at=now,
                breaker_backoff=backoff,
                breaker_probe_at=now + timedelta(seconds=backoff),
                breaker_probe_token="",
            )
            seen.stop(key)
            logger.warning(
                "circuit breaker opened key=%s failures=%s next_probe_in=%gs",
                key,
                state.breaker_failures,
                backoff,
            )
            # Counted, as the failures before it were: were the attempt that
            # opens the breaker taken back, a file the remote alone refuses
            # would open it again at each retry and never fail (invariant 7).
            seen.failing.add(key)
            return False
        elif token and state.breaker_probe_token == token:
            backoff = conf.breaker_backoff(state.breaker_backoff)
            rows.update(
                breaker_backoff=backoff,
                breaker_probe_at=now + timedelta(seconds=backoff),
                breaker_probe_token="",
            )
            logger.warning(
                "circuit breaker probe failed key=%s failures=%s next_probe_in=%gs",
                key,
                state.breaker_failures,
                backoff,
            )
    seen.failing.add(key)
    return True


@retry_when_locked
def renew_probe(token: str, lease: float) -> None:
    """The probe row under ``token`` still runs, its lease renewed: its turn lasts
    as long, so that no other worker probes its storage meanwhile."""
    StorageState.objects.using(_db()).filter(breaker_probe_token=token).update(
        breaker_probe_at=clock() + timedelta(seconds=lease)
    )


def forget_probe(row: PendingTransfer) -> None:
    """``row``'s attempt ended and said nothing of its remote: if it was a probe,
    the next claim may probe with another row."""
    if row.lease_token in seen.probes:
        seen.probes.discard(row.lease_token)
        end_probe(row)


@retry_when_locked
def end_probe(row: PendingTransfer) -> None:
    """The probe row ``row`` ended without a word on the remote (its own file's
    problem, a crash, given back): the next claim may probe with another row."""
    StorageState.objects.using(_db()).filter(
        storage_key=row.storage_key, breaker_probe_token=row.lease_token
    ).update(breaker_probe_token="", breaker_probe_at=clock())


def note_success(rows: list[PendingTransfer]) -> None:
    """The remote took the files of ``rows``: close the breakers of their storages
    and reset their failures in a row, where the last claim read any (one query;
    none when no storage had failures)."""
    if seen.probes:
        for row in rows:
            seen.probes.discard(row.lease_token)
    keys = {row.storage_key for row in rows} & seen.failing
    if keys:
        _close(keys)


@retry_when_locked
def _close(keys: set[str]) -> None:
    now = clock()
    rows = StorageState.objects.using(_db()).filter(storage_key__in=keys)
    opened = list(
        rows.filter(breaker_opened_at__isnull=False).values_list(
            "storage_key", flat=True
        )
    )
    rows.filter(Q(breaker_failures__gt=0) | Q(breaker_opened_at__isnull=False)).update(
        breaker_failures=0,
        breaker_opened_at=None,
        breaker_probe_at=None,
        breaker_backoff=0,
        breaker_probe_token="",
        updated_at=now,
    )
    seen.failing -= keys
    for key in opened:
        logger.warning("circuit breaker closed key=%s", key)
