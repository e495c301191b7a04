"""The transfer dashboard (``queued_storage.dashboard``): who may see it, what it
shows of each storage (rows by status, oldest due, stuck rows, paused and breaker
state, charts of the history) with links to the filtered ledger, and a query count
that does not grow with the rows or the history's minutes."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta
from html import unescape
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from django.contrib.auth.models import Permission
from django.db import connections
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from queued_storage import dashboard, history, registry
from queued_storage.backends import QueuedStorage
from queued_storage.charts import Bar, bar_chart
from queued_storage.failures import ledger_db
from queued_storage.models import PendingTransfer, StorageState
from tests.helpers import add_history, content

pytestmark = pytest.mark.django_db

Status = PendingTransfer.Status
URL = "/admin/queued_storage/transferdashboard/"
BAR = re.compile(
    r'<rect class="qs-bar" x="([\d.]+)" y="([\d.]+)" width="[\d.]+" '
    r'height="([\d.]+)"><title>([^<]*)</title></rect>'
)


def client_of(django_user_model: Any, *codenames: str) -> Client:
    """A logged-in staff user's client with the ledger app's ``codenames``."""
    user = django_user_model.objects.create_user(
        username="dash-" + "-".join(codenames), password="x", is_staff=True
    )
    for permission in Permission.objects.filter(codename__in=codenames):
        user.user_permissions.add(permission)
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def ledger_viewer(django_user_model: Any) -> Client:
    """Staff with only the view permission on the ledger."""
    return client_of(django_user_model, "view_pendingtransfer")


def section(html: str, key: str) -> str:
    """The dashboard's part about storage ``key``."""
    start = html.index(f'data-storage-key="{key}"')
    end = html.find("<section", start)
    return html[start : end if end != -1 else len(html)]


def links(html: str) -> list[dict[str, list[str]]]:
    return [
        parse_qs(urlsplit(unescape(href)).query)
        for href in re.findall(r'href="([^"]*pendingtransfer/\?[^"]*)"', html)
    ]


def charts(html: str) -> list[str]:
    return re.findall(r'<svg class="qs-chart".*?</svg>', html, flags=re.S)


# Who sees it


def test_the_view_permission_on_the_ledger_opens_the_dashboard(
    ledger_viewer: Client, django_user_model: Any, admin_client: Client
) -> None:
    assert ledger_viewer.get(URL).status_code == 200
    assert admin_client.get(URL).status_code == 200
    changer = client_of(django_user_model, "change_pendingtransfer")
    assert changer.get(URL).status_code == 200
    # Staff without it: refused; not logged in: to the login page.
    assert client_of(django_user_model).get(URL).status_code == 403
    anonymous = Client().get(URL)
    assert anonymous.status_code == 302
    assert "/admin/login/" in anonymous["Location"]


def test_the_admin_index_and_the_ledger_list_link_to_it(
    ledger_viewer: Client, django_user_model: Any
) -> None:
    assert reverse("admin:queued_storage_transferdashboard_changelist") == URL
    assert f'href="{URL}"' in ledger_viewer.get(reverse("admin:index")).content.decode()
    changelist = reverse("admin:queued_storage_pendingtransfer_changelist")
    assert f'href="{URL}"' in ledger_viewer.get(changelist).content.decode()
    nobody = client_of(django_user_model, "view_storagestate")
    assert URL not in nobody.get(reverse("admin:index")).content.decode()
    assert nobody.post(URL).status_code == 403


# What it shows


def test_each_storage_shows_its_rows_by_status_linked_to_the_filtered_list(
    ledger_viewer: Client, make_storage: Callable[..., QueuedStorage]
) -> None:
    first, second = make_storage(), make_storage()
    for i in range(3):
        first.save(f"q{i}.txt", content("q"))
    first.save("h.txt", content("h"))
    PendingTransfer.objects.for_name(first.key, "h.txt").hold()
    second.save("f.txt", content("f"))
    PendingTransfer.objects.filter(storage_key=second.key).update(status=Status.FAILED)
    PendingTransfer.objects.create(
        storage_key=second.key, name="d.txt", status=Status.DONE
    )

    html = ledger_viewer.get(URL).content.decode()

    mine = section(html, first.key)
    counts = dict(
        re.findall(r'qs-status-(\w+)".*?<span class="qs-count">(\d+)', mine)[:5]
    )
    assert counts == {
        "held": "1",
        "queued": "3",
        "transferring": "0",
        "done": "0",
        "failed": "0",
    }
    theirs = dict(
        re.findall(
            r'qs-status-(\w+)".*?<span class="qs-count">(\d+)',
            section(html, second.key),
        )[:5]
    )
    assert (theirs["failed"], theirs["done"], theirs["queued"]) == ("1", "1", "0")
    found = links(mine)
    assert {"storage_key": [first.key], "status__exact": ["queued"]} in found
    assert {"storage_key": [first.key], "stuck": ["yes"]} in found
    assert {"storage_key": [first.key], "failing": ["yes"]} in found
    # Each link is one the ledger's list accepts: it filters, it does not reset.
    changelist = reverse("admin:queued_storage_pendingtransfer_changelist")
    page = ledger_viewer.get(
        changelist, {"storage_key": first.key, "status__exact": "queued"}
    )
    assert page.status_code == 200
    assert "?e=1" not in page.request["QUERY_STRING"]
    assert page.context["cl"].result_count == 3


def test_oldest_due_and_stuck_rows(
    ledger_viewer: Client, storage: QueuedStorage, settings: Any
) -> None:
    settings.QUEUED_STORAGE_HEALTH_MAX_AGE = 600
    now = timezone.now()
    storage.save("late.txt", content("x"))
    storage.save("stuck.txt", content("x"))
    storage.save("fresh.txt", content("x"))
    PendingTransfer.objects.for_name(storage.key, "late.txt").update(
        next_attempt_at=now - timedelta(hours=3)
    )
    PendingTransfer.objects.for_name(storage.key, "stuck.txt").update(
        status=Status.TRANSFERRING,
        lease_token="gone",
        lease_expires_at=now - timedelta(minutes=5),
    )

    mine = section(ledger_viewer.get(URL).content.decode(), storage.key)

    oldest = re.search(r'qs-oldest-due.*?qs-count">([^<]*)<', mine, flags=re.S)
    assert oldest and oldest.group(1).strip().startswith("3\xa0hours")
    stuck = re.search(r'qs-stuck[^"]*".*?qs-count">(\d+)<', mine, flags=re.S)
    assert stuck and stuck.group(1) == "1"
    overdue = re.search(r'qs-overdue[^"]*".*?qs-count">(\d+)<', mine, flags=re.S)
    assert overdue and overdue.group(1) == "1"  # late.txt, not fresh.txt


def test_paused_and_breaker_state(
    ledger_viewer: Client, storage: QueuedStorage
) -> None:
    now = timezone.now()
    StorageState.objects.update_or_create(
        storage_key=storage.key,
        defaults={
            "paused_at": now,
            "paused_by": "ops",
            "pause_reason": "bucket migration",
            "breaker_opened_at": now,
            "breaker_probe_at": now + timedelta(minutes=5),
            "breaker_failures": 7,
        },
    )

    mine = section(ledger_viewer.get(URL).content.decode(), storage.key)

    assert "paused</span>" in mine and "by ops" in mine and "bucket migration" in mine
    assert "breaker open</span>" in mine
    assert "after 7 consecutive failures" in mine


def test_pause_and_resume_buttons_for_the_ledgers_change_permission_only(
    ledger_viewer: Client,
    django_user_model: Any,
    storage: QueuedStorage,
) -> None:
    storage.save("a.txt", content("a"))
    changer = client_of(django_user_model, "change_pendingtransfer")
    pause_url = reverse("admin:queued_storage_pendingtransfer_pause")

    mine = section(changer.get(URL).content.decode(), storage.key)
    assert f'action="{pause_url}" class="qs-pause"' in mine
    assert f'name="key" value="{storage.key}"' in mine
    assert f'name="next" value="{URL}"' in mine
    assert "csrfmiddlewaretoken" in mine
    viewed = section(ledger_viewer.get(URL).content.decode(), storage.key)
    assert 'class="qs-pause"' not in viewed and "<form" not in viewed

    paused = changer.post(
        pause_url, {"key": storage.key, "reason": "upgrade", "next": URL}, follow=True
    )
    assert paused.redirect_chain == [(URL, 302)]
    mine = section(paused.content.decode(), storage.key)
    assert "Reason: upgrade" in mine and 'class="qs-pause"' not in mine
    resume_url = reverse("admin:queued_storage_pendingtransfer_resume")
    assert f'action="{resume_url}" class="qs-resume"' in mine


def test_done_rows_are_counted_up_to_a_limit(
    ledger_viewer: Client, storage: QueuedStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dashboard, "DONE_COUNT_LIMIT", 3)
    for i in range(5):
        storage.save(f"d{i}.txt", content("d"))
    PendingTransfer.objects.filter(storage_key=storage.key).update(status=Status.DONE)
    mine = section(ledger_viewer.get(URL).content.decode(), storage.key)
    assert re.search(r'qs-status-done".*?qs-count">3\+<', mine)


# Charts


def test_the_last_hours_chart_has_a_bar_per_minute_in_proportion_with_local_times(
    ledger_viewer: Client, storage: QueuedStorage, settings: Any
) -> None:
    settings.TIME_ZONE = "Asia/Kolkata"  # UTC+05:30: a local time is not UTC's
    now = timezone.now()
    minute = history.this_minute(now)
    add_history(storage.key, minute - timedelta(minutes=10), files=10, bytes=4096)
    add_history(storage.key, minute - timedelta(minutes=20), files=5, failures=2)

    html = section(ledger_viewer.get(URL).content.decode(), storage.key)

    files_hour, bytes_hour, failures_hour, files_day, *_rest = charts(html)
    bars = BAR.findall(files_hour)
    assert len(bars) == 60
    heights = {title.split(": ")[0]: float(height) for _x, _y, height, title in bars}
    local = timezone.localtime(minute - timedelta(minutes=10)).strftime("%H:%M")
    earlier = timezone.localtime(minute - timedelta(minutes=20)).strftime("%H:%M")
    assert local != (minute - timedelta(minutes=10)).strftime("%H:%M")
    assert heights[local] == pytest.approx(2 * heights[earlier])
    assert sum(1 for value in heights.values() if value > 0) == 2
    titles = {title for *_xyh, title in bars}
    assert f"{local}: 10/min" in titles
    assert f"{earlier}: 5/min" in titles
    # Axis labels in local time, every quarter hour.
    ticks = re.findall(r'<text x="[\d.]+" y="[\d.]+">(\d\d:\d\d)</text>', files_hour)
    assert len(ticks) == 4
    assert ticks[0] == timezone.localtime(minute - timedelta(minutes=59)).strftime(
        "%H:%M"
    )
    assert "4.0\xa0KB/min" in bytes_hour
    assert len([b for b in BAR.findall(failures_hour) if float(b[2]) > 0]) == 1
    # The day: 96 bars of 15 minutes, per-minute averages.
    assert len(BAR.findall(files_day)) == 96
    assert "15 files done" in html and "2 failed attempts" in html


def test_a_chart_of_zeros_draws_no_bar_taller_than_its_baseline() -> None:
    now = timezone.now()
    chart = bar_chart([Bar(now, 0.0)] * 5, label="x", colour="#000", text=str, every=2)
    assert [float(h) for *_xy, h, _t in BAR.findall(chart)] == [0.0] * 5
    scaled = bar_chart(
        [Bar(now, 1.0), Bar(now, 4.0)], label="x", colour="#000", text=str, every=1
    )
    heights = [float(h) for *_xy, h, _t in BAR.findall(scaled)]
    assert heights[1] == 4 * heights[0] > 0
    assert "<script" not in chart and "http" not in chart.replace(
        "http://www.w3.org/2000/svg", ""
    )


# Cost


def test_the_query_count_does_not_grow_with_rows_or_minutes(
    ledger_viewer: Client, make_storage: Callable[..., QueuedStorage]
) -> None:
    first = make_storage()
    first.save("a.txt", content("a"))
    ledger_viewer.get(URL)  # the session, the permissions cache

    def queries() -> int:
        with CaptureQueriesContext(connections[ledger_db()]) as captured:
            assert ledger_viewer.get(URL).status_code == 200
        return len(captured.captured_queries)

    few = queries()
    now = timezone.now()
    others = [make_storage() for _ in range(3)]
    for i in range(50):
        for storage in [first, *others]:
            storage.save(f"more{i}.txt", content("m"))
    PendingTransfer.objects.filter(name__startswith="more1").update(status=Status.DONE)
    PendingTransfer.objects.filter(name__startswith="more2").update(
        status=Status.FAILED
    )
    for minutes in range(0, 24 * 60, 7):
        minute = history.this_minute(now - timedelta(minutes=minutes))
        add_history(first.key, minute, files=1)
        add_history(others[0].key, minute, failures=1)
    many = queries()

    # Session, user and the user's and groups' permissions (4); the rows not
    # done, the done rows, the history's day and the storages' controls (4).
    assert len(dashboard.summaries()) == len(registry.known_keys()) >= 5
    assert (few, many) == (8, 8)
