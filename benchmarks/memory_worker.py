"""One transfer of a big file in a process of its own, reporting its peak RSS.
The worker's side runs ``process_transfers`` (``call_command``), as a worker
process would.

``python -m benchmarks.memory_worker fs|s3|s3-tuned queued|raw|raw-thread ROOT
ENDPOINT BUCKET`` (``raw-thread``: the raw save in a new thread, as a drain's
lane makes it, with the client S3Storage builds per thread):
ROOT/local holds ``big.bin`` (the file to move) and ``small.bin`` (moved first,
untimed, so that every code path is loaded before the baseline is read). The
peak is the kernel's high-water mark (VmHWM), reset after the baseline; prints
one JSON line.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
from pathlib import Path
from typing import Any


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def main(target: str, side: str, root: Path, endpoint: str, bucket: str) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.settings")
    import django

    django.setup()
    from django.core.management import call_command

    from benchmarks.harness import s3_options
    from queued_storage.backends import QueuedStorage
    from queued_storage.models import PendingTransfer

    fs = "django.core.files.storage.FileSystemStorage"
    remote_path = fs if target == "fs" else "storages.backends.s3.S3Storage"
    remote_options: dict[str, Any] = (
        {"location": str(root / "remote")}
        if target == "fs"
        else s3_options(endpoint, bucket, location=f"{root.name}-{side}")
    )
    if target == "s3-tuned":
        # The README's S3 example: 8 MiB parts, 4 in flight, 4 read ahead.
        from boto3.s3.transfer import TransferConfig

        transfer = TransferConfig(
            multipart_threshold=8 * 1024 * 1024,
            multipart_chunksize=8 * 1024 * 1024,
            max_concurrency=4,
        )
        transfer.max_in_memory_upload_chunks = 4
        remote_options["transfer_config"] = transfer
    key = f"bench-memory-{root.name}"
    storage = QueuedStorage(
        fs,
        remote_path,
        local_options={"location": str(root / "local")},
        remote_options=remote_options,
        key=key,
    )
    local, remote = storage.local, storage.remote
    size = local.size("big.bin")

    def raw_save(name: str) -> None:
        with local.open(name, "rb") as source:
            remote.save(name, source)

    def move(name: str) -> None:
        if side == "raw":
            raw_save(name)
        elif side == "raw-thread":
            # As a drain does: each in a thread of its own, whose remote builds
            # its own client (S3Storage keeps one per thread).
            thread = threading.Thread(target=raw_save, args=(name,))
            thread.start()
            thread.join()
        else:
            # As a worker process runs it: the command, not drain() alone.
            storage.transfer(name)
            call_command("process_transfers", storages=[key], verbosity=0)
            row = PendingTransfer.objects.get(storage_key=key, name=name)
            assert row.status == PendingTransfer.Status.DONE, row.status

    move("small.bin")
    baseline = _status("VmRSS")
    reset = _reset_peak()
    move("big.bin")
    peak = (
        _status("VmHWM")
        if reset
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    assert remote.size("big.bin") == size
    PendingTransfer.objects.filter(storage_key=key).delete()
    if target == "fs":
        remote.delete("big.bin")
    else:
        remote.delete("big.bin")
        remote.delete("small.bin")
    print(
        json.dumps(
            {
                "side": side,
                "file_bytes": size,
                "baseline_rss_bytes": baseline,
                "peak_rss_bytes": peak,
                "rise_bytes": peak - baseline,
                "peak_source": "VmHWM after clear_refs" if reset else "ru_maxrss",
            }
        )
    )


if __name__ == "__main__":
    target, side, root, endpoint, bucket = sys.argv[1:6]
    main(target, side, Path(root), endpoint, bucket)
