"""Attacks on the checks, the numbers of settings and options, verbosity and the
stop signals (issue 14, point 4): each test is a break that was found, kept."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.files.base import ContentFile

from queued_storage.checks import check_settings
from queued_storage.conf import settings as conf
from queued_storage.management.commands import process_transfers
from queued_storage.models import PendingTransfer
from queued_storage.worker import drain
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
