"""Pausing and resuming a storage's transfers: the commands and the admin's
buttons set a switch in the ledger that every worker's next claim honours
(within one poll); saves go on and queue up; transfer_status and
process_transfers say so."""

from __future__ import annotations

import json
import queue
from collections.abc import Callable
from io import StringIO
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.core.management import CommandError, call_command
from django.test import Client
from django.urls import reverse

from queued_storage import controls, registry
from queued_storage.backends import QueuedStorage
from queued_storage.management.commands.process_transfers import Command
from queued_storage.models import PendingTransfer
from queued_storage.storage_state import StorageState, storage_controls
from queued_storage.worker import drain, transfer_name
from tests.helpers import content, in_thread, joined, row_of
from tests.storages import GatedStorage

Make = Callable[..., QueuedStorage]
Status = PendingTransfer.Status


@pytest.fixture
def two(make_storage: Make) -> tuple[QueuedStorage, QueuedStorage]:
    """Two storages the site declares (the commands know their keys)."""
    first, second = make_storage(), make_storage()
    registry.register(first)
    registry.register(second)
    return first, second


def run(command: str, *args: str) -> tuple[str, int]:
    out = StringIO()
    try:
        call_command(command, *args, stdout=out, stderr=out)
    except CommandError as exc:
        return out.getvalue() + str(exc), exc.returncode
    return out.getvalue(), 0


def untouched(storage: QueuedStorage, name: str) -> bool:
    row = row_of(storage, name)
    return (row.status, row.attempts, row.lease_token) == (Status.QUEUED, 0, "")


# The commands


@pytest.mark.django_db
def test_pause_and_resume_transfers_switch_a_storage(
    two: tuple[QueuedStorage, QueuedStorage],
) -> None:
    paused, running = two

    out, code = run("pause_transfers", paused.key, "--reason", "bucket migration")

    assert code == 0
    assert f"Paused {paused.key}" in out
    state = storage_controls([paused.key, running.key])
    assert state[paused.key].paused
    assert state[paused.key].pause_reason == "bucket migration"
    assert state[paused.key].paused_by.startswith("manage.py (")
    assert not state[running.key].paused

    again = json.loads(run("pause_transfers", paused.key, "--json")[0])
    assert again == {"paused": [], "already_paused": [paused.key]}
    assert storage_controls([paused.key])[paused.key] == state[paused.key]

    out, code = run("resume_transfers", paused.key, running.key)

    assert code == 0
    assert f"Resumed {paused.key}" in out
    assert f"{running.key} was not paused." in out
    assert not storage_controls([paused.key])[paused.key].paused


@pytest.mark.django_db
@pytest.mark.parametrize("command", ["pause_transfers", "resume_transfers"])
def test_an_unknown_key_exits_2_and_changes_nothing(
    two: tuple[QueuedStorage, QueuedStorage], command: str
) -> None:
    known, _other = two
    StorageState.objects.create(storage_key=known.key)
    if command == "resume_transfers":
        run("pause_transfers", known.key)
    before = list(StorageState.objects.values())

    out, code = run(command, known.key, "no-such-storage")

    assert code == 2
    assert "Unknown storage key(s): no-such-storage" in out
    assert list(StorageState.objects.values()) == before


@pytest.mark.django_db
@pytest.mark.parametrize(
    "reason", ["x" * 501, "two\nlines", "\x1b[31mred", "sep\u2028arated"]
)
def test_a_reason_the_ledger_cannot_keep_exits_2_and_changes_nothing(
    two: tuple[QueuedStorage, QueuedStorage], reason: str
) -> None:
    storage, _other = two

    out, code = run("pause_transfers", storage.key, "--reason", reason)

    assert code == 2
    assert "--reason" in out
    assert not StorageState.objects.exists()


@pytest.mark.django_db
def test_process_transfers_of_a_paused_storage_says_so_and_does_nothing(
    two: tuple[QueuedStorage, QueuedStorage],
) -> None:
    storage, _other = two
    storage.save("waiting.txt", content())
    run("pause_transfers", storage.key)

    out, code = run("process_transfers", "--storage", storage.key)

    assert code == 0
    assert f"Paused, their transfers wait: {storage.key}" in out
    assert untouched(storage, "waiting.txt")
    assert not storage.remote.exists("waiting.txt")
    report = json.loads(
        run("process_transfers", "--storage", storage.key, "--json", "-v", "0")[0]
    )
    assert (report["done"], report["polls"], report["paused"]) == (
        0,
        0,
        [storage.key],
    )


@pytest.mark.django_db
def test_transfer_status_shows_each_storages_pause_and_breaker(
    two: tuple[QueuedStorage, QueuedStorage],
) -> None:
    paused, running = two
    run("pause_transfers", paused.key, "--reason", "maintenance")

    text, _code = run("transfer_status")
    status = json.loads(run("transfer_status", "--json")[0])

    assert f"{paused.key}: paused since " in text
    assert ": maintenance (manage.py resume_transfers" in text
    assert f"{running.key}: paused" not in text
    assert status["controls"][paused.key]["paused"] is True
    assert status["controls"][paused.key]["pause_reason"] == "maintenance"
    assert status["controls"][paused.key]["breaker"] == "closed"
    assert status["controls"][running.key]["paused"] is False

    run("resume_transfers", paused.key)

    assert (
        "No storage paused; every circuit breaker closed." in run("transfer_status")[0]
    )


# Workers


@pytest.mark.django_db(transaction=True)
def test_saves_of_a_paused_storage_queue_up_and_drain_once_resumed(
    two: tuple[QueuedStorage, QueuedStorage],
) -> None:
    paused, running = two
    run("pause_transfers", paused.key)

    names = [paused.save(f"p{i}.txt", content()) for i in range(3)]
    running.save("r.txt", content())
    stats = drain()

    assert stats.done == 1
    assert row_of(running, "r.txt").status == Status.DONE
    assert all(untouched(paused, name) for name in names)
    assert all(paused.exists(name) for name in names)  # served from local
    assert transfer_name(paused.key, names[0]) is None  # a wake-up waits too

    run("resume_transfers", paused.key)

    assert drain().done == 3
    assert {row_of(paused, name).status for name in names} == {Status.DONE}


@pytest.mark.django_db(transaction=True)
def test_a_running_loop_worker_honours_a_pause_within_one_poll_and_a_resume(
    two: tuple[QueuedStorage, QueuedStorage], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``--loop`` worker in a thread: each time it finds nothing due it tells
    the test and waits for it. The pause commits while it waits; its next poll
    takes the other storage's new row and not the paused one's; after the
    resume, the next poll takes that."""
    paused, running = two
    idle: queue.Queue[None] = queue.Queue()
    go_on: queue.Queue[bool] = queue.Queue()

    def between_polls(self: Command, seconds: float) -> None:
        idle.put(None)
        if not go_on.get(timeout=30):
            self.stopping = True

    monkeypatch.setattr(Command, "_sleep", between_polls)
    # Signal handlers are the main thread's alone.
    monkeypatch.setattr(Command, "_install_signal_handlers", lambda self: {})
    claimed: list[str] = []
    claim = controls.claim

    def recording(*args: Any, **kwargs: Any) -> list[PendingTransfer]:
        rows = claim(*args, **kwargs)
        claimed.extend(row.storage_key for row in rows)
        return rows

    monkeypatch.setattr(controls, "claim", recording)
    paused.save("before.txt", content())
    running.save("before.txt", content())
    worker = in_thread(
        lambda: call_command(
            "process_transfers", "--loop", "--interval", "1", stdout=StringIO()
        )
    )
    try:
        idle.get(timeout=30)
        assert row_of(paused, "before.txt").status == Status.DONE

        run("pause_transfers", paused.key)
        paused.save("during.txt", content())
        running.save("during.txt", content())
        claimed.clear()
        go_on.put(True)
        idle.get(timeout=30)

        assert row_of(running, "during.txt").status == Status.DONE
        assert untouched(paused, "during.txt")
        assert claimed == [running.key]

        run("resume_transfers", paused.key)
        go_on.put(True)
        idle.get(timeout=30)

        assert row_of(paused, "during.txt").status == Status.DONE
    finally:
        go_on.put(False)
        joined(*worker)


@pytest.mark.django_db(transaction=True)
def test_a_pause_during_a_drain_stops_its_next_claim(
    make_storage: Make, gate: type[GatedStorage]
) -> None:
    """Paused while the drain's upload of another storage's file is in hand: the
    same drain's next claim leaves the paused storage's new row alone."""
    slow = make_storage(remote="tests.storages.GatedStorage")
    paused = make_storage()
    registry.register(paused)
    slow.save("slow.txt", content())
    worker = in_thread(drain)
    assert gate.entered.wait(timeout=30)

    paused.save("new.txt", content())
    run("pause_transfers", paused.key)
    gate.gate.set()
    stats = joined(*worker)

    assert stats.done == 1
    assert untouched(paused, "new.txt")


@pytest.mark.django_db(transaction=True)
def test_rows_in_hand_of_a_storage_paused_since_their_claim_are_given_back(
    make_storage: Make, gate: type[GatedStorage], whole_batch_claims: None
) -> None:
    """The upload in hand finishes (a pause stops new work, it does not waste an
    upload); the rows the claim holds and no lane started are given back as they
    were once a claim (another lane's, another drain's) has seen the pause."""
    storage = make_storage(remote="tests.storages.GatedStorage")
    registry.register(storage)
    names = [storage.save(f"f{i}.txt", content()) for i in range(3)]
    worker = in_thread(drain)
    assert gate.entered.wait(timeout=30)

    run("pause_transfers", storage.key)
    other_lane = in_thread(
        lambda: controls.claim(PendingTransfer.objects.all(), limit=10, lease=60)
    )
    assert joined(*other_lane) == []
    gate.gate.set()
    stats = joined(*worker)

    assert (stats.done, stats.stale) == (1, 2)
    assert row_of(storage, names[0]).status == Status.DONE
    assert all(untouched(storage, name) for name in names[1:])


# The admin's buttons


def pause_url() -> str:
    return reverse("admin:queued_storage_pendingtransfer_pause")


def resume_url() -> str:
    return reverse("admin:queued_storage_pendingtransfer_resume")


def staff(django_user_model: Any, *codenames: str) -> Client:
    user = django_user_model.objects.create_user(
        username="-".join(codenames) or "staff", password="x", is_staff=True
    )
    user.user_permissions.set(Permission.objects.filter(codename__in=codenames))
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    return client


def csrf_post(client: Client, url: str, data: dict[str, Any]) -> Any:
    """POST as the page's form would: with the CSRF token of the admin's page."""
    client.get(reverse("admin:queued_storage_pendingtransfer_changelist"))
    token = client.cookies["csrftoken"].value
    return client.post(url, {**data, "csrfmiddlewaretoken": token})


@pytest.mark.django_db
def test_the_admin_buttons_pause_and_resume_with_the_change_permission(
    two: tuple[QueuedStorage, QueuedStorage],
    django_user_model: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    storage, _other = two
    client = staff(django_user_model, "change_pendingtransfer", "view_pendingtransfer")
    back = "/admin/queued_storage/pendingtransfer/?storage_key=x"

    with caplog.at_level("INFO", logger="queued_storage"):
        response = csrf_post(
            client,
            pause_url(),
            {"key": storage.key, "reason": "maintenance", "next": back},
        )

    assert (response.status_code, response["Location"]) == (302, back)
    state = storage_controls([storage.key])[storage.key]
    assert (state.paused, state.paused_by, state.pause_reason) == (
        True,
        "change_pendingtransfer-view_pendingtransfer",
        "maintenance",
    )
    assert any(
        "admin pause user=change_pendingtransfer" in r.getMessage()
        for r in caplog.records
    )

    response = csrf_post(
        client, resume_url(), {"key": storage.key, "next": "https://evil.example/"}
    )

    assert response.status_code == 302
    assert response["Location"] == reverse(
        "admin:queued_storage_pendingtransfer_changelist"
    )
    assert not storage_controls([storage.key])[storage.key].paused


@pytest.mark.django_db
@pytest.mark.parametrize("url", [pause_url, resume_url])
def test_a_view_only_user_gets_403_and_nothing_changes(
    two: tuple[QueuedStorage, QueuedStorage],
    django_user_model: Any,
    url: Callable[[], str],
) -> None:
    storage, _other = two
    run("pause_transfers", storage.key)
    before = list(StorageState.objects.values())
    client = staff(django_user_model, "view_pendingtransfer")

    response = csrf_post(client, url(), {"key": storage.key})

    assert response.status_code == 403
    assert list(StorageState.objects.values()) == before


@pytest.mark.django_db
def test_the_buttons_need_a_post_with_the_csrf_token_and_a_known_key(
    two: tuple[QueuedStorage, QueuedStorage], admin_user: Any
) -> None:
    storage, _other = two
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin_user)

    assert client.get(pause_url(), {"key": storage.key}).status_code == 405
    assert client.post(pause_url(), {"key": storage.key}).status_code == 403
    response = csrf_post(client, pause_url(), {"key": [storage.key, "nope"]})
    page = client.get(response["Location"])

    assert "Unknown storage key(s): nope. Nothing was changed." in page.text
    assert not StorageState.objects.exists()
    csrf_post(client, pause_url(), {"key": storage.key, "reason": "a\nb"})
    assert not StorageState.objects.filter(paused_at__isnull=False).exists()


def test_the_button_urls_are_the_ones_the_dashboard_links_to() -> None:
    assert pause_url() == "/admin/queued_storage/pendingtransfer/pause/"
    assert resume_url() == "/admin/queued_storage/pendingtransfer/resume/"
