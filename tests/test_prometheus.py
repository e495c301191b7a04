"""The Prometheus metrics: read from the ledger at scrape time, so every worker
process on every host is counted, served by a view the site mounts and guards."""

from __future__ import annotations

import importlib.util
import itertools
import json
import subprocess
import sys
import textwrap
import threading
import urllib.request
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.core.checks import CheckMessage, run_checks
from django.core.exceptions import ImproperlyConfigured
from django.core.files.base import ContentFile
from django.test import Client
from django.utils import timezone

from queued_storage import history, pausing
from queued_storage.backends import QueuedStorage
from queued_storage.errors import Outcome
from queued_storage.models import PendingTransfer, StorageState
from queued_storage.stats import DrainStats
from queued_storage.worker import drain
from tests.factories import pending_row
from tests.helpers import ALWAYS_FAILING, FLAKY, in_thread, joined
from tests.storages import SteppingStorage
from tests.testapp.models import Document
from tests.tools import IN_CI
from tests.workers import ROOT, run_command, worker_env

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

from prometheus_client import CollectorRegistry, parser
from prometheus_client.openmetrics import parser as openmetrics_parser

from queued_storage.integrations import prometheus

pytestmark = pytest.mark.urls("tests.metrics_urls")

Status = PendingTransfer.Status
TOKEN = "scrape-token-for-the-tests-0123456789"
#: What one scrape reads, whatever the number of rows and storages: the rows per
#: storage and status, the storages' pause and breaker, their history's totals,
#: and the oldest due row of each storage with due rows.
SCRAPE_QUERIES = 4

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    """Every sample of an exposition text, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in parser.text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


def rows(found: Samples, storage: str) -> dict[str, float]:
    return {
        status: value(found, "queued_storage_rows", storage=storage, status=status)
        for status in prometheus.COUNTED
    }


def scrape_client(client: Client, **headers: str) -> Samples:
    response = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200, response.content
    return samples(response.content.decode())


def ours(messages: list[CheckMessage]) -> list[CheckMessage]:
    return [m for m in messages if (m.id or "").startswith("queued_storage.")]


@pytest.fixture
def token(settings: Any) -> str:
    settings.QUEUED_STORAGE_METRICS_TOKEN = TOKEN
    return TOKEN


# Over HTTP, while workers drain


def scrape_http(url: str) -> Samples:
    request = urllib.request.Request(
        f"{url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return samples(response.read().decode())


#: The counters' samples: none may ever go down.
COUNTERS = (
    "queued_storage_transfers_total",
    "queued_storage_transfer_bytes_total",
    "queued_storage_transfer_failures_total",
    "queued_storage_transfer_duration_seconds_bucket",
    "queued_storage_transfer_duration_seconds_count",
    "queued_storage_transfer_duration_seconds_sum",
)


def totals(found: Samples, storage: str) -> tuple[float, float, float, float]:
    """Transfers, bytes, failed attempts, and the histogram's count of ``storage``."""
    return (
        value(found, "queued_storage_transfers_total", storage=storage),
        value(found, "queued_storage_transfer_bytes_total", storage=storage),
        value(found, "queued_storage_transfer_failures_total", storage=storage),
        value(found, "queued_storage_transfer_duration_seconds_count", storage=storage),
    )


def assert_histogram(found: Samples, storage: str) -> None:
    """The buckets are cumulative and end with +Inf, which is the count."""
    buckets = sorted(
        (float(dict(labels)["le"]), number)
        for (name, labels), number in found.items()
        if name == "queued_storage_transfer_duration_seconds_bucket"
        and dict(labels)["storage"] == storage
    )
    assert buckets[-1][0] == float("inf")
    counts = [number for _bound, number in buckets]
    assert counts == sorted(counts)
    assert counts[-1] == value(
        found, "queued_storage_transfer_duration_seconds_count", storage=storage
    )


def assert_never_decrease(scrapes: list[Samples]) -> None:
    for before, after in itertools.pairwise(scrapes):
        for (name, labels), number in before.items():
            if name in COUNTERS:
                assert after[(name, labels)] >= number, (name, dict(labels))


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_scrape_over_http_sees_a_drain_in_this_process_and_a_worker_process(
    live_server: Any,
    make_storage: Callable[..., QueuedStorage],
    token: str,
) -> None:
    SteppingStorage.reset(free=1)
    storage = make_storage(remote="tests.storages.SteppingStorage")
    sizes = {f"photo-{number}.jpg": 100 * (number + 1) for number in range(3)}
    for name, size in sizes.items():
        storage.save(name, ContentFile(b"x" * size))
    for number in range(2):
        Document.objects.create(file=ContentFile(b"doc" * 10, name=f"d{number}.txt"))
    scrapes = [scrape_http(live_server.url)]
    assert rows(scrapes[0], storage.key) == {
        **dict.fromkeys(prometheus.COUNTED, 0),
        "queued": 3,
    }
    assert rows(scrapes[0], "documents")["queued"] == 2
    assert totals(scrapes[0], storage.key) == (0, 0, 0, 0)

    # A drain in a thread of this process: the first file is recorded done (the
    # progress display is shown it after the commit), the second upload is held.
    first_done = threading.Event()

    def shown(stats: DrainStats, row: PendingTransfer, outcome: Outcome) -> None:
        if outcome is Outcome.DONE:
            first_done.set()

    thread, result = in_thread(lambda: drain(keys=[storage.key], progress=shown))
    assert first_done.wait(timeout=30)
    assert SteppingStorage.held.wait(timeout=30)
    scrapes.append(scrape_http(live_server.url))
    during = rows(scrapes[1], storage.key)
    assert during["transferring"] >= 1
    assert during["queued"] + during["transferring"] == 2
    [done] = PendingTransfer.objects.filter(storage_key=storage.key).done()
    assert totals(scrapes[1], storage.key) == (1, sizes[done.name], 0, 1)
    SteppingStorage.release.set()
    assert joined(thread, result).done == 3
    scrapes.append(scrape_http(live_server.url))
    assert rows(scrapes[2], storage.key) == dict.fromkeys(prometheus.COUNTED, 0)
    assert totals(scrapes[2], storage.key) == (3, sum(sizes.values()), 0, 3)
    assert (
        value(scrapes[2], "queued_storage_oldest_due_seconds", storage=storage.key) == 0
    )
    assert_histogram(scrapes[2], storage.key)

    # Another worker process, as on another host: its transfers are counted too.
    worker = run_command("process_transfers", "--storage", "documents")
    assert worker.returncode == 0, worker.stdout + worker.stderr
    scrapes.append(scrape_http(live_server.url))
    assert rows(scrapes[3], "documents") == dict.fromkeys(prometheus.COUNTED, 0)
    assert totals(scrapes[3], "documents") == (2, 60, 0, 2)
    assert totals(scrapes[3], storage.key) == (3, sum(sizes.values()), 0, 3)
    assert_histogram(scrapes[3], "documents")
    assert_never_decrease(scrapes)


# What a scrape reads


@pytest.mark.django_db
def test_a_scrape_makes_the_same_few_queries_whatever_the_rows(
    client: Client, token: str, django_assert_num_queries: Any
) -> None:
    now = timezone.now()
    pending_row(storage_key="one", name="a", status=Status.QUEUED, next_attempt_at=now)
    with django_assert_num_queries(SCRAPE_QUERIES):
        scrape_client(client)

    StorageState.objects.create(storage_key="two", paused_at=now)
    StorageState.objects.create(storage_key="four", breaker_opened_at=now)
    for key in ("one", "two", "three"):
        for number in range(20):
            pending_row(
                storage_key=key,
                name=f"{key}-{number}",
                status=[Status.QUEUED, Status.TRANSFERRING, Status.DONE][number % 3],
                next_attempt_at=now - timedelta(seconds=number),
                lease_expires_at=now - timedelta(seconds=number),
            )
    with django_assert_num_queries(SCRAPE_QUERIES):
        found = scrape_client(client)

    assert rows(found, "two") == {
        **dict.fromkeys(prometheus.COUNTED, 0),
        "queued": 7,
        "transferring": 7,
    }
    # Done rows are most of a ledger: counting them would read it whole.
    assert not [labels for name, labels in found if ("status", "done") in labels]


def test_registering_the_collector_reads_nothing() -> None:
    # No django_db mark: a query would raise. describe() gives the families
    # alone, so a registry (prometheus_client.REGISTRY too) reads the ledger only
    # when it is scraped.
    CollectorRegistry().register(prometheus.LedgerCollector())

    assert [family.name for family in prometheus.LedgerCollector().describe()] == [
        "queued_storage_rows",
        "queued_storage_oldest_due_seconds",
        "queued_storage_paused",
        "queued_storage_breaker_open",
        "queued_storage_breaker_state",
        "queued_storage_destination",
        "queued_storage_transfers",
        "queued_storage_transfer_bytes",
        "queued_storage_transfer_failures",
        "queued_storage_transfer_duration_seconds",
    ]


@pytest.mark.django_db
def test_the_oldest_due_age_is_that_of_each_storages_longest_waiting_due_row(
    client: Client, token: str
) -> None:
    now = timezone.now()
    pending_row(
        storage_key="late",
        name="due",
        status=Status.QUEUED,
        next_attempt_at=now - timedelta(minutes=10),
    )
    pending_row(
        storage_key="late",
        name="later",
        status=Status.QUEUED,
        next_attempt_at=now + timedelta(hours=1),
    )
    pending_row(
        storage_key="stuck",
        name="lease ran out",
        status=Status.TRANSFERRING,
        lease_expires_at=now - timedelta(minutes=20),
    )
    pending_row(
        storage_key="busy",
        name="leased",
        status=Status.TRANSFERRING,
        lease_expires_at=now + timedelta(minutes=5),
    )
    pending_row(storage_key="idle", name="held", status=Status.HELD)

    found = scrape_client(client)

    def age(key: str) -> float:
        return value(found, "queued_storage_oldest_due_seconds", storage=key)

    assert 600 <= age("late") < 660
    assert 1200 <= age("stuck") < 1260
    assert age("busy") == 0
    assert age("idle") == 0


@pytest.mark.django_db
def test_paused_and_breaker_state_per_storage(client: Client, token: str) -> None:
    now = timezone.now()
    StorageState.objects.create(storage_key="paused", paused_at=now)
    StorageState.objects.create(
        storage_key="open",
        breaker_opened_at=now - timedelta(minutes=5),
        breaker_probe_at=now + timedelta(minutes=5),
    )
    StorageState.objects.create(
        storage_key="probing",
        breaker_opened_at=now - timedelta(minutes=5),
        breaker_probe_at=now - timedelta(seconds=1),
    )
    pending_row(storage_key="running", name="a")

    found = scrape_client(client)

    def gauge(name: str, key: str) -> float:
        return value(found, f"queued_storage_{name}", storage=key)

    def state(key: str) -> list[str]:
        return [
            name
            for name in ("closed", "open", "half-open")
            if value(found, "queued_storage_breaker_state", storage=key, state=name)
        ]

    assert [gauge("paused", k) for k in ("paused", "open", "running")] == [1, 0, 0]
    assert [gauge("breaker_open", k) for k in ("paused", "open", "probing")] == [
        0,
        1,
        1,
    ]
    assert gauge("breaker_open", "running") == 0
    assert state("paused") == ["closed"]
    assert state("open") == ["open"]
    assert state("probing") == ["half-open"]
    assert state("running") == ["closed"]
    # A storage known only by its state row is listed with its rows, all 0.
    assert rows(found, "open") == dict.fromkeys(prometheus.COUNTED, 0)


@pytest.mark.django_db
def test_failed_attempts_are_counted_and_the_counters_survive_pruning(
    client: Client,
    token: str,
    settings: Any,
    make_storage: Callable[..., QueuedStorage],
    run_drain: Callable[..., DrainStats],
) -> None:
    settings.QUEUED_STORAGE_RETRY_DELAY = 0
    storage = make_storage(remote=FLAKY, remote_options={"failures": 2})
    storage.save("a.txt", ContentFile(b"a" * 10))

    assert run_drain(keys=[storage.key]).done == 1
    counted = scrape_client(client)
    assert (
        value(counted, "queued_storage_transfer_failures_total", storage=storage.key)
        == 2
    )
    assert value(counted, "queued_storage_transfers_total", storage=storage.key) == 1

    # Minutes past the retention are folded into the storage's carry row.
    history.TransferMinute.objects.update(minute=timezone.now() - timedelta(days=30))
    assert history.prune() == 1
    pruned = scrape_client(client)
    assert {n: v for n, v in pruned.items() if n[0] in COUNTERS} == {
        n: v for n, v in counted.items() if n[0] in COUNTERS
    }


@pytest.mark.django_db
def test_a_pause_and_an_open_breaker_show_at_the_next_scrape(
    client: Client,
    token: str,
    settings: Any,
    make_storage: Callable[..., QueuedStorage],
    run_drain: Callable[..., DrainStats],
) -> None:
    settings.QUEUED_STORAGE_BREAKER_FAILURES = 2
    settings.QUEUED_STORAGE_RETRY_DELAY = 60  # the breaker's backoff: a minute
    storage = make_storage(remote=FLAKY, remote_options=ALWAYS_FAILING)
    for number in range(4):
        storage.save(f"f{number}.txt", ContentFile(b"x"))

    run_drain(keys=[storage.key])

    opened = scrape_client(client)
    assert value(opened, "queued_storage_breaker_open", storage=storage.key) == 1
    assert {
        state
        for state in ("closed", "open", "half-open")
        if value(
            opened, "queued_storage_breaker_state", storage=storage.key, state=state
        )
    } == {"open"}
    assert totals(opened, storage.key) == (0, 0, 2, 0)
    assert rows(opened, storage.key)["queued"] == 4

    assert pausing.pause([storage.key], by="ops", reason="maintenance")
    assert value(scrape_client(client), "queued_storage_paused", storage=storage.key)
    assert pausing.resume([storage.key], by="ops")
    resumed = scrape_client(client)
    assert value(resumed, "queued_storage_paused", storage=storage.key) == 0


@pytest.mark.django_db
def test_labels_carry_the_storage_key_never_its_options(
    client: Client, token: str, make_storage: Callable[..., QueuedStorage]
) -> None:
    secret = "s3cr3t-remote-password"
    storage = make_storage(
        remote="tests.storages.CountingStorage",
        remote_options={"base_url": f"https://user:{secret}@remote.example/"},
    )
    storage.save("a.txt", ContentFile(b"a"))

    response = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})

    text = response.content.decode()
    assert f'storage="{storage.key}"' in text
    assert secret not in text


@pytest.mark.django_db
def test_openmetrics_is_served_to_a_client_that_asks_for_it(
    client: Client, token: str
) -> None:
    pending_row(storage_key="one", name="a")

    response = client.get(
        "/metrics",
        headers={
            "Authorization": f"Bearer {TOKEN}",
            "Accept": "application/openmetrics-text; version=1.0.0",
        },
    )

    assert response["Content-Type"].startswith("application/openmetrics-text")
    assert response["Cache-Control"].startswith("max-age=0")
    # The OpenMetrics parser is strict: units, counter and histogram samples.
    families = {
        family.name: family
        for family in openmetrics_parser.text_string_to_metric_families(
            response.content.decode()
        )
    }
    assert families["queued_storage_transfers"].type == "counter"
    assert families["queued_storage_transfer_bytes"].unit == "bytes"
    assert families["queued_storage_transfer_duration_seconds"].type == "histogram"
    assert families["queued_storage_oldest_due_seconds"].unit == "seconds"


# Who may scrape


@pytest.mark.django_db
@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer"],
)
def test_a_scrape_without_the_token_is_refused(
    client: Client, token: str, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}

    response = client.get("/metrics", headers=headers)

    assert response.status_code == 403
    assert b"queued_storage" not in response.content


@pytest.mark.django_db
def test_with_neither_setting_the_guarded_view_refuses_everyone(client: Client) -> None:
    assert client.get("/metrics").status_code == 403
    assert client.get("/metrics", REMOTE_ADDR="127.0.0.1").status_code == 403


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("10.1.2.3", True),
        ("::ffff:10.1.2.3", True),
        ("2001:db8::1", True),
        ("10.2.0.1", False),
        ("127.0.0.1", False),
        ("", False),
    ],
)
def test_an_allowed_address_may_scrape_without_the_token(
    client: Client, settings: Any, address: str, allowed: bool
) -> None:
    settings.QUEUED_STORAGE_METRICS_ALLOWED_IPS = ["10.1.0.0/16", "2001:db8::1"]

    response = client.get("/metrics", REMOTE_ADDR=address)

    assert response.status_code == (200 if allowed else 403)


@pytest.mark.django_db
def test_the_unguarded_view_answers_anyone_and_only_reads(client: Client) -> None:
    assert client.get("/open/metrics").status_code == 200
    assert client.head("/open/metrics").status_code == 200
    assert client.post("/open/metrics").status_code == 405


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("QUEUED_STORAGE_METRICS_TOKEN", ""),
        ("QUEUED_STORAGE_METRICS_TOKEN", 12345),
        ("QUEUED_STORAGE_METRICS_TOKEN", "two words"),
        ("QUEUED_STORAGE_METRICS_ALLOWED_IPS", "10.0.0.0/8"),
        ("QUEUED_STORAGE_METRICS_ALLOWED_IPS", ["10.0.0.0/8", "intranet"]),
    ],
)
def test_a_bad_setting_is_a_check_error_and_an_error_at_first_use(
    client: Client, settings: Any, name: str, value: Any
) -> None:
    setattr(settings, name, value)
    check_id = {
        "QUEUED_STORAGE_METRICS_TOKEN": "queued_storage.E021",
        "QUEUED_STORAGE_METRICS_ALLOWED_IPS": "queued_storage.E022",
    }[name]

    [error] = ours(run_checks())

    assert error.id == check_id
    assert name in error.msg
    with pytest.raises(ImproperlyConfigured, match=name):
        client.get("/metrics")


def test_the_check_warns_when_the_guarded_view_would_refuse_every_scrape(
    settings: Any,
) -> None:
    [warning] = ours(run_checks())
    assert warning.id == "queued_storage.W020"
    assert warning.hint is not None and "unguarded_metrics_view" in warning.hint

    settings.QUEUED_STORAGE_METRICS_TOKEN = TOKEN
    assert ours(run_checks()) == []


def test_the_check_is_silent_where_no_urlconf_mounts_the_views(settings: Any) -> None:
    settings.ROOT_URLCONF = "tests.urls"

    assert prometheus.mounted_views(__import__("tests.urls").urls.urlpatterns) == set()
    assert ours(run_checks()) == []


# Without the extra

# Runs in a process of its own where prometheus_client is absent, as on a site
# that never installed the extra: a None in sys.modules makes its import fail.
WITHOUT_PROMETHEUS = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys

    sys.modules["prometheus_client"] = None

    import django
    django.setup()
    import queued_storage
    from django.core.checks import run_checks
    from django.test import RequestFactory
    from django.test.utils import override_settings

    refused = {}
    for module in pkgutil.walk_packages(queued_storage.__path__, "queued_storage."):
        try:
            importlib.import_module(module.name)
        except ImportError as exc:
            refused[module.name] = str(exc)

    def ours():
        return [
            {"id": e.id, "msg": e.msg, "hint": e.hint}
            for e in run_checks()
            if e.id.startswith("queued_storage.")
        ]

    report = {"refused": refused, "unmounted": ours()}
    with override_settings(ROOT_URLCONF="tests.metrics_urls"):
        report["mounted"] = ours()
        from queued_storage.integrations import prometheus
        try:
            prometheus.unguarded_metrics_view(RequestFactory().get("/open/metrics"))
        except Exception as exc:
            report["first_use"] = f"{type(exc).__name__}: {exc}"
    with override_settings(QUEUED_STORAGE_METRICS_TOKEN="x" * 20):
        report["configured"] = ours()
    print(json.dumps(report))
    """
)


@pytest.mark.slow
def test_without_the_extra_the_check_and_the_first_use_say_what_to_install() -> None:
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_PROMETHEUS],
        cwd=ROOT,
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])

    assert report["refused"] == {}
    assert report["unmounted"] == []
    [mounted] = [m for m in report["mounted"] if m["id"] == "queued_storage.E020"]
    assert mounted["msg"] == (
        "The URLconf mounts metrics_view and unguarded_metrics_view but "
        "prometheus_client is not installed."
    )
    assert mounted["hint"] == "pip install 'django-queued-storage[prometheus]'."
    assert report["first_use"] == (
        "ImproperlyConfigured: The Prometheus metrics need prometheus_client: "
        "pip install 'django-queued-storage[prometheus]'."
    )
    [configured] = report["configured"]
    assert configured["id"] == "queued_storage.E020"
    assert configured["msg"] == (
        "QUEUED_STORAGE_METRICS_TOKEN is set but prometheus_client is not installed."
    )


@pytest.mark.slow
def test_startup_and_the_checks_do_not_load_prometheus_client() -> None:
    # django-q2's settings module imports prometheus_client itself: left out.
    script = (
        "import sys; sys.modules['django_q'] = None\n"
        "import django; django.setup()\n"
        "from django.core.checks import run_checks; run_checks()\n"
        "print('prometheus_client' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "False"
