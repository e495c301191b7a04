"""Building a queued storage from its arguments: ``local``, ``remote`` and
``task`` from dotted paths, ``STORAGES`` aliases and 0.8's class attributes, and
the key. What cannot be used is kept as a problem to raise at first use, so that
migration files that froze a path gone since still import."""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import replace
from functools import cached_property
from types import FrameType
from typing import TYPE_CHECKING, Any, ClassVar

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.files.storage import Storage, storages
from django.core.signals import setting_changed
from django.db.migrations.loader import MigrationLoader
from django.utils.module_loading import import_string

from queued_storage import installation, redaction
from queued_storage.conf import settings as conf
from queued_storage.mirror_config import Mirrored, MirrorTarget, parse_mirrors
from queued_storage.tasks import Transfer

if TYPE_CHECKING:
    from queued_storage.storage import QueuedStorage

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
    "mirrors",
)
_NOT_SET = object()
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
MAX_KEY_LENGTH = 255
_LOAD_MIGRATIONS = MigrationLoader.load_disk.__code__
#: Moves on when settings.STORAGES changes: a ``local``/``remote`` that named
#: nothing is then looked up as an alias again.
_storages_epoch = 0


def _storages_changed(*, setting: str, **kwargs: Any) -> None:
    global _storages_epoch
    if setting == "STORAGES":
        _storages_epoch += 1


setting_changed.connect(_storages_changed)


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


def warn_deprecated(message: str) -> None:
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
    warn_deprecated(
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
    if issubclass(storage_class, ConfiguredStorage):
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


class ConfiguredStorage(Mirrored, Storage):
    """The base of ``QueuedStorage``: its arguments, the ``local`` and ``remote``
    storages and the ``task`` hook they build, the problems that keep it from
    being used, and its key.

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
    default_mirrors: dict[str, Any] | None = None
    #: Set on a mirror's storage (``MirrorStorage``): the storage it mirrors, and
    #: its name there.
    primary: QueuedStorage | None = None
    mirror_name: str = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """0.8's class attributes become the ``default_*`` of their arguments. On
        an instance ``local``, ``remote`` and ``task`` are the built storages and
        hook: the class attribute of such a name is moved out of their way."""
        super().__init_subclass__(**kwargs)
        for name in CLASS_DEFAULTS:
            value = _class_attribute(cls, name)
            if value is not _NOT_SET:
                setattr(cls, f"default_{name}", value)
        for name in ("local", "remote", "task", "mirrors"):
            # Set here or by a mixin, to a path or to None (which inherits):
            # either would hide the property.
            if not hasattr(type(inspect.getattr_static(cls, name)), "__get__"):
                setattr(cls, name, inspect.getattr_static(ConfiguredStorage, name))

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
        mirrors: dict[str, Any] | None = None,
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
        #: The epoch of settings.STORAGES (see _storages_changed) when a
        #: ``local``/``remote`` that named nothing was last looked up as an alias.
        self._looked_up_epoch = _storages_epoch
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
        #: Each mirror's target by name: the storage copies every file there too.
        self.mirror_targets = parse_mirrors(
            self.default_mirrors if mirrors is None else mirrors,
            self.key,
            max_key_length=MAX_KEY_LENGTH,
            taken={
                "the local storage": (
                    self.local_alias or self.local_path,
                    self.local_options,
                ),
                "the remote storage": (
                    self.remote_alias or self.remote_path,
                    self.remote_options,
                ),
            },
        )
        with _quoting_no_secret():
            for target in list(self.mirror_targets.values()):
                self._check_mirror_target(target)
        #: The name of the mirror that may serve reads (``"serve": True``), or None.
        self.serving_mirror = next(
            (name for name, target in self.mirror_targets.items() if target.serve),
            None,
        )
        # Registered with the workers at first use (QueuedStorage._registered),
        # not here: loading migration files builds storages with the arguments frozen in them.
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

    def _check_mirror_target(self, target: MirrorTarget) -> None:
        """As :meth:`_check_storage_argument` for a mirror's target: an alias given
        options raises now; a path that names no usable ``Storage`` class is a
        problem, raised at first use and reported by ``manage.py check``."""
        which = f"mirrors[{target.name!r}]"
        value = target.storage
        if value in getattr(settings, "STORAGES", {}):
            if target.options:
                raise ImproperlyConfigured(
                    f"QueuedStorage {which} storage {value!r} is a STORAGES alias; "
                    f"put its options in settings.STORAGES[{value!r}]['OPTIONS'], "
                    "not in the mirror's options."
                )
            self._problems.pop(f"mirror {target.name}", None)
            return
        path = _current_path(which, value)
        if path != value:
            target = replace(target, storage=path)
            self.mirror_targets[target.name] = target
        problem = _storage_class_problem(path)
        if problem is not None:
            self._problems[f"mirror {target.name}"] = redaction.redact_with(
                (),
                f"QueuedStorage {which} storage {value!r} {problem}. Give the "
                "mirror a STORAGES alias or a dotted path to a Storage class (with "
                "its options).",
            )

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
        installation.refuse_unless_installed(self.key)
        self._look_up_aliases_again()
        if self._problems:
            raise ImproperlyConfigured(" ".join(self._problems.values()))

    def _look_up_aliases_again(self) -> None:
        """A ``local``/``remote`` that was neither an alias nor a path that can be
        imported is one once ``settings.STORAGES`` has it (``override_settings``
        in a test, settings read after the storage was built): the storage is
        then usable, under the same key (the alias is the text the key has)."""
        if not self._problems or self._looked_up_epoch == _storages_epoch:
            return
        self._looked_up_epoch = _storages_epoch
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
        for name, target in list(self.mirror_targets.items()):
            if f"mirror {name}" in self._problems:
                try:
                    with _quoting_no_secret():
                        self._check_mirror_target(target)
                except ImproperlyConfigured as exc:
                    self._problems[f"mirror {name}"] = str(exc)

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

    def describe(self) -> str:
        """The storage's identity without its options (which may hold secrets)."""
        local = self.local_alias or self.local_path
        remote = self.remote_alias or self.remote_path
        mirrors = (
            f", mirrors={list(self.mirror_targets)}" if self.mirror_targets else ""
        )
        return (
            f"{type(self).__name__}(local={local!r}, remote={remote!r}, "
            f"delayed={self.delayed}, task={self.task_path!r}{mirrors})"
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
