"""Random interleavings of what users and workers do to a few names (hypothesis'
stateful testing): saves, re-saves, deletes, transfer(), other spellings of the names (refused,
or acting on the name they spell), worker steps, claims
completed later, workers that crash before or after their upload, races in the
moment between a worker's upload and its ledger update, leases running out (also
of a live worker that another worker overtakes), and the purge after a delete run
later, with the name saved (and transferred) again before or during it.

After every step each live name opens with its last saved content and each
deleted name does not exist. Once the workers settle (leases run out, a worker
drains), deleted names exist nowhere and the remote holds exactly the live names.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import unicodedata
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import SuspiciousFileOperation
from django.core.files.base import ContentFile
from django.db import connections, router, transaction
from django.utils import timezone
from hypothesis import HealthCheck, assume
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
from queued_storage.errors import Outcome
from queued_storage.models import PendingTransfer
from queued_storage.transfer import process_row
from queued_storage.worker import drain
from tests.helpers import FS, files_under, root_of
from tests.storages import HookedStorage
from tests.tools import IN_CI

Status = PendingTransfer.Status
NAMES = st.sampled_from(["a.txt", "dir/b.txt", "dir/\u00e9t\u00e9.txt"])
CONTENTS = st.binary(max_size=6)
ACTIONS = st.sampled_from(["resave", "delete", "delete-then-save"])
#: Spellings of a name that are not names: every entry point refuses them.
NOT_NAMES = st.sampled_from(["./{}", "{}/", "x/../{}", "/{}", "{}/.", "dir//{}"])
#: Entry points, called as an application would with a spelling of a name.
CALLS: dict[str, Callable[[QueuedStorage, str], Any]] = {
    "save": lambda storage, name: storage.save(name, ContentFile(b"stray")),
    "delete": QueuedStorage.delete,
    "transfer": QueuedStorage.transfer,
    "exists": QueuedStorage.exists,
    "open": lambda storage, name: storage.open(name).close(),
    "size": QueuedStorage.size,
    "url": QueuedStorage.url,
    "listdir": QueuedStorage.listdir,
}
_machines = itertools.count()


class WorkerCrash(BaseException):
    """The worker process dies: nothing after this line of the engine runs
    (a BaseException, so the engine's ``except Exception`` does not catch it)."""


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root / f"machine{next(_machines)}"
        self.storage: QueuedStorage | None = None
        #: The content each live name was last saved with.
        self.live: dict[str, bytes] = {}
        #: Names deleted and not saved again since.
        self.deleted: set[str] = set()
        #: Rows claimed by workers that have not finished (or crashed) yet.
        self.claimed: list[PendingTransfer] = []
        #: Purges of committed deletes that have not run yet, with their names.
        self.purges: list[tuple[str, Callable[[], None]]] = []

    @initialize(
        delayed=st.sampled_from([False, False, True]),
        task=st.sampled_from(
            ["queued_storage.tasks.Transfer", "queued_storage.tasks.TransferAndDelete"]
        ),
        verify_checksum=st.booleans(),
    )
    def build(self, delayed: bool, task: str, verify_checksum: bool) -> None:
        self.storage = QueuedStorage(
            FS,
            "tests.storages.HookedStorage",
            local_options={
                "location": str(self.root / "local"),
                "allow_overwrite": True,
            },
            remote_options={"location": str(self.root / "remote")},
            delayed=delayed,
            task=task,
            verify_checksum=verify_checksum,
            key=self.root.name,
        )

    @property
    def queued(self) -> QueuedStorage:
        assert self.storage is not None
        return self.storage

    def teardown(self) -> None:
        HookedStorage.before_write = HookedStorage.after_write = None
        HookedStorage.before_delete = None
        if self.storage is not None:
            try:
                self.run_purges()
                self.settle()
            finally:
                PendingTransfer.objects.filter(storage_key=self.storage.key).delete()
                registry.forget(self.storage.key)
                shutil.rmtree(self.root, ignore_errors=True)

    # What users do

    def _save(self, name: str, data: bytes) -> None:
        assert self.queued.save(name, ContentFile(data)) == name
        self.live[name] = data
        self.deleted.discard(name)

    def _delete(self, name: str) -> None:
        self.queued.delete(name)
        self.live.pop(name, None)
        self.deleted.add(name)

    @rule(name=NAMES, data=CONTENTS)
    def save(self, name: str, data: bytes) -> None:
        self._save(name, data)

    def _known(self) -> bool:
        return bool(self.live or self.deleted)

    @precondition(_known)
    @rule(name=NAMES)
    def delete(self, name: str) -> None:
        self._delete(name)

    @precondition(_known)
    @rule(name=NAMES)
    def transfer(self, name: str) -> None:
        self.queued.transfer(name)

    # What workers do

    def _claim(self) -> PendingTransfer | None:
        rows = PendingTransfer.objects.filter(storage_key=self.queued.key).claim_due(
            limit=1, lease=300
        )
        return rows[0] if rows else None

    @precondition(_known)
    @rule(takeover=st.booleans())
    def worker_step(self, takeover: bool) -> None:
        """A worker claims a row and transfers it; with ``takeover``, the leases
        of the workers before it ran out first."""
        if takeover:
            self._expire_leases()
        row = self._claim()
        if row is not None:
            process_row(row)

    @precondition(_known)
    @rule(takeover=st.booleans())
    def claim(self, takeover: bool) -> None:
        """A worker claims a row and finishes (or crashes) in a later step."""
        if takeover:
            self._expire_leases()
        row = self._claim()
        if row is not None:
            self.claimed.append(row)

    @precondition(lambda self: self.claimed)
    @rule(pick=st.integers(min_value=0))
    def complete_claim(self, pick: int) -> None:
        process_row(self.claimed.pop(pick % len(self.claimed)))

    @precondition(lambda self: self.claimed)
    @rule(pick=st.integers(min_value=0), after_upload=st.booleans())
    def crash(self, pick: int, after_upload: bool) -> None:
        """The worker dies, before its upload or right after it; its row keeps
        the lease until it runs out."""
        row = self.claimed.pop(pick % len(self.claimed))
        if not after_upload:
            return

        def die(saved: str) -> None:
            raise WorkerCrash(saved)

        HookedStorage.after_write = die
        try:
            process_row(row)
        except WorkerCrash:
            pass
        finally:
            HookedStorage.after_write = None

    @precondition(lambda self: self.claimed)
    @rule(pick=st.integers(min_value=0), resave=st.booleans(), data=CONTENTS)
    def overtaken(self, pick: int, resave: bool, data: bytes) -> None:
        """A live worker stalls past its lease (GC, swap); another worker takes
        the row over and finishes it, the name is perhaps saved again and moved
        too; then the stalled worker carries on. It must lose everywhere."""
        late = self.claimed.pop(pick % len(self.claimed))
        PendingTransfer.objects.filter(pk=late.pk).update(
            lease_expires_at=timezone.now() - timedelta(seconds=1)
        )
        taker = self._claim()
        if taker is not None:
            process_row(taker)
        if resave and late.name in self.live:
            self._save(late.name, data)
            again = self._claim()
            if again is not None:
                process_row(again)
        process_row(late)

    @precondition(lambda self: self.claimed)
    @rule(pick=st.integers(min_value=0), written=st.booleans())
    def upload_fails(self, pick: int, written: bool) -> None:
        """The remote fails the upload: before any byte is written, or after all
        of them (the answer was lost); the row is retried."""

        def fail(saved: str) -> None:
            raise ConnectionError(f"remote unreachable ({saved})")

        if written:
            HookedStorage.after_write = fail
        else:
            HookedStorage.before_write = fail
        try:
            process_row(self.claimed.pop(pick % len(self.claimed)))
        finally:
            HookedStorage.before_write = HookedStorage.after_write = None

    @precondition(lambda self: self.claimed)
    @rule(pick=st.integers(min_value=0), action=ACTIONS, data=CONTENTS)
    def race_after_upload(self, pick: int, action: str, data: bytes) -> None:
        """A user acts on the name after the worker uploaded it and before the
        worker records the upload in the ledger."""
        row = self.claimed.pop(pick % len(self.claimed))

        def act(saved: str) -> None:
            if action in ("delete", "delete-then-save"):
                self._delete(row.name)
            if action in ("resave", "delete-then-save"):
                self._save(row.name, data)

        HookedStorage.after_write = act
        try:
            process_row(row)
        finally:
            HookedStorage.after_write = None

    @rule(name=NAMES, spelling=NOT_NAMES, call=st.sampled_from(sorted(CALLS)))
    def misspell(self, name: str, spelling: str, call: str) -> None:
        """A spelling that is not a name changes nothing (the invariants check the
        names it seems to point at)."""
        # A directory may be spelled with its trailing slash.
        assume(not (call == "listdir" and spelling == "{}/"))
        with pytest.raises(SuspiciousFileOperation):
            CALLS[call](self.queued, spelling.format(name))

    @precondition(_known)
    @rule(name=NAMES)
    def delete_purged_later(self, name: str) -> None:
        """A delete commits; its purge (an after-commit callback) runs in a later
        step, as on a busy server or after a slow commit."""
        connection = connections[router.db_for_write(PendingTransfer)]
        with transaction.atomic():
            start = len(connection.run_on_commit)
            self.queued.delete(name)
            # Django keeps (savepoint ids, callback, robust): django-stubs has pairs.
            callbacks = [  # type: ignore[misc]
                func for _ids, func, _robust in connection.run_on_commit[start:]
            ]
            del connection.run_on_commit[start:]
        self.purges.extend((name, func) for func in callbacks)
        self.live.pop(name, None)
        self.deleted.add(name)

    def _purge(self, pick: int) -> tuple[str, Callable[[], None]]:
        return self.purges.pop(pick % len(self.purges))

    def _run_purge(self, purge: Callable[[], None]) -> None:
        # Django runs these robustly: a failure is logged, the commit stands, and
        # the tombstone stays due for a worker (which settle() checks).
        with contextlib.suppress(Exception):
            purge()

    @precondition(lambda self: self.purges)
    @rule(pick=st.integers(min_value=0))
    def purge(self, pick: int) -> None:
        self._run_purge(self._purge(pick)[1])

    @precondition(lambda self: self.purges)
    @rule(pick=st.integers(min_value=0), data=CONTENTS, transferred=st.booleans())
    def resave_during_purge(self, pick: int, data: bytes, transferred: bool) -> None:
        """The deleted name is saved again (and, with ``transferred``, a worker
        moves it) just as the purge of the deleted version removes the remote
        copy: the newer version must survive on every side."""
        name, purge = self._purge(pick)

        def resave(deleting: str) -> None:
            self._save(name, data)
            if transferred:
                row = self._claim()
                if row is not None:
                    process_row(row)

        HookedStorage.before_delete = resave
        try:
            self._run_purge(purge)
        finally:
            HookedStorage.before_delete = None

    def run_purges(self) -> None:
        while self.purges:
            self._run_purge(self._purge(0)[1])

    #: Other spellings of a name that are that name: they act on it, never beside it.
    SPELLINGS = {
        "dir\\b.txt": "dir/b.txt",
        unicodedata.normalize("NFD", "dir/\u00e9t\u00e9.txt"): "dir/\u00e9t\u00e9.txt",
    }

    @rule(
        spelling=st.sampled_from(sorted(SPELLINGS)),
        data=CONTENTS,
        call=st.sampled_from(["save", "delete", "transfer", "open"]),
    )
    def spell_otherwise(self, spelling: str, data: bytes, call: str) -> None:
        """``dir\\b.txt`` is ``dir/b.txt``, and a name in Unicode NFD is its NFC
        spelling: each acts on that file only."""
        name = self.SPELLINGS[spelling]
        if call == "save":
            assert self.queued.save(spelling, ContentFile(data)) == name
            self.live[name] = data
            self.deleted.discard(name)
        elif call == "delete":
            self.queued.delete(spelling)
            self.live.pop(name, None)
            self.deleted.add(name)
        elif call == "open" and name in self.live:
            with self.queued.open(spelling) as opened:
                assert opened.read() == self.live[name]
        elif call == "open":
            with pytest.raises(FileNotFoundError):
                self.queued.open(spelling)
        else:
            self.queued.transfer(spelling)

    def _expire_leases(self) -> None:
        PendingTransfer.objects.filter(
            storage_key=self.queued.key, status=Status.TRANSFERRING
        ).update(lease_expires_at=timezone.now() - timedelta(seconds=1))

    @precondition(_known)
    @rule()
    def settle(self) -> None:
        """Every worker with a claim is gone, the leases run out, a worker drains
        (held rows are queued first, as the admin's re-queue would)."""
        self.claimed.clear()
        self.run_purges()
        self._expire_leases()
        for name in self.live:
            self.queued.transfer(name)
        drain(keys=[self.queued.key])
        self.check_settled()

    # What must hold

    @invariant()
    def names_open_with_their_last_content(self) -> None:
        if self.storage is None:
            return
        for name, data in self.live.items():
            assert self.queued.exists(name), name
            with self.queued.open(name) as opened:
                assert opened.read() == data, name
            assert self.queued.size(name) == len(data), name
        for name in self.deleted:
            assert not self.queued.exists(name), name

    def check_settled(self) -> None:
        rows = {
            row.name: row
            for row in PendingTransfer.objects.filter(storage_key=self.queued.key)
        }
        assert set(rows) == set(self.live), rows
        for row in rows.values():
            assert row.status == Status.DONE, (row, row.last_error)
            assert not row.deleted, row
        remote = self.queued.remote
        assert set(files_under(root_of(remote))) == set(self.live)
        for name, data in self.live.items():
            with remote.open(name) as opened:
                assert opened.read() == data, name
        local = set(files_under(root_of(self.queued.local)))
        if self.queued.task_class.delete_local:
            assert local == set()
        else:
            assert local == set(self.live)
        for name in self.deleted:
            assert not self.queued.local.exists(name), name
            assert not remote.exists(name), name


@pytest.mark.django_db(transaction=True)
def test_random_interleavings_keep_the_invariants(
    tmp_path: Path, settings: Any
) -> None:
    # Failed transfers are due again at once, so that a drain retries them.
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    settings.QUEUED_STORAGE_WORKER = None
    run_state_machine_as_test(
        lambda: LedgerMachine(tmp_path),  # type: ignore[arg-type]
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


def _expire(row: PendingTransfer) -> None:
    PendingTransfer.objects.filter(pk=row.pk).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1)
    )


def _claim_one() -> PendingTransfer:
    [row] = PendingTransfer.objects.claim_due(limit=1, lease=300)
    return row


@pytest.mark.django_db(transaction=True)
def test_a_late_worker_never_deletes_the_copy_a_newer_worker_finished(
    make_storage: Callable[..., QueuedStorage],
) -> None:
    """Lease taken over, the taker finishes (and drops the local copy), then the
    late worker wakes up: it must not remove the only copy left."""
    storage = make_storage(task="queued_storage.tasks.TransferAndDelete")
    name = storage.save("a.txt", ContentFile(b"payload"))
    _expire(_claim_one())  # a first worker died before uploading
    late = _claim_one()  # knows an earlier attempt may have written the remote
    _expire(late)  # ...and stalls past its lease
    taker = _claim_one()
    assert process_row(taker) is Outcome.DONE
    assert not storage.local.exists(name)

    process_row(late)

    assert storage.remote.exists(name)
    with storage.open(name) as opened:
        assert opened.read() == b"payload"


@pytest.mark.django_db(transaction=True)
def test_a_late_upload_after_delete_and_resave_does_not_fail_the_new_row(
    make_storage: Callable[..., QueuedStorage],
) -> None:
    """A worker's lease ran out; the name was deleted and saved again (a new row);
    the late worker uploads the new local file, loses, and leaves the object.
    The new row must not then fail with a conflict over an object the ledger put
    there: the new content must reach the remote."""
    storage = make_storage(local_options={"allow_overwrite": True})
    name = storage.save("a.txt", ContentFile(b"old"))
    late = _claim_one()
    _expire(late)
    storage.delete(name)
    assert storage.save("a.txt", ContentFile(b"new content")) == name

    assert process_row(late) is Outcome.STALE
    drain(keys=[storage.key])

    row = PendingTransfer.objects.for_name(storage.key, name).get()
    assert row.status == Status.DONE, row.last_error
    with storage.remote.open(name) as opened:
        assert opened.read() == b"new content"


@pytest.mark.django_db(transaction=True)
def test_a_worker_purging_a_deleted_name_spares_a_save_made_since_its_claim(
    make_storage: Callable[..., QueuedStorage],
) -> None:
    """A worker claimed the tombstone of a deleted name; the name is saved again
    before the worker gets to it. The purge must not delete the new file."""
    storage = make_storage(local_options={"allow_overwrite": True})
    name = storage.save("a.txt", ContentFile(b"old"))
    holder = _claim_one()  # a worker is uploading it...
    storage.delete(name)  # ...so the tombstone waits for its lease
    _expire(holder)
    purger = _claim_one()  # another worker takes the tombstone over
    assert purger.deleted
    assert storage.save("a.txt", ContentFile(b"new")) == name

    process_row(purger)

    with storage.open(name) as opened:
        assert opened.read() == b"new"
    drain(keys=[storage.key])
    row = PendingTransfer.objects.for_name(storage.key, name).get()
    assert row.status == Status.DONE, row.last_error
    with storage.remote.open(name) as opened:
        assert opened.read() == b"new"
