"""Celery as the wake-up: one task per committed save, and a beat entry that
sweeps up whatever a lost message or a dead worker left due.

The tasks are shared tasks: they belong to whichever Celery app the site runs
(``current_app``), under names that stay the same across releases. A message
carries the storage key and the file name, nothing else. A task delivered twice,
or for a row that is not due (not yet, already done, held, or leased by another
worker), claims nothing and returns ``None``: the ledger stays the truth.

This module imports nothing that needs Django's app registry, so a site's
``celery.py`` or settings can import it for ``beat_schedule()``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from celery import current_app, shared_task

from queued_storage import redaction

logger = logging.getLogger("queued_storage")

#: The task names in every message and in the beat schedule.
TRANSFER_TASK = "queued_storage.transfer"
SWEEP_TASK = "queued_storage.sweep"
#: The key of the sweep's entry in ``beat_schedule``.
SCHEDULE_NAME = "queued_storage: sweep due transfers"
#: Seconds a wake-up may wait on the broker: connecting, then each read or write.
SEND_TIMEOUT = 1.0


# The engine is imported when a task runs: it needs the ledger model, and so the
# app registry, which is not ready when the site's celery.py imports this module.
@shared_task(name=TRANSFER_TASK, ignore_result=True)  # type: ignore[untyped-decorator]
def transfer(key: str, name: str) -> str | None:
    """Transfer the row of ``name`` if it is due; the outcome, or ``None`` when the
    row was not due and nothing was done."""
    from queued_storage.worker import transfer_name

    outcome = transfer_name(key, name)
    return None if outcome is None else outcome.value


@shared_task(name=SWEEP_TASK)  # type: ignore[untyped-decorator]
def sweep() -> dict[str, int]:
    """Drain every due row: retries whose backoff ran out, expired leases, and rows
    whose message was lost. What the beat entry runs."""
    from queued_storage.worker import drain

    return drain().counts()


def enqueue(key: str, name: str) -> None:
    """Send the task for one row; called after the saving transaction commits.

    A broker that cannot take the message costs latency, not the save: the row
    stays due for the sweep, and the failure is logged without the broker's
    credentials.

    It runs in the request that saved: it is sent once, on a connection of its own
    whose every wait is bounded. Celery's default would retry the publish, and
    wait 4 s for a broker that accepts and does not answer (forever on Redis)."""
    try:
        with current_app.connection_for_write(
            connect_timeout=SEND_TIMEOUT,
            transport_options={
                "max_retries": 0,
                "socket_timeout": SEND_TIMEOUT,
                "socket_connect_timeout": SEND_TIMEOUT,
            },
        ) as connection:
            transfer.apply_async((key, name), connection=connection, retry=False)
    except Exception as exc:
        logger.warning(
            "celery wake-up not sent, the row waits for the sweep key=%s name=%s "
            "error=%s: %s",
            key,
            name,
            type(exc).__name__,
            _redacted(str(exc)),
        )


#: The settings of a Celery app that may hold the broker's or the result
#: backend's credentials.
CONNECTION_SETTINGS = (
    "broker_url",
    "broker_read_url",
    "broker_write_url",
    "broker_transport_options",
    "broker_use_ssl",
    "result_backend",
    "result_backend_transport_options",
    "redis_backend_use_ssl",
)


def _redacted(text: str) -> str:
    conf = current_app.conf
    options = {name: conf.get(name) for name in CONNECTION_SETTINGS}
    # A failover broker_url lists its URLs, each with its password, in one string.
    urls = [
        url
        for name in ("broker_url", "broker_read_url", "broker_write_url")
        if isinstance(options[name], str)
        for url in options[name].split(";")
    ]
    return redaction.redact_options([options, urls], text)


def beat_schedule(seconds: float = 60) -> dict[str, dict[str, Any]]:
    """The beat entry that runs the sweep every ``seconds``, to merge into
    ``CELERY_BEAT_SCHEDULE``. A sweep not started within its interval expires: a
    newer one is on its way, and a stopped worker finds one, not a backlog."""
    if isinstance(seconds, bool) or not (
        isinstance(seconds, (int, float)) and math.isfinite(seconds)
    ):
        raise ValueError(f"The sweep runs every so many seconds, not {seconds!r}.")
    if seconds < 1:
        raise ValueError("The sweep runs every 1 second or more.")
    every = float(seconds)
    return {
        SCHEDULE_NAME: {
            "task": SWEEP_TASK,
            "schedule": every,
            "options": {"expires": every},
        }
    }
