"""The end-to-end demo that ``make demo`` runs: uploads land on local disk, a
drain moves them to S3 (moto on loopback), and the URLs follow the ledger."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import random
import shutil
import time
import urllib.request
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import storages
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.migrations.executor import MigrationExecutor
from django.db.models import Count

from queued_storage.backends import QueuedStorage
from queued_storage.models import PendingTransfer
from sandbox.gallery.models import Switches, Upload

#: How many files the demo saves, and the smallest and largest of them.
FILE_COUNT = 24
SMALLEST = 4 * 1024
LARGEST = 1024 * 1024
#: The alias of the remote storage in settings.STORAGES.
REMOTE_ALIAS = "s3"


def demo_files() -> list[tuple[str, bytes]]:
    """The same names and contents on every run: sizes spread evenly on a log
    scale from ``SMALLEST`` to ``LARGEST``."""
    files = []
    for index in range(FILE_COUNT):
        size = round(SMALLEST * (LARGEST / SMALLEST) ** (index / (FILE_COUNT - 1)))
        content = random.Random(index).randbytes(size)
        files.append((f"sample-{index + 1:02d}.bin", content))
    return files


def kib(size: int) -> str:
    return f"{size / 1024:7.1f} KiB"


class Command(BaseCommand):
    help = (
        "Save files through QueuedStorage, drain them to an S3 server (moto) that "
        "this command starts on loopback, and check what comes back."
    )

    def handle(self, **options: Any) -> None:
        started = time.monotonic()
        self._check_migrated()
        self._reset()
        # moto's server logs every request through werkzeug at INFO.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            endpoint = f"http://{host}:{port}"
            # moto keeps its buckets in process-wide state, which outlives a server:
            # start from an empty S3 even when the demo runs twice in one process.
            reset = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")
            urllib.request.urlopen(reset, timeout=30).close()
            self._run(endpoint)
        finally:
            server.stop()
        self.stdout.write(
            self.style.SUCCESS(f"Demo passed in {time.monotonic() - started:.1f}s.")
        )

    def _check_migrated(self) -> None:
        executor = MigrationExecutor(connections[DEFAULT_DB_ALIAS])
        if executor.migration_plan(executor.loader.graph.leaf_nodes()):
            raise CommandError(
                "The sandbox database has unapplied migrations: run "
                "`manage.py migrate` first."
            )

    def _storage(self) -> QueuedStorage:
        storage = Upload._meta.get_field("file").storage
        if not isinstance(storage, QueuedStorage):
            raise CommandError(
                f"Upload.file uses {storage!r}, not a QueuedStorage: check "
                "settings.STORAGES['queued']."
            )
        return storage

    def _reset(self) -> None:
        """Forget the previous run: its rows, its local files (its remote was a moto
        server that died with it)."""
        storage = self._storage()
        # Switches left on in the sandbox would hold or fail every transfer here.
        Switches.objects.update(hold_transfers=False, remote_down=False)
        Upload.objects.all().delete()
        PendingTransfer.objects.filter(storage_key=storage.key).delete()
        upload_to = Upload._meta.get_field("file").upload_to
        shutil.rmtree(Path(storage.local.path(upload_to)), ignore_errors=True)

    def _point_s3_at(self, endpoint: str) -> None:
        """Re-point the "s3" alias at ``endpoint`` after settings were loaded."""
        new = copy.deepcopy(settings.STORAGES)
        new[REMOTE_ALIAS]["OPTIONS"]["endpoint_url"] = endpoint
        settings.STORAGES = new
        # What Django's setting_changed receiver for STORAGES does in tests
        # (django.test.signals.storages_changed): drop the cached instances.
        with contextlib.suppress(AttributeError):
            del storages.backends
        storages._backends = None
        storages._storages = {}
        remote = self._storage().remote
        resolved = getattr(remote, "endpoint_url", None)
        if resolved != endpoint:
            raise CommandError(
                f"The remote storage still points at {resolved!r}, not the demo's "
                f"S3 server at {endpoint!r}."
            )

    def _create_bucket(self, endpoint: str) -> str:
        import boto3

        s3_options = settings.STORAGES[REMOTE_ALIAS]["OPTIONS"]
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=s3_options["access_key"],
            aws_secret_access_key=s3_options["secret_key"],
            region_name=s3_options["region_name"],
        )
        bucket = str(s3_options["bucket_name"])
        client.create_bucket(Bucket=bucket)
        return bucket

    def _run(self, endpoint: str) -> None:
        self._point_s3_at(endpoint)
        bucket = self._create_bucket(endpoint)
        storage = self._storage()
        self.stdout.write(
            f"S3 server (moto) at {endpoint}, bucket {bucket!r}; storage key "
            f"{storage.key!r}.\n"
        )

        uploads: list[Upload] = []
        saved: dict[str, bytes] = {}
        for index, (name, content) in enumerate(demo_files(), start=1):
            upload = Upload.objects.create(
                title=f"Sample {index:02d}", file=ContentFile(content, name=name)
            )
            uploads.append(upload)
            saved[upload.file.name] = content
        total = sum(len(content) for content in saved.values())
        self.stdout.write(
            self.style.MIGRATE_HEADING(
                f"Saved {len(uploads)} files ({total / 1024 / 1024:.1f} MiB) through "
                "Upload.objects.create():"
            )
        )
        self._show(storage, uploads, expect="local")
        self._show_ledger(storage, "Ledger before the drain")

        self.stdout.write(self.style.MIGRATE_HEADING("\nDraining: process_transfers"))
        call_command("process_transfers", progress=True)
        failed = (
            PendingTransfer.objects.filter(storage_key=storage.key)
            .exclude(status=PendingTransfer.Status.DONE)
            .values_list("name", "status", "last_error")
        )
        if failed:
            problems = "\n".join(
                f"  {name}: {status} {error}" for name, status, error in failed
            )
            raise CommandError(f"Some transfers did not finish:\n{problems}")

        self.stdout.write(self.style.MIGRATE_HEADING("\nAfter the drain:"))
        self._show(storage, uploads, expect="remote")
        self._show_ledger(storage, "Ledger after the drain")
        self._fetch(uploads[-1], saved[uploads[-1].file.name])

    def _show(self, storage: QueuedStorage, uploads: list[Upload], expect: str) -> None:
        wrong = []
        for upload in uploads:
            name = upload.file.name
            served_from = "local" if storage.using_local(name) else "remote"
            if served_from != expect:
                wrong.append(name)
            self.stdout.write(
                f"  {name}  {kib(upload.file.size)}  served from: {served_from}  "
                f"{upload.file.url}"
            )
        if wrong:
            raise CommandError(
                f"{len(wrong)} file(s) not served from {expect} storage: "
                + ", ".join(wrong)
            )

    def _show_ledger(self, storage: QueuedStorage, title: str) -> None:
        counts = dict(
            PendingTransfer.objects.filter(storage_key=storage.key)
            .values_list("status")
            .annotate(rows=Count("pk"))
            .order_by()
        )
        line = "  ".join(
            f"{status}={counts.get(status, 0)}" for status in PendingTransfer.Status
        )
        self.stdout.write(f"{title}: {line}")

    def _fetch(self, upload: Upload, expected: bytes) -> None:
        url = upload.file.url
        self.stdout.write(
            self.style.MIGRATE_HEADING(f"\nFetching {upload.file.name} over HTTP:")
        )
        self.stdout.write(f"  GET {url}")
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                body = response.read()
        except OSError as exc:
            raise CommandError(f"Fetching {url} failed: {exc}") from exc
        got, want = hashlib.sha256(body), hashlib.sha256(expected)
        if body != expected:
            raise CommandError(
                f"The remote copy of {upload.file.name} differs from what was saved: "
                f"{len(body)} bytes sha256={got.hexdigest()}, expected "
                f"{len(expected)} bytes sha256={want.hexdigest()}."
            )
        self.stdout.write(
            f"  {len(body)} bytes, sha256 {got.hexdigest()[:16]}…: "
            "identical to the bytes saved."
        )
