"""Real ``Storage`` subclasses with a fault built in, used as remotes by the tests.

Each is a ``FileSystemStorage`` so that the bytes really move; the fault is the
only difference. The tests reach them by dotted path, as a user's settings would.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

from django.core.files.base import ContentFile
from django.core.files.storage import FileSystemStorage

#: Calls per (storage location, method name), for tests that pin network use.
CALLS: Counter[tuple[str, str]] = Counter()


class CountingStorage(FileSystemStorage):
    """Counts calls to the methods that would reach the network on a real remote."""

    def _count(self, method: str) -> None:
        CALLS[(str(self.location), method)] += 1

    def calls(self, method: str) -> int:
        return CALLS[(str(self.location), method)]

    def exists(self, name: str) -> bool:
        self._count("exists")
        return super().exists(name)

    def _save(self, name: str, content: Any) -> str:
        self._count("save")
        return super()._save(name, content)

    def size(self, name: str) -> int:
        self._count("size")
        return super().size(name)

    def url(self, name: str | None) -> str:
        self._count("url")
        return super().url(name)

    def delete(self, name: str) -> None:
        self._count("delete")
        super().delete(name)


class FlakyStorage(CountingStorage):
    """Fails the first ``failures`` uploads with a ConnectionError."""

    def __init__(self, failures: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.failures = failures

    def _save(self, name: str, content: Any) -> str:
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("remote unreachable")
        return super()._save(name, content)


class RenamingStorage(CountingStorage):
    """Saves every file under another name."""

    def get_available_name(self, name: str, max_length: int | None = None) -> str:
        return f"renamed/{name}"


class TruncatingStorage(CountingStorage):
    """Loses the last byte of every file."""

    def _save(self, name: str, content: Any) -> str:
        return super()._save(name, ContentFile(content.read()[:-1]))


class GatedStorage(CountingStorage):
    """Blocks each upload until the test opens the gate: the window for races."""

    entered = threading.Event()
    gate = threading.Event()

    def _save(self, name: str, content: Any) -> str:
        type(self).entered.set()
        if not type(self).gate.wait(timeout=30):
            raise TimeoutError("the test never opened the gate")
        return super()._save(name, content)


class ExplodingStorage(FileSystemStorage):
    """Any call fails: proves that a code path never touches the remote."""

    def __getattribute__(self, name: str) -> Any:
        if name in {
            "exists",
            "save",
            "_save",
            "open",
            "_open",
            "url",
            "size",
            "delete",
            "listdir",
            "get_available_name",
        }:
            raise AssertionError(f"the remote's {name}() was called")
        return super().__getattribute__(name)
