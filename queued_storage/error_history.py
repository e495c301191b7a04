"""What a row keeps of each failed attempt (its error history): the entry a
failure writes, and how one is read back, old entries included."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from django.utils.dateparse import parse_datetime

from queued_storage import redaction

#: How many entries of the error history a row keeps.
ERROR_HISTORY_LENGTH = 10
#: Error messages are cut to this length before they are stored.
ERROR_MESSAGE_LENGTH = 2000


def error_entry(
    error: BaseException | str,
    attempt: int,
    now: datetime,
    message: str | None = None,
    started: datetime | None = None,
) -> dict[str, Any]:
    """What the ledger keeps of an error: class, message, attempt and time, and
    the attempt's duration in seconds when ``started`` says when it began.
    ``message`` replaces the error's own text; either is kept without the
    secrets of any storage this process built."""
    if isinstance(error, BaseException):
        kind = type(error).__name__
        text = str(error)
    else:
        kind, text = "TransferError", error
    if message is None:
        message = text
    message = redaction.redact(None, message)[:ERROR_MESSAGE_LENGTH]
    entry: dict[str, Any] = {
        "attempt": attempt,
        "at": now.isoformat(),
        "error": kind,
        "message": message,
        "text": f"{kind}: {message}" if message else kind,
    }
    if started is not None:
        entry["duration"] = round(max((now - started).total_seconds(), 0.0), 3)
    return entry


def entries(history: Any) -> list[dict[str, Any]]:
    """The entries of a row's error history, whatever its JSON holds: what is not
    a list (written by hand or by a bug) has none, and what is not an entry in
    it is left out."""
    if not isinstance(history, list):
        return []
    return [entry for entry in history if isinstance(entry, dict)]


def entry_time(entry: dict[str, Any]) -> datetime | None:
    """When the entry's attempt failed; None if the entry has no readable time."""
    at = entry.get("at")
    try:
        return parse_datetime(at) if isinstance(at, str) else None
    except ValueError:
        return None


def entry_duration(entry: dict[str, Any]) -> float | None:
    """How long the entry's attempt ran, in seconds; None for an entry written
    before durations were kept, or by a failure outside an attempt."""
    duration = entry.get("duration")
    if isinstance(duration, bool) or not isinstance(duration, int | float):
        return None
    try:
        seconds = float(duration)  # JSON's 1e400: inf, or an int too large
    except OverflowError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None
