"""Which ``QueuedStorage`` a storage key in the ledger stands for.

Workers never import a path read from the database, and never use the storages
that loading migration files builds (they carry the arguments frozen in each
migration): a key stands for the storage that ``settings.STORAGES`` or a current
model's field defines, else for one that code used (saved, deleted, queued
with). Building a ``QueuedStorage`` registers nothing; its first use does.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, cast

from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.utils.functional import LazyObject, empty

from queued_storage.configuration import ConfiguredStorage

if TYPE_CHECKING:
    from queued_storage.storage import QueuedStorage

#: The arguments that make two storages of one key behave differently.
ARGUMENTS = (
    "class",
    "local",
    "remote",
    "local_options",
    "remote_options",
    "delayed",
    "task",
    "verify_checksum",
    "overwrite_remote",
    "local_shared",
    "create_only_uploads",
    "mirrors",
    "mirror_of",
)

Storages = dict[str, dict[str, "QueuedStorage"]]  # key -> configuration -> storage

_lock = threading.Lock()
#: Storages that code used, first come, by key (a current storage never).
_used: Storages = {}
#: What settings and the models define, found once per epoch; None: not yet.
_current: Storages | None = None
#: Moves on when settings.STORAGES changes or a key is forgotten: each storage
#: registers again at its next use (the check of a saved flag costs nothing).
epoch = 0


class KeyConflict(ImproperlyConfigured):
    """Differently configured storages share a key: the ledger cannot tell their
    rows apart, so neither may write one and no worker runs one for them."""


def configuration(storage: QueuedStorage) -> dict[str, str]:
    """The storage's arguments that matter to its rows, each as a comparable text
    (options included: they only ever leave this module as argument names)."""
    values = {
        "class": f"{type(storage).__module__}.{type(storage).__qualname__}",
        "local": storage.local_alias or storage.local_path,
        "remote": storage.remote_alias or storage.remote_path,
        "local_options": _canonical(storage.local_options),
        "remote_options": _canonical(storage.remote_options),
        "delayed": storage.delayed,
        "task": storage.task_path,
        "verify_checksum": storage.verify_checksum,
        "overwrite_remote": storage.overwrite_remote,
        "local_shared": storage.local_shared,
        "create_only_uploads": storage.create_only_uploads,
        "mirrors": _canonical(
            {name: t.as_argument() for name, t in storage.mirror_targets.items()}
        ),
        "mirror_of": (
            None
            if storage.primary is None
            else (storage.primary.key, storage.mirror_name)
        ),
    }
    return {name: repr(values[name]) for name in ARGUMENTS}


def _canonical(value: Any) -> Any:
    """``value`` with every mapping's items in order: options written in another
    order are the same configuration."""
    if isinstance(value, dict):
        items = [(repr(k), _canonical(v)) for k, v in value.items()]
        return sorted(items, key=lambda item: item[0])
    if isinstance(value, list | tuple):
        return [_canonical(item) for item in value]
    return value


def _fingerprint(storage: QueuedStorage) -> str:
    return repr(sorted(configuration(storage).items()))


def conflict_error(key: str, storages: list[QueuedStorage]) -> KeyConflict:
    """The error naming the storages that share ``key`` and the fix."""
    problem, fix = conflict_text(key, storages)
    return KeyConflict(f"{problem} {fix}")


def conflict_text(key: str, storages: list[QueuedStorage]) -> tuple[str, str]:
    """What is wrong and how to fix it: it quotes what ``describe()`` shows and
    the names of the arguments that differ, never an option's value."""
    configs = [configuration(storage) for storage in storages]
    differ = [name for name in ARGUMENTS if len({c[name] for c in configs}) > 1]
    problem = (
        f"Storage key {key!r} is shared by differently configured storages (they "
        f"differ in {', '.join(differ)}): "
        + "; ".join(storage.describe() for storage in storages)
        + ". The ledger tells storages apart by key only: each would handle the "
        "other's files."
    )
    fix = (
        "Pass key= to each QueuedStorage (the one whose files the ledger has can "
        f"keep key={key!r}), or configure them identically."
    )
    return problem, fix


def _unwrapped(storage: Any) -> Any:
    if isinstance(storage, LazyObject):
        if storage._wrapped is empty:
            storage._setup()
        return storage._wrapped
    return storage


def with_mirrors(storages: list[QueuedStorage]) -> list[QueuedStorage]:
    """``storages``, each followed by its mirrors' storages."""
    found: list[QueuedStorage] = []
    for storage in storages:
        found.append(storage)
        try:
            found.extend(storage.mirrors.values())
        except ImproperlyConfigured:  # raised at the storage's first use, and checked
            continue
    return found


def _declared() -> list[QueuedStorage]:
    """The ``QueuedStorage`` instances of ``settings.STORAGES`` and of the current
    models' file fields (never a historical model's), and their mirrors'."""
    from django.apps import apps
    from django.conf import settings
    from django.core.files.storage import storages
    from django.db.models import FileField
    from django.utils.module_loading import import_string

    found: list[QueuedStorage] = []
    configs = cast("dict[str, dict[str, Any]]", settings.STORAGES)
    for alias, config in configs.items():
        try:
            backend = import_string(config["BACKEND"])
        except Exception:  # e.g. a module whose SDK is missing: not a storage here
            continue
        if isinstance(backend, type) and issubclass(backend, ConfiguredStorage):
            try:
                storage = storages[alias]
            except Exception:  # reported by the system checks
                continue
            if isinstance(storage, ConfiguredStorage):
                found.append(cast("QueuedStorage", storage))
    for model in apps.get_models():
        for field in model._meta.get_fields():
            if isinstance(field, FileField):
                try:
                    storage = _unwrapped(field.storage)
                except Exception:  # the default storage, reported where it is used
                    continue
                if isinstance(storage, ConfiguredStorage):
                    found.append(cast("QueuedStorage", storage))
    return with_mirrors(found)


def referencing_fields(
    key: str, models: Iterable[type[Any]] | None = None
) -> list[tuple[type[Any], str]]:
    """``(model, field name)`` of each current model's file field whose storage
    has the ledger key ``key`` (never a historical model's; ``models``: these
    instead of every current one). One entry a table column: a proxy's or a
    multi-table child's field is its concrete model's, listed once."""
    from django.apps import apps
    from django.db.models import FileField

    found: list[tuple[type[Any], str]] = []
    seen: set[tuple[type[Any], str]] = set()
    for model in apps.get_models() if models is None else models:
        for field in model._meta.get_fields():
            if not isinstance(field, FileField):
                continue
            try:
                storage = _unwrapped(field.storage)
            except Exception:  # the default storage, reported where it is used
                continue
            if not (isinstance(storage, ConfiguredStorage) and storage.key == key):
                continue
            # The model whose table holds the column: a proxy or a child model
            # would query the same rows again.
            owner = (field.model._meta.concrete_model or field.model, field.name)
            if owner not in seen:
                seen.add(owner)
                found.append(owner)
    return found


def _discovered() -> Storages:
    global _current
    with _lock:
        if _current is not None:
            return _current
        seen = epoch
    current: Storages = {}
    for storage in _declared():
        current.setdefault(storage.key, {}).setdefault(_fingerprint(storage), storage)
    with _lock:
        if seen == epoch:
            _current = current
    return current


def discover() -> None:
    """Find the storages that settings and the current models define (once per
    process, again after ``settings.STORAGES`` changes)."""
    _discovered()


def register(storage: QueuedStorage) -> None:
    """Make ``storage`` and its mirrors known to the workers of this process under
    their keys (its first use does this); :class:`KeyConflict` if a storage
    configured otherwise has one of the keys, before anything is written."""
    mirrors = list(storage.mirrors.values())
    members = [(_fingerprint(member), member) for member in [storage, *mirrors]]
    with _lock:
        # The epoch of what is compared: settings that change before the storage
        # is recorded make its next use register again, against the new ones.
        seen = epoch
    current = _discovered()
    with _lock:
        for config, member in members:
            others = {
                **_used.get(member.key, {}),
                **current.get(member.key, {}),
            }
            others.pop(config, None)
            if others:
                raise conflict_error(member.key, [member, *others.values()])
        for config, member in members:
            if config not in current.get(member.key, {}):
                _used.setdefault(member.key, {}).setdefault(config, member)
        storage._registry_epoch = seen


def get(key: str) -> QueuedStorage | None:
    """The storage of ``key``, or None; :class:`KeyConflict` if storages that are
    configured differently share it (a worker then runs no hook for the row)."""
    found = _storages_of(key)
    if len(found) > 1:
        raise conflict_error(key, found)
    return found[0] if found else None


def _storages_of(key: str) -> list[QueuedStorage]:
    """The storages of ``key`` by configuration: settings' and models' first, in
    the order they are declared, then one that code used."""
    current = _discovered().get(key, {})
    with _lock:
        used = _used.get(key, {})
        return [*current.values(), *(s for c, s in used.items() if c not in current)]


def conflicts() -> dict[str, list[QueuedStorage]]:
    """Keys shared by differently configured storages, each with its storages."""
    shared = {key: _storages_of(key) for key in known_keys()}
    return {key: found for key, found in shared.items() if len(found) > 1}


def known_keys() -> list[str]:
    current = _discovered()
    with _lock:
        return sorted(set(current) | set(_used))


def mirror_keys() -> list[str]:
    """The keys of the mirrors of the storages known so far."""
    current = _discovered()
    with _lock:
        found = [*current.values(), *_used.values()]
    return sorted(
        {s.key for by_config in found for s in by_config.values() if s.primary}
    )


def host_local_keys() -> list[str]:
    """The keys of the storages that keep local copies on each host's own disk
    (``local_shared=False``)."""
    return [key for key in known_keys() if not _shared_local(key)]


def _shared_local(key: str) -> bool:
    try:
        storage = get(key)
    except KeyConflict:
        return True  # any worker fails its rows with the conflict, running no hook
    return storage is None or storage.local_shared


def forget(key: str) -> None:
    """Drop a key, and its storages' mirrors' (tests build many storages);
    settings and models are read again."""
    global _current, epoch
    with _lock:
        for storage in _used.pop(key, {}).values():
            for name in storage.mirror_targets:
                _used.pop(storage.mirror_key(name), None)
        _current = None
        epoch += 1


def registered() -> list[QueuedStorage]:
    """The storages known so far, without building any: those of settings and
    the models once discovered, and those that code used."""
    with _lock:
        found = [*(_current or {}).values(), *_used.values()]
    return [storage for by_config in found for storage in by_config.values()]


def _storages_changed(*, setting: str, **kwargs: Any) -> None:
    global _current, epoch
    if setting == "STORAGES":
        with _lock:
            _current = None
            epoch += 1


setting_changed.connect(_storages_changed)
