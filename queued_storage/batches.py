"""One claim's rows as a drain works through them (:class:`Batch`): each row's
transfer, the lease keeper that renews the rows' leases, the completions that
wait to be recorded together; the drain's threads and claims are worker.py's."""

from __future__ import annotations

from typing import TYPE_CHECKING

from queued_storage import claim_size
from queued_storage.completions import Completions
from queued_storage.copying import read_progress
from queued_storage.errors import Outcome
from queued_storage.failures import record_crash
from queued_storage.leases import Attempt, LeaseKeeper, abandon_attempt, hand_back
from queued_storage.models import PendingTransfer
from queued_storage.stats import count_rows
from queued_storage.transfer import Plans, Verified, late_result, transfer_row

if TYPE_CHECKING:
    from queued_storage.worker import _Drain


class Batch:
    """The rows of one claim as a drain works through them: its lease keeper, its
    completions waiting to be recorded together."""

    def __init__(
        self,
        drain: _Drain,
        rows: list[PendingTransfer],
        carried: tuple[list[Verified], list[LeaseKeeper]] | None = None,
    ) -> None:
        self.drain = drain
        self.rows = iter(rows)
        self.claimed_at = claim_size.clock()
        #: Rows taken and neither reported nor abandoned.
        self.in_flight = 0
        self.completions = Completions(
            self.report_all, None if drain.inline else drain.wake.set
        )
        #: The storages of the rows, looked up once for the batch.
        self.plans = Plans()
        self.keeper = LeaseKeeper(
            rows[0].lease_token, drain.lease, on_abandon=self.abandon
        )
        self.keeper.start()
        if carried is not None:
            self.completions.carry_in(*carried)

    def report(self, row: PendingTransfer, outcome: Outcome) -> None:
        self.report_all([row], [outcome])

    def report_all(self, rows: list[PendingTransfer], outcomes: list[Outcome]) -> None:
        self.keeper.finish_all(rows)
        count_rows(self.drain.stats, self.drain.progress, rows, outcomes)

    def abandon(self, attempt: Attempt) -> None:
        outcome = abandon_attempt(attempt)
        count_rows(self.drain.stats, self.drain.progress, [attempt.row], [outcome])
        self.drain.abandon(attempt.thread, attempt.row, self)

    def handle(self, row: PendingTransfer) -> None:
        should_stop = self.drain.should_stop
        if should_stop is not None and should_stop():
            # Given back at once with the rest of the claim, not when the batch
            # ends: the transfers still in hand may take long.
            with self.drain.changed:
                rest = list(self.rows)
            hand_back([row, *rest])
            return
        attempt = self.keeper.start_attempt(row)
        if attempt is None:
            self.report(row, Outcome.STALE)
            return
        noted = read_progress.set(attempt.note_progress)
        try:
            result = transfer_row(row, self.plans)
        except Exception as exc:
            result = record_crash(row, exc)
        finally:
            read_progress.reset(noted)
        if not self.keeper.returned(attempt):
            late_result(row, result)
        elif isinstance(result, Verified):
            self.completions.add(result)
        else:
            self.report(row, result)

    def finish(
        self, carry: bool = False
    ) -> tuple[list[Verified], list[LeaseKeeper]] | None:
        """Record what waits and stop the lease keeper; with ``carry`` (another
        batch follows), hand what waits and the keeper that renews its leases to
        that batch instead, to be recorded with its first group: one commit
        fewer a batch."""
        completions = self.completions
        if carry:
            with completions.recording, completions.lock:
                waiting, completions.waiting = completions.waiting, []
                if waiting:
                    keepers, completions.retired = completions.retired, []
                    return waiting, [*keepers, self.keeper]
        try:
            completions.flush()
        finally:
            completions.stop_retired()
            self.keeper.stopped.set()
            self.keeper.join()
        return None
