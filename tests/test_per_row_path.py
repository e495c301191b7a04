"""The per-row path of a drain stays short: in steady state one drained row
passes through at most 25 of the package's own functions, and no drain or wake-up
after the first scans the registry's settings and models again.

A count, not a timing: every call of a package function is counted (in the
drain's thread and in the threads it starts) over two drains through
``manage.py process_transfers`` as cron runs it, one of 50 rows and one of 100,
and the functions whose calls grow with the rows are the per-row path."""

from __future__ import annotations

import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from io import StringIO
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from django.core.management import call_command

import queued_storage
from queued_storage import completions, lanes
from queued_storage.backends import QueuedStorage
from queued_storage.errors import Outcome
from queued_storage.models import PendingTransfer
from queued_storage.worker import transfer_name
from tests.helpers import FS, content

PACKAGE = str(Path(queued_storage.__file__).parent)
#: The issue's bound on the package functions one drained row passes through.
MOST_PER_ROW = 25

Calls = Counter[tuple[str, int, str]]


@contextmanager
def counting_package_calls() -> Iterator[Calls]:
    """Count the calls of every function defined in the package, in this thread
    and in every thread started meanwhile."""
    calls: Calls = Counter()

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call":
            code = frame.f_code
            if code.co_filename.startswith(PACKAGE):
                calls[
                    (
                        code.co_filename[len(PACKAGE) + 1 :],
                        code.co_firstlineno,
                        code.co_name,
                    )
                ] += 1

    # Lanes run on new threads, which start with the profile.
    lanes.retire_parked(timeout=30)
    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        yield calls
    finally:
        sys.setprofile(None)
        threading.setprofile(None)


def save_rows(storage: QueuedStorage, rows: int, start: int) -> None:
    for i in range(start, start + rows):
        storage.save(f"f/{i}.bin", content("x" * 10240))


def drain_counted(storage: QueuedStorage, rows: int, start: int) -> Calls:
    save_rows(storage, rows, start)
    with counting_package_calls() as calls:
        call_command("process_transfers", stdout=StringIO())
    done = PendingTransfer.objects.filter(storage_key=storage.key).done().count()
    assert done == start + rows
    return calls


def per_row(few: Calls, many: Calls, rows: int) -> dict[tuple[str, int, str], float]:
    """The functions called at least once every two rows more in the larger drain."""
    grown = {key: (many[key] - few.get(key, 0)) / rows for key in many}
    return {key: count for key, count in grown.items() if count >= 0.5}


@pytest.mark.django_db(transaction=True)
def test_a_drained_row_passes_through_at_most_25_package_functions(
    make_storage: Callable[..., QueuedStorage], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Steady state: a claim's verified rows recorded together when it ends, as
    # on a fast remote, however slowly this machine runs the test.
    monkeypatch.setattr(completions, "COMPLETE_AFTER", 3600.0)
    storage = make_storage(remote=FS)
    drain_counted(storage, 20, 0)  # the first drain finds the storages

    few = drain_counted(storage, 50, 20)
    many = drain_counted(storage, 100, 70)

    found = per_row(few, many, 50)
    listing = "\n".join(
        f"{count:5.2f} {path}:{line} {name}"
        for (path, line, name), count in sorted(found.items(), key=lambda kv: -kv[1])
    )
    assert len(found) <= MOST_PER_ROW, f"{len(found)} functions a row:\n{listing}"
    # The path is what it says: the row's transfer, its copy and its check.
    names = {name for _path, _line, name in found}
    assert {"transfer_row", "copy_file", "_verify"} <= names, listing


@pytest.mark.django_db(transaction=True)
def test_no_drain_or_wake_up_after_the_first_scans_settings_and_models_again(
    make_storage: Callable[..., QueuedStorage],
) -> None:
    storage = make_storage(remote=FS)
    drain_counted(storage, 2, 0)

    save_rows(storage, 2, 2)

    with counting_package_calls() as calls:
        call_command("process_transfers", stdout=StringIO())
        storage.save("woken.bin", content("x"))
        outcome = transfer_name(storage.key, "woken.bin")

    assert outcome is Outcome.DONE
    assert calls[("worker.py", transfer_name.__code__.co_firstlineno, "transfer_name")]
    scans = {key: count for key, count in calls.items() if key[2] == "_declared"}
    assert not scans, scans
