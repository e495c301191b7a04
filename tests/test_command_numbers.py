"""Numbers on the command line, verbosity and stopping: what an operator types
into a crontab or a supervisor's unit file, run as ``manage.py`` runs it."""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.files.base import ContentFile
from django.core.management import (
    ManagementUtility,
    call_command,
    load_command_class,
)

from queued_storage.management.cli import verbosity_logging
from queued_storage.models import PendingTransfer
from tests.helpers import Exited, saved_name
from tests.testapp.models import Document
from tests.workers import start_command

Status = PendingTransfer.Status

BAD_SECONDS = ["nan", "NaN", "inf", "-inf", "infinity", "1e309", "1e300", "0", "-1"]
BAD_COUNTS = ["0", "-3", "2147483648", "1" + "0" * 40, "1.5", "nan"]
BAD_DURATIONS = ["99999999999999999999d", "1" + "0" * 400, "5300w", "nan", "inf"]


def run_manage(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """``manage.py <argv>`` in this process, as the shell runs it: the exit status
    and stderr."""
    with pytest.raises(SystemExit) as exit_info:
        ManagementUtility(["manage.py", *argv]).execute()
    code = exit_info.value.code
    return (code if isinstance(code, int) else 1), capsys.readouterr().err


@pytest.mark.parametrize("value", BAD_SECONDS)
def test_process_transfers_refuses_an_interval_no_loop_can_sleep(
    capsys: pytest.CaptureFixture[str], value: str
) -> None:
    code, err = run_manage(capsys, "process_transfers", "--loop", "--interval", value)

    assert code == 2
    assert "--interval" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("option", ["--limit", "--concurrency", "--batch-size"])
@pytest.mark.parametrize("value", BAD_COUNTS)
def test_process_transfers_refuses_counts_out_of_range(
    capsys: pytest.CaptureFixture[str], option: str, value: str
) -> None:
    code, err = run_manage(capsys, "process_transfers", option, value)

    assert code == 2
    assert option in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ["clean_local_copies", "--older-than"],
        ["requeue_transfers", "--older-than"],
        ["requeue_transfers", "--newer-than"],
        ["transfer_status", "--max-age"],
    ],
    ids=lambda argv: " ".join(argv),
)
@pytest.mark.parametrize("value", BAD_DURATIONS)
def test_durations_that_overflow_or_are_not_numbers_are_refused(
    capsys: pytest.CaptureFixture[str], argv: list[str], value: str
) -> None:
    code, err = run_manage(capsys, *argv, value)

    assert code == 2
    assert argv[-1] in err
    assert "Traceback" not in err
    assert "OverflowError" not in err


@pytest.mark.django_db
def test_the_longest_duration_accepted_is_a_hundred_years(
    capsys: pytest.CaptureFixture[str],
) -> None:
    call_command("requeue_transfers", "--older-than", "36500d", "--dry-run")
    code, _ = run_manage(capsys, "requeue_transfers", "--older-than", "36501d")
    assert code == 2


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    """Every record that reaches a handler on the ``queued_storage`` logger."""
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    logger = logging.getLogger("queued_storage")
    handler = Keep(level=logging.DEBUG)
    logger.addHandler(handler)
    yield seen
    logger.removeHandler(handler)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("verbosity", "info_shown"), [(0, False), (1, False), (2, True), (3, True)]
)
def test_verbosity_sets_the_queued_storage_loggers_level_while_the_worker_runs(
    fresh_storages: dict[str, Path],
    records: list[logging.LogRecord],
    verbosity: int,
    info_shown: bool,
) -> None:
    Document.objects.create(file=ContentFile(b"x", name="v.txt"))
    logger = logging.getLogger("queued_storage")
    before = logger.level

    call_command("process_transfers", verbosity=verbosity)

    done = [r for r in records if r.getMessage().startswith("transfer done")]
    assert bool(done) is info_shown
    assert PendingTransfer.objects.get().status == Status.DONE
    assert logger.level == before


def test_verbosity_only_ever_adds_detail_to_the_sites_logging_level(
    records: list[logging.LogRecord],
) -> None:
    logger = logging.getLogger("queued_storage")
    logger.setLevel(logging.INFO)
    try:
        with verbosity_logging(0):
            logger.info("kept")
        with verbosity_logging(3):
            logger.debug("added")
        assert logger.level == logging.INFO
    finally:
        logger.setLevel(logging.NOTSET)
    assert [r.getMessage() for r in records] == ["kept", "added"]


def test_a_handler_is_added_only_when_nothing_would_show_the_records(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    logger = logging.getLogger("queued_storage")
    # As in a process with no LOGGING for it: no handler up the tree.
    monkeypatch.setattr(logger, "propagate", False)
    handlers = list(logger.handlers)
    for handler in handlers:
        logger.removeHandler(handler)
    try:
        with verbosity_logging(2):
            logger.info("shown key=k")
        assert "INFO shown key=k" in capsys.readouterr().err
        assert logger.handlers == []
    finally:
        for handler in handlers:
            logger.addHandler(handler)


class Lines:
    """A process's stderr, read by a thread, so that a test waits for a line
    with a deadline instead of blocking for ever on one that never comes."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        assert process.stderr is not None
        stream = process.stderr
        self.reader = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self.reader.start()

    def _pump(self, stream: Any) -> None:
        for line in stream:
            self.lines.put(line)

    def rest(self) -> str:
        """Everything printed, once the process has ended."""
        self.reader.join(timeout=30)
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return "".join(self.seen)

    def wait_for(self, text: str, timeout: float = 60) -> None:
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"never printed {text!r}: {self.seen}") from None
            self.seen.append(line)
            if text in line:
                return


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_stops_the_worker_at_once_and_loses_nothing(
    fresh_storages: dict[str, Path], settings: Any, tmp_path: Path, signum: int
) -> None:
    entered, gate = tmp_path / "entered", tmp_path / "gate"
    settings.STORAGES = {
        **settings.STORAGES,
        "queued_remote": {
            "BACKEND": "tests.storages.FileGatedStorage",
            "OPTIONS": {
                "location": str(fresh_storages["remote"]),
                "entered": str(entered),
                "gate": str(gate),
            },
        },
    }
    name = saved_name(
        Document.objects.create(file=ContentFile(b"in hand", name="h.txt")).file
    )
    worker = start_command(
        "process_transfers", "--loop", "--interval", "0.2", stderr=subprocess.PIPE
    )
    lines = Lines(worker)
    try:
        # The upload in hand waits at the gate, which this test never opens.
        deadline = time.monotonic() + 60
        while not entered.exists():
            assert worker.poll() is None, lines.rest()
            assert time.monotonic() < deadline, "the worker never started an upload"
            time.sleep(0.02)
        worker.send_signal(signum)
        lines.wait_for("send it again to stop at once")
        assert worker.poll() is None, "the first signal must let the upload finish"
        worker.send_signal(signum)
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        lines.reader.join(timeout=30)
        # Closed here, not left to the garbage collector (a ResourceWarning).
        for pipe in (worker.stdout, worker.stderr):
            if pipe is not None:
                pipe.close()

    assert worker.returncode == 128 + signum, lines.rest()
    assert "stopping now" in lines.rest()
    row = PendingTransfer.objects.get()
    # Left as a crash leaves it: the lease expires and another worker retries.
    assert row.status == Status.TRANSFERRING
    assert row.lease_token
    assert (fresh_storages["local"] / name).read_bytes() == b"in hand"
    assert not (fresh_storages["remote"] / name).exists()


def test_a_second_signal_arriving_while_the_first_is_logged_stops_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Python runs a signal's handler inside the one before when it arrives
    mid-handler: the second Ctrl-C must still count as the second."""
    from queued_storage.management.commands import process_transfers

    command = process_transfers.Command()
    command.stopping = False
    previous = command._install_signal_handlers()
    handler = signal.getsignal(signal.SIGINT)
    assert callable(handler)
    calls: list[str] = []

    def warning(message: str, *args: Any) -> None:
        calls.append(message)
        if len(calls) == 1:  # the second signal, while the first is logged
            handler(signal.SIGINT, None)

    def exit_now(status: int) -> None:
        raise Exited(status)

    monkeypatch.setattr(process_transfers.logger, "warning", warning)
    monkeypatch.setattr(os, "_exit", exit_now)
    alarm = signal.getsignal(signal.SIGALRM)
    try:
        with pytest.raises(Exited) as exited:
            handler(signal.SIGINT, None)
    finally:
        # The stop's alarm would end the test run with the real os._exit.
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, alarm)
        for signum, old in previous.items():
            signal.signal(signum, old)
    assert exited.value.args == (128 + signal.SIGINT,)
    assert calls[-1].startswith("stopping now")


COMMANDS = sorted(
    path.stem
    for path in (
        Path(__file__).resolve().parent.parent
        / "queued_storage"
        / "management"
        / "commands"
    ).glob("*.py")
    if path.stem != "__init__"
)


@pytest.mark.parametrize("name", COMMANDS)
@pytest.mark.parametrize(
    ("verbosity", "level"),
    [(0, logging.ERROR), (1, logging.WARNING), (2, logging.INFO), (3, logging.DEBUG)],
)
def test_every_command_sets_the_loggers_level_from_its_verbosity(
    monkeypatch: pytest.MonkeyPatch, name: str, verbosity: int, level: int
) -> None:
    command = load_command_class("queued_storage", name)
    seen: list[int] = []
    monkeypatch.setattr(
        command,
        "handle",
        lambda *args, **options: seen.append(
            logging.getLogger("queued_storage").getEffectiveLevel()
        ),
    )

    command.execute(
        verbosity=verbosity, force_color=False, no_color=True, skip_checks=True
    )

    assert seen == [level]
    assert logging.getLogger("queued_storage").level == logging.NOTSET


def test_a_level_the_site_set_on_the_root_logger_is_kept_too(
    records: list[logging.LogRecord],
) -> None:
    """LOGGING = {"root": {"level": "INFO", ...}}: the package's own logger has
    no level of its own, and -v 1 must not hide what the site asked for."""
    root = logging.getLogger()
    before = root.level
    root.setLevel(logging.INFO)
    try:
        with verbosity_logging(1):
            logging.getLogger("queued_storage").info("kept key=k")
    finally:
        root.setLevel(before)
    assert [r.getMessage() for r in records] == ["kept key=k"]
    assert logging.getLogger("queued_storage").level == logging.NOTSET
