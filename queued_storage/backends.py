"""The storages a site names in its settings: :class:`QueuedStorage` (defined in
:mod:`queued_storage.storage`, the ``Storage`` face, and importable from here as
ever) and one convenience subclass per remote backend, 0.8's removed ones saying
what to do instead."""

from __future__ import annotations

from typing import Any

from queued_storage.configuration import FILE_SYSTEM_STORAGE, warn_deprecated

# The name rules lived here before queued_storage.names; they stay importable.
from queued_storage.names import BAD_CHARACTERS as BAD_CHARACTERS
from queued_storage.names import BIDI_CONTROLS as BIDI_CONTROLS
from queued_storage.names import DEVICE_NAMES as DEVICE_NAMES
from queued_storage.names import MAX_NAME_LENGTH as MAX_NAME_LENGTH
from queued_storage.names import check_name as check_name
from queued_storage.names import clean_name as clean_name
from queued_storage.names import portable_name as portable_name
from queued_storage.storage import MirrorStorage, QueuedStorage

__all__ = [
    "MirrorStorage",
    "QueuedAzureStorage",
    "QueuedCloudFilesStorage",
    "QueuedCouchDBStorage",
    "QueuedDatabaseStorage",
    "QueuedDropboxStorage",
    "QueuedFTPStorage",
    "QueuedFileSystemStorage",
    "QueuedGoogleCloudStorage",
    "QueuedGridFSStorage",
    "QueuedLibCloudStorage",
    "QueuedMogileFSStorage",
    "QueuedS3BotoStorage",
    "QueuedS3Storage",
    "QueuedSFTPStorage",
    "QueuedStorage",
]


class QueuedFileSystemStorage(QueuedStorage):
    """A ``QueuedStorage`` whose local storage is Django's ``FileSystemStorage``."""

    default_local = FILE_SYSTEM_STORAGE


class _QueuedRemoteStorage(QueuedFileSystemStorage):
    """A convenience class for one remote backend. ``remote`` is its first
    argument, then ``local``, as 0.8's ``QueuedS3BotoStorage(remote=..., *args,
    **kwargs)`` had them."""

    def __init__(
        self,
        remote: str | None = None,
        local: str | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__(local, remote, *args, **kwargs)


class QueuedS3Storage(_QueuedRemoteStorage):
    """Files on disk first, then S3 (django-storages' ``S3Storage``)."""

    default_remote = "storages.backends.s3.S3Storage"


class QueuedAzureStorage(_QueuedRemoteStorage):
    """Files on disk first, then Azure Blob Storage."""

    default_remote = "storages.backends.azure_storage.AzureStorage"


class QueuedGoogleCloudStorage(_QueuedRemoteStorage):
    """Files on disk first, then Google Cloud Storage."""

    default_remote = "storages.backends.gcloud.GoogleCloudStorage"


class QueuedSFTPStorage(_QueuedRemoteStorage):
    """Files on disk first, then an SFTP server."""

    default_remote = "storages.backends.sftpstorage.SFTPStorage"


class QueuedFTPStorage(_QueuedRemoteStorage):
    """Files on disk first, then an FTP server (``queued_storage.ftp.FTPStorage``,
    django-storages' made to carry any name)."""

    default_remote = "queued_storage.ftp.FTPStorage"


class QueuedDropboxStorage(_QueuedRemoteStorage):
    """Files on disk first, then Dropbox."""

    default_remote = "storages.backends.dropbox.DropboxStorage"


class QueuedLibCloudStorage(_QueuedRemoteStorage):
    """Files on disk first, then any Apache Libcloud provider."""

    default_remote = "storages.backends.apache_libcloud.LibCloudStorage"


class QueuedS3BotoStorage(QueuedS3Storage):
    """Deprecated name of :class:`QueuedS3Storage`, kept from 0.8."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        warn_deprecated(
            "QueuedS3BotoStorage is deprecated: use QueuedS3Storage (django-storages' "
            "boto3-based S3Storage)."
        )
        super().__init__(*args, **kwargs)


class _RemovedBackend(_QueuedRemoteStorage):
    """A 0.8 class for a backend django-storages no longer ships. It builds, so
    that migrations that froze it import; used without a ``remote=`` that can
    be imported (``default_remote`` is 0.8's path), it says what to do."""

    removed_backend = ""

    def _unusable(self, which: str, value: str, problem: str) -> str:
        if which != "remote" or value != self.default_remote:
            return super()._unusable(which, value, problem)
        return (
            f"{type(self).__name__}: django-storages no longer ships a "
            f"{self.removed_backend} backend ({value!r} cannot be imported). Pass "
            "remote= a dotted path to the Storage class that holds these files now, "
            "or use QueuedStorage(local=..., remote='dotted.path.to.YourStorage')."
        )


class QueuedCouchDBStorage(_RemovedBackend):
    """Removed: django-storages dropped its CouchDB backend."""

    removed_backend = "CouchDB"
    default_remote = "storages.backends.couchdb.CouchDBStorage"


class QueuedDatabaseStorage(_RemovedBackend):
    """Removed: django-storages dropped its database backend."""

    removed_backend = "database"
    default_remote = "storages.backends.database.DatabaseStorage"


class QueuedMogileFSStorage(_RemovedBackend):
    """Removed: django-storages dropped its MogileFS backend."""

    removed_backend = "MogileFS"
    default_remote = "storages.backends.mogile.MogileFSStorage"


class QueuedGridFSStorage(_RemovedBackend):
    """Removed: django-storages dropped its GridFS backend."""

    removed_backend = "GridFS"
    default_remote = "storages.backends.mongodb.GridFSStorage"


class QueuedCloudFilesStorage(_RemovedBackend):
    """Removed: django-storages dropped its CloudFiles backend."""

    removed_backend = "CloudFiles"
    default_remote = "storages.backends.mosso.CloudFilesStorage"
