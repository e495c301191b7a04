"""The ledger admin's pages beyond Django's own: a row's file by URL, re-queue every
matching row, transfer now, and the counts above the list. ``admin.py`` builds the
registered ModelAdmin on :class:`PendingTransferViews`.

Every view and action that changes a row needs the change permission. Pages show
the storage key and the name, never a storage's options."""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING, Any, cast

from django.contrib import admin, messages
from django.contrib.admin.options import IncorrectLookupParameters
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import transaction
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.defaultfilters import truncatechars
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils.functional import SimpleLazyObject, cached_property
from django.utils.html import format_html
from django.utils.http import urlencode
from django.utils.safestring import SafeString
from django.utils.text import format_lazy
from django.utils.translation import gettext, ngettext
from django.utils.translation import gettext_lazy as _

from queued_storage import redaction, registry
from queued_storage.admin_controls import control_urls
from queued_storage.errors import Outcome
from queued_storage.models import (
    REQUEUEABLE,
    PendingTransfer,
    PendingTransferQuerySet,
)
from queued_storage.storage_state import BREAKER_CLOSED, storage_controls
from queued_storage.worker import transfer_name

if TYPE_CHECKING:
    from django_stubs_ext import StrPromise

logger = logging.getLogger("queued_storage")

Status = PendingTransfer.Status

#: At most this many rows go through "Transfer now", inline in the request.
TRANSFER_NOW_LIMIT = 20
#: The changelist's query parameter for one storage (the storage filter's).
STORAGE_PARAMETER = "storage_key"
#: Badge colours (background) per status.
STATUS_COLOURS: dict[str, str] = {
    Status.HELD: "#6c757d",
    Status.QUEUED: "#1f6feb",
    Status.TRANSFERRING: "#b35900",
    Status.DONE: "#1a7f37",
    Status.FAILED: "#cf222e",
}


def status_badge(status: str, label: str | StrPromise | None = None) -> SafeString:
    colour = STATUS_COLOURS.get(status, "#6c757d")
    return format_html(
        '<span class="qs-status qs-status-{}" style="display:inline-block;'
        "padding:1px 8px;border-radius:9px;color:#fff;background:{};"
        'font-size:11px;font-weight:600;white-space:nowrap">{}</span>',
        status,
        colour,
        label or status_label(status),
    )


def status_label(status: str) -> str:
    """A status as the admin names it; a value no status has (a newer version's,
    or one written by hand), as it is."""
    return str(Status(status).label) if status in Status.values else status or "?"


def redacted(text: str) -> str:
    """``text`` without the secrets this process knows of."""
    # Rows written before today's rules, or by another process, may quote what
    # this one knows to be a secret. The storages of settings and models are
    # built first: a page may be the first thing a web process shows.
    registry.discover()
    return redaction.redact(None, text)


def log_action(request: HttpRequest, action: str, count: int) -> None:
    logger.info(
        "admin action=%s user=%s count=%s",
        action,
        request.user.get_username(),
        count,
    )


def count_line(by_status: dict[str, int]) -> str:
    """What the changelist's rows are: "3 transfers, 2 done, 1 failed"."""
    total = sum(by_status.values())
    present = [(status, count) for status, count in by_status.items() if count]
    if len(present) == 1:
        return ngettext(
            "%(count)d transfer, %(status)s",
            "%(count)d transfers, all %(status)s",
            total,
        ) % {"count": total, "status": status_label(present[0][0])}
    line = ngettext("%(count)d transfer", "%(count)d transfers", total) % {
        "count": total
    }
    parts = [
        gettext("%(count)d %(status)s")
        % {"count": count, "status": status_label(status)}
        for status, count in present
    ]
    return ", ".join([line, *parts])


class LedgerPaginator(Paginator):  # type: ignore[type-arg]
    """Counts the changelist's rows per status in the one query that would have
    counted them, for the line that says what the list holds."""

    @cached_property
    def by_status(self) -> dict[str, int]:
        return cast(PendingTransferQuerySet, self.object_list).status_counts()

    @cached_property
    def count(self) -> int:
        return sum(self.by_status.values())

    @cached_property
    def summary(self) -> str:
        return count_line(self.by_status)


class PendingTransferViews(admin.ModelAdmin):  # type: ignore[type-arg]
    """The custom views and the "Transfer now" action of the ledger's admin."""

    paginator = LedgerPaginator

    def get_urls(self) -> list[URLPattern]:
        opts = self.opts
        info = (opts.app_label, opts.model_name)
        return [
            path(
                "requeue/",
                self.admin_site.admin_view(self.requeue_matching_view),
                name="{}_{}_requeue".format(*info),
            ),
            path(
                "<path:object_id>/file/<str:side>/",
                self.admin_site.admin_view(self.file_view),
                name="{}_{}_file".format(*info),
            ),
            *control_urls(self),
            *super().get_urls(),
        ]

    def _url(self, view: str, *args: Any) -> str:
        return reverse(
            f"{self.admin_site.name}:queued_storage_pendingtransfer_{view}", args=args
        )

    def file_view(
        self, request: HttpRequest, object_id: str, side: str
    ) -> HttpResponse:
        """Redirect to the local or remote URL of a row's file. The URL is made on
        click, so a page never waits for a remote (or shows a signed URL)."""
        row = self.get_object(request, object_id)
        if row is None or side not in ("local", "remote"):
            raise Http404
        if not self.has_view_or_change_permission(request, row):
            raise PermissionDenied
        back = self._url("change", row.pk)
        try:
            storage = registry.get(row.storage_key)
        except registry.KeyConflict as conflict:
            self.message_user(request, str(conflict), messages.ERROR)
            return HttpResponseRedirect(back)
        if storage is None:
            self.message_user(
                request,
                gettext("No storage with key %(key)s in this process.")
                % {"key": row.storage_key},
                messages.ERROR,
            )
            return HttpResponseRedirect(back)
        try:
            # A storage that cannot be built raises here: said on the page too.
            target = storage.local if side == "local" else storage.remote
            url = target.url(row.name)
        except Exception as exc:
            self.message_user(
                request,
                gettext("The %(side)s storage has no URL for this file (%(error)s).")
                % {"side": side, "error": type(exc).__name__},
                messages.ERROR,
            )
            return HttpResponseRedirect(back)
        return HttpResponseRedirect(url)

    def requeue_matching_view(self, request: HttpRequest) -> HttpResponse:
        """Re-queue every row that matches the changelist's current filters, after
        a confirmation page."""
        if not self.has_change_permission(request):
            raise PermissionDenied
        try:
            changelist = self.get_changelist_instance(request)
        except IncorrectLookupParameters:
            # What the changelist does with a filter it cannot apply.
            return HttpResponseRedirect(self._url("changelist") + "?e=1")
        matching = cast(PendingTransferQuerySet, changelist.queryset)
        filters = request.GET.urlencode()
        back = self._url("changelist")
        if filters:
            back = f"{back}?{filters}"
        if request.method == "POST" and request.POST.get("confirm") == "yes":
            count = matching.requeue()
            logger.info(
                "admin requeue user=%s count=%s filters=%s",
                request.user.get_username(),
                count,
                filters,
            )
            self.message_user(
                request,
                ngettext(
                    "%(count)d transfer re-queued.",
                    "%(count)d transfers re-queued.",
                    count,
                )
                % {"count": count},
                messages.SUCCESS,
            )
            return HttpResponseRedirect(back)
        by_status = matching.status_counts()
        context = {
            **self.admin_site.each_context(request),
            "title": gettext("Re-queue matching transfers"),
            "opts": self.opts,
            "by_status": [
                (status_badge(status), by_status.get(status, 0))
                for status in Status.values
                if by_status.get(status)
            ],
            "matching": sum(by_status.values()),
            "requeueable": sum(by_status[status] for status in REQUEUEABLE),
            "filters": [
                f"{key.removesuffix('__exact')} = {value}"
                for key, values in request.GET.lists()
                for value in values
            ],
            "back": back,
            "query": f"?{filters}" if filters else "",
        }
        return TemplateResponse(
            request,
            "admin/queued_storage/pendingtransfer/requeue_confirmation.html",
            context,
        )

    # Not wrapped in ATOMIC_REQUESTS: "Transfer now" runs the engine, whose claim
    # must commit before the upload, and whose outcome as soon as it is known.
    @transaction.non_atomic_requests
    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        if (
            request.method == "POST"
            and "action" in request.POST
            and not self.has_change_permission(request)
        ):
            # Django would quietly re-render the list; say no instead.
            raise PermissionDenied
        key = request.GET.get(STORAGE_PARAMETER)
        context = {
            "title": _("Pending transfers"),
            # Lazy: a POST (an action) redirects without rendering the counts.
            "status_counts": SimpleLazyObject(lambda: status_counts(key)),
            "can_requeue": self.has_change_permission(request),
            **(extra_context or {}),
        }
        return super().changelist_view(request, extra_context=context)

    @admin.action(
        description=format_lazy(
            _("Transfer now (at most {limit})"), limit=TRANSFER_NOW_LIMIT
        ),
        permissions=["change"],
    )
    def transfer_now(
        self, request: HttpRequest, queryset: PendingTransferQuerySet
    ) -> None:
        pks = list(
            queryset.order_by("pk").values_list("pk", flat=True)[
                : TRANSFER_NOW_LIMIT + 1
            ]
        )
        if len(pks) > TRANSFER_NOW_LIMIT:
            self.message_user(
                request,
                gettext(
                    "Transfer now runs in this request, for at most %(limit)d rows. "
                    "Select fewer, or use Retry now and let a worker take them."
                )
                % {"limit": TRANSFER_NOW_LIMIT},
                messages.ERROR,
            )
            return
        outcomes, errors = transfer_rows(pks)
        log_action(request, "transfer_now", len(pks))
        parts = [
            gettext("%(count)d transferred") % {"count": outcomes[Outcome.DONE.value]},
            gettext("%(count)d to retry") % {"count": outcomes[Outcome.RETRY.value]},
            gettext("%(count)d failed") % {"count": outcomes[Outcome.FAILED.value]},
        ]
        if outcomes[Outcome.PURGED.value]:
            parts.append(
                gettext("%(count)d deleted") % {"count": outcomes[Outcome.PURGED.value]}
            )
        if outcomes["paused"]:
            parts.append(
                ngettext(
                    "%(count)d not started: its storage is paused (resume it first)",
                    "%(count)d not started: their storage is paused (resume it first)",
                    outcomes["paused"],
                )
                % {"count": outcomes["paused"]}
            )
        if outcomes["breaker"]:
            parts.append(
                ngettext(
                    "%(count)d not started: its storage's circuit breaker is open "
                    "(one probe row tries the remote when its backoff ends)",
                    "%(count)d not started: their storage's circuit breaker is open "
                    "(one probe row tries the remote when its backoff ends)",
                    outcomes["breaker"],
                )
                % {"count": outcomes["breaker"]}
            )
        skipped = outcomes["skipped"] + outcomes[Outcome.STALE.value]
        if skipped:
            parts.append(
                gettext(
                    "%(count)d skipped (not due: done, leased by a worker, or local "
                    "to another host)"
                )
                % {"count": skipped}
            )
        level = messages.WARNING if errors else messages.SUCCESS
        self.message_user(request, "; ".join(parts) + ".", level)
        for error in errors:
            self.message_user(request, error, messages.WARNING)


def transfer_rows(pks: list[int]) -> tuple[Counter[str], list[str]]:
    """Re-queue the rows ``pks`` and transfer each in this thread, as a worker
    would: the count per outcome ("skipped" for a row the engine did not take,
    "paused" for one it did not take because its storage is paused, "breaker"
    because its storage's circuit breaker is open) and ``name: error`` of each
    that failed."""
    selected = PendingTransfer.objects.filter(pk__in=pks)
    selected.requeue()
    outcomes: Counter[str] = Counter()
    errors: list[str] = []
    rows = list(selected.order_by("pk").values_list("pk", "storage_key", "name"))
    controls = storage_controls(sorted({key for _pk, key, _name in rows}))
    for pk, key, name in rows:
        outcome = transfer_name(key, name)
        if outcome is None:
            if controls[key].paused:
                outcomes["paused"] += 1
            elif controls[key].breaker != BREAKER_CLOSED:
                outcomes["breaker"] += 1
            else:
                outcomes["skipped"] += 1
            continue
        outcomes[outcome.value] += 1
        if outcome in (Outcome.RETRY, Outcome.FAILED):
            error = (
                PendingTransfer.objects.filter(pk=pk)
                .values_list("last_error", flat=True)
                .first()
            )
            errors.append(f"{name}: {truncatechars(redacted(error or ''), 200)}")
    return outcomes, errors


def status_counts(key: str | None) -> list[dict[str, Any]]:
    """Rows per status, and stuck rows, as filter links: two queries that the
    status indexes answer without reading the rows."""
    rows = PendingTransfer.objects.all()
    extra: dict[str, str] = {}
    if key:
        rows = rows.filter(storage_key=key)
        extra[STORAGE_PARAMETER] = key
    found = rows.status_counts()
    counts = [
        {
            "badge": status_badge(status),
            "count": found.get(status, 0),
            "query": "?" + urlencode({"status__exact": status, **extra}),
        }
        for status in Status.values
    ]
    counts.append(
        {
            "badge": status_badge(Status.FAILED, gettext("stuck")),
            "count": rows.stuck().count(),
            "query": "?" + urlencode({"stuck": "yes", **extra}),
        }
    )
    return counts
