"""One audit of the audit benchmark's storage in a process of its own, reporting
its time and peak RSS.

``python -m benchmarks.audit_worker audit|list OUTPUT`` (the moto endpoint in
``QUEUED_STORAGE_BENCH_AUDIT_ENDPOINT``): ``audit`` runs ``manage.py
audit_storage --storage bench-audit --json`` into OUTPUT; ``list`` only pages
through the bucket's listing with boto3, the floor no audit can beat. The peak is
the kernel's high-water mark (VmHWM), reset once Django and the code are loaded;
prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import time

from benchmarks.memory_worker import _reset_peak, _status


def main(mode: str, output: str) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.settings")
    import django

    django.setup()
    from django.core.files.storage import storages
    from django.core.management import CommandError, call_command

    from queued_storage.management.commands import audit_storage  # noqa: F401

    storage = storages["audit"]
    remote = storage.remote  # type: ignore[attr-defined]
    client = remote.connection.meta.client
    client.head_bucket(Bucket=remote.bucket_name)  # the client is built
    baseline = _status("VmRSS")
    reset = _reset_peak()
    started = time.perf_counter()
    code = 0
    if mode == "list":
        listed = 0
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(
            Bucket=remote.bucket_name, PaginationConfig={"PageSize": 1000}
        ):
            listed += len(page.get("Contents", ()))
        found: dict[str, object] = {"listed": listed}
    else:
        with open(output, "w") as out, open(os.devnull, "w") as err:
            try:
                call_command(
                    "audit_storage",
                    "--storage",
                    "bench-audit",
                    "--json",
                    stdout=out,
                    stderr=err,
                )
            except CommandError as exc:
                code = exc.returncode
        with open(output) as written:
            found = json.load(written)["counts"]
    seconds = time.perf_counter() - started
    peak = _status("VmHWM")
    print(
        json.dumps(
            {
                "mode": mode,
                "seconds": round(seconds, 2),
                "exit_status": code,
                "baseline_rss_bytes": baseline,
                "peak_rss_bytes": peak,
                "rise_bytes": peak - baseline,
                "peak_source": "VmHWM after clear_refs" if reset else "VmHWM",
                "counts": found,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
