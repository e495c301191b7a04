"""Fleets of ``process_transfers`` processes for the concurrency and chaos tests:
files queued in bulk, workers whose output goes to a log file, and the journal in
which the test remotes record every upload (tests/storages.py, tests/s3.py)."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.db import connection
from django.utils import timezone

from queued_storage.models import PendingTransfer, name_hash
from tests.workers import start_command

#: The storage key and upload_to of tests.testapp.models.Document.
DOCUMENTS = "documents"


def is_sqlite() -> bool:
    return connection.vendor == "sqlite"


def queue_files(
    local: Path, count: int, *, size: int = 256, prefix: str = "docs"
) -> dict[str, str]:
    """Write ``count`` files into the local directory of the ``documents`` storage
    and queue a ledger row for each, as ``count`` saves would (in one statement).

    Returns the SHA-256 of each file by name."""
    now = timezone.now()
    host = socket.gethostname()
    digests: dict[str, str] = {}
    rows = []
    for number in range(count):
        name = f"{prefix}/{number:05d}.bin"
        payload = os.urandom(size)
        path = local / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
        digests[name] = hashlib.sha256(payload).hexdigest()
        rows.append(
            PendingTransfer(
                storage_key=DOCUMENTS,
                name=name,
                name_hash=name_hash(name),
                status=PendingTransfer.Status.QUEUED,
                next_attempt_at=now,
                size=size,
                host=host,
                created_at=now,
                updated_at=now,
            )
        )
    PendingTransfer.objects.bulk_create(rows, batch_size=500)
    return digests


def statuses() -> Counter[str]:
    return Counter(
        PendingTransfer.objects.filter(storage_key=DOCUMENTS).values_list(
            "status", flat=True
        )
    )


@dataclass(frozen=True)
class Event:
    kind: str  # "begin" (an upload started) or "saved" (it finished)
    pid: int
    at: float
    name: str


class Journal:
    """The remote's upload journal, shared by every worker process."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def events(self) -> list[Event]:
        if not self.path.exists():
            return []
        events = []
        for line in self.path.read_text().splitlines():
            kind, pid, at, name = line.split("\t", 3)
            events.append(Event(kind, int(pid), float(at), name))
        return events

    def count(self, kind: str) -> Counter[str]:
        """Uploads per name: ``saved`` = finished writes, ``begin`` = started."""
        return Counter(event.name for event in self.events() if event.kind == kind)


class Worker:
    """One ``manage.py process_transfers`` process, output in ``log``."""

    def __init__(
        self, log: Path, args: list[str], overrides: dict[str, Any] | None = None
    ) -> None:
        self.log = log
        self.args = args
        self.overrides = overrides
        self.process: subprocess.Popen[str] | None = None
        self.pids: list[int] = []

    def start(self) -> Worker:
        with self.log.open("a") as out:
            self.process = start_command(
                "process_transfers",
                *self.args,
                overrides=self.overrides,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.pids.append(self.process.pid)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no cleanup, no released claims, like a crashed host."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then wait: a ``--loop`` worker finishes its file and exits."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = 120) -> int:
        assert self.process is not None
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"worker {self.args} still ran after {timeout}s:\n{self.output()}"
            ) from None

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""
