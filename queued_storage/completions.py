"""Verified transfers waiting to be recorded as done together: one compare-and-set
UPDATE and one commit for many rows, at most :data:`COMPLETE_AFTER` after the
oldest was verified."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from queued_storage.errors import Outcome
from queued_storage.failures import record_crash
from queued_storage.leases import LeaseKeeper
from queued_storage.models import PendingTransfer
from queued_storage.transfer import Verified, complete

#: A verified transfer waits at most this long (seconds) to be recorded as done
#: together with others; a claimed batch ends with whatever is waiting. What
#: waits when a worker is killed is uploaded again: a second here (fewer commits,
#: a faster drain to a fast remote) made the chaos test's duplicates 25 for 12
#: kills instead of 6 to 13.
COMPLETE_AFTER = 0.05
#: Unless this many wait by then (a fast remote): then up to ``GROUP_AFTER``
#: seconds, or the batch's end, whichever comes first. A commit is an fsync on
#: most databases, which a drain to a fast remote otherwise paid twenty times a
#: second; what a kill loses is uploaded again either way, and at the chaos
#: test's rates (one or two files in 50 ms) nothing changes.
GROUP = 32
GROUP_AFTER = 0.5
#: ... or until this many wait: one statement's worth, and a group in which one
#: row lost its lease is recorded row by row.
GROUP_MOST = 500


class Completions:
    """Verified transfers waiting to be recorded as done together (one UPDATE and
    one commit for many rows, where a commit per file would bound the rate).

    With ``due`` set, the transfer that finds the oldest waiting long enough
    calls it instead of recording them itself: the drain's own thread records
    them, and the lanes go on copying while the commit is written out."""

    def __init__(
        self,
        report: Callable[[list[PendingTransfer], list[Outcome]], None],
        due: Callable[[], None] | None = None,
    ) -> None:
        self.report = report
        self.due = due
        self.lock = threading.Lock()
        #: Held while a group is recorded: the batch's last group waits for the
        #: one being recorded before its lease keeper stops.
        self.recording = threading.Lock()
        self.waiting: list[Verified] = []
        #: The keepers of the batches before, renewing the leases of their
        #: verified rows carried in to wait here (see :meth:`carry_in`).
        self.retired: list[LeaseKeeper] = []

    def carry_in(self, waiting: list[Verified], keepers: list[LeaseKeeper]) -> None:
        """Wait with the verified rows of the batches before, whose leases
        ``keepers`` renew until the group that records them: the next group, which
        takes them with all that waits. Not the next report: a row reported on its
        own (a failure) leaves them waiting, and their leases could run out."""
        self.waiting, self.retired = waiting, keepers

    def stop_retired(self) -> None:
        retired, self.retired = self.retired, []
        for keeper in retired:
            keeper.stopped.set()
        for keeper in retired:
            keeper.join()

    def _due(self) -> bool:
        """Whether the waiting transfers are to be recorded now (``lock`` held)."""
        waiting = self.waiting
        if not waiting:
            return False
        if len(waiting) >= GROUP_MOST:
            return True
        age = time.monotonic() - waiting[0].at
        return age >= COMPLETE_AFTER and (len(waiting) < GROUP or age >= GROUP_AFTER)

    def add(self, item: Verified) -> None:
        with self.lock:
            self.waiting.append(item)
            due = self._due()
        if due:
            if self.due is None:
                self.flush()
            else:
                self.due()

    def flush_due(self) -> None:
        with self.lock:
            due = self._due()
        if due:
            self.flush()

    def flush(self) -> None:
        with self.recording:
            with self.lock:
                batch, self.waiting = self.waiting, []
            if not batch:
                return
            try:
                outcomes = complete(batch)
            except Exception as exc:
                outcomes = [record_crash(item.row, exc) for item in batch]
            # The rows carried in, if any, were recorded in this group.
            self.stop_retired()
            self.report([item.row for item in batch], outcomes)
