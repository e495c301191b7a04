"""An S3 API over HTTP on loopback (moto's threaded server) for the S3 tests, and
the late worker's race they run against it."""

from __future__ import annotations

import base64
import re
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from django.core.files.base import ContentFile
from django.db import connections
from django.utils import timezone

from queued_storage.backends import QueuedStorage
from queued_storage.errors import Outcome
from queued_storage.models import PendingTransfer
from queued_storage.transfer import process_row
from queued_storage.worker import drain
from tests.servers import ROOT, server_process, wait_for

T = TypeVar("T")

S3_OPTIONS: dict[str, Any] = {
    "access_key": "testing",
    "secret_key": "testing",
    "region_name": "us-east-1",
    "addressing_style": "path",
}


@contextmanager
def moto_s3_server() -> Iterator[str]:
    """Start moto on 127.0.0.1 with a free port; yield its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def make_bucket(endpoint: str) -> str:
    import boto3

    name = f"bucket-{uuid.uuid4().hex[:12]}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=name)
    return name


def s3_client(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )


def hold_first_request(
    storage: QueuedStorage,
    operations: tuple[str, ...],
    work: Callable[[], T],
    meanwhile: Callable[[], object],
    seen: Callable[[dict[str, Any]], object] | None = None,
) -> T:
    """Run ``work`` in a thread of its own and hold the first request of
    ``operations`` (S3 operation names: ``"PutObject"``) that the storage's S3
    client sends, until ``meanwhile()`` has run here; what ``work`` returned.
    ``seen`` gets the held request's parameters. A request is built, and the
    lease checked, before it is sent: this is the moment a late worker stops."""
    sent = threading.Event()
    resume = threading.Event()

    def hold(params: dict[str, Any], **kwargs: Any) -> None:
        if not sent.is_set():  # the first one sent: work's
            if seen is not None:
                seen(params)
            sent.set()
            assert resume.wait(timeout=30)

    def in_its_thread() -> T:
        try:
            return work()
        finally:
            sent.set()
            connections.close_all()

    # S3Storage sends with its bucket's client, whichever thread saves.
    events = storage.remote.bucket.meta.client.meta.events  # type: ignore[attr-defined]
    for operation in operations:
        events.register(f"before-call.s3.{operation}", hold)
    with ThreadPoolExecutor(max_workers=1) as pool:
        outcome = pool.submit(in_its_thread)
        assert sent.wait(timeout=30), "work sent none of its requests"
        assert not outcome.done()
        try:
            meanwhile()
        finally:
            resume.set()
        return outcome.result(timeout=30)


def late_worker_outcome(
    storage: QueuedStorage,
    operations: tuple[str, ...],
    name: str = "doc.txt",
    versions: tuple[bytes, bytes, bytes] = (b"first", b"second", b"the newest"),
    seen: Callable[[dict[str, Any]], object] | None = None,
    claimed: Callable[[], object] | None = None,
) -> Outcome:
    """The late worker's race: ``name`` is saved and transferred, then saved
    again; a worker claims that second version and stops at its first request of
    ``operations``. Meanwhile its lease runs out, another worker transfers the
    row, and a newest version is saved and transferred. Returns the late
    worker's outcome once it went on. ``seen`` gets the held request's
    parameters; ``claimed()`` runs once the late worker claimed its row."""
    first, second, newest = versions
    storage.save(name, ContentFile(first))
    assert drain(keys=[storage.key]).done == 1
    storage.save(name, ContentFile(second))
    [late] = PendingTransfer.objects.claim_due(limit=1, lease=300)
    if claimed is not None:
        claimed()

    def take_over() -> None:
        PendingTransfer.objects.filter(pk=late.pk).update(
            lease_expires_at=timezone.now() - timedelta(seconds=1)
        )
        assert drain(keys=[storage.key]).done == 1
        storage.save(name, ContentFile(newest))
        assert drain(keys=[storage.key]).done == 1

    return hold_first_request(
        storage, operations, lambda: process_row(late), take_over, seen
    )


#: moto's S3 API alone (no dispatch between moto's services: a third of each
#: request's time in a test of thousands) in a process of its own, with the
#: buckets and objects listed in the file ``sys.argv[1]`` (lines of bucket,
#: key and base64 data, tab-separated; a bucket alone on a line is created)
#: made before it listens.
SEEDED_MOTO_CHILD = """
import base64, sys, threading
from moto.core import DEFAULT_ACCOUNT_ID
from moto.moto_server.werkzeug_app import MotoRequestHandler, create_backend_app
from moto.s3.models import s3_backends
from werkzeug.serving import make_server

class Quiet(MotoRequestHandler):
    def log_request(self, *args, **kwargs):
        pass

backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
with open(sys.argv[1]) as seed:
    for line in seed:
        bucket, _, rest = line.rstrip("\\n").partition("\\t")
        if not rest:
            backend.create_bucket(bucket, "us-east-1")
            continue
        key, _, data = rest.partition("\\t")
        backend.put_object(bucket, key, base64.b64decode(data))
server = make_server(
    "127.0.0.1", 0, create_backend_app("s3"), threaded=True, request_handler=Quiet
)
threading.Thread(target=server.serve_forever, daemon=True).start()
print("listening on http://127.0.0.1:%s" % server.server_port, flush=True)
sys.stdin.read()
server.shutdown()
"""


@contextmanager
def seeded_moto_s3(seed: Path, buckets: dict[str, dict[str, bytes]]) -> Iterator[str]:
    """moto's S3 API in a process of its own with ``buckets`` (bucket: key:
    bytes) already filled (written to the file ``seed`` first: thousands of
    objects in a second, not a PUT each); yields its endpoint URL."""
    with seed.open("w") as out:
        for bucket, objects in buckets.items():
            out.write(f"{bucket}\n")
            for key, data in objects.items():
                out.write(f"{bucket}\t{key}\t{base64.b64encode(data).decode()}\n")
    command = [sys.executable, "-c", SEEDED_MOTO_CHILD, str(seed)]
    with server_process(command, str(ROOT), stdin=True) as lines:
        yield wait_for(
            lines, re.compile(r"listening on (http://127\.0\.0\.1:\d+)"), "moto"
        )
