"""The worker process's allocator: glibc's mmap threshold pinned, so that the
buffers an upload frees go back to the system instead of staying resident.

glibc serves an allocation above its mmap threshold (128 KiB at start) with a
mapping of its own, unmapped when freed; but the first such block freed raises
the threshold to its size. boto3 reads a multipart upload in parts (8 MiB by
default): after the first part, the next ones come from malloc's arena heaps,
whose freed chunks stay resident in the threads that ran them, so a worker held
one part (8 MiB) more than a single ``remote.save()`` in a fresh process.
Pinning the threshold keeps every part a mapping of its own. Only
``process_transfers`` pins it (its process is the package's); a Celery or
django-q2 worker, which runs the site's other tasks too, is left as it is.
"""

from __future__ import annotations

import ctypes
import logging
import os

from queued_storage.conf import settings as conf

logger = logging.getLogger("queued_storage")

#: ``M_MMAP_THRESHOLD`` in glibc's ``<malloc.h>``.
M_MMAP_THRESHOLD = -3

#: What a site sets to tune glibc's malloc itself: its choice is kept.
GLIBC_MALLOC_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")


def glibc() -> bool:
    """Whether this process runs on glibc (not musl, macOS or Windows)."""
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):  # no confstr, or not this name
        return False
    return bool(version) and str(version).startswith("glibc")


def pin_mmap_threshold() -> bool:
    """Pin glibc's mmap threshold to ``QUEUED_STORAGE_WORKER_MMAP_THRESHOLD``
    bytes; whether it was pinned. A no-op with the setting ``None``, off glibc,
    or where the environment tunes glibc's malloc already."""
    threshold = conf.QUEUED_STORAGE_WORKER_MMAP_THRESHOLD
    if threshold is None or not glibc():
        return False
    if any(name in os.environ for name in GLIBC_MALLOC_ENVIRONMENT):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # a libc without mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    pinned = bool(mallopt(M_MMAP_THRESHOLD, threshold))
    logger.debug("mmap_threshold pinned=%s bytes=%s", pinned, threshold)
    return pinned
