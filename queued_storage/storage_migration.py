"""Driving a storage's move to a new remote through its serving mirror: the
mirror's backfill (paced), then the migration's progress watched until every live
file is verified on the new remote or nothing moves on without a person; and the
``STORAGES`` entry to switch to. Everything it knows is in the ledger, so a run
stopped at any moment resumes when run again."""

from __future__ import annotations

import ast
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from django.conf import settings
from django.core.files.storage import storages

from queued_storage import mirror_backfill
from queued_storage.migration import MigrationProgress, progress, switch_arguments
from queued_storage.mirror_backfill import (
    DEFAULT_PAGE_SIZE,
    BackfillCounts,
    MirrorBackfill,
)
from queued_storage.storage import class_path

if TYPE_CHECKING:
    from queued_storage.storage import MirrorStorage, QueuedStorage


class NotServing(ValueError):
    """The mirror asked for does not serve reads: no migration runs through it."""


@dataclass
class StorageMigration:
    """Move the files of ``storage`` to the remote of its serving mirror
    ``mirror_name``, queuing at most ``max_rate`` bytes and ``max_files`` files a
    second (None: no limit); the mirror's workers copy them."""

    storage: QueuedStorage
    mirror_name: str
    max_rate: float | None = None
    max_files: float | None = None
    page_size: int = DEFAULT_PAGE_SIZE
    #: What the backfills of this run queued, added up (a second one runs for
    #: files that reached the old remote without a copy queued, e.g. adopted).
    queued: BackfillCounts = field(default_factory=BackfillCounts)

    def __post_init__(self) -> None:
        target = self.storage.mirror_targets[self.mirror_name]
        if not target.serve:
            raise NotServing(
                f"The mirror {self.mirror_name!r} of {self.storage.key!r} does not "
                'serve reads: give it "serve": True (and a "key" of its own) to '
                "migrate to it, so that each file is served from the new remote "
                "once it is verified there."
            )

    @property
    def mirror(self) -> MirrorStorage:
        return self.storage.mirrors[self.mirror_name]

    @property
    def mirror_key(self) -> str:
        return self.storage.mirror_key(self.mirror_name)

    def progress(self) -> MigrationProgress:
        """How far the copy has come, in one query."""
        return progress(self.storage.key, self.mirror_key)

    def backfill(self, after_chunk: Callable[[], object] | None = None) -> int:
        """Queue the copy of each file the new remote lacks; how many were."""
        backfill = MirrorBackfill(
            self.storage,
            [self.mirror_name],
            max_rate=self.max_rate,
            max_files=self.max_files,
            page_size=self.page_size,
        )
        # One tally of what this run queued, however often it backfills.
        backfill.counts = self.queued
        before = self.queued.queued
        self.queued.total = self.queued.scanned = 0
        backfill.run(after_chunk=after_chunk)
        return self.queued.queued - before

    def run(
        self, every: float, looked: Callable[[], object] | None = None
    ) -> MigrationProgress:
        """Backfill, then look every ``every`` seconds until every live file is
        verified on the new remote, or no file that is not can get there without
        a person (failed copies, files that failed on the old remote). ``looked``
        hears of each chunk queued and each look (for a progress line)."""
        self.backfill(after_chunk=looked)
        while True:
            found = self.progress()
            if looked is not None:
                looked()
            if found.ready:
                return found
            if not found.in_motion:
                # Done on the old remote with no copy queued (adopted, or done
                # since the backfill read it by a path that queues none): queue
                # them; stop when nothing more can be.
                if not found.missing or not self.backfill(after_chunk=looked):
                    return found
                continue
            mirror_backfill.pause(every)

    def switch_to(self) -> str:
        """The ``STORAGES`` entry of the storage after the switch: the mirror's
        remote and key (its rows are the storage's rows from then on), the
        storage's other arguments as they are. No option's value is quoted."""
        arguments = switch_arguments(self.storage, self.mirror)
        options = []
        for name, source in arguments.items():
            value, _sep, comment = source.partition("  # ")
            if value != "...":
                value = _literal(value)
            options.append(
                f'        "{name}": {value},' + (f"  # {comment}" if comment else "")
            )
        others = [
            name for name in self.storage.mirror_targets if name != self.mirror_name
        ]
        if others:
            keys = ", ".join(
                f"{json.dumps(name)}: {json.dumps(self.storage.mirror_key(name))}"
                for name in others
            )
            options.append(
                '        "mirrors": ...,  # the other mirrors as now, each with its '
                f'"key" as now: {keys}'
            )
        cls = type(self.storage)
        return "\n".join(
            [
                f"{json.dumps(storage_alias(self.storage))}: {{",
                f'    "BACKEND": "{class_path(cls)}",',
                '    "OPTIONS": {',
                *options,
                "    },",
                "},",
            ]
        )


def _literal(source: str) -> str:
    """A value of :func:`switch_arguments` (the Python source of a string or a
    flag) as settings write it: a string in double quotes."""
    value = ast.literal_eval(source)
    return json.dumps(value) if isinstance(value, str) else repr(value)


def storage_alias(storage: QueuedStorage) -> str:
    """The ``STORAGES`` alias of ``storage`` (by key); its key when no alias has
    it (a model field's storage)."""
    for alias in settings.STORAGES:
        try:
            found = storages[alias]
        except Exception:  # reported by the system checks, and not this storage
            continue
        if getattr(found, "key", None) == storage.key:
            return alias
    return storage.key
