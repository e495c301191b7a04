"""The ledger in the Django admin: read-only rows, changed only through actions;
the list, its filters and columns. The custom views are in ``admin_views.py``.

Every action needs the change permission; a user with only the view permission
sees the ledger and can run none of them. Pages show the storage key and the
name, never a storage's options."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, cast

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.db.models.functions import Lower
from django.http import HttpRequest
from django.template.defaultfilters import filesizeformat
from django.utils import timezone
from django.utils.formats import date_format
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.text import smart_split, unescape_string_literal
from django.utils.timesince import timesince, timeuntil
from django.utils.translation import gettext, ngettext
from django.utils.translation import gettext_lazy as _

from queued_storage import dashboard_admin as dashboard_admin  # registers its page
from queued_storage import destinations, registry
from queued_storage.admin_destinations import DestinationFilter, DestinationsDetail
from queued_storage.admin_detail import shown_in_zone
from queued_storage.admin_views import (
    STORAGE_PARAMETER,
    log_action,
    redacted,
    status_badge,
    status_label,
)
from queued_storage.conf import settings as conf
from queued_storage.models import PendingTransfer, PendingTransferQuerySet

Status = PendingTransfer.Status

#: The changelist shows this many characters of a name or an error (the whole
#: text in the tooltip), so that its columns fit a 1280-pixel window.
NAME_CUT = 60
ERROR_CUT = 60


def cut_text(text: str, length: int, *, keep_end: bool = False) -> SafeString:
    """``text`` cut to ``length`` characters (its end kept for a path, whose file
    name is there), whole in the tooltip."""
    if len(text) <= length:
        shown = text
    elif keep_end:
        shown = "…" + text[-(length - 1) :]
    else:
        shown = text[: length - 1] + "…"
    return format_html('<span title="{}">{}</span>', text, shown)


class StorageFilter(admin.SimpleListFilter):
    """The storages this process knows, from settings and models: listing the
    keys found in the ledger would read the whole table on every page load. A
    mirror's key follows its storage's, as "media → backup (mirror)"."""

    title = _("storage")
    parameter_name = STORAGE_PARAMETER

    def lookups(
        self, request: HttpRequest, model_admin: admin.ModelAdmin[Any]
    ) -> list[tuple[str, Any]]:
        keys = registry.known_keys()
        value = self.value()
        if value and value not in keys:
            keys = [*keys, value]  # a key no storage has any more
        return [(d.key, d.label()) for d in destinations.grouped(keys)]

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
class PendingTransferAdmin(DestinationsDetail):
    # Five columns, to fit beside the navigation and the filters in a 1280-pixel
    # window: the storage key under the name, the attempts under the status, the
    # last update under the next attempt or age.
    list_display = [
        "name_display",
        "status_and_attempts",
        "when",
        "size_display",
        "short_error",
    ]
    list_filter = [
        "status",
        StorageFilter,
        DestinationFilter,
        StuckFilter,
        FailingFilter,
        "deleted",
    ]
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
                    "deleted_state",
                    "file_links",
                ]
            },
        ),
        (
            _("Transfer"),
            {
                "fields": [
                    "attempts",
                    "next_attempt",
                    "lease_expires_at",
                    "transferred_at",
                    "remote_state",
                    "generation",
                ]
            },
        ),
        (_("File"), {"fields": ["size_detail", "checksum", "host"]}),
        (_("Errors"), {"fields": ["last_error_display", "error_history_table"]}),
        (_("Times"), {"fields": ["created_at", "updated_at"]}),
    ]
    change_list_template = "admin/queued_storage/pendingtransfer/change_list.html"
    change_form_template = "admin/queued_storage/pendingtransfer/change_form.html"

    # Read-only: the ledger changes through actions (each a short, conditional
    # update), never through a form that would write back a stale row.

    def get_readonly_fields(
        self, request: HttpRequest, obj: PendingTransfer | None = None
    ) -> list[str]:
        return [
            str(field)
            for fieldset in self.get_fieldsets(request, obj)
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
                    "time": timesince(row.next_attempt_at, now, depth=1)
                }
            return gettext("in %(time)s") % {
                "time": timeuntil(row.next_attempt_at, now, depth=1)
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
                    "time": timesince(stuck_since, now, depth=1)
                }
            return gettext("lease for %(time)s") % {
                "time": timeuntil(row.lease_expires_at, now, depth=1)
            }
        if row.status == Status.DONE and row.transferred_at is not None:
            return gettext("done %(time)s ago") % {
                "time": timesince(row.transferred_at, now, depth=1)
            }
        return gettext("%(status)s %(time)s ago") % {
            "status": status_label(row.status),
            "time": timesince(row.updated_at, now, depth=1),
        }

    @admin.display(description=_("size"), ordering="size")
    def size_display(self, row: PendingTransfer) -> str:
        return "-" if row.size is None else str(filesizeformat(row.size))

    @admin.display(description=_("size"))
    def size_detail(self, row: PendingTransfer) -> str:
        if row.size is None or row.size < 1024:
            return self.size_display(row)
        return f"{filesizeformat(row.size)} ({row.size} bytes)"

    @admin.display(description=_("name / storage"), ordering="name")
    def name_display(self, row: PendingTransfer) -> SafeString:
        return format_html(
            '{}<br><span class="qs-key" title="{}">{}</span>',
            cut_text(row.name, NAME_CUT, keep_end=True),
            row.storage_key,
            destinations.of(row.storage_key).label(),
        )

    @admin.display(description=_("status"), ordering="status")
    def status_and_attempts(self, row: PendingTransfer) -> SafeString:
        if not row.attempts:
            return self.status_badge(row)
        return format_html(
            '{}<br><span class="qs-attempts">{}</span>',
            self.status_badge(row),
            ngettext("%(count)d attempt", "%(count)d attempts", row.attempts)
            % {"count": row.attempts},
        )

    @admin.display(description=_("next attempt / age"), ordering="next_attempt_at")
    def when(self, row: PendingTransfer) -> SafeString:
        return format_html(
            '{}<br><span class="qs-updated">{}</span>',
            self.next_attempt_or_age(row),
            self.updated(row),
        )

    @admin.display(description=_("last error"))
    def short_error(self, row: PendingTransfer) -> SafeString | str:
        return cut_text(redacted(row.last_error), ERROR_CUT) if row.last_error else ""

    def updated(self, row: PendingTransfer) -> SafeString:
        """The time today, the day this year, the date before; whole in the
        tooltip."""
        local = shown_in_zone(row.updated_at)
        today = shown_in_zone(timezone.now()).date()  # also where USE_TZ is False
        if local.date() == today:
            shown = date_format(local, "TIME_FORMAT")
        elif local.year == today.year:
            shown = date_format(local, "MONTH_DAY_FORMAT")
        else:
            shown = date_format(local, "SHORT_DATE_FORMAT")
        return format_html(
            '<span title="{}">{}</span>',
            date_format(local, "DATETIME_FORMAT"),
            gettext("updated %(time)s") % {"time": shown},
        )

    @admin.display(description=_("last error"))
    def last_error_display(self, row: PendingTransfer) -> str:
        return redacted(row.last_error) or "-"

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

    # Actions

    @admin.action(description=_("Retry now"), permissions=["change"])
    def retry_now(
        self, request: HttpRequest, queryset: PendingTransferQuerySet
    ) -> None:
        count = queryset.requeue()
        log_action(request, "retry_now", count)
        self.message_user(
            request,
            ngettext("%(count)d transfer queued.", "%(count)d transfers queued.", count)
            % {"count": count},
            messages.SUCCESS,
        )

    @admin.action(description=_("Hold"), permissions=["change"])
    def hold(self, request: HttpRequest, queryset: PendingTransferQuerySet) -> None:
        count = queryset.hold()
        log_action(request, "hold", count)
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
