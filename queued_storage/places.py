"""Where a storage argument writes, as far as its spelling can say: the same place
spelled two ways (a ``STORAGES`` alias and what it stands for, a trailing slash,
a path with ``.`` or ``..`` in it, two import paths of one class) gives the same
answer, so that no mirror is its own storage's remote or local side under
another spelling. Read from the arguments alone: nothing is built or imported."""

from __future__ import annotations

import os
from typing import Any

from django.conf import settings

#: Import paths that name one class, each to the one that stands for them all.
SAME_CLASS = {
    "django.core.files.storage.filesystem.FileSystemStorage": (
        "django.core.files.storage.FileSystemStorage"
    ),
    "storages.backends.s3boto3.S3Boto3Storage": "storages.backends.s3.S3Storage",
    "storages.backends.s3.S3Boto3Storage": "storages.backends.s3.S3Storage",
}
#: Classes whose ``location`` is a directory on this host (MEDIA_ROOT by default).
DIRECTORY_CLASSES = {"django.core.files.storage.FileSystemStorage"}

Place = tuple[str, tuple[tuple[str, Any], ...]]


def place(storage: str, options: dict[str, Any] | None) -> Place:
    """``storage`` (an alias or a dotted path) and ``options``, spelled one way:
    the alias resolved, the class's import path made the usual one, and each
    option that is a path or a URL without a trailing slash (a directory
    ``location`` made absolute and real). Options that are not strings are kept
    as they are; an option given its default is not known to be one."""
    entry = getattr(settings, "STORAGES", {}).get(storage)
    if isinstance(entry, dict) and isinstance(entry.get("BACKEND"), str):
        storage, options = entry["BACKEND"], entry.get("OPTIONS")
    path = SAME_CLASS.get(storage, storage)
    found = dict(options or {})
    if path in DIRECTORY_CLASSES:
        location = found.get("location") or settings.MEDIA_ROOT
        if isinstance(location, (str, os.PathLike)):
            found["location"] = os.path.realpath(os.path.abspath(location))
    return path, tuple(sorted((str(k), _spelled_one_way(v)) for k, v in found.items()))


def _spelled_one_way(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.endswith("/") or not value.strip("/"):
        return _hashable(value)
    return value.rstrip("/")


def _hashable(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((str(k), _hashable(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value
