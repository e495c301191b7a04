"""Querysets compiled once per connection (queued_storage.prepared): a claim's
due rows and the storages' states, run with another time each call, must be what
the ORM would have returned at that time, field by field."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import models, transaction
from django.db.models.signals import post_init
from django.utils import timezone

from queued_storage import controls, prepared
from queued_storage.models import PendingTransfer, PendingTransferQuerySet
from queued_storage.prepared import SENTINEL, Prepared
from queued_storage.storage_state import StorageState
from tests.fleet import queue_files
from tests.helpers import in_thread, joined

pytestmark = pytest.mark.django_db(transaction=True)

Status = PendingTransfer.Status
FIELD = PendingTransfer._meta.get_field("next_attempt_at")


def due_query(db: str, now: datetime, limit: int) -> PendingTransferQuerySet:
    rows = PendingTransfer.objects.using(db).due(now)
    return rows.order_by("next_attempt_at", "pk")[:limit]


def compiles(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The SQL of each compile of a Prepared query, as it happens."""
    seen: list[str] = []
    compiled = prepared._Compiled.__init__

    def noted(self: Any, *args: Any) -> None:
        compiled(self, *args)
        seen.append(self.sql)

    monkeypatch.setattr(prepared._Compiled, "__init__", noted)
    return seen


def fields(rows: list[PendingTransfer]) -> list[dict[str, Any]]:
    return [
        {field.attname: getattr(row, field.attname) for field in row._meta.fields}
        | {"db": row._state.db, "adding": row._state.adding}
        for row in rows
    ]


def spread(local: Path, count: int) -> list[datetime]:
    """``count`` queued rows due a minute apart from now on; their due times."""
    queue_files(local, count, size=1)
    start = timezone.now()
    times = []
    for index, pk in enumerate(
        PendingTransfer.objects.order_by("pk").values_list("pk", flat=True)
    ):
        when = start + timedelta(minutes=index)
        PendingTransfer.objects.filter(pk=pk).update(
            next_attempt_at=when, error_history=[{"n": index}], size=index
        )
        times.append(when)
    return times


def prepared_due(
    local: Path,
    count: int,
    monkeypatch: pytest.MonkeyPatch,
    query: Callable[[str, datetime, int], PendingTransferQuerySet] = due_query,
) -> tuple[list[datetime], list[str], Prepared[PendingTransferQuerySet]]:
    """``count`` rows due a minute apart (``spread``: their due times), the SQL of
    each compile from now on (``compiles``) and a Prepared of ``query``, whose
    time appears twice in it."""
    return spread(local, count), compiles(monkeypatch), Prepared(query, FIELD, 2)


def test_run_at_another_time_it_returns_what_the_orm_returns_then(
    fresh_storages: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    times, seen, due = prepared_due(fresh_storages["local"], 5, monkeypatch)
    for at in (times[0], times[2], times[4] + timedelta(seconds=1)):
        got = due.objects("default", at, 10)
        assert fields(got) == fields(list(due_query("default", at, 10)))
        assert [row.error_history for row in got] == [
            [{"n": index}] for index in range(len(got))
        ]
    assert len(seen) == 1, "compiled once for the connection and limit"
    assert len(due.objects("default", times[4], 2)) == 2
    assert len(seen) == 2, "another limit is another query"


def test_a_filter_equal_to_the_sentinel_time_is_compiled_each_call(
    fresh_storages: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A parameter that happens to equal the sentinel would be taken for the
    time: such a query is not kept (tried once), and the ORM builds it with the
    real time each call."""

    def with_sentinel(db: str, now: datetime, limit: int) -> PendingTransferQuerySet:
        rows = PendingTransfer.objects.using(db).due(now)
        rows = rows.exclude(transferred_at=SENTINEL)
        return rows.order_by("next_attempt_at", "pk")[:limit]

    times, seen, due = prepared_due(
        fresh_storages["local"], 3, monkeypatch, with_sentinel
    )
    for at in (times[0], times[2]):
        assert fields(due.objects("default", at, 10)) == fields(
            list(with_sentinel("default", at, 10))
        )
    assert len(seen) == 1
    assert due._local.compiled == {("default", 10, True): None}


def test_each_thread_compiles_for_its_own_connection(
    fresh_storages: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    times, seen, due = prepared_due(fresh_storages["local"], 2, monkeypatch)
    here = due.objects("default", times[1], 10)
    worker, result = in_thread(lambda: due.objects("default", times[1], 10))
    there = joined(worker, result)
    assert fields(here) == fields(there)
    assert len(seen) == 2


def test_a_model_with_a_post_init_receiver_is_built_by_its_init(
    fresh_storages: dict[str, Path],
) -> None:
    times = spread(fresh_storages["local"], 2)
    built: list[models.Model] = []

    def receiver(sender: Any, instance: models.Model, **kwargs: Any) -> None:
        built.append(instance)

    post_init.connect(receiver, sender=PendingTransfer)
    try:
        rows = Prepared(due_query, FIELD, 2).objects("default", times[1], 10)
    finally:
        post_init.disconnect(receiver, sender=PendingTransfer)
    assert built == rows and len(rows) == 2


def test_rows_built_without_init_save_and_refresh_as_the_orms_do(
    fresh_storages: dict[str, Path],
) -> None:
    times = spread(fresh_storages["local"], 1)
    (row,) = Prepared(due_query, FIELD, 2).objects("default", times[0], 10)
    row.last_error = "edited"
    row.save(update_fields=["last_error"])
    row.refresh_from_db()
    assert row.last_error == "edited"
    assert PendingTransfer.objects.get(pk=row.pk).last_error == "edited"


def test_a_claim_sees_a_pause_made_after_its_query_was_compiled(
    fresh_storages: dict[str, Path],
) -> None:
    queue_files(fresh_storages["local"], 2, size=1)
    key = PendingTransfer.objects.values_list("storage_key", flat=True)[0]
    rows = PendingTransfer.objects.all()
    assert len(controls.claim(rows, limit=1, lease=60)) == 1
    StorageState.objects.update_or_create(
        storage_key=key, defaults={"paused_at": timezone.now()}
    )
    assert controls.claim(rows, limit=1, lease=60) == []
    StorageState.objects.filter(storage_key=key).update(paused_at=None)
    with transaction.atomic():
        assert len(controls.claim(rows, limit=1, lease=60)) == 1
