"""What a drain did: its counts by outcome and bytes, for progress displays, the
summary line, ``--json`` and the wake-ups' sweep tasks."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from queued_storage.errors import Outcome
from queued_storage.models import PendingTransfer

#: The counts of a drain, by name.
DRAIN_COUNTS = ("done", "retried", "failed", "purged", "stale", "bytes")


@dataclass
class DrainStats:
    """What a drain did, for progress displays and the summary line."""

    done: int = 0
    retried: int = 0
    failed: int = 0
    purged: int = 0
    stale: int = 0
    bytes: int = 0
    started: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def processed(self) -> int:
        return self.done + self.retried + self.failed + self.purged + self.stale

    def counts(self) -> dict[str, int]:
        """The counts by name, as the commands' ``--json`` and the wake-ups'
        sweep tasks report them."""
        return {name: getattr(self, name) for name in DRAIN_COUNTS}

    @property
    def elapsed(self) -> float:
        return max(time.monotonic() - self.started, 1e-9)

    def count(self, outcome: Outcome, size: int) -> None:
        with self._lock:
            name = _COUNTED[outcome]
            setattr(self, name, getattr(self, name) + 1)
            if outcome is Outcome.DONE:
                self.bytes += size

    def count_all(self, outcomes: list[Outcome], sizes: list[int]) -> None:
        with self._lock:
            for outcome, size in zip(outcomes, sizes, strict=True):
                name = _COUNTED[outcome]
                setattr(self, name, getattr(self, name) + 1)
                if outcome is Outcome.DONE:
                    self.bytes += size


#: The count of each outcome.
_COUNTED = {
    Outcome.DONE: "done",
    Outcome.RETRY: "retried",
    Outcome.FAILED: "failed",
    Outcome.PURGED: "purged",
    Outcome.STALE: "stale",
}


ProgressCallback = Callable[[DrainStats, PendingTransfer, Outcome], None]


def count_rows(
    stats: DrainStats,
    progress: ProgressCallback | None,
    rows: list[PendingTransfer],
    outcomes: list[Outcome],
) -> None:
    """Count the outcomes of ``rows`` (the bytes of the rows done) in ``stats``;
    a display (``progress``) is shown the counts as of each row."""
    sizes = [row.size or 0 for row in rows]
    if progress is None:
        stats.count_all(outcomes, sizes)
        return
    for row, outcome, size in zip(rows, outcomes, sizes, strict=True):
        stats.count(outcome, size)
        progress(stats, row, outcome)
