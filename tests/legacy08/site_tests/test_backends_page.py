"""The 0.8 documentation's Backends page, method by method, on the site's models.

Each test is one promise of the 0.8 docs, checked against S3 (moto) as the remote.
"""

from __future__ import annotations

import warnings
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.files.base import ContentFile
from mysite.gallery.models import MyModel, Photo, queued_s3storage
from mysite.transferlog.models import TransferLogEntry
from storages.backends.s3 import S3Storage

from queued_storage import backends
from queued_storage.backends import (
    QueuedFileSystemStorage,
    QueuedS3BotoStorage,
    QueuedStorage,
)
from queued_storage.models import PendingTransfer
from site_tests.conftest import bucket_keys, drain, png, remote_bytes

pytestmark = pytest.mark.django_db(transaction=True)

FS = "django.core.files.storage.FileSystemStorage"


def read(storage: Any, name: str, mode: str = "rb") -> bytes:
    with storage.open(name, mode) as opened:
        data: bytes = opened.read()
    return data


def test_readme_example_works_with_a_deprecation_warning() -> None:
    """QueuedStorage(FileSystemStorage, 'storages.backends.s3boto.S3BotoStorage')
    builds an S3 storage and says which path to use instead."""
    with pytest.warns(DeprecationWarning, match=r"storages\.backends\.s3\.S3Storage"):
        storage = QueuedStorage(FS, "storages.backends.s3boto.S3BotoStorage")
        remote = storage.remote
    assert isinstance(remote, S3Storage)


def test_saved_file_is_served_locally_then_from_the_remote(s3: Any) -> None:
    """save() writes locally; until the worker ran, get_storage/using_local/url/
    path/open/size/exists use the local copy; after it, the remote's."""
    obj = MyModel.objects.create(image=png(name="hello.png"))
    name = obj.image.name
    storage = queued_s3storage
    assert storage.using_local(name) and not storage.using_remote(name)
    assert storage.get_storage(name) is storage.local
    assert storage.url(name) == f"/media/{name}"
    assert storage.path(name).startswith(settings.MEDIA_ROOT)
    assert storage.exists(name)
    data = read(storage, name)
    assert storage.size(name) == len(data)
    assert bucket_keys(s3) == []

    drain()

    assert storage.using_remote(name) and not storage.using_local(name)
    assert storage.get_storage(name) is storage.remote
    assert storage.url(name).startswith(f"{settings.AWS_S3_ENDPOINT_URL}/")
    assert read(storage, name) == data == remote_bytes(s3, name)
    assert storage.size(name) == len(data)
    assert storage.exists(name)
    # Transfer (the default task) keeps the local copy.
    assert storage.local.exists(name)


def test_file_transferred_receiver_logs_each_transfer() -> None:
    """The Signals page's log_file_transferred receiver, word for word, gets
    name, local and remote once the file is on the remote."""
    obj = MyModel.objects.create(image=png(name="logged.png"))
    assert not TransferLogEntry.objects.exists()

    drain()

    entry = TransferLogEntry.objects.get()
    assert entry.name == obj.image.name
    # A presigned URL: its expiry (and signature) follow the second it is made
    # in, so the receiver's and this one differ in the query alone.
    logged, expected = (
        urlsplit(entry.remote_url),
        urlsplit(queued_s3storage.remote.url(obj.image.name)),
    )
    assert logged._replace(query="") == expected._replace(query="")
    assert sorted(parse_qs(logged.query)) == sorted(parse_qs(expected.query))
    assert entry.remote_url.startswith(settings.AWS_S3_ENDPOINT_URL)


def test_transfer_and_delete_removes_the_local_copy(s3: Any) -> None:
    """The Tasks page's s3_delete_storage: once on S3 the local copy is gone and
    the ImageField reads the image back from S3."""
    photo = Photo.objects.create(image=png(4, 3, name="beach.png"))
    name = photo.image.name
    storage = photo.image.storage
    assert (photo.width, photo.height) == (4, 3)
    assert storage.local.exists(name)

    drain()

    assert not storage.local.exists(name)
    assert name in bucket_keys(s3)
    # A fresh instance reads the image through the storage, from S3.
    again = Photo.objects.get(pk=photo.pk)
    assert again.image.storage.using_remote(name)
    assert (again.image.width, again.image.height) == (4, 3)


def test_get_cache_key_uses_the_cache_prefix_setting() -> None:
    """get_cache_key(name) is still QUEUED_STORAGE_CACHE_PREFIX + the quoted name
    (nothing is cached under it any more)."""
    assert queued_s3storage.cache_prefix == "mysite_files"
    assert queued_s3storage.get_cache_key("a b/c.png") == "mysite_files_a%20b/c.png"
    own = QueuedStorage(FS, FS, cache_prefix="own", key="own-prefix")
    assert own.get_cache_key("x") == "own_x"


def test_transfer_takes_a_cache_key_and_returns_a_bool() -> None:
    """transfer(name, cache_key=None) as 0.8 called it: it answers whether it
    queued the file (0.8 returned the Celery result)."""
    storage = queued_s3storage
    name = storage.save("manual.txt", ContentFile(b"manual"))
    drain()
    # Already transferred: nothing to queue.
    assert storage.transfer(name, storage.get_cache_key(name)) is False
    assert storage.transfer(name, cache_key=storage.get_cache_key(name)) is False
    storage.local.save("from-before.txt", ContentFile(b"old"))
    # A local file without a row (saved before the switch) is queued.
    assert storage.transfer("from-before.txt") is True
    drain()
    assert storage.using_remote("from-before.txt")


def test_open_reads_and_refuses_write_modes() -> None:
    """open(name, mode='rb') reads; a write mode is refused, since a write that
    bypasses save() would never reach the ledger."""
    name = queued_s3storage.save("read.txt", ContentFile(b"text"))
    assert read(queued_s3storage, name, "rb") == b"text"
    assert read(queued_s3storage, name, "r") == "text"  # type: ignore[comparison-overlap]
    for mode in ("wb", "ab", "r+b", "xb"):
        with pytest.raises(ValueError, match="reading only"):
            queued_s3storage.open(name, mode)


def test_get_available_name_is_free_locally_and_remotely(s3: Any) -> None:
    """A second save of a name gets another one; so does a name that only the
    remote has."""
    first = queued_s3storage.save("same.txt", ContentFile(b"1"))
    second = queued_s3storage.save("same.txt", ContentFile(b"2"))
    assert first == "same.txt" and second != first
    s3.put_object(
        Bucket=settings.AWS_STORAGE_BUCKET_NAME, Key="remote-only.txt", Body=b"old"
    )
    assert queued_s3storage.get_available_name("remote-only.txt") != "remote-only.txt"


def test_listdir_lists_local_and_transferred_files() -> None:
    storage = queued_s3storage
    storage.save("docs/sent.txt", ContentFile(b"sent"))
    drain()
    storage.local.delete("docs/sent.txt")  # as TransferAndDelete would
    storage.save("docs/waiting.txt", ContentFile(b"waiting"))
    dirs, files = storage.listdir("docs")
    assert dirs == [] and files == ["sent.txt", "waiting.txt"]
    assert storage.listdir("")[0] == ["docs"]


def test_delete_removes_the_local_and_the_remote_copy(s3: Any) -> None:
    storage = queued_s3storage
    sent = storage.save("sent.txt", ContentFile(b"sent"))
    drain()
    waiting = storage.save("waiting.txt", ContentFile(b"waiting"))
    assert bucket_keys(s3) == ["sent.txt"]

    storage.delete(sent)
    storage.delete(waiting)

    assert not storage.exists(sent) and not storage.exists(waiting)
    assert not storage.local.exists(sent) and not storage.local.exists(waiting)
    assert bucket_keys(s3) == []
    drain()
    assert bucket_keys(s3) == []


def test_time_methods_are_the_get_ones() -> None:
    """get_accessed_time/get_created_time/get_modified_time work;
    accessed_time/created_time/modified_time left Django's Storage in 2.0."""
    name = queued_s3storage.save("times.txt", ContentFile(b"t"))
    for method in ("get_accessed_time", "get_created_time", "get_modified_time"):
        assert isinstance(getattr(queued_s3storage, method)(name), datetime)
    drain()
    assert isinstance(queued_s3storage.get_modified_time(name), datetime)
    for gone in ("accessed_time", "created_time", "modified_time"):
        assert not hasattr(queued_s3storage, gone)


def test_get_valid_name_and_generate_filename() -> None:
    assert queued_s3storage.get_valid_name("my photo!.png") == "my_photo.png"
    assert queued_s3storage.generate_filename("a/my photo.png") == "a/my_photo.png"


def test_convenience_classes_take_remote_first() -> None:
    """QueuedS3BotoStorage(remote=..., *args) and QueuedFileSystemStorage(local=...,
    *args) as 0.8 defined them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        boto = QueuedS3BotoStorage("storages.backends.s3.S3Storage", key="boto-first")
    assert isinstance(boto.remote, S3Storage)
    assert type(boto.local).__name__ == "FileSystemStorage"
    filesystem = QueuedFileSystemStorage(
        FS, "storages.backends.s3.S3Storage", key="fs-first"
    )
    assert type(filesystem.local).__name__ == "FileSystemStorage"
    assert isinstance(filesystem.remote, S3Storage)


@pytest.mark.parametrize(
    ("name", "backend"),
    [
        ("QueuedCouchDBStorage", "CouchDB"),
        ("QueuedDatabaseStorage", "database"),
        ("QueuedMogileFSStorage", "MogileFS"),
        ("QueuedGridFSStorage", "GridFS"),
        ("QueuedCloudFilesStorage", "CloudFiles"),
    ],
)
def test_removed_backends_import_and_fail_at_first_use(name: str, backend: str) -> None:
    """The classes for backends django-storages dropped still build (old
    migrations serialised them) and fail with a reason when used."""
    storage = getattr(backends, name)()
    with pytest.raises(ImproperlyConfigured, match=backend):
        storage.save("x.txt", ContentFile(b"x"))
    assert not PendingTransfer.objects.exists()
