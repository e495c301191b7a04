"""One definition each of what several parts of the package ask the ledger: which
rows a host may take (the host rule), which statuses an operator may queue again,
and how many rows each status has."""

from __future__ import annotations

import json
from collections.abc import Callable
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.db import router, transaction
from django.test import Client
from django.urls import reverse

from queued_storage import adoption
from queued_storage.backends import QueuedStorage
from queued_storage.management.commands.requeue_transfers import (
    Command as RequeueCommand,
)
from queued_storage.models import REQUEUEABLE, PendingTransfer
from queued_storage.worker import drain
from tests.factories import pending_row
from tests.helpers import content

pytestmark = pytest.mark.django_db

Status = PendingTransfer.Status
Make = Callable[..., QueuedStorage]

# The host rule


@pytest.mark.parametrize(
    ("host", "shared", "here"),
    [
        ("web-1", False, True),  # this host's own row
        ("web-2", False, False),  # another host's disk
        ("", False, True),  # no host recorded: no disk is the wrong one
        ("web-2", True, True),  # a shared local storage: every host reaches all
        ("", True, True),
    ],
)
def test_the_host_rule_in_python_and_in_sql_agree(
    settings: Any, host: str, shared: bool, here: bool
) -> None:
    settings.QUEUED_STORAGE_HOSTNAME = "web-1"
    row = pending_row(storage_key="k", host=host)

    host_local = [] if shared else ["k"]
    reachable = PendingTransfer.objects.reachable_here(host_local)

    assert row.local_copy_here(local_shared=shared) is here
    assert reachable.filter(pk=row.pk).exists() is here


def test_a_host_local_row_with_no_host_is_purged_by_any_hosts_worker(
    make_storage: Make, settings: Any, django_capture_on_commit_callbacks: Any
) -> None:
    """An adopted file (its row has no host: no local copy on any disk) deleted
    from a storage with local_shared=False: a worker removes its remote copy.
    It used to be left out by every host, its tombstone due for ever."""
    storage = make_storage(local_shared=False)
    settings.QUEUED_STORAGE_HOSTNAME = "web-1"
    storage.remote.save("old.txt", content("from before the ledger"))
    db = router.db_for_write(PendingTransfer)
    with transaction.atomic(using=db):
        adoption.record_remote_file(db, storage.key, "old.txt", storage.remote)
    assert PendingTransfer.objects.get(storage_key=storage.key).host == ""

    with django_capture_on_commit_callbacks(execute=False):
        storage.delete("old.txt")  # the purge at commit is not run: a worker's

    assert drain().purged == 1
    assert not storage.remote.exists("old.txt")
    assert not PendingTransfer.objects.filter(storage_key=storage.key).exists()


def test_a_host_local_row_with_no_host_is_purged_at_commit(
    make_storage: Make, settings: Any, django_capture_on_commit_callbacks: Any
) -> None:
    storage = make_storage(local_shared=False)
    settings.QUEUED_STORAGE_HOSTNAME = "web-1"
    storage.remote.save("old.txt", content("from before the ledger"))
    db = router.db_for_write(PendingTransfer)
    with transaction.atomic(using=db):
        adoption.record_remote_file(db, storage.key, "old.txt", storage.remote)

    with django_capture_on_commit_callbacks(execute=True):
        storage.delete("old.txt")

    assert not storage.remote.exists("old.txt")
    assert not PendingTransfer.objects.filter(storage_key=storage.key).exists()


# Re-queueable statuses


def test_requeue_changes_exactly_the_requeueable_statuses() -> None:
    rows = {status: pending_row(status=status) for status in Status}

    changed = PendingTransfer.objects.requeue()

    assert changed == len(REQUEUEABLE)
    assert set(REQUEUEABLE) == {Status.HELD, Status.QUEUED, Status.FAILED}
    for status, row in rows.items():
        row.refresh_from_db()
        assert (row.attempts == 0 and row.status == Status.QUEUED) or (
            status not in REQUEUEABLE and row.status == status
        )


def test_the_command_and_the_admin_requeue_the_same_statuses(
    admin_client: Client,
) -> None:
    for status in Status:
        pending_row(status=status, attempts=3)
    parser = RequeueCommand().create_parser("manage.py", "requeue_transfers")
    [choices] = [
        action.choices for action in parser._actions if action.dest == "statuses"
    ]

    confirm = admin_client.get(reverse("admin:queued_storage_pendingtransfer_requeue"))

    assert sorted(choices) == sorted(REQUEUEABLE)  # type: ignore[arg-type]
    assert confirm.context["requeueable"] == len(REQUEUEABLE)
    assert PendingTransfer.objects.requeueable().count() == len(REQUEUEABLE)


# Counts per status


def test_every_status_is_counted_once_in_the_admin_and_transfer_status(
    admin_client: Client,
) -> None:
    expected = {status.value: number for number, status in enumerate(Status)}
    for status, number in expected.items():
        for _ in range(number):
            pending_row(storage_key="k", status=status)

    counts = PendingTransfer.objects.status_counts()
    listing = admin_client.get(
        reverse("admin:queued_storage_pendingtransfer_changelist")
    )
    out = StringIO()
    call_command("transfer_status", "--json", stdout=out)
    report = json.loads(out.getvalue())

    assert list(counts) == list(Status.values)
    assert counts == expected
    assert sum(counts.values()) == PendingTransfer.objects.count()
    assert PendingTransfer.objects.status_counts_per_storage() == {"k": expected}
    shown = {item["query"]: item["count"] for item in listing.context["status_counts"]}
    assert {
        status: shown[f"?status__exact={status}"] for status in Status.values
    } == expected
    assert report["totals"] == expected
    assert report["storages"]["k"] == expected


def test_counts_of_an_empty_ledger_name_every_status() -> None:
    assert PendingTransfer.objects.status_counts() == dict.fromkeys(Status.values, 0)
    assert PendingTransfer.objects.status_counts_per_storage() == {}
