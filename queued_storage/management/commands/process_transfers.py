"""Move due files from local to remote storage: run from cron, or with --loop."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time
from types import FrameType
from typing import Any

from django.core.management.base import CommandParser
from django.db import Error, close_old_connections, connections

from queued_storage.allocator import pin_mmap_threshold
from queued_storage.checks import TAG
from queued_storage.errors import Outcome
from queued_storage.failures import ledger_db
from queued_storage.management.cli import (
    AttentionNeeded,
    LedgerCommand,
    Progress,
    add_batch_size_argument,
    add_output_arguments,
    add_storage_filter,
    check_storage_keys,
    eta,
    human_bytes,
    of_storages,
    positive_float,
    positive_int,
    write_json,
)
from queued_storage.models import PendingTransfer
from queued_storage.stats import DRAIN_COUNTS, DrainStats
from queued_storage.storage_state import paused_keys
from queued_storage.worker import DEFAULT_BATCH_SIZE, drain

logger = logging.getLogger("queued_storage")

__all__ = ["Command", "positive_float", "positive_int"]

#: Seconds a second signal lets its warning take to be written before the process
#: exits all the same: stderr may be a pipe nobody reads (a stalled log collector),
#: and a write to it, or a handler's lock such a write holds, waits for as long.
STOP_NOW_WRITE_WAIT = 1.0


def progress_line(stats: DrainStats, total: int) -> str:
    total = max(total, stats.processed)
    return (
        f"{stats.processed}/{total} files  {human_bytes(stats.bytes)}  "
        f"{human_bytes(stats.bytes / stats.elapsed)}/s  "
        f"ETA {eta(stats.processed, total, stats.elapsed)}  "
        f"(done {stats.done}, retried {stats.retried}, failed {stats.failed})"
    )


def _total(total: list[int], stats: DrainStats, keys: list[str]) -> int:
    """The rows of a poll's progress line: counted once, into ``total``."""
    if not total:
        due = of_storages(PendingTransfer.objects.due(), keys).count()
        total.append(stats.processed + due)
    return total[0]


class Command(LedgerCommand):
    help = (
        "Transfer due files from local to remote storage. Without --loop it keeps "
        "claiming until no row is due, then exits (for cron). Exit status: 0 done, "
        "1 error, 2 bad arguments, 3 some transfers failed for good."
    )
    # This package's checks only: a cron run pays no model, template or URLconf
    # checks of the site's (``manage.py check`` runs them all).
    requires_system_checks = [TAG]

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--loop",
            action="store_true",
            help="Keep polling for due rows until SIGTERM or SIGINT; the transfer in "
            "hand finishes first.",
        )
        parser.add_argument(
            "--interval",
            type=positive_float,
            default=5.0,
            help="Seconds between polls with --loop (default: 5).",
        )
        parser.add_argument(
            "--limit",
            type=positive_int,
            help="Stop after this many rows (per poll with --loop).",
        )
        parser.add_argument(
            "--concurrency",
            type=positive_int,
            default=1,
            help="Transfer this many files at once, in threads (default: 1).",
        )
        add_storage_filter(parser)
        add_batch_size_argument(
            parser, default=DEFAULT_BATCH_SIZE, what="Most rows claimed per query"
        )
        add_output_arguments(parser, progress=True)
        parser.add_argument(
            "--max-polls",
            type=positive_int,
            help=argparse.SUPPRESS,  # lets tests end --loop
        )

    def handle(
        self,
        *,
        loop: bool,
        interval: float,
        limit: int | None,
        concurrency: int,
        storages: list[str] | None,
        batch_size: int,
        json: bool,
        progress: bool | None,
        progress_every: float,
        max_polls: int | None,
        verbosity: int,
        **options: Any,
    ) -> None:
        keys = check_storage_keys(storages)
        pin_mmap_threshold()
        # Read for what to say, and whether --storage leaves anything to do.
        paused = paused_keys(keys or None) if keys or verbosity > 0 else []
        if paused and verbosity > 0:
            (self.stderr if json else self.stdout).write(
                f"Paused, their transfers wait: {', '.join(paused)} (manage.py "
                "resume_transfers KEY)."
            )
        if keys and set(keys) <= set(paused) and not loop:
            # Nothing this run may do: said, and not an error (a cron job runs on).
            if json:
                write_json(
                    self, self.as_dict(DrainStats(), polls=0) | {"paused": paused}
                )
            return
        self._drain_until_done(
            loop=loop,
            interval=interval,
            limit=limit,
            concurrency=concurrency,
            keys=keys,
            batch_size=batch_size,
            json=json,
            progress=progress,
            progress_every=progress_every,
            max_polls=max_polls,
            verbosity=verbosity,
        )

    def _drain_until_done(
        self,
        *,
        loop: bool,
        interval: float,
        limit: int | None,
        concurrency: int,
        keys: list[str],
        batch_size: int,
        json: bool,
        progress: bool | None,
        progress_every: float,
        max_polls: int | None,
        verbosity: int,
    ) -> None:
        self.stopping = False
        # Put back what the caller had: call_command() must not leave the process
        # (a test run, a supervisor) with the handler of a command that has ended.
        previous = self._install_signal_handlers() if loop else {}
        talk = verbosity > 0 and not json
        totals = DrainStats()
        polls = 0
        try:
            while True:
                polls += 1
                display = Progress(
                    self,
                    verbosity=verbosity,
                    as_json=json,
                    live=progress,
                    every=progress_every,
                )

                # With --loop, counted when a line is first shown (without the
                # rows in hand then), not before each poll: an idle poll is then
                # its claim alone.
                total: list[int] = []
                if display.enabled and not loop:
                    _total(total, DrainStats(), keys)

                def show(
                    stats: DrainStats,
                    row: PendingTransfer,
                    outcome: Outcome,
                    display: Progress = display,
                    total: list[int] = total,
                ) -> None:
                    display.update(
                        lambda: progress_line(stats, _total(total, stats, keys))
                    )

                try:
                    stats = drain(
                        keys=keys or None,
                        limit=limit,
                        batch_size=batch_size,
                        concurrency=concurrency,
                        # Nothing to show at verbosity 0: no call for every row.
                        progress=show if display.enabled else None,
                        should_stop=lambda: self.stopping,
                    )
                except Error as exc:  # InterfaceError too: the base class
                    if not loop or connections[ledger_db()].in_atomic_block:
                        raise
                    # The server dropped the connection (restarted, an idle
                    # timeout): Django checks it only around a request, so this
                    # one stays broken unless closed here, and every later poll
                    # failed. The next poll, after the interval, reconnects.
                    logger.error(
                        "poll failed error=%s (retried after the interval)",
                        type(exc).__name__,
                    )
                    close_old_connections()
                    stats = DrainStats()
                display.finish()
                self._add(totals, stats)
                if stats.processed:
                    logger.info(
                        "drained done=%s retried=%s failed=%s purged=%s stale=%s "
                        "bytes=%s elapsed=%.1f",
                        stats.done,
                        stats.retried,
                        stats.failed,
                        stats.purged,
                        stats.stale,
                        stats.bytes,
                        stats.elapsed,
                    )
                    if talk:
                        self.stdout.write(self.summary(stats))
                if not loop or self.stopping or (max_polls and polls >= max_polls):
                    break
                if not stats.processed:
                    self._sleep(interval)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        if json:
            write_json(self, self.as_dict(totals, polls=polls))
        elif loop and verbosity > 0:
            self.stdout.write("Stopped. " + self.summary(totals))
        elif not totals.processed and verbosity > 0:
            self.stdout.write("No transfers due.")
        if totals.failed and not loop:
            raise AttentionNeeded(
                f"{totals.failed} transfer(s) failed for good. The admin and "
                "transfer_status show the errors; fix the cause, then run "
                "requeue_transfers."
            )

    @staticmethod
    def _add(totals: DrainStats, stats: DrainStats) -> None:
        for name in DRAIN_COUNTS:
            setattr(totals, name, getattr(totals, name) + getattr(stats, name))

    @staticmethod
    def summary(stats: DrainStats) -> str:
        return (
            f"done={stats.done} retried={stats.retried} failed={stats.failed} "
            f"purged={stats.purged} stale={stats.stale} "
            f"bytes={stats.bytes} ({human_bytes(stats.bytes)}) "
            f"rate={human_bytes(stats.bytes / stats.elapsed)}/s "
            f"elapsed={stats.elapsed:.1f}s"
        )

    @staticmethod
    def as_dict(stats: DrainStats, *, polls: int) -> dict[str, Any]:
        return stats.counts() | {
            "elapsed_seconds": round(stats.elapsed, 3),
            "bytes_per_second": round(stats.bytes / stats.elapsed, 1),
            "polls": polls,
        }

    def _install_signal_handlers(self) -> dict[int, Any]:
        """Stop after the files in hand on SIGTERM/SIGINT, at once on a second
        one; returns the old handlers."""

        def stop(signum: int, frame: FrameType | None) -> None:
            name = signal.Signals(signum).name
            if self.stopping:
                # As a SIGKILL would: the files in hand keep their local copies
                # and their rows' leases, which another worker takes over when
                # they expire (a graceful stop would have had to wait for them).
                # An alarm interrupts a write that blocks (its handler runs
                # between bytecodes, as this one does) and exits.
                signal.signal(signal.SIGALRM, lambda *_: os._exit(128 + signum))
                signal.setitimer(signal.ITIMER_REAL, STOP_NOW_WRITE_WAIT)
                self._say_stopping_now(name)
                os._exit(128 + signum)
            # Set before logging: a second signal can arrive while the record is
            # written, and its handler then runs inside this one.
            self.stopping = True
            logger.warning(
                "stopping signal=%s after the transfers in hand (send it again to "
                "stop at once)",
                name,
            )

        return {
            signum: signal.signal(signum, stop)
            for signum in (signal.SIGTERM, signal.SIGINT)
        }

    def _say_stopping_now(self, name: str) -> None:
        logger.warning(
            "stopping now signal=%s the transfers in hand are abandoned; "
            "their rows are retried when their leases expire",
            name,
        )
        for handler in logger.handlers:
            handler.flush()
        self.stdout.flush()

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping:
            # One reading of the clock: read twice, the deadline can pass between
            # the test and the sleep, and a negative sleep raises ValueError.
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.2, left))
