"""The transfer hook: plain classes (no Celery) that a storage's ``task=`` names.

``transfer()`` returns ``True`` when the file is on the remote, ``False`` to be
retried later; anything else is a programming error, recorded and not retried.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from django.core.files.storage import Storage

from queued_storage.conf import settings as conf
from queued_storage.copying import stock_copy


class _Setting:
    """A class attribute that is the setting's value whenever it is read (so
    ``override_settings`` works), unless a subclass or an instance sets its own:
    0.8 documented ``Transfer.max_retries`` as ``QUEUED_STORAGE_RETRIES``."""

    def __init__(self, setting: str) -> None:
        self.setting = setting

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        # A value no worker could use raises ImproperlyConfigured here, at first use.
        return getattr(conf, self.setting)


class Transfer:
    """Copy the file to the remote under the same name."""

    if TYPE_CHECKING:
        max_retries: ClassVar[int | None]
        default_retry_delay: ClassVar[float | None]
    else:
        #: Retries after the first attempt: ``QUEUED_STORAGE_RETRIES`` unless a
        #: subclass sets it (``None`` also means the setting).
        max_retries = _Setting("QUEUED_STORAGE_RETRIES")
        #: Base of the backoff in seconds: ``QUEUED_STORAGE_RETRY_DELAY`` unless a
        #: subclass sets it (``None`` also means the setting).
        default_retry_delay = _Setting("QUEUED_STORAGE_RETRY_DELAY")
    #: Remove the local copy once the remote copy is verified and recorded as done.
    delete_local: ClassVar[bool] = False

    def transfer(
        self, name: str, local: Storage, remote: Storage, **kwargs: Any
    ) -> bool:
        """Copy ``name``; ``False`` when the copy failed, as in 0.8. A worker still
        records the copy's error on the row, and treats it as that error (a
        conflict, a refused conditional upload, ...), whatever a subclass that
        calls this returns or raises afterwards."""
        return stock_copy(name, local, remote)


class TransferAndDelete(Transfer):
    """Like :class:`Transfer`, then delete the local copy after the verified,
    committed transfer."""

    delete_local = True
