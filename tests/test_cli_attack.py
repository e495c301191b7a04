"""Attacks on the checks, the numbers of settings and options, verbosity and the
stop signals (issue 14, point 4): each test is a break that was found, kept."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.files.base import ContentFile
from django.core.management import ManagementUtility, call_command

from queued_storage.checks import check_settings, check_storages
from queued_storage.conf import settings as conf
from queued_storage.failures import retry_limits
from queued_storage.management.cli import verbosity_logging
from queued_storage.management.commands import process_transfers
from queued_storage.models import PendingTransfer
from queued_storage.tasks import Transfer
from queued_storage.worker import drain
from tests.helpers import BACKEND, Exited
from tests.testapp.models import Document

Status = PendingTransfer.Status


class SteppingClock:
    """``time`` for the command's idle sleep: each reading of the clock is the next
    of ``readings``; each sleep is recorded, and refused when negative as
    ``time.sleep`` refuses it."""

    def __init__(self, readings: list[float]) -> None:
        self.readings: Iterator[float] = iter(readings)
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return next(self.readings)

    def sleep(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("sleep length must be non-negative")
        self.slept.append(seconds)


def test_an_idle_sleep_whose_deadline_passes_between_two_clock_readings_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The deadline is 1.0; the loop's test reads 0.9 (not yet), the next reading
    is 1.1. Read twice, that was ``time.sleep(-0.1)``: ValueError, and a --loop
    worker idle between polls crashed (near at once with ``--interval 1e-7``)."""
    clock = SteppingClock([0.0, 0.9, 1.1, 1.2, 1.3])
    monkeypatch.setattr(process_transfers, "time", clock)
    command = process_transfers.Command()
    command.stopping = False

    command._sleep(1.0)

    assert clock.slept == [pytest.approx(0.1)]


@pytest.mark.parametrize(
    ("setting", "value", "check_id"),
    [
        ("QUEUED_STORAGE_LEASE", 0, "queued_storage.E009"),
        ("QUEUED_STORAGE_LEASE", 1e-9, "queued_storage.E009"),
        ("QUEUED_STORAGE_LEASE", 0.5, "queued_storage.E009"),
        ("QUEUED_STORAGE_TRANSFER_TIMEOUT", 0, "queued_storage.E007"),
        ("QUEUED_STORAGE_TRANSFER_TIMEOUT", 1e-9, "queued_storage.E007"),
        ("QUEUED_STORAGE_HEALTH_MAX_AGE", 0.5, "queued_storage.E010"),
    ],
)
@pytest.mark.django_db(transaction=True)
def test_a_duration_under_the_checks_minimum_is_refused_at_first_use_too(
    settings: Any, setting: str, value: float, check_id: str
) -> None:
    """Where checks do not run (a Celery or django-q2 worker, call_command), a
    lease of 0 ran out before each upload (every attempt LeaseLost, the file never
    sent), one of 1e-9 renewed in a busy loop (143 renewals for one 1-byte file),
    a timeout of 1e-9 abandoned every transfer: the check's minimum holds at first
    use as well, naming the setting."""
    Document.objects.create(file=ContentFile(b"x", name="tiny.txt"))
    setattr(settings, setting, value)

    assert [e.id for e in check_settings()] == [check_id]
    with pytest.raises(ImproperlyConfigured, match=setting):
        getattr(conf, setting)
    if setting != "QUEUED_STORAGE_HEALTH_MAX_AGE":
        with pytest.raises(ImproperlyConfigured, match=setting):
            drain()
        row = PendingTransfer.objects.get()
        assert (row.status, row.attempts, row.last_error) == (Status.QUEUED, 0, "")


@pytest.mark.parametrize(
    "setting",
    [
        "QUEUED_STORAGE_LEASE",
        "QUEUED_STORAGE_TRANSFER_TIMEOUT",
        "QUEUED_STORAGE_HEALTH_MAX_AGE",
    ],
)
def test_the_shortest_duration_the_check_accepts_is_usable(
    settings: Any, setting: str
) -> None:
    setattr(settings, setting, 1)

    assert check_settings() == []
    assert getattr(conf, setting) == 1.0


@pytest.fixture
def no_alarm_left() -> Iterator[None]:
    """os._exit is faked in these tests, so the process lives on: cancel a stop's
    alarm, which would otherwise end the test run with the real one."""
    before = signal.getsignal(signal.SIGALRM)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, before)


def test_a_second_signal_stops_even_when_stderr_blocks(
    monkeypatch: pytest.MonkeyPatch, no_alarm_left: None
) -> None:
    """stderr is a pipe nobody reads (a stalled log collector): the second
    signal's warning blocks in its write. The second signal waited on it for as
    long; now an alarm ends the process a moment later, the write still blocked."""
    command = process_transfers.Command()
    command.stopping = False
    previous = command._install_signal_handlers()
    handler = signal.getsignal(signal.SIGTERM)
    assert callable(handler)
    unblocked = threading.Event()
    written: list[str] = []
    exits: list[tuple[int, list[str]]] = []

    def warning(message: str, *args: Any) -> None:
        if message.startswith("stopping now"):
            # Bounded so that the code before the fix ends too (and fails).
            unblocked.wait(timeout=10)
        written.append(message)

    def exit_now(status: int) -> None:
        exits.append((status, list(written)))
        raise Exited(status)

    monkeypatch.setattr(process_transfers.logger, "warning", warning)
    monkeypatch.setattr(os, "_exit", exit_now)
    monkeypatch.setattr(process_transfers, "STOP_NOW_WRITE_WAIT", 0.05, raising=False)
    try:
        handler(signal.SIGTERM, None)
        assert command.stopping
        with pytest.raises(Exited):
            handler(signal.SIGTERM, None)
    finally:
        unblocked.set()
        for signum, old in previous.items():
            signal.signal(signum, old)
    # Exited while the second warning's write was still blocked.
    [(status, before_exit)] = exits
    assert status == 128 + signal.SIGTERM
    assert [m.split()[0:2] for m in before_exit] == [["stopping", "signal=%s"]]


class NaNRetries(Transfer):
    max_retries = float("nan")  # type: ignore[assignment]


class HugeRetries(Transfer):
    max_retries = 10**400


class InfiniteDelay(Transfer):
    default_retry_delay = float("inf")


class TextDelay(Transfer):
    default_retry_delay = "60"  # type: ignore[assignment]


class OwnLimits(Transfer):
    max_retries = 3
    default_retry_delay = 0.5


class SettingsLimits(Transfer):
    max_retries = None
    default_retry_delay = None


def hooked(settings: Any, forget_keys: list[str], hook: type[Transfer]) -> None:
    settings.STORAGES = {
        **settings.STORAGES,
        "hooked": {
            "BACKEND": BACKEND,
            "OPTIONS": {
                "local": "queued_local",
                "remote": "queued_remote",
                "key": "hooked",
                "task": f"{__name__}.{hook.__name__}",
            },
        },
    }
    forget_keys.append("hooked")


@pytest.mark.parametrize(
    ("hook", "attribute"),
    [
        (NaNRetries, "max_retries"),
        (HugeRetries, "max_retries"),
        (InfiniteDelay, "default_retry_delay"),
        (TextDelay, "default_retry_delay"),
    ],
)
def test_a_hook_whose_own_retry_limits_no_worker_can_use_fails_the_checks(
    settings: Any, forget_keys: list[str], hook: type[Transfer], attribute: str
) -> None:
    """Its first use recorded each failed attempt as not retried, and nothing
    before said so: manage.py check now does (E014), in the same words."""
    hooked(settings, forget_keys, hook)

    [error] = [e for e in check_storages() if e.id == "queued_storage.E014"]
    retries, delay, not_retried = retry_limits(hook())

    assert f"{hook.__name__}.{attribute} is" in error.msg
    assert "'hooked'" in error.msg
    assert (retries, delay) == (0, 0.0)
    assert not_retried.removeprefix(" (not retried: ").rstrip(")") in error.msg


@pytest.mark.parametrize("hook", [OwnLimits, SettingsLimits, Transfer])
def test_a_hook_with_usable_or_inherited_retry_limits_passes_the_checks(
    settings: Any, forget_keys: list[str], hook: type[Transfer]
) -> None:
    hooked(settings, forget_keys, hook)

    assert [e.id for e in check_storages()] == []


@pytest.mark.parametrize("value", ["-1", "-5", "2147483648"])
def test_transfer_status_refuses_a_failed_threshold_no_count_can_meet(
    capsys: pytest.CaptureFixture[str], value: str
) -> None:
    """``--max-failed -1`` was taken: "more than -1 failed" is always true, and
    every run exited 3 ("0 transfers are failed, more than -1") as if rows had
    failed."""
    with pytest.raises(SystemExit) as exit_info:
        ManagementUtility(
            ["manage.py", "transfer_status", "--max-failed", value]
        ).execute()

    assert exit_info.value.code == 2
    assert "--max-failed" in capsys.readouterr().err


@pytest.mark.django_db
def test_transfer_status_takes_a_failed_threshold_of_zero() -> None:
    call_command("transfer_status", "--max-failed", "0", verbosity=0)


def test_two_commands_at_once_leave_the_logger_as_the_site_had_it() -> None:
    """Two call_command() in threads of one process, the first to start ending
    first: the second put back the level the first had set (WARNING), and the
    process logged no INFO line of the package again; meanwhile the second ran
    at -v 2 without its INFO lines. One thread, the same order of steps."""
    logger = logging.getLogger("queued_storage")
    assert logger.level == logging.NOTSET
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    keep = Keep()
    logger.addHandler(keep)
    first, second = verbosity_logging(1), verbosity_logging(2)
    try:
        first.__enter__()
        second.__enter__()
        logger.info("both run")
        first.__exit__(None, None, None)
        logger.info("the second runs")
        second.__exit__(None, None, None)
        level = logger.level
    finally:
        logger.removeHandler(keep)
        logger.setLevel(logging.NOTSET)

    assert seen == ["both run", "the second runs"]
    assert level == logging.NOTSET
