"""Listing a queued storage's directory: the local and the remote storage's
entries merged, each once, the deleted names left out; from the ledger where
the remote cannot list."""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.core.files.storage import Storage
from django.db.models.functions import Substr

from queued_storage.models import PendingTransfer

if TYPE_CHECKING:
    from queued_storage.storage import QueuedStorage


def listdir(storage: QueuedStorage, path: str) -> tuple[list[str], list[str]]:
    """``storage.listdir()`` of a directory in its canonical spelling."""
    dirs, files = _listdir(storage.local, path)
    try:
        remote_dirs, remote_files = _listdir(storage.remote, path)
    except NotImplementedError:
        remote_dirs, remote_files = _ledger_listdir(storage.key, path, done=True)
    hidden = set(_ledger_listdir(storage.key, path, done=False)[1])
    merged_dirs = sorted(set(dirs) | set(remote_dirs))
    merged_files = sorted((set(files) | set(remote_files)) - hidden)
    return merged_dirs, merged_files


def _ledger_listdir(key: str, path: str, *, done: bool) -> tuple[list[str], list[str]]:
    prefix = f"{path}/" if path else ""
    rows = PendingTransfer.objects.filter(storage_key=key)
    if prefix:
        # Not name__startswith: SQLite's LIKE ignores the case of ASCII letters.
        rows = rows.alias(head=Substr("name", 1, len(prefix))).filter(head=prefix)
    rows = rows.done().live() if done else rows.filter(deleted=True)
    dirs: set[str] = set()
    files: set[str] = set()
    for name in rows.values_list("name", flat=True):
        head, _sep, tail = name[len(prefix) :].partition("/")
        (dirs if tail else files).add(head)
    return sorted(dirs), sorted(files)


def _listdir(storage: Storage, path: str) -> tuple[list[str], list[str]]:
    try:
        dirs, files = storage.listdir(path)
    except FileNotFoundError:
        return [], []
    return list(dirs), list(files)
