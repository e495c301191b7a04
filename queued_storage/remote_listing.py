"""A remote's files with their sizes, modified times and (where the listing gives
one for free) MD5, in code point order of their names, resumable after a name:
S3 through its paged listing, any other storage by walking ``listdir()``; and
whether the remote reads a listed name as another one."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.core.exceptions import SuspiciousFileOperation, SuspiciousOperation
from django.core.files.storage import Storage

from queued_storage.names import canonical_name, misspelling

#: Keys per S3 listing request (S3's own maximum).
S3_PAGE_SIZE = 1000
#: An ETag that is the object's MD5: a single-part upload without SSE-KMS/C.
MD5_ETAG = re.compile(r'^"?([0-9a-f]{32})"?$')


@dataclass(frozen=True)
class RemoteEntry:
    """One file of a remote's listing. ``size`` and ``modified`` are None when
    the remote does not say; ``md5`` is "" unless the listing gave one."""

    name: str
    size: int | None
    modified: datetime | None
    md5: str = ""


def remote_entries(storage: Storage, after: str = "") -> Iterator[RemoteEntry]:
    """Every file of ``storage`` whose name comes after ``after``, in code point
    order (the order of Python's ``str`` and of S3's UTF-8 listing), so that the
    listing can be merged with the ledger's rows and resumed after any name. A
    storage that cannot list raises NotImplementedError."""
    s3 = _s3_target(storage)
    if s3 is not None:
        return _s3_entries(*s3, after)
    return _walked(storage, after, "")


def read_as_another(storage: Storage, name: str) -> str | None:
    """Why ``storage`` would read its listed file ``name`` as another name (so
    that a delete, HEAD or adoption of it would reach that file), or None when
    the name round-trips: it is canonical, and a django-storages backend's own
    cleaning (``\\`` as ``/``, ``..`` resolved) addresses the key it was listed as."""
    try:
        canonical = canonical_name(name)
    except (ValueError, SuspiciousFileOperation) as exc:
        return f"the name is not one a storage may use: {exc}"
    if canonical != name:
        return f"{name!a} is another spelling of {canonical!a}"
    wrong = misspelling(name)
    if wrong is not None:
        return wrong
    normalize = getattr(storage, "_normalize_name", None)
    if normalize is None:
        return None
    try:
        from storages.utils import clean_name
    except ImportError:
        return None
    s3 = _s3_target(storage)
    try:
        addressed = str(normalize(clean_name(name)))
        listed = s3[2] + name if s3 is not None else str(normalize(name))
    except (ValueError, SuspiciousOperation) as exc:
        return f"the remote refuses the name: {exc}"
    if addressed != listed:
        return f"the remote addresses {listed!a} as {addressed!a}"
    return None


def _s3_target(storage: Storage) -> tuple[Any, str, str] | None:
    """``(client, bucket, key prefix)`` of django-storages' S3Storage, else None."""
    try:
        from storages.backends.s3 import S3Storage
    except ImportError:
        return None
    if not isinstance(storage, S3Storage):
        return None
    location = str(storage.location or "").strip("/")
    prefix = f"{location}/" if location else ""
    return storage.connection.meta.client, str(storage.bucket_name), prefix


def _s3_entries(
    client: Any, bucket: str, prefix: str, after: str
) -> Iterator[RemoteEntry]:
    arguments: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
    if after:
        arguments["StartAfter"] = prefix + after
    pages = client.get_paginator("list_objects_v2").paginate(
        **arguments, PaginationConfig={"PageSize": S3_PAGE_SIZE}
    )
    for page in pages:
        for item in page.get("Contents", ()):
            name = str(item["Key"])[len(prefix) :]
            if not name or name.endswith("/"):
                continue  # a "directory" marker, no file
            md5 = MD5_ETAG.match(str(item.get("ETag", "")))
            yield RemoteEntry(
                name=name,
                size=int(item["Size"]) if "Size" in item else None,
                modified=item.get("LastModified"),
                md5=md5.group(1) if md5 else "",
            )


def _walked(storage: Storage, after: str, top: str) -> Iterator[RemoteEntry]:
    """The files under ``top`` after ``after``: each directory's entries sorted as
    their full names sort (a directory ``d`` as ``d/``), so that the walk yields
    names in code point order."""
    try:
        dirs, files = storage.listdir(top)
    except FileNotFoundError:
        return  # removed while the walk runs
    base = f"{top}/" if top else ""
    children = sorted(
        [(f"{base}{name}", False) for name in files]
        + [(f"{base}{name}/", True) for name in dirs]
    )
    for full, is_dir in children:
        if is_dir:
            # Every name inside starts with ``full``: all of them come after
            # ``after`` when ``full`` does, none when ``after`` is past it.
            if full > after or after.startswith(full):
                yield from _walked(storage, after, full[:-1])
            continue
        if full <= after:
            continue
        entry = _entry(storage, full)
        if entry is not None:
            yield entry


def _entry(storage: Storage, name: str) -> RemoteEntry | None:
    try:
        size: int | None = int(storage.size(name))
    except FileNotFoundError:
        return None
    except NotImplementedError:
        size = None
    try:
        modified: datetime | None = storage.get_modified_time(name)
    except FileNotFoundError:
        return None
    except (NotImplementedError, OSError):
        modified = None
    return RemoteEntry(name=name, size=size, modified=modified)
