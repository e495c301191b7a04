"""Conditional requests to S3 and the requests they save: a remote that refuses to
overwrite an object by itself (S3's ``If-None-Match: *``) saves the request that
asks whether one is there; ``If-Match`` makes S3 refuse an overwrite or a delete
when the object is no longer the one a worker saw before it checked its lease;
and the checksum S3 validated and returned for an upload saves the request that
reads the object's size back.

django-storages' ``S3Storage`` uploads through boto3's transfer manager, which
takes no ``IfNoneMatch`` or ``IfMatch`` argument and returns no response; hooks
on the client add the condition to the ``PutObject`` (or
``CompleteMultipartUpload``) of the keys marked here, and keep the checksums of
their responses, whatever thread the transfer manager sends them from.
"""

from __future__ import annotations

import base64
import sys
import threading
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from django.core.files.storage import Storage

_lock = threading.Lock()
#: Per (bucket, key): the conditions of the uploads under way in this process, in
#: the order they began.
_conditions: dict[tuple[str, str], list[_Condition]] = {}
_HOOK_ID = "queued-storage-condition"
#: (bucket, key) pairs whose upload responses are kept, and what was kept.
_watched: Counter[tuple[str, str]] = Counter()
_responses: dict[tuple[str, str], dict[str, str]] = {}
_WATCH_ID = "queued-storage-upload-checksum"
_CONTEXT_KEY = "queued_storage_upload"


class _Condition:
    """What one upload of a key must find there: no object (``If-None-Match: *``)
    or the object with this ETag (``If-Match``)."""

    def __init__(self, etag: str | None) -> None:
        self.header = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
        self.sent = False


class AmbiguousCondition(Exception):
    """Two uploads of one key in this process want different conditions; the hook
    cannot tell their requests apart, so it sends neither."""


def supports_create_only(storage: Storage) -> bool:
    """Whether uploads to ``storage`` can be made create-only."""
    # Not imported here: an S3Storage instance means its module is loaded, and a
    # worker with other remotes must not pay for importing boto3.
    module = sys.modules.get("storages.backends.s3")
    s3_storage = getattr(module, "S3Storage", None)
    return isinstance(s3_storage, type) and isinstance(storage, s3_storage)


def _add_condition(params: dict[str, Any], **kwargs: Any) -> None:
    target = (params.get("Bucket", ""), params.get("Key", ""))
    with _lock:
        waiting = [c for c in _conditions.get(target, ()) if not c.sent]
        if not waiting:
            return
        if any(c.header != waiting[0].header for c in waiting):
            # The transfer manager sends requests from its own threads: which
            # upload this request belongs to is unknown. Sending it without a
            # condition could let a late upload overwrite a newer one.
            raise AmbiguousCondition(
                f"two uploads of {target[1]!r} with different conditions are under "
                "way in this process; retried later"
            )
        waiting[0].sent = True
    params.update(waiting[0].header)


@contextmanager
def conditional_upload(storage: Storage, name: str, etag: str | None) -> Iterator[None]:
    """Inside the block, an upload of ``name`` to ``storage`` (an ``S3Storage``)
    is sent with ``If-Match: etag`` (``If-None-Match: *`` for None): S3 refuses it
    if the object there is not the one seen (see :func:`refused`)."""
    target = _target(storage, name)
    events = _uploading_client(storage).meta.events
    for operation in ("PutObject", "CompleteMultipartUpload"):
        # unique_id: registered once per client, however many uploads use it.
        events.register(
            f"before-parameter-build.s3.{operation}",
            _add_condition,
            unique_id=f"{_HOOK_ID}-{operation}",
        )
    condition = _Condition(etag)
    with _lock:
        _conditions.setdefault(target, []).append(condition)
    try:
        yield
    finally:
        with _lock:
            _conditions[target].remove(condition)
            if not _conditions[target]:
                del _conditions[target]


def etag_of(storage: Storage, name: str) -> str | None:
    """The ETag of the object at ``name`` on ``storage`` (an ``S3Storage``), or
    None when there is none: what a conditional overwrite or delete expects."""
    bucket, key = _target(storage, name)
    client = storage.connection.meta.client  # type: ignore[attr-defined]
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except Exception as exc:
        response = getattr(exc, "response", None)
        if isinstance(response, dict) and str(
            response.get("Error", {}).get("Code", "")
        ) in {"404", "NoSuchKey", "NotFound"}:
            return None
        raise
    return str(head["ETag"])


def delete_if_match(storage: Storage, name: str, etag: str) -> None:
    """Delete the object at ``name`` on ``storage`` (an ``S3Storage``) only if it
    is still the one with ``etag``; S3 refuses otherwise (see :func:`refused`)."""
    bucket, key = _target(storage, name)
    # The client S3Storage.delete() sends with, as the uploads' (its bucket's).
    _uploading_client(storage).delete_object(Bucket=bucket, Key=key, IfMatch=etag)


def _uploading_client(storage: Storage) -> Any:
    """The client that ``S3Storage`` uploads with: its bucket's, made once by the
    first thread that saved (``connection`` is a client per thread)."""
    return storage.bucket.meta.client  # type: ignore[attr-defined]


def _target(storage: Storage, name: str) -> tuple[str, str]:
    from storages.utils import clean_name

    key = str(storage._normalize_name(clean_name(name)))  # type: ignore[attr-defined]
    return str(storage.bucket_name), key  # type: ignore[attr-defined]


def _note_target(
    params: dict[str, Any], context: dict[str, Any], **kwargs: Any
) -> None:
    target = (params.get("Bucket", ""), params.get("Key", ""))
    with _lock:
        if _watched[target] > 0:
            context[_CONTEXT_KEY] = target


def _keep_checksums(
    http_response: Any, parsed: dict[str, Any], context: dict[str, Any], **kwargs: Any
) -> None:
    target = context.get(_CONTEXT_KEY)
    if target is None or getattr(http_response, "status_code", 500) >= 300:
        return
    checksums = {
        name: str(value)
        for name, value in parsed.items()
        if name.startswith("Checksum") and name != "ChecksumType"
    }
    with _lock:
        if _watched[target] > 0:
            _responses[target] = checksums


class Upload:
    """What S3 answered to an upload watched by :func:`watch_upload`."""

    def __init__(self) -> None:
        self.checksums: dict[str, str] = {}

    def compare(self, storage: Storage, name: str) -> tuple[bool, int] | None:
        """Read ``name`` from ``storage`` (the local file): whether its CRC32 is
        the one S3 validated the upload against and returned, and its size; None
        when S3 returned no CRC32 (a multipart upload, another algorithm, a
        client that sends no checksum)."""
        returned = self.checksums.get("ChecksumCRC32")
        if not returned:
            return None
        crc = size = 0
        with storage.open(name, "rb") as local:
            for chunk in local.chunks():
                crc = zlib.crc32(chunk, crc)
                size += len(chunk)
        ours = base64.b64encode(crc.to_bytes(4, "big")).decode()
        return ours == returned, size


@contextmanager
def watch_upload(storage: Storage, name: str) -> Iterator[Upload]:
    """Inside the block, the checksums in S3's answer to an upload of ``name`` to
    ``storage`` (an ``S3Storage``) are kept; at its end they are in the
    :class:`Upload` it yields."""
    target = _target(storage, name)
    events = _uploading_client(storage).meta.events
    # A single PutObject only: the checksum of a multipart upload's completion
    # may be one of its parts' checksums ("...-3"), not the whole file's.
    events.register(
        "before-parameter-build.s3.PutObject",
        _note_target,
        unique_id=f"{_WATCH_ID}-note",
    )
    events.register(
        "after-call.s3.PutObject", _keep_checksums, unique_id=f"{_WATCH_ID}-keep"
    )
    upload = Upload()
    with _lock:
        _watched[target] += 1
        _responses.pop(target, None)
    try:
        yield upload
    finally:
        with _lock:
            upload.checksums = _responses.pop(target, {})
            _watched[target] -= 1
            if _watched[target] <= 0:
                del _watched[target]


def honours_create_only(storage: Storage) -> bool:
    """Whether the service behind ``storage`` is known to honour ``If-None-Match``:
    AWS S3 itself. An S3-compatible service that ignored it would overwrite."""
    endpoint = str(getattr(storage, "endpoint_url", None) or "")
    return not endpoint or ".amazonaws.com" in endpoint


def never_sent(error: BaseException | None) -> bool:
    """Whether ``error`` (or an error it was raised from) stopped an upload before
    its request left: it wrote nothing."""
    seen = 0
    while error is not None and seen < 5:
        if isinstance(error, AmbiguousCondition):
            return True
        error = error.__cause__ or error.__context__
        seen += 1
    return False


def refused(error: BaseException | None) -> bool:
    """Whether ``error`` (or an error it was raised from) is a conditional request
    that S3 refused: 412 Precondition Failed (an object exists, or another one than
    ``If-Match`` named), 409 while another upload of the key is completing, or 404
    for ``If-Match`` on a key with no object."""
    seen = 0
    while error is not None and seen < 5:
        response = getattr(error, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            if code in {"PreconditionFailed", "ConditionalRequestConflict"}:
                return True
            # If-Match on a key that has no object any more: S3 answers 404.
            if code == "NoSuchKey" and getattr(error, "operation_name", "") in {
                "PutObject",
                "CompleteMultipartUpload",
                "DeleteObject",
            }:
                return True
        error = error.__cause__ or error.__context__
        seen += 1
    return False
