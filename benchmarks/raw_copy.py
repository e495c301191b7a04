"""The floor of the drain benchmark as a process of its own, as a site's script
would run it: ``python benchmarks/raw_copy.py LOCAL REMOTE NAMES`` sets Django up
with the benchmark settings (the same site as ``manage.py process_transfers``)
and copies every name listed in the file NAMES with
``remote.save(name, local.open(name))`` between two ``FileSystemStorage``.

Nothing is flushed here, as ``process_transfers`` flushes none of its files: the
runner writes dirty pages out (``os.sync()``) after either process, inside the
timing."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from django.core.files.storage import FileSystemStorage


def site_storages(
    local_root: str, remote_root: str
) -> tuple[FileSystemStorage, FileSystemStorage]:
    """Set Django up with the benchmark settings (the site of
    ``manage.py process_transfers``); the local and the remote storage."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.settings")
    import django

    django.setup()
    from django.core.files.storage import FileSystemStorage

    local = FileSystemStorage(location=local_root, base_url="/media/")
    return local, FileSystemStorage(location=remote_root)


def main(argv: list[str]) -> int:
    local_root, remote_root, names_file = argv
    local, remote = site_storages(local_root, remote_root)
    with open(names_file) as handle:
        names = handle.read().split("\n")
    for name in names:
        with local.open(name, "rb") as source:
            remote.save(name, source)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
