"""Recording an attempt that did not succeed: the hook's retry limits, the
failure or crash on its row, ``transfer_failed``, and errors raised after the
outcome was committed."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from django.core.exceptions import ImproperlyConfigured
from django.db import router

from queued_storage import breaker, redaction, registry
from queued_storage.conf import settings as conf
from queued_storage.conf import usable_number
from queued_storage.errors import Outcome
from queued_storage.models import PendingTransfer
from queued_storage.signals import transfer_failed

if TYPE_CHECKING:
    from queued_storage.storage import QueuedStorage

logger = logging.getLogger("queued_storage")


def _retry_settings(task: Any) -> tuple[int, float]:
    """The hook's ``max_retries`` and ``default_retry_delay`` (None: the
    settings'); ``ImproperlyConfigured`` for a value no worker can use."""
    hook = _hook_class(task).__name__
    retries = task.max_retries
    delay = task.default_retry_delay
    if retries is None:
        retries = conf.QUEUED_STORAGE_RETRIES
    elif problem := hook_limit_problem(hook, "max_retries", retries):
        raise ImproperlyConfigured(problem)
    if delay is None:
        delay = conf.QUEUED_STORAGE_RETRY_DELAY
    elif problem := hook_limit_problem(hook, "default_retry_delay", delay):
        raise ImproperlyConfigured(problem)
    return int(retries), float(delay)


def hook_limit_problem(hook: str, attribute: str, value: Any) -> str:
    """Why a hook's own ``max_retries`` or ``default_retry_delay`` is a value no
    worker can use, or ``""``: its first use and ``manage.py check`` say so."""
    if attribute == "max_retries":
        if usable_number(value) and value == int(value):
            return ""
        return (
            f"{hook}.max_retries is {value!r}; set it to a whole number of "
            "retries, or None for QUEUED_STORAGE_RETRIES."
        )
    if usable_number(value):
        return ""
    return (
        f"{hook}.default_retry_delay is {value!r}; set it to a finite number of "
        "seconds, or None for QUEUED_STORAGE_RETRY_DELAY."
    )


def retry_limits(task: Any) -> tuple[int, float, str]:
    """:func:`_retry_settings`, and ``""``; when the hook or the settings give no
    limits a worker can use, no retry and why, to add to the attempt's error. The
    error is recorded all the same: a failure that cannot be recorded leaves its
    row to be claimed again at the end of every lease, for ever, unseen."""
    try:
        retries, delay = _retry_settings(task)
    except ImproperlyConfigured as exc:
        return 0, 0.0, f" (not retried: {exc})"
    return retries, delay, ""


def ledger_db() -> str:
    return router.db_for_write(PendingTransfer)


def on_commit(func: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Call ``func`` after the ledger's transaction commits; a failure is logged,
    redacted."""
    redaction.after_commit(ledger_db(), func, *args, **kwargs)


def send_failed(storage: QueuedStorage | None, row: PendingTransfer, task: Any) -> None:
    """``transfer_failed``, after the ``FAILED`` commit; what a receiver raises is
    kept on the row beside the transfer's own error."""
    sent = transfer_failed.send_robust(
        sender=_hook_class(task),
        name=row.name,
        error=row.last_error,
        storage=storage,
        key=row.storage_key,
        attempts=row.attempts,
    )
    for _receiver, error in sent:
        if isinstance(error, Exception):
            keep_late_error(storage, row, error, PendingTransfer.Status.FAILED)


def keep_late_error(
    storage: QueuedStorage | None,
    row: PendingTransfer,
    error: Exception,
    status: str,
) -> None:
    message = storage.redact(str(error)) if storage is not None else str(error)
    logger.error(
        "after-transfer work failed key=%s name=%s status=%s error=%s: %s",
        row.storage_key,
        row.name,
        status,
        type(error).__name__,
        message,
    )
    try:
        row.keep_error(error, status=status, message=message)
    except Exception as exc:
        logger.error(
            "could not keep the error on the row key=%s name=%s error=%s",
            row.storage_key,
            row.name,
            type(exc).__name__,
        )


def _hook_class(task: Any) -> type:
    return task if isinstance(task, type) else type(task)


def record_crash(row: PendingTransfer, exc: Exception) -> Outcome:
    """An error that no step of the transfer recorded (a bug, the storage's
    registry, the ledger itself): log it, and keep it on the row as an attempt if
    the claim still stands, so that the row is retried and runs out of attempts
    like any other instead of waiting for its lease, claimed again and again."""
    log_crash(row, exc)
    try:
        storage = registry.get(row.storage_key)
    except Exception:
        storage = None
    try:
        breaker.forget_probe(row)  # a crash says nothing of the remote
        task = storage.task_class if storage is not None else NoTask
        retries, delay, not_retried = retry_limits(task)
        message = storage.redact(str(exc)) if storage is not None else str(exc)
        status = row.mark_failure(
            exc,
            message=message + not_retried,
            retry=not not_retried,
            max_retries=retries,
            base_delay=delay,
            # Past the upload (its DONE record failed, say), what it wrote is the
            # row's: the retry replaces it rather than fail over it as foreign.
            owned=True if row.upload_sent else None,
        )
    except Exception as error:
        logger.error(
            "could not record a crash key=%s name=%s error=%s",
            row.storage_key,
            row.name,
            type(error).__name__,
        )
        return Outcome.STALE
    if status == PendingTransfer.Status.FAILED:
        on_commit(send_failed, storage, row, task)
        return Outcome.FAILED
    return Outcome.STALE if status is None else Outcome.RETRY


def record_failure(
    row: PendingTransfer,
    storage: QueuedStorage | None,
    error: BaseException,
    task: Any = None,
    wrote: bool | None = None,
) -> Outcome | None:
    """Record ``error`` as the attempt's; ``wrote`` as for ``mark_failure(owned=)``.
    None when the attempt went stale (its compare-and-set lost): the caller
    reconciles."""
    if task is None:
        task = storage.task_class if storage is not None else NoTask
    retries, delay, not_retried = retry_limits(task)
    retry = getattr(error, "retry", True) and not not_retried
    message = storage.redact(str(error)) if storage is not None else str(error)
    spared = breaker.note_failure(row, error)
    status = row.mark_failure(
        error,
        message=message + (breaker.SPARED if spared else "") + not_retried,
        retry=retry,
        max_retries=retries,
        # Due again at once: the breaker, not the row's backoff, says when.
        base_delay=0 if spared else delay,
        owned=wrote,
        counted=not spared,
    )
    if status is None:
        return None
    logger.warning(
        "transfer error key=%s name=%s attempt=%s status=%s error=%s",
        row.storage_key,
        row.name,
        row.attempts,
        status,
        row.last_error,
    )
    if status == PendingTransfer.Status.FAILED:
        on_commit(send_failed, storage, row, task)
        return Outcome.FAILED
    return Outcome.RETRY


class NoTask:
    max_retries = None
    default_retry_delay = None


def log_crash(row: PendingTransfer, exc: BaseException) -> None:
    # A bug or a dead database: never kill the loop over one row. No traceback:
    # its frames could show a storage's credentials.
    try:
        storage = registry.get(row.storage_key)
    except Exception:
        storage = None
    logger.error(
        "transfer crashed key=%s name=%s error=%s: %s",
        row.storage_key,
        row.name,
        type(exc).__name__,
        storage.redact(str(exc)) if storage is not None else "",
    )
