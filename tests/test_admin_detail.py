"""A transfer's own page in the admin (its buttons, error history, state texts and
file links) and the changelist's columns and count line; the layout checked in
headless Chromium, with screenshots in var/screenshots/admin/ (git-ignored)."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from django.test import Client, override_settings
from django.urls import reverse
from django.utils import timezone

from queued_storage.admin_views import count_line
from queued_storage.backends import QueuedStorage
from queued_storage.error_history import error_entry
from queued_storage.models import PendingTransfer
from queued_storage.worker import drain
from tests.browser import SCREENSHOTS, chromium_page
from tests.factories import pending_row, pending_rows
from tests.helpers import FLAKY, content, remote_calls
from tests.test_admin import (
    AtomicProbeStorage,
    change_url,
    changelist_url,
    file_url,
    fresh,
    messages_of,
    operator,
    staff_client,
    viewer,
)
from tests.tools import sqlite_leg_only

Status = PendingTransfer.Status
SHOTS = SCREENSHOTS / "admin"
# Fixtures of tests/test_admin.py, used here by name.
__all__ = ["operator", "viewer"]


def run_url(row: PendingTransfer, action: str) -> str:
    return reverse("admin:queued_storage_pendingtransfer_run", args=[row.pk, action])


def press(client: Client, row: PendingTransfer, action: str, **shown: Any) -> Any:
    """POST a button of the row's page, as the page showed the row (``shown``
    overrides what the form carries)."""
    form = {"status": row.status, "generation": str(row.generation), **shown}
    return client.post(run_url(row, action), form, follow=True)


def buttons_of(page: str) -> set[str]:
    return {
        action
        for action in ("retry_now", "hold", "transfer_now")
        if f'class="qs-run-{action}"' in page
    }


def history(*entries: Any) -> list[Any]:
    return list(entries)


def failure(attempt: int, at: datetime, **extra: Any) -> dict[str, Any]:
    entry = error_entry(
        ConnectionError(f"remote unreachable on attempt {attempt}"), attempt, at
    )
    entry.update(extra)
    return entry


# Buttons


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("status", "fields", "expected"),
    [
        (Status.FAILED, {"attempts": 6}, {"retry_now", "hold", "transfer_now"}),
        (Status.QUEUED, {}, {"retry_now", "hold", "transfer_now"}),
        (Status.HELD, {}, {"retry_now", "transfer_now"}),
        (Status.DONE, {}, set()),
        (
            Status.TRANSFERRING,
            {"lease_expires_at": timezone.now() + timedelta(hours=1)},
            set(),
        ),
        (
            Status.TRANSFERRING,
            {"lease_expires_at": timezone.now() - timedelta(hours=1)},
            {"transfer_now"},
        ),
        (Status.QUEUED, {"deleted": True}, {"retry_now", "transfer_now"}),
    ],
)
def test_detail_page_shows_the_buttons_that_apply_and_says_why_not(
    admin_client: Client, status: str, fields: dict[str, Any], expected: set[str]
) -> None:
    row = pending_row(status=status, **fields)

    page = admin_client.get(change_url(row)).content.decode()

    assert buttons_of(page) == expected
    # Each button is a POST form with a CSRF token; the others say why not.
    assert page.count('name="csrfmiddlewaretoken"') >= len(expected)
    for action, label in (
        ("retry_now", "Retry now"),
        ("hold", "Hold"),
        ("transfer_now", "Transfer now"),
    ):
        if action not in expected:
            assert f"{label}: not now, " in page


@pytest.mark.django_db
def test_retry_now_on_a_failed_row_requeues_it_says_so_and_logs_it(
    operator: Client, caplog: pytest.LogCaptureFixture
) -> None:
    row = pending_row(status=Status.FAILED, attempts=6, last_error="Boom: x")

    with caplog.at_level("INFO", logger="queued_storage"):
        response = press(operator, row, "retry_now")

    assert response.redirect_chain == [(change_url(row), 302)]
    assert messages_of(response) == ["1 transfer queued."]
    now = fresh(row)
    assert (now.status, now.attempts, now.last_error) == (Status.QUEUED, 0, "")
    assert "admin action=retry_now user=change_pendingtransfer count=1" in (
        caplog.messages
    )


@pytest.mark.django_db
def test_hold_on_a_queued_row_parks_it_and_says_how_to_release_it(
    operator: Client,
) -> None:
    row = pending_row(status=Status.QUEUED)
    other = pending_row(status=Status.QUEUED)

    response = press(operator, row, "hold")

    assert messages_of(response) == ["1 transfer held; Retry now releases it."]
    assert fresh(row).status == Status.HELD
    assert fresh(other).status == Status.QUEUED  # this row only


@pytest.mark.django_db(transaction=True)
def test_transfer_now_on_the_page_transfers_the_row(
    operator: Client, storage: QueuedStorage
) -> None:
    storage.save("docs/now.txt", content())
    row = PendingTransfer.objects.get(storage_key=storage.key)

    response = press(operator, row, "transfer_now")

    assert messages_of(response) == ["1 transferred; 0 to retry; 0 failed."]
    assert fresh(row).status == Status.DONE
    assert remote_calls(storage, "save") == 1


@pytest.mark.django_db(transaction=True)
def test_transfer_now_on_the_page_commits_as_it_goes_under_atomic_requests(
    operator: Client,
    make_storage: Callable[..., QueuedStorage],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(connection.settings_dict, "ATOMIC_REQUESTS", True)
    AtomicProbeStorage.in_transaction.clear()
    storage = make_storage(
        remote="tests.test_admin.AtomicProbeStorage",
        remote_options={"location": str(tmp_path / "probe")},
    )
    storage.save("a.txt", content())
    row = PendingTransfer.objects.get(storage_key=storage.key)

    response = press(operator, row, "transfer_now")

    assert messages_of(response) == ["1 transferred; 0 to retry; 0 failed."]
    # The claim was committed before the upload started.
    assert AtomicProbeStorage.in_transaction == [False]


@pytest.mark.django_db
def test_a_row_that_changed_since_the_page_was_shown_is_left_alone_and_said_so(
    operator: Client,
) -> None:
    row = pending_row(status=Status.FAILED, attempts=6)
    shown = {"status": row.status, "generation": str(row.generation)}
    PendingTransfer.objects.filter(pk=row.pk).update(status=Status.DONE)

    response = press(operator, row, "retry_now", **shown)

    assert response.redirect_chain == [(change_url(row), 302)]
    assert messages_of(response) == [
        "Retry now was not run: this transfer changed since the page was shown "
        "(it was failed, it is done now). Look at it again, then choose."
    ]
    assert fresh(row).status == Status.DONE

    # Re-saved in between (a new generation): not the row the page showed either.
    requeued = pending_row(status=Status.FAILED)
    shown = {"status": requeued.status, "generation": str(requeued.generation)}
    PendingTransfer.objects.filter(pk=requeued.pk).update(generation=1)
    response = press(operator, requeued, "hold", **shown)
    assert "Hold was not run: this transfer changed" in messages_of(response)[0]
    assert fresh(requeued).status == Status.FAILED


@pytest.mark.django_db
def test_a_button_that_does_not_apply_any_more_says_why(operator: Client) -> None:
    row = pending_row(status=Status.DONE)

    response = press(operator, row, "hold")

    (message,) = messages_of(response)
    assert message.startswith("Hold was not run: it is done")
    assert fresh(row).status == Status.DONE


@pytest.mark.django_db
def test_a_row_gone_since_the_page_was_shown_says_so(operator: Client) -> None:
    row = pending_row(status=Status.QUEUED, deleted=True)
    url = run_url(row, "retry_now")
    PendingTransfer.objects.filter(pk=row.pk).delete()  # purged by a worker

    response = operator.post(url, {"status": "queued"}, follow=True)

    assert response.redirect_chain == [(changelist_url(), 302)]
    assert messages_of(response) == [
        "This transfer is no longer in the ledger (its file was deleted and "
        "removed); nothing was done."
    ]


@pytest.mark.django_db
def test_view_only_staff_sees_no_buttons_and_a_forged_post_changes_nothing(
    viewer: Client, caplog: pytest.LogCaptureFixture
) -> None:
    row = pending_row(status=Status.FAILED, attempts=6)

    page = viewer.get(change_url(row)).content.decode()
    assert buttons_of(page) == set()
    assert "not now" not in page

    with caplog.at_level("INFO", logger="queued_storage"):
        for action in ("retry_now", "hold", "transfer_now"):
            assert press(viewer, row, action).status_code == 403
    assert (fresh(row).status, fresh(row).attempts) == (Status.FAILED, 6)
    assert not [m for m in caplog.messages if "admin action" in m]


@pytest.mark.django_db
def test_buttons_need_post_csrf_and_a_known_action(
    operator: Client, django_user_model: Any
) -> None:
    row = pending_row(status=Status.FAILED, attempts=6)

    assert operator.get(run_url(row, "retry_now")).status_code == 405
    assert press(operator, row, "delete_selected").status_code == 404
    user = django_user_model.objects.get(username="change_pendingtransfer")
    checked = Client(enforce_csrf_checks=True)
    checked.force_login(user)
    forged = checked.post(
        run_url(row, "retry_now"),
        {"status": row.status, "generation": str(row.generation)},
    )
    assert forged.status_code == 403
    assert fresh(row).status == Status.FAILED


@pytest.mark.django_db
def test_the_button_permission_is_the_actions_permission(
    django_user_model: Any,
) -> None:
    # The view and add permissions without change: no action, so no button.
    client = staff_client(django_user_model, "view_pendingtransfer", "add_permission")
    row = pending_row(status=Status.FAILED)

    assert buttons_of(client.get(change_url(row)).content.decode()) == set()
    assert press(client, row, "retry_now").status_code == 403

    user = django_user_model.objects.get(username="view_pendingtransfer-add_permission")
    user.user_permissions.add(Permission.objects.get(codename="change_pendingtransfer"))
    assert buttons_of(client.get(change_url(row)).content.decode()) == {
        "retry_now",
        "hold",
        "transfer_now",
    }


# Error history


@pytest.mark.django_db
@override_settings(TIME_ZONE="Europe/Berlin")
def test_error_history_shows_local_times_durations_classes_and_messages(
    admin_client: Client,
) -> None:
    at = datetime(2026, 7, 1, 10, 0, tzinfo=dt_timezone.utc)
    row = pending_row(
        status=Status.QUEUED,
        attempts=3,
        error_history=history(
            # Written before durations were kept.
            {"attempt": 1, "at": at.isoformat(), "error": "OSError", "message": "a"},
            failure(2, at + timedelta(minutes=1), duration=2.5),
            failure(3, at + timedelta(minutes=5), duration=125.0),
            {"attempt": 4, "at": "not a time", "error": "X", "message": "b"},
            "not an entry",
        ),
    )

    page = admin_client.get(change_url(row)).content.decode()

    # 10:00 UTC is noon in Berlin in July; the admin's own date format.
    assert "July 1, 2026, noon" in page
    assert "July 1, 2026, 12:05 p.m." in page
    assert at.isoformat() not in page
    assert "2.5 s" in page
    assert "2 min 5 s" in page
    assert "ConnectionError" in page
    assert "remote unreachable on attempt 3" in page
    assert "not a time" in page  # an unreadable time is shown as it is


def test_a_failure_records_how_long_its_attempt_ran() -> None:
    started = datetime(2026, 7, 1, 10, 0, tzinfo=dt_timezone.utc)

    entry = error_entry(
        OSError("x"), 1, started + timedelta(seconds=3.25), started=started
    )
    old = error_entry(OSError("x"), 1, started)

    assert entry["duration"] == 3.25
    assert "duration" not in old


@pytest.mark.django_db(transaction=True)
def test_a_worker_records_the_duration_of_each_failed_attempt(
    make_storage: Callable[..., QueuedStorage],
) -> None:
    storage = make_storage(remote=FLAKY, remote_options={"failures": 1})
    storage.save("docs/fails.txt", content())
    before = timezone.now()

    drain(keys=[storage.key])

    row = PendingTransfer.objects.get(storage_key=storage.key)
    (entry,) = row.error_history
    took = (timezone.now() - before).total_seconds()
    assert entry["error"] == "ConnectionError"
    assert isinstance(entry["duration"], float)
    assert 0 <= entry["duration"] <= took


@pytest.mark.django_db
def test_detail_page_costs_the_same_queries_however_long_its_history(
    admin_client: Client, django_assert_num_queries: Any
) -> None:
    at = timezone.now()
    short = pending_row(status=Status.FAILED, error_history=[failure(1, at)])
    long = pending_row(
        status=Status.FAILED,
        error_history=[failure(n, at, duration=1.0) for n in range(10)],
    )
    admin_client.get(change_url(short))  # warms the session

    # The session, the user, the row, its storage's pause (Transfer now).
    with django_assert_num_queries(4):
        assert admin_client.get(change_url(short)).status_code == 200
    with django_assert_num_queries(4):
        assert admin_client.get(change_url(long)).status_code == 200


# What the flags mean for this row


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("fields", "deleted", "remote"),
    [
        (
            {"status": Status.QUEUED},
            "No",
            "None yet: not uploaded.",
        ),
        (
            {"status": Status.QUEUED, "attempts": 2},
            "No",
            "None yet: no attempt has written it.",
        ),
        (
            {"status": Status.QUEUED, "remote_owned": True, "attempts": 1},
            "No",
            "An earlier attempt or upload of this name may have written it; "
            "the next upload replaces it.",
        ),
        (
            {"status": Status.DONE, "remote_owned": True},
            "No",
            "Ours: uploaded by this transfer and verified.",
        ),
        (
            {"status": Status.DONE},
            "No",
            "On the remote; recorded without an upload (adopted).",
        ),
        (
            {"status": Status.QUEUED, "deleted": True, "remote_owned": True},
            "Yes: deleted by the application; the files are being removed.",
            "An earlier attempt or upload of this name may have written it; "
            "the next upload replaces it.",
        ),
    ],
)
def test_state_texts_describe_the_rows_real_state(
    admin_client: Client, fields: dict[str, Any], deleted: str, remote: str
) -> None:
    row = pending_row(**fields)

    page = admin_client.get(change_url(row)).content.decode()

    assert f'<div class="readonly">{deleted}</div>' in page
    assert f'<div class="readonly">{remote}</div>' in page
    if not row.deleted:
        assert "the files are being removed" not in page
    assert "Remote object is ours" not in page


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("status", "shown"),
    [
        (Status.FAILED, "None: out of attempts, waits to be re-queued."),
        (Status.HELD, "None: held, waits for transfer() or Retry now."),
        (Status.TRANSFERRING, "None: a worker is transferring it."),
        (Status.DONE, "None: done."),
    ],
)
def test_a_row_no_worker_will_take_shows_no_next_attempt_time(
    admin_client: Client, status: str, shown: str
) -> None:
    """A failed row's old next attempt time read as if it would be retried."""
    row = pending_row(status=status, next_attempt_at=timezone.now())

    page = admin_client.get(change_url(row)).content.decode()

    assert f'<div class="readonly">{shown}</div>' in page


@pytest.mark.django_db
def test_a_queued_rows_next_attempt_is_its_local_time(
    admin_client: Client, settings: Any
) -> None:
    settings.TIME_ZONE = "Asia/Kolkata"
    when = datetime(2026, 12, 1, 12, 0, tzinfo=dt_timezone.utc)
    row = pending_row(status=Status.QUEUED, next_attempt_at=when)

    page = admin_client.get(change_url(row)).content.decode()

    assert "Dec. 1, 2026, 5:30 p.m." in page


# Links to the copies


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("fields", "sides"),
    [
        ({"status": Status.QUEUED}, {"local"}),
        ({"status": Status.FAILED}, {"local"}),
        ({"status": Status.HELD}, {"local"}),
        ({"status": Status.DONE}, {"remote"}),
        ({"status": Status.DONE, "deleted": True}, set()),
    ],
)
def test_file_links_only_where_the_ledger_says_a_copy_is(
    admin_client: Client, fields: dict[str, Any], sides: set[str]
) -> None:
    row = pending_row(**fields)

    page = admin_client.get(change_url(row)).content.decode()

    shown = {side for side in ("local", "remote") if file_url(row, side) in page}
    assert shown == sides


@pytest.mark.django_db
def test_the_detail_page_asks_no_storage_anything(
    admin_client: Client, storage: QueuedStorage
) -> None:
    storage.save("docs/a.txt", content())
    row = PendingTransfer.objects.get(storage_key=storage.key)
    PendingTransfer.objects.filter(pk=row.pk).update(status=Status.DONE)

    assert admin_client.get(change_url(row)).status_code == 200

    for method in ("exists", "url", "size", "save"):
        assert remote_calls(storage, method) == 0, method


# The count line


@pytest.mark.parametrize(
    ("counts", "line"),
    [
        ({}, "0 transfers"),
        ({Status.FAILED: 1}, "1 transfer, failed"),
        ({Status.DONE: 3}, "3 transfers, all done"),
        ({Status.DONE: 2, Status.FAILED: 1}, "3 transfers, 2 done, 1 failed"),
        (
            {Status.QUEUED: 1, Status.DONE: 10, Status.FAILED: 1},
            "12 transfers, 1 queued, 10 done, 1 failed",
        ),
    ],
)
def test_count_line_says_what_it_counts(counts: dict[str, int], line: str) -> None:
    by_status = {status: counts.get(status, 0) for status in Status.values}

    assert count_line(by_status) == line


@pytest.mark.django_db
def test_changelist_count_line_counts_the_filtered_rows(admin_client: Client) -> None:
    assert "0 transfers<" in admin_client.get(changelist_url()).content.decode()
    pending_rows(2, status=Status.DONE)
    pending_row(status=Status.FAILED)

    page = admin_client.get(changelist_url()).content.decode()
    failed = admin_client.get(changelist_url(status__exact="failed")).content.decode()

    assert "3 transfers, 2 done, 1 failed<" in page
    # Django's own count line ("3 pending transfers"); Django 6.1's hidden
    # "Search pending transfers" heading is not one.
    assert re.search(r"\d pending transfers<", page) is None
    assert "1 transfer, failed<" in failed


# In a browser


def session_cookie(live_server: Any, user: Any) -> dict[str, str]:
    client = Client()
    client.force_login(user)
    return {
        "name": "sessionid",
        "value": client.cookies["sessionid"].value,
        "url": live_server.url,
    }


def long_ledger() -> PendingTransfer:
    """Rows with long names and errors in each status; returns the failed one
    with the longest history."""
    now = timezone.now()
    deep = "customers/acme-corporation-international/invoices/2026/december/"
    error = (
        "ClientError: An error occurred (SlowDown) when calling the PutObject "
        "operation: Please reduce your request rate. " * 3
    )
    for n, status in enumerate(Status.values * 3):
        pending_row(
            storage_key="media-s3-eu-central-1",
            name=f"{deep}{n:03d}-{'very-long-file-name-' * 6}scan.pdf",
            status=status,
            attempts=n % 6,
            size=123_456_789 * (n + 1),
            last_error=error if status in (Status.QUEUED, Status.FAILED) else "",
            transferred_at=now if status == Status.DONE else None,
            lease_expires_at=now + timedelta(minutes=5)
            if status == Status.TRANSFERRING
            else None,
        )
    return pending_row(
        storage_key="media-s3-eu-central-1",
        name=f"{deep}report-{'x' * 150}.pdf",
        status=Status.FAILED,
        attempts=6,
        size=5_000_000,
        checksum="ab" * 32,
        host="web-3",
        last_error=error,
        error_history=[
            failure(
                n,
                now - timedelta(minutes=60 - n * 7),
                duration=[0.31, 2.5, 12.0, 65.0, 3725.0, 30.0][n % 6],
            )
            for n in range(1, 7)
        ],
    )


def buttons_shown(page: Any) -> list[str]:
    texts = page.locator("#queued-storage-row-actions button").all_inner_texts()
    return [text.strip() for text in texts]


def page_width(page: Any) -> int:
    width = page.evaluate("document.documentElement.scrollWidth")
    assert isinstance(width, int)
    return width


@pytest.mark.slow
@sqlite_leg_only
@pytest.mark.django_db(transaction=True)
def test_changelist_fits_1280_pixels_and_the_detail_page_buttons_work(
    tmp_path: Path, live_server: Any, admin_user: Any
) -> None:
    row = long_ledger()
    cookie = session_cookie(live_server, admin_user)
    SHOTS.mkdir(parents=True, exist_ok=True)
    # No database access in here: Playwright runs an event loop in this thread.
    with chromium_page(tmp_path / "profile") as page:
        page.set_viewport_size({"width": 1280, "height": 800})
        page.context.add_cookies([cookie])

        page.goto(live_server.url + changelist_url())
        page.screenshot(path=str(SHOTS / "changelist-1280.png"), full_page=True)
        count_line = page.inner_text("#queued-storage-count-line")
        changelist_width = page_width(page)
        # Django lets the results scroll inside their own box: that counts too.
        results = page.evaluate(
            "[...document.querySelectorAll('#changelist .results')]"
            ".map(box => box.scrollWidth - box.clientWidth)"
        )
        tooltips = page.locator(f'.field-name_display span[title="{row.name}"]')
        named = tooltips.count()

        page.goto(live_server.url + change_url(row))
        page.screenshot(path=str(SHOTS / "detail-failed.png"), full_page=True)
        history_rows = page.locator("table.qs-history tbody tr").count()
        before = buttons_shown(page)
        detail_width = page_width(page)

        page.click("form.qs-run-hold button")
        page.screenshot(path=str(SHOTS / "detail-after-hold.png"), full_page=True)
        message = page.inner_text("ul.messagelist")
        after = buttons_shown(page)

    assert changelist_width <= 1280, f"the changelist is {changelist_width} px wide"
    assert results == [0], f"the results scroll sideways by {results} px"
    assert count_line == (
        "16 transfers, 3 held, 3 queued, 3 transferring, 3 done, 4 failed"
    )
    assert named == 1  # a cut name keeps the whole in its tooltip
    assert detail_width <= 1280, f"the detail page is {detail_width} px wide"
    assert history_rows == 6
    assert before == ["Retry now", "Hold", "Transfer now"]
    assert message == "1 transfer held; Retry now releases it."
    assert after == ["Retry now", "Transfer now"]
    assert fresh(row).status == Status.HELD
