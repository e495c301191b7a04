"""The ``Storage`` face: :class:`QueuedStorage` saves locally at once and serves
each name from where the ledger says; :class:`MirrorStorage` is one of its mirrors.

Building it from its arguments is :mod:`queued_storage.configuration`'s job, the
local write path :mod:`queued_storage.saving`'s. Sites name it, and the
convenience subclasses, by :mod:`queued_storage.backends`."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime
from functools import wraps
from typing import Any, Concatenate, ParamSpec, TypeVar
from urllib.parse import quote

from django.core.exceptions import ImproperlyConfigured
from django.core.files import File
from django.core.files.storage import Storage
from django.db import OperationalError, ProgrammingError, router
from django.utils.deconstruct import deconstructible

from queued_storage import (
    checks,  # noqa: F401 - registered without the app too (E016)
    installation,
    listing,
    mirrors,
    prefetch,
    redaction,
    registry,
    saving,
)
from queued_storage.checksums import storage_sha256
from queued_storage.conf import settings as conf
from queued_storage.configuration import ConfiguredStorage
from queued_storage.integrations import wake_after_commit
from queued_storage.mirror_config import MirrorTarget
from queued_storage.models import PendingTransfer
from queued_storage.names import (
    canonical_directory,
    canonical_name,
    clean_name,
    portable_name,
)
from queued_storage.prefetch import RowState
from queued_storage.tombstones import purge

__all__ = ["MirrorStorage", "QueuedStorage"]

P = ParamSpec("P")
R = TypeVar("R")


def _redacted_errors(
    method: Callable[Concatenate[QueuedStorage, P], R],
) -> Callable[Concatenate[QueuedStorage, P], R]:
    """An error that a method of the storage raises to its caller (the local or
    the remote storage's, quoting their configuration as client libraries may) is
    redacted first: the application logs it, error trackers keep it. A storage
    that cannot be used (see :meth:`QueuedStorage.configuration_problems`) says
    why instead of doing anything."""

    @wraps(method)
    def call(self: QueuedStorage, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            self._refuse_if_unusable()
            return method(self, *args, **kwargs)
        except (ProgrammingError, OperationalError) as exc:
            redaction.scrub(self, exc)
            # Asked only now, off the hot path: a ledger not migrated where it
            # lives says how to fix it instead of "no such table".
            installation.raise_if_not_migrated(exc)
            raise
        except Exception as exc:
            redaction.scrub(self, exc)
            raise

    return call


#: The path sites name it by (migrations keep it): its module re-exports it.
@deconstructible(path="queued_storage.backends.QueuedStorage")
class QueuedStorage(ConfiguredStorage):
    """Save to ``local`` at once and move each file to ``remote`` in the background.

    ``local`` and ``remote`` are dotted paths to ``Storage`` classes (built with
    ``local_options``/``remote_options``) or aliases in ``settings.STORAGES``.

    A subclass may set the defaults of the arguments as 0.8's class attributes
    (``local = "..."``, ``delayed = True``, ...) or as ``default_local``, ...
    """

    #: The registry's epoch when this storage last registered (see _registered).
    _registry_epoch = -1

    def _registered(self) -> None:
        """Register the storage with the workers of this process before its first
        write to the ledger (the check costs an attribute read afterwards): a
        worker finds a storage used only from code, and a storage whose key a
        differently configured one has writes nothing."""
        if self._registry_epoch != registry.epoch:
            registry.register(self)

    def _build_mirror(self, target: MirrorTarget) -> MirrorStorage:
        return MirrorStorage(self, target)

    # Serving: the ledger's row decides (one indexed query, no network).

    def _storage_for(self, name: str, state: RowState | None) -> Storage:
        if state is None:
            return self.local if self.local.exists(name) else self.remote
        if state.status == PendingTransfer.Status.DONE and not state.deleted:
            if state.mirrored and (mirror := self.serving_mirror) is not None:
                return self.mirrors[mirror].remote
            return self.remote
        return self.local

    @_redacted_errors
    def get_storage(self, name: str) -> Storage:
        """The storage that serves ``name`` now: the ledger decides."""
        return self._serving(canonical_name(name))

    def _serving(self, name: str) -> Storage:
        """:meth:`get_storage` of a name in its canonical spelling."""
        return self._storage_for(name, prefetch.served_state(self, name))

    def using_local(self, name: str) -> bool:
        return self.get_storage(name) is self.local

    def using_remote(self, name: str) -> bool:
        """Whether a remote serves ``name``: this storage's, or its serving
        mirror's."""
        return self.get_storage(name) is not self.local

    def get_cache_key(self, name: str) -> str:
        """Kept for code written for 0.8; nothing is cached under it any more."""
        return f"{self.cache_prefix}_{quote(name)}"

    # Saving

    @_redacted_errors
    def get_valid_name(self, name: str) -> str:
        return portable_name(str(self.local.get_valid_name(name)))

    def get_alternative_name(self, file_root: str, file_ext: str) -> str:
        return str(self.local.get_alternative_name(file_root, file_ext))

    @_redacted_errors
    def generate_filename(self, filename: str | os.PathLike[str]) -> str:
        """The local storage's name for an upload, made portable: what a user's
        file is called never makes the save fail."""
        return portable_name(str(self.local.generate_filename(filename)))

    @_redacted_errors
    def is_name_available(self, name: str, max_length: int | None = None) -> bool:
        return saving.free(self, clean_name(name), max_length) is not None

    @_redacted_errors
    def get_available_name(self, name: str, max_length: int | None = None) -> str:
        return saving.available_name(self, name, max_length)[0]

    @_redacted_errors
    def save(
        self, name: str | None, content: Any, max_length: int | None = None
    ) -> str:
        """Write ``content`` locally and record it in the ledger, in the caller's
        transaction. No call reaches the remote."""
        return saving.save(self, name, content, max_length)

    @_redacted_errors
    def _save(self, name: str, content: Any) -> str:
        self._registered()
        name = clean_name(name)
        existing = prefetch.state_of(self.key, name) is not None
        return saving.store(self, name, content, existing, None)

    # Reading: from the storage the row names.

    @_redacted_errors
    def _open(self, name: str, mode: str = "rb") -> File[Any]:
        if any(flag in mode for flag in "wax+"):
            raise ValueError(
                f"QueuedStorage opens files for reading only (mode {mode!r}); write "
                "with save() so that the ledger knows about the file."
            )
        name = canonical_name(name)
        state = prefetch.served_state(self, name)
        if state is not None and state.deleted:
            raise FileNotFoundError(f"{name!r} was deleted.")
        return self._read(name, state, lambda storage: storage.open(name, mode))

    def _read(
        self, name: str, state: RowState | None, act: Callable[[Storage], R]
    ) -> R:
        """``act`` on the storage that ``state`` says serves ``name``; if that is
        the local one and its copy is gone, on where the row says it is now."""
        storage = self._storage_for(name, state)
        try:
            return act(storage)
        except FileNotFoundError:
            moved = self._moved(name, storage)
            if moved is None:
                raise
            return act(moved)

    def _moved(self, name: str, storage: Storage) -> Storage | None:
        """The remote that serves ``name`` now, read again from the ledger, when
        ``storage`` is the local one: a worker may have finished, and dropped the
        local copy (``TransferAndDelete``), since the row was read."""
        if storage is not self.local:
            return None
        state = prefetch.current_state(self, name)
        moved = None if state is None else self._storage_for(name, state)
        return None if moved is self.local else moved

    @_redacted_errors
    def exists(self, name: str) -> bool:
        name = canonical_name(name)
        state = prefetch.served_state(self, name)
        if state is None:
            return bool(self.local.exists(name) or self.remote.exists(name))
        if state.deleted:
            return False
        if state.status == PendingTransfer.Status.DONE or self.local.exists(name):
            return True
        return self._moved(name, self.local) is not None

    @_redacted_errors
    def size(self, name: str) -> int:
        name = canonical_name(name)
        state = prefetch.served_state(self, name)
        if state is not None and state.deleted:
            raise FileNotFoundError(f"{name!r} was deleted.")
        if (
            state is not None
            and state.status == PendingTransfer.Status.DONE
            and state.size is not None
        ):
            return state.size
        return int(self._read(name, state, lambda storage: storage.size(name)))

    @_redacted_errors
    def url(self, name: str | None) -> str:
        # Passed through as is: some remotes (Dropbox, Libcloud) answer None, and
        # url("") is a common way to ask for the base URL.
        if name is None or name == "":
            return self.local.url(name)
        name = canonical_name(name)
        return self._serving(name).url(name)

    @_redacted_errors
    def path(self, name: str) -> str:
        name = canonical_name(name)
        return str(self._serving(name).path(name))

    @_redacted_errors
    def get_accessed_time(self, name: str) -> datetime:
        name = canonical_name(name)
        state = prefetch.served_state(self, name)
        return self._read(name, state, lambda storage: storage.get_accessed_time(name))

    @_redacted_errors
    def get_created_time(self, name: str) -> datetime:
        name = canonical_name(name)
        state = prefetch.served_state(self, name)
        return self._read(name, state, lambda storage: storage.get_created_time(name))

    @_redacted_errors
    def get_modified_time(self, name: str) -> datetime:
        name = canonical_name(name)
        state = prefetch.served_state(self, name)
        return self._read(name, state, lambda storage: storage.get_modified_time(name))

    @_redacted_errors
    def listdir(self, path: str) -> tuple[list[str], list[str]]:
        """Both storages' entries, each once; deleted names left out."""
        return listing.listdir(self, canonical_directory(path))

    # Changing state

    @_redacted_errors
    def delete(self, name: str) -> None:
        """Hide ``name`` at once (in the caller's transaction) and remove its local
        and remote copies after commit, or leave that to the worker that holds it."""
        if not name:
            raise ValueError("The name must be given.")
        name = canonical_name(name)
        self._registered()
        prefetch.forget(self.key, name)
        keys = [target.key for target in self.mirror_targets.values()]
        row = PendingTransfer.objects.record_delete(self.key, name, keys)
        db = router.db_for_write(PendingTransfer)
        redaction.after_commit(db, purge, self, row.pk, row.generation)
        if keys:
            for mirror, pk in mirrors.tombstones_of(self, name, row.generation):
                redaction.after_commit(db, purge, mirror, pk, row.generation)

    @_redacted_errors
    def transfer(self, name: str, *args: Any, **kwargs: Any) -> bool:
        """Queue ``name`` now: a held or failed row becomes due, with its attempts
        reset. A file already transferred is left alone. Returns whether it queued."""
        name = canonical_name(name)
        self._registered()
        prefetch.forget(self.key, name)
        state = prefetch.state_of(self.key, name)
        if state is not None and state.deleted:
            # A local copy left behind is the deleted version's, waiting for its
            # purge: queueing it would bring the deleted file back.
            return False
        if state is None:
            if not self._local_file(name):
                return False
            try:
                size = self.local.size(name)
                checksum = (
                    storage_sha256(self.local, name) if self.verify_checksum else ""
                )
            except FileNotFoundError:
                return False  # deleted, and purged, since it looked
            # A delete that comes between leaves its tombstone: nothing queued.
            queued = PendingTransfer.objects.record_save(
                key=self.key,
                name=name,
                size=size,
                checksum=checksum,
                host=conf.QUEUED_STORAGE_HOSTNAME,
                held=False,
                existing=False,
                over_delete=False,
            )
        else:
            queued = bool(PendingTransfer.objects.for_name(self.key, name).requeue())
        if queued:
            wake_after_commit(router.db_for_write(PendingTransfer), self.key, name)
        return queued

    def _local_file(self, name: str) -> bool:
        """Whether the local storage has a file at ``name``: ``exists()`` is also
        true of a directory, such as ``d`` of ``d/x``, which is no file to queue."""
        local = self.local
        if not local.exists(name):
            return False
        try:
            path = local.path(name)
        except NotImplementedError:
            return True
        return not os.path.isdir(path)


class MirrorStorage(QueuedStorage):
    """Mirror ``mirror_name`` of the storage ``primary``: the rows of its copies
    under a key of their own, its remote the mirror's target, the rest of the
    primary's arguments. Files reach it from the primary (see
    :mod:`queued_storage.mirrors`), never from a save, delete or transfer of its own."""

    def __init__(self, primary: QueuedStorage, target: MirrorTarget) -> None:
        self.primary = primary
        self.mirror_name = target.name
        super().__init__(
            primary.local_alias or primary.local_path,
            target.storage,
            local_options=primary.local_options or None,
            remote_options=target.options or None,
            # The primary's task as it was given: one that cannot be imported
            # says so here too, at first use.
            task=primary.task_path
            if "task" in primary._problems
            else primary.task_class,
            key=target.key,
            verify_checksum=primary.verify_checksum,
            overwrite_remote=primary.overwrite_remote,
            local_shared=primary.local_shared,
            create_only_uploads=primary.create_only_uploads,
        )

    @property
    def local(self) -> Storage:
        """The primary's local storage, the same instance."""
        assert self.primary is not None
        return self.primary.local

    def describe(self) -> str:
        remote = self.remote_alias or self.remote_path
        return (
            f"MirrorStorage({self.mirror_name!r} of {self.primary_key!r}, "
            f"remote={remote!r}, task={self.task_path!r})"
        )

    @property
    def primary_key(self) -> str:
        assert self.primary is not None
        return self.primary.key

    def _through_primary(self, *args: Any, **kwargs: Any) -> Any:
        raise ImproperlyConfigured(
            f"{self!r} is mirror {self.mirror_name!r} of storage "
            f"{self.primary_key!r}: save, delete and transfer files through that one."
        )

    save = delete = transfer = _through_primary


def class_path(cls: type[QueuedStorage]) -> str:
    """The dotted path that a site's settings name ``cls`` by: for the classes of
    this module, :mod:`queued_storage.backends`'s, which re-exports them."""
    module = "queued_storage.backends" if cls.__module__ == __name__ else cls.__module__
    return f"{module}.{cls.__qualname__}"
