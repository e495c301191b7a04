"""System checks: a mistake in settings is reported by ``manage.py check``."""

from __future__ import annotations

import importlib.util
import inspect
import numbers
from collections.abc import Iterator, Sequence
from typing import Any

from django.apps import AppConfig, apps
from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, register
from django.core.checks import Warning as CheckWarning
from django.core.exceptions import ImproperlyConfigured
from django.core.files.storage import default_storage, storages
from django.db import connections
from django.db.models import FileField, Model
from django.utils.module_loading import import_string

from queued_storage import installation, registry
from queued_storage.conf import (
    HOSTNAME_HINT,
    MAX_MMAP_THRESHOLD,
    MAX_RETRIES,
    MAX_SECONDS,
    MINIMUM_SECONDS,
    MMAP_THRESHOLD_HINT,
    WORKERS,
    hostname_problem,
    usable_number,
)
from queued_storage.conf import settings as conf
from queued_storage.configuration import ConfiguredStorage
from queued_storage.failures import hook_limit_problem
from queued_storage.tasks import Transfer

#: The tag of this package's checks: ``process_transfers`` runs only these.
TAG = "queued_storage"

#: How to fix a storage that cannot be built, whichever way it was configured.
UNUSABLE_HINT = (
    "Pass local= and remote= each a STORAGES alias or a dotted path to a Storage "
    "class that can be imported, and task= a queued_storage.tasks.Transfer "
    "subclass. Migrations that froze an old path keep importing."
)


#: Backends of these packages are none of ours (they subclass none of them).
_NOT_OURS = ("django.", "storages.")


@register(Tags.compatibility, TAG)
def check_storages(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    errors: list[CheckMessage] = []
    for alias, config in getattr(settings, "STORAGES", {}).items():
        path = config.get("BACKEND", "")
        if path.startswith(_NOT_OURS):
            continue  # not imported for the check: a worker's start-up pays for it
        try:
            backend = import_string(path)
        except Exception:  # e.g. a module whose SDK is missing: not ours to check
            continue
        if not (isinstance(backend, type) and issubclass(backend, ConfiguredStorage)):
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
        if isinstance(built, ConfiguredStorage):
            errors.extend(_unusable(f"STORAGES[{alias!r}]", built, None))
            errors.extend(_hook_limits(f"STORAGES[{alias!r}]", built, None))
    for model in _models(app_configs):
        for field in model._meta.get_fields():
            if not isinstance(field, FileField) or field.storage is default_storage:
                continue  # the default storage is reported as STORAGES['default']
            storage = field.storage
            try:
                if not isinstance(storage, ConfiguredStorage):
                    continue
            except Exception:  # a lazy storage whose STORAGES entry is reported
                continue
            errors.extend(_unusable("The field's storage", storage, field))
            errors.extend(_hook_limits("The field's storage", storage, field))
    registry.discover()
    for key, shared in registry.conflicts().items():
        problem, fix = registry.conflict_text(key, shared)
        errors.append(Error(problem, hint=fix, id="queued_storage.E002"))
    return errors


#: The library each wake-up needs, the check that reports it missing, and the hint.
WORKER_LIBRARIES: dict[str, tuple[tuple[str, ...], str, str, str]] = {
    "django_q": (
        ("django_q",),
        "django-q2 is not installed",
        "pip install 'django-queued-storage[q2]', or choose another worker.",
        "queued_storage.E004",
    ),
    "django_tasks": (
        ("django.tasks", "django_tasks"),
        "neither django.tasks (Django 6.0+) nor the django-tasks backport is installed",
        "Upgrade to Django 6, or pip install 'django-queued-storage[tasks]'.",
        "queued_storage.E012",
    ),
    "celery": (
        ("celery",),
        "Celery is not installed",
        "pip install 'django-queued-storage[celery]', or choose another worker.",
        "queued_storage.E013",
    ),
}


@register(Tags.compatibility, TAG)
def check_settings(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """One check ID per setting and problem, so that one can be silenced alone."""
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
    elif worker in WORKER_LIBRARIES:
        modules, missing, hint, check_id = WORKER_LIBRARIES[worker]
        if not any(_importable(module) for module in modules):
            errors.append(
                Error(
                    f"QUEUED_STORAGE_WORKER is {worker!r} but {missing}.",
                    hint=hint,
                    id=check_id,
                )
            )
    errors.extend(
        _check_number(
            "QUEUED_STORAGE_RETRIES",
            integer=True,
            minimum=0,
            maximum=MAX_RETRIES,
            check_id="queued_storage.E005",
        )
    )
    errors.extend(
        _check_number("QUEUED_STORAGE_RETRY_DELAY", check_id="queued_storage.E008")
    )
    errors.extend(_check_number("QUEUED_STORAGE_LEASE", check_id="queued_storage.E009"))
    errors.extend(
        _check_number("QUEUED_STORAGE_HEALTH_MAX_AGE", check_id="queued_storage.E010")
    )
    errors.extend(_check_breaker())
    threshold = conf.raw("QUEUED_STORAGE_WORKER_MMAP_THRESHOLD")
    if threshold is not None and (
        not usable_number(threshold, maximum=MAX_MMAP_THRESHOLD)
        or not isinstance(threshold, numbers.Integral)
    ):
        errors.append(
            Error(
                f"QUEUED_STORAGE_WORKER_MMAP_THRESHOLD is {threshold!r}.",
                hint=MMAP_THRESHOLD_HINT[0].upper() + MMAP_THRESHOLD_HINT[1:],
                id="queued_storage.E023",
            )
        )
    host_problem = hostname_problem(conf.hostname())
    if host_problem:
        errors.append(Error(host_problem, hint=HOSTNAME_HINT, id="queued_storage.E006"))
    errors.extend(
        _check_number("QUEUED_STORAGE_TRANSFER_TIMEOUT", check_id="queued_storage.E007")
    )
    errors.extend(
        _check_number(
            "QUEUED_STORAGE_HISTORY_RETENTION", check_id="queued_storage.E015"
        )
    )
    prefix = conf.raw("QUEUED_STORAGE_CACHE_PREFIX")
    if not isinstance(prefix, str):
        errors.append(
            Error(
                f"QUEUED_STORAGE_CACHE_PREFIX must be a string, not {prefix!r}.",
                hint="Remove it (it is accepted for 0.8's settings and unused), or "
                "set a string.",
                id="queued_storage.E011",
            )
        )
    return errors


@register(Tags.compatibility, TAG)
def check_installed(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """E016 for a site that uses a storage without the app. Registered when
    :mod:`queued_storage.storage` is imported (by a model field's storage, a 0.8
    subclass, or code), since without the app no ``ready()`` registers it."""
    if installation.installed():
        return []
    used = [f"STORAGES[{alias!r}]" for alias in _queued_aliases()]
    for model in apps.get_models():
        for field in model._meta.get_fields():
            if not isinstance(field, FileField) or field.storage is default_storage:
                continue
            try:
                queued = isinstance(field.storage, ConfiguredStorage)
            except Exception:  # a lazy storage whose STORAGES entry is reported
                continue
            if queued:
                used.append(f"{model._meta.label}.{field.name}")
    where = f" (used by {', '.join(used)})" if used else ""
    return [
        Error(
            f"{installation.NOT_INSTALLED}{where}.",
            hint=installation.NOT_INSTALLED_HINT,
            id="queued_storage.E016",
        )
    ]


def _queued_aliases() -> list[str]:
    found = []
    for alias, config in getattr(settings, "STORAGES", {}).items():
        path = config.get("BACKEND", "")
        if path.startswith(_NOT_OURS):
            continue  # not imported for the check: a worker's start-up pays for it
        try:
            backend = import_string(path)
        except Exception:  # reported by check_storages where it is ours
            continue
        if isinstance(backend, type) and issubclass(backend, ConfiguredStorage):
            found.append(alias)
    return found


@register(Tags.database, TAG)
def check_ledger_tables(
    app_configs: Sequence[AppConfig] | None = None,
    databases: Sequence[str] | None = None,
    **kwargs: Any,
) -> list[CheckMessage]:
    """W001/W002 for a ledger not migrated on a database it is routed to. Only
    with ``--database`` (and before ``migrate``, which is why these are warnings:
    an error would stop the command that fixes it); the plain check asks no
    database."""
    if not databases or not installation.installed():
        return []
    messages: list[CheckMessage] = []
    for alias, models in installation.ledger_databases().items():
        if alias not in databases:
            continue
        found = installation.not_migrated(connections[alias], models)
        if found is not None:
            check_id = (
                "queued_storage.W001" if found.tables_behind else "queued_storage.W002"
            )
            messages.append(CheckWarning(found.problem, hint=found.hint, id=check_id))
    return messages


def _check_breaker() -> list[Error]:
    """E018 for a breaker threshold no worker can use."""
    return _check_number(
        "QUEUED_STORAGE_BREAKER_FAILURES",
        integer=True,
        minimum=0,
        maximum=MAX_RETRIES,
        check_id="queued_storage.E018",
    )


def _models(app_configs: Sequence[AppConfig] | None) -> Iterator[type[Model]]:
    if app_configs is None:
        yield from apps.get_models()
        return
    for app_config in app_configs:
        yield from app_config.get_models()


def _unusable(what: str, storage: ConfiguredStorage, obj: Any) -> list[Error]:
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


def _hook_limits(what: str, storage: ConfiguredStorage, obj: Any) -> list[Error]:
    """E014 for a hook whose own ``max_retries`` or ``default_retry_delay`` no
    worker can use (each failed attempt is then recorded as not retried). Those
    it inherits are the settings', which E005 and E008 check."""
    task = getattr(storage, "task_class", None)
    if not isinstance(task, type):
        return []
    errors: list[Error] = []
    for attribute in ("max_retries", "default_retry_delay"):
        if inspect.getattr_static(task, attribute, None) is inspect.getattr_static(
            Transfer, attribute
        ):
            continue
        value = getattr(task, attribute)
        problem = value is not None and hook_limit_problem(
            task.__name__, attribute, value
        )
        if problem:
            errors.append(
                Error(
                    f"{what} has a transfer hook that cannot be retried: {problem}",
                    obj=obj,
                    id="queued_storage.E014",
                )
            )
    return errors


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # "django.tasks" where django has no tasks
        return False


def _check_number(
    name: str,
    *,
    check_id: str,
    minimum: float | None = None,
    integer: bool = False,
    maximum: float = MAX_SECONDS,
) -> list[Error]:
    """Error ``check_id`` when ``name`` is not a number from ``minimum`` (by
    default the duration's, which its first use also holds it to) to ``maximum``."""
    if minimum is None:
        minimum = MINIMUM_SECONDS[name]
    value = conf.raw(name)
    if (
        not usable_number(value, maximum=maximum)
        or (integer and not isinstance(value, numbers.Integral))
        or value < minimum
    ):
        if integer:
            what = f"a whole number from {minimum:g} to {maximum:g}"
        else:
            what = f"a number of seconds from {minimum:g} to {maximum:g} (100 years)"
        return [Error(f"{name} is {value!r}.", hint=f"Set it to {what}.", id=check_id)]
    return []
