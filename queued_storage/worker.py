"""The worker runtime: claim due rows batch after batch, transfer them on a
pool of lanes (threads), stop when asked; :func:`drain` for the command and
:func:`transfer_name` for a wake-up. A batch's own rows (their transfers, lease
keeper and completions) are batches.py's."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from django.db import connections

from queued_storage import claim_size, controls, history, lanes, mirrors, registry
from queued_storage.batches import Batch
from queued_storage.claim_size import ClaimSize
from queued_storage.conf import settings as conf
from queued_storage.errors import Outcome
from queued_storage.failures import ledger_db, log_crash
from queued_storage.leases import LeaseKeeper, hand_back
from queued_storage.models import PendingTransfer, PendingTransferQuerySet
from queued_storage.stats import DrainStats, ProgressCallback
from queued_storage.transfer import Verified, process_row

logger = logging.getLogger("queued_storage")


#: The most rows one claim takes (claim_size.ClaimSize picks how many, up to
#: this). Each row's lease is renewed while its own transfer runs; the others'
#: run out, for another worker to take them.
DEFAULT_BATCH_SIZE = 200


#: How often (seconds) a drain looks whether it was asked to stop, or holds
#: rows it has not started for too long.
STOP_POLL = 0.2


class _Drain:
    """Claims batch after batch and transfers their rows on ``size`` threads (the
    lanes) that live as long as the drain, so that each keeps its connections (the
    database's, and a remote's such as S3's, which are per thread). The lane that
    finds a batch done records it and claims the next, so that a sequential drain
    hands nothing between threads. A lane whose transfer hangs is left behind and
    replaced, so that the drain moves on."""

    def __init__(
        self,
        claim: Callable[[], list[PendingTransfer]],
        *,
        size: int,
        lease: float,
        stats: DrainStats,
        progress: ProgressCallback | None,
        should_stop: Callable[[], bool] | None,
        carry: bool = False,
    ) -> None:
        self.claim = claim
        #: Claim the next batch before the last one's rows are recorded (they go
        #: with its first group) or have all ended (a slow upload idles no lane).
        #: Not with a limit: it counts the rows recorded when the claim is made.
        self.carry = carry
        self.size = size
        self.lease = lease
        self.stats = stats
        self.progress = progress
        self.should_stop = should_stop
        self.changed = threading.Condition()
        self.batch: Batch | None = None
        #: Batches before this one whose last rows still run (a free lane claims
        #: without waiting for a slow upload), ended by the lane that ends their
        #: last row; ``running``: those rows; ``ended``: such batches whose last
        #: row was abandoned, for a lane to end (a keeper cannot stop itself).
        self.older: list[Batch] = []
        self.running = 0
        self.ended: list[Batch] = []
        #: The last claim found nothing while rows ran: claim again once one ends
        #: (a retry without delay is due again); ``ends``: rows ended so far.
        self.dry = False
        self.ends = 0
        self.claiming = False
        self.finished = False
        self.error: BaseException | None = None
        #: The lanes, by thread (pooled: see lanes.py), and their runs.
        self.lanes: dict[threading.Thread, lanes.Lane | None] = {}
        #: The row each lane works on.
        self.current: dict[threading.Thread, PendingTransfer] = {}
        #: Lanes whose transfer was abandoned and that were replaced: each holds a
        #: thread and a database connection until its transfer returns, if ever.
        self.left_behind: list[threading.Thread] = []
        #: Lanes whose transfer was abandoned when ``size`` lanes were left behind
        #: already: not replaced, until one of those returns.
        self.held: dict[threading.Thread, Batch] = {}
        self.started = 0
        self.inline = False
        #: Set with ``finished``.
        self.over = threading.Event()
        #: Wakes the thread that runs the drain: the drain is over, or verified
        #: transfers wait long enough to be recorded (by that thread, while the
        #: lanes go on). Not every row's end.
        self.wake = threading.Event()

    def run(self, first: list[PendingTransfer]) -> None:
        # In an atomic block the claims are not committed: only this connection
        # sees the rows, and a hung upload keeps this drain until it returns.
        self.inline = connections[ledger_db()].in_atomic_block
        self.batch = Batch(self, first)
        if self.inline:
            self.lanes[threading.current_thread()] = None
            try:
                self._lane()
            finally:
                self._end_the_rest()
        else:
            with self.changed:
                self._add_lanes(self.size)
            while not self.over.is_set():
                self.wake.wait(STOP_POLL)
                self.wake.clear()
                with self.changed:
                    batches: list[Batch | None] = [*self.older, self.batch]
                for batch in batches:
                    if batch is None:
                        continue
                    try:
                        batch.completions.flush_due()
                    except Exception as exc:
                        # Recorded or not, the rows are the batch's: its end
                        # records what still waits.
                        logger.error(
                            "recording verified transfers failed error=%s",
                            type(exc).__name__,
                        )
                with self.changed:
                    rest = self._unstarted_to_hand_back()
                if rest:
                    hand_back(rest)
            with self.changed:
                runs = list(self.lanes.values())
            for run in runs:
                if run is not None:
                    run.join()
            self._end_the_rest()
        if self.error is not None:
            raise self.error

    def _end_the_rest(self) -> None:
        """End the batches left once no lane runs: older ones, and the current
        one if a lane died with it (an error a lane does not catch, such as a
        hook's SystemExit): what waits is recorded, its keepers (and those of
        the rows it carried) stop, its unstarted rows are given back."""
        with self.changed:
            ended, self.ended = [*self.ended, *self.older], []
            current, self.batch = self.batch, None
            rest = list(current.rows) if current is not None else []
        if current is not None:
            ended.append(current)
        try:
            if rest:
                hand_back(rest)
        finally:
            for batch in ended:
                batch.finish()

    def _unstarted_to_hand_back(self) -> list[PendingTransfer]:
        """Once asked to stop, or once held too long (claim_size.HAND_BACK_AFTER),
        the rows of the claim that no lane has taken: given back now, not when the
        transfers in hand end. Every lane may be busy with a long upload: a
        supervisor kills a worker that takes long to stop, which would leave them
        leased for the rest of their lease, and another worker may be idle."""
        if self.batch is None:
            return []
        stopping = self.should_stop is not None and self.should_stop()
        if not stopping and not claim_size.held_too_long(self.batch.claimed_at):
            return []
        rows = list(self.batch.rows)
        if rows and not stopping:
            logger.info(
                "handing back %s unstarted row(s): every lane busy since the claim",
                len(rows),
            )
        return rows

    def _add_lanes(self, size: int) -> None:
        while len(self.lanes) < size:
            name = f"queued-storage-worker-{self.started}"
            self.started += 1
            # Under ``changed``: the lane waits for it before it takes a row.
            run = lanes.start(self._run_lane, name)
            self.lanes[run.thread] = run

    def _run_lane(self) -> None:
        try:
            self._lane()
        except BaseException as exc:
            with self.changed:
                self.error = self.error or exc
                self.finished = True
                self.over.set()
                self.wake.set()
                self.changed.notify_all()

    def _lane(self) -> None:
        me = threading.current_thread()
        while True:
            taken = self._take(me)
            if taken is None:
                return
            batch, row = taken
            ended: Batch | None = None
            try:
                batch.handle(row)
            except Exception as exc:
                # The ledger failed around the transfer (its claim check, a
                # record): the row's lease runs out, and it is retried.
                log_crash(row, exc)
            finally:
                with self.changed:
                    self.current.pop(me, None)
                    self.held.pop(me, None)
                    left_behind = me not in self.lanes
                    if left_behind:
                        self.left_behind.remove(me)
                        if self.held:
                            # A place is free: a lane held on a hung transfer is
                            # left behind in its turn, and replaced.
                            held = next(iter(self.held))
                            self._leave_behind(held, self.held.pop(held))
                    else:
                        ended = self._row_ended(batch)
            if ended is not None:
                self._end_older(ended)
            if left_behind:
                return

    def _row_ended(self, batch: Batch) -> Batch | None:
        """A row of ``batch`` ended (with ``changed`` held); returns the batch
        when it is an older one and that was its last row, for the caller to end."""
        batch.in_flight -= 1
        self.dry = False
        self.ends += 1
        self.changed.notify_all()
        if batch is self.batch:
            return None
        if batch.in_flight:
            self.running -= 1
            return None
        self.older.remove(batch)
        return batch

    def _end_older(self, batch: Batch) -> None:
        """End an older batch whose last row ended: ``running`` counts that row
        until then, since what the end records (a row given back stale, a retry)
        may be due at once, for a claim in this drain."""
        try:
            batch.finish()
        finally:
            with self.changed:
                self.running -= 1
                self.dry = False
                self.ends += 1
                self.changed.notify_all()

    def _take(self, me: threading.Thread) -> tuple[Batch, PendingTransfer] | None:
        """The next row for lane ``me``; None when the drain is over (or ``me``
        was left behind). A lane that finds no row left to start claims the next
        batch, without waiting for the rows of this one still running (one slow
        upload would keep every other lane idle): that batch becomes an older one."""
        while True:
            ended: list[Batch] = []
            older = False
            with self.changed:
                while True:
                    if self.finished or me not in self.lanes:
                        return None
                    if self.ended:
                        ended, self.ended = self.ended, []
                        break
                    batch = self.batch
                    if batch is not None:
                        row = next(batch.rows, None)
                        if row is not None:
                            batch.in_flight += 1
                            self.current[me] = row
                            return batch, row
                    if (
                        not self.claiming
                        and not (self.dry and self.running)
                        and (self.carry or batch is None or not batch.in_flight)
                    ):
                        self.claiming = True
                        if batch is not None and batch.in_flight:
                            self.older.append(batch)
                            self.running += batch.in_flight
                            older = True
                        self.batch = None
                        ends = self.ends
                        break
                    self.changed.wait()
            if ended:
                for done in ended:
                    self._end_older(done)
                continue
            rows: list[PendingTransfer] = []
            carried: tuple[list[Verified], list[LeaseKeeper]] | None = None
            try:
                if older and batch is not None:
                    # Recorded now, not at its slowest upload's end.
                    batch.completions.flush()
                    batch = None
                if self.carry:
                    stats = self.stats
                    retried = stats.retried, stats.stale, mirrors.copies_queued
                    try:
                        rows = self.claim()
                    finally:
                        if batch is not None:
                            carried = batch.finish(carry=bool(rows))
                    if (
                        not rows
                        and (stats.retried, stats.stale, mirrors.copies_queued)
                        != retried
                    ):
                        # A retry recorded since the claim may be due again at
                        # once (no delay), and so may a stale row given back (its
                        # name saved again before its record) and a mirror's copy
                        # of a row recorded as done: in this drain.
                        rows = self.claim()
                else:
                    if batch is not None:
                        batch.finish()
                    rows = self.claim()
            except BaseException as exc:
                self.error = exc
                if rows:
                    hand_back(rows)
                    rows = []
            with self.changed:
                self.claiming = False
                self.batch = Batch(self, rows, carried) if rows else None
                # Found nothing while rows run: one of them may be retried
                # without delay, due again at once; claim again once one ends
                # (at once if one ended during the claim).
                fresh = self.ends != ends
                self.dry = not rows and not fresh
                if self.batch is None and (
                    self.error is not None or not (fresh or self.running)
                ):
                    self.finished = True
                    self.over.set()
                    self.wake.set()
                self.changed.notify_all()

    def abandon(
        self, thread: threading.Thread, row: PendingTransfer, batch: Batch
    ) -> None:
        """Stop waiting for ``row`` on lane ``thread`` and start a lane in its
        place; ``thread`` ends when the transfer returns, if ever."""
        with self.changed:
            if (
                self.inline
                or self.current.get(thread) is not row
                or thread not in self.lanes
            ):
                return  # it returned meanwhile, and was counted
            if len(self.left_behind) >= self.size:
                # A remote where every upload hangs would otherwise cost a thread
                # and a database connection per file until the database refuses
                # connections: the drain waits for this transfer instead.
                logger.warning(
                    "transfer abandoned and its thread kept: %s thread(s) wait on "
                    "hung transfers already key=%s name=%s",
                    len(self.left_behind),
                    row.storage_key,
                    row.name,
                )
                self.held[thread] = batch
                return
            self._leave_behind(thread, batch)

    def _leave_behind(self, thread: threading.Thread, batch: Batch) -> None:
        """Stop waiting for the transfer on lane ``thread``, which ends when that
        returns, and start a lane in its place (with ``changed`` held)."""
        del self.lanes[thread]
        del self.current[thread]
        ended = self._row_ended(batch)
        if ended is not None:
            self.ended.append(ended)
        self.left_behind.append(thread)
        self._add_lanes(len(self.lanes) + 1)
        self.changed.notify_all()


def _claimable(rows: PendingTransferQuerySet) -> PendingTransferQuerySet:
    """Leave out rows whose local copy lives on another host (storages built with
    ``local_shared=False``)."""
    return rows.reachable_here(registry.host_local_keys())


def drain(
    *,
    keys: Iterable[str] | None = None,
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    concurrency: int = 1,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> DrainStats:
    """Claim and process due rows until none is due (or ``limit`` rows are done).

    A row retried with no delay is due again at once, so it is retried in the same
    drain, up to its attempt limit."""
    stats = DrainStats()
    rows_qs = _claimable(PendingTransfer.objects.all())
    keys = list(keys) if keys else None
    if keys:
        rows_qs = rows_qs.filter(storage_key__in=keys)
    lease = conf.QUEUED_STORAGE_LEASE
    # Refused (ImproperlyConfigured) before any claim, not by the first claim's
    # lease keeper: the claimed rows would wait out their lease.
    conf.QUEUED_STORAGE_TRANSFER_TIMEOUT  # noqa: B018
    # About what the lanes will start soon, up to batch_size: rows leased here
    # and not started are rows that another worker, idle, cannot take.
    sizes = ClaimSize(concurrency, batch_size)

    def claim() -> list[PendingTransfer]:
        if should_stop and should_stop():
            return []
        want = sizes.next()
        if limit is not None:
            want = min(want, limit - stats.processed)
        if want <= 0:
            return []
        rows = controls.claim(rows_qs, limit=want, lease=lease, keys=keys)
        sizes.claimed(len(rows))
        return rows

    # The first claim is the caller's: an idle poll starts no lane (no thread).
    first = claim()
    if not first:
        return stats
    _Drain(
        claim,
        size=concurrency,
        lease=lease,
        stats=stats,
        progress=progress,
        should_stop=should_stop,
        carry=limit is None,
    ).run(first)
    history.prune_now_and_then()
    return stats


def transfer_name(key: str, name: str) -> Outcome | None:
    """Transfer one name now if its row is due: what a wake-up runs."""
    conf.QUEUED_STORAGE_TRANSFER_TIMEOUT  # noqa: B018 (refused before the claim)
    claimable = _claimable(PendingTransfer.objects.for_name(key, name))
    lease = conf.QUEUED_STORAGE_LEASE
    rows = controls.claim(claimable, limit=1, lease=lease, keys=[key])
    if not rows:
        return None
    # Runs in the caller's thread: a hung upload is abandoned (recorded, its lease
    # left to run out) but keeps the caller until it returns, and then loses.
    with (
        LeaseKeeper(rows[0].lease_token, conf.QUEUED_STORAGE_LEASE) as keeper,
        keeper.attempt(rows[0]) as attempt,
    ):
        if attempt is None:
            return Outcome.STALE
        outcome = process_row(rows[0])
        late = not keeper.returned(attempt)
        keeper.finish(rows[0])
    return Outcome.STALE if late else outcome
