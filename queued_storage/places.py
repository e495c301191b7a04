"""Where a storage argument writes, so that no mirror is its own storage's remote
or local side under another spelling. For the storages whose place is known (a
directory; a bucket or container and the prefix in it; an FTP or SFTP root) it
is that, with the settings' defaults filled in, whatever else the options say (a
base URL, a custom domain, file modes); two subclasses of one such storage in
the same place are the same place. For any other storage, its options with the
defaults the class reads from settings, each path or URL without a trailing
slash: another option there makes another place."""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

from django.conf import settings
from django.core.files.storage import FileSystemStorage
from django.utils.module_loading import import_string

#: For each storage whose place is known: its options that say where it writes.
PLACE_OPTIONS: dict[str, tuple[str, ...]] = {
    "storages.backends.s3.S3Storage": ("endpoint_url", "bucket_name", "location"),
    "storages.backends.gcloud.GoogleCloudStorage": (
        "custom_endpoint",
        "bucket_name",
        "location",
    ),
    "storages.backends.azure_storage.AzureStorage": (
        "account_name",
        "connection_string",
        "azure_container",
        "location",
    ),
    "storages.backends.ftp.FTPStorage": ("location",),
    "storages.backends.sftpstorage.SFTPStorage": ("host", "port", "root_path"),
}
#: Options compared without case (a host name).
NO_CASE = {"endpoint_url", "custom_endpoint", "host"}

Place = tuple[Any, ...]


def place(storage: str, options: dict[str, Any] | None) -> Place:
    """Where ``storage`` (an alias or a dotted path) with ``options`` writes, as
    far as its arguments say. Nothing is built; a class that cannot be imported
    is compared by its path and options as given."""
    entry = getattr(settings, "STORAGES", {}).get(storage)
    if isinstance(entry, dict) and isinstance(entry.get("BACKEND"), str):
        storage, options = entry["BACKEND"], entry.get("OPTIONS")
    given = dict(options or {})
    storage_class = _import(storage)
    if storage_class is None:
        return ("as given", storage, _spelled_one_way(given))
    if issubclass(storage_class, FileSystemStorage):
        # As FileSystemStorage: MEDIA_ROOT only for no location (None), and
        # relative to the working directory ('' is the working directory).
        location = given.get("location")
        if location is None:
            location = settings.MEDIA_ROOT
        return ("directory", os.path.realpath(os.path.abspath(location)))
    found = {**_defaults(storage_class), **given}
    for family, fields in PLACE_OPTIONS.items():
        base = _import(family)
        if base is not None and issubclass(storage_class, base):
            return (family, tuple(_where(field, found.get(field)) for field in fields))
    return (
        "as given",
        f"{storage_class.__module__}.{storage_class.__qualname__}",
        _spelled_one_way(found),
    )


@lru_cache(maxsize=64)
def _import(path: str) -> type | None:
    try:
        found = import_string(path)
    except Exception:  # what cannot be imported is compared as given
        return None
    return found if isinstance(found, type) else None


def _defaults(storage_class: type) -> dict[str, Any]:
    """What a django-storages backend reads from settings for the options it is
    not given (``get_default_settings()``, which reads settings alone)."""
    read = getattr(storage_class, "get_default_settings", None)
    if read is None:
        return {}
    try:
        found = read(object.__new__(storage_class))
    except Exception:  # a backend that cannot say has no defaults here
        return {}
    return dict(found) if isinstance(found, dict) else {}


def _where(field: str, value: Any) -> Any:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        return _hashable(value)
    # A bucket's prefix has no slash at either end (django-storages refuses a
    # leading one); elsewhere only a trailing slash says nothing ('/' is a root).
    value = value.strip("/") if field == "location" else value.rstrip("/") or value
    return value.lower() if field in NO_CASE else value


def _spelled_one_way(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((str(k), _spelled_one_way(v)) for k, v in value.items()))
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str) and value.endswith("/") and value.strip("/"):
        return value.rstrip("/")
    return _hashable(value)


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
