"""The storage: saves locally at once, serves each name from where the ledger says."""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import pathlib
import posixpath
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime
from functools import cached_property, wraps
from types import FrameType, TracebackType
from typing import Any, ClassVar, Concatenate, NamedTuple, ParamSpec, TypeVar
from urllib.parse import quote

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured, SuspiciousFileOperation
from django.core.files import File
from django.core.files.move import file_move_safe
from django.core.files.storage import FileSystemStorage, Storage, storages
from django.db import DatabaseError, connections, router, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.migrations.loader import MigrationLoader
from django.db.models.functions import Substr
from django.utils.deconstruct import deconstructible
from django.utils.module_loading import import_string

from queued_storage import adoption, prefetch, recording, redaction, registry
from queued_storage.checksums import CountingFile, HashingFile, storage_sha256
from queued_storage.conf import settings as conf
from queued_storage.models import PendingTransfer, retry_when_locked

# The name rules lived here before queued_storage.names; they stay importable.
from queued_storage.names import BAD_CHARACTERS as BAD_CHARACTERS
from queued_storage.names import BIDI_CONTROLS as BIDI_CONTROLS
from queued_storage.names import DEVICE_NAMES as DEVICE_NAMES
from queued_storage.names import MAX_NAME_LENGTH as MAX_NAME_LENGTH
from queued_storage.names import canonical_directory, canonical_name
from queued_storage.names import check_name as check_name
from queued_storage.names import clean_name as clean_name
from queued_storage.names import portable_name as portable_name
from queued_storage.tasks import Transfer
from queued_storage.tombstones import purge

__all__ = [
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

FILE_SYSTEM_STORAGE = "django.core.files.storage.FileSystemStorage"
DEFAULT_TASK = "queued_storage.tasks.Transfer"
#: Backends of 0.8's documentation that django-storages removed, and what is used
#: instead (and makes the storage key: code that follows the warning keeps it).
RENAMED_STORAGES = {
    "storages.backends.s3boto.S3BotoStorage": "storages.backends.s3.S3Storage",
}
#: The arguments a 0.8 subclass set as class attributes.
CLASS_DEFAULTS = (
    "local",
    "remote",
    "local_options",
    "remote_options",
    "cache_prefix",
    "delayed",
    "task",
)
_NOT_SET = object()
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
MAX_KEY_LENGTH = 255
#: Give up looking for a free name after this many tries.
MAX_NAME_TRIES = 100


class RowState(NamedTuple):
    status: str
    deleted: bool
    size: int | None


#: Files up to this size get their ledger row before they are written (one
#: statement); larger ones after, so that no write lock waits for a long copy.
SMALL_FILE = 4 * 1024 * 1024


def _rereadable(content: Any) -> bool:
    """Whether ``content`` can be read again from its start."""
    seekable = getattr(content, "seekable", None)
    try:
        return bool(seekable()) if callable(seekable) else False
    except (OSError, ValueError):
        return False


def _known_size(content: Any) -> int | None:
    """The size of upload content, if it can tell without being read."""
    try:
        return int(content.size)
    except (AttributeError, OSError, TypeError, ValueError):
        return None


logger = logging.getLogger("queued_storage")


def _remove_local(local: Storage, name: str) -> None:
    """Remove a file a failed save wrote; a failure to do so is logged, not raised
    (the save's own error, or the rollback, is what the caller must see)."""
    try:
        local.delete(name)
    except Exception as exc:
        logger.warning("failed save cleanup error name=%s error=%r", name, exc)


_FILE_SYSTEM_SAVE = FileSystemStorage._save.__code__  # type: ignore[attr-defined]
_FILE_MOVE_SAFE = file_move_safe.__code__
_LOAD_MIGRATIONS = MigrationLoader.load_disk.__code__


def _file_being_written(exc: BaseException, local: Storage) -> str | None:
    """The name of the file that ``FileSystemStorage._save`` of ``local`` had
    created (or truncated) when ``exc`` went through it, which it leaves behind.
    Only its frame knows the name: it may have given up the one it was asked for
    when another writer created that first, and that file is not ours."""
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code is _FILE_SYSTEM_SAVE and frame.f_locals.get("self") is local:
            name = frame.f_locals.get("name")
            # ``fd`` is bound once os.open() created or truncated the file: in
            # _save for a stream, in file_move_safe for a temporary upload copied
            # to another file system.
            created = "fd" in frame.f_locals or any(
                inner.f_code is _FILE_MOVE_SAFE and "fd" in inner.f_locals
                for inner in _inner_frames(tb)
            )
            return name if created and isinstance(name, str) else None
        tb = tb.tb_next
    return None


def _inner_frames(tb: TracebackType) -> Iterator[FrameType]:
    inner = tb.tb_next
    while inner is not None:
        yield inner.tb_frame
        inner = inner.tb_next


def _overwrites_names(storage: Storage) -> bool:
    # Django's FileSystemStorage(allow_overwrite=True) keeps a taken name instead
    # of inventing another one: then a save of a taken name is a re-save.
    return bool(storage.get_alternative_name("x", ".y") == "x.y")


class _RemovedUnlessCommitted:
    """Removes the local file a save wrote if the save's transaction rolls back.

    It waits in ``transaction.on_commit``: Django drops the callbacks of a
    transaction or savepoint that rolls back without calling them, and CPython
    frees this object at once (elsewhere: when the garbage collector runs). Freed
    while its connection is still in the transaction, it was rolled back; freed
    after the commit without a call (an earlier callback raised), it keeps the
    file, which its committed row owns.

    On a local storage that overwrites names (asked of the storage the file was
    saved to, and only on a rollback: it costs a random name), the database has
    released the name a moment before Django drops the callbacks: another save
    may have taken it and written its file since. The file is then removed only
    while the ledger holds the name for the removal (:func:`_remove_if_unclaimed`),
    on a connection of its own."""

    __slots__ = ("connection", "key", "local", "name", "pending")

    def __init__(
        self,
        connection: BaseDatabaseWrapper,
        local: Storage,
        name: str,
        *,
        key: str,
    ):
        self.connection = connection
        self.local = local
        self.name = name
        self.key = key
        self.pending = True

    def __call__(self) -> None:
        self.pending = False

    def __del__(self) -> None:
        if not self.pending:
            return
        connection = self.connection
        if not (connection.in_atomic_block or not connection.autocommit):
            return
        if connection.in_atomic_block and (
            connection.vendor == "sqlite" or not _overwrites_names(self.local)
        ):
            # In a live transaction: after a savepoint's rollback, or freed late
            # (an earlier callback's traceback kept it) during a later transaction.
            # A row seen here is this save's, committed before: the file is its
            # own. No other save can have taken the name since a savepoint's
            # rollback on SQLite (the outer transaction holds the write lock; a
            # removal on another connection would wait for it, leaving the file
            # served until the outer transaction ends, for good on a shared-cache
            # in-memory database), nor on a local storage that keeps taken names.
            try:
                claimed = (
                    PendingTransfer.objects.using(connection.alias)
                    .for_name(self.key, self.name)
                    .exists()
                )
            except DatabaseError:
                claimed = True
            if not claimed:
                _remove_local(self.local, self.name)
            return
        if not _overwrites_names(self.local):
            _remove_local(self.local, self.name)
            return
        remover = threading.Thread(
            target=_remove_if_unclaimed,
            args=(connection.alias, self.key, self.local, self.name),
            name="queued-storage-rollback-cleanup",
            daemon=True,
        )
        remover.start()
        if not connection.in_atomic_block:
            # The whole transaction rolled back: it holds no lock the removal could
            # wait for. After a savepoint's rollback the outer transaction may (a
            # row lock): the removal runs when it can.
            remover.join()


def _remove_if_unclaimed(db: str, key: str, local: Storage, name: str) -> None:
    """Remove the file a rolled-back save left at ``name``, unless a save of the
    name has a row for it by now (committed or not: the insert waits for it)."""
    try:
        with transaction.atomic(using=db):
            generation = recording.reserve(
                PendingTransfer,
                db,
                key,
                name,
                size=None,
                host=conf.QUEUED_STORAGE_HOSTNAME,
                held=True,
            )
            if generation is None:
                return  # another save took the name: the file there is its own
            _remove_local(local, name)
            PendingTransfer.objects.using(db).unreserve(key, name, generation)
    except Exception as exc:
        # Left in place, the file is served as one from before the ledger: never
        # another save's file removed.
        logger.warning(
            "rolled-back save cleanup failed name=%s error=%s",
            name,
            type(exc).__name__,
        )
    finally:
        connections.close_all()


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
        except Exception as exc:
            redaction.scrub(self, exc)
            raise

    return call


@contextlib.contextmanager
def _quoting_no_secret() -> Iterator[None]:
    """A configuration error quotes what was passed as a storage: a URL with a
    password or a connection string passed there by mistake is redacted in it
    (and the import error it chained, which quotes it too, is dropped)."""
    try:
        yield
    except ImproperlyConfigured as exc:
        text = str(exc)
        clean = redaction.redact_with((), text)
        if clean == text:
            raise
        raise ImproperlyConfigured(clean) from None


def _warn_deprecated(message: str) -> None:
    """A ``DeprecationWarning`` that points at the first caller outside this
    package (the line that built the storage, through any subclass). None for a
    storage that a migration file froze: the site cannot change that file, and
    with warnings as errors (``pytest -W error``) it would no longer migrate."""
    level = 1
    frame: FrameType | None = sys._getframe(0)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    if _loading_migrations(frame):
        return
    warnings.warn(message, DeprecationWarning, stacklevel=level)


def _loading_migrations(frame: FrameType | None) -> bool:
    """Whether ``frame`` runs inside Django's import of migration files."""
    while frame is not None:
        if frame.f_code is _LOAD_MIGRATIONS:
            return True
        frame = frame.f_back
    return False


def _current_path(which: str, path: str) -> str:
    """``path``, or what replaces it if django-storages removed it since 0.8."""
    replacement = RENAMED_STORAGES.get(path)
    if replacement is None:
        return path
    _warn_deprecated(
        f"QueuedStorage {which}={path!r}: django-storages removed that backend; "
        f"{replacement!r} is used instead (and makes the storage key). Pass "
        f"{which}={replacement!r}."
    )
    return replacement


def _storage_hint(which: str) -> str:
    return (
        f"Pass {which}= as a dotted path to a Storage class (with "
        f"{which}_options=) or as an alias in settings.STORAGES."
    )


def _storage_class_problem(path: str) -> str | None:
    """Why ``path`` does not name a ``Storage`` class a queued storage can use."""
    try:
        storage_class = import_string(path)
    except (ImportError, ImproperlyConfigured) as exc:
        return (
            "is neither an alias in settings.STORAGES nor an importable dotted path "
            f"({exc})"
        )
    if not (isinstance(storage_class, type) and issubclass(storage_class, Storage)):
        return "is not a Storage subclass"
    if issubclass(storage_class, QueuedStorage):
        return "is itself a QueuedStorage"
    return None


def _class_attribute(cls: type, name: str) -> Any:
    """What 0.8's class attribute ``name`` of ``cls`` is, as Python finds it: set
    by the class or a mixin before it; ``_NOT_SET`` where a queued storage's
    ``default_*`` (or a property or method) comes first. ``local``, ``remote``
    or ``task`` set to None inherits, as 0.8's ``QueuedFileSystemStorage`` and
    ``QueuedS3BotoStorage`` did (their defaults were arguments)."""
    for klass in cls.__mro__:
        if f"default_{name}" in vars(klass):
            return _NOT_SET
        value = vars(klass).get(name, _NOT_SET)
        if value is _NOT_SET or (value is None and name in ("local", "remote", "task")):
            continue
        return _NOT_SET if hasattr(type(value), "__get__") else value
    return _NOT_SET


class _UnusableTask(Transfer):
    """Stands for a ``task=`` path that names no ``Transfer`` subclass: building
    it raises why, which a worker records as the attempt's error."""

    problem: ClassVar[str] = ""

    def __init__(self) -> None:
        raise ImproperlyConfigured(self.problem)


@deconstructible
class QueuedStorage(Storage):
    """Save to ``local`` at once and move each file to ``remote`` in the background.

    ``local`` and ``remote`` are dotted paths to ``Storage`` classes (built with
    ``local_options``/``remote_options``) or aliases in ``settings.STORAGES``.

    A subclass may set the defaults of the arguments as 0.8's class attributes
    (``local = "..."``, ``delayed = True``, ...) or as ``default_local``, ...
    """

    #: The defaults of the arguments of the same names (the convenience subclasses
    #: set ``default_local``/``default_remote``).
    default_local: str | None = None
    default_remote: str | None = None
    default_local_options: dict[str, Any] | None = None
    default_remote_options: dict[str, Any] | None = None
    default_cache_prefix: str | None = None
    default_delayed: bool = False
    default_task: str | type = DEFAULT_TASK
    #: The registry's epoch when this storage last registered (see _registered).
    _registry_epoch = -1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """0.8's class attributes become the ``default_*`` of their arguments. On
        an instance ``local``, ``remote`` and ``task`` are the built storages and
        hook: the class attribute of such a name is moved out of their way."""
        super().__init_subclass__(**kwargs)
        for name in CLASS_DEFAULTS:
            value = _class_attribute(cls, name)
            if value is not _NOT_SET:
                setattr(cls, f"default_{name}", value)
        for name in ("local", "remote", "task"):
            # Set here or by a mixin, to a path or to None (which inherits):
            # either would hide the property.
            if not hasattr(type(inspect.getattr_static(cls, name)), "__get__"):
                setattr(cls, name, vars(QueuedStorage)[name])

    def __init__(
        self,
        local: str | None = None,
        remote: str | None = None,
        local_options: dict[str, Any] | None = None,
        remote_options: dict[str, Any] | None = None,
        cache_prefix: str | None = None,
        delayed: bool | None = None,
        task: str | type | None = None,
        key: str | None = None,
        *,
        verify_checksum: bool = False,
        overwrite_remote: bool = False,
        local_shared: bool = True,
        create_only_uploads: bool | None = None,
    ) -> None:
        local = local or self.default_local
        remote = remote or self.default_remote
        if local_options is None:
            local_options = self.default_local_options
        if remote_options is None:
            remote_options = self.default_remote_options
        #: Why each argument that names code (``local``, ``remote``, ``task``)
        #: cannot be used; raised at first use, reported by ``manage.py check``.
        self._problems: dict[str, str] = {}
        with _quoting_no_secret():
            self.local_path, self.local_alias = self._check_storage_argument(
                "local", local, local_options
            )
            self.remote_path, self.remote_alias = self._check_storage_argument(
                "remote", remote, remote_options
            )
        self.local_options = dict(local_options or {})
        self.remote_options = dict(remote_options or {})
        #: The registry's epoch (it moves when settings.STORAGES changes) when a
        #: ``local``/``remote`` that named nothing was last looked up as an alias.
        self._looked_up_epoch = registry.epoch
        if cache_prefix is None:
            cache_prefix = self.default_cache_prefix
        self.cache_prefix = (
            conf.QUEUED_STORAGE_CACHE_PREFIX if cache_prefix is None else cache_prefix
        )
        self.delayed = bool(self.default_delayed if delayed is None else delayed)
        #: Compare SHA-256 of the local and the remote copy before a row is done.
        self.verify_checksum = bool(verify_checksum)
        #: Replace a remote object at the name that the ledger did not write.
        self.overwrite_remote = bool(overwrite_remote)
        #: False when each host has its own local storage: a worker then takes only
        #: the rows its own host wrote.
        self.local_shared = bool(local_shared)
        #: Let the remote refuse to overwrite (S3's If-None-Match) instead of asking
        #: whether an object is there first; None: only where the service is known
        #: to honour it (AWS S3).
        self.create_only_uploads = (
            None if create_only_uploads is None else bool(create_only_uploads)
        )
        self.task_path, self.task_class = self._check_task(
            task or self.default_task or DEFAULT_TASK
        )
        self.key = self._check_key(
            key,
            self.local_alias or self.local_path,
            self.remote_alias or self.remote_path,
        )
        # Registered with the workers at first use (see _registered), not here:
        # loading migration files builds storages with the arguments frozen in them.
        redaction.remember(self)

    # Configuration

    def _check_storage_argument(
        self, which: str, value: Any, options: dict[str, Any] | None
    ) -> tuple[str, str]:
        """The dotted path and the ``STORAGES`` alias that ``value`` gives. What is
        no path or alias at all raises now; a path that names no usable ``Storage``
        class is kept to raise at first use, so that a migration that froze a path
        gone since still imports."""
        hint = _storage_hint(which)
        if value is None or value == "":
            raise ImproperlyConfigured(f"QueuedStorage needs a {which} storage. {hint}")
        if not isinstance(value, str):
            what = "a class" if isinstance(value, type) else "an instance"
            raise ImproperlyConfigured(
                f"QueuedStorage {which}= got {what} ({value!r}); a worker must be "
                f"able to build the storage from code, so {hint[0].lower()}{hint[1:]}"
            )
        if options is not None and not isinstance(options, dict):
            raise ImproperlyConfigured(
                f"QueuedStorage {which}_options= must be a dict, not "
                f"{type(options).__name__}."
            )
        if value in getattr(settings, "STORAGES", {}):
            if options:
                raise ImproperlyConfigured(
                    f"QueuedStorage {which}={value!r} is a STORAGES alias; put its "
                    f"options in settings.STORAGES[{value!r}]['OPTIONS'], not in "
                    f"{which}_options."
                )
            return "", value
        path = _current_path(which, value)
        problem = _storage_class_problem(path)
        if problem is not None:
            self._problems[which] = redaction.redact_with(
                (), self._unusable(which, value, problem)
            )
        return path, ""

    def _unusable(self, which: str, value: str, problem: str) -> str:
        """The error that the first use of a storage whose ``which`` argument is
        ``value`` raises, ``problem`` saying what is wrong with it."""
        return f"QueuedStorage {which}={value!r} {problem}. {_storage_hint(which)}"

    def _check_task(self, task: str | type) -> tuple[str, type[Transfer]]:
        if isinstance(task, type):
            if not issubclass(task, Transfer):
                raise ImproperlyConfigured(
                    f"QueuedStorage task={task.__module__}.{task.__qualname__} is "
                    "not a subclass of queued_storage.tasks.Transfer."
                )
            return f"{task.__module__}.{task.__qualname__}", task
        if not isinstance(task, str):
            raise ImproperlyConfigured(
                f"QueuedStorage task= must be a dotted path to a Transfer subclass, "
                f"not {type(task).__name__}."
            )
        try:
            task_class = import_string(task)
        except (ImportError, ImproperlyConfigured) as exc:
            problem = f"cannot be imported ({exc})"
        else:
            if isinstance(task_class, type) and issubclass(task_class, Transfer):
                return task, task_class
            problem = "is not a subclass of queued_storage.tasks.Transfer"
        message = redaction.redact_with(
            (),
            f"QueuedStorage task={task!r} {problem}. Pass task= a dotted path to a "
            f"subclass of queued_storage.tasks.Transfer (the default is "
            f"{DEFAULT_TASK!r}); a 0.8 Celery task becomes such a subclass whose "
            "transfer() returns True or False.",
        )
        self._problems["task"] = message
        return task, type("UnusableTask", (_UnusableTask,), {"problem": message})

    def configuration_problems(self) -> list[str]:
        """Why this storage cannot be used (its first use raises them); empty when
        it can. ``manage.py check`` reports them (``queued_storage.E001``),
        redacted as the error of a first use is (an import error may quote a
        value the options hold)."""
        self._look_up_aliases_again()
        return [self.redact(problem) for problem in self._problems.values()]

    def _refuse_if_unusable(self) -> None:
        self._look_up_aliases_again()
        if self._problems:
            raise ImproperlyConfigured(" ".join(self._problems.values()))

    def _look_up_aliases_again(self) -> None:
        """A ``local``/``remote`` that was neither an alias nor a path that can be
        imported is one once ``settings.STORAGES`` has it (``override_settings``
        in a test, settings read after the storage was built): the storage is
        then usable, under the same key (the alias is the text the key has)."""
        if not self._problems or self._looked_up_epoch == registry.epoch:
            return
        self._looked_up_epoch = registry.epoch
        for which in ("local", "remote"):
            value = getattr(self, f"{which}_path")
            if which not in self._problems or value not in settings.STORAGES:
                continue
            try:
                with _quoting_no_secret():
                    _path, alias = self._check_storage_argument(
                        which, value, getattr(self, f"{which}_options")
                    )
            except ImproperlyConfigured as exc:
                self._problems[which] = str(exc)
                continue
            # The alias before the problem goes: a thread using the storage
            # meanwhile sees one or the other, never neither.
            setattr(self, f"{which}_alias", alias)
            setattr(self, f"{which}_path", "")
            self._problems.pop(which, None)

    @staticmethod
    def _check_key(key: str | None, local: str, remote: str) -> str:
        if key is None:
            key = f"{local}>{remote}"
        if not isinstance(key, str) or not key.strip():
            raise ImproperlyConfigured("QueuedStorage key= must be a non-empty string.")
        if len(key) > MAX_KEY_LENGTH:
            raise ImproperlyConfigured(
                f"QueuedStorage key {key[:40]!r}... is longer than {MAX_KEY_LENGTH} "
                "characters: pass a shorter key=."
            )
        return key

    def _registered(self) -> None:
        """Register the storage with the workers of this process before its first
        write to the ledger (the check costs an attribute read afterwards): a
        worker finds a storage used only from code, and a storage whose key a
        differently configured one has writes nothing."""
        if self._registry_epoch != registry.epoch:
            registry.register(self)

    def describe(self) -> str:
        """The storage's identity without its options (which may hold secrets)."""
        local = self.local_alias or self.local_path
        remote = self.remote_alias or self.remote_path
        return (
            f"{type(self).__name__}(local={local!r}, remote={remote!r}, "
            f"delayed={self.delayed}, task={self.task_path!r})"
        )

    def redact(self, text: str) -> str:
        """``text`` without this storage's credentials (see :mod:`queued_storage.redaction`)."""
        return redaction.redact(self, text)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} key={self.key!r}>"

    @property
    def local(self) -> Storage:
        """The storage every file is saved to first."""
        self._look_up_aliases_again()
        if self.local_alias:
            return storages[self.local_alias]
        return self._local_instance

    @property
    def remote(self) -> Storage:
        """The storage every file ends up on."""
        self._look_up_aliases_again()
        if self.remote_alias:
            return storages[self.remote_alias]
        return self._remote_instance

    # STORAGES aliases are looked up on every use (Django caches the instances),
    # so that override_settings(STORAGES=...) reaches them.

    @cached_property
    def _local_instance(self) -> Storage:
        if "local" in self._problems:
            raise ImproperlyConfigured(self._problems["local"])
        storage: Storage = import_string(self.local_path)(**self.local_options)
        return storage

    @cached_property
    def _remote_instance(self) -> Storage:
        if "remote" in self._problems:
            raise ImproperlyConfigured(self._problems["remote"])
        storage: Storage = import_string(self.remote_path)(**self.remote_options)
        return storage

    @property
    def task(self) -> Any:
        """A fresh instance of the transfer hook."""
        return self.task_class()

    @property
    def _local_verbatim(self) -> bool:
        """Whether the local storage is Django's ``FileSystemStorage`` as it comes,
        which stores exactly the bytes of the content it saves."""
        cls = type(self.local)
        return (
            isinstance(self.local, FileSystemStorage)
            and cls.save is Storage.save
            and getattr(cls, "_save", None) is getattr(FileSystemStorage, "_save", 0)
        )

    def _local_overwrites(self) -> bool:
        return _overwrites_names(self.local)

    # The ledger, read on the request path: one indexed query, no network.

    def _row_state(self, name: str) -> RowState | None:
        found = PendingTransfer.objects.state_of(self.key, name)
        return None if found is None else RowState(*found)

    def _served_state(self, name: str) -> RowState | None:
        """The row state for serving ``name``: read ahead by ``prefetch_files()``
        or ``prefetch_locations()`` when inside one, else one query."""
        found = prefetch.prefetched(self.key, name)
        if isinstance(found, prefetch.NotRead):
            return self._row_state(name)
        return None if found is None else RowState(*found)

    def _storage_for(self, name: str, state: RowState | None) -> Storage:
        if state is None:
            return self.local if self.local.exists(name) else self.remote
        if state.status == PendingTransfer.Status.DONE and not state.deleted:
            return self.remote
        return self.local

    @_redacted_errors
    def get_storage(self, name: str) -> Storage:
        """The storage that serves ``name`` now: the ledger decides."""
        return self._serving(canonical_name(name))

    def _serving(self, name: str) -> Storage:
        """:meth:`get_storage` of a name in its canonical spelling."""
        return self._storage_for(name, self._served_state(name))

    def using_local(self, name: str) -> bool:
        return self.get_storage(name) is self.local

    def using_remote(self, name: str) -> bool:
        return self.get_storage(name) is self.remote

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
        return self._free(clean_name(name), max_length) is not None

    def _free(self, name: str, max_length: int | None) -> tuple[bool] | None:
        """None if ``name`` is taken; else whether the ledger has a row for it."""
        if not self.local.is_name_available(name, max_length=max_length):
            return None
        state = self._row_state(name) or self._asked_of_remote(name)
        if state is None:
            return (False,)
        if state.deleted or self._local_overwrites():
            return (True,)
        return None

    def _asked_of_remote(self, name: str) -> RowState | None:
        """Until the storage is adopted, a name the ledger has no row for (and the
        local storage no file at) is asked of the remote before it is handed out:
        a file there (one from before the ledger) is recorded as done, so that the
        name is taken from then on without asking again. Returns that row's state;
        None when the name is free."""
        db = router.db_for_write(PendingTransfer)
        if adoption.is_adopted(db, self.key):
            return None
        return self._ask_remote(name, db)

    def _ask_remote(self, name: str, db: str) -> RowState | None:
        """:meth:`_asked_of_remote` of a storage known not to be adopted."""
        if not self.remote.exists(name):
            return None
        self._registered()  # a ledger write, also from get_available_name()
        prefetch.forget(self.key, name)
        try:
            recorded = adoption.record_remote_file(db, self.key, name, self.remote)
        except FileNotFoundError:
            return None  # deleted (and purged) since it answered: the name is free
        if recorded is not None:
            return RowState(PendingTransfer.Status.DONE, False, recorded)
        # A save of the name got its row in first: that row answers.
        return self._row_state(name) or RowState(
            PendingTransfer.Status.DONE, False, None
        )

    @_redacted_errors
    def get_available_name(self, name: str, max_length: int | None = None) -> str:
        return self._available_name(name, max_length)[0]

    def _available_name(
        self,
        name: str,
        max_length: int | None,
        reserve: Callable[[str], int | None] | None = None,
        *,
        cleaned: bool = False,
        refused: str | None = None,
    ) -> tuple[str, bool, int | None]:
        """The name a save stores, whether the ledger has a row for it, and, with
        ``reserve``, the generation of the row ``reserve`` wrote for a name the
        ledger did not have (one statement instead of a read and a write).
        ``refused``: a name ``reserve`` was just refused (it has a row)."""
        if not cleaned:
            # What clean_name lets through passes Django's validate_file_name too.
            name = clean_name(str(name))
        dir_name, file_name = posixpath.split(name)
        file_root = file_ext = ""
        for _try in range(MAX_NAME_TRIES):
            if self.local.is_name_available(name, max_length=max_length):
                if reserve is not None and name != refused:
                    generation = reserve(name)
                    if generation is not None:
                        return name, False, generation
                # Not adopted, a name asked of the remote by ``reserve`` has the row
                # that recorded it; one whose row another transaction's snapshot
                # hides (MariaDB) is asked again rather than reserved for ever.
                state = self._row_state(name) or self._asked_of_remote(name)
                if state is None:
                    if reserve is None:
                        return name, False, None
                    if refused == name:
                        refused = None
                        continue  # its row went in between: reserve it again
                    # Refused again by a row this transaction cannot see (a snapshot
                    # of MariaDB's REPEATABLE READ taken before it): the name is taken.
                elif state.deleted or self._local_overwrites():
                    return name, True, None
            if not file_root:
                file_ext = "".join(pathlib.PurePath(file_name).suffixes)
                file_root = file_name.removesuffix(file_ext)
            name = posixpath.join(
                dir_name, self.get_alternative_name(file_root, file_ext)
            )
            if max_length and len(name) > max_length:
                file_root = file_root[: -(len(name) - max_length)]
                if not file_root:
                    break
                name = posixpath.join(
                    dir_name, self.get_alternative_name(file_root, file_ext)
                )
            name = clean_name(name)  # the local storage's invention
        raise SuspiciousFileOperation(
            f"Storage can not find an available filename for {name!r}. Make sure the "
            "file field allows a sufficient max_length."
        )

    @_redacted_errors
    def save(
        self, name: str | None, content: Any, max_length: int | None = None
    ) -> str:
        """Write ``content`` locally and record it in the ledger, in the caller's
        transaction. No call reaches the remote."""
        self._registered()
        if name is None:
            name = content.name
        if not hasattr(content, "chunks"):
            content = File(content, name)
        name = clean_name(name)
        size = _known_size(content)
        if (size is None or size > SMALL_FILE) and not self._local_overwrites():
            # The local storage creates a new file exclusively: nothing another
            # save, purge or TransferAndDelete does to the name can touch it. One
            # that overwrites names gets the row first, whatever the size: a row
            # written after the copy would leave the copy unlocked, and the
            # removal of a version whose row appeared meanwhile would remove it.
            name, existing, _ = self._available_name(name, max_length, cleaned=True)
            return self._store(name, content, existing, max_length)
        db = router.db_for_write(PendingTransfer)
        if connections[db].in_atomic_block:
            return self._save_small(name, content, max_length, size, db)
        return self._save_small_atomically(name, content, max_length, size, db)

    @retry_when_locked
    def _save_small_atomically(
        self, name: str, content: Any, max_length: int | None, size: int | None, db: str
    ) -> str:
        # Outside a transaction the row would be seen before its file is written.
        # The transaction is ours: one the database aborted over a lock is tried
        # again as a whole, as the ledger's own statements are.
        with transaction.atomic(using=db):
            return self._save_small(name, content, max_length, size, db)

    def _save_small(
        self, name: str, content: Any, max_length: int | None, size: int | None, db: str
    ) -> str:
        """Save a small file: its row first (reserving a new name costs one
        statement), then the file, then the row mended if the file differs."""
        host = conf.QUEUED_STORAGE_HOSTNAME
        adopted = adoption.is_adopted(db, self.key)

        def reserve(candidate: str) -> int | None:
            if (
                not adopted
                and self._row_state(candidate) is None
                and self._ask_remote(candidate, db) is not None
            ):
                return None  # the remote's file: _available_name finds its row
            return recording.reserve(
                PendingTransfer,
                db,
                self.key,
                candidate,
                size=size,
                host=host,
                held=self.delayed,
            )

        # A name the ledger has never seen: its row, then the file (the local
        # storage's own save checks that the name is free there).
        generation = None
        if not max_length or len(name) <= max_length:
            generation = reserve(name)
        existing = False
        if generation is None:
            name, existing, generation = self._available_name(
                name, max_length, reserve, cleaned=True, refused=name
            )
        if generation is None:
            return self._store(name, content, existing, max_length)
        counting = self._counting(content)
        hashing = counting if isinstance(counting, HashingFile) else None
        owned = self._owns_what_it_writes(existing)
        try:
            stored = self._write_local(
                name, content if counting is None else counting, max_length, owned
            )
        except BaseException:
            # A database error here leaves a transaction that rolls back anyway:
            # the error to raise is the local storage's.
            with contextlib.suppress(DatabaseError):
                PendingTransfer.objects.unreserve(self.key, name, generation)
            raise
        with self._removed_unless_committed(stored, owned, db):
            if stored != name:
                # The local storage found the name taken after all and chose another.
                PendingTransfer.objects.unreserve(self.key, name, generation)
                existing = self._row_state(stored) is not None
                return self._record(stored, hashing, existing)
            prefetch.forget(self.key, stored)
            # Django's FileSystemStorage writes every byte it reads: what was
            # counted is on disk. Text is encoded as the local storage chose, and
            # another local storage may change the bytes: ask it.
            written = (
                counting.counted
                if counting is not None and not counting.text and self._local_verbatim
                else self.local.size(stored)
            )
            checksum = self._checksum(hashing, stored, written)
            if written != size or checksum:
                PendingTransfer.objects.record_file(
                    self.key, stored, generation, written, checksum
                )
        if not self.delayed:
            self._wake(stored)
        return str(stored)

    def _owns_what_it_writes(self, existing: bool) -> bool:
        """Whether the file a save writes is its own to remove if the save fails: a
        new file, unless the local storage overwrote one the ledger has a row for
        (the row decides what becomes of that one)."""
        return not existing or not self._local_overwrites()

    def _write_local(
        self, name: str, content: Any, max_length: int | None, owned: bool
    ) -> str:
        """Save ``content`` to the local storage; a write that fails midway (a full
        disk) leaves no partial file for the no-row fallback to serve."""
        try:
            return str(self.local.save(name, content, max_length=max_length))
        except BaseException as exc:
            partial = _file_being_written(exc, self.local) if owned else None
            if partial is not None:
                _remove_local(self.local, partial)
            raise

    @contextlib.contextmanager
    def _removed_unless_committed(
        self, name: str, owned: bool, db: str
    ) -> Iterator[None]:
        """Around the ledger writes that follow a local write: if they raise, or
        the transaction that holds them rolls back, the file ``name`` is removed."""
        if not owned:
            yield
            return
        try:
            yield
        except BaseException:
            _remove_local(self.local, name)
            raise
        connection = connections[db]
        if connection.in_atomic_block:
            transaction.on_commit(
                _RemovedUnlessCommitted(
                    connection,
                    self.local,
                    name,
                    key=self.key,
                ),
                using=db,
            )

    def _counting(self, content: Any) -> CountingFile | None:
        """``content`` wrapped to count (and with ``verify_checksum`` hash) the bytes
        the local storage reads; None for a temporary upload, which Django's
        FileSystemStorage moves instead of reading."""
        if self.verify_checksum:
            return HashingFile(content)
        if hasattr(content, "temporary_file_path"):
            return None
        return CountingFile(content)

    @_redacted_errors
    def _save(self, name: str, content: Any) -> str:
        self._registered()
        name = clean_name(name)
        return self._store(name, content, self._row_state(name) is not None, None)

    def _store(
        self, name: str, content: Any, existing: bool, max_length: int | None
    ) -> str:
        """Save the file, then write its row. The file of a name that has a row is
        written under that row's lock, held until the row is written (and the
        caller's transaction ends): a purge, ``TransferAndDelete`` or
        ``clean_local_copies`` deletes an older generation's local copy under the
        same lock after checking the row, so it never deletes this file."""
        if not existing:
            return self._write(name, content, existing, max_length)
        if _rereadable(content):
            return self._store_locked_retrying(name, content, max_length)
        return self._store_locked(name, content, max_length)

    def _store_locked(self, name: str, content: Any, max_length: int | None) -> str:
        db = router.db_for_write(PendingTransfer)
        with transaction.atomic(using=db):
            PendingTransfer.objects.using(db).for_name(self.key, name).lock()
            return self._write(name, content, True, max_length)

    # Outside the caller's transaction this one is ours: one the database aborted
    # over a lock is tried again as a whole, its content read again from the start
    # (as every save reads it). Content that cannot be read twice is not retried.
    _store_locked_retrying = retry_when_locked(_store_locked)

    def _write(
        self, name: str, content: Any, existing: bool, max_length: int | None
    ) -> str:
        hashing = HashingFile(content) if self.verify_checksum else None
        owned = self._owns_what_it_writes(existing)
        stored = self._write_local(
            name, content if hashing is None else hashing, max_length, owned
        )
        with self._removed_unless_committed(
            stored, owned, router.db_for_write(PendingTransfer)
        ):
            if stored != name:
                existing = self._row_state(stored) is not None
            return self._record(stored, hashing, existing)

    def _checksum(self, hashing: HashingFile | None, name: str, size: int) -> str:
        if hashing is None:
            return ""
        # A local storage that moved a temporary file instead of reading it leaves
        # the hash incomplete: then read the saved copy once.
        if hashing.hashed == size:
            return hashing.hexdigest()
        return storage_sha256(self.local, name)

    def _record(self, stored: str, hashing: HashingFile | None, existing: bool) -> str:
        """Write the row of a file saved locally."""
        prefetch.forget(self.key, stored)
        size = self.local.size(stored)
        PendingTransfer.objects.record_save(
            key=self.key,
            name=stored,
            size=size,
            host=conf.QUEUED_STORAGE_HOSTNAME,
            held=self.delayed,
            checksum=self._checksum(hashing, stored, size),
            existing=existing,
        )
        if not self.delayed:
            self._wake(stored)
        return str(stored)

    def _wake(self, name: str) -> None:
        from queued_storage.integrations import wake_after_commit

        wake_after_commit(self.key, name)

    # Reading: from the storage the row names.

    @_redacted_errors
    def _open(self, name: str, mode: str = "rb") -> File[Any]:
        if any(flag in mode for flag in "wax+"):
            raise ValueError(
                f"QueuedStorage opens files for reading only (mode {mode!r}); write "
                "with save() so that the ledger knows about the file."
            )
        name = canonical_name(name)
        state = self._served_state(name)
        if state is not None and state.deleted:
            raise FileNotFoundError(f"{name!r} was deleted.")
        storage = self._storage_for(name, state)
        try:
            return storage.open(name, mode)
        except FileNotFoundError:
            if storage is not self.local:
                raise
            # A worker may have finished, and dropped the local copy, since we looked.
            state = self._row_state(name)
            if state is None or state.status != PendingTransfer.Status.DONE:
                raise
            return self.remote.open(name, mode)

    @_redacted_errors
    def exists(self, name: str) -> bool:
        name = canonical_name(name)
        state = self._served_state(name)
        if state is None:
            return bool(self.local.exists(name) or self.remote.exists(name))
        if state.deleted:
            return False
        if state.status == PendingTransfer.Status.DONE:
            return True
        return bool(self.local.exists(name))

    @_redacted_errors
    def size(self, name: str) -> int:
        name = canonical_name(name)
        state = self._served_state(name)
        if state is not None and state.deleted:
            raise FileNotFoundError(f"{name!r} was deleted.")
        if (
            state is not None
            and state.status == PendingTransfer.Status.DONE
            and state.size is not None
        ):
            return state.size
        return int(self._storage_for(name, state).size(name))

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
        return self._serving(name).get_accessed_time(name)

    @_redacted_errors
    def get_created_time(self, name: str) -> datetime:
        name = canonical_name(name)
        return self._serving(name).get_created_time(name)

    @_redacted_errors
    def get_modified_time(self, name: str) -> datetime:
        name = canonical_name(name)
        return self._serving(name).get_modified_time(name)

    @_redacted_errors
    def listdir(self, path: str) -> tuple[list[str], list[str]]:
        """Both storages' entries, each once; deleted names left out."""
        path = canonical_directory(path)
        dirs, files = _listdir(self.local, path)
        try:
            remote_dirs, remote_files = _listdir(self.remote, path)
        except NotImplementedError:
            remote_dirs, remote_files = self._ledger_listdir(path, done=True)
        hidden = set(self._ledger_listdir(path, done=False)[1])
        merged_dirs = sorted(set(dirs) | set(remote_dirs))
        merged_files = sorted((set(files) | set(remote_files)) - hidden)
        return merged_dirs, merged_files

    def _ledger_listdir(self, path: str, *, done: bool) -> tuple[list[str], list[str]]:
        prefix = f"{path}/" if path else ""
        rows = PendingTransfer.objects.filter(storage_key=self.key)
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
        row = PendingTransfer.objects.record_delete(self.key, name)
        redaction.after_commit(
            router.db_for_write(PendingTransfer), purge, self, row.pk, row.generation
        )

    @_redacted_errors
    def transfer(self, name: str, *args: Any, **kwargs: Any) -> bool:
        """Queue ``name`` now: a held or failed row becomes due, with its attempts
        reset. A file already transferred is left alone. Returns whether it queued."""
        name = canonical_name(name)
        self._registered()
        prefetch.forget(self.key, name)
        state = self._row_state(name)
        if state is not None and state.deleted:
            # A local copy left behind is the deleted version's, waiting for its
            # purge: queueing it would bring the deleted file back.
            return False
        if state is None:
            if not self._local_file(name):
                return False
            PendingTransfer.objects.record_save(
                key=self.key,
                name=name,
                size=self.local.size(name),
                checksum=(
                    storage_sha256(self.local, name) if self.verify_checksum else ""
                ),
                host=conf.QUEUED_STORAGE_HOSTNAME,
                held=False,
                existing=False,
            )
            queued = True
        else:
            queued = bool(PendingTransfer.objects.for_name(self.key, name).requeue())
        if queued:
            self._wake(name)
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


def _listdir(storage: Storage, path: str) -> tuple[list[str], list[str]]:
    try:
        dirs, files = storage.listdir(path)
    except FileNotFoundError:
        return [], []
    return list(dirs), list(files)


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
        _warn_deprecated(
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
