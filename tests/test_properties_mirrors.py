"""Random interleavings on a storage with mirrors (hypothesis' stateful testing):
the primary remote plus mirror ``backup`` (configured from the start, or added
later and backfilled) and, in some runs, a serving mirror ``new``. Saves,
re-saves and deletes of a few names; workers that drain some rows of one
destination or all of them, claim a row and finish it later (perhaps after its
lease ran out and another worker took it over), or die before or right after
their upload; a destination whose remote fails uploads and deletes for a while;
re-queues from the admin; backfills; the purges after a delete run late.

After every step, per destination: each live name opens (and its URL points at
a copy) with its newest content, each deleted name does not exist, a row marked
done at the newest generation has that content on its remote, a
TransferAndDelete storage keeps its local copy until every destination's row is
done at the newest generation, every row is in a state of the design and within
its attempt limit. Once the workers settle (leases run out, remotes recover,
failed rows are re-queued, a worker drains), every destination holds exactly the
newest content of the live names and nothing of the deleted ones.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from django.core.files.base import ContentFile
from django.db import connections, router, transaction
from django.utils import timezone
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from queued_storage import registry
from queued_storage.backends import QueuedStorage
from queued_storage.mirror_backfill import MirrorBackfill
from queued_storage.models import PendingTransfer
from queued_storage.transfer import process_row
from queued_storage.worker import drain
from tests.helpers import FS, files_under, root_of
from tests.storages import OutageStorage
from tests.tools import IN_CI

Status = PendingTransfer.Status
OUTAGE = "tests.storages.OutageStorage"
NAMES = st.sampled_from(["a.txt", "dir/b.txt", "dir/\u00e9t\u00e9.txt"])
CONTENTS = st.binary(max_size=6)
#: Destinations by mirror name ("" is the primary remote).
DESTINATIONS = st.sampled_from(["", "backup", "new"])
#: Retries after a first attempt (QUEUED_STORAGE_RETRIES): few, so rows fail.
RETRIES = 2
_machines = itertools.count()


class WorkerCrash(BaseException):
    """The worker process dies right after its upload (a BaseException, so the
    engine's ``except Exception`` does not catch it)."""


class MirroredLedgerMachine(RuleBasedStateMachine):
    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root / f"mirrored{next(_machines)}"
        self.storage: QueuedStorage | None = None
        self.task = ""
        self.serving = False
        #: Whether mirror ``backup`` is configured yet (False: added later).
        self.backed_up = True
        #: The content each live name was last saved with.
        self.live: dict[str, bytes] = {}
        #: Names deleted and not saved again since.
        self.deleted: set[str] = set()
        #: Live names whose local copy was gone when ``backup`` was added: their
        #: copy reaches it from the primary's remote, by a backfill.
        self.before_backup: set[str] = set()
        #: Rows claimed by workers that have not finished (or crashed) yet.
        self.claimed: list[PendingTransfer] = []
        #: Purges of committed deletes that have not run yet.
        self.purges: list[Callable[[], None]] = []

    # The storage

    def _location(self, side: str) -> str:
        return str(self.root / side)

    def _build(self) -> QueuedStorage:
        mirrors: dict[str, Any] = {}
        for name, wanted, serve in (
            ("backup", self.backed_up, False),
            ("new", self.serving, True),
        ):
            if wanted:
                options = {
                    "location": self._location(name),
                    "base_url": f"https://{name}.example/",
                }
                mirrors[name] = {"storage": OUTAGE, "options": options, "serve": serve}
        return QueuedStorage(
            FS,
            OUTAGE,
            local_options={
                "location": self._location("local"),
                "base_url": "/media/",
                "allow_overwrite": True,
            },
            remote_options={
                "location": self._location("primary"),
                "base_url": "https://primary.example/",
            },
            task=self.task,
            mirrors=mirrors,
            key=self.root.name,
        )

    @initialize(
        task=st.sampled_from(
            ["queued_storage.tasks.Transfer", "queued_storage.tasks.TransferAndDelete"]
        ),
        serving=st.booleans(),
        backup_later=st.sampled_from([False, False, True]),
    )
    def build(self, task: str, serving: bool, backup_later: bool) -> None:
        self.task = task
        self.serving = serving
        self.backed_up = not backup_later
        self.storage = self._build()

    @property
    def queued(self) -> QueuedStorage:
        assert self.storage is not None
        return self.storage

    @property
    def destinations(self) -> dict[str, QueuedStorage]:
        """Each destination's storage (its ledger key is the storage's key)."""
        return {name: storage for name, _key, storage in self.queued.destinations}

    def _destination(self, name: str) -> QueuedStorage | None:
        return self.destinations.get(name)

    @property
    def keys(self) -> list[str]:
        return [key for _name, key, _storage in self.queued.destinations]

    def teardown(self) -> None:
        OutageStorage.down.clear()
        OutageStorage.after_write = None
        if self.storage is not None:
            try:
                self.settle()
            finally:
                PendingTransfer.objects.filter(storage_key__in=self.keys).delete()
                registry.forget(self.queued.key)
                shutil.rmtree(self.root, ignore_errors=True)

    # What users and admins do

    @rule(name=NAMES, data=CONTENTS)
    def save(self, name: str, data: bytes) -> None:
        assert self.queued.save(name, ContentFile(data)) == name
        self.live[name] = data
        self.deleted.discard(name)
        self.before_backup.discard(name)

    def _known(self) -> bool:
        return bool(self.live or self.deleted)

    @precondition(_known)
    @rule(name=NAMES)
    def delete(self, name: str) -> None:
        self.queued.delete(name)
        self.live.pop(name, None)
        self.deleted.add(name)
        self.before_backup.discard(name)

    @precondition(_known)
    @rule(name=NAMES)
    def delete_purged_later(self, name: str) -> None:
        """A delete commits; its purges (after-commit callbacks, one for each
        destination) run in later steps, as on a busy server."""
        connection = connections[router.db_for_write(PendingTransfer)]
        with transaction.atomic():
            start = len(connection.run_on_commit)
            self.queued.delete(name)
            # Django keeps (savepoint ids, callback, robust): django-stubs has pairs.
            callbacks = [  # type: ignore[misc]
                func for _ids, func, _robust in connection.run_on_commit[start:]
            ]
            del connection.run_on_commit[start:]
        self.purges.extend(callbacks)
        self.live.pop(name, None)
        self.deleted.add(name)
        self.before_backup.discard(name)

    @precondition(lambda self: self.purges)
    @rule(pick=st.integers(min_value=0))
    def purge(self, pick: int) -> None:
        # Each callback logs its own failure (redaction.after_commit).
        self.purges.pop(pick % len(self.purges))()

    @precondition(_known)
    @rule(name=NAMES)
    def transfer(self, name: str) -> None:
        self.queued.transfer(name)

    @precondition(_known)
    @rule(destination=DESTINATIONS)
    def requeue(self, destination: str) -> None:
        """The admin re-queues a destination's held and failed rows."""
        target = self._destination(destination)
        if target is not None:
            PendingTransfer.objects.filter(storage_key=target.key).requeue()

    @precondition(lambda self: not self.backed_up)
    @rule()
    def add_backup(self) -> None:
        """Mirror ``backup`` is added to the storage in use (a deploy: the
        storage is built again) and a backfill queues the copies it misses."""
        self.before_backup = {
            name for name in self.live if not self.queued.local.exists(name)
        }
        registry.forget(self.queued.key)
        self.backed_up = True
        self.storage = self._build()
        MirrorBackfill(self.queued).run()

    @precondition(lambda self: self.backed_up and self._known())
    @rule()
    def backfill(self) -> None:
        MirrorBackfill(self.queued).run()

    # What remotes do

    @rule(destination=DESTINATIONS, down=st.booleans())
    def outage(self, destination: str, down: bool) -> None:
        """A destination's remote fails every upload and delete from now on, or
        recovers."""
        target = self._destination(destination)
        if target is None:
            return
        location = str(root_of(target.remote))
        if down:
            OutageStorage.down.add(location)
        else:
            OutageStorage.down.discard(location)

    # What workers do

    def _claim(self, destination: str, limit: int) -> list[PendingTransfer]:
        target = self._destination(destination)
        if target is None:
            return []
        return PendingTransfer.objects.filter(storage_key=target.key).claim_due(
            limit=limit, lease=300
        )

    @precondition(_known)
    @rule(destination=DESTINATIONS, limit=st.integers(min_value=1, max_value=3))
    def drain_some(self, destination: str, limit: int) -> None:
        """A worker claims a few of one destination's due rows and moves them."""
        for row in self._claim(destination, limit):
            process_row(row)

    @precondition(_known)
    @rule()
    def drain_all(self) -> None:
        drain(keys=self.keys)

    @precondition(_known)
    @rule(destination=DESTINATIONS)
    def claim(self, destination: str) -> None:
        """A worker claims a row and finishes (or dies) in a later step."""
        self.claimed.extend(self._claim(destination, 1))

    @precondition(lambda self: self.claimed)
    @rule(pick=st.integers(min_value=0))
    def complete_claim(self, pick: int) -> None:
        """The worker finishes; its lease may have run out and another worker
        taken the row over meanwhile: then it must lose."""
        process_row(self.claimed.pop(pick % len(self.claimed)))

    @precondition(lambda self: self.claimed)
    @rule(pick=st.integers(min_value=0), after_upload=st.booleans())
    def crash(self, pick: int, after_upload: bool) -> None:
        """The worker dies before its upload or right after it; its row stays
        transferring until the lease runs out."""
        row = self.claimed.pop(pick % len(self.claimed))
        if not after_upload:
            return

        def die(saved: str) -> None:
            raise WorkerCrash(saved)

        OutageStorage.after_write = die
        try:
            process_row(row)
        except WorkerCrash:
            pass
        finally:
            OutageStorage.after_write = None

    @precondition(lambda self: self.claimed)
    @rule(pick=st.integers(min_value=0))
    def answer_lost(self, pick: int) -> None:
        """The remote writes the upload's bytes, then the connection drops before
        it answers: the row is retried."""

        def fail(saved: str) -> None:
            raise ConnectionError(f"connection reset ({saved})")

        OutageStorage.after_write = fail
        try:
            process_row(self.claimed.pop(pick % len(self.claimed)))
        finally:
            OutageStorage.after_write = None

    @precondition(_known)
    @rule()
    def leases_run_out(self) -> None:
        """Time passes: every lease, a live worker's too, runs out."""
        PendingTransfer.objects.filter(
            storage_key__in=self.keys, status=Status.TRANSFERRING
        ).update(lease_expires_at=timezone.now() - timedelta(seconds=1))

    @precondition(_known)
    @rule()
    def settle(self) -> None:
        """Every worker with a claim is gone, the leases run out, the remotes
        recover, the admin re-queues what failed or waits, a worker drains."""
        self.claimed.clear()
        OutageStorage.down.clear()
        while self.purges:
            self.purges.pop()()
        self.leases_run_out()
        PendingTransfer.objects.filter(storage_key__in=self.keys).requeue()
        drain(keys=self.keys)
        self.check_settled()

    # What must hold

    def _rows(self) -> dict[tuple[str, str], PendingTransfer]:
        by_key = {key: name for name, key, _storage in self.queued.destinations}
        return {
            (by_key[row.storage_key], row.name): row
            for row in PendingTransfer.objects.filter(storage_key__in=self.keys)
        }

    @invariant()
    def live_names_read_their_newest_content(self) -> None:
        if self.storage is None:
            return
        storage = self.queued
        places = {"/media/": root_of(storage.local)} | {
            f"https://{destination or 'primary'}.example/": root_of(target.remote)
            for destination, target in self.destinations.items()
        }
        for name, data in self.live.items():
            assert storage.exists(name), name
            with storage.open(name) as opened:
                assert opened.read() == data, name
            assert storage.size(name) == len(data), name
            url = storage.url(name)
            [base] = [base for base in places if url.startswith(base)]
            served = places[base] / unquote(url[len(base) :])
            assert served.read_bytes() == data, (name, url)
        for name in self.deleted:
            assert not storage.exists(name), name
            with pytest.raises(FileNotFoundError):
                storage.open(name)

    @invariant()
    def verified_copies_hold_the_newest_content(self) -> None:
        """Nothing lost: a done row at the newest generation vouches for its
        destination's copy; TransferAndDelete keeps the local copy until every
        destination's row does."""
        if self.storage is None:
            return
        rows = self._rows()
        local = self.queued.local
        for name, data in self.live.items():
            newest = rows[("", name)].generation
            verified = {
                destination
                for destination in self.destinations
                if (row := rows.get((destination, name))) is not None
                and row.status == Status.DONE
                and not row.deleted
                and row.generation == newest
            }
            for destination in verified:
                remote = self.destinations[destination].remote
                with remote.open(name) as opened:
                    assert opened.read() == data, (destination, name)
            everywhere = verified == set(self.destinations)
            if name in self.before_backup:
                everywhere = verified >= set(self.destinations) - {"backup"}
            if not self.queued.task_class.delete_local or not everywhere:
                assert local.exists(name), (name, sorted(verified))
            if local.exists(name):
                with local.open(name) as opened:
                    assert opened.read() == data, name

    @invariant()
    def rows_are_in_states_of_the_design(self) -> None:
        if self.storage is None:
            return
        for (destination, name), row in self._rows().items():
            assert row.status in Status.values, row
            assert 0 <= row.attempts <= RETRIES + 1, (destination, name, row.attempts)
            if row.status == Status.TRANSFERRING:
                assert row.lease_token and row.lease_expires_at is not None, row

    def check_settled(self) -> None:
        rows = self._rows()
        expected = {(d, name) for d in self.destinations for name in self.live}
        assert set(rows) == expected, sorted(rows)
        for (destination, name), row in rows.items():
            assert row.status == Status.DONE, (destination, name, row.last_error)
            assert not row.deleted, (destination, name)
            assert row.generation == rows[("", name)].generation, (destination, name)
        for destination, target in self.destinations.items():
            remote = target.remote
            assert set(files_under(root_of(remote))) == set(self.live), destination
            for name, data in self.live.items():
                with remote.open(name) as opened:
                    assert opened.read() == data, (destination, name)
        local = set(files_under(root_of(self.queued.local)))
        if self.queued.task_class.delete_local:
            assert local == set()
        else:
            assert local == set(self.live)
        self.before_backup.clear()


@pytest.mark.django_db(transaction=True)
def test_random_interleavings_on_mirrors_keep_the_invariants(
    tmp_path: Path, settings: Any
) -> None:
    # Failed transfers are due again at once, so that a drain retries them; no
    # circuit breaker, so that a drain does not wait for a probe.
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    settings.QUEUED_STORAGE_RETRIES = RETRIES
    settings.QUEUED_STORAGE_BREAKER_FAILURES = 0
    settings.QUEUED_STORAGE_WORKER = None
    run_state_machine_as_test(
        lambda: MirroredLedgerMachine(tmp_path),  # type: ignore[arg-type]
        settings=hypothesis_settings(
            max_examples=int(os.environ.get("QUEUED_STORAGE_PROPERTY_EXAMPLES", 20)),
            stateful_step_count=40,
            deadline=None,
            database=None,
            derandomize=IN_CI,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


# Regression tests: what the state machine found, minimised.


@pytest.mark.django_db(transaction=True)
def test_a_late_purge_never_takes_a_tombstone_past_its_attempt_limit(
    make_storage: Callable[..., QueuedStorage], settings: Any
) -> None:
    """A delete commits; its remote is down, so workers use up the tombstone's
    attempts (FAILED); then the delete's own purge runs (late, after commit) and
    fails too: the row must stay within its attempt limit."""
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    settings.QUEUED_STORAGE_RETRIES = RETRIES
    settings.QUEUED_STORAGE_BREAKER_FAILURES = 0
    storage = make_storage(remote=OUTAGE)
    name = storage.save("a.txt", ContentFile(b"payload"))
    drain(keys=[storage.key])
    connection = connections[router.db_for_write(PendingTransfer)]
    with transaction.atomic():
        start = len(connection.run_on_commit)
        storage.delete(name)
        purges = [  # type: ignore[misc]
            func for _ids, func, _robust in connection.run_on_commit[start:]
        ]
        del connection.run_on_commit[start:]
    OutageStorage.down.add(str(root_of(storage.remote)))
    try:
        drain(keys=[storage.key])
        row = PendingTransfer.objects.for_name(storage.key, name).get()
        assert (row.status, row.attempts) == (Status.FAILED, RETRIES + 1)

        for purge in purges:
            purge()
    finally:
        OutageStorage.down.clear()

    row = PendingTransfer.objects.for_name(storage.key, name).get()
    assert row.attempts <= RETRIES + 1, (row.status, row.attempts)
