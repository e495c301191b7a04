"""The transfer hook: plain classes (no Celery) that a storage's ``task=`` names.

``transfer()`` returns ``True`` when the file is on the remote, ``False`` to be
retried later; anything else is a programming error, recorded and not retried.
"""

from __future__ import annotations

from typing import Any, ClassVar

from django.core.files.storage import Storage


class Transfer:
    """Copy the file to the remote under the same name."""

    #: Retries after the first attempt; ``None`` means ``QUEUED_STORAGE_RETRIES``.
    max_retries: ClassVar[int | None] = None
    #: Base of the backoff in seconds; ``None`` means ``QUEUED_STORAGE_RETRY_DELAY``.
    default_retry_delay: ClassVar[float | None] = None
    #: Remove the local copy once the remote copy is verified and recorded as done.
    delete_local: ClassVar[bool] = False

    def transfer(
        self, name: str, local: Storage, remote: Storage, **kwargs: Any
    ) -> bool:
        from queued_storage.transfer import copy_to_remote

        copy_to_remote(name, local, remote)
        return True


class TransferAndDelete(Transfer):
    """Like :class:`Transfer`, then delete the local copy after the verified,
    committed transfer."""

    delete_local = True
