"""Which ledger keys are the destinations of one storage: its own remote's (the
primary) and each of its mirrors' (``<key>@<name>`` or the mirror's own key).
Every view of the ledger (the admin, the dashboard, ``transfer_status``, the
metrics) shows a mirror's key grouped under its primary's with this module's
order and labels. Read from the storages this process knows (the registry),
never from the database: it costs no query."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from django.utils.translation import gettext

from queued_storage import registry


@dataclass(frozen=True)
class Destination:
    """Ledger key ``key``: the primary of storage ``primary`` (``mirror`` empty),
    or its mirror named ``mirror``."""

    key: str
    primary: str
    mirror: str = ""
    #: The mirror's position among its storage's mirrors (their configured order).
    position: int = 0

    @property
    def is_mirror(self) -> bool:
        return bool(self.mirror)

    def label(self) -> str:
        """``media``, or ``media → backup (mirror)``."""
        if not self.mirror:
            return self.key
        return gettext("%(primary)s → %(mirror)s (mirror)") % {
            "primary": self.primary,
            "mirror": self.mirror,
        }

    def short_label(self) -> str:
        """What a line under its primary's says: ``→ backup (mirror)``."""
        if not self.mirror:
            return self.key
        return gettext("→ %(mirror)s (mirror)") % {"mirror": self.mirror}

    def sort_key(self) -> tuple[str, int, int, str]:
        return (self.primary, int(self.is_mirror), self.position, self.key)


def known() -> dict[str, Destination]:
    """The destination of each key this process knows to be a primary with
    mirrors or a mirror, by key (a key without mirrors is not in it)."""
    registry.discover()
    found: dict[str, Destination] = {}
    for storage in registry.registered():
        primary = storage.primary
        if primary is not None:
            position = list(primary.mirror_targets).index(storage.mirror_name)
            found.setdefault(
                storage.key,
                Destination(storage.key, primary.key, storage.mirror_name, position),
            )
            continue
        for position, (name, target) in enumerate(storage.mirror_targets.items()):
            found[target.key] = Destination(target.key, storage.key, name, position)
        if storage.mirror_targets:
            found.setdefault(storage.key, Destination(storage.key, storage.key))
    return found


def of(key: str, found: dict[str, Destination] | None = None) -> Destination:
    """The destination ``key`` is: a mirror's, or a primary's (any other key)."""
    found = known() if found is None else found
    return found.get(key) or Destination(key, key)


def grouped(
    keys: Iterable[str], found: dict[str, Destination] | None = None
) -> list[Destination]:
    """The destinations of ``keys``, each storage's mirrors after it (in the
    order they are configured), storages by key."""
    found = known() if found is None else found
    return sorted((of(key, found) for key in set(keys)), key=Destination.sort_key)


def of_storage(key: str, found: dict[str, Destination] | None = None) -> list[str]:
    """The ledger keys of every destination of the storage ``key`` is one of
    (the primary first, then its mirrors); ``[key]`` for a key without mirrors."""
    found = known() if found is None else found
    primary = of(key, found).primary
    members = [d for d in found.values() if d.primary == primary]
    if not members:
        return [key]
    return [d.key for d in sorted(members, key=Destination.sort_key)]
