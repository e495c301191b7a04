"""The ledger in the Django admin: read-only rows, changed only through actions.

Every action needs the change permission; a user with only the view permission
sees the ledger and can run none of them. Pages show the storage key and the
name, never a storage's options."""

from __future__ import annotations

import logging
from collections import Counter
from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast

from django.contrib import admin, messages
from django.contrib.admin.options import IncorrectLookupParameters
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import Count, QuerySet
from django.db.models.functions import Lower
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.defaultfilters import filesizeformat, truncatechars
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.functional import SimpleLazyObject
from django.utils.html import format_html, format_html_join
from django.utils.http import urlencode
from django.utils.safestring import SafeString
from django.utils.text import format_lazy, smart_split, unescape_string_literal
from django.utils.timesince import timesince, timeuntil
from django.utils.translation import gettext, ngettext
from django.utils.translation import gettext_lazy as _

from queued_storage import redaction, registry
from queued_storage.conf import settings as conf
from queued_storage.errors import Outcome
from queued_storage.models import PendingTransfer, PendingTransferQuerySet
from queued_storage.worker import transfer_name

if TYPE_CHECKING:
    from django_stubs_ext import StrPromise

logger = logging.getLogger("queued_storage")

Status = PendingTransfer.Status

#: At most this many rows go through "Transfer now", inline in the request.
TRANSFER_NOW_LIMIT = 20
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
        label or Status(status).label,
    )


def _redacted(text: str) -> str:
    # Rows written before today's rules, or by another process, may quote what
    # this one knows to be a secret.
    return redaction.redact(None, text)


class StorageFilter(admin.SimpleListFilter):
    """The storages this process knows, from settings and models: listing the
    keys found in the ledger would read the whole table on every page load."""

    title = _("storage")
    parameter_name = "storage_key"

    def lookups(
        self, request: HttpRequest, model_admin: admin.ModelAdmin[Any]
    ) -> list[tuple[str, Any]]:
        keys = registry.known_keys()
        value = self.value()
        if value and value not in keys:
            keys = sorted([*keys, value])  # a key no storage has any more
        return [(key, key) for key in keys]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        return queryset.filter(storage_key=value) if value else queryset


class StuckFilter(admin.SimpleListFilter):
    title = _("stuck")
    parameter_name = "stuck"

    def lookups(
        self, request: HttpRequest, model_admin: admin.ModelAdmin[Any]
    ) -> list[tuple[str, Any]]:
        return [("yes", _("transferring past its lease or the transfer timeout"))]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value() == "yes":
            return cast(PendingTransferQuerySet, queryset).stuck()
        return queryset


class FailingFilter(admin.SimpleListFilter):
    title = _("failing")
    parameter_name = "failing"

    def lookups(
        self, request: HttpRequest, model_admin: admin.ModelAdmin[Any]
    ) -> list[tuple[str, Any]]:
        return [("yes", _("failed attempts, not done"))]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value() == "yes":
            return cast(PendingTransferQuerySet, queryset).failing()
        return queryset


@admin.register(PendingTransfer)
class PendingTransferAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = [
        "name",
        "storage_key",
        "status_badge",
        "attempts",
        "next_attempt_or_age",
        "size_display",
        "short_error",
        "updated_at",
    ]
    list_filter = ["status", StorageFilter, StuckFilter, FailingFilter, "deleted"]
    # Searched in get_search_results(); listed so that the changelist has a box.
    search_fields = ["name"]
    # The primary key grows with every new row: newest first without sorting the
    # whole table on a column that has no index.
    ordering = ["-pk"]
    list_per_page = 100
    show_full_result_count = False
    # Facets cost one COUNT per filter choice on every page load.
    show_facets = admin.ShowFacets.NEVER
    actions = ["retry_now", "hold", "transfer_now"]
    fieldsets = [
        (
            None,
            {
                "fields": [
                    "name",
                    "storage_key",
                    "status_badge",
                    "deleted",
                    "file_links",
                ]
            },
        ),
        (
            _("Transfer"),
            {
                "fields": [
                    "attempts",
                    "next_attempt_at",
                    "lease_expires_at",
                    "transferred_at",
                    "remote_owned",
                    "generation",
                ]
            },
        ),
        (_("File"), {"fields": ["size_detail", "checksum", "host"]}),
        (_("Errors"), {"fields": ["last_error_display", "error_history_table"]}),
        (_("Times"), {"fields": ["created_at", "updated_at"]}),
    ]
    change_list_template = "admin/queued_storage/pendingtransfer/change_list.html"

    # Read-only: the ledger changes through actions (each a short, conditional
    # update), never through a form that would write back a stale row.

    def get_readonly_fields(
        self, request: HttpRequest, obj: PendingTransfer | None = None
    ) -> list[str]:
        return [
            str(field)
            for fieldset in self.fieldsets or []
            for field in fieldset[1]["fields"]
        ]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(
        self, request: HttpRequest, obj: PendingTransfer | None = None
    ) -> bool:
        # The change permission is what the actions need; a row itself is never
        # edited, so its page is the read-only view page for everyone.
        if obj is not None:
            return False
        return super().has_change_permission(request)

    def has_delete_permission(
        self, request: HttpRequest, obj: PendingTransfer | None = None
    ) -> bool:
        # Deleting a row would lose track of where its file is: delete the file
        # through the storage instead.
        return False

    def get_queryset(self, request: HttpRequest) -> PendingTransferQuerySet:
        rows: PendingTransferQuerySet = super().get_queryset(request)  # type: ignore[assignment]
        match = request.resolver_match
        if (
            match is not None
            and match.url_name
            and match.url_name.endswith("_changelist")
        ):
            # Up to ten errors of 2,000 characters each: not for a list page.
            rows = rows.defer("error_history")
        return rows

    # Columns and fields

    @admin.display(description=_("status"), ordering="status")
    def status_badge(self, row: PendingTransfer) -> SafeString:
        if row.deleted:
            return format_html(
                "{} {}", status_badge(row.status), status_badge("", _("deleting"))
            )
        return status_badge(row.status)

    @admin.display(description=_("next attempt / age"), ordering="next_attempt_at")
    def next_attempt_or_age(self, row: PendingTransfer) -> str:
        now = timezone.now()
        if row.status == Status.QUEUED and row.next_attempt_at is not None:
            if row.next_attempt_at <= now:
                return gettext("due for %(time)s") % {
                    "time": timesince(row.next_attempt_at, now)
                }
            return gettext("in %(time)s") % {
                "time": timeuntil(row.next_attempt_at, now)
            }
        if row.status == Status.TRANSFERRING and row.lease_expires_at is not None:
            # Past its lease, or renewed last longer ago than the transfer timeout.
            try:
                stuck_since = min(
                    row.lease_expires_at,
                    row.updated_at
                    + timedelta(seconds=conf.QUEUED_STORAGE_TRANSFER_TIMEOUT),
                )
            except OverflowError:  # a timeout meant as "never"
                stuck_since = row.lease_expires_at
            if stuck_since < now:
                return gettext("stuck for %(time)s") % {
                    "time": timesince(stuck_since, now)
                }
            return gettext("lease for %(time)s") % {
                "time": timeuntil(row.lease_expires_at, now)
            }
        if row.status == Status.DONE and row.transferred_at is not None:
            return gettext("done %(time)s ago") % {
                "time": timesince(row.transferred_at, now)
            }
        return gettext("%(status)s %(time)s ago") % {
            "status": Status(row.status).label,
            "time": timesince(row.updated_at, now),
        }

    @admin.display(description=_("size"), ordering="size")
    def size_display(self, row: PendingTransfer) -> str:
        return "-" if row.size is None else str(filesizeformat(row.size))

    @admin.display(description=_("size"))
    def size_detail(self, row: PendingTransfer) -> str:
        if row.size is None or row.size < 1024:
            return self.size_display(row)
        return f"{filesizeformat(row.size)} ({row.size} bytes)"

    @admin.display(description=_("last error"))
    def short_error(self, row: PendingTransfer) -> str:
        return truncatechars(_redacted(row.last_error), 80)

    @admin.display(description=_("last error"))
    def last_error_display(self, row: PendingTransfer) -> str:
        return _redacted(row.last_error) or "-"

    @admin.display(description=_("error history"))
    def error_history_table(self, row: PendingTransfer) -> SafeString | str:
        entries = [
            entry for entry in row.error_history or [] if isinstance(entry, dict)
        ]
        if not entries:
            return "-"
        body = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    entry.get("attempt", ""),
                    entry.get("at", ""),
                    entry.get("error", ""),
                    _redacted(str(entry.get("message", ""))),
                )
                for entry in reversed(entries)
            ),
        )
        return format_html(
            "<table><thead><tr><th>{}</th><th>{}</th><th>{}</th><th>{}</th></tr>"
            "</thead><tbody>{}</tbody></table>",
            _("attempt"),
            _("time"),
            _("error"),
            _("message"),
            body,
        )

    @admin.display(description=_("open"))
    def file_links(self, row: PendingTransfer) -> SafeString | str:
        if row.pk is None or row.deleted:
            return "-"
        links = []
        for side, label in (("local", _("local copy")), ("remote", _("remote copy"))):
            url = reverse(
                f"{self.admin_site.name}:queued_storage_pendingtransfer_file",
                args=[row.pk, side],
            )
            links.append((url, label))
        return format_html_join(
            " · ", '<a href="{}" target="_blank" rel="noopener">{}</a>', links
        )

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Any], search_term: str
    ) -> tuple[QuerySet[Any], bool]:
        """Rows whose name contains every word of the search, ignoring case.

        Not ``name__icontains``: that is LIKE, which the binary collation the name
        has on MariaDB/MySQL (so that names compare exactly) makes case-sensitive.
        """
        queryset = queryset.alias(name_lower=Lower("name"))
        for term in smart_split(search_term):
            if term[:1] in ('"', "'") and term[-1:] == term[:1]:
                term = unescape_string_literal(term)
            queryset = queryset.filter(name_lower__contains=term.lower())
        return queryset, False

    # Extra views

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
            *super().get_urls(),
        ]

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
        back = reverse(
            f"{self.admin_site.name}:queued_storage_pendingtransfer_change",
            args=[row.pk],
        )
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
            return HttpResponseRedirect(
                reverse(
                    f"{self.admin_site.name}:queued_storage_pendingtransfer_changelist"
                )
                + "?e=1"
            )
        matching = cast(PendingTransferQuerySet, changelist.queryset)
        filters = request.GET.urlencode()
        back = reverse(
            f"{self.admin_site.name}:queued_storage_pendingtransfer_changelist"
        )
        if filters:
            back = f"{back}?{filters}"
        requeueable = matching.filter(
            status__in=[Status.HELD, Status.QUEUED, Status.FAILED]
        )
        if request.method == "POST" and request.POST.get("confirm") == "yes":
            count = requeueable.requeue()
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
        by_status = dict(
            matching.order_by()
            .values_list("status")
            .annotate(number=Count("pk"))
            .values_list("status", "number")
        )
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
            "requeueable": sum(
                by_status.get(status, 0)
                for status in (Status.HELD, Status.QUEUED, Status.FAILED)
            ),
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
        key = request.GET.get(StorageFilter.parameter_name)
        context = {
            "title": _("Pending transfers"),
            # Lazy: a POST (an action) redirects without rendering the counts.
            "status_counts": SimpleLazyObject(lambda: self.status_counts(key)),
            "can_requeue": self.has_change_permission(request),
            **(extra_context or {}),
        }
        return super().changelist_view(request, extra_context=context)

    def status_counts(self, key: str | None) -> list[dict[str, Any]]:
        """Rows per status, and stuck rows, as filter links: two queries that the
        status indexes answer without reading the rows."""
        rows = PendingTransfer.objects.all()
        extra: dict[str, str] = {}
        if key:
            rows = rows.filter(storage_key=key)
            extra[StorageFilter.parameter_name] = key
        found = dict(
            rows.order_by()
            .values_list("status")
            .annotate(number=Count("pk"))
            .values_list("status", "number")
        )
        counts = [
            {
                "badge": status_badge(status),
                "count": found.get(status, 0),
                "query": "?" + urlencode({"status__exact": status, **extra}),
            }
            for status in Status.values
        ]
        stuck = rows.stuck().count()
        counts.append(
            {
                "badge": status_badge(Status.FAILED, gettext("stuck")),
                "count": stuck,
                "query": "?" + urlencode({"stuck": "yes", **extra}),
            }
        )
        return counts

    # Actions

    def _log_action(self, request: HttpRequest, action: str, count: int) -> None:
        logger.info(
            "admin action=%s user=%s count=%s",
            action,
            request.user.get_username(),
            count,
        )

    @admin.action(description=_("Retry now"), permissions=["change"])
    def retry_now(
        self, request: HttpRequest, queryset: PendingTransferQuerySet
    ) -> None:
        count = queryset.requeue()
        self._log_action(request, "retry_now", count)
        self.message_user(
            request,
            ngettext("%(count)d transfer queued.", "%(count)d transfers queued.", count)
            % {"count": count},
            messages.SUCCESS,
        )

    @admin.action(description=_("Hold"), permissions=["change"])
    def hold(self, request: HttpRequest, queryset: PendingTransferQuerySet) -> None:
        count = queryset.hold()
        self._log_action(request, "hold", count)
        self.message_user(
            request,
            ngettext(
                "%(count)d transfer held; Retry now releases it.",
                "%(count)d transfers held; Retry now releases them.",
                count,
            )
            % {"count": count},
            messages.SUCCESS,
        )

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
        selected = PendingTransfer.objects.filter(pk__in=pks)
        selected.requeue()
        outcomes: Counter[str] = Counter()
        errors: list[str] = []
        for pk, key, name in selected.order_by("pk").values_list(
            "pk", "storage_key", "name"
        ):
            outcome = transfer_name(key, name)
            outcomes["skipped" if outcome is None else outcome.value] += 1
            if outcome in (Outcome.RETRY, Outcome.FAILED):
                error = (
                    PendingTransfer.objects.filter(pk=pk)
                    .values_list("last_error", flat=True)
                    .first()
                )
                error = _redacted(error or "")
                errors.append(f"{name}: {truncatechars(error, 200)}")
        self._log_action(request, "transfer_now", len(pks))
        parts = [
            gettext("%(count)d transferred") % {"count": outcomes[Outcome.DONE.value]},
            gettext("%(count)d to retry") % {"count": outcomes[Outcome.RETRY.value]},
            gettext("%(count)d failed") % {"count": outcomes[Outcome.FAILED.value]},
        ]
        if outcomes[Outcome.PURGED.value]:
            parts.append(
                gettext("%(count)d deleted") % {"count": outcomes[Outcome.PURGED.value]}
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
