"""The ``mirrors`` argument of a queued storage: for each mirror, its name, the
storage it copies to (a ``STORAGES`` alias or a dotted path, with options), the
ledger key of its rows and whether it may serve reads. Read and checked when
the storage is built; whether the target can be imported is the storage's
check (:mod:`queued_storage.configuration`), made at first use."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, cast

from django.core.exceptions import ImproperlyConfigured

from queued_storage.places import place

if TYPE_CHECKING:
    from queued_storage.storage import MirrorStorage, QueuedStorage

#: A mirror's name: it ends its default ledger key (``<key>@<name>``).
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
#: The most mirrors a storage may have.
MAX_MIRRORS = 8
#: What a mirror's target may say when it is a dict.
TARGET_FIELDS = ("storage", "options", "key", "serve")
HINT = (
    'Pass mirrors={"name": "alias-or-dotted.path"} or mirrors={"name": {"storage": '
    '..., "options": {...}, "key": "ledger-key", "serve": False}}.'
)


@dataclass(frozen=True)
class MirrorTarget:
    """One mirror as its storage's ``mirrors`` argument gives it."""

    name: str
    #: A ``STORAGES`` alias or a dotted path to a ``Storage`` class.
    storage: str
    #: The class's options (empty for an alias).
    options: dict[str, Any] = field(default_factory=dict, hash=False)
    #: The ledger key of the mirror's rows.
    key: str = ""
    #: Reads may be served from this mirror (see ``QueuedStorage.serving_mirror``).
    serve: bool = False

    def as_argument(self) -> tuple[str, Any, str, bool]:
        """What makes two mirrors the same (options included: compared, never shown)."""
        return (self.storage, self.options, self.key, self.serve)


class Mirrored:
    """What a queued storage says of its mirrors (``mirror_targets`` is set by
    its constructor from the ``mirrors`` argument)."""

    key: str
    mirror_targets: dict[str, MirrorTarget]

    def mirror_key(self, name: str) -> str:
        """The ledger key of the rows of mirror ``name``."""
        return self.mirror_targets[name].key

    @cached_property
    def mirrors(self) -> dict[str, MirrorStorage]:
        """Each mirror's storage by name, built at first use: a queued storage
        of its own key whose remote is the mirror's target."""
        return {
            name: self._build_mirror(target)
            for name, target in self.mirror_targets.items()
        }

    def _build_mirror(self, target: MirrorTarget) -> MirrorStorage:
        raise ImproperlyConfigured(f"{type(self).__name__} cannot have mirrors.")

    @property
    def destinations(self) -> list[tuple[str, str, QueuedStorage]]:
        """``(mirror name, ledger key, storage)`` of each place every file goes:
        first the primary remote (name ``""``, this storage), then each mirror."""
        primary: list[tuple[str, str, QueuedStorage]] = [
            ("", self.key, cast("QueuedStorage", self))
        ]
        return primary + [(name, m.key, m) for name, m in self.mirrors.items()]


def mirror_key(key: str, name: str, explicit: str | None = None) -> str:
    """The ledger key of mirror ``name`` of the storage ``key``: ``explicit``, or
    ``<key>@<name>``."""
    return explicit if explicit is not None else f"{key}@{name}"


def _refuse(problem: str) -> ImproperlyConfigured:
    return ImproperlyConfigured(f"QueuedStorage mirrors= {problem} {HINT}")


def parse_mirrors(
    value: Any,
    key: str,
    *,
    max_key_length: int,
    taken: dict[str, tuple[str, dict[str, Any]]],
) -> dict[str, MirrorTarget]:
    """The mirrors ``value`` (the argument) gives a storage whose key is ``key``;
    :class:`ImproperlyConfigured`, naming the argument, for what cannot be one.
    ``taken``: the storage's own local and remote, each ``(alias or path,
    options)`` by what to call it, which no mirror may be under any spelling
    :func:`~queued_storage.places.place` sees through."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _refuse(
            f"must be a dict of mirror names to targets, not {type(value).__name__}."
        )
    if len(value) > MAX_MIRRORS:
        raise _refuse(f"has {len(value)} mirrors; at most {MAX_MIRRORS} are allowed.")
    found: dict[str, MirrorTarget] = {}
    keys = {key: "the storage itself"}
    for name, target in value.items():
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise _refuse(
                f"has a mirror named {name!r}: a name is 1 to 64 letters, digits, "
                "'_' or '-'."
            )
        parsed = _target(name, target, key, max_key_length)
        if parsed.key in keys:
            raise _refuse(
                f"gives mirror {name!r} the ledger key {parsed.key!r} of "
                f"{keys[parsed.key]}: each destination needs a key of its own."
            )
        here = place(parsed.storage, parsed.options)
        for what, storage in taken.items():
            if place(*storage) == here:
                raise _refuse(
                    f"mirror {name!r} is {what} itself (perhaps spelled otherwise: "
                    "an alias of it, a trailing slash, another path to the same "
                    "directory): each destination needs a storage of its own."
                )
        keys[parsed.key] = f"mirror {name!r}"
        taken = {**taken, f"mirror {name!r}": (parsed.storage, parsed.options)}
        found[name] = parsed
    serving = [name for name, target in found.items() if target.serve]
    if len(serving) > 1:
        raise _refuse(
            f"marks {len(serving)} mirrors to serve reads ({', '.join(serving)}); "
            "at most one may."
        )
    return found


def _target(name: str, target: Any, key: str, max_key_length: int) -> MirrorTarget:
    what = f"mirror {name!r}"
    if isinstance(target, str):
        target = {"storage": target}
    if not isinstance(target, dict):
        raise _refuse(
            f"{what}: a target is an alias, a dotted path or a dict, not "
            f"{type(target).__name__}."
        )
    unknown = sorted(str(field) for field in target if field not in TARGET_FIELDS)
    if unknown:
        raise _refuse(
            f"{what} has unknown field(s) {', '.join(unknown)}; a target has "
            f"{', '.join(TARGET_FIELDS)}."
        )
    storage = target.get("storage")
    if not isinstance(storage, str) or not storage:
        if storage is None or storage == "":
            got = "nothing"
        elif isinstance(storage, type):
            got = "a class"
        else:
            got = f"a {type(storage).__name__}"
        raise _refuse(
            f"{what} names {got} as its storage: a worker must be able to "
            "build it from code, so give a STORAGES alias or a dotted path to a "
            "Storage class."
        )
    options = target.get("options")
    if options is not None and not isinstance(options, dict):
        raise _refuse(f"{what}: options must be a dict, not {type(options).__name__}.")
    explicit = target.get("key")
    if explicit is not None and (not isinstance(explicit, str) or not explicit.strip()):
        raise _refuse(f"{what}: key must be a non-empty string.")
    ledger_key = mirror_key(key, name, explicit)
    if len(ledger_key) > max_key_length:
        raise _refuse(
            f"{what}: its ledger key {ledger_key[:40]!r}... is longer than "
            f"{max_key_length} characters; give it a shorter key."
        )
    serve = target.get("serve", False)
    if not isinstance(serve, bool):
        raise _refuse(f"{what}: serve must be True or False, not {serve!r}.")
    return MirrorTarget(name, storage, dict(options or {}), ledger_key, serve)
