"""Transfer hooks for the tests, reached by class or dotted path as a user's would be.

Hooks that change their answer between attempts count calls per (remote location,
name): every test has its own remote directory, so no state leaks between tests.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, ClassVar

from django.core.files.storage import Storage

from queued_storage.tasks import Transfer


def _attempt(counter: Counter[tuple[str, str]], name: str, remote: Storage) -> int:
    key = (str(getattr(remote, "location", id(remote))), name)
    counter[key] += 1
    return counter[key]


class FalseOnceTransfer(Transfer):
    """Returns False on the first attempt ("retry later"), then transfers."""

    calls: ClassVar[Counter[tuple[str, str]]] = Counter()

    def transfer(
        self, name: str, local: Storage, remote: Storage, **kwargs: Any
    ) -> bool:
        if _attempt(self.calls, name, remote) == 1:
            return False
        return super().transfer(name, local, remote, **kwargs)


class RaisesOnceTransfer(Transfer):
    """Raises on the first attempt, then transfers."""

    calls: ClassVar[Counter[tuple[str, str]]] = Counter()

    def transfer(
        self, name: str, local: Storage, remote: Storage, **kwargs: Any
    ) -> bool:
        if _attempt(self.calls, name, remote) == 1:
            raise RuntimeError("hook exploded")
        return super().transfer(name, local, remote, **kwargs)


class ReturnsNoneTransfer(Transfer):
    """Copies the file but forgets to return a bool: a programming error."""

    def transfer(
        self, name: str, local: Storage, remote: Storage, **kwargs: Any
    ) -> Any:
        super().transfer(name, local, remote, **kwargs)
        return None


class OneRetryNoDelayTransfer(Transfer):
    """Overrides the retry settings: one retry, at once."""

    max_retries = 1
    default_retry_delay = 0


class SlowRetryTransfer(Transfer):
    """Overrides the retry delay: ten minutes before the first retry."""

    default_retry_delay = 600


class BrokenInitTransfer(Transfer):
    """A hook whose constructor raises, with one retry at once."""

    max_retries = 1
    default_retry_delay = 0

    def __init__(self) -> None:
        raise RuntimeError("hook constructor exploded")


class RecordingTransfer(Transfer):
    """Delegates to the base copy, and keeps what it answered (a test empties
    ``answers`` first)."""

    answers: ClassVar[list[bool]] = []

    def transfer(
        self, name: str, local: Storage, remote: Storage, **kwargs: Any
    ) -> bool:
        answer = super().transfer(name, local, remote, **kwargs)
        self.answers.append(answer)
        return answer
