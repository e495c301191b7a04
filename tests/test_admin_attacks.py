"""Attacks on the ledger's admin pages (issue 15, point 1): a transfer's page and
its buttons, the changelist and the dashboard, against settings (thousand
separators, USE_TZ False), rows written by hand, by a bug or by another version
(malformed or overlong error histories, an unknown status), secrets in a process
that has not built its storages yet, injected markup, forged posts, a worker
taking a row over between the check and the click, and a remote that must not be
asked anything; the dashboard with a 255-character storage key in a 1280-pixel
window."""

from __future__ import annotations

import gc
import re
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from pathlib import Path
from typing import Any, ClassVar

import pytest
from django.core.files.storage import FileSystemStorage
from django.db import connection
from django.test import Client, override_settings
from django.urls import reverse
from django.utils import timezone
from django.utils.http import urlencode

from queued_storage import admin_detail, registry
from queued_storage.backends import QueuedStorage
from queued_storage.error_history import ERROR_HISTORY_LENGTH, error_entry
from queued_storage.models import PendingTransfer
from queued_storage.pausing import pause, resume
from queued_storage.worker import drain
from tests.browser import SCREENSHOTS, chromium_page
from tests.factories import pending_row
from tests.helpers import FLAKY, content, queued_alias, remote_calls
from tests.test_admin import change_url, changelist_url, fresh, messages_of, operator
from tests.test_admin_detail import (
    buttons_of,
    page_width,
    press,
    run_url,
    session_cookie,
)
from tests.tools import sqlite_leg_only

Status = PendingTransfer.Status
DASHBOARD = "admin:queued_storage_transferdashboard_changelist"
# A fixture of tests/test_admin.py, used here by name.
__all__ = ["operator"]


def hidden_inputs(page: str, action: str) -> dict[str, str]:
    """What the button ``action``'s form of a transfer's page sends."""
    form = re.search(rf'class="qs-run-{action}">(.*?)</form>', page, re.DOTALL)
    assert form is not None, action
    return dict(re.findall(r'type="hidden" name="(\w+)" value="([^"]*)"', form[1]))


# Broke: the buttons of a row re-saved a thousand times were always refused where
# USE_THOUSAND_SEPARATOR is on (the form sent generation 1234 as "1,234").


@pytest.mark.django_db
@pytest.mark.parametrize("language", ["en", "de"])
def test_buttons_work_on_a_row_resaved_thousands_of_times_with_thousand_separators(
    operator: Client, language: str
) -> None:
    row = pending_row(status=Status.FAILED, attempts=6, generation=1234)

    with override_settings(LANGUAGE_CODE=language, USE_THOUSAND_SEPARATOR=True):
        page = operator.get(change_url(row)).content.decode()
        sent = hidden_inputs(page, "retry_now")
        operator.post(run_url(row, "retry_now"), sent, follow=True)

    assert sent.pop("csrfmiddlewaretoken")
    assert sent == {"status": "failed", "generation": "1234"}
    assert (fresh(row).status, fresh(row).attempts) == (Status.QUEUED, 0)


# Broke: the changelist was a server error on a site with USE_TZ = False (its
# "updated" line asked for the local time of a naive datetime).


@pytest.mark.django_db
@override_settings(USE_TZ=False)
def test_the_admin_pages_work_where_use_tz_is_false(admin_client: Client) -> None:
    now = timezone.now()
    assert timezone.is_naive(now)
    today = pending_row(status=Status.FAILED, attempts=2, last_error="OSError: x")
    last_year = pending_row(status=Status.DONE, transferred_at=now)
    PendingTransfer.objects.filter(pk=last_year.pk).update(
        updated_at=now - timedelta(days=400)
    )
    pending_row(status=Status.TRANSFERRING, lease_expires_at=now + timedelta(minutes=5))

    listed = admin_client.get(changelist_url())
    shown = admin_client.get(change_url(today))
    dashboard = admin_client.get(reverse(DASHBOARD))

    assert (listed.status_code, shown.status_code, dashboard.status_code) == (
        200,
        200,
        200,
    )
    assert listed.content.decode().count('<span class="qs-updated">') == 3


# Broke: a transfer's page, when it was the first page a web process showed,
# quoted the secrets of a storage configured in STORAGES that an older row's error
# quoted (redaction knew only the storages the process had built; the changelist
# built them through its storage filter, the transfer's page did not).


@pytest.mark.django_db
def test_a_transfers_page_shown_first_in_its_process_quotes_no_secret(
    admin_client: Client, settings: Any, tmp_path: Path
) -> None:
    secret = "vault-credential-7f3a9c11"
    settings.STORAGES = {
        **settings.STORAGES,
        "vault": queued_alias(
            key="vault",
            local_options={"location": str(tmp_path / "local")},
            remote="tests.storages.KeyedRemote",
            remote_options={"secret_key": secret, "location": str(tmp_path / "r")},
        ),
    }
    gc.collect()  # no storage built before holds the new alias's options
    # Written before today's redaction rules: an error quoting the secret bare.
    error = f"ClientError: the signature does not match {secret}"
    row = pending_row(
        storage_key="vault",
        status=Status.FAILED,
        attempts=1,
        last_error=error,
        error_history=[error_entry("x", 1, timezone.now(), message=error)],
    )

    page = admin_client.get(change_url(row)).content.decode()

    assert "ClientError: the signature does not match [redacted]" in page
    assert secret not in page


# Broke: a row whose error history was written by hand, by a bug or by another
# version made its page a server error: a history that is not a list, a duration
# of 1e400 (SQLite and MariaDB read it as infinity, PostgreSQL as a 401-digit
# integer), a time that the active time zone cannot show.


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("history", "shown"),
    [
        ("5", "-"),
        ('"not a history"', "-"),
        ('{"attempt": 1}', "-"),
        ('[{"attempt": 7, "at": "2026-01-01T00:00:00+00:00", "duration": 1e400}]', "7"),
        (
            '[{"attempt": 7, "at": "2026-01-01T00:00:00+00:00", "duration": -1e400}]',
            "7",
        ),
        ('[{"attempt": 7, "at": "9999-12-31T23:59:59-05:00"}]', "9999-12-31T23:59:59"),
        ('[{"attempt": 7, "at": "0001-01-01T00:00:00+05:00"}]', "0001-01-01T00:00:00"),
    ],
)
def test_a_malformed_error_history_leaves_the_page_readable(
    admin_client: Client, history: str, shown: str
) -> None:
    row = pending_row(status=Status.FAILED, attempts=7, last_error="OSError: x")
    table = connection.ops.quote_name(PendingTransfer._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET error_history = %s WHERE id = %s", [history, row.pk]
        )

    response = admin_client.get(change_url(row))

    assert response.status_code == 200
    cell = re.search(
        r'field-error_history_table.*?<div class="readonly">(.*?)</div>',
        response.content.decode(),
        re.DOTALL,
    )
    assert cell is not None
    assert shown in cell[1]
    assert "OSError: x" in response.content.decode()


# Broke (the worker, invariant 7): a row whose error history was not a list (5)
# crashed the worker's record of its failure ("could not record a crash"): the row
# stayed transferring, its attempt and error unrecorded, until its lease ran out,
# and again at every attempt. Now the failure is kept, in a history of entries.


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("history", ["5", '"not a history"', '[1, "x", {"a": 1}]'])
def test_a_failure_of_a_row_with_a_malformed_history_is_recorded(
    make_storage: Any, history: str
) -> None:
    storage = make_storage(remote=FLAKY, remote_options={"failures": 1})
    storage.save("docs/fails.txt", content())
    row = PendingTransfer.objects.get(storage_key=storage.key)
    table = connection.ops.quote_name(PendingTransfer._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET error_history = %s WHERE id = %s", [history, row.pk]
        )

    stats = drain(keys=[storage.key])

    row = fresh(row)
    assert (stats.retried, row.status, row.attempts) == (1, Status.QUEUED, 1)
    kept = [e for e in row.error_history if isinstance(e, dict) and "error" in e]
    assert [entry["error"] for entry in kept] == ["ConnectionError"]
    assert row.last_error == "ConnectionError: remote unreachable"


# Broke: a history of thousands of entries (a row keeps ten) made a page of
# megabytes: 5,000 entries of 2,000 characters took 10 MB and a second (2,000 of 500
# here: MariaDB's default max_allowed_packet).


@pytest.mark.django_db
def test_an_overlong_error_history_shows_its_newest_entries(
    admin_client: Client, django_assert_num_queries: Any
) -> None:
    at = datetime(2026, 7, 1, 10, 0, tzinfo=dt_timezone.utc)
    row = pending_row(
        status=Status.FAILED,
        error_history=[
            error_entry(OSError(f"attempt {n:05d} " + "x" * 500), n, at)
            for n in range(2000)
        ],
    )
    admin_client.get(change_url(row))  # warms the session

    # The session, the user, the row, its storage's pause.
    with django_assert_num_queries(4):
        page = admin_client.get(change_url(row)).content.decode()

    assert page.count("<tr><td>") == ERROR_HISTORY_LENGTH
    assert "attempt 01999 " in page and "attempt 01990 " in page
    assert "attempt 01989 " not in page
    assert "1990 older entries not shown." in page
    assert len(page) < 100_000


# Broke: a row with a status this version does not name (a newer version's, or
# one written by hand) made its page and the changelist server errors.


@pytest.mark.django_db
def test_a_status_this_version_does_not_know_is_shown_as_it_is(
    admin_client: Client,
) -> None:
    row = pending_row(status="paused", attempts=1)

    listed = admin_client.get(changelist_url())
    shown = admin_client.get(change_url(row))

    assert (listed.status_code, shown.status_code) == (200, 200)
    assert "qs-status-paused" in listed.content.decode()
    assert "its status is paused" in shown.content.decode()


# Broke: a storage key of 255 characters with no place to break made the
# dashboard 2,989 px wide in a 1280-pixel window (the list and the transfer's page
# held).


@pytest.mark.slow
@sqlite_leg_only
@pytest.mark.django_db(transaction=True)
def test_a_255_character_storage_key_fits_1280_pixels(
    tmp_path: Path, live_server: Any, admin_user: Any
) -> None:
    now = timezone.now()
    key = "media-" + "k" * 249
    word = "ZeroDivisionError" * 20
    row = pending_row(
        storage_key=key,
        name="n" * 1000,
        status=Status.FAILED,
        attempts=3,
        last_error=f"{word}: {'m' * 500}",
        host="h" * 200,
        error_history=[
            {**error_entry("x", 1, now), "error": word, "message": "m" * 2000},
            {"attempt": "1" * 100, "at": "t" * 300, "error": "e", "message": "x"},
        ],
    )
    pending_row(
        storage_key=key, status=Status.QUEUED, next_attempt_at=now - timedelta(hours=2)
    )
    cookie = session_cookie(live_server, admin_user)
    shots = SCREENSHOTS / "admin"
    shots.mkdir(parents=True, exist_ok=True)
    widths = {}
    # No database access in here: Playwright runs an event loop in this thread.
    with chromium_page(tmp_path / "profile") as page:
        page.set_viewport_size({"width": 1280, "height": 800})
        page.context.add_cookies([cookie])
        for label, url in [
            ("list", changelist_url()),
            ("detail", change_url(row)),
            ("dashboard", reverse(DASHBOARD)),
        ]:
            page.goto(live_server.url + url)
            page.screenshot(path=str(shots / f"long-key-{label}.png"), full_page=True)
            widths[label] = page_width(page)

    assert widths == {"list": 1280, "detail": 1280, "dashboard": 1280}


# Broke: on a paused storage's row, a transfer's page offered Transfer now, and
# Transfer now (the button and the action) said the row was skipped as "not due:
# done, leased by a worker, or local to another host" (the pause held: nothing
# was uploaded).


@pytest.mark.django_db(transaction=True)
def test_transfer_now_on_a_paused_storage_says_it_is_paused(
    operator: Client, storage: QueuedStorage
) -> None:
    storage.save("docs/a.txt", content())
    row = PendingTransfer.objects.get(storage_key=storage.key)
    pause([storage.key], by="ops", reason="remote maintenance")

    page = operator.get(change_url(row)).content.decode()
    pressed = press(operator, row, "transfer_now")
    acted = operator.post(
        changelist_url(),
        {"action": "transfer_now", "_selected_action": [row.pk]},
        follow=True,
    )

    assert buttons_of(page) == {"retry_now", "hold"}
    assert "Transfer now: not now, its storage is paused; resume it first" in page
    assert messages_of(pressed) == [
        "Transfer now was not run: its storage is paused; resume it first (Retry "
        "now queues it for then)."
    ]
    assert messages_of(acted) == [
        "0 transferred; 0 to retry; 0 failed; 1 not started: its storage is paused "
        "(resume it first)."
    ]
    assert remote_calls(storage, "save") == 0
    assert fresh(row).status == Status.QUEUED

    resume([storage.key], by="ops")
    assert buttons_of(operator.get(change_url(row)).content.decode()) == {
        "retry_now",
        "hold",
        "transfer_now",
    }
    assert messages_of(press(operator, row, "transfer_now")) == [
        "1 transferred; 0 to retry; 0 failed."
    ]


# Held: markup in a name, a storage key, an error, the error history's fields, a
# pause's reason and author or a forged button's form is escaped wherever it is
# shown (titles, SVG, messages).

INJECTED = (
    '"><img src=x onerror=alert(1)><svg onload=alert(2)><script>alert(3)</script>'
)


@pytest.mark.django_db
def test_injected_markup_is_escaped_on_every_page(admin_client: Client) -> None:
    now = timezone.now()
    key = f"k{INJECTED}"
    row = pending_row(
        storage_key=key,
        name=f"d/{INJECTED}" * 3,
        status=Status.FAILED,
        attempts=2,
        last_error=f"E{INJECTED}" * 5,
        host=INJECTED,
        checksum=INJECTED[:64],
        error_history=[
            {"attempt": INJECTED, "at": INJECTED, "error": INJECTED, "message": "m"},
            {**error_entry("x", 1, now, message=INJECTED), "error": INJECTED},
        ],
    )
    pending_row(
        storage_key=key, status=Status.QUEUED, next_attempt_at=now - timedelta(hours=1)
    )
    pause([key], by=INJECTED, reason=INJECTED)  # shown on the dashboard
    forged = admin_client.post(
        run_url(row, "retry_now"),
        {"status": INJECTED, "generation": INJECTED},
        follow=True,
    )
    pages = {
        "detail": admin_client.get(change_url(row)).content.decode(),
        "list": admin_client.get(changelist_url()).content.decode(),
        "search": admin_client.get(changelist_url(q="img")).content.decode(),
        "key": admin_client.get(
            reverse("admin:queued_storage_pendingtransfer_changelist")
            + "?"
            + urlencode({"storage_key": key})
        ).content.decode(),
        "dashboard": admin_client.get(reverse(DASHBOARD)).content.decode(),
        "message": forged.content.decode(),
    }

    assert "it was &quot;&gt;&lt;img src=x" in pages["message"]
    assert 'class="qs-paused"' in pages["dashboard"]
    for where, page in pages.items():
        assert "&lt;img src=x onerror=alert(1)&gt;" in page, where
        for raw in ("<img src=x", "<svg onload", "<script>alert"):
            assert raw not in page, (where, raw)
    assert fresh(row).status == Status.FAILED


# Held: forged posts to a button with a pk that is no row's change nothing.


@pytest.mark.django_db
@pytest.mark.parametrize(
    "pk", ["abc", "99999999999999999999999", "-1", "1.0", "%20", "1/../1"]
)
def test_a_button_posted_for_a_pk_that_is_no_rows_changes_nothing(
    operator: Client, pk: str
) -> None:
    row = pending_row(status=Status.FAILED, attempts=6)
    base = "/admin/queued_storage/pendingtransfer/"
    assert run_url(row, "hold").startswith(base)

    for action in ("retry_now", "hold", "transfer_now"):
        response = operator.post(
            f"{base}{pk}/run/{action}/", {"status": "failed", "generation": "0"}
        )
        assert response.status_code in (302, 404), (pk, action)

    assert (fresh(row).status, fresh(row).attempts) == (Status.FAILED, 6)


# Held (invariant 3): Transfer now on a row whose lease had run out, taken over by
# a worker between the page's check and the engine's claim, uploads nothing.


@pytest.mark.django_db(transaction=True)
def test_transfer_now_loses_to_a_worker_that_took_the_row_over_after_the_check(
    operator: Client, storage: QueuedStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage.save("docs/a.txt", content())
    PendingTransfer.objects.filter(storage_key=storage.key).update(
        status=Status.TRANSFERRING,
        lease_token="gone",
        lease_expires_at=timezone.now() - timedelta(minutes=1),
    )
    row = PendingTransfer.objects.get(storage_key=storage.key)
    page = operator.get(change_url(row)).content.decode()
    assert buttons_of(page) == {"transfer_now"}
    checked = admin_detail.action_problem

    def then_taken_over(action: str, current: PendingTransfer, **flags: bool) -> str:
        problem = checked(action, current, **flags)
        PendingTransfer.objects.filter(pk=current.pk).update(
            lease_token="live", lease_expires_at=timezone.now() + timedelta(minutes=5)
        )
        return problem

    monkeypatch.setattr(admin_detail, "action_problem", then_taken_over)

    response = press(operator, row, "transfer_now")

    (message,) = messages_of(response)
    assert message.startswith("0 transferred; 0 to retry; 0 failed; 1 skipped")
    assert remote_calls(storage, "save") == 0
    assert (fresh(row).status, fresh(row).lease_token) == (Status.TRANSFERRING, "live")


# Held (invariant 2): the changelist, the dashboard and each status's page ask the
# remote nothing.


class TripwireRemote(FileSystemStorage):
    """A remote that records every method of it that is looked up."""

    looked_up: ClassVar[list[str]] = []

    def __getattribute__(self, name: str) -> Any:
        value = super().__getattribute__(name)
        if not name.startswith("_") and callable(value):
            type(self).looked_up.append(name)
        return value


@pytest.mark.django_db
def test_the_pages_ask_the_remote_nothing(
    admin_client: Client, make_storage: Any
) -> None:
    storage = make_storage(remote="tests.test_admin_attacks.TripwireRemote")
    registry.register(storage)
    now = timezone.now()
    rows = [
        pending_row(
            storage_key=storage.key,
            status=status,
            attempts=1,
            last_error="OSError: x",
            remote_owned=True,
            transferred_at=now if status == Status.DONE else None,
            lease_expires_at=now + timedelta(minutes=1)
            if status == Status.TRANSFERRING
            else None,
        )
        for status in Status.values
    ]
    storage.remote.exists("probe")
    assert "exists" in TripwireRemote.looked_up  # the tripwire works
    TripwireRemote.looked_up.clear()

    for url in [
        changelist_url(),
        changelist_url(storage_key=storage.key),
        reverse(DASHBOARD),
        *(change_url(row) for row in rows),
    ]:
        assert admin_client.get(url).status_code == 200, url

    assert TripwireRemote.looked_up == []
