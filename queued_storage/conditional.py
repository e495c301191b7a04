"""Create-only uploads: a remote that refuses to overwrite an object by itself
(S3's ``If-None-Match: *``) saves the request that asks whether one is there.

django-storages' ``S3Storage`` uploads through boto3's transfer manager, which
takes no ``IfNoneMatch`` argument; a hook on the client adds it to the
``PutObject`` (or ``CompleteMultipartUpload``) of the keys marked here, whatever
thread the transfer manager sends it from.
"""

from __future__ import annotations

import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from django.core.files.storage import Storage

_lock = threading.Lock()
#: (bucket, key) pairs whose next upload must not overwrite an object.
_create_only: Counter[tuple[str, str]] = Counter()
_HOOK_ID = "queued-storage-if-none-match"


def supports_create_only(storage: Storage) -> bool:
    """Whether uploads to ``storage`` can be made create-only."""
    # Not imported here: an S3Storage instance means its module is loaded, and a
    # worker with other remotes must not pay for importing boto3.
    module = sys.modules.get("storages.backends.s3")
    s3_storage = getattr(module, "S3Storage", None)
    return isinstance(s3_storage, type) and isinstance(storage, s3_storage)


def _add_if_none_match(params: dict[str, Any], **kwargs: Any) -> None:
    with _lock:
        marked = _create_only[(params.get("Bucket", ""), params.get("Key", ""))] > 0
    if marked:
        params["IfNoneMatch"] = "*"


@contextmanager
def create_only(storage: Storage, name: str) -> Iterator[None]:
    """Inside the block, an upload of ``name`` to ``storage`` (an ``S3Storage``)
    fails with HTTP 412 if an object is already there: see :func:`refused`."""
    from storages.utils import clean_name

    key = str(storage._normalize_name(clean_name(name)))  # type: ignore[attr-defined]
    bucket = str(storage.bucket_name)  # type: ignore[attr-defined]
    events = storage.connection.meta.client.meta.events  # type: ignore[attr-defined]
    for operation in ("PutObject", "CompleteMultipartUpload"):
        # unique_id: registered once per client, however many uploads use it.
        events.register(
            f"before-parameter-build.s3.{operation}",
            _add_if_none_match,
            unique_id=f"{_HOOK_ID}-{operation}",
        )
    with _lock:
        _create_only[(bucket, key)] += 1
    try:
        yield
    finally:
        with _lock:
            _create_only[(bucket, key)] -= 1
            if _create_only[(bucket, key)] <= 0:
                del _create_only[(bucket, key)]


def honours_create_only(storage: Storage) -> bool:
    """Whether the service behind ``storage`` is known to honour ``If-None-Match``:
    AWS S3 itself. An S3-compatible service that ignored it would overwrite."""
    endpoint = str(getattr(storage, "endpoint_url", None) or "")
    return not endpoint or ".amazonaws.com" in endpoint


def refused(error: BaseException | None) -> bool:
    """Whether ``error`` (or an error it was raised from) is a create-only upload
    refused because an object exists: S3 answers 412 Precondition Failed, or 409
    while another upload of the key is completing."""
    seen = 0
    while error is not None and seen < 5:
        response = getattr(error, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            if code in {"PreconditionFailed", "ConditionalRequestConflict"}:
                return True
        error = error.__cause__ or error.__context__
        seen += 1
    return False
