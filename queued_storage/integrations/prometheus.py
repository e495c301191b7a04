"""Prometheus metrics read from the ledger when Prometheus scrapes them.

Nothing is counted in the process: every value comes from the database at scrape
time, so any number of worker processes on any number of hosts are counted once,
and whichever web process serves the view reports them all. Only this module
imports ``prometheus_client``; install it with the ``prometheus`` extra.

Mount :func:`metrics_view` in the site's URLconf. It answers only a client with
``QUEUED_STORAGE_METRICS_TOKEN`` as a bearer token or an address in
``QUEUED_STORAGE_METRICS_ALLOWED_IPS``; with neither set it refuses every scrape.
:func:`unguarded_metrics_view` answers anyone, for a site that guards it itself.
"""

from __future__ import annotations

import functools
import hmac
import importlib.util
import ipaddress
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.apps import AppConfig
from django.conf import settings
from django.core import checks
from django.core.checks import CheckMessage, Error, Tags
from django.core.exceptions import ImproperlyConfigured
from django.db import router
from django.db.models import Count, Subquery
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed
from django.urls import URLPattern, URLResolver, get_resolver
from django.utils import timezone
from django.views.decorators.cache import never_cache

from queued_storage import destinations, history, registry
from queued_storage.models import PendingTransfer, PendingTransferQuerySet
from queued_storage.storage_state import (
    BREAKER_CLOSED,
    BREAKER_STATES,
    Controls,
    storage_controls,
)

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric

#: The settings of the view; any of them set means the site means to use it.
TOKEN_SETTING = "QUEUED_STORAGE_METRICS_TOKEN"
ALLOWED_IPS_SETTING = "QUEUED_STORAGE_METRICS_ALLOWED_IPS"
SETTINGS = (TOKEN_SETTING, ALLOWED_IPS_SETTING)

MISSING = "prometheus_client is not installed"
INSTALL_HINT = "pip install 'django-queued-storage[prometheus]'"
TOKEN_HINT = (
    f"Set {TOKEN_SETTING} to a long random string (e.g. secrets.token_urlsafe()) "
    "and give Prometheus the same as its bearer token, or remove the setting."
)
ALLOWED_IPS_HINT = (
    f"Set {ALLOWED_IPS_SETTING} to a list of IP addresses or networks in CIDR "
    'notation, e.g. ["10.0.0.0/8", "::1"], or remove the setting.'
)
REFUSING_HINT = (
    f"Set {TOKEN_SETTING} (a bearer token Prometheus sends) or "
    f"{ALLOWED_IPS_SETTING} (the addresses it scrapes from), or mount "
    "unguarded_metrics_view behind the site's own protection."
)

#: The check IDs, one per problem.
MISSING_ID = "queued_storage.E020"
TOKEN_ID = "queued_storage.E021"
ALLOWED_IPS_ID = "queued_storage.E022"
REFUSING_ID = "queued_storage.W020"

Status = PendingTransfer.Status
#: The statuses the rows gauge counts: all but done. Done rows are most of a
#: ledger, and counting them would read it whole at every scrape (the metrics
#: case of benchmarks/ compares the two); ``queued_storage_transfers_total``
#: counts what is done.
COUNTED = [status for status in Status.values if status != Status.DONE]
#: Storages whose oldest due rows one query reads (two columns each): SQLite
#: allows 2,000 columns in a result.
KEYS_A_QUERY = 500

# Reading the ledger


@dataclass
class LedgerReading:
    """What the metrics report, read from the database in a fixed number of
    queries whatever the number of rows."""

    at: datetime
    #: Rows per status but done of each storage key (every one, 0 when none).
    rows: dict[str, dict[str, int]]
    #: When the longest-waiting due row of each storage became due.
    oldest_due: dict[str, datetime] = field(default_factory=dict)
    #: Whether each storage is paused, and its circuit breaker.
    controls: dict[str, Controls] = field(default_factory=dict)
    #: Everything each storage's history holds: totals that only grow.
    totals: dict[str, history.Counts] = field(default_factory=dict)


def read_ledger() -> LedgerReading:
    """The ledger's state per storage: every storage that has rows or a state
    row, or that the settings and models configure."""
    rows = PendingTransfer.objects.using(router.db_for_read(PendingTransfer))
    now = timezone.now()
    counts = backlog_per_storage(rows)
    controls = storage_controls(now=now)
    totals = history.totals()
    for key in [*registry.known_keys(), *controls, *totals]:
        counts.setdefault(key, dict.fromkeys(COUNTED, 0))
    for key in counts:
        controls.setdefault(key, Controls(key))
    waiting = [
        key
        for key, per_status in sorted(counts.items())
        if per_status[Status.QUEUED] or per_status[Status.TRANSFERRING]
    ]
    return LedgerReading(
        at=now,
        rows=counts,
        oldest_due=oldest_due_per_storage(rows, waiting, now),
        controls=controls,
        totals=totals,
    )


def backlog_per_storage(rows: PendingTransferQuerySet) -> dict[str, dict[str, int]]:
    """Rows of each status but done, of each storage key that has any. One
    grouped query, which the status indexes answer from the rows not done."""
    counts: dict[str, dict[str, int]] = {}
    for key, status, number in (
        rows.filter(status__in=COUNTED)
        .order_by()
        .values_list("storage_key", "status")
        .annotate(number=Count("pk"))
    ):
        counts.setdefault(key, dict.fromkeys(COUNTED, 0))[status] = number
    return counts


def oldest_due_per_storage(
    rows: PendingTransferQuerySet, keys: Sequence[str], now: datetime
) -> dict[str, datetime]:
    """When the longest-waiting due row of each of ``keys`` became due (queued
    and due, by ``next_attempt_at``; or leased by a worker whose lease ran out,
    by ``lease_expires_at``). One query a :data:`KEYS_A_QUERY` keys: two indexed
    LIMIT 1 subqueries a key, in the select list of a query that reads one row."""
    oldest: dict[str, datetime] = {}
    for first in range(0, len(keys), KEYS_A_QUERY):
        chunk = keys[first : first + KEYS_A_QUERY]
        columns: dict[str, Subquery] = {}
        for number, key in enumerate(chunk):
            of_key = rows.filter(storage_key=key)
            columns[f"queued_{number}"] = Subquery(
                of_key.queued()
                .filter(next_attempt_at__lte=now)
                .order_by("next_attempt_at")
                .values("next_attempt_at")[:1]
            )
            columns[f"stuck_{number}"] = Subquery(
                of_key.lease_expired(now)
                .order_by("lease_expires_at")
                .values("lease_expires_at")[:1]
            )
        found = list(rows.order_by().annotate(**columns).values(*columns)[:1])
        if not found:  # no row at all, so none is due
            return {}
        for number, key in enumerate(chunk):
            times = [found[0][f"queued_{number}"], found[0][f"stuck_{number}"]]
            due = [at for at in times if at is not None]
            if due:
                oldest[key] = min(due)
    return oldest


# The collector


class LedgerCollector:
    """A ``prometheus_client`` collector whose every value is read from the
    ledger when it is collected. Register it in a registry of your own, or in
    ``prometheus_client.REGISTRY`` beside the site's other metrics."""

    def describe(self) -> list[Metric]:
        """The metric families without samples: registering reads nothing."""
        return _families(None)

    def collect(self) -> list[Metric]:
        return _families(read_ledger())


def _families(reading: LedgerReading | None) -> list[Metric]:
    """The metric families, with the samples of ``reading`` when there is one."""
    return [*_ledger_families(reading), *_history_families(reading)]


# Imported when metrics are made, not with the module: the module is imported at
# startup (its check), by every process of a site with or without the extra.


def _ledger_families(reading: LedgerReading | None) -> list[Metric]:
    from prometheus_client.core import GaugeMetricFamily

    rows = GaugeMetricFamily(
        "queued_storage_rows",
        "Rows of the transfer ledger per storage and status, done rows left out "
        "(see queued_storage_transfers_total).",
        labels=["storage", "status"],
    )
    oldest = GaugeMetricFamily(
        "queued_storage_oldest_due_seconds",
        "Seconds the longest-waiting due transfer of the storage has waited "
        "(0 when none is due).",
        labels=["storage"],
        unit="seconds",
    )
    paused = GaugeMetricFamily(
        "queued_storage_paused",
        "1 while an operator has paused the storage's transfers, else 0.",
        labels=["storage"],
    )
    breaker_open = GaugeMetricFamily(
        "queued_storage_breaker_open",
        "1 while the storage's circuit breaker holds its transfers back (open, "
        "or half-open: one probe row due or running), 0 while it is closed.",
        labels=["storage"],
    )
    breaker_state = GaugeMetricFamily(
        "queued_storage_breaker_state",
        "The storage's circuit breaker: 1 for its state (closed, open or "
        "half-open), 0 for the others.",
        labels=["storage", "state"],
    )
    destination = GaugeMetricFamily(
        "queued_storage_destination",
        "1 for each storage key: the storage whose files it holds (primary) and "
        "the mirror it is ('' for the storage's own remote), to group a mirror's "
        "metrics with its storage's.",
        labels=["storage", "primary", "destination"],
    )
    families: list[Metric] = [
        rows,
        oldest,
        paused,
        breaker_open,
        breaker_state,
        destination,
    ]
    if reading is None:
        return families
    known = destinations.known()
    for key, per_status in sorted(reading.rows.items()):
        of_key = destinations.of(key, known)
        destination.add_metric([key, of_key.primary, of_key.mirror], 1)
        for status, number in per_status.items():
            rows.add_metric([key, status], number)
        due_at = reading.oldest_due.get(key)
        waited = 0.0 if due_at is None else (reading.at - due_at).total_seconds()
        oldest.add_metric([key], max(waited, 0.0))
        controls = reading.controls[key]
        paused.add_metric([key], int(controls.paused))
        breaker_open.add_metric([key], int(controls.breaker != BREAKER_CLOSED))
        for state in BREAKER_STATES:
            breaker_state.add_metric([key, state], int(controls.breaker == state))
    return families


def _history_families(reading: LedgerReading | None) -> list[Metric]:
    from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

    transfers = CounterMetricFamily(
        "queued_storage_transfers",
        "Transfers done (the remote copy verified and the row recorded done), per "
        "storage.",
        labels=["storage"],
    )
    transfer_bytes = CounterMetricFamily(
        "queued_storage_transfer_bytes",
        "Bytes of the transfers done, per storage.",
        labels=["storage"],
        unit="bytes",
    )
    failures = CounterMetricFamily(
        "queued_storage_transfer_failures",
        "Failed transfer attempts (retried later or given up), per storage.",
        labels=["storage"],
    )
    durations = HistogramMetricFamily(
        "queued_storage_transfer_duration_seconds",
        "Seconds from the start of a transfer to its verified remote copy, of "
        "the transfers done, per storage.",
        labels=["storage"],
        unit="seconds",
    )
    families: list[Metric] = [transfers, transfer_bytes, failures, durations]
    if reading is None:
        return families
    for key in sorted(reading.rows):
        counts = reading.totals.get(key) or history.Counts()
        transfers.add_metric([key], counts.files)
        transfer_bytes.add_metric([key], counts.bytes)
        failures.add_metric([key], counts.failures)
        cumulative = history.cumulative(counts.buckets)
        durations.add_metric(
            [key],
            [(_le(b), n) for b, n in zip(history.BOUNDS, cumulative, strict=True)],
            counts.duration_sum,
        )
    return families


def _le(bound: float) -> str:
    """A bucket's bound as prometheus_client writes its own: 1.0, 0.25, +Inf."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


@functools.cache
def ledger_registry() -> CollectorRegistry:
    """The registry the views serve: the ledger's metrics and nothing of the web
    process that answers (its memory or CPU would be one process's among many)."""
    _require_installed()
    from prometheus_client import CollectorRegistry

    metrics = CollectorRegistry(auto_describe=False)
    metrics.register(LedgerCollector())
    return metrics


# The views


@never_cache
def unguarded_metrics_view(request: HttpRequest) -> HttpResponse:
    """The ledger's metrics in the exposition format Prometheus asks for, to
    anyone: mount it only behind the site's own protection."""
    if request.method not in ("GET", "HEAD"):
        return HttpResponseNotAllowed(["GET", "HEAD"])
    _require_installed()
    from prometheus_client.exposition import choose_encoder

    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return HttpResponse(encoder(ledger_registry()), content_type=content_type)


@never_cache
def metrics_view(request: HttpRequest) -> HttpResponse:
    """The ledger's metrics, for a client that sends the bearer token of
    ``QUEUED_STORAGE_METRICS_TOKEN`` or comes from an address of
    ``QUEUED_STORAGE_METRICS_ALLOWED_IPS``; 403 for any other."""
    _require_installed()
    token = _token()
    networks = _allowed_networks()
    if not (_has_token(request, token) or _allowed_address(request, networks)):
        return HttpResponse(
            "Forbidden: send the metrics token as a bearer token, or scrape from an "
            "allowed address.\n",
            status=403,
            content_type="text/plain; charset=utf-8",
        )
    return unguarded_metrics_view(request)


def installed() -> bool:
    """Whether ``prometheus_client`` (the ``prometheus`` extra) is installed."""
    return importlib.util.find_spec("prometheus_client") is not None


def _require_installed() -> None:
    if not installed():
        raise ImproperlyConfigured(
            f"The Prometheus metrics need prometheus_client: {INSTALL_HINT}."
        )


def _has_token(request: HttpRequest, token: str | None) -> bool:
    if token is None:
        return False
    scheme, _, sent = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        sent.strip().encode(), token.encode()
    )


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _allowed_address(request: HttpRequest, networks: list[Network]) -> bool:
    if not networks:
        return False
    try:
        address = ipaddress.ip_address(request.META.get("REMOTE_ADDR", ""))
    except ValueError:  # a Unix socket's empty address, or a proxy's own text
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


# Settings


def token_problem(value: Any) -> str:
    """Why ``value`` cannot be the metrics token, or ``""``."""
    if value is None:
        return ""
    if not isinstance(value, str) or not value:
        return f"{TOKEN_SETTING} must be a non-empty string, not {value!r}."
    if not value.isascii() or not value.isprintable() or " " in value:
        # A header cannot carry it as sent: no scrape could match.
        return (
            f"{TOKEN_SETTING} must be printable ASCII without spaces (an HTTP "
            "header carries it)."
        )
    return ""


def allowed_ips_problem(value: Any) -> str:
    """Why ``value`` cannot be the allowed addresses, or ``""``."""
    if value is None:
        return ""
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        return f"{ALLOWED_IPS_SETTING} must be a list of strings, not {value!r}."
    for entry in value:
        try:
            ipaddress.ip_network(entry, strict=False)
        except (TypeError, ValueError):
            return (
                f"{ALLOWED_IPS_SETTING} has {entry!r}, which is not an IP address "
                "or network."
            )
    return ""


def _token() -> str | None:
    value = getattr(settings, TOKEN_SETTING, None)
    problem = token_problem(value)
    if problem:
        raise ImproperlyConfigured(f"{problem} {TOKEN_HINT}")
    return value


def _allowed_networks() -> list[Network]:
    value = getattr(settings, ALLOWED_IPS_SETTING, None)
    problem = allowed_ips_problem(value)
    if problem:
        raise ImproperlyConfigured(f"{problem} {ALLOWED_IPS_HINT}")
    return [ipaddress.ip_network(entry, strict=False) for entry in value or ()]


# The system check


def mounted_views(patterns: Iterable[URLPattern | URLResolver]) -> set[str]:
    """The names of this module's views that ``patterns`` (and what they
    include) mount."""
    views = {
        metrics_view: "metrics_view",
        unguarded_metrics_view: "unguarded_metrics_view",
    }
    found = set()
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            found |= mounted_views(pattern.url_patterns)
            continue
        # A view the site wrapped (functools.wraps) is still this module's.
        view: Any = pattern.callback
        while view is not None:
            if view in views:
                found.add(views[view])
                break
            view = getattr(view, "__wrapped__", None)
    return found


@checks.register(Tags.compatibility, Tags.urls)
def check_metrics(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """The view mounted or its settings set without ``prometheus_client``; the
    settings' values; a guarded view that would refuse every scrape."""
    try:
        mounted = mounted_views(get_resolver().url_patterns)
    except Exception:  # a broken URLconf: Django's own check reports it
        mounted = set()
    configured = [name for name in SETTINGS if hasattr(settings, name)]
    errors: list[CheckMessage] = []
    if not installed() and (mounted or configured):
        uses = []
        if mounted:
            uses.append(f"The URLconf mounts {' and '.join(sorted(mounted))}")
        if configured:
            verb = "are" if len(configured) > 1 else "is"
            uses.append(f"{' and '.join(configured)} {verb} set")
        errors.append(
            Error(
                f"{' and '.join(uses)} but {MISSING}.",
                hint=INSTALL_HINT + ".",
                id=MISSING_ID,
            )
        )
    token = getattr(settings, TOKEN_SETTING, None)
    networks = getattr(settings, ALLOWED_IPS_SETTING, None)
    bad_token = token_problem(token)
    if bad_token:
        errors.append(Error(bad_token, hint=TOKEN_HINT, id=TOKEN_ID))
    bad_networks = allowed_ips_problem(networks)
    if bad_networks:
        errors.append(Error(bad_networks, hint=ALLOWED_IPS_HINT, id=ALLOWED_IPS_ID))
    if (
        "metrics_view" in mounted
        and not (token or networks)
        and not (bad_token or bad_networks)
    ):
        errors.append(
            checks.Warning(
                f"The URLconf mounts metrics_view, and neither {TOKEN_SETTING} nor "
                f"{ALLOWED_IPS_SETTING} is set: it refuses every scrape (403).",
                hint=REFUSING_HINT,
                id=REFUSING_ID,
            )
        )
    return errors
