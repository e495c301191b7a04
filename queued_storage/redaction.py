"""What counts as a secret of a storage, and its removal from every text that
leaves the process (rows, logs, signals, admin pages, command output)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

from django.conf import settings
from django.core.files.storage import storages

if TYPE_CHECKING:
    from queued_storage.backends import QueuedStorage

REDACTED = "[redacted]"
SECRET_WORDS = ("key", "secret", "password", "passwd", "token", "credential", "sas")
URL_PASSWORD = re.compile(r"(\w+://[^:/@\s]+:)[^@\s]+@")


def _secret_values(options: Mapping[str, Any]) -> set[str]:
    found: set[str] = set()
    for name, value in options.items():
        if isinstance(value, Mapping):
            found |= _secret_values(value)
        elif (
            isinstance(value, str)
            and len(value) >= 4
            and any(word in str(name).lower() for word in SECRET_WORDS)
        ):
            found.add(value)
    return found


def secrets_of(storage: QueuedStorage) -> set[str]:
    """Option values whose names look secret, and the same attributes of the
    built storages."""
    sources: list[Mapping[str, Any]] = [storage.local_options, storage.remote_options]
    configs = cast("dict[str, dict[str, Any]]", settings.STORAGES)
    for alias in (storage.local_alias, storage.remote_alias):
        if alias in configs:
            sources.append(configs[alias].get("OPTIONS", {}))
            sources.append(vars(storages[alias]))
    for built in ("_local_instance", "_remote_instance"):
        if built in storage.__dict__:
            sources.append(vars(storage.__dict__[built]))
    found: set[str] = set()
    for source in sources:
        found.update(_secret_values(source))
    return found


def redact(storage: QueuedStorage, text: str) -> str:
    """``text`` without ``storage``'s credentials and without URL passwords."""
    for secret in secrets_of(storage):
        text = text.replace(secret, REDACTED)
    return URL_PASSWORD.sub(rf"\1{REDACTED}@", text)
