"""Attacks on the dashboard and the Prometheus metrics: many storages, hostile
storage keys, no network call while either answers, no option value in what they
show, and the metrics view's guard (forwarded-for headers, IPv6, bad settings)."""

from __future__ import annotations

import importlib.util
import socket
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.core.checks import run_checks
from django.db import connections
from django.test import Client
from django.test.utils import CaptureQueriesContext, override_settings
from django.utils import timezone

from queued_storage.backends import QueuedStorage
from queued_storage.failures import ledger_db
from queued_storage.models import PendingTransfer, name_hash
from tests.factories import PendingTransferFactory
from tests.helpers import add_history, content
from tests.tools import IN_CI

if importlib.util.find_spec("prometheus_client") is None:
    if IN_CI:
        raise RuntimeError(
            "prometheus_client is missing under CI: the test group has it"
        )
    pytest.skip(
        "prometheus_client is not installed (pip install -e . --group test): the "
        "Prometheus metrics are NOT tested",
        allow_module_level=True,
    )

from prometheus_client import parser

from tests.metrics_urls import urlpatterns as metrics_patterns
from tests.urls import urlpatterns as admin_patterns

#: This module is the URLconf of its tests: the admin and the metrics views.
urlpatterns = [*admin_patterns, *metrics_patterns]
pytestmark = [pytest.mark.urls(__name__), pytest.mark.django_db]

Status = PendingTransfer.Status
DASHBOARD = "/admin/queued_storage/transferdashboard/"
TOKEN = "scrape-token-for-the-attacks-0123456789"
HOSTILE_KEY = "<script>alert('k')</script>\"&\\\n{x}"


def rows_of_keys(keys: list[str], **fields: Any) -> None:
    PendingTransfer.objects.bulk_create(
        [
            PendingTransferFactory.build(
                storage_key=key, name="a.txt", name_hash=name_hash("a.txt"), **fields
            )
            for key in keys
        ]
    )


def scrape(client: Client, **extra: Any) -> Any:
    """GET /metrics with the token (set for this one request)."""
    with override_settings(QUEUED_STORAGE_METRICS_TOKEN=TOKEN):
        return client.get(
            "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, **extra
        )


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in parser.text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Any new connection (a remote's, a DNS lookup) fails the test; the
    database's connection is open already."""
    attempts: list[Any] = []

    def refused(*args: Any, **kwargs: Any) -> Any:
        attempts.append(args)
        raise AssertionError(f"network call on the request path: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refused)
    monkeypatch.setattr(socket.socket, "connect_ex", refused)
    monkeypatch.setattr(socket, "getaddrinfo", refused)
    yield attempts
    assert attempts == []


# Many storages


def test_the_dashboard_shows_six_hundred_storages(
    admin_client: Client,
) -> None:
    """SQLite allows 500 SELECTs in one UNION: the done counts of more storages
    are read in a query per 250 of them."""
    keys = [f"many-{number:04d}" for number in range(600)]
    rows_of_keys(keys, status=Status.FAILED)
    admin_client.get(DASHBOARD)
    with CaptureQueriesContext(connections[ledger_db()]) as captured:
        response = admin_client.get(DASHBOARD)
    assert response.status_code == 200
    html = response.content.decode()
    assert all(f'data-storage-key="{key}"' in html for key in keys)
    # The ledger's 4 queries for a few storages (see test_dashboard), and one more
    # per 250 storages after the first 250.
    ledger = [q for q in captured.captured_queries if "queued_storage_" in q["sql"]]
    assert len(ledger) == 4 + 2


def test_a_scrape_reports_twelve_hundred_storages_with_due_rows(client: Client) -> None:
    """SQLite allows 2,000 columns: the oldest due rows (two columns a storage)
    of more storages are read in a query per 500 of them."""
    keys = [f"due-{number:04d}" for number in range(1200)]
    rows_of_keys(keys, status=Status.QUEUED, next_attempt_at=timezone.now())
    with CaptureQueriesContext(connections[ledger_db()]) as captured:
        response = scrape(client)
    assert response.status_code == 200
    found = samples(response.content.decode())
    assert all(
        ("queued_storage_oldest_due_seconds", frozenset({("storage", key)})) in found
        for key in keys
    )
    assert len(captured.captured_queries) == 4 + 2


# Hostile keys, secrets, the network


def test_a_hostile_storage_key_is_escaped_on_the_dashboard_and_in_the_labels(
    admin_client: Client, client: Client, no_network: list[Any]
) -> None:
    rows_of_keys([HOSTILE_KEY], status=Status.FAILED, last_error="boom")
    now = timezone.now()
    add_history(HOSTILE_KEY, now.replace(second=0, microsecond=0), files=2, failures=1)

    html = admin_client.get(DASHBOARD).content.decode()
    assert "<script>alert" not in html
    assert "&lt;script&gt;alert(&#x27;k&#x27;)&lt;/script&gt;&quot;&amp;" in html
    assert "?storage_key=%3Cscript%3Ealert%28%27k%27%29" in html.replace("&amp;", "&")

    found = samples(scrape(client).content.decode())
    assert (
        found[("queued_storage_transfers_total", frozenset({("storage", HOSTILE_KEY)}))]
        == 2
    )
    assert (
        found[
            (
                "queued_storage_rows",
                frozenset({("storage", HOSTILE_KEY), ("status", "failed")}),
            )
        ]
        == 1
    )


def test_no_option_value_and_no_network_call_on_either_page(
    make_storage: Callable[..., QueuedStorage],
    admin_client: Client,
    client: Client,
    no_network: list[Any],
) -> None:
    secret = "s3cr3t-value-of-an-option-0f9e8d"
    storage = make_storage(
        remote="tests.storages.FlakyStorage",
        remote_options={"failures": 1, "api_token": secret},
    )
    storage.save("a.txt", content("abc"))
    add_history(storage.key, timezone.now().replace(second=0, microsecond=0), files=1)
    for response in (admin_client.get(DASHBOARD), scrape(client)):
        assert response.status_code == 200
        text = response.content.decode()
        assert storage.key in text
        assert secret not in text


def test_the_histogram_follows_prometheus_rules(client: Client) -> None:
    key = "histogram-rules"
    now = timezone.now()
    minute = now.replace(second=0, microsecond=0)
    add_history(key, minute, files=3, bytes=30, duration_sum=1.5, le_0_05=1, le_1=2)
    add_history(key, minute - timedelta(days=5), files=1, duration_sum=400, le_inf=1)
    found = samples(scrape(client).content.decode())

    def one(name: str, **labels: str) -> float:
        return found[(name, frozenset({"storage": key, **labels}.items()))]

    buckets = {
        dict(labels)["le"]: number
        for (name, labels), number in found.items()
        if name == "queued_storage_transfer_duration_seconds_bucket"
        and dict(labels)["storage"] == key
    }
    assert buckets["0.05"] == 1 and buckets["0.5"] == 1 and buckets["1.0"] == 3
    assert buckets["300.0"] == 3 and buckets["+Inf"] == 4
    assert one("queued_storage_transfer_duration_seconds_count") == 4
    assert one("queued_storage_transfer_duration_seconds_sum") == 401.5
    assert one("queued_storage_transfers_total") == 4


# The guard


@pytest.mark.parametrize(
    "headers",
    [
        {"HTTP_X_FORWARDED_FOR": "127.0.0.1"},
        {"HTTP_X_REAL_IP": "127.0.0.1"},
        {"HTTP_FORWARDED": "for=127.0.0.1"},
    ],
)
def test_a_forwarded_for_header_is_no_allowed_address(
    client: Client, settings: Any, headers: dict[str, Any]
) -> None:
    settings.QUEUED_STORAGE_METRICS_ALLOWED_IPS = ["127.0.0.1"]
    response = client.get("/metrics", REMOTE_ADDR="203.0.113.7", **headers)
    assert response.status_code == 403


@pytest.mark.parametrize(
    ("allowed", "address", "status"),
    [
        (["::1"], "::1", 200),
        (["127.0.0.1"], "::ffff:127.0.0.1", 200),
        (["127.0.0.0/8"], "127.1.2.3", 200),
        (["127.0.0.1"], "::1", 403),
        (["::1"], "127.0.0.1", 403),
        ([], "127.0.0.1", 403),
        (["10.0.0.0/8"], "", 403),
        (["10.0.0.0/8"], "unix:/run/gunicorn.sock", 403),
    ],
)
def test_allowed_addresses(
    client: Client, settings: Any, allowed: list[str], address: str, status: int
) -> None:
    settings.QUEUED_STORAGE_METRICS_ALLOWED_IPS = allowed
    assert client.get("/metrics", REMOTE_ADDR=address).status_code == status


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": "Bearer "},
        {"X-Token": TOKEN},
    ],
)
def test_a_wrong_token_is_refused(
    client: Client, settings: Any, headers: dict[str, str]
) -> None:
    settings.QUEUED_STORAGE_METRICS_TOKEN = TOKEN
    assert client.get("/metrics", headers=headers).status_code == 403


@pytest.mark.parametrize(
    "value", ["127.0.0.1", ["10.0.0.0/33"], ["localhost"], [None], [""], {"a": 1}]
)
def test_a_bad_allowed_ips_value_is_a_check_error(settings: Any, value: Any) -> None:
    settings.QUEUED_STORAGE_METRICS_ALLOWED_IPS = value
    ids = [m.id for m in run_checks()]
    assert "queued_storage.E022" in ids
