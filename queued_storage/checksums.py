"""SHA-256 of a file as it is saved, and of the remote copy, for verification;
MD5, to compare with what a listing gives."""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterator
from typing import Any

from django.core.files import File
from django.core.files.storage import Storage

CHUNK_SIZE = 1024 * 1024


class CountingFile(File):  # type: ignore[type-arg]
    """Wraps upload content and counts the bytes the local storage reads: what
    ``size`` says may count characters, be wrong or be unknown."""

    def __init__(self, content: Any) -> None:
        super().__init__(content, getattr(content, "name", None))
        self.source = content
        self.counted = 0
        #: A chunk came as ``str``: the local storage chose its encoding, so the
        #: count is not the size on disk.
        self.text = False

    def _feed(self, data: Any) -> Any:
        if isinstance(data, str):
            self.text = True
            data = data.encode()
        self.counted += len(data)
        return data

    def chunks(self, chunk_size: int | None = None) -> Iterator[Any]:
        for chunk in self.source.chunks(chunk_size):
            self._feed(chunk)
            yield chunk

    def read(self, *args: Any) -> Any:
        data = self.source.read(*args)
        self._feed(data)
        return data

    @property
    def size(self) -> int:
        return int(self.source.size)


class HashingFile(CountingFile):
    """Wraps upload content and hashes every byte the local storage reads."""

    def __init__(self, content: Any) -> None:
        super().__init__(content)
        self.hasher = hashlib.sha256()

    def _feed(self, data: Any) -> Any:
        chunk = super()._feed(data)
        self.hasher.update(chunk)
        return chunk

    @property
    def hashed(self) -> int:
        return self.counted

    def hexdigest(self) -> str:
        return self.hasher.hexdigest()


def storage_sha256(storage: Storage, name: str) -> str:
    """Stream ``name`` from ``storage`` and return its SHA-256."""
    hasher = hashlib.sha256()
    body = _s3_body(storage, name)
    if body is not None:
        # S3Storage.open() buffers the whole object (max_memory_size=0): read the
        # response stream instead.
        for chunk in body.iter_chunks(CHUNK_SIZE):
            hasher.update(chunk)
        return hasher.hexdigest()
    with storage.open(name, "rb") as opened:
        for chunk in opened.chunks(CHUNK_SIZE):
            hasher.update(chunk.encode() if isinstance(chunk, str) else chunk)
    return hasher.hexdigest()


def storage_md5(storage: Storage, name: str) -> str:
    """Stream ``name`` from ``storage`` and return its MD5 (what S3's ETag of a
    single-part upload is), to compare with a listing's."""
    hasher = hashlib.md5(usedforsecurity=False)
    with storage.open(name, "rb") as opened:
        for chunk in opened.chunks(CHUNK_SIZE):
            hasher.update(chunk.encode() if isinstance(chunk, str) else chunk)
    return hasher.hexdigest()


def remote_sha256(storage: Storage, name: str) -> str:
    """The remote copy's SHA-256: the service's own when it keeps a full-object
    SHA-256 (S3 with ``ChecksumAlgorithm=SHA256``), else a streamed re-read."""
    stored = _s3_sha256(storage, name)
    return stored if stored is not None else storage_sha256(storage, name)


def _s3_key(storage: Storage, name: str) -> str | None:
    """The object key of ``name`` if ``storage`` is django-storages' S3Storage."""
    try:
        from storages.backends.s3 import S3Storage
        from storages.utils import clean_name
    except ImportError:
        return None
    if not isinstance(storage, S3Storage):
        return None
    return str(storage._normalize_name(clean_name(name)))


def _s3_body(storage: Storage, name: str) -> Any:
    key = _s3_key(storage, name)
    if key is None:
        return None
    client = storage.connection.meta.client  # type: ignore[attr-defined]
    return client.get_object(Bucket=storage.bucket_name, Key=key)["Body"]  # type: ignore[attr-defined]


def _s3_sha256(storage: Storage, name: str) -> str | None:
    key = _s3_key(storage, name)
    if key is None:
        return None
    head = storage.connection.meta.client.head_object(  # type: ignore[attr-defined]
        Bucket=storage.bucket_name,  # type: ignore[attr-defined]
        Key=key,
        ChecksumMode="ENABLED",
    )
    value = head.get("ChecksumSHA256")
    # A multipart upload's checksum is a checksum of checksums ("...-N"), and
    # "COMPOSITE" types are not the file's SHA-256: re-read those.
    if not value or "-" in value or head.get("ChecksumType") == "COMPOSITE":
        return None
    try:
        return base64.b64decode(value).hex()
    except (binascii.Error, ValueError):
        return None
