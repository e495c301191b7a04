"""Red team of queued_storage.prepared (the claim's due rows and the storages'
states compiled once per connection). The breaks it found, now fixed: USE_TZ
off, querysets that match nothing (and a limit of 0), pickling a queryset that
claimed, annotations and Django 6.1's fetch modes; the rest is what held (rows
field by field as the ORM's, locks, pauses)."""

from __future__ import annotations

import copy
import pickle
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import django
import pytest
from django.db import connections, models, transaction
from django.db.models import IntegerField, Value
from django.db.models.signals import post_init
from django.utils import timezone

from queued_storage import controls
from queued_storage.claims import ClaimsQuerySet
from queued_storage.models import PendingTransfer
from queued_storage.prepared import SENTINEL
from queued_storage.storage_state import StorageState
from tests.databases import selected_vendor
from tests.fleet import DOCUMENTS, queue_files
from tests.helpers import in_thread, joined

pytestmark = pytest.mark.django_db(transaction=True)

VENDOR = selected_vendor()


def described(value: Any) -> tuple[Any, ...]:
    """A value with its type and, for a datetime, its zone: ``True == 1``."""
    return (type(value), value, str(getattr(value, "tzinfo", "")))


def as_loaded(rows: list[PendingTransfer]) -> list[list[Any]]:
    return [
        [described(getattr(row, field.attname)) for field in row._meta.concrete_fields]
        + [row._state.db, row._state.adding, row.get_deferred_fields()]
        for row in rows
    ]


def varied_rows(local: Path) -> None:
    """Three due rows: one with JSON, booleans set and NULLs, one leased out with
    no next attempt, one plain."""
    queue_files(local, 3, size=1)
    first, second, _ = PendingTransfer.objects.order_by("pk").values_list(
        "pk", flat=True
    )
    now = timezone.now()
    PendingTransfer.objects.filter(pk=first).update(
        error_history=[{"a": [1, None, "x", 2.5]}],
        deleted=True,
        remote_owned=True,
        size=None,
        transferred_at=now,
    )
    PendingTransfer.objects.filter(pk=second).update(
        status=PendingTransfer.Status.TRANSFERRING,
        lease_expires_at=now - timedelta(seconds=3),
        next_attempt_at=None,
    )


def orm_due(rows: Any) -> list[PendingTransfer]:
    due = rows.due(timezone.now()).order_by("next_attempt_at", "pk")
    return list(due)


def due_without_tz(local: Path, settings: Any) -> None:
    """Two queued rows, due five seconds ago as USE_TZ=False reads the time."""
    queue_files(local, 2, size=1)
    settings.USE_TZ = False
    PendingTransfer.objects.update(
        next_attempt_at=timezone.now() - timedelta(seconds=5)
    )


# --- breaks -----------------------------------------------------------------


def test_a_claim_with_use_tz_false_works(
    fresh_storages: dict[str, Path], settings: Any
) -> None:
    due_without_tz(fresh_storages["local"], settings)
    # A thread of its own: the states' query is compiled per thread, and this
    # one's was compiled with USE_TZ=True by the tests before.
    worker, result = in_thread(
        lambda: controls.claim(PendingTransfer.objects.all(), limit=5, lease=60)
    )
    assert len(joined(worker, result)) == 2


def test_claim_due_with_use_tz_false_works(
    fresh_storages: dict[str, Path], settings: Any
) -> None:
    due_without_tz(fresh_storages["local"], settings)
    assert len(PendingTransfer.objects.all().claim_due(limit=5, lease=60)) == 2


@pytest.mark.parametrize("empty", ["none", "empty_in"])
def test_claiming_from_an_empty_queryset_claims_nothing(
    fresh_storages: dict[str, Path], empty: str
) -> None:
    queue_files(fresh_storages["local"], 2, size=1)
    rows = (
        PendingTransfer.objects.none()
        if empty == "none"
        else PendingTransfer.objects.filter(storage_key__in=[])
    )
    assert controls.claim(rows, limit=5, lease=60) == []


def test_a_claim_of_no_rows_claims_nothing(fresh_storages: dict[str, Path]) -> None:
    queue_files(fresh_storages["local"], 2, size=1)
    assert PendingTransfer.objects.all().claim_due(limit=0, lease=60) == []
    assert PendingTransfer.objects.filter(attempts=0).count() == 2


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_a_queryset_that_claimed_still_pickles(
    fresh_storages: dict[str, Path], how: str
) -> None:
    queue_files(fresh_storages["local"], 2, size=1)
    rows = PendingTransfer.objects.all()
    assert len(rows.claim_due(limit=1, lease=60)) == 1
    again = pickle.loads(pickle.dumps(rows)) if how == "pickle" else copy.deepcopy(rows)
    assert len(again) == 2


def test_the_rows_of_an_annotated_queryset_carry_the_annotation(
    fresh_storages: dict[str, Path],
) -> None:
    queue_files(fresh_storages["local"], 2, size=1)
    rows = PendingTransfer.objects.annotate(lane=Value(7, output_field=IntegerField()))
    claimed = rows.claim_due(limit=2, lease=60)
    assert [getattr(row, "lane", None) for row in claimed] == [7, 7]


@pytest.mark.skipif(django.VERSION < (6, 1), reason="fetch modes are Django 6.1's")
def test_the_rows_keep_the_querysets_fetch_mode(
    fresh_storages: dict[str, Path],
) -> None:
    queue_files(fresh_storages["local"], 2, size=1)
    mode = models.FETCH_RAISE  # type: ignore[attr-defined,unused-ignore]
    rows = PendingTransfer.objects.fetch_mode(mode)  # type: ignore[attr-defined,unused-ignore]
    claimed = rows.claim_due(limit=2, lease=60)
    assert [row._state.fetch_mode for row in claimed] == [mode, mode]


# --- what held ---------------------------------------------------------------


@pytest.mark.parametrize("zone", ["UTC", "Asia/Kathmandu", "America/New_York"])
def test_due_rows_are_the_orms_field_by_field_in_any_zone(
    fresh_storages: dict[str, Path], settings: Any, zone: str
) -> None:
    settings.TIME_ZONE = zone
    varied_rows(fresh_storages["local"])
    rows = PendingTransfer.objects.all()
    orm = orm_due(rows)
    for _run in range(2):  # compiled, then cached
        with transaction.atomic():
            got = rows._due_rows(timezone.now(), 10, "default")
        assert as_loaded(got) == as_loaded(orm)
    for row, theirs in zip(got, orm, strict=True):
        assert row == theirs and hash(row) == hash(theirs)
        assert as_loaded([pickle.loads(pickle.dumps(row))]) == as_loaded([theirs])


def test_deferred_rows_are_the_orms(fresh_storages: dict[str, Path]) -> None:
    varied_rows(fresh_storages["local"])
    rows = PendingTransfer.objects.defer("error_history", "last_error")
    with transaction.atomic():
        got = rows._due_rows(timezone.now(), 10, "default")
    assert as_loaded(got) == as_loaded(orm_due(rows))
    # Loaded when asked for, as the ORM's deferred fields are.
    assert [row.error_history for row in got if row.deleted] == [
        [{"a": [1, None, "x", 2.5]}]
    ]


def test_built_rows_save_and_delete_as_the_orms_do(
    fresh_storages: dict[str, Path],
) -> None:
    varied_rows(fresh_storages["local"])
    with transaction.atomic():
        first, second, _ = PendingTransfer.objects.all()._due_rows(
            timezone.now(), 10, "default"
        )
    first.last_error = "whole save"
    first.save()
    stored = PendingTransfer.objects.get(pk=first.pk)
    assert as_loaded([stored]) == as_loaded([first])
    second.delete()
    assert not PendingTransfer.objects.filter(pk=second.pk).exists()


def test_the_drains_queryset_gives_the_orms_rows(
    fresh_storages: dict[str, Path],
) -> None:
    varied_rows(fresh_storages["local"])
    queue_files(fresh_storages["local"], 2, size=1, prefix="other")
    PendingTransfer.objects.filter(name__startswith="other").update(
        storage_key="elsewhere"
    )
    PendingTransfer.objects.filter(name__endswith="2.bin").update(host="not-here")
    rows = PendingTransfer.objects.reachable_here([DOCUMENTS]).filter(
        storage_key__in=[DOCUMENTS, "elsewhere"]
    )
    orm = orm_due(rows)
    assert len(orm) == 4
    for _run in range(2):
        with transaction.atomic():
            got = rows._due_rows(timezone.now(), 10, "default")
        assert as_loaded(got) == as_loaded(orm)


def test_a_key_spelled_as_the_sentinel_is_not_taken_for_the_time(
    fresh_storages: dict[str, Path],
) -> None:
    """The sentinel as the database gets it (a string on SQLite and MariaDB) in a
    filter: the query has three matches, and is built by the ORM each call."""
    queue_files(fresh_storages["local"], 2, size=1)
    field = PendingTransfer._meta.get_field("next_attempt_at")
    spelled = str(field.get_db_prep_value(SENTINEL, connections["default"]))
    PendingTransfer.objects.update(storage_key=spelled)
    rows = PendingTransfer.objects.filter(storage_key__in=[spelled])
    assert len(rows.claim_due(limit=1, lease=60)) == 1
    assert len(rows.claim_due(limit=1, lease=60)) == 1


def test_the_states_are_the_orms_in_another_zone(
    fresh_storages: dict[str, Path], settings: Any
) -> None:
    settings.TIME_ZONE = "Asia/Kathmandu"
    now = timezone.now()
    StorageState.objects.create(storage_key="paused", paused_at=now)
    StorageState.objects.create(
        storage_key="open", breaker_failures=2, breaker_opened_at=now
    )
    StorageState.objects.create(storage_key="running")
    orm = sorted(controls._not_running("default", now, None))
    for _run in range(2):
        got = sorted(controls._NOT_RUNNING.values("default", now))
        assert [[described(v) for v in row] for row in got] == [
            [described(v) for v in row] for row in orm
        ]


@pytest.mark.parametrize("reconnect", ["close_all", "replaced"])
def test_a_pause_is_seen_after_the_connection_changes(
    fresh_storages: dict[str, Path], reconnect: str
) -> None:
    queue_files(fresh_storages["local"], 3, size=1)
    rows = PendingTransfer.objects.all()
    assert len(controls.claim(rows, limit=1, lease=60)) == 1
    old = connections["default"]
    if reconnect == "close_all":
        connections.close_all()
    else:
        connections["default"] = connections.create_connection("default")
    try:
        # Paused from another connection, between two claims.
        worker, result = in_thread(
            lambda: StorageState.objects.create(
                storage_key=DOCUMENTS, paused_at=timezone.now()
            )
        )
        joined(worker, result)
        assert controls.claim(rows, limit=1, lease=60) == []
        StorageState.objects.filter(storage_key=DOCUMENTS).update(paused_at=None)
        assert len(controls.claim(rows, limit=1, lease=60)) == 1
    finally:
        if reconnect == "replaced":
            connections["default"].close()
            connections["default"] = old


def test_a_receiver_of_every_models_post_init_gets_the_rows(
    fresh_storages: dict[str, Path],
) -> None:
    queue_files(fresh_storages["local"], 2, size=1)
    built: list[Any] = []

    def receiver(sender: Any, instance: Any, **kwargs: Any) -> None:
        built.append(instance)

    post_init.connect(receiver)  # no sender: every model's
    try:
        claimed = PendingTransfer.objects.all().claim_due(limit=5, lease=60)
    finally:
        post_init.disconnect(receiver)
    assert [row for row in built if isinstance(row, PendingTransfer)] == claimed


@pytest.mark.skipif(VENDOR == "sqlite", reason="no row locks")
def test_two_claims_at_once_never_share_a_row(
    fresh_storages: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One queryset in two threads (lanes): the first holds its rows' locks (it
    waits before its UPDATE) while the second claims the whole ledger."""
    queue_files(fresh_storages["local"], 5, size=1)
    take = ClaimsQuerySet._take
    read, go = threading.Event(), threading.Event()
    gated = threading.local()

    def waiting(self: Any, *args: Any, **kwargs: Any) -> int:
        if getattr(gated, "on", False):
            read.set()
            assert go.wait(30)
        return take(self, *args, **kwargs)

    monkeypatch.setattr(ClaimsQuerySet, "_take", waiting)
    rows = PendingTransfer.objects.all()
    assert len(rows.claim_due(limit=1, lease=60)) == 1  # compiled here

    def first() -> list[PendingTransfer]:
        gated.on = True
        return rows.claim_due(limit=2, lease=60)

    worker, result = in_thread(first)
    assert read.wait(30)
    second = rows.claim_due(limit=5, lease=60)
    go.set()
    theirs = joined(worker, result)
    assert len(second) == 2 and len(theirs) == 2
    assert not {row.pk for row in second} & {row.pk for row in theirs}
