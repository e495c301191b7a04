"""An operator's walk through the admin in headless Chromium (JavaScript off: the
dashboard, the pause and resume buttons and a transfer's buttons are plain links
and POST forms): log in, read the dashboard of a backlog on three storages, follow
a count to the filtered list, pause a storage and see a real ``process_transfers``
process drain the others and leave it queued, resume it and see it drained, then
Retry now, Hold and Transfer now on a failed transfer's page; a view-only staff
user sees the same pages without a button.

Each step's full-page screenshot goes to var/screenshots/operations/ (git-ignored),
and each page fits a 1280x800 window without horizontal scroll.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.core.files.storage import storages
from django.utils import timezone

from queued_storage import adoption, history, registry
from queued_storage.backends import QueuedStorage
from queued_storage.error_history import error_entry
from queued_storage.models import PendingTransfer, StorageState
from queued_storage.worker import drain
from tests.browser import SCREENSHOTS, chromium_page
from tests.helpers import add_history, content
from tests.tools import sqlite_leg_only
from tests.workers import run_command

# The worker process must see the rows: committed, not in a test transaction.
pytestmark = [
    pytest.mark.slow,
    sqlite_leg_only,
    pytest.mark.django_db(transaction=True),
]

Status = PendingTransfer.Status
SHOTS = SCREENSHOTS / "operations"
FS = "django.core.files.storage.FileSystemStorage"
#: Photos is paused and resumed; invoices has the failed transfer; archive's
#: breaker is open.
KEYS = ("photos", "invoices", "archive")
WIDTH = 1280
DASHBOARD = "/admin/queued_storage/transferdashboard/"


@pytest.fixture
def queued(settings: Any, tmp_path: Path) -> Iterator[dict[str, QueuedStorage]]:
    """Three queued storages defined in STORAGES (so that the worker process,
    which gets this test's STORAGES, runs the same ones), on directories of this
    test; times shown in Berlin's zone, not UTC."""
    settings.TIME_ZONE = "Europe/Berlin"
    defined = dict(settings.STORAGES)
    for key in KEYS:
        defined[f"{key}-local"] = {
            "BACKEND": FS,
            "OPTIONS": {"location": str(tmp_path / key / "local"), "base_url": "/m/"},
        }
        defined[f"{key}-remote"] = {
            "BACKEND": FS,
            "OPTIONS": {
                "location": str(tmp_path / key / "remote"),
                "base_url": f"https://{key}.cdn.example/",
            },
        }
        defined[key] = {
            "BACKEND": "queued_storage.backends.QueuedStorage",
            "OPTIONS": {"local": f"{key}-local", "remote": f"{key}-remote", "key": key},
        }
    settings.STORAGES = defined
    built = {key: storages[key] for key in KEYS}
    assert all(isinstance(storage, QueuedStorage) for storage in built.values())
    yield built  # type: ignore[misc]
    for key in KEYS:
        registry.forget(key)
        adoption.forget(key)


def backlog(queued: dict[str, QueuedStorage]) -> PendingTransfer:
    """Done, queued, stuck, failed and breaker-stopped rows, and a day of history
    so that the charts have bars; returns the failed row."""
    photos, invoices, archive = (queued[key] for key in KEYS)
    for n in range(2):
        photos.save(f"albums/2026/beach-{n}.jpg", content("p" * 2000))
        invoices.save(f"2026/12/invoice-{n}.pdf", content("i" * 5000))
    drain(keys=["photos", "invoices"])
    for n in range(3):
        photos.save(f"albums/2026/harbour-{n}.jpg", content("h" * 3000))
    photos.save("albums/2026/stuck.jpg", content("s"))
    PendingTransfer.objects.for_name("photos", "albums/2026/stuck.jpg").update(
        status=Status.TRANSFERRING,
        lease_token="gone",
        lease_expires_at=timezone.now() - timedelta(minutes=20),
    )
    for n in range(2):
        invoices.save(f"2026/12/credit-note-{n}.pdf", content("c" * 800))
    invoices.save("2026/12/refused.pdf", content("r" * 1200))
    archive.save("exports/ledger-2026.csv", content("a" * 900))

    now = timezone.now()
    PendingTransfer.objects.filter(storage_key__in=KEYS, status=Status.QUEUED).update(
        next_attempt_at=now - timedelta(minutes=42)
    )
    failed = PendingTransfer.objects.for_name("invoices", "2026/12/refused.pdf")
    failed.update(
        status=Status.FAILED,
        attempts=3,
        last_error="ClientError: An error occurred (AccessDenied) when calling "
        "the PutObject operation: Access Denied",
        error_history=[
            error_entry(
                PermissionError(f"AccessDenied: bucket policy refused attempt {n}"),
                n,
                now - timedelta(minutes=30 - 9 * n),
            )
            | {"duration": duration}
            for n, duration in ((1, 0.42), (2, 3.5), (3, 75.0))
        ],
    )
    StorageState.objects.update_or_create(
        storage_key="archive",
        defaults={
            "breaker_opened_at": now - timedelta(minutes=4),
            "breaker_probe_at": now + timedelta(minutes=30),
            "breaker_failures": 5,
            "breaker_backoff": 1800.0,
        },
    )
    minute = history.this_minute(now)
    for ago in range(1, 24 * 60, 11):
        at = minute - timedelta(minutes=ago)
        add_history("photos", at, files=1 + ago % 7, bytes=250_000 * (1 + ago % 5))
        add_history("invoices", at, files=1 + ago % 3, bytes=40_000 * (1 + ago % 4))
        if ago % 4 == 0:
            add_history("invoices", at, failures=1 + ago % 3)
    add_history("archive", minute - timedelta(minutes=3), failures=5)
    return PendingTransfer.objects.get(
        storage_key="invoices", name="2026/12/refused.pdf"
    )


def view_only_staff(django_user_model: Any) -> None:
    user = django_user_model.objects.create_user(
        username="viewer", password="viewer", is_staff=True
    )
    user.user_permissions.add(
        *Permission.objects.filter(
            codename__in=["view_pendingtransfer", "view_storagestate"]
        )
    )


def section(page: Any, key: str) -> Any:
    return page.locator(f'section[data-storage-key="{key}"]')


def counts(page: Any, key: str) -> dict[str, str]:
    """The storage's rows by status, as its dashboard section shows them."""
    found: list[list[str]] = (
        section(page, key)
        .locator("ul.qs-statuses a")
        .evaluate_all(
            "links => links.map(link => [link.querySelector('.qs-count').innerText,"
            " link.innerText])"
        )
    )
    return {whole.removesuffix(count).strip().lower(): count for count, whole in found}


def drawn_bars(page: Any, key: str) -> list[int]:
    """Per chart of the storage: how many bars are taller than nothing."""
    charts = section(page, key).locator("svg.qs-chart")
    assert charts.count() > 0
    for n in range(charts.count()):
        box = charts.nth(n).bounding_box()
        assert box and box["width"] > 100 and box["height"] > 50, box
    drawn: list[int] = charts.evaluate_all(
        "charts => charts.map(chart => [...chart.querySelectorAll('rect.qs-bar')]"
        ".filter(bar => bar.getBBox().height > 0).length)"
    )
    return drawn


def texts(svg_elements: Any) -> list[str]:
    """The texts of SVG elements (which have no innerText)."""
    found: list[str] = svg_elements.evaluate_all(
        "found => found.map(e => e.textContent)"
    )
    return found


def width(page: Any) -> int:
    value = page.evaluate("document.documentElement.scrollWidth")
    assert isinstance(value, int)
    return value


def messages(page: Any) -> list[str]:
    texts: list[str] = page.locator("ul.messagelist li").all_inner_texts()
    return [text.strip() for text in texts]


def follow(page: Any, link: Any) -> None:
    """Click a link or a form's button and wait for the whole page it leads to."""
    with page.expect_navigation(wait_until="load"):
        link.click()


def log_in(page: Any, base: str, username: str, password: str) -> None:
    page.goto(base + "/admin/login/?next=/admin/")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    follow(page, page.locator("input[type=submit]"))
    assert "Site administration" in page.inner_text("#content h1")


def worker_pass() -> str:
    """One ``process_transfers`` pass, a process of its own on this database."""
    done = run_command("process_transfers", "--json", timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture
def ledger(queued: dict[str, QueuedStorage], django_user_model: Any) -> int:
    """The backlog and the view-only user, made before the browser starts (no
    database access where Playwright runs its event loop); the failed row's pk."""
    view_only_staff(django_user_model)
    return backlog(queued).pk


@pytest.fixture
def browser(tmp_path: Path, ledger: int) -> Iterator[Any]:
    with chromium_page(tmp_path / "profile", java_script_enabled=False) as opened:
        opened.set_viewport_size({"width": WIDTH, "height": 800})
        opened.set_default_timeout(10_000)
        yield opened


def shooter(page: Any) -> Callable[[str], None]:
    """Save the page's full-page screenshot as the next step; the page has no
    horizontal scroll in the 1280-pixel window."""
    shutil.rmtree(SHOTS, ignore_errors=True)
    SHOTS.mkdir(parents=True)
    taken = iter(range(1, 100))

    def take(step: str) -> None:
        page.wait_for_load_state("load")  # the whole page, not what came first
        page.screenshot(
            path=str(SHOTS / f"{next(taken):02d}-{step}.png"), full_page=True
        )
        shown = width(page)
        assert shown <= WIDTH, f"{step}: the page is {shown} px wide"

    return take


def test_an_operator_reads_the_dashboard_pauses_a_storage_and_fixes_a_transfer(
    ledger: int,
    live_server: Any,
    admin_user: Any,
    browser: Any,
) -> None:
    page, shot = browser, shooter(browser)
    base = live_server.url
    detail = base + f"/admin/queued_storage/pendingtransfer/{ledger}/change/"
    # From here on the pages and a worker process say what the ledger holds: no
    # database access in this thread, where Playwright runs an event loop.

    # 1. The dashboard, from the admin index.
    log_in(page, base, admin_user.username, "password")
    shot("admin-index")
    follow(page, page.locator(f'#content-main a[href="{DASHBOARD}"]').first)
    assert page.url == base + DASHBOARD
    assert page.inner_text("#content h1") == "Transfer dashboard"
    assert "times are local (Europe/Berlin)" in page.inner_text("#content-main")
    assert counts(page, "photos") == {
        "held": "0",
        "queued": "3",
        "transferring": "1",
        "done": "2",
        "failed": "0",
    }
    assert counts(page, "invoices") == {
        "held": "0",
        "queued": "2",
        "transferring": "0",
        "done": "2",
        "failed": "1",
    }
    photos = section(page, "photos")
    assert (
        photos.locator(".qs-oldest-due .qs-count").inner_text() == "42\xa0minutes ago"
    )
    assert photos.locator(".qs-stuck .qs-count").inner_text() == "1"
    assert "qs-alert" in (photos.locator(".qs-stuck").get_attribute("class") or "")
    # Six charts a storage (files, bytes, failures; hour and day), with bars.
    photo_bars = drawn_bars(page, "photos")
    assert len(photo_bars) == 6 and photo_bars[0] > 0 and photo_bars[3] > 0
    assert photo_bars[2] == photo_bars[5] == 0  # photos never failed
    invoice_bars = drawn_bars(page, "invoices")
    assert invoice_bars[2] > 0 and invoice_bars[5] > 0
    # The day's axis: every six hours on the hour, local time; a chart of zeros
    # has no scale above its baseline.
    day_axis = texts(photos.locator("svg.qs-chart").nth(3).locator("g text"))
    assert set(day_axis) <= {"00:00", "06:00", "12:00", "18:00"} and len(day_axis) >= 3
    scales = photos.locator("svg.qs-chart").nth(2).locator(".qs-scale")
    assert texts(scales) == ["", "0"]
    archive = section(page, "archive")
    assert "breaker open" in archive.locator("h2").inner_text()
    assert "after 5 consecutive failures" in archive.locator(".qs-breaker").inner_text()
    assert "paused" not in photos.locator("h2").inner_text()
    shot("dashboard")

    # A count leads to the filtered list with exactly its rows.
    follow(page, photos.locator("ul.qs-statuses a", has_text="queued"))
    assert "storage_key=photos" in page.url and "status__exact=queued" in page.url
    names = page.locator("#result_list tbody .field-name_display a").all_inner_texts()
    assert sorted(names) == [f"albums/2026/harbour-{n}.jpg\nphotos" for n in range(3)]
    assert page.inner_text("#queued-storage-count-line") == "3 transfers, all queued"
    shot("queued-photos-list")

    # 2. Pause photos from the dashboard; a worker drains the others only.
    page.goto(base + DASHBOARD)
    photos.locator("form.qs-pause input[name=reason]").fill("bucket migration")
    follow(page, photos.locator("form.qs-pause button"))
    assert page.url == base + DASHBOARD
    assert messages(page) == [
        "Paused the transfers of photos: workers start none until it is resumed; "
        "saves queue up."
    ]
    assert "paused" in photos.locator("h2").inner_text()
    paused = photos.locator(".qs-paused").inner_text()
    assert "by admin." in paused and "Reason: bucket migration" in paused
    assert photos.locator("form.qs-pause").count() == 0
    shot("photos-paused")

    worker_pass()
    page.reload()
    # Paused: neither its queued rows nor its stuck one were started.
    assert counts(page, "photos") == {
        "held": "0",
        "queued": "3",
        "transferring": "1",
        "done": "2",
        "failed": "0",
    }
    assert counts(page, "invoices")["queued"] == "0"
    assert counts(page, "invoices")["done"] == "4"
    assert counts(page, "archive")["queued"] == "1"  # its breaker is open
    shot("drained-while-paused")

    follow(page, photos.locator("form.qs-resume button"))
    assert messages(page) == ["Resumed the transfers of photos."]
    assert "paused" not in photos.locator("h2").inner_text()
    worker_pass()
    page.reload()
    # Its queued rows done, and its stuck row taken over and done.
    assert counts(page, "photos") == {
        "held": "0",
        "queued": "0",
        "transferring": "0",
        "done": "6",
        "failed": "0",
    }
    assert section(page, "photos").locator(".qs-stuck .qs-count").inner_text() == "0"
    shot("resumed-and-drained")

    # 3. The failed transfer's page: its history; Retry now, Hold, Transfer now.
    follow(
        page, section(page, "invoices").locator("ul.qs-statuses a", has_text="failed")
    )
    follow(page, page.locator("#result_list tbody .field-name_display a").first)
    assert page.url.startswith(detail + "?_changelist_filters=")
    history_rows = page.locator("table.qs-history tbody tr")
    assert history_rows.count() == 3
    table = page.inner_text("table.qs-history")
    assert not re.search(r"\d{4}-\d\d-\d\dT\d\d:", table), table  # no raw ISO time
    for duration in ("0.42 s", "3.5 s", "1 min 15 s"):
        assert duration in table, table
    assert "bucket policy refused attempt 3" in table
    shot("failed-transfer")

    follow(page, page.locator("form.qs-run-retry_now button"))
    assert messages(page) == ["1 transfer queued."]
    assert page.inner_text(".field-status_badge .readonly").strip().lower() == "queued"
    assert page.inner_text(".field-attempts .readonly").strip() == "0"
    shot("retried")

    follow(page, page.locator("form.qs-run-hold button"))
    assert messages(page) == ["1 transfer held; Retry now releases it."]
    assert page.inner_text(".field-status_badge .readonly").strip().lower() == "held"
    shot("held")

    follow(page, page.locator("form.qs-run-transfer_now button"))
    assert messages(page) == ["1 transferred; 0 to retry; 0 failed."]
    assert page.inner_text(".field-status_badge .readonly").strip().lower() == "done"
    assert page.locator("#queued-storage-row-actions button").count() == 0
    shot("transferred-now")

    # 4. A view-only staff user: the same pages, no button.
    page.context.clear_cookies()
    log_in(page, base, "viewer", "viewer")
    page.goto(base + DASHBOARD)
    assert counts(page, "invoices")["done"] == "5"
    assert page.locator("form.qs-pause, form.qs-resume").count() == 0
    assert page.locator("#content-main button").count() == 0
    shot("viewer-dashboard")
    page.goto(detail)
    assert page.locator("table.qs-history tbody tr").count() == 3
    assert (
        page.locator("#content-main button, #content-main input[type=submit]").count()
        == 0
    )
    shot("viewer-transfer")
