"""A live site's files moved from one S3 bucket to another through the ledger, end
to end: 10,000 files on the old bucket, adopted (done rows); the new bucket
added as a serving mirror; ``migrate_storage`` and a ``process_transfers --loop``
worker in processes of their own, both killed (SIGKILL) once some of the files
are verified on the new bucket, then started again. Meanwhile a reader keeps
asking ``url()``, ``exists()`` and ``open()`` of random names: every answer is
the file, from the old bucket until its copy is verified on the new one. At the
end every file is on the new bucket with its bytes, the migration is ready, and
the storage switched to the entry the command printed serves every file from
the new bucket.

The numbers go to stdout (``-s``); QUEUED_STORAGE_MIGRATION_FILES sets how many
files (default 10,000)."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import urlopen

import pytest
from django.core.files.storage import storages
from django.db import connections
from django.utils import timezone
from moto.core.models import DEFAULT_ACCOUNT_ID
from moto.s3.models import s3_backends

from queued_storage.backends import QueuedStorage
from queued_storage.ledger_sql import new_generation
from queued_storage.migration import progress
from queued_storage.models import PendingTransfer, name_hash
from queued_storage.prefetch import prefetch_locations
from tests.fleet import Worker
from tests.helpers import S3, wait_until
from tests.s3 import S3_OPTIONS, make_bucket
from tests.workers import start_command

Status = PendingTransfer.Status
#: 1,000 in every run: moto serves a couple of hundred requests a second on two
#: CPUs, and a copy from bucket to bucket takes six (about 70 s on a busy
#: machine). The issue's 10,000: QUEUED_STORAGE_MIGRATION_FILES=10000.
FILES = int(os.environ.get("QUEUED_STORAGE_MIGRATION_FILES") or 1000)
KEY, NEW_KEY = "media", "media-new"
#: The kill comes once this many files are verified on the new bucket.
KILL_AT = FILES * 3 // 10
#: The backfill queues this many files a second (--max-files): about as fast
#: as the worker copies here, so that it is still queuing at the kill.
MAX_FILES = max(FILES // 40, 1)
#: Short, so that the rows the killed worker held come back soon.
LEASE = 2
#: Seconds each wait may take: the copy of every file, on a slow machine.
DEADLINE = 120 + FILES // 10


def seed_old_bucket(bucket: str) -> dict[str, bytes]:
    """``FILES`` small files on the old bucket (straight into moto's backend: the
    server runs in this process) and their done rows, as ``adopt_remote_files``
    leaves them; the bytes of each file by name."""
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    files = {
        f"docs/{number // 1000:02d}/{number:05d}.txt": f"file {number} {'x' * (number % 50)}".encode()
        for number in range(FILES)
    }
    for name, payload in files.items():
        backend.put_object(bucket, name, payload)
    now = timezone.now()
    generation = new_generation()
    PendingTransfer.objects.bulk_create(
        [
            PendingTransfer(
                storage_key=KEY,
                name=name,
                name_hash=name_hash(name),
                status=Status.DONE,
                generation=generation,
                remote_owned=True,
                size=len(payload),
                host=socket.gethostname(),
                created_at=now,
                updated_at=now,
                transferred_at=now,
            )
            for name, payload in files.items()
        ],
        batch_size=1000,
    )
    return files


def bucket_objects(bucket: str) -> dict[str, bytes]:
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    return {key.name: key.value for key in backend.get_bucket(bucket).keys.values()}


def verified() -> int:
    return PendingTransfer.objects.filter(
        storage_key=NEW_KEY, status=Status.DONE, deleted=False
    ).count()


class Reader(threading.Thread):
    """Reads random files through the storage until stopped: each read must be
    the file's bytes, from the old bucket or, once its copy is verified, from the
    new one; ``problems`` lists every read that was not."""

    def __init__(
        self, storage: QueuedStorage, files: dict[str, bytes], buckets: dict[str, str]
    ) -> None:
        super().__init__(name="reader", daemon=True)
        self.storage = storage
        self.files = files
        self.names = sorted(files)
        self.buckets = buckets  # bucket name -> "old" or "new"
        self.stop = threading.Event()
        self.served: Counter[str] = Counter()
        self.problems: list[str] = []

    def run(self) -> None:
        chance = random.Random(FILES)
        try:
            while not self.stop.is_set():
                self.read(chance.choice(self.names))
        except Exception as error:  # shown by the test, not lost in the thread
            self.problems.append(f"reader crashed: {error!r}")
        finally:
            connections.close_all()

    def read(self, name: str) -> None:
        expected = self.files[name]
        url = self.storage.url(name)
        bucket = urlsplit(url).path.split("/")[1]
        where = self.buckets.get(bucket, f"nowhere ({url})")
        with urlopen(url, timeout=30) as response:
            body = response.read()
        with self.storage.open(name) as file:
            opened = file.read()
        exists = self.storage.exists(name)
        if where == "new":
            # The copy was verified before url() chose it: its row is done now.
            row = PendingTransfer.objects.for_name(NEW_KEY, name).values_list(
                "status", flat=True
            )
            if list(row) != [Status.DONE]:
                self.problems.append(
                    f"{name}: served from the new bucket, row {list(row)}"
                )
        if (body, opened, exists) != (expected, expected, True) or where not in {
            "old",
            "new",
        }:
            self.problems.append(
                f"{name}: from {where}, url gave {body[:30]!r}, open() {opened[:30]!r}, "
                f"exists() {exists}; expected {expected[:30]!r}"
            )
        self.served[where] += 1


# Processes, moto and a reader on two cores: about 80 s. What the ledger's SQL
# does on each database, the command's tests check on every leg; one leg runs it
# (tests/legs.py).
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_live_site_moves_to_a_new_bucket_through_a_crash_and_never_misses_a_file(
    s3_endpoint: str,
    settings: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    started = time.monotonic()
    # moto's server logs each request: 80,000 lines, and the time they take.
    caplog.set_level(logging.WARNING, logger="werkzeug")
    old, new = make_bucket(s3_endpoint), make_bucket(s3_endpoint)
    bucket = {**S3_OPTIONS, "endpoint_url": s3_endpoint}
    settings.STORAGES = {
        **settings.STORAGES,
        "s3-old": {"BACKEND": S3, "OPTIONS": {**bucket, "bucket_name": old}},
        "s3-new": {"BACKEND": S3, "OPTIONS": {**bucket, "bucket_name": new}},
        KEY: {
            "BACKEND": "queued_storage.backends.QueuedStorage",
            "OPTIONS": {
                "local": "queued_local",
                "remote": "s3-old",
                "key": KEY,
                "mirrors": {
                    "new": {"storage": "s3-new", "key": NEW_KEY, "serve": True}
                },
            },
        },
    }
    files = seed_old_bucket(old)
    seeded = time.monotonic()
    storage = storages[KEY]
    assert isinstance(storage, QueuedStorage)
    reader = Reader(storage, files, {old: "old", new: "new"})
    reader.start()
    overrides = {"QUEUED_STORAGE_LEASE": LEASE}
    worker_args = ["--loop", "--interval", "0.2", "--concurrency", "8"]
    migrate_args = [
        "migrate_storage",
        KEY,
        "--mirror",
        "new",
        "--max-files",
        str(MAX_FILES),
        "--wait-every",
        "0.5",
        "--json",
        "--no-progress",
    ]

    commands: list[subprocess.Popen[str]] = []

    def migrate() -> subprocess.Popen[str]:
        command = start_command(
            *migrate_args, overrides=overrides, stderr=subprocess.PIPE
        )
        commands.append(command)
        return command

    worker = Worker(tmp_path / "worker.log", worker_args, overrides).start()
    first = migrate()
    try:
        # The gate: the kill lands mid-way, however fast the machine copies.
        assert wait_until(lambda: verified() >= KILL_AT, timeout=DEADLINE, every=0.1), (
            worker.output()
        )
        first.send_signal(signal.SIGKILL)
        worker.kill()
        first.communicate(timeout=30)
        killed = time.monotonic()
        at_kill = verified()
        queued_at_kill = PendingTransfer.objects.filter(storage_key=NEW_KEY).count()
        served_at_kill = sum(reader.served.values())
        assert at_kill < FILES, "the kill came too late"

        worker.start()
        second = migrate()
        out, err = second.communicate(timeout=DEADLINE)
        assert second.returncode == 0, f"{err}\n{worker.output()}"
    finally:
        reader.stop.set()
        reader.join(timeout=60)
        if worker.running():
            worker.stop()
        for command in commands:
            if command.poll() is None:
                command.kill()
                command.communicate()
    migrated = time.monotonic()
    result = json.loads(out)

    assert reader.problems == []
    assert reader.served["old"] > 0 and reader.served["new"] > 0
    assert sum(reader.served.values()) > served_at_kill  # reads went on after the kill
    assert result["ready"] is True
    assert result["progress"]["verified_files"] == FILES
    assert result["queued"]["queued"] == FILES - queued_at_kill  # resumed, not redone
    assert bucket_objects(new) == files  # every file, byte for byte
    assert bucket_objects(old) == files  # the old bucket untouched
    assert progress(KEY, NEW_KEY).ready

    # The switch: the entry the command printed, as it is.
    settings.STORAGES = {**settings.STORAGES, **eval("{" + result["switch_to"] + "}")}
    switched = storages[KEY]
    assert isinstance(switched, QueuedStorage) and switched.key == NEW_KEY
    names = sorted(files)
    with prefetch_locations(switched, names):
        urls = {name: switched.url(name) for name in names}
    assert {urlsplit(url).path.split("/")[1] for url in urls.values()} == {new}
    for name in random.Random(0).sample(names, 200):
        with switched.open(name) as file:
            assert file.read() == files[name]
    print(
        f"\nmigration e2e: {FILES} files, {at_kill} verified and {queued_at_kill} "
        f"queued at the kill, {dict(reader.served)} reads; seed "
        f"{seeded - started:.1f}s, migration {migrated - seeded:.1f}s (killed after "
        f"{killed - seeded:.1f}s), total "
        f"{time.monotonic() - started:.1f}s"
    )
