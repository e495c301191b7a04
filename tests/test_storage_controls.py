"""What pages, commands and metrics read of a storage's controls: whether its
transfers are paused and its circuit breaker's state, in one query for any
number of storages."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from queued_storage.storage_state import (
    BREAKER_CLOSED,
    BREAKER_HALF_OPEN,
    BREAKER_OPEN,
    Controls,
    StorageState,
    paused_keys,
    storage_controls,
)

pytestmark = pytest.mark.django_db


def test_a_storage_without_a_state_row_runs_with_its_breaker_closed() -> None:
    controls = storage_controls(["never-seen"])

    assert controls == {"never-seen": Controls("never-seen")}
    assert controls["never-seen"].as_dict() == {
        "paused": False,
        "paused_at": None,
        "paused_by": "",
        "pause_reason": "",
        "breaker": BREAKER_CLOSED,
        "since": None,
        "next_probe_at": None,
        "consecutive_failures": 0,
        "backoff_seconds": 0.0,
    }


def test_controls_of_many_storages_are_one_query(
    django_assert_num_queries: Any,
) -> None:
    now = timezone.now()
    StorageState.objects.create(
        storage_key="paused",
        paused_at=now,
        paused_by="ops",
        pause_reason="bucket migration",
    )
    StorageState.objects.create(
        storage_key="open",
        breaker_failures=7,
        breaker_opened_at=now - timedelta(minutes=5),
        breaker_probe_at=now + timedelta(minutes=1),
        breaker_backoff=120,
    )
    StorageState.objects.create(
        storage_key="probe-due",
        breaker_failures=5,
        breaker_opened_at=now - timedelta(minutes=5),
        breaker_probe_at=now - timedelta(seconds=1),
        breaker_backoff=60,
    )
    StorageState.objects.create(
        storage_key="probing",
        breaker_failures=5,
        breaker_opened_at=now - timedelta(minutes=5),
        breaker_probe_at=now + timedelta(minutes=5),
        breaker_backoff=60,
        breaker_probe_token="a" * 32,
    )
    StorageState.objects.create(storage_key="failing", breaker_failures=2)
    keys = ["paused", "open", "probe-due", "probing", "failing", "none"]

    with django_assert_num_queries(1):
        controls = storage_controls(keys, now=now)

    assert list(controls) == keys
    assert controls["paused"].paused
    assert controls["paused"].paused_at == now
    assert (controls["paused"].paused_by, controls["paused"].pause_reason) == (
        "ops",
        "bucket migration",
    )
    assert controls["paused"].breaker == BREAKER_CLOSED
    assert controls["open"].breaker == BREAKER_OPEN
    assert controls["open"].since == now - timedelta(minutes=5)
    assert controls["open"].next_probe_at == now + timedelta(minutes=1)
    assert controls["open"].consecutive_failures == 7
    assert controls["open"].backoff == 120
    assert controls["probe-due"].breaker == BREAKER_HALF_OPEN
    assert controls["probing"].breaker == BREAKER_HALF_OPEN
    # Failures below the threshold: still closed, the count shown.
    assert controls["failing"].breaker == BREAKER_CLOSED
    assert controls["failing"].consecutive_failures == 2
    assert controls["failing"].next_probe_at is None
    assert not controls["none"].paused
    assert controls["none"].breaker == BREAKER_CLOSED


def test_without_keys_every_storage_with_a_state_row_is_read() -> None:
    StorageState.objects.create(storage_key="b", paused_at=timezone.now())
    StorageState.objects.create(storage_key="a")

    assert sorted(storage_controls()) == ["a", "b"]
    assert paused_keys() == ["b"]
    assert paused_keys(["a"]) == []
