"""Remotes and a transfer hook that spend no CPU of their own: a no-op remote and
hook, to time the ledger alone, and a remote that waits per write, to time
workers that wait on a remote (the scale-out benchmark)."""

from __future__ import annotations

import time
from typing import Any

from django.core.files.storage import FileSystemStorage, Storage

from queued_storage.tasks import Transfer

#: Every file the overhead benchmark saves has this size.
FILE_SIZE = 1024


class NoopStorage(Storage):
    """Has every file (of ``FILE_SIZE`` bytes) and no bytes at all."""

    def __init__(self, **options: Any) -> None:
        pass

    def _save(self, name: str, content: Any) -> str:
        return name

    def exists(self, name: str) -> bool:
        return False

    def size(self, name: str) -> int:
        return FILE_SIZE

    def delete(self, name: str) -> None:
        pass

    def url(self, name: str | None) -> str:
        return f"noop://{name}"


class NoopTransfer(Transfer):
    """Moves nothing and reports success."""

    def transfer(self, name: str, local: Any, remote: Any, **kwargs: Any) -> bool:
        return True


#: How long (seconds) :class:`SlowStorage` waits per write.
WRITE_WAIT = 0.02


class SlowStorage(FileSystemStorage):
    """A ``FileSystemStorage`` that waits ``WRITE_WAIT`` before each write, as a
    remote across a network would, and spends no CPU meanwhile."""

    def _save(self, name: str, content: Any) -> str:
        time.sleep(WRITE_WAIT)
        return super()._save(name, content)
