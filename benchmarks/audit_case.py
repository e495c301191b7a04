"""audit_storage on S3 (moto on loopback) with 10,000 and then 100,000 objects:
the time of the audit and its peak RSS, each in a process of its own, against
the time of the bare paged listing. The memory must not grow with the number of
objects.

moto's threaded server runs in this process, and the bucket is filled through
moto's backend directly (a PUT over HTTP each would take minutes); the ledger
rows and the references (benchapp's AuditedDoc) are bulk inserted. Of every 100
objects: one orphan (no row, no reference), one whose row has another size, one
row without a reference, one row done whose object is missing; of every 1,000,
one reference without any file.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from django.utils import timezone

from benchmarks.harness import ROOT, scratch
from queued_storage.ledger_sql import name_hash, new_generation
from queued_storage.models import PendingTransfer

KEY = "bench-audit"
BUCKET = "bench-audit"
#: The number of objects of each audit: the bucket grows from one to the next
#: (``QUEUED_STORAGE_BENCH_AUDIT_STEPS=1000,5000`` for a quick look).
STEPS = tuple(
    int(step)
    for step in os.environ.get(
        "QUEUED_STORAGE_BENCH_AUDIT_STEPS", "10000,100000"
    ).split(",")
)
#: The target: the audit's memory does not grow with the bucket (MiB more at
#: the last step than at the first).
TARGET_GROWTH_MIB = 20


@contextmanager
def moto_in_process() -> Iterator[tuple[str, Any]]:
    """moto's S3 on 127.0.0.1 (a free port) in this process; yields its endpoint
    and its backend, to fill buckets without HTTP."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}", s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    finally:
        server.stop()


def expected(n: int) -> dict[str, int]:
    return {
        "orphan": n // 100,
        "size_mismatch": n // 100,
        "unreferenced_row": n // 100,
        "missing_remote": n // 100,
        "missing_file": n // 1000,
    }


def _seed(backend: Any, start: int, stop: int) -> None:
    """Objects, rows and references of numbers ``start`` to ``stop``."""
    from benchmarks.benchapp.models import AuditedDoc

    now = timezone.now()
    rows: list[PendingTransfer] = []
    docs: list[AuditedDoc] = []
    for number in range(start, stop):
        name = f"docs/{number:07d}.bin"
        size = 100 + number % 50
        kind = number % 100
        missing_file = number % 1000 == 4
        if kind != 3 and not missing_file:
            backend.put_object(BUCKET, name, b"x" * size, disable_notification=True)
        if kind != 0 and not missing_file:
            rows.append(
                PendingTransfer(
                    storage_key=KEY,
                    name=name,
                    name_hash=name_hash(name),
                    status=PendingTransfer.Status.DONE,
                    generation=new_generation(),
                    remote_owned=True,
                    next_attempt_at=None,
                    size=size + (kind == 1),
                    created_at=now,
                    updated_at=now,
                    transferred_at=now,
                )
            )
        if kind not in (0, 2):
            docs.append(AuditedDoc(file=name))
        if len(rows) >= 5000:
            PendingTransfer.objects.bulk_create(rows)
            rows = []
        if len(docs) >= 5000:
            AuditedDoc.objects.bulk_create(docs)
            docs = []
    PendingTransfer.objects.bulk_create(rows)
    AuditedDoc.objects.bulk_create(docs)


def _worker(mode: str, endpoint: str, output: Path) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env["QUEUED_STORAGE_BENCH_AUDIT_ENDPOINT"] = endpoint
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.audit_worker", mode, str(output)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=3600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"audit worker failed: {done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def case_audit(sizes: Any) -> list[dict[str, Any]]:
    from benchmarks.benchapp.models import AuditedDoc
    from benchmarks.cases import figure

    mib = 1024 * 1024
    steps: list[dict[str, Any]] = []
    PendingTransfer.objects.filter(storage_key=KEY).delete()
    AuditedDoc.objects.all().delete()
    with scratch("audit") as root, moto_in_process() as (endpoint, backend):
        backend.create_bucket(BUCKET, "us-east-1")
        seeded = 0
        for n in STEPS:
            _seed(backend, seeded, n)
            seeded = n
            floor = _worker("list", endpoint, root / "listed.json")
            audited = _worker("audit", endpoint, root / f"audit-{n}.json")
            counts = audited["counts"]
            wrong = {
                kind: (counts[kind], number)
                for kind, number in expected(n).items()
                if counts[kind] != number
            }
            if wrong or counts["listed"] != floor["counts"]["listed"]:
                raise RuntimeError(f"the audit of {n} objects found {wrong}: {counts}")
            steps.append(
                {
                    "objects": n,
                    "audit_seconds": audited["seconds"],
                    "listing_seconds": floor["seconds"],
                    "audit_peak_rss_mib": round(audited["peak_rss_bytes"] / mib, 1),
                    "audit_rise_mib": round(audited["rise_bytes"] / mib, 1),
                    "listing_rise_mib": round(floor["rise_bytes"] / mib, 1),
                    "exit_status": audited["exit_status"],
                    "counts": {k: v for k, v in counts.items() if k != "errors"},
                }
            )
    PendingTransfer.objects.filter(storage_key=KEY).delete()
    AuditedDoc.objects.all().delete()
    first, last = steps[0], steps[-1]
    growth = last["audit_rise_mib"] - first["audit_rise_mib"]
    return [
        figure(
            f"audit_storage of {last['objects']} S3 objects (moto): time",
            target="reported",
            measured=last["audit_seconds"] * 1000,
            unit="ms (whole audit)",
            passed=None,
            steps=steps,
        ),
        figure(
            f"audit_storage peak RSS rise, {first['objects']} -> {last['objects']} "
            "objects",
            target=f"grows <= {TARGET_GROWTH_MIB} MiB",
            measured=last["audit_rise_mib"],
            unit="MiB (peak RSS rise)",
            passed=growth <= TARGET_GROWTH_MIB,
            growth_mib=round(growth, 1),
            steps=steps,
        ),
    ]
