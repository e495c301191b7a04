"""``manage.py process_transfers``: what an operator runs from cron or a supervisor,
and what it prints."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from queued_storage import claim_size, completions
from queued_storage.backends import QueuedStorage
from queued_storage.management.commands import process_transfers
from queued_storage.models import PendingTransfer
from queued_storage.worker import drain
from tests.helpers import content, remote_calls
from tests.storages import GatedStorage

pytestmark = pytest.mark.django_db

Status = PendingTransfer.Status


def run(*args: str) -> str:
    out = StringIO()
    call_command("process_transfers", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def statuses(storage: QueuedStorage) -> dict[str, str]:
    return dict(
        PendingTransfer.objects.filter(storage_key=storage.key).values_list(
            "name", "status"
        )
    )


@pytest.fixture
def saved(storage: QueuedStorage) -> Callable[[int], list[str]]:
    def save(count: int) -> list[str]:
        return [storage.save(f"f{i}.txt", content(f"file {i}")) for i in range(count)]

    return save


@pytest.fixture(autouse=True)
def _keep_signal_handlers() -> Iterator[None]:
    """Whatever the command does to SIGTERM/SIGINT, the test run keeps its own."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)


def test_transfers_everything_due_and_prints_a_summary(
    storage: QueuedStorage, saved: Callable[[int], list[str]]
) -> None:
    names = saved(3)

    output = run()

    assert "done=3 " in output
    assert "failed=0 " in output
    assert statuses(storage) == dict.fromkeys(names, Status.DONE)
    for i, name in enumerate(names):
        assert Path(storage.remote.path(name)).read_bytes() == f"file {i}".encode()


def test_says_so_when_nothing_is_due(storage: QueuedStorage) -> None:
    output = run()

    assert output.strip() == "No transfers due."


def test_verbosity_zero_prints_nothing(saved: Callable[[int], list[str]]) -> None:
    saved(2)

    assert run("--verbosity", "0") == ""
    assert PendingTransfer.objects.done().count() == 2


def test_retries_without_delay_in_the_same_run(
    make_storage: Callable[..., QueuedStorage], settings: Any
) -> None:
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    storage = make_storage(
        remote="tests.storages.FlakyStorage", remote_options={"failures": 2}
    )
    name = storage.save("a.txt", content())

    output = run()

    assert "done=1 retried=2 failed=0" in output
    assert statuses(storage) == {name: Status.DONE}


def test_reports_rows_out_of_attempts(
    make_storage: Callable[..., QueuedStorage], settings: Any
) -> None:
    settings.QUEUED_STORAGE_RETRIES = 1
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    storage = make_storage(
        remote="tests.storages.FlakyStorage", remote_options={"failures": 100}
    )
    name = storage.save("a.txt", content())
    out = StringIO()

    # A row out of attempts needs a person: exit status 3 for cron and monitors.
    with pytest.raises(CommandError) as excinfo:
        call_command("process_transfers", stdout=out, stderr=StringIO())

    assert excinfo.value.returncode == 3
    assert "1 transfer(s) failed for good" in str(excinfo.value)
    assert "done=0 retried=1 failed=1" in out.getvalue()
    assert statuses(storage) == {name: Status.FAILED}
    # A failed row is not due: the next run has nothing to do.
    assert run().strip() == "No transfers due."


def test_unknown_storage_key_is_an_error_that_lists_the_known_keys(
    storage: QueuedStorage, saved: Callable[[int], list[str]]
) -> None:
    saved(1)

    with pytest.raises(CommandError) as excinfo:
        run("--storage", "unknown")

    assert excinfo.value.returncode == 2  # a usage error, like a bad option
    message = str(excinfo.value)
    assert "unknown" in message
    assert "Known keys:" in message
    assert storage.key in message
    assert "documents" in message  # the test models' storage
    assert set(statuses(storage).values()) == {Status.QUEUED}


def test_storage_option_narrows_the_run(
    make_storage: Callable[..., QueuedStorage],
) -> None:
    wanted = make_storage()
    other = make_storage()
    wanted_name = wanted.save("a.txt", content())
    other_name = other.save("a.txt", content())

    output = run("--storage", wanted.key)

    assert "done=1 " in output
    assert statuses(wanted) == {wanted_name: Status.DONE}
    assert statuses(other) == {other_name: Status.QUEUED}
    assert remote_calls(other, "save") == 0


def test_limit_stops_after_that_many_rows(
    storage: QueuedStorage, saved: Callable[[int], list[str]]
) -> None:
    saved(5)

    output = run("--limit", "2")

    assert "done=2 " in output
    assert PendingTransfer.objects.done().count() == 2
    assert PendingTransfer.objects.queued().count() == 3
    assert remote_calls(storage, "save") == 2


def test_loop_polls_until_max_polls(
    storage: QueuedStorage,
    saved: Callable[[int], list[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    saved(2)
    rescued: list[bool] = []
    polls: list[bool] = []

    def poll(**kwargs: Any) -> Any:
        # A safety net: should --max-polls not end the loop, SIGTERM does at the
        # third poll, and fails (counted in polls, not seconds: a loaded machine's
        # two polls may take any time).
        polls.append(True)
        if len(polls) > 2:
            rescued.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return drain(**kwargs)

    monkeypatch.setattr(process_transfers, "drain", poll)  # the name it calls
    output = run("--loop", "--max-polls", "2", "--interval", "0.1")

    assert rescued == []
    assert "Stopped. done=2 " in output
    assert PendingTransfer.objects.done().count() == 2


def test_loop_stops_on_sigterm(monkeypatch: pytest.MonkeyPatch) -> None:
    called_instead: list[int] = []
    # Should the command not take SIGTERM over, this records it rather than
    # killing the test run, and --max-polls ends the loop.
    signal.signal(signal.SIGTERM, lambda signum, frame: called_instead.append(signum))
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
    install = process_transfers.Command._install_signal_handlers

    def installed(command: Any) -> dict[int, Any]:
        # The signal comes 0.3 s after the command took SIGTERM over, not 0.3 s
        # after the call: a loaded machine's start-up outlasted that, and the
        # test's own handler got it.
        previous = install(command)
        timer.start()
        return previous

    monkeypatch.setattr(
        process_transfers.Command, "_install_signal_handlers", installed
    )
    started = time.monotonic()
    try:
        output = run("--loop", "--max-polls", "100", "--interval", "0.1")
    finally:
        timer.cancel()

    assert called_instead == []
    assert output.startswith("Stopped. done=0 ")
    assert time.monotonic() - started < 5  # 100 polls would take 10 s


def test_sigterm_during_a_run_finishes_the_file_and_gives_the_rest_back(
    make_storage: Callable[..., QueuedStorage], gate: type[GatedStorage]
) -> None:
    storage = make_storage(remote="tests.storages.GatedStorage")
    names = [storage.save(f"f{i}.txt", content()) for i in range(3)]
    called_instead: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: called_instead.append(signum))

    stopping = threading.Event()
    first_on_remote: list[bool] = []

    class StopNoted(logging.Handler):
        """Sets ``stopping`` once the command's signal handler has run (in the
        main thread, between two of its bytecodes): it logs as it stops. Notes
        whether the first file had reached the remote by then."""

        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("stopping signal=SIGTERM"):
                first_on_remote.append(Path(storage.remote.path(names[0])).exists())
                stopping.set()

    def stop_during_the_first_upload() -> None:
        # The gate opens right after the signal, without waiting for the handler:
        # this thread wakes when the main thread lets the GIL go on its way into
        # the gate's wait, and a signal sent before that wait blocks is handled
        # only when it returns (CPython runs handlers between bytecodes, and
        # nothing interrupts the wait). Waiting here for the handler then waited
        # out its timeout, as it did after another test about one run in two.
        # Either way the handler runs in the main thread before the upload
        # writes the file (first_on_remote).
        if gate.entered.wait(timeout=10):
            os.kill(os.getpid(), signal.SIGTERM)
        gate.gate.set()

    noted = StopNoted()
    logger = logging.getLogger("queued_storage")
    logger.addHandler(noted)
    level = logger.level
    logger.setLevel(logging.INFO)
    helper = threading.Thread(target=stop_during_the_first_upload, daemon=True)
    helper.start()
    try:
        output = run("--loop", "--max-polls", "5", "--interval", "0.1")
    finally:
        logger.removeHandler(noted)
        logger.setLevel(level)
    helper.join(timeout=10)

    assert stopping.is_set(), "the command's handler never ran"
    assert first_on_remote == [False], "the handler ran after the upload"
    assert called_instead == []
    assert "Stopped. done=1 " in output
    assert statuses(storage) == {
        names[0]: Status.DONE,
        names[1]: Status.QUEUED,
        names[2]: Status.QUEUED,
    }
    # Given back at once, not left to a lease expiry, and with no attempt used.
    given_back = PendingTransfer.objects.filter(name__in=names[1:])
    assert all(row.lease_token == "" for row in given_back)
    assert all(row.attempts == 0 for row in given_back)
    assert remote_calls(storage, "save") == 1


def test_loop_restores_the_signal_handlers_it_replaced(
    saved: Callable[[int], list[str]],
) -> None:
    def mine(signum: int, frame: Any) -> None:
        pass

    signal.signal(signal.SIGTERM, mine)
    signal.signal(signal.SIGINT, mine)

    run("--loop", "--max-polls", "1", "--interval", "0.1")

    assert signal.getsignal(signal.SIGTERM) is mine
    assert signal.getsignal(signal.SIGINT) is mine


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--concurrency", "0"], "--concurrency: must be at least 1"),
        (["--limit", "-2"], "--limit: must be at least 1"),
        (["--batch-size", "many"], "--batch-size: 'many' is not a whole number"),
        (["--interval", "0"], "--interval: must be more than 0"),
        (["--max-polls", "0"], "--max-polls: must be at least 1"),
    ],
)
def test_bad_values_are_rejected_before_anything_runs(
    storage: QueuedStorage,
    saved: Callable[[int], list[str]],
    args: list[str],
    error: str,
) -> None:
    saved(1)

    with pytest.raises(CommandError) as excinfo:
        run(*args)

    assert error in str(excinfo.value)
    assert set(statuses(storage).values()) == {Status.QUEUED}


@pytest.mark.django_db(transaction=True)
def test_concurrency_transfers_each_file_once(
    storage: QueuedStorage, saved: Callable[[int], list[str]]
) -> None:
    names = saved(12)

    output = run("--concurrency", "4", "--batch-size", "5")

    assert "done=12 " in output
    assert statuses(storage) == dict.fromkeys(names, Status.DONE)
    assert remote_calls(storage, "save") == 12


def test_one_run_over_ten_files_claims_in_batches(
    saved: Callable[[int], list[str]],
    django_assert_max_num_queries: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    saved(10)
    # Rows that take no time, as the claims see them: claims of 1, 4 and 5 rows
    # (claim_size's growth from one row per lane), then an empty one.
    monkeypatch.setattr(claim_size, "clock", lambda: 0.0)
    # And each claim's verified rows recorded at its end: on a loaded machine a
    # row waiting COMPLETE_AFTER (50 ms) would be recorded on its own, one UPDATE
    # (three queries on MariaDB) more, and the count would say nothing.
    monkeypatch.setattr(completions, "COMPLETE_AFTER", 3600.0)

    # Measured: 35 on SQLite, 40 on PostgreSQL, 44 on MariaDB (savepoint pairs):
    # one count and one read of the paused storages; per claim the storages'
    # controls, a select, an update, a re-read and one UPDATE recording its files
    # as done; one empty claim; and one lease check per file before its upload
    # (this remote is asked first, and could overwrite). Claiming each file on
    # its own would cost at least 50.
    with django_assert_max_num_queries(44):
        output = run()

    assert "done=10 " in output
