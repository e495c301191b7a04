"""The django-health-check plugin: the endpoint a load balancer or uptime monitor
polls turns unhealthy when transfers wait too long."""

from __future__ import annotations

import importlib.util
from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.urls import path
from django.utils import timezone

from queued_storage.models import PendingTransfer
from tests.factories import pending_row
from tests.tools import IN_CI

if importlib.util.find_spec("health_check") is None:
    if IN_CI:
        raise RuntimeError(
            "django-health-check is missing under CI: the test group installs it"
        )
    pytest.skip(
        "django-health-check is not installed (pip install -e . --group test): "
        "the health check plugin is NOT tested",
        allow_module_level=True,
    )

from health_check.views import HealthCheckView

from queued_storage.integrations.health_check import TransferBacklog

# The check runs in a thread of its own, on a connection of its own: it sees
# committed rows only.
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.urls(__name__)]

Status = PendingTransfer.Status

urlpatterns = [
    path(
        "health/",
        HealthCheckView.as_view(
            checks=["queued_storage.integrations.health_check.TransferBacklog"]
        ),
    ),
    path(
        "health/photos/",
        HealthCheckView.as_view(
            checks=[
                (TransferBacklog, {"max_age": timedelta(hours=1), "storage": "photos"})
            ]
        ),
    ),
]


def health(client: Client, url: str = "/health/") -> tuple[int, str]:
    response = client.get(url, HTTP_ACCEPT="application/json")
    (result,) = response.json().values()
    return response.status_code, result


def test_healthy_with_an_empty_ledger(client: Client) -> None:
    assert health(client) == (200, "OK")


def test_healthy_while_due_rows_are_younger_than_the_setting(
    client: Client, settings: Any
) -> None:
    settings.QUEUED_STORAGE_HEALTH_MAX_AGE = 600
    pending_row(next_attempt_at=timezone.now() - timedelta(minutes=5))
    # Not due, however old: a retry waiting for its backoff, held and failed rows.
    old = timezone.now() - timedelta(days=2)
    pending_row(next_attempt_at=timezone.now() + timedelta(hours=1))
    pending_row(status=Status.HELD, next_attempt_at=None, created_at=old)
    pending_row(status=Status.FAILED, next_attempt_at=None, updated_at=old)

    assert health(client) == (200, "OK")


def test_unhealthy_when_the_oldest_due_row_waits_too_long(
    client: Client, settings: Any
) -> None:
    settings.QUEUED_STORAGE_HEALTH_MAX_AGE = 600
    pending_row(next_attempt_at=timezone.now() - timedelta(minutes=20))

    status, message = health(client)

    assert status == 500
    assert message.startswith("Unavailable: the oldest due transfer has waited 12")
    assert "more than 600 s: is process_transfers running?" in message


def test_a_worker_that_died_holding_a_row_makes_it_unhealthy(
    client: Client, settings: Any
) -> None:
    settings.QUEUED_STORAGE_HEALTH_MAX_AGE = 600
    pending_row(
        status=Status.TRANSFERRING,
        lease_expires_at=timezone.now() - timedelta(minutes=30),
    )

    assert health(client)[0] == 500


def test_max_age_and_storage_arguments(client: Client) -> None:
    pending_row(
        storage_key="videos", next_attempt_at=timezone.now() - timedelta(hours=3)
    )
    pending_row(
        storage_key="photos", next_attempt_at=timezone.now() - timedelta(minutes=30)
    )

    assert health(client, "/health/photos/") == (200, "OK")
    PendingTransfer.objects.filter(storage_key="photos").update(
        next_attempt_at=timezone.now() - timedelta(hours=2)
    )
    assert health(client, "/health/photos/")[0] == 500
