"""A person's walk through the sandbox, in headless Chromium with JavaScript off:
upload, see the file served locally, let the worker move it, see it served from
S3 with the same bytes; break S3, see a transfer fail, retry it from the admin.

Screenshots of each step go to var/screenshots/sandbox/ (git-ignored).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser import SCREENSHOTS, Sandbox, chromium_page, png, running_sandbox
from tests.tools import sqlite_leg_only

pytestmark = [pytest.mark.slow, sqlite_leg_only]

SHOTS = SCREENSHOTS / "sandbox"


@pytest.fixture(params=[None])
def sandbox(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Sandbox]:
    """The running sandbox; ``params`` sets its worker (None: process_transfers)."""
    with running_sandbox(tmp_path / "sandbox", worker=request.param) as running:
        yield running
    # Ctrl-C stopped the runner and every process it started.
    assert running.leftovers == [], running.output()
    assert running.process.returncode == 0, running.output()
    assert "Sandbox stopped." in running.output()
    assert "Traceback" not in running.output(), running.output()


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Any]:
    with chromium_page(tmp_path / "profile", java_script_enabled=False) as opened:
        yield opened


@pytest.fixture
def shot(request: pytest.FixtureRequest, page: Any) -> Callable[[str], None]:
    folder = SHOTS / request.node.originalname.removeprefix("test_")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    taken = iter(range(1, 100))

    def take(step: str) -> None:
        page.screenshot(
            path=str(folder / f"{next(taken):02d}-{step}.png"), full_page=True
        )

    return take


def reload_until(page: Any, condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 60
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}:\n{page.content()}")
        time.sleep(0.5)
        page.reload()


def card(page: Any, name: str) -> Any:
    return page.locator(f'li.card[data-name="{name}"]')


def apply_switches(page: Any, *, hold: bool, s3_down: bool) -> None:
    page.set_checked("input[name=hold_transfers]", hold)
    page.set_checked("input[name=remote_down]", s3_down)
    page.click("form.switches button")


def upload(
    page: Any,
    sandbox: Sandbox,
    title: str,
    name: str,
    body: bytes,
    shot: Callable[[str], None] | None = None,
) -> None:
    page.click("text=Upload a file")
    assert page.url == sandbox.url + "upload/"
    page.fill("input[name=title]", title)
    page.set_input_files(
        "input[name=file]",
        files=[{"name": name, "mimeType": "image/png", "buffer": body}],
    )
    if shot is not None:
        shot("upload-form")
    page.click("form.panel button[type=submit]")
    assert page.url == sandbox.url


def download(page: Any, href: str) -> bytes:
    response = page.request.get(href)
    assert response.ok, f"GET {href}: {response.status}"
    return bytes(response.body())


def test_upload_transfer_fail_and_retry_in_the_sandbox(
    page: Any, sandbox: Sandbox, shot: Callable[[str], None]
) -> None:
    page.goto(sandbox.url)
    assert "No uploads yet" in page.inner_text("main")
    shot("empty-gallery")

    # Hold the worker so the file can be seen on local storage first.
    apply_switches(page, hold=True, s3_down=False)
    assert page.is_checked("input[name=hold_transfers]")
    sunset = png(320, 200, seed=1)
    upload(page, sandbox, "Sunset", "sunset.png", sunset, shot)
    assert "Saved uploads/sunset.png on local storage" in page.inner_text(".messages")
    entry = card(page, "uploads/sunset.png")
    assert entry.get_attribute("data-served-from") == "local"
    assert entry.locator(".badge.served").inner_text().lower() == "local"
    local_href = entry.locator("a.download").get_attribute("href")
    assert local_href == "/media/uploads/sunset.png"
    assert download(page, sandbox.url.rstrip("/") + local_href) == sunset
    shot("uploaded-served-locally")

    # Let the worker run; reload until the ledger says the file is on S3.
    apply_switches(page, hold=False, s3_down=False)
    reload_until(
        page,
        lambda: (
            card(page, "uploads/sunset.png").get_attribute("data-served-from")
            == "remote"
        ),
        "the worker to move sunset.png to S3",
    )
    entry = card(page, "uploads/sunset.png")
    assert entry.locator(".badge.served").inner_text().lower() == "remote"
    assert entry.get_attribute("data-status") == "done"
    remote_href = entry.locator("a.download").get_attribute("href")
    assert not remote_href.startswith(sandbox.url), remote_href
    assert "/sandbox/uploads/sunset.png?" in remote_href  # the bucket, presigned
    assert download(page, remote_href) == sunset
    shot("transferred-served-from-s3")
    page.goto(remote_href)
    shot("image-from-s3")

    # Break S3: the next upload is retried, then fails, and says why.
    page.goto(sandbox.url)
    apply_switches(page, hold=False, s3_down=True)
    harbour = png(320, 200, seed=2)
    upload(page, sandbox, "Harbour", "harbour.png", harbour)
    reload_until(
        page,
        lambda: (
            card(page, "uploads/harbour.png").get_attribute("data-status") == "failed"
        ),
        "the transfer of harbour.png to fail",
    )
    entry = card(page, "uploads/harbour.png")
    assert entry.get_attribute("data-served-from") == "local"
    assert "S3 is switched off" in entry.locator(".error").inner_text()
    assert "3 attempts" in entry.locator(".badge.status").inner_text().lower()
    shot("transfer-failed")
    apply_switches(page, hold=False, s3_down=False)

    # The admin: log in, find the failed transfer, retry it, see it done.
    page.goto(sandbox.url + "admin/")
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", "admin")
    page.click("input[type=submit]")
    assert "Site administration" in page.inner_text("body")
    shot("admin-logged-in")
    page.click("text=Pending transfers")
    page.locator("#changelist-filter").get_by_role(
        "link", name="failed", exact=True
    ).click()
    rows = page.locator("#result_list tbody tr")
    assert rows.count() == 1
    assert "uploads/harbour.png" in rows.first.inner_text()
    shot("admin-failed-transfer")
    rows.first.locator("input[name=_selected_action]").check()
    page.select_option("select[name=action]", "retry_now")
    page.click("button[name=index]")
    assert "1 transfer queued." in page.inner_text(".messagelist")
    shot("admin-retried")
    page.goto(
        sandbox.url + "admin/queued_storage/pendingtransfer/?q=harbour",
    )
    reload_until(
        page,
        lambda: "done" in page.locator("#result_list tbody tr").first.inner_text(),
        "the retried transfer to be done",
    )
    shot("admin-transfer-done")

    page.goto(sandbox.url)
    entry = card(page, "uploads/harbour.png")
    assert entry.get_attribute("data-served-from") == "remote"
    assert download(page, entry.locator("a.download").get_attribute("href")) == harbour
    shot("gallery-both-on-s3")


@pytest.mark.parametrize("sandbox", ["django_q"], indirect=True)
def test_the_sandbox_with_django_q2_transfers_an_upload(
    page: Any, sandbox: Sandbox, shot: Callable[[str], None]
) -> None:
    """SANDBOX_WORKER=django_q: qcluster wakes up for the upload; Ctrl-C stops the
    cluster's processes too (the fixture checks the process group is gone)."""
    page.goto(sandbox.url)
    shot("empty-gallery")
    meadow = png(320, 200, seed=3)
    upload(page, sandbox, "Meadow", "meadow.png", meadow)
    reload_until(
        page,
        lambda: (
            card(page, "uploads/meadow.png").get_attribute("data-served-from")
            == "remote"
        ),
        "qcluster to move meadow.png to S3",
    )
    entry = card(page, "uploads/meadow.png")
    assert entry.get_attribute("data-status") == "done"
    assert download(page, entry.locator("a.download").get_attribute("href")) == meadow
    shot("transferred-by-qcluster")
