"""Attacks on pausing a storage's transfers and its open breaker (issue 15,
points 3 and 4) from the outside: a wake-up of a paused storage, the admin's
Transfer now while the breaker is open, the pause button's way back and the
reason shown."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse

from queued_storage import registry
from queued_storage.backends import QueuedStorage
from queued_storage.models import PendingTransfer
from queued_storage.pausing import pause
from queued_storage.storage_state import BREAKER_CLOSED, StorageState, storage_controls
from tests.helpers import Clock, content, open_breaker, row_of

Make = Callable[..., QueuedStorage]
Status = PendingTransfer.Status


@pytest.mark.django_db(transaction=True)
def test_a_paused_storages_wake_up_transfers_nothing(
    make_storage: Make, settings: Any
) -> None:
    """QUEUED_STORAGE_WORKER="immediate" (what the django_q, Celery and tasks
    wake-ups run too: worker.transfer_name): a save of a paused storage queues."""
    settings.QUEUED_STORAGE_WORKER = "immediate"
    storage = make_storage()
    registry.register(storage)
    pause([storage.key], by="test")

    name = storage.save("woken.txt", content())

    row = row_of(storage, name)
    assert (row.status, row.attempts, row.lease_token) == (Status.QUEUED, 0, "")
    assert not storage.remote.exists(name)


def admin_client(django_user_model: Any) -> Client:
    user = django_user_model.objects.create_user(
        username="operator", password="x", is_staff=True
    )
    user.user_permissions.set(
        Permission.objects.filter(
            codename__in=["change_pendingtransfer", "view_pendingtransfer"]
        )
    )
    client = Client()
    client.force_login(user)
    return client


@pytest.mark.django_db(transaction=True)
def test_transfer_now_while_the_breaker_is_open_says_so(
    make_storage: Make, django_user_model: Any, breaker_clock: Clock
) -> None:
    """While its storage's breaker is open the row is not started, and the
    message says why (it said "skipped (not due: done, leased by a worker, or
    local to another host)"); once the probe is due, Transfer now is the probe."""
    storage = make_storage()
    registry.register(storage)
    name = storage.save("waiting.txt", content())
    open_breaker(storage, breaker_clock)
    StorageState.objects.filter(storage_key=storage.key).update(
        breaker_probe_at=breaker_clock.now + timedelta(minutes=5)
    )
    row = row_of(storage, name)
    client = admin_client(django_user_model)

    def transfer_now() -> str:
        return client.post(
            reverse("admin:queued_storage_pendingtransfer_changelist"),
            {"action": "transfer_now", "_selected_action": [row.pk]},
            follow=True,
        ).text

    assert (
        "0 transferred; 0 to retry; 0 failed; 1 not started: its storage&#x27;s "
        "circuit breaker is open (one probe row tries the remote when its backoff "
        "ends)." in transfer_now()
    )
    assert not storage.remote.exists(name)

    breaker_clock.advance(5 * 60)

    assert "1 transferred; 0 to retry; 0 failed." in transfer_now()
    assert row_of(storage, name).status == Status.DONE
    assert storage_controls([storage.key])[storage.key].breaker == BREAKER_CLOSED


@pytest.mark.django_db
@pytest.mark.parametrize(
    "back",
    [
        "//evil.example/admin/",
        "https://evil.example/",
        "\\\\evil.example",
        "javascript:alert(1)",
        "http:///evil.example",
    ],
)
def test_the_pause_button_never_sends_the_operator_to_another_site(
    make_storage: Make, django_user_model: Any, back: str
) -> None:
    storage = make_storage()
    registry.register(storage)
    client = admin_client(django_user_model)

    response = client.post(
        reverse("admin:queued_storage_pendingtransfer_pause"),
        {"key": storage.key, "next": back},
    )

    assert response.status_code == 302
    assert response["Location"] == reverse(
        "admin:queued_storage_pendingtransfer_changelist"
    )


@pytest.mark.django_db
def test_a_pause_reason_with_markup_is_shown_as_text(
    make_storage: Make, django_user_model: Any
) -> None:
    storage = make_storage()
    registry.register(storage)
    reason = '<script>alert("x")</script><b>bold</b>'
    pause([storage.key], by="<i>op</i>", reason=reason)
    client = admin_client(django_user_model)

    page = client.get(reverse("admin:queued_storage_transferdashboard_changelist")).text

    assert "<script>alert" not in page
    assert "<b>bold</b>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "<i>op</i>" not in page
    assert storage_controls([storage.key])[storage.key].pause_reason == reason
