"""System checks: a mistake in settings is reported by ``manage.py check``."""

from __future__ import annotations

import importlib.util
import numbers
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from django.apps import AppConfig, apps
from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, register
from django.core.exceptions import ImproperlyConfigured
from django.core.files.storage import default_storage, storages
from django.db.models import FileField, Model
from django.utils.module_loading import import_string

from queued_storage import registry
from queued_storage.conf import (
    HOSTNAME_HINT,
    WORKERS,
    hostname_problem,
    usable_number,
)
from queued_storage.conf import settings as conf

if TYPE_CHECKING:
    from queued_storage.backends import QueuedStorage


#: How to fix a storage that cannot be built, whichever way it was configured.
UNUSABLE_HINT = (
    "Pass local= and remote= each a STORAGES alias or a dotted path to a Storage "
    "class that can be imported, and task= a queued_storage.tasks.Transfer "
    "subclass. Migrations that froze an old path keep importing."
)


@register(Tags.compatibility)
def check_storages(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    from queued_storage.backends import QueuedStorage

    errors: list[CheckMessage] = []
    for alias, config in getattr(settings, "STORAGES", {}).items():
        try:
            backend = import_string(config.get("BACKEND", ""))
        except Exception:  # e.g. a module whose SDK is missing: not ours to check
            continue
        if not (isinstance(backend, type) and issubclass(backend, QueuedStorage)):
            continue
        try:
            built = storages.create_storage(config)
        except (ImproperlyConfigured, TypeError) as exc:
            errors.append(
                Error(
                    f"STORAGES[{alias!r}] cannot be built: {exc}",
                    hint=(
                        "Give OPTIONS 'local' and 'remote', each a STORAGES alias or "
                        "a dotted path to a Storage class (options in "
                        "'local_options'/'remote_options')."
                    ),
                    id="queued_storage.E001",
                )
            )
            continue
        if isinstance(built, QueuedStorage):
            errors.extend(_unusable(f"STORAGES[{alias!r}]", built, None))
    for model in _models(app_configs):
        for field in model._meta.get_fields():
            if not isinstance(field, FileField) or field.storage is default_storage:
                continue  # the default storage is reported as STORAGES['default']
            storage = field.storage
            try:
                if not isinstance(storage, QueuedStorage):
                    continue
            except Exception:  # a lazy storage whose STORAGES entry is reported
                continue
            errors.extend(_unusable("The field's storage", storage, field))
    registry.discover()
    for key, shared in registry.conflicts().items():
        problem, fix = registry.conflict_text(key, shared)
        errors.append(Error(problem, hint=fix, id="queued_storage.E002"))
    return errors


@register(Tags.compatibility)
def check_settings(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    errors: list[CheckMessage] = []
    worker = conf.raw("QUEUED_STORAGE_WORKER")
    if worker is not None and worker not in WORKERS:
        errors.append(
            Error(
                f"QUEUED_STORAGE_WORKER is {worker!r}.",
                hint="Use None (cron runs process_transfers), "
                + ", ".join(repr(w) for w in WORKERS)
                + ".",
                id="queued_storage.E003",
            )
        )
    elif worker == "django_q" and importlib.util.find_spec("django_q") is None:
        errors.append(
            Error(
                "QUEUED_STORAGE_WORKER is 'django_q' but django-q2 is not installed.",
                hint="pip install 'django-queued-storage[q2]', or choose another worker.",
                id="queued_storage.E004",
            )
        )
    elif worker == "django_tasks" and not _tasks_framework_available():
        errors.append(
            Error(
                "QUEUED_STORAGE_WORKER is 'django_tasks' but neither django.tasks "
                "(Django 6.0+) nor the django-tasks backport is installed.",
                hint="Upgrade to Django 6, or pip install 'django-queued-storage[tasks]'.",
                id="queued_storage.E004",
            )
        )
    elif worker == "celery" and importlib.util.find_spec("celery") is None:
        errors.append(
            Error(
                "QUEUED_STORAGE_WORKER is 'celery' but Celery is not installed.",
                hint="pip install 'django-queued-storage[celery]', or choose another worker.",
                id="queued_storage.E004",
            )
        )
    errors.extend(_check_number("QUEUED_STORAGE_RETRIES", integer=True, minimum=0))
    errors.extend(_check_number("QUEUED_STORAGE_RETRY_DELAY", minimum=0))
    errors.extend(_check_number("QUEUED_STORAGE_LEASE", minimum=1))
    errors.extend(_check_number("QUEUED_STORAGE_HEALTH_MAX_AGE", minimum=1))
    host_problem = hostname_problem(conf.hostname())
    if host_problem:
        errors.append(Error(host_problem, hint=HOSTNAME_HINT, id="queued_storage.E006"))
    errors.extend(
        _check_number(
            "QUEUED_STORAGE_TRANSFER_TIMEOUT", minimum=1, check_id="queued_storage.E007"
        )
    )
    prefix = conf.raw("QUEUED_STORAGE_CACHE_PREFIX")
    if not isinstance(prefix, str):
        errors.append(
            Error(
                f"QUEUED_STORAGE_CACHE_PREFIX must be a string, not {prefix!r}.",
                id="queued_storage.E005",
            )
        )
    return errors


def _models(app_configs: Sequence[AppConfig] | None) -> Iterator[type[Model]]:
    if app_configs is None:
        yield from apps.get_models()
        return
    for app_config in app_configs:
        yield from app_config.get_models()


def _unusable(what: str, storage: QueuedStorage, obj: Any) -> list[Error]:
    """E001 for a storage that builds (old migrations must import) but cannot be
    used: its first use raises the same text."""
    return [
        Error(
            f"{what} cannot be used: {problem}",
            hint=UNUSABLE_HINT,
            obj=obj,
            id="queued_storage.E001",
        )
        for problem in storage.configuration_problems()
    ]


def _tasks_framework_available() -> bool:
    return any(
        importlib.util.find_spec(module) is not None
        for module in ("django.tasks", "django_tasks")
    )


def _check_number(
    name: str,
    *,
    minimum: float,
    integer: bool = False,
    check_id: str = "queued_storage.E005",
) -> list[Error]:
    value = conf.raw(name)
    if (
        not usable_number(value)
        or (integer and not isinstance(value, numbers.Integral))
        or value < minimum
    ):
        what = "a whole number" if integer else "a number of seconds"
        return [
            Error(
                f"{name} is {value!r}.",
                hint=f"Set it to {what} of at least {minimum:g}.",
                id=check_id,
            )
        ]
    return []
