"""What the management commands share: argument types, exit codes, progress lines
and output formats."""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import logging
import math
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TextIO

from django.core.management.base import BaseCommand, CommandError, OutputWrapper

from queued_storage import registry
from queued_storage.conf import MAX_SECONDS

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    from queued_storage.models import PendingTransferQuerySet
    from queued_storage.storage import QueuedStorage

#: Exit codes, the same for every command (a cron job or a monitor acts on them).
EXIT_OK = 0
#: An error: the command could not do its job (database down, a crash).
EXIT_ERROR = 1
#: Bad arguments: an unknown option or storage key, a value out of range.
EXIT_USAGE = 2
#: The command ran and found something a person should look at.
EXIT_ATTENTION = 3


class UsageError(CommandError):
    """Bad arguments, found before anything ran."""

    def __init__(self, message: str) -> None:
        super().__init__(message, returncode=EXIT_USAGE)


class AttentionNeeded(CommandError):
    """The command did its job and found problems: exit code 3."""

    def __init__(self, message: str) -> None:
        super().__init__(message, returncode=EXIT_ATTENTION)


#: The largest count an option takes: a database's 32-bit LIMIT or column.
MAX_COUNT = 2**31 - 1


def positive_int(value: str) -> int:
    return _count(value, minimum=1)


def non_negative_int(value: str) -> int:
    """A count that may be 0, e.g. a threshold "more than N"."""
    return _count(value, minimum=0)


def _count(value: str, *, minimum: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}")
    if number > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_COUNT}")
    return number


def positive_float(value: str) -> float:
    """Seconds, more than 0 and at most a hundred years; NaN ("nan" parses as a
    float and passes every comparison) and infinity are refused."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"{value!r} is not a finite number")
    if number <= 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    if number > MAX_SECONDS:
        raise argparse.ArgumentTypeError(
            f"must be at most {MAX_SECONDS} seconds (a hundred years)"
        )
    return number


#: Bytes per unit of a size: decimal (kB, MB, GB, TB) and binary (KiB, ...).
SIZE_UNITS = {"": 1, "b": 1}
for _power, _prefix in enumerate("kmgt", start=1):
    SIZE_UNITS |= {_prefix: 1000**_power, f"{_prefix}b": 1000**_power}
    SIZE_UNITS |= {f"{_prefix}i": 1024**_power, f"{_prefix}ib": 1024**_power}
SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*(?:/\s*s)?\s*$", re.IGNORECASE)


#: The slowest pace a rate option takes: one file (or byte) a hundred years. A
#: slower one would make the pacing wait longer than ``time.sleep`` can.
MIN_RATE = 1 / MAX_SECONDS


def byte_rate(value: str) -> float:
    """Bytes a second: ``20MB``, ``1.5GiB/s``, ``500000`` (bytes); at least a
    byte a hundred years. NaN, infinity and negative numbers are no rate."""
    match = SIZE_RE.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a rate in bytes a second; use a number with B, kB, "
            "MB, GB, TB or KiB, MiB, GiB, TiB (e.g. 20MB, 1.5GiB/s)"
        )
    rate = float(match.group(1)) * SIZE_UNITS[unit]
    if not math.isfinite(rate) or rate <= 0:
        raise argparse.ArgumentTypeError(
            f"{value!r} must be more than 0 bytes a second"
        )
    if rate < MIN_RATE:
        raise argparse.ArgumentTypeError(
            f"{value!r} must be at least one byte a hundred years ({MIN_RATE:.3g} B)"
        )
    return rate


def per_second(value: str) -> float:
    """A count a second (``200``, ``0.5``): finite, at least one a hundred years
    (``MIN_RATE``), at most ``MAX_COUNT``."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"{value!r} is not a finite number")
    if number <= 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    if number < MIN_RATE:
        raise argparse.ArgumentTypeError(
            f"{value!r} must be at least one a hundred years ({MIN_RATE:.3g})"
        )
    if number > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_COUNT}")
    return number


DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.IGNORECASE)
DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def duration(value: str) -> timedelta:
    """``90``, ``90s``, ``15m``, ``12h``, ``30d`` or ``2w``: a length of time, at
    most a hundred years (``now`` minus more overflows a datetime)."""
    match = DURATION_RE.match(value)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a duration; use seconds or a number with s, m, h, d "
            "or w (e.g. 90, 15m, 12h, 30d)"
        )
    number, unit = match.groups()
    seconds = float(number) * DURATION_UNITS[unit.lower()]
    if not seconds <= MAX_SECONDS:  # also inf, from a number too long for a float
        raise argparse.ArgumentTypeError(
            f"{value!r} is longer than a hundred years ({MAX_SECONDS // 86400}d)"
        )
    return timedelta(seconds=seconds)


#: The ``queued_storage`` logger's level at each ``--verbosity``. The default (1)
#: logs warnings only: a nightly cron drain mails its summary line, not a line
#: per file; 2 adds a line per file and state change, 3 the debugging detail.
VERBOSITY_LEVELS = {0: logging.ERROR, 1: logging.WARNING, 2: logging.INFO}


class _Verbosity:
    """The ``--verbosity`` of every command running in this process at once (two
    call_command() in threads): the logger is as verbose as the most verbose of
    them, and as the site had it once the last one ends, whatever the order."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.wanted: list[int] = []
        self.site_level = logging.NOTSET
        self.site_floor = logging.NOTSET
        self.handler: logging.Handler | None = None

    def enter(self, logger: logging.Logger, wanted: int) -> None:
        with self.lock:
            if not self.wanted:
                self.site_level = logger.level
                self.site_floor = _asked_by_site(logger)
                if not logger.hasHandlers():
                    self.handler = logging.StreamHandler(sys.stderr)
                    self.handler.setFormatter(
                        logging.Formatter("%(levelname)s %(message)s")
                    )
                    logger.addHandler(self.handler)
            self.wanted.append(wanted)
            self._apply(logger)

    def exit(self, logger: logging.Logger, wanted: int) -> None:
        with self.lock:
            self.wanted.remove(wanted)
            if self.wanted:
                self._apply(logger)
                return
            if self.handler is not None:
                logger.removeHandler(self.handler)
                self.handler = None
            logger.setLevel(self.site_level)

    def _apply(self, logger: logging.Logger) -> None:
        floor = self.site_floor
        logger.setLevel(min([*self.wanted, floor] if floor else self.wanted))


def _asked_by_site(logger: logging.Logger) -> int:
    """The level the site's ``LOGGING`` asked of ``logger``: its own, or, unset,
    one it inherits that is more verbose than Python's default ``WARNING`` (a
    ``"root"`` at ``INFO``); ``NOTSET`` when the site asked for nothing."""
    if logger.level != logging.NOTSET:
        return logger.level
    inherited = logger.getEffectiveLevel()
    return inherited if inherited < logging.WARNING else logging.NOTSET


_verbosity = _Verbosity()


@contextmanager
def verbosity_logging(verbosity: int) -> Iterator[None]:
    """The ``queued_storage`` logger at the level ``verbosity`` asks for while a
    command runs, then as it was.

    A level the site's ``LOGGING`` set is only ever made more verbose, and a
    handler to stderr is added only when no handler would show the records
    (stdout may carry ``--json``)."""
    logger = logging.getLogger("queued_storage")
    wanted = VERBOSITY_LEVELS.get(verbosity, logging.DEBUG)
    _verbosity.enter(logger, wanted)
    try:
        yield
    finally:
        _verbosity.exit(logger, wanted)


class LedgerCommand(BaseCommand):
    """A command of this package: its ``--verbosity`` sets the ``queued_storage``
    logger's level while it runs (see :func:`verbosity_logging`)."""

    def execute(self, *args: Any, **options: Any) -> str | None:
        with verbosity_logging(options.get("verbosity", 1)):
            return super().execute(*args, **options)


def check_storage_keys(keys: Iterable[str] | None) -> list[str]:
    """The keys asked for, each one a storage this process knows; else a usage
    error that lists the known keys."""
    wanted = list(keys or [])
    if not wanted:
        return []
    known = registry.known_keys()
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise UsageError(
            f"Unknown storage key(s): {', '.join(unknown)}. Known keys: "
            f"{', '.join(known) or 'none'}."
        )
    return wanted


def operator() -> str:
    """Who runs the command, as the ledger records who paused a storage."""
    try:
        user = getpass.getuser()
    except Exception:  # no user name in the environment nor the password database
        user = "?"
    return f"manage.py ({user}@{socket.gethostname()})"


def add_storage_filter(parser: argparse.ArgumentParser) -> None:
    """``--storage KEY``, repeatable, into ``storages``: check it with
    ``check_storage_keys()``, apply it with ``of_storages()``."""
    parser.add_argument(
        "--storage",
        action="append",
        dest="storages",
        metavar="KEY",
        help="Only rows of the storage with this key (repeatable).",
    )


def of_storages(
    rows: PendingTransferQuerySet, keys: list[str]
) -> PendingTransferQuerySet:
    """The rows of the storages ``keys`` names; all of ``rows`` when it names none."""
    return rows.filter(storage_key__in=keys) if keys else rows


def add_one_storage_arguments(
    parser: argparse.ArgumentParser,
    *,
    verb: str,
    batch_size: int,
    batch_what: str,
    dry_run_help: str,
) -> None:
    """What a command that walks one storage's files takes: ``--storage KEY`` (to
    check with ``one_storage()``), ``--batch-size``, ``--dry-run`` and the output
    options with progress. ``verb`` says what the command does to the storage."""
    parser.add_argument(
        "--storage",
        metavar="KEY",
        help=f"The storage to {verb} (needed when there is more than one).",
    )
    add_batch_size_argument(parser, default=batch_size, what=batch_what)
    parser.add_argument("--dry-run", action="store_true", help=dry_run_help)
    add_output_arguments(parser, progress=True)


def one_storage(key: str | None, *, verb: str) -> QueuedStorage:
    """The storage ``--storage KEY`` names, or the only one there is; else a usage
    error that lists the known keys."""
    if key is None:
        known = registry.known_keys()
        if len(known) != 1:
            raise UsageError(
                f"Name the storage to {verb} with --storage KEY. Known keys: "
                f"{', '.join(known) or 'none'}."
            )
        key = known[0]
    check_storage_keys([key])
    storage = registry.get(key)
    assert storage is not None  # check_storage_keys found it
    return storage


def mirrored_storage(key: str) -> QueuedStorage:
    """The storage of ``key``, which has mirrors; else a usage error."""
    check_storage_keys([key])
    storage = registry.get(key)
    assert storage is not None  # check_storage_keys found it
    if storage.primary is not None:
        raise UsageError(
            f"{key!r} is mirror {storage.mirror_name!r} of {storage.primary.key!r}: "
            f"pass {storage.primary.key!r} (and --mirror {storage.mirror_name})."
        )
    if not storage.mirror_targets:
        raise UsageError(
            f"The storage {key!r} has no mirrors: give it mirrors={{...}} first."
        )
    return storage


def mirror_names(storage: QueuedStorage, asked: list[str] | None) -> list[str]:
    """The mirrors of ``storage`` that ``--mirror`` names (each once), or all of
    them; else a usage error that lists its mirrors."""
    known = list(storage.mirror_targets)
    unknown = sorted(set(asked or []) - set(known))
    if unknown:
        raise UsageError(
            f"The storage {storage.key!r} has no mirror {', '.join(unknown)}; its "
            f"mirrors: {', '.join(known)}."
        )
    return list(dict.fromkeys(asked)) if asked else known


def add_batch_size_argument(
    parser: argparse.ArgumentParser, *, default: int, what: str
) -> None:
    """``--batch-size``; ``what`` says what one batch is, e.g. "Rows read per
    query"."""
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=default,
        help=f"{what} (default: {default}).",
    )


def add_pacing_arguments(parser: argparse.ArgumentParser, *, wait_help: str) -> None:
    """``--max-rate`` and ``--max-files`` (how fast copies are queued) and
    ``--wait-every`` (``wait_help`` says what it paces), for the mirror
    commands."""
    parser.add_argument(
        "--max-rate",
        type=byte_rate,
        metavar="BYTES",
        help="Queue at most this many bytes a second (e.g. 20MB, 1.5GiB).",
    )
    parser.add_argument(
        "--max-files",
        type=per_second,
        metavar="N",
        help="Queue at most this many files a second.",
    )
    parser.add_argument(
        "--wait-every",
        type=positive_float,
        default=2.0,
        help=f"{wait_help} (default: 2).",
    )


def counters_line(stats: DataclassInstance) -> str:
    """``name=value`` for each field of a dataclass of counters, in field order."""
    return " ".join(
        f"{field.name}={getattr(stats, field.name)}"
        for field in dataclasses.fields(stats)
    )


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


def human_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def eta(done: int, total: int, elapsed: float) -> str:
    if done <= 0 or elapsed <= 0:
        return "?"
    return human_seconds((total - done) / (done / elapsed))


def add_output_arguments(parser: argparse.ArgumentParser, *, progress: bool) -> None:
    parser.add_argument(
        "--json",
        action="store_true",
        help="Print the result as one JSON object on stdout (progress goes to stderr).",
    )
    if progress:
        parser.add_argument(
            "--progress",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="Show a live progress line (default: when the output is a terminal; "
            "otherwise a line every 10 seconds).",
        )
        parser.add_argument(
            "--progress-every",
            type=positive_float,
            default=10.0,
            help=argparse.SUPPRESS,  # seconds between progress lines off a terminal
        )


def write_json(command: BaseCommand, payload: Any) -> None:
    command.stdout.write(json.dumps(payload, sort_keys=True, default=str))


def _plain(text: str) -> str:
    return text


class Progress:
    """A live line on a terminal; elsewhere a line every ``every`` seconds.

    The line goes to stdout, or to stderr when stdout carries JSON."""

    def __init__(
        self,
        command: BaseCommand,
        *,
        verbosity: int,
        as_json: bool,
        live: bool | None,
        every: float = 10.0,
    ) -> None:
        self.stream: OutputWrapper = command.stderr if as_json else command.stdout
        self.enabled = verbosity > 0
        self.live = self._isatty(self.stream) if live is None else live
        self.every = every
        self.last = time.monotonic()
        self.shown = False
        # Transfers in --concurrency threads report here at the same time.
        self._lock = threading.Lock()

    @staticmethod
    def _isatty(stream: OutputWrapper) -> bool:
        target: TextIO = getattr(stream, "_out", sys.stdout)
        try:
            return bool(target.isatty())
        except (AttributeError, ValueError):
            return False

    def update(self, line: Callable[[], str]) -> None:
        if not self.enabled:
            return
        with self._lock:
            now = time.monotonic()
            if not self.live and now - self.last < self.every:
                return
            self.last = now
            if self.live:
                self.stream.write(f"\r{line()}\x1b[K", ending="", style_func=_plain)
                self.stream.flush()
                self.shown = True
            else:
                self.stream.write(f"progress {line()}", style_func=_plain)

    def finish(self) -> None:
        if self.shown:
            self.stream.write("", style_func=_plain)
            self.shown = False
