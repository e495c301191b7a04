"""Move due files from local to remote storage: run from cron, or with --loop."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from types import FrameType
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from queued_storage import registry
from queued_storage.models import PendingTransfer
from queued_storage.transfer import DEFAULT_BATCH_SIZE, DrainStats, Outcome, drain

logger = logging.getLogger("queued_storage")


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if number <= 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return number


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


def human_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """A live line on a terminal; a log line every ``every`` seconds elsewhere."""

    def __init__(self, command: BaseCommand, total: int, live: bool, every: float = 10):
        self.command = command
        self.total = total
        self.live = live
        self.every = every
        self.last = 0.0

    def __call__(
        self, stats: DrainStats, row: PendingTransfer, outcome: Outcome
    ) -> None:
        now = time.monotonic()
        if not self.live and now - self.last < self.every:
            return
        self.last = now
        line = self.line(stats)
        if self.live:
            self.command.stdout.write(f"\r{line}\x1b[K", ending="")
            self.command.stdout.flush()
        else:
            self.command.stdout.write(line)

    def line(self, stats: DrainStats) -> str:
        total = max(self.total, stats.processed)
        rate = stats.bytes / stats.elapsed
        files_per_second = stats.processed / stats.elapsed
        left = total - stats.processed
        eta = human_seconds(left / files_per_second) if files_per_second else "?"
        return (
            f"{stats.processed}/{total} files  {human_bytes(stats.bytes)}  "
            f"{human_bytes(rate)}/s  ETA {eta}  "
            f"(done {stats.done}, retried {stats.retried}, failed {stats.failed})"
        )

    def finish(self) -> None:
        if self.live:
            self.command.stdout.write("")


class Command(BaseCommand):
    help = (
        "Transfer due files from local to remote storage. Without --loop it keeps "
        "claiming until no row is due, then exits (for cron)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--loop",
            action="store_true",
            help="Keep polling for due rows until SIGTERM or SIGINT.",
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
        parser.add_argument(
            "--storage",
            action="append",
            dest="storages",
            metavar="KEY",
            help="Only rows of the storage with this key (repeatable).",
        )
        parser.add_argument(
            "--batch-size",
            type=positive_int,
            default=DEFAULT_BATCH_SIZE,
            help=f"Rows claimed per query (default: {DEFAULT_BATCH_SIZE}).",
        )
        parser.add_argument(
            "--progress",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="Show a live progress line (default: when stdout is a terminal).",
        )
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
        progress: bool | None,
        max_polls: int | None,
        verbosity: int,
        **options: Any,
    ) -> None:
        if storages:
            unknown = sorted(set(storages) - set(registry.known_keys()))
            if unknown:
                raise CommandError(
                    f"Unknown storage key(s): {', '.join(unknown)}. Known keys: "
                    f"{', '.join(registry.known_keys()) or 'none'}."
                )
        self.stopping = False
        # Put back what the caller had: call_command() must not leave the process
        # (a test run, a supervisor) with the handler of a command that has ended.
        previous = self._install_signal_handlers() if loop else {}
        live = sys.stdout.isatty() if progress is None else progress
        totals = DrainStats()
        polls = 0
        try:
            while True:
                polls += 1
                due = PendingTransfer.objects.due()
                if storages:
                    due = due.filter(storage_key__in=storages)
                display = Progress(self, due.count(), live and verbosity > 0)
                stats = drain(
                    keys=storages,
                    limit=limit,
                    batch_size=batch_size,
                    concurrency=concurrency,
                    progress=display if verbosity > 0 else None,
                    should_stop=lambda: self.stopping,
                )
                display.finish()
                self._add(totals, stats)
                if stats.processed and verbosity > 0:
                    self.stdout.write(self.summary(stats))
                if not loop or self.stopping or (max_polls and polls >= max_polls):
                    break
                if not stats.processed:
                    self._sleep(interval)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        if loop and verbosity > 0:
            self.stdout.write("Stopped. " + self.summary(totals))
        elif not totals.processed and verbosity > 0:
            self.stdout.write("No transfers due.")

    @staticmethod
    def _add(totals: DrainStats, stats: DrainStats) -> None:
        for name in ("done", "retried", "failed", "purged", "stale", "bytes"):
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

    def _install_signal_handlers(self) -> dict[int, Any]:
        """Stop after the current file on SIGTERM/SIGINT; returns the old handlers."""

        def stop(signum: int, frame: FrameType | None) -> None:
            logger.info("stopping signal=%s", signal.Signals(signum).name)
            self.stopping = True

        return {
            signum: signal.signal(signum, stop)
            for signum in (signal.SIGTERM, signal.SIGINT)
        }

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.2, deadline - time.monotonic()))
