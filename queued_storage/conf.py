"""Settings, read live so that ``override_settings`` works."""

from __future__ import annotations

import math
import numbers
import socket
from typing import Any

from django.conf import settings as django_settings
from django.core.exceptions import ImproperlyConfigured

#: Longest host name the ledger's ``host`` column stores.
MAX_HOST_LENGTH = 255

#: Longest duration a setting or a command option may give, in seconds: a hundred
#: years. Beyond it ``now + duration`` overflows a datetime (year 9999) or a
#: database's timestamp before anyone could mean it.
MAX_SECONDS = 100 * 365 * 86400

#: The largest mmap threshold glibc accepts on a 64-bit system (32 MiB).
MAX_MMAP_THRESHOLD = 32 * 1024 * 1024

#: Most attempts a row may be given: the ledger's ``attempts`` column is a
#: 32-bit integer on every database.
MAX_RETRIES = 2**31 - 1

#: The shortest value of each duration setting, in seconds. A lease or timeout
#: under a second makes the lease keeper renew (or abandon) in a busy loop, and a
#: lease of 0 runs out before the upload starts: no file would ever be sent.
MINIMUM_SECONDS: dict[str, float] = {
    "QUEUED_STORAGE_RETRY_DELAY": 0,
    "QUEUED_STORAGE_LEASE": 1,
    "QUEUED_STORAGE_TRANSFER_TIMEOUT": 1,
    "QUEUED_STORAGE_HEALTH_MAX_AGE": 1,
    # The dashboard charts the last day.
    "QUEUED_STORAGE_HISTORY_RETENTION": 86400,
}

WORKERS = ("immediate", "django_q", "django_tasks", "celery")

DEFAULTS: dict[str, Any] = {
    "QUEUED_STORAGE_RETRIES": 5,
    "QUEUED_STORAGE_RETRY_DELAY": 60,
    "QUEUED_STORAGE_LEASE": 300,
    "QUEUED_STORAGE_TRANSFER_TIMEOUT": 600,
    "QUEUED_STORAGE_CACHE_PREFIX": "queued_storage",
    "QUEUED_STORAGE_WORKER": None,
    "QUEUED_STORAGE_HOSTNAME": None,
    "QUEUED_STORAGE_HEALTH_MAX_AGE": 900,
    "QUEUED_STORAGE_HISTORY_RETENTION": 2 * 86400,
    "QUEUED_STORAGE_BREAKER_FAILURES": 5,
    # glibc's own initial threshold, kept from rising (see allocator.py).
    "QUEUED_STORAGE_WORKER_MMAP_THRESHOLD": 128 * 1024,
}

#: The circuit breaker's first backoff is QUEUED_STORAGE_RETRY_DELAY, at least
#: this many seconds; each failed probe doubles it, up to
#: ``BREAKER_BACKOFF_FACTOR`` times the retry delay and at most
#: ``MAX_BREAKER_BACKOFF`` seconds (60 s, 120 s, ... 32 min by default).
MIN_BREAKER_BACKOFF = 1.0
BREAKER_BACKOFF_FACTOR = 32
MAX_BREAKER_BACKOFF = 3600.0


class Settings:
    """Typed access to the ``QUEUED_STORAGE_*`` settings."""

    def _get(self, name: str) -> Any:
        return getattr(django_settings, name, DEFAULTS[name])

    def _seconds(self, name: str) -> float:
        """A duration setting, refused at first use as ``manage.py check`` refuses
        it: where checks do not run (a Celery or django-q2 worker, call_command)
        a value under the minimum would not be noticed until the worker spins."""
        value = self._get(name)
        minimum = MINIMUM_SECONDS[name]
        if not usable_number(value, maximum=MAX_SECONDS) or value < minimum:
            raise ImproperlyConfigured(
                f"{name} is {value!r}; set it to a number of seconds from "
                f"{minimum:g} to {MAX_SECONDS} (a hundred years)."
            )
        return float(value)

    def _count(self, name: str, what: str = "") -> int:
        value = self._get(name)
        if not usable_number(value, maximum=MAX_RETRIES) or value != int(value):
            raise ImproperlyConfigured(
                f"{name} is {value!r}; set it to a whole number from 0 to "
                f"{MAX_RETRIES}{what}."
            )
        return int(value)

    @property
    def QUEUED_STORAGE_RETRIES(self) -> int:
        return self._count("QUEUED_STORAGE_RETRIES")

    @property
    def QUEUED_STORAGE_BREAKER_FAILURES(self) -> int:
        """Consecutive remote failures of a storage that open its circuit breaker;
        0: no breaker."""
        return self._count("QUEUED_STORAGE_BREAKER_FAILURES", " (0: no breaker)")

    def breaker_backoff(self, previous: float = 0.0) -> float:
        """Seconds an open breaker waits before its next probe: the first after
        ``previous`` 0, else twice ``previous``, capped (see MIN_BREAKER_BACKOFF)."""
        delay = self.QUEUED_STORAGE_RETRY_DELAY
        first = min(max(delay, MIN_BREAKER_BACKOFF), MAX_BREAKER_BACKOFF)
        if previous <= 0:
            return first
        cap = max(first, min(delay * BREAKER_BACKOFF_FACTOR, MAX_BREAKER_BACKOFF))
        return min(previous * 2, cap)

    @property
    def QUEUED_STORAGE_WORKER_MMAP_THRESHOLD(self) -> int | None:
        """Bytes from which ``process_transfers`` has glibc map each allocation
        on its own; ``None``: glibc's own (rising) threshold."""
        value = self._get("QUEUED_STORAGE_WORKER_MMAP_THRESHOLD")
        if value is None:
            return None
        if not usable_number(value, maximum=MAX_MMAP_THRESHOLD) or not isinstance(
            value, numbers.Integral
        ):
            raise ImproperlyConfigured(
                f"QUEUED_STORAGE_WORKER_MMAP_THRESHOLD is {value!r}; "
                f"{MMAP_THRESHOLD_HINT}"
            )
        return int(value)

    @property
    def QUEUED_STORAGE_RETRY_DELAY(self) -> float:
        return self._seconds("QUEUED_STORAGE_RETRY_DELAY")

    @property
    def QUEUED_STORAGE_LEASE(self) -> float:
        return self._seconds("QUEUED_STORAGE_LEASE")

    @property
    def QUEUED_STORAGE_TRANSFER_TIMEOUT(self) -> float:
        """Seconds a transfer may make no progress before it is abandoned."""
        return self._seconds("QUEUED_STORAGE_TRANSFER_TIMEOUT")

    @property
    def QUEUED_STORAGE_CACHE_PREFIX(self) -> str:
        return str(self._get("QUEUED_STORAGE_CACHE_PREFIX"))

    @property
    def QUEUED_STORAGE_WORKER(self) -> str | None:
        value = self._get("QUEUED_STORAGE_WORKER")
        return None if value is None else str(value)

    @property
    def QUEUED_STORAGE_HOSTNAME(self) -> str:
        """This host's name in the ledger's ``host`` column."""
        host = self.hostname()
        problem = hostname_problem(host)
        if problem:
            # Cut short (MariaDB's INSERT IGNORE does so silently), the name would
            # never match this host again: its host-local rows would wait forever.
            raise ImproperlyConfigured(f"{problem} {HOSTNAME_HINT}")
        return host

    def hostname(self) -> str:
        """``QUEUED_STORAGE_HOSTNAME`` or the machine's host name, unchecked."""
        value = self._get("QUEUED_STORAGE_HOSTNAME")
        return str(value) if value else socket.gethostname()

    @property
    def QUEUED_STORAGE_HEALTH_MAX_AGE(self) -> float:
        """Seconds the oldest due row may wait before the health check fails."""
        return self._seconds("QUEUED_STORAGE_HEALTH_MAX_AGE")

    @property
    def QUEUED_STORAGE_HISTORY_RETENTION(self) -> float:
        """Seconds the per-minute transfer history is kept before it is folded
        into each storage's totals."""
        return self._seconds("QUEUED_STORAGE_HISTORY_RETENTION")

    def raw(self, name: str) -> Any:
        """The value as the user wrote it, for the system checks."""
        return self._get(name)


def usable_number(value: Any, *, maximum: float | None = None) -> bool:
    """Whether ``value`` is a number a worker can compute with: finite, not
    negative and at most ``maximum``. NaN compares false with everything, so it
    would pass any minimum; a huge one overflows the datetimes it is added to."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        return False
    if not math.isfinite(number) or number < 0:
        return False
    return maximum is None or number <= maximum


MMAP_THRESHOLD_HINT = (
    f"set it to a whole number of bytes from 0 to {MAX_MMAP_THRESHOLD}, or None "
    "to leave glibc's malloc as it is."
)

HOSTNAME_HINT = (
    "Set QUEUED_STORAGE_HOSTNAME to a shorter name that stays the same for this "
    "host's local disk."
)


def hostname_problem(host: str) -> str:
    """Why the ledger cannot record ``host``, or ``""``."""
    if len(host) > MAX_HOST_LENGTH:
        return (
            f"This host's name for the ledger ({host[:40]!r}...) is {len(host)} "
            f"characters long; the ledger's host column holds {MAX_HOST_LENGTH}."
        )
    return ""


settings = Settings()
