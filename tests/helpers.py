"""Plain helpers the tests share: files, ledger rows, threads and waits. Fixtures
live in conftest.py; a test module imports these, never conftest.py."""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from io import StringIO
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import FileSystemStorage, Storage
from django.core.management import CommandError, call_command
from django.db import connections, transaction
from django.db.models.fields.files import FieldFile
from django.utils import timezone

from queued_storage import history, leases, ledger_sql
from queued_storage.backends import QueuedStorage
from queued_storage.fields import QueuedFieldFile
from queued_storage.models import PendingTransfer
from queued_storage.storage_state import StorageState
from queued_storage.worker import drain
from tests.storages import CountingStorage
from tests.testapp.models import Document, document_storage

FS = "django.core.files.storage.FileSystemStorage"
BACKEND = "queued_storage.backends.QueuedStorage"
S3 = "storages.backends.s3.S3Storage"
#: The base URLs of the old and the new remote of the ``migrating`` fixture.
OLD_URL = "https://old.example/"
NEW_URL = "https://new.example/"
FLAKY = "tests.storages.FlakyStorage"
#: FlakyStorage options for a remote that never takes a file.
ALWAYS_FAILING = {"failures": 10_000}
Status = PendingTransfer.Status


def content(text: str = "hello world") -> ContentFile[bytes]:
    return ContentFile(text.encode())


def read_bytes(storage: Storage, name: str) -> bytes:
    """The bytes ``storage.open(name)`` reads, the file closed again."""
    with storage.open(name) as opened:
        data: bytes = opened.read()
    return data


def row_of(storage: QueuedStorage, name: str) -> PendingTransfer:
    """The ledger row of ``name``, found as the package finds it: by the unique
    key (storage_key, name_hash), an exact match on the name's bytes."""
    return PendingTransfer.objects.for_name(storage.key, name).get()


def row_by_name_column(storage: QueuedStorage, name: str) -> PendingTransfer:
    """The ledger row whose ``name`` column equals ``name``. Unlike ``row_of`` it
    does not go through name_hash: the database compares the column itself, which
    is exact on every database (a binary collation on MariaDB)."""
    return PendingTransfer.objects.get(storage_key=storage.key, name=name)


def save_rolled_back(storage: QueuedStorage, capture_on_commit: Any) -> None:
    """Save a file in a transaction that the view's error rolls back, with the
    on-commit callbacks run as a request runs them; check that it left no row and
    no remote copy."""
    with (
        capture_on_commit(execute=True),
        pytest.raises(RuntimeError),
        transaction.atomic(),
    ):
        name = storage.save("draft.txt", content())
        raise RuntimeError("the view failed")
    assert not storage.remote.exists(name)
    assert not PendingTransfer.objects.filter(storage_key=storage.key).exists()


def storages_for(dirs: dict[str, Path], base: dict[str, Any]) -> dict[str, Any]:
    """``base`` (a ``STORAGES`` setting) with the ``queued_local`` and
    ``queued_remote`` aliases the test models use on ``dirs``' directories."""
    return {
        **base,
        "queued_local": {
            "BACKEND": FS,
            "OPTIONS": {"location": str(dirs["local"]), "base_url": "/media/"},
        },
        "queued_remote": {
            "BACKEND": "tests.storages.CountingStorage",
            "OPTIONS": {
                "location": str(dirs["remote"]),
                "base_url": "https://remote.example/",
            },
        },
    }


def queued(storage: Storage) -> QueuedStorage:
    """``storage`` (a ``storages[alias]``, a field's storage), which is queued."""
    assert isinstance(storage, QueuedStorage), storage
    return storage


def queued_file(file: FieldFile) -> QueuedFieldFile:
    """``file``, a model's file whose field is a QueuedFileField."""
    assert isinstance(file, QueuedFieldFile), file
    return file


def deconstructed(
    storage: QueuedStorage,
) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
    """What a migration freezes of ``storage``: ``@deconstructible`` adds
    ``deconstruct()``, which django-stubs does not declare."""
    frozen: tuple[str, tuple[Any, ...], dict[str, Any]] = storage.deconstruct()  # type: ignore[attr-defined]
    return frozen


def saved_name(file: FieldFile) -> str:
    """The name a saved model file got (a FieldFile's name is None before)."""
    assert file.name, file
    return file.name


def drained(storage: QueuedStorage) -> None:
    """Drain the storage's rows; none may fail or be retried."""
    stats = drain(keys=[storage.key])
    assert stats.failed == 0
    assert stats.retried == 0


def queued_alias(**options: Any) -> dict[str, Any]:
    """A ``STORAGES`` entry of a QueuedStorage on two FileSystemStorages."""
    return {"BACKEND": BACKEND, "OPTIONS": {"local": FS, "remote": FS, **options}}


def root_of(storage: Storage) -> Path:
    """The directory of a FileSystemStorage (a test's local or remote side)."""
    assert isinstance(storage, FileSystemStorage), storage
    return Path(storage.location)


def remote_calls(storage: QueuedStorage, method: str) -> int:
    """How often the storage's CountingStorage remote ran ``method``."""
    remote = storage.remote
    assert isinstance(remote, CountingStorage), remote
    return remote.calls(method)


def files_under(location: str | Path) -> list[str]:
    """Every file below ``location`` (none when it does not exist), relative to
    it, sorted."""
    root = Path(location)
    return sorted(
        str(path.relative_to(root)) for path in root.rglob("*") if path.is_file()
    )


def local_files(storage: QueuedStorage) -> list[str]:
    """Every file under the local storage's root, relative to it."""
    return files_under(root_of(storage.local))


def remote_files(storage: QueuedStorage) -> list[str]:
    """Every file under the remote storage's root, relative to it."""
    return files_under(root_of(storage.remote))


def in_thread(function: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``function`` in a started thread with its own database connection; the
    dict gets its ``value`` or ``error`` (hand both to ``joined``)."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = function()
        except BaseException as exc:  # handed to the test
            result["error"] = exc
        finally:
            connections.close_all()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def joined(
    thread: threading.Thread, result: dict[str, Any], timeout: float = 60
) -> Any:
    """What the thread of ``in_thread`` returned (or raise what it raised)."""
    thread.join(timeout=timeout)
    assert not thread.is_alive(), "the worker thread hung"
    if "error" in result:
        raise result["error"]
    return result["value"]


class Clock:
    """A clock the test moves (e.g. ``queued_storage.breaker.clock``): hours of
    an outage in no time."""

    def __init__(self) -> None:
        self.now = timezone.now()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class KeeperClock:
    """The lease keepers' clock (``queued_storage.leases.time``), which stands
    still until the test moves it: however loaded the machine, no renewal falls
    due and no transfer goes without progress for the timeout by the wall clock.
    The keepers still look at their transfers on the real clock (every sixth of
    the shorter of the lease and the timeout), which sets only how soon they see
    what the test did, never what they see."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = time.monotonic()
        self.looks = threading.Condition()
        self.begun = self.ended = 0
        self.stalled: set[str] = set()
        monkeypatch.setattr(leases, "time", SimpleNamespace(monotonic=self))
        tick = leases.LeaseKeeper._tick

        def counted(keeper: leases.LeaseKeeper) -> None:
            with self.looks:
                self.begun += 1
                stalled = set(self.stalled)
            if stalled:
                with keeper.lock:
                    for attempt in keeper.attempts.values():
                        if attempt.row.name in stalled:
                            attempt.progress_at = -math.inf
                            with self.looks:
                                self.stalled.discard(attempt.row.name)
            try:
                tick(keeper)
            finally:
                with self.looks:
                    self.ended += 1
                    self.looks.notify_all()

        monkeypatch.setattr(leases.LeaseKeeper, "_tick", counted)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        with self.looks:
            self.now += seconds

    def advance_and_look(self, seconds: float, timeout: float = 30) -> bool:
        """Move on, and wait until a keeper has looked at its transfers at the
        new time (False if none did within ``timeout`` real seconds)."""
        with self.looks:
            self.now += seconds
            before = self.begun
            return self.looks.wait_for(lambda: self.ended > before, timeout)

    def stall(self, name: str) -> None:
        """The keeper's next look sees the transfer of ``name`` in flight then as
        without progress since it started (abandoned, whatever the clock says),
        and no other: a hung upload among healthy ones."""
        with self.looks:
            self.stalled.add(name)


class GenerationClock:
    """The clock that new generations are read from (``ledger_sql.time``), moved
    by the test: saves in one tick, a clock that steps back, another host's."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch
        self.frozen: int | None = None
        self.behind = 0
        clock = SimpleNamespace(time_ns=self.time_ns, sleep=time.sleep)
        monkeypatch.setattr(ledger_sql, "time", clock)

    def time_ns(self) -> int:
        now = time.time_ns() if self.frozen is None else self.frozen
        return now - self.behind

    def freeze(self) -> None:
        """Every reading from now on is this one (a clock's coarse tick)."""
        self.frozen = time.time_ns()

    def step_back(self, nanoseconds: int) -> None:
        """Put this process's clock back (NTP)."""
        self.behind += nanoseconds

    def another_host(self, behind: int) -> None:
        """The saves from now on are another host's, whose clock is ``behind``
        nanoseconds behind: a process that has given out no generation yet."""
        self.behind = behind
        self.monkeypatch.setattr(ledger_sql, "last_generation", 0, raising=False)


def wait_until(
    condition: Callable[[], object], timeout: float = 30, every: float = 0.05
) -> bool:
    """Poll ``condition()`` until it is true or ``timeout`` seconds pass: a
    bounded wait on a condition (for what no event can signal, such as another
    process's work); True when it came true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return bool(condition())


def lanes_returned(timeout: float = 30) -> bool:
    """Wait until no drain's lane runs in any thread: each lane thread ended or
    was parked for the next drain (queued_storage/lanes.py), a lane left behind
    on a hung transfer included, once that returned."""

    def returned() -> bool:
        return not any(
            thread.name.startswith("queued-storage-worker") and thread.is_alive()
            for thread in threading.enumerate()
        )

    return wait_until(returned, timeout)


class Exited(Exception):
    """Raised by a faked ``os._exit`` (its one argument the exit status), so that
    a test sees a stop at once without losing its process."""


def add_history(key: str, minute: Any, **counts: Any) -> None:
    """Add ``counts`` (files, bytes, failures, duration_sum, bucket columns) to
    ``key``'s history row of ``minute``, as workers do."""
    values = [counts.get(name, 0) for name in history.COUNTED]
    history._add({key: values}, minute, history.history_db())


def open_breaker(storage: QueuedStorage, clock: Clock) -> None:
    """The storage's circuit breaker open after three failures, its probe due
    now on ``clock``."""
    StorageState.objects.create(
        storage_key=storage.key,
        breaker_failures=3,
        breaker_opened_at=clock.now - timedelta(minutes=1),
        breaker_probe_at=clock.now,
        breaker_backoff=4,
    )


class Audited:
    """What one run of audit_storage --json printed, and its exit status."""

    def __init__(self, out: str, err: str, code: int) -> None:
        self.out = out
        self.err = err
        self.code = code

    @property
    def json(self) -> Any:
        return json.loads(self.out)

    def kinds(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for finding in self.json["findings"]:
            found.setdefault(finding["kind"], []).append(finding["name"])
        return {kind: sorted(names) for kind, names in found.items()}

    def actions(self) -> dict[str, str]:
        return {f["name"]: f["action"] for f in self.json["findings"]}


def audit_storage(*args: str) -> Audited:
    out, err = StringIO(), StringIO()
    try:
        call_command("audit_storage", *args, stdout=out, stderr=err)
    except CommandError as exc:
        err.write(str(exc))
        return Audited(out.getvalue(), err.getvalue(), exc.returncode)
    return Audited(out.getvalue(), err.getvalue(), 0)


def put_remote(storage: QueuedStorage, name: str, data: bytes, age: float = 0) -> Path:
    """A file written on the remote behind the ledger's back, ``age`` seconds old."""
    path = root_of(storage.remote) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if age:
        then = time.time() - age
        os.utime(path, (then, then))
    return path


def transferred_document(name: str, data: bytes = b"a document") -> str:
    """Save a document's file, move it to the remote; returns its name."""
    document = Document.objects.create(file=ContentFile(data, name=name))
    drained(document_storage)
    saved = saved_name(document.file)
    assert row_of(document_storage, saved).status == Status.DONE
    return saved


def thread_starts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the threads started from now on in this test, in order."""
    names: list[str] = []
    start = threading.Thread.start

    def recording_start(thread: threading.Thread) -> None:
        names.append(thread.name)
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", recording_start)
    return names
