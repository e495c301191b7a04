"""A remote and a transfer hook that do nothing, to time the ledger alone."""

from __future__ import annotations

from typing import Any

from django.core.files.storage import Storage

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
