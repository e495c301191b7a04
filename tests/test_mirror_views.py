"""A storage's destinations (its own remote and each mirror, a ledger key each)
in every view of the ledger: a transfer's page lists each destination's row of
the name (one query more), the changelist filters and labels them, the
dashboard and ``transfer_status`` show a mirror's key under its storage's, and
the metrics say which storage each key belongs to. Mirror rows are written
directly, as the engine's fan-out would leave them."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from io import StringIO
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from django.core.management import call_command
from django.db import connections
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from queued_storage import destinations, registry
from queued_storage.backends import QueuedStorage
from queued_storage.destinations import Destination
from queued_storage.failures import ledger_db
from queued_storage.models import PendingTransfer, StorageState
from tests.factories import pending_row
from tests.helpers import FS

pytestmark = pytest.mark.django_db

Status = PendingTransfer.Status
DASHBOARD = "/admin/queued_storage/transferdashboard/"
CHANGELIST = "admin:queued_storage_pendingtransfer_changelist"
TOKEN = "destination-scrape-token-0123456789"


@pytest.fixture
def mirrored(
    make_storage: Callable[..., QueuedStorage], tmp_path: Path
) -> QueuedStorage:
    """A storage in use with two mirrors: ``backup`` (key ``<key>@backup``) and
    ``new`` (an explicit key, ``<key>-new``)."""
    key = f"media-{tmp_path.name[-12:]}"
    storage = make_storage(
        key=key,
        mirrors={
            "backup": {"storage": FS, "options": {"location": str(tmp_path / "b")}},
            "new": {
                "storage": FS,
                "options": {"location": str(tmp_path / "n")},
                "key": f"{key}-new",
            },
        },
    )
    registry.register(storage)  # as its first save does
    return storage


def keys_of(storage: QueuedStorage) -> tuple[str, str, str]:
    return storage.key, storage.mirror_key("backup"), storage.mirror_key("new")


def change_url(row: PendingTransfer) -> str:
    return reverse("admin:queued_storage_pendingtransfer_change", args=[row.pk])


def destination_rows(page: str) -> list[str]:
    """The Destinations table's rows, as text."""
    table = page.split('<table class="qs-destinations">', 1)[1].split("</table>")[0]
    rows = re.findall(r"<tr>(.*?)</tr>", table.split("<tbody>")[1], re.S)
    return [" ".join(re.sub(r"<[^>]+>", " ", row).split()) for row in rows]


# Which keys are whose


def test_mirror_keys_are_grouped_under_their_storage(mirrored: QueuedStorage) -> None:
    primary, backup, new = keys_of(mirrored)
    order = destinations.grouped([new, "aaa", backup, "zzz", primary])

    assert [d.key for d in order] == ["aaa", primary, backup, new, "zzz"]
    assert order[2] == Destination(backup, primary, "backup", 0)
    assert order[3].label() == f"{primary} → new (mirror)"
    assert order[3].short_label() == "→ new (mirror)"
    assert order[1].label() == primary and not order[1].is_mirror
    assert destinations.of_storage(new) == [primary, backup, new]
    assert destinations.of_storage(primary) == [primary, backup, new]
    assert destinations.of_storage("aaa") == ["aaa"]


# A transfer's page


def test_a_primary_rows_page_lists_each_destinations_row_in_one_query(
    mirrored: QueuedStorage, admin_client: Client, django_assert_num_queries: Any
) -> None:
    primary, backup, new = keys_of(mirrored)
    row = pending_row(storage_key=primary, name="a/x.txt", status=Status.DONE)
    mirror = pending_row(
        storage_key=backup,
        name="a/x.txt",
        status=Status.FAILED,
        generation=row.generation,
        attempts=5,
        last_error="ConnectionError: the backup bucket is down",
    )
    pending_row(storage_key=new, name="other.txt")  # another name's
    admin_client.get(change_url(row))  # warms the session

    # The session, the user, the row, its storage's pause, the destinations' rows.
    with django_assert_num_queries(5):
        page = admin_client.get(change_url(row)).content.decode()

    assert destination_rows(page) == [
        f"primary ({primary}) done 0 - the primary this row",
        f"→ backup (mirror) ({backup}) failed 5 ConnectionError: the backup bucket "
        "is down same version open",
        f"→ new (mirror) ({new}) - - - no row yet: copies after the primary is "
        "verified -",
    ]
    assert f'href="{change_url(mirror)}"' in page
    assert '<p class="qs-mirror-of">' not in page


def test_a_mirror_rows_page_links_to_its_primarys_row(
    mirrored: QueuedStorage, admin_client: Client, django_assert_num_queries: Any
) -> None:
    primary, backup, new = keys_of(mirrored)
    row = pending_row(storage_key=primary, name="b.txt", generation=7)
    older = pending_row(
        storage_key=backup, name="b.txt", status=Status.DONE, generation=6
    )
    newer = pending_row(storage_key=new, name="b.txt", generation=8, deleted=True)
    admin_client.get(change_url(older))

    with django_assert_num_queries(5):
        page = admin_client.get(change_url(older)).content.decode()

    about = page.split('<p class="qs-mirror-of">')[1].split("</p>")[0]
    assert f"Mirror backup of storage {primary}:" in about
    assert f'href="{change_url(row)}"' in about
    shown = destination_rows(page)
    assert shown[0] == f"primary ({primary}) queued 0 - the primary open"
    assert shown[1].endswith("done 0 - older version this row")
    assert shown[2].endswith("queued deleting 0 - newer version open")
    assert f'href="{change_url(newer)}"' in page

    # A mirror row whose storage has no row of the name says so.
    PendingTransfer.objects.filter(pk=row.pk).delete()
    page = admin_client.get(change_url(older)).content.decode()
    assert f"Mirror backup of storage {primary}, which has no row" in page
    assert destination_rows(page)[1].endswith("done 0 - no primary row this row")


def test_a_storage_without_mirrors_has_no_destinations_and_no_more_queries(
    storage: QueuedStorage, admin_client: Client, django_assert_num_queries: Any
) -> None:
    registry.register(storage)
    row = pending_row(storage_key=storage.key, name="c.txt")
    admin_client.get(change_url(row))

    with django_assert_num_queries(4):
        page = admin_client.get(change_url(row)).content.decode()

    assert '<table class="qs-destinations">' not in page
    assert ">Destinations<" not in page


# The changelist


def test_the_changelist_labels_and_filters_destinations(
    mirrored: QueuedStorage, admin_client: Client
) -> None:
    primary, backup, new = keys_of(mirrored)
    for key in (primary, backup):
        pending_row(storage_key=key, name="d.txt", status=Status.DONE)
    pending_row(storage_key=new, name="d.txt", status=Status.FAILED)
    pending_row(storage_key="elsewhere", name="e.txt")
    url = reverse(CHANGELIST)

    page = admin_client.get(url).content.decode()
    choices = [
        (unquote(key), label.strip())
        for key, label in re.findall(r'"\?storage_key=([^"&]+)">([^<]+)</a>', page)
    ]
    labels = dict(choices)
    assert labels[backup] == f"{primary} → backup (mirror)"
    assert labels[new] == f"{primary} → new (mirror)"
    order = [key for key, _label in choices]
    assert order.index(primary) + 1 == order.index(backup) == order.index(new) - 1
    assert f'title="{backup}">{primary} → backup (mirror)</span>' in page

    # Each destination's rows, counted by the count line.
    of_backup = admin_client.get(url + "?destination=backup").content.decode()
    assert "1 transfer, done<" in of_backup
    of_new = admin_client.get(url + "?destination=new").content.decode()
    assert "1 transfer, failed<" in of_new and "d.txt" in of_new
    own = admin_client.get(url + "?destination=:primary").content.decode()
    assert "2 transfers, 1 queued, 1 done<" in own and "e.txt" in own
    both = admin_client.get(
        url + f"?destination=:primary&storage_key={primary}"
    ).content.decode()
    assert "1 transfer, done<" in both


def test_without_mirrors_the_changelist_has_no_destination_filter(
    storage: QueuedStorage, admin_client: Client
) -> None:
    registry.register(storage)
    pending_row(storage_key=storage.key)
    page = admin_client.get(reverse(CHANGELIST)).content.decode()
    assert "destination=" not in page


# The dashboard


def sections(page: str) -> list[tuple[str, str]]:
    """Each section's key and its classes, in the page's order."""
    return [
        (key, classes)
        for classes, key in re.findall(
            r'<section class="([^"]*)" id="storage-\d+" data-storage-key="([^"]*)"',
            page,
        )
    ]


def dashboard_queries(client: Client) -> tuple[int, str]:
    with CaptureQueriesContext(connections[ledger_db()]) as captured:
        response = client.get(DASHBOARD)
    assert response.status_code == 200
    return len(captured.captured_queries), response.content.decode()


def test_the_dashboard_shows_each_mirror_under_its_storage(
    mirrored: QueuedStorage,
    make_storage: Callable[..., QueuedStorage],
    admin_client: Client,
) -> None:
    primary, backup, new = keys_of(mirrored)
    plain = make_storage(key="aaa-plain")
    registry.register(plain)
    admin_client.get(DASHBOARD)
    baseline, _page = dashboard_queries(admin_client)

    pending_row(storage_key=primary, name="f.txt", status=Status.DONE)
    pending_row(storage_key=backup, name="f.txt", status=Status.FAILED)
    for number in range(3):
        pending_row(storage_key=new, name=f"g{number}.txt")
    StorageState.objects.create(
        storage_key=backup, paused_at=timezone.now(), paused_by="ops"
    )
    count, page = dashboard_queries(admin_client)

    # The session, the user (a superuser: no permission queries) and the four
    # of the dashboard, whatever the mirrors and their rows.
    assert count == baseline == 6
    shown = sections(page)
    ours = [key for key, _classes in shown if key in keys_of(mirrored)]
    assert ours == [primary, backup, new]
    assert [key for key, _classes in shown].index("aaa-plain") < len(shown)
    classes = dict(shown)
    assert "qs-mirror" in classes[backup] and "qs-mirror" not in classes[primary]

    def section(key: str) -> str:
        start = page.index(f'data-storage-key="{key}"')
        return page[start : page.find("<section", start)]

    assert "→ backup (mirror)</a>" in section(backup)
    assert f'data-primary-key="{primary}"' in section(backup)
    # Each destination's figures and state are its own.
    assert "Resume transfers" in section(backup)
    assert "Resume transfers" not in section(primary)
    assert "Pause transfers" in section(new)
    figures = re.findall(r'<span class="qs-count">(\d+)</span>', section(new))
    assert figures[:5] == ["0", "3", "0", "0", "0"]


# transfer_status


def test_transfer_status_shows_each_storages_destinations(
    mirrored: QueuedStorage,
) -> None:
    primary, backup, new = keys_of(mirrored)
    pending_row(storage_key="aaa", name="h.txt")
    pending_row(storage_key=primary, name="h.txt", status=Status.DONE)
    pending_row(storage_key=backup, name="h.txt", status=Status.FAILED)
    StorageState.objects.create(storage_key=new, paused_at=timezone.now())

    out = StringIO()
    call_command("transfer_status", "--json", stdout=out)
    found = json.loads(out.getvalue())

    zero = dict.fromkeys(Status.values, 0)
    # As before: the keys with rows.
    assert set(found["storages"]) == {"aaa", primary, backup}
    assert found["storages"][backup] == {**zero, "failed": 1}
    assert found["destinations"] == {
        "aaa": [
            {
                "key": "aaa",
                "mirror": None,
                "counts": {**zero, "queued": 1},
                "paused": False,
                "breaker": "closed",
            }
        ],
        primary: [
            {
                "key": primary,
                "mirror": None,
                "counts": {**zero, "done": 1},
                "paused": False,
                "breaker": "closed",
            },
            {
                "key": backup,
                "mirror": "backup",
                "counts": {**zero, "failed": 1},
                "paused": False,
                "breaker": "closed",
            },
            {
                "key": new,
                "mirror": "new",
                "counts": zero,
                "paused": True,
                "breaker": "closed",
            },
        ],
    }

    out = StringIO()
    call_command("transfer_status", stdout=out)
    table = out.getvalue().splitlines()
    assert table[1].split() == ["aaa", "0", "1", "0", "0", "0"]
    assert table[2].split() == [primary, "0", "0", "0", "1", "0"]
    assert table[3].startswith(f"  → {backup} (mirror backup)")
    assert table[3].split()[-5:] == ["0", "0", "0", "0", "1"]
    assert table[4].startswith(f"  → {new} (mirror new)")
    assert table[5].split() == ["total", "0", "1", "0", "1", "1"]

    # Asked for one mirror: that key alone, under its storage's.
    out = StringIO()
    call_command("transfer_status", "--storage", backup, "--json", stdout=out)
    asked = json.loads(out.getvalue())["destinations"]
    assert [(d["key"], d["mirror"]) for d in asked[primary]] == [(backup, "backup")]


# The metrics


@pytest.mark.urls("tests.metrics_urls")
def test_the_metrics_say_which_storage_each_key_belongs_to(
    mirrored: QueuedStorage,
    client: Client,
    settings: Any,
    django_assert_num_queries: Any,
) -> None:
    parser = pytest.importorskip("prometheus_client.parser")
    settings.QUEUED_STORAGE_METRICS_TOKEN = TOKEN
    primary, backup, new = keys_of(mirrored)
    pending_row(storage_key=backup, name="i.txt", status=Status.QUEUED)
    pending_row(storage_key="zzz", name="i.txt")

    # The four queries of any scrape (tests/test_prometheus.py): the rows, the
    # controls, the history's totals, the oldest due rows.
    with django_assert_num_queries(4):
        response = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200
    found = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in parser.text_string_to_metric_families(response.content.decode())
        for sample in family.samples
    }

    def gauge(storage: str, primary: str, destination: str) -> float | None:
        labels = {"storage": storage, "primary": primary, "destination": destination}
        return found.get(("queued_storage_destination", tuple(sorted(labels.items()))))

    assert gauge(primary, primary, "") == 1
    assert gauge(backup, primary, "backup") == 1
    assert gauge(new, primary, "new") == 1
    assert gauge("zzz", "zzz", "") == 1
    # The other metrics keep the key as their storage label.
    labels = (("status", "queued"), ("storage", backup))
    assert found[("queued_storage_rows", labels)] == 1
