"""Which ``QueuedStorage`` a storage key in the ledger stands for.

Workers never import a path read from the database: they find storages among the
instances the running code built, from ``settings.STORAGES`` and the models.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from queued_storage.backends import QueuedStorage

_lock = threading.Lock()
_by_key: dict[str, QueuedStorage] = {}
_configs: dict[str, dict[str, Any]] = {}


def register(storage: QueuedStorage, config: tuple[Any, ...]) -> None:
    """Remember ``storage`` under its key; the newest instance wins."""
    with _lock:
        _by_key[storage.key] = storage
        configs = _configs.setdefault(storage.key, {})
        configs.setdefault(repr(config), storage.describe())


def conflicts() -> dict[str, list[str]]:
    """Keys shared by storages that were built with different arguments."""
    with _lock:
        return {
            key: sorted(configs.values())
            for key, configs in _configs.items()
            if len(configs) > 1
        }


def discover() -> None:
    """Build every ``QueuedStorage`` that settings and models declare."""
    from django.apps import apps
    from django.conf import settings
    from django.core.files.storage import storages
    from django.db.models import FileField
    from django.utils.module_loading import import_string

    from queued_storage.backends import QueuedStorage

    configs = cast("dict[str, dict[str, Any]]", settings.STORAGES)
    for alias, config in configs.items():
        try:
            backend = import_string(config["BACKEND"])
        except (ImportError, KeyError):
            continue
        if isinstance(backend, type) and issubclass(backend, QueuedStorage):
            try:
                storages[alias]  # building it registers it
            except Exception:  # reported by the system checks
                continue
    for model in apps.get_models():
        for field in model._meta.get_fields():
            if isinstance(field, FileField):
                field.storage  # noqa: B018 - already built with the model


def get(key: str) -> QueuedStorage | None:
    with _lock:
        found = _by_key.get(key)
    if found is None:
        discover()
        with _lock:
            found = _by_key.get(key)
    return found


def known_keys() -> list[str]:
    discover()
    with _lock:
        return sorted(_by_key)


def forget(key: str) -> None:
    """Drop a key (tests build many storages)."""
    with _lock:
        _by_key.pop(key, None)
        _configs.pop(key, None)


def registered() -> list[QueuedStorage]:
    """The storages built so far, without building any."""
    with _lock:
        return list(_by_key.values())
